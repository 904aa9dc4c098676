"""Segment what prompts refer to in your own images: a predictor that encodes an image once, and its CLI.

  predictor = Predictor.from_workdir("workdir/demo")          # a trained stage (the newest by default), or a
                                                               # converted release checkpoint (convert_release)
  predictor.set_image("photo.jpg")                             # encodes the target once
  result = predictor.predict(text="the red circle")           # one prompt ...
  result = predictor.predict(text=["the cat", "the dog"])      # ... or several, in one batched call
  result = predictor.predict(ref_image="ref.jpg", ref_box=(10, 20, 110, 90))           # a visual prompt
  result = predictor.predict(text="the left one", ref_image="ref.jpg", ref_mask="m.png")  # omni
  result.masks (K, H, W) bool at the image's own size, result.union (H, W), result.no_target_prob (K,)

The predictor carries the preprocessing the model was trained with: images of any size and mode (RGB, RGBA,
grayscale, palette, EXIF-rotated JPEG; arrays, PIL images or paths) are resized to the model's square input
(bilinear; spatial prompts nearest), text is tokenised to the model's length. Outputs are upsampled back to the
target's size. An omni prompt (text and a visual prompt) of a 'union' model is answered as the release
evaluates it: each part's mask is upsampled and the masks are OR-ed, and "no target" is called only when both
parts call it. A prompt's mask is empty when the model calls "no target" for it, and the union is over the
prompts the model finds.

Compiled once per bucket: the image encoder once per predictor, the prompt decoder once per (number of prompts
rounded up to a power of two, modalities present). Another prompt about the same image runs only the prompt
encoders and the mask decoder. (Padding rows carry no prompt, but a padded batch with visual prompts still sends
their blank references through the image encoder: at most twice the visual prompts' encoder passes.) A model
with early fusion (the release's) fuses each prompt into its image encoder, so `set_image` only keeps the
resized image and every `predict` call runs the whole model: same answers, no encoding to reuse.

CLI (a folder of images runs with a progress line):

  python -m omniris_jax.predict --workdir workdir/demo --image target.jpg --text "the red circle" \\
      --out overlay.png --json result.json
  python -m omniris_jax.predict --workdir DIR --image target.jpg --ref-image ref.jpg --ref-box 10,20,110,90 \\
      --out overlay.png
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import pathlib
import sys
import textwrap
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
ImageLike = Any  # a path, a PIL image or an array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)


# ===============================================================================================================
# Inputs
# ===============================================================================================================


def _open(path: str | os.PathLike, name: str) -> Image.Image:
  """The image file at `path`, decoded and turned upright by its EXIF orientation; errors name `name`."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{name}: no file {path!r}.")
  try:
    with Image.open(path) as opened:
      opened.load()
      return ImageOps.exif_transpose(opened)
  except (UnidentifiedImageError, OSError) as error:
    raise ValueError(f"{name}: {path!r} is not an image this predictor can read ({error}); give a JPEG, PNG or "
                     "another format Pillow opens.") from error


def load_image(image: ImageLike, name: str = "image") -> np.ndarray:
  """Any image as uint8 RGB (H, W, 3), EXIF orientation applied; a clear ValueError when it cannot be read."""
  if isinstance(image, (str, os.PathLike)):
    image = _open(image, name)
  elif isinstance(image, Image.Image):
    image = ImageOps.exif_transpose(image)
  if isinstance(image, Image.Image):
    image = np.asarray(image.convert("RGB"))
  array = np.asarray(image)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim == 2:
    array = np.repeat(array[..., None], 3, axis=-1)
  if array.ndim != 3 or array.shape[-1] not in (3, 4):
    raise ValueError(f"{name}: an array image must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got shape "
                     f"{array.shape}.")
  array = array[..., :3]
  if array.shape[0] == 0 or array.shape[1] == 0:
    raise ValueError(f"{name}: the image is empty (size {array.shape[1]}x{array.shape[0]}).")
  if array.dtype != np.uint8:
    if np.issubdtype(array.dtype, np.floating) and array.size and float(np.nanmax(array)) <= 1.0:
      array = array * 255.0  # floats in [0, 1]
    array = np.clip(np.nan_to_num(array), 0, 255).astype(np.uint8)
  return np.ascontiguousarray(array)


