"""The OmniRIS feature spec that every builder config of this package yields: the data contract.

One spec for all sources (shapes, the released OmniRef, the rebuilt OmniRef, the RIS benchmarks) lets one grain
pipeline read any of them. Images and masks are stored as PNG bytes: TFDS can only encode numpy images with
TensorFlow, but it stores ready-made PNG bytes as they are and decodes them with PIL, so building and reading
(`tfds.data_source`, array_record files) never need TensorFlow.

Read back through `tfds.data_source`, an example is a dict of numpy values: images uint8 (H, W, 3), masks
uint8 (H, W, 1) of 0/1, `id`/`text` as bytes, class labels as int indices into the names below, `no_target` as
bool, `category_ids` as a list of int64.
"""

from __future__ import annotations

import functools
import io
from typing import Any, Mapping

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

MODALITY_NAMES = ("text", "visual", "omni")
# Prompts x target instances: text or visual examples have one prompt, omni examples two.
SETTING_NAMES = ("one_vs_one", "one_vs_many", "many_vs_one", "many_vs_many", "no_target")
# The default spatial prompt of an example ('none' for text-only examples).
PROMPT_TYPE_NAMES = ("none", "mask", "box", "scribble")

IMAGE_KEYS = ("image", "ref_image")
MASK_KEYS = ("text_mask", "ref_mask", "ref_box", "ref_scribble", "visual_mask", "mask")


def readable(example: Mapping[str, Any]) -> dict[str, Any]:
  """A decoded example with its class labels as names and `id`/`text` as str (for assertions, printing)."""
  out = dict(example)
  for key, names in (("modality", MODALITY_NAMES), ("setting", SETTING_NAMES), ("prompt_type", PROMPT_TYPE_NAMES)):
    out[key] = names[int(example[key])]
  out["id"], out["text"] = example["id"].decode(), example["text"].decode()
  return out


def as_decoded(example: Mapping[str, Any]) -> dict[str, Any]:
  """A numpy example (label names, str text) in the form `tfds.data_source` reads records back in (the inverse
  of `readable`, without the PNG round trip): label indices, `id`/`text` as bytes, `category_ids` a list."""
  out = dict(example)
  for key, names in (("modality", MODALITY_NAMES), ("setting", SETTING_NAMES), ("prompt_type", PROMPT_TYPE_NAMES)):
    value = example[key]
    out[key] = names.index(value) if isinstance(value, str) else int(value)
  for key in ("id", "text"):
    if isinstance(example[key], str):
      out[key] = example[key].encode()
  out["no_target"] = bool(example["no_target"])
  out["category_ids"] = [np.int64(c) for c in np.asarray(example["category_ids"]).reshape(-1)]
  return out


def omniris_features() -> tfds.features.FeaturesDict:
  """The features of one OmniRIS example; every builder config of this package uses exactly these."""
  rgb = lambda doc: tfds.features.Image(shape=(None, None, 3), encoding_format="png", doc=doc)  # noqa: E731
  binary = lambda doc: tfds.features.Image(shape=(None, None, 1), encoding_format="png", doc=doc)  # noqa: E731
  return tfds.features.FeaturesDict({
      "id": tfds.features.Text(doc="Unique example id, e.g. 'shapes/train/000123'."),
      "image_id": tfds.features.Scalar(np.int64, doc="Id of the target image."),
      "image": rgb("Target image."),
      "text": tfds.features.Text(doc="Text prompt; '' when the example has no text prompt."),
      "text_mask": binary("Ground truth of the text referent, 0/1; zeros when no text prompt or no target."),
      "ref_image": rgb("Reference image of the visual prompt; 1x1 black placeholder when none."),
      "ref_image_id": tfds.features.Scalar(np.int64, doc="Id of the reference image; -1 when none."),
      "ref_mask": binary("Mask prompt on the reference image, 0/1; 1x1 placeholder when none."),
      "ref_box": binary("Box prompt: the tight bounding rectangle of ref_mask, filled; 1x1 placeholder if none."),
      "ref_scribble": binary("Scribble prompt: strokes inside ref_mask; 1x1 placeholder when none."),
      "visual_mask": binary("Ground truth of the visual referent on the target, 0/1; zeros when none."),
      "mask": binary("Ground truth of the union of the referents, 0/1."),
      "no_target": tfds.features.Scalar(np.bool_, doc="True when the prompts refer to nothing in the image."),
      "modality": tfds.features.ClassLabel(names=MODALITY_NAMES, doc="Which prompts the example has."),
      "setting": tfds.features.ClassLabel(names=SETTING_NAMES, doc="Prompts x target instances."),
      "prompt_type": tfds.features.ClassLabel(names=PROMPT_TYPE_NAMES,
                                              doc="Default spatial prompt; 'none' for text-only examples."),
      "category_ids": tfds.features.Sequence(np.int64, doc="Categories of the referents; empty for no target."),
      "ref_category_id": tfds.features.Scalar(np.int64, doc="Category of the reference instance; -1 when none."),
  })


@functools.cache
def feature_names() -> frozenset[str]:
  """The feature names of `omniris_features()` (cached: building the FeaturesDict per example is slow)."""
  return frozenset(omniris_features().keys())


def encode_png(array: np.ndarray, name: str = "image") -> bytes:
  """PNG bytes of a uint8 (H, W, 3) image or (H, W, 1) / (H, W) mask; fast compression (the files are small)."""
  array = np.asarray(array)
  if array.dtype != np.uint8:
    raise ValueError(f"{name} must be uint8 to be stored as PNG; got {array.dtype=}.")
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3) or 0 in array.shape:
    raise ValueError(f"{name} must have shape (H, W, 3) or (H, W, 1) with H, W > 0; got {array.shape=}.")
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
  return buffer.getvalue()


def encode_example(example: Mapping[str, Any]) -> dict[str, Any]:
  """The values TFDS should store for a numpy example under the OmniRIS feature names.

  Images and masks become PNG bytes (so TFDS needs no TensorFlow); masks are checked to be 0/1 so a 0/255 mask
  cannot slip in; everything else passes through (ClassLabel features take names or indices).
  """
  expected = feature_names()
  missing, extra = expected - set(example), set(example) - expected
  if missing or extra:
    raise ValueError(f"example {example.get('id')!r} must have exactly the OmniRIS features; "
                     f"missing {sorted(missing)}, unexpected {sorted(extra)}.")
  encoded = dict(example)
  for key in IMAGE_KEYS + MASK_KEYS:
    value = np.asarray(example[key])
    if key in MASK_KEYS and value.size and value.max() > 1:
      raise ValueError(f"{key} of example {example['id']!r} must be 0/1; got max {value.max()}.")
    encoded[key] = encode_png(value, name=f"{key} of example {example['id']!r}")
  encoded["category_ids"] = [int(c) for c in np.asarray(example["category_ids"]).reshape(-1)]
  return encoded