def load_mask(mask: ImageLike, size: tuple[int, int], name: str) -> np.ndarray:
  """A binary map (H, W) bool at `size` = (H, W) of its image, EXIF orientation applied like the image's.

  A pixel is in when it is nonzero; for RGB any channel counts, for RGBA the alpha channel when it is not opaque
  everywhere (a drawing on a transparent layer), else the colour. Refused when its size differs from the image's
  or when it is empty.
  """
  if isinstance(mask, (str, os.PathLike)):
    mask = _open(mask, name)
  elif isinstance(mask, Image.Image):
    mask = ImageOps.exif_transpose(mask)
  if isinstance(mask, Image.Image):
    mask = np.asarray(mask.convert("RGBA") if mask.mode in ("LA", "PA", "P") else mask)
  array = np.asarray(mask)
  if array.ndim == 3 and array.shape[-1] == 4:
    alpha = array[..., 3]
    array = alpha if (alpha < alpha.max()).any() or alpha.max() == 0 else array[..., :3].any(axis=-1)
  elif array.ndim == 3:
    array = array.any(axis=-1)
  if array.ndim != 2:
    raise ValueError(f"{name}: must be a 2-D map; got shape {array.shape}.")
  if array.shape != tuple(size):
    raise ValueError(f"{name}: is {array.shape[1]}x{array.shape[0]} but the reference image is "
                     f"{size[1]}x{size[0]}; draw it on the reference image at its own size.")
  binary = array.astype(bool)
  if not binary.any():
    raise ValueError(f"{name}: is empty (no pixel set); mark the referent on the reference image.")
  return binary


def box_map(box: Sequence[float], size: tuple[int, int], name: str = "ref_box") -> np.ndarray:
  """(x0, y0, x1, y1) in pixels of an image of `size` = (H, W) -> the filled box as a (H, W) bool map.

  The box covers the pixels whose area it touches: columns floor(x0) .. ceil(x1) - 1, rows likewise.
  """
  try:
    x0, y0, x1, y1 = (float(value) for value in box)
  except (TypeError, ValueError) as error:
    raise ValueError(f"{name}: must be four numbers x0, y0, x1, y1 in pixels; got {box!r}.") from error
  height, width = size
  if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
    raise ValueError(f"{name}: ({x0:g}, {y0:g}, {x1:g}, {y1:g}) must satisfy 0 <= x0 < x1 <= {width} and "
                     f"0 <= y0 < y1 <= {height}, inside the {width}x{height} reference image.")
  binary = np.zeros((height, width), bool)
  binary[int(np.floor(y0)):int(np.ceil(y1)), int(np.floor(x0)):int(np.ceil(x1))] = True
  return binary


@dataclasses.dataclass
class Prompt:
  """One prompt: text, a reference image with one spatial prompt (mask, box or scribble), or both (omni)."""

  text: str | None = None
  ref_image: ImageLike | None = None
  ref_mask: ImageLike | None = None
  ref_box: Sequence[float] | None = None
  ref_scribble: ImageLike | None = None

  def spatial(self) -> tuple[str, Any] | None:
    """('mask' | 'box' | 'scribble', value) of the one spatial prompt given, None when there is none."""
    given = [(kind, value) for kind, value in (("mask", self.ref_mask), ("box", self.ref_box),
                                                ("scribble", self.ref_scribble)) if value is not None]
    if len(given) > 1:
      raise ValueError(f"give one spatial prompt per reference image, not {[kind for kind, _ in given]}.")
    return given[0] if given else None


@dataclasses.dataclass
class Prediction:
  """What the predictor answers for K prompts about one image of size (H, W).

  Attributes:
    masks: (K, H, W) bool, each prompt's mask (empty where the model calls no target for it).
    union: (H, W) bool, the OR of `masks`.
    no_target_prob: (K,) the model's probability that the prompt's referent is absent.
    mask_logits: (K, h, w, 2) the raw mask logits at the model's stride-4 grid (with `return_logits`).
    nt_logits: (K, 2) the raw no-target logits (with `return_logits`).
  """

  masks: np.ndarray
  union: np.ndarray
  no_target_prob: np.ndarray
  mask_logits: np.ndarray | None = None
  nt_logits: np.ndarray | None = None

  @property
  def prompt_no_target(self) -> np.ndarray:
    """(K,) bool: the model calls "no target" for the prompt (its mask is then empty)."""
    return self.no_target_prob >= 0.5

  @property
  def no_target(self) -> bool:
    """True when the model calls "no target" for every prompt."""
    return bool(self.prompt_no_target.all())


def verdict(prediction: Prediction, index: int) -> str:
  """Prompt `index`'s answer in words: "no target" when the model calls it, else the area it paints (which can be
  empty while the model believes the referent is there)."""
  mask = prediction.masks[index]
  if prediction.prompt_no_target[index]:
    words = "no target"
  elif not mask.any():
    words = "an empty mask"
  else:
    words = f"{int(mask.sum()):,} pixels, {100 * mask.mean():.1f}% of the image"
  return f"{words} (p(no target) {prediction.no_target_prob[index]:.2f})"


# ===============================================================================================================
# The predictor
# ===============================================================================================================


def _bucket(count: int) -> int:
  """The next power of two: the batch sizes the decoder is compiled for."""
  return 1 << max(count - 1, 0).bit_length()


def resize_square(array: np.ndarray, size: int, *, bilinear: bool) -> np.ndarray:
  """(H, W[, 3]) uint8 -> (size, size[, 3]): bilinear for images, nearest for binary maps (as in training)."""
  resample = Image.Resampling.BILINEAR if bilinear else Image.Resampling.NEAREST
  return np.asarray(Image.fromarray(array).resize((size, size), resample))


def prompt_arrays(prompts: Sequence[Prompt], tokenizer: Any, size: int, max_text_len: int,
                  count: int) -> tuple[np.ndarray, ...]:
  """K prompts as the decoder's arrays, padded to `count` rows: (text_ids, text_mask, ref_image, ref_prompt,
  has_text, has_visual); a row without text or a reference has zeros there and its flag False."""
  has_text = np.zeros((count,), bool)
  has_visual = np.zeros((count,), bool)
  text_ids = np.zeros((count, max_text_len), np.int32)
  text_mask = np.zeros((count, max_text_len), np.int32)
  ref_images = np.zeros((count, size, size, 3), np.uint8)
  ref_prompts = np.zeros((count, size, size), np.float32)
  for index, prompt in enumerate(prompts):
    where = f"prompt {index}"
    spatial = prompt.spatial()
    if prompt.text is not None and not str(prompt.text).strip():
      raise ValueError(f"{where}: the text is empty; give an instruction or leave text out.")
    if prompt.text is None and prompt.ref_image is None:
      raise ValueError(f"{where}: has neither text nor a reference image; give text, or a reference image with "
                       "a mask, box or scribble, or both.")
    if (prompt.ref_image is None) != (spatial is None):
      raise ValueError(f"{where}: a reference image needs exactly one of ref_mask, ref_box, ref_scribble, and "
                       "those need the reference image they are drawn on.")
    if prompt.text is not None:
      if not tokenizer.tokens(str(prompt.text)):
        raise ValueError(f"{where}: the text {prompt.text!r} has no words once normalised (only control or "
                         "invisible characters); type an instruction or leave text out.")
      text_ids[index], text_mask[index] = tokenizer.encode(str(prompt.text), max_text_len)
      has_text[index] = True
    if prompt.ref_image is not None:
      reference = load_image(prompt.ref_image, f"{where}: ref_image")
      kind, value = spatial
      name = f"{where}: ref_{kind}"
      binary = box_map(value, reference.shape[:2], name) if kind == "box" else load_mask(
          value, reference.shape[:2], name)
      ref_images[index] = resize_square(reference, size, bilinear=True)
      ref_prompts[index] = resize_square(binary.astype(np.uint8), size, bilinear=False)
      has_visual[index] = True
  return text_ids, text_mask, ref_images, ref_prompts, has_text, has_visual


def _masks_and_probs(mask_logits: np.ndarray, nt_logits: np.ndarray,
                     image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """(K, h, w, 2) and (K, 2) logits -> argmax masks (K, H, W) at `image_size` and p(no target) (K,)."""
  no_target_prob = np.asarray(jax.nn.softmax(jnp.asarray(nt_logits, jnp.float32), axis=-1)[:, 1])
  upsampled = jax.image.resize(jnp.asarray(mask_logits, jnp.float32), (len(mask_logits), *image_size, 2),
                               method="bilinear")
  return np.asarray(jnp.argmax(upsampled, axis=-1)).astype(bool), no_target_prob


def union_parts(outputs: dict[str, np.ndarray], has_text: np.ndarray, has_visual: np.ndarray,
                count: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """The per-modality (mask_logits, nt_logits, available) of the first `count` rows for `to_prediction`'s
  union, when the batch holds both modalities (else [] and the combined logits decide)."""
  if not (has_text.any() and has_visual.any()):
    return []
  return [(outputs[f"{name}_mask_logits"][:count], outputs[f"{name}_nt_logits"][:count], available[:count])
          for name, available in (("text", has_text), ("visual", has_visual))]


def to_prediction(mask_logits: np.ndarray, nt_logits: np.ndarray, image_size: tuple[int, int], *,
                  return_logits: bool = False, parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]] = ()
                  ) -> Prediction:
  """K prompts' stride-4 mask logits and no-target logits -> masks at `image_size` = (H, W) (module docstring).

  `parts`: for a 'union' model, each modality's (mask_logits, nt_logits, available (K,) bool); a prompt's mask is
  then the OR of its available parts' upsampled masks and its p(no target) their minimum (no target only when
  every part says so), as the release evaluates omni prompts. Without parts, the combined logits decide.
  """
  if parts:
    decided = [(*_masks_and_probs(logits, nt, image_size), available) for logits, nt, available in parts]
    masks = np.zeros((len(mask_logits), *image_size), bool)
    no_target_prob = np.ones((len(mask_logits),), np.float32)
    for part_masks, part_probs, available in decided:
      masks |= part_masks & available[:, None, None]
      no_target_prob = np.where(available, np.minimum(no_target_prob, part_probs), no_target_prob)
  else:
    masks, no_target_prob = _masks_and_probs(mask_logits, nt_logits, image_size)
  masks &= (no_target_prob < 0.5)[:, None, None]
  return Prediction(masks=masks, union=masks.any(axis=0), no_target_prob=no_target_prob,
                    mask_logits=mask_logits if return_logits else None,
                    nt_logits=nt_logits if return_logits else None)


class Predictor:
  """Encodes a target image once, then answers any number of prompts about it (module docstring).

  It holds the current image, so one predictor serves one caller at a time (a server guards it with a lock).
  """

  def __init__(self, model: nn.Module, params: Any, *, resolution: int, max_text_len: int,
               vocab_path: str | None = None, keep_sep: bool = True, mesh: jax.sharding.Mesh | None = None,
               rules: Any = ()):
    """Args: the model and its parameters, the square input side and text length it was trained with, the
    tokenizer's vocabulary (None: MiniLM's, the default of the pipeline, = BERT's uncased one) and truncation rule
    (`Tokenizer.keep_sep`), and the mesh and logical-axis rules the parameters are laid out for (None: one
    device)."""
    from omniris_jax.data import tokenizer  # pylint: disable=g-import-not-at-top
    self.model, self.params = model, params
    self.early_fusion = bool(getattr(model.config, "early_fusion", False))
    self.union = getattr(model.config, "omni_fusion", "union") == "union"
    self.resolution, self.max_text_len = resolution, max_text_len
    self.tokenizer = tokenizer.Tokenizer(vocab_path, keep_sep=keep_sep)
    self.mesh = mesh or jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    self.rules = tuple(rules)
    self._traces = 0  # counted while tracing: jit traces a function once per program it compiles

    def encode(params, image):
      self._traces += 1
      if self.early_fusion:  # the image is encoded with each prompt, in `decode`
        return {"image": image}
      return model.apply({"params": params}, image, method=model.encode_image)

    def decode(*args):
      self._traces += 1
      return self.decode_fn(*args)

    self._encode_image, self._decode = jax.jit(encode), jax.jit(decode)
    self._features = None
    self._image_size = None

  @classmethod
  def from_workdir(cls, workdir: str, stage: str | None = None, config: Any = None) -> Predictor:
    """The newest checkpoint of a trained stage of `workdir` (the last of joint, visual, alignment that has one,
    unless `stage` names it). The stage's config comes from `WORKDIR/<stage>/config.json`, which the trainer
    writes, or from `config` (the ConfigDict it was trained with)."""
    from omniris_jax import checkpointing, train  # pylint: disable=g-import-not-at-top
    from omniris_jax.models import factory  # pylint: disable=g-import-not-at-top
    from_config = config is not None
    if not os.path.isdir(workdir):
      raise FileNotFoundError(f"--workdir {workdir!r} does not exist; train a model first (`make demo` writes "
                              "workdir/demo).")
    stage = stage or checkpointing.latest_stage(workdir)
    checkpoint_dir = os.path.join(workdir, stage, "checkpoints")
    if checkpointing.latest_step_directory(checkpoint_dir) is None:
      raise FileNotFoundError(f"{checkpoint_dir!r} holds no checkpoint; train stage {stage!r} first.")
    config = load_stage_config(os.path.join(workdir, stage)) if config is None else copy.deepcopy(config)
    with config.unlocked():
      config.mesh.num_devices, config.mesh.data, config.mesh.fsdp, config.mesh.model = 1, 1, 1, 1
    step_dir = checkpointing.latest_step_directory(checkpoint_dir)
    # Before loading: the trainer's loader keeps a fresh (random) array for every parameter the checkpoint lacks or
    # holds with another shape, which a predictor must never answer with.
    missing = checkpointing.param_mismatches(checkpointing.param_shapes_in(step_dir),
                                             factory.param_shapes(config))
    if missing:
      raise ValueError(f"{step_dir} does not hold the model that "
                       f"{'config' if from_config else repr(os.path.join(workdir, stage, 'config.json'))} describes "
                       f"(model {config.model.get('name', 'omnisegnet')!r}, preset {config.model.preset!r}): "
                       f"{missing}. It was trained with another model size or preset; pass the config it was "
                       "trained with (--config on the command line, config= in Python).")
    try:
      trained = train.load_trained_stage(config, workdir, stage, log=lambda *args, **kwargs: None)
    except (OSError, ValueError) as error:  # tensorstore's and orbax's read errors are ValueErrors and OSErrors
      raise ValueError(checkpointing.unreadable_message(step_dir, error)) from error
    return cls(trained.model, trained.params, resolution=config.input.resolution,
               max_text_len=config.input.max_text_len, vocab_path=factory.text_encoder_vocab(config),
               keep_sep=config.input.get("keep_sep", True), mesh=trained.mesh, rules=trained.rules)

  def set_image(self, image: ImageLike) -> None:
    """Encodes the target image (any size and mode); later `predict` calls answer prompts about it."""
    array = load_image(image, "image")
    self._image_size = array.shape[:2]
    resized = resize_square(array, self.resolution, bilinear=True)[None]
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      self._features = self._encode_image(self.params, jnp.asarray(resized))

  def predict(self, text: str | Sequence[str | None] | None = None, ref_image: Any = None, ref_mask: Any = None,
              ref_box: Any = None, ref_scribble: Any = None, *, prompts: Sequence[Prompt] | None = None,
              return_logits: bool = False) -> Prediction:
    """Answers one prompt, or K prompts in one batched call, about the image of the last `set_image`.

    Give the prompt's parts as keywords (a list in each for K prompts, None where a prompt lacks that part) or
    as `prompts`, a list of `Prompt`. Boxes are (x0, y0, x1, y1) in pixels of their reference image; masks and
    scribbles are binary maps of the reference image's size.
    """
    if self._features is None:
      raise RuntimeError("Predictor.predict: call set_image(image) first.")
    prompts = list(prompts) if prompts is not None else _prompts_from_keywords(
        text, ref_image, ref_mask, ref_box, ref_scribble)
    if not prompts:
      raise ValueError("Predictor.predict: no prompt given; give text and/or a reference image with a spatial "
                       "prompt.")
    arrays = prompt_arrays(prompts, self.tokenizer, self.resolution, self.max_text_len, _bucket(len(prompts)))
    text_ids, text_mask, ref_images, ref_prompts, has_text, has_visual = arrays
    # A modality no prompt has is left out altogether: the decoder then skips its encoder.
    text = (text_ids, text_mask) if has_text.any() else (None, None)
    visual = (ref_images, ref_prompts) if has_visual.any() else (None, None)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      outputs = self._decode(self.params, self._features, *text, *visual, has_text, has_visual)
    outputs = jax.device_get(outputs)
    count = len(prompts)
    return to_prediction(outputs["mask_logits"][:count], outputs["nt_logits"][:count], self._image_size,
                         return_logits=return_logits,
                         parts=union_parts(outputs, has_text, has_visual, count) if self.union else ())

  def decode_fn(self, params, features, text_ids, text_mask, ref_image, ref_prompt, has_text, has_visual):
    """The prompt half, unjitted: encode the prompts and decode them against `features` (export traces it). With
    early fusion, `features` holds the resized image and this runs the whole model."""
    model = self.model

    def decode(module, features):
      if self.early_fusion:
        image = jnp.broadcast_to(features["image"], (has_text.shape[0], *features["image"].shape[1:]))
        return module(image, text_ids, text_mask, ref_image, ref_prompt, has_text, has_visual)
      encoded = module.encode_prompts(text_ids, text_mask, ref_image, ref_prompt)
      return module.decode(features, **encoded, has_text=has_text, has_visual=has_visual)

    return model.apply({"params": params}, features, method=decode)

  def compiled_programs(self) -> int:
    """How many programs the predictor has compiled so far (the image encoder's and the decoder's buckets)."""
    return self._traces


def _prompts_from_keywords(text, ref_image, ref_mask, ref_box, ref_scribble) -> list[Prompt]:
  """`predict`'s keywords as K prompts: each keyword a value for one prompt, or a list with one per prompt."""
  fields = {"text": text, "ref_image": ref_image, "ref_mask": ref_mask, "ref_box": ref_box,
            "ref_scribble": ref_scribble}
  # A box is a list of four numbers: it is a list of prompts' boxes only when its entries are boxes or None.
  def is_list(name, value):
    if isinstance(value, np.ndarray):
      return name == "ref_box" and value.ndim == 2  # (K, 4) boxes; other arrays are one image or map
    if not isinstance(value, (list, tuple)):
      return False
    return name != "ref_box" or not value or isinstance(value[0], (list, tuple, np.ndarray, type(None)))

  listed = {name: list(value) for name, value in fields.items() if is_list(name, value)}
  if not listed:
    return [Prompt(**fields)] if any(value is not None for value in fields.values()) else []
  counts = {name: len(value) for name, value in listed.items()}
  if len(set(counts.values())) != 1:
    raise ValueError(f"Predictor.predict: the prompt lists differ in length: {counts}.")
  count = next(iter(counts.values()))
  return [Prompt(**{name: listed[name][i] if name in listed else fields[name] for name in fields})
          for i in range(count)]


def load_stage_config(stage_dir: str) -> Any:
  """The config a stage was trained with, from the `config.json` the trainer writes into its directory."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  path = os.path.join(stage_dir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path!r} is missing, so the model cannot be rebuilt from the workdir alone; pass "
                            "the config it was trained with (--config=configs/joint.py:demo on the command line, "
                            "config= in Python).")
  try:
    with open(path, encoding="utf-8") as file:
      values = json.load(file)
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise ValueError(f"{path!r} is not valid JSON ({error}); it is cut short or damaged. Restore it (the trainer "
                     "writes it when the stage starts), or pass the config the stage was trained with "
                     "(--config=configs/joint.py:demo on the command line, config= in Python).") from None
  if not isinstance(values, dict) or not isinstance(values.get("model"), dict):
    raise ValueError(f"{path!r} is not a trainer config (no 'model' section); pass the config the stage was "
                     "trained with (--config on the command line, config= in Python).")
  return ml_collections.ConfigDict(values)


# ===============================================================================================================
# Outputs: overlay picture and JSON
# ===============================================================================================================

_COLOURS = np.array([(46, 204, 64), (0, 116, 217), (255, 65, 54), (255, 133, 27), (177, 13, 201),
                     (57, 204, 204), (255, 220, 0), (240, 18, 190)], np.float32)


def draw_overlay(image: np.ndarray, prediction: Prediction, labels: Sequence[str], path: str) -> None:
  """Writes the image with each prompt's mask tinted and outlined in its own colour and a legend; says
  "no target" plainly for a prompt whose referent the model does not find."""
  from PIL import ImageDraw  # pylint: disable=g-import-not-at-top
  canvas = image.astype(np.float32)
  for index, mask in enumerate(prediction.masks):
    colour = _COLOURS[index % len(_COLOURS)]
    canvas[mask] = 0.45 * canvas[mask] + 0.55 * colour
    padded = np.pad(mask, 1)
    inside = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    edge = mask & ~inside
    canvas[edge] = colour
  picture = Image.fromarray(canvas.astype(np.uint8))
  if picture.width < 512:  # small images are enlarged (nearest) so the legend's words fit beside them
    factor = -(-512 // picture.width)
    picture = picture.resize((picture.width * factor, picture.height * factor), Image.Resampling.NEAREST)
  lines = []
  if prediction.no_target:
    lines.append(("NO TARGET: the model finds no referent in this image", (255, 255, 255)))
  for index, label in enumerate(labels):
    colour = tuple(int(c) for c in _COLOURS[index % len(_COLOURS)])
    text = f"{label}: {verdict(prediction, index)}"
    lines += [(part, colour) for part in textwrap.wrap(text, max(20, picture.width // 8))]
  line_height = 16
  legend = Image.new("RGB", (picture.width, line_height * len(lines) + 8), (0, 0, 0))
  draw = ImageDraw.Draw(legend)
  for row, (line, colour) in enumerate(lines):
    draw.text((6, 4 + row * line_height), line, fill=colour, font_size=13)
  out = Image.new("RGB", (picture.width, picture.height + legend.height))
  out.paste(picture, (0, 0))
  out.paste(legend, (0, picture.height))
  _write_atomically(path, lambda target: out.save(target, format="PNG"))


def prediction_json(prediction: Prediction, labels: Sequence[str], image_path: str | None) -> dict[str, Any]:
  """The prediction as JSON: per prompt a COCO RLE mask and the no-target probability, and the union's RLE."""
  from pycocotools import mask as mask_utils  # pylint: disable=g-import-not-at-top

  def rle(mask: np.ndarray) -> dict[str, Any]:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in encoded["size"]], "counts": encoded["counts"].decode("ascii")}

  height, width = prediction.union.shape
  return {"image": image_path, "height": height, "width": width, "no_target": prediction.no_target,
          "union": rle(prediction.union),
          "prompts": [{"prompt": label, "no_target_prob": float(prediction.no_target_prob[index]),
                       "no_target": bool(prediction.prompt_no_target[index]),
                       "area": int(prediction.masks[index].sum()),
                       "mask": rle(prediction.masks[index])} for index, label in enumerate(labels)]}


def _write_atomically(path: str, write) -> None:
  """Writes through a temporary file in the same folder, so a failure never leaves a half-written file."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  temporary = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
  try:
    write(temporary)
    os.replace(temporary, path)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)


# ===============================================================================================================
# CLI
# ===============================================================================================================


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m omniris_jax.predict",
      description="Segment what a text and/or visual prompt refers to in an image (or every image of a folder).")
  parser.add_argument("--workdir", required=True, help="a trained workdir, e.g. workdir/demo")
  parser.add_argument("--stage", default=None, help="the stage to load (default: the last trained one)")
  parser.add_argument("--config", default=None,
                      help="the config it was trained with, e.g. configs/joint.py:demo (default: the stage's "
                           "config.json)")
  parser.add_argument("--image", required=True, help="the target image, or a folder of images")
  parser.add_argument("--text", default=None, help="the text prompt")
  parser.add_argument("--ref-image", default=None, help="the reference image of a visual prompt")
  spatial = parser.add_mutually_exclusive_group()
  spatial.add_argument("--ref-box", default=None, help="x0,y0,x1,y1 in pixels of the reference image")
  spatial.add_argument("--ref-mask", default=None, help="a binary mask image of the reference image's size")
  spatial.add_argument("--ref-scribble", default=None, help="a binary scribble image of the reference's size")
  parser.add_argument("--out", required=True, help="the overlay PNG (a folder when --image is a folder)")
  parser.add_argument("--json", default=None, help="also write the masks as COCO RLE (a folder for a folder)")
  args = parser.parse_args(argv)
  if args.text is not None and not args.text.strip():
    parser.error("--text is empty; type an instruction, or leave --text out and give a visual prompt")
  if args.text is None and args.ref_image is None:
    parser.error("give a prompt: --text, or --ref-image with --ref-box / --ref-mask / --ref-scribble, or both")
  if args.ref_image is not None and not (args.ref_box or args.ref_mask or args.ref_scribble):
    parser.error("--ref-image needs one of --ref-box, --ref-mask, --ref-scribble")
  if args.ref_image is None and (args.ref_box or args.ref_mask or args.ref_scribble):
    parser.error("--ref-box / --ref-mask / --ref-scribble need --ref-image")
  if args.ref_box is not None:
    try:
      args.ref_box = [float(v) for v in args.ref_box.split(",")]
    except ValueError:
      parser.error(f"--ref-box {args.ref_box!r}: give four numbers x0,y0,x1,y1")
    if len(args.ref_box) != 4:
      parser.error(f"--ref-box: give four numbers x0,y0,x1,y1, got {len(args.ref_box)}")
  return args


def _config_from_flag(spec: str) -> Any:
  """`path.py:variant` -> that config file's get_config(variant)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, _, variant = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config: no config file {path!r}.")
  sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
  module_spec = importlib.util.spec_from_file_location("omniris_predict_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant)


def _cli_prompt(args: argparse.Namespace) -> Prompt:
  """The CLI's prompt with its reference image and spatial prompt read and checked (before the model loads)."""
  prompt = Prompt(text=args.text)
  if args.ref_image is None:
    return prompt
  prompt.ref_image = load_image(args.ref_image, f"--ref-image {args.ref_image!r}")
  size = prompt.ref_image.shape[:2]
  if args.ref_box is not None:
    box_map(args.ref_box, size, "--ref-box")
    prompt.ref_box = args.ref_box
  elif args.ref_mask is not None:
    prompt.ref_mask = load_mask(args.ref_mask, size, f"--ref-mask {args.ref_mask!r}")
  else:
    prompt.ref_scribble = load_mask(args.ref_scribble, size, f"--ref-scribble {args.ref_scribble!r}")
  return prompt


def _text_note(predictor: Predictor, text: str) -> str | None:
  """A note when `text` is longer than the model reads: how much of it the model reads (the rest is cut)."""
  tokens = predictor.tokenizer.tokens(text)
  room = predictor.max_text_len - (2 if predictor.tokenizer.keep_sep else 1)  # [CLS] (and [SEP]) take a place
  if len(tokens) <= room:
    return None
  read = predictor.tokenizer.hf_tokenizer.convert_tokens_to_string(tokens[:room])
  return (f"note: --text is {len(tokens)} tokens long but the model reads {room}; it answers for {read!r} (the "
          "rest is cut).")


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(sys.argv[1:] if argv is None else argv)
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # the tokenizer needs no PyTorch; say nothing
  from omniris_jax.main import configure_compilation_cache  # pylint: disable=g-import-not-at-top
  configure_compilation_cache("~/.cache/omniris_jax/jax_compilation_cache", 1024)  # later runs skip compiles
  try:
    if os.path.isdir(args.image):
      images = sorted(os.path.join(args.image, name) for name in os.listdir(args.image)
                      if name.lower().endswith(IMAGE_SUFFIXES))
      if not images:
        raise FileNotFoundError(f"--image {args.image!r}: the folder holds no image ({', '.join(IMAGE_SUFFIXES)}).")
    elif os.path.isfile(args.image):
      images = [args.image]
    else:
      raise FileNotFoundError(f"--image {args.image!r}: no such file or folder.")
    folder = len(images) > 1 or os.path.isdir(args.image)
    # Every input is read and checked before the model loads, so a mistake costs no load and writes nothing.
    for flag, path in (("--out", args.out), ("--json", args.json)):
      if path is not None and not folder and os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a folder; give a file name (a folder only with a folder of images).")
      if path is not None and folder and os.path.isfile(path):
        raise ValueError(f"{flag} {path!r} is a file, but --image is a folder: give a folder to write one file "
                         "per image into.")
    first = None if folder else load_image(images[0], f"--image {images[0]!r}")
    prompt = _cli_prompt(args)
    config = _config_from_flag(args.config) if args.config else None
    predictor = Predictor.from_workdir(args.workdir, args.stage, config)
    note = _text_note(predictor, args.text) if args.text is not None else None
    if note:
      print(note, file=sys.stderr)
    label = " + ".join(part for part in (repr(args.text) if args.text is not None else None,
                                         "visual prompt" if args.ref_image else None) if part)
    start = time.perf_counter()
    for index, image_path in enumerate(images):
      image = first if first is not None else load_image(image_path, f"--image {image_path!r}")
      predictor.set_image(image)
      prediction = predictor.predict(prompts=[prompt])
      stem = os.path.splitext(os.path.basename(image_path))[0]
      out = os.path.join(args.out, f"{stem}.png") if folder else args.out
      draw_overlay(image, prediction, [label], out)
      if args.json:
        path = os.path.join(args.json, f"{stem}.json") if folder else args.json
        payload = json.dumps(prediction_json(prediction, [label], image_path), indent=1)
        _write_atomically(path, lambda target, payload=payload: pathlib.Path(target).write_text(payload))
      done = index + 1
      if folder:
        rate = done / max(time.perf_counter() - start, 1e-9)
        print(f"\r{done}/{len(images)} images  {rate:.2f}/s  ETA {(len(images) - done) / rate:.0f} s",
              end="" if done < len(images) else "\n", flush=True)
      else:
        print(f"{image_path}: {verdict(prediction, 0)}; wrote {out}"
              + (f" and {args.json}" if args.json else ""))
  except (FileNotFoundError, ValueError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
