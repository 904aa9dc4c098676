"""Per-example grain transforms: one decoded OmniRIS record in, one example of the batch contract out.

The pipeline (`pipeline.py`) chains them in this order:

  `AttachIndex`          remember the record's index in its source (for error messages and the `index` field)
  `DecodeAndValidate`    decode PNG/JPEG bytes if a source yields them, check dtypes and sizes, binarise masks
  `SelectStoredPrompt`   evaluation: use the spatial prompt the record names (`prompt_type`), so runs repeat
  `SampleSpatialPrompt`  or training: draw mask/box/scribble at random, optionally regenerating box and scribble
                         from the reference mask with `prompts.py`
  `ResizeToResolution`   non-uniform resize to S x S: images bilinear, masks and prompts nearest (as detectron2's
                         `ResizeTransform` does for ReLA, with PIL)
  `Tokenize`             the text prompt to (ids, attention_mask) of fixed length with `tokenizer.py`
  `AssembleContract`     exactly the fields, dtypes and shapes that `pipeline.py`'s docstring promises

Every transform is a small module-level class so grain can pickle it into worker processes. Bad records fail
with a `BadExampleError` (a `ValueError`) that names the record (its source index and `id`), the field and what
is wrong, because a wrong array shape deep inside a jitted model step tells nobody which file to fix.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from omniris_jax.data import prompts
from omniris_jax.data import tokenizer as tokenizer_lib

Example = dict[str, Any]

# Integer codes of the record features (the TFDS builders store these).
MODALITY_NAMES = ("text", "visual", "omni")
SETTING_NAMES = ("one_vs_one", "one_vs_many", "many_vs_one", "many_vs_many", "no_target")
PROMPT_TYPE_NAMES = ("none", "mask", "box", "scribble")
SPATIAL_PROMPT_TYPES = ("mask", "box", "scribble")
MODALITY_TEXT, MODALITY_VISUAL, MODALITY_OMNI = 0, 1, 2

INDEX_KEY = "_source_index"  # Added by `AttachIndex`; the source record's index.
PADDING_KEY = "_padding"  # Added by `MarkPadding`; the row only fills a batch and must not be scored.

_TARGET_MASK_FIELDS = ("mask", "text_mask", "visual_mask")
_REF_PROMPT_FIELDS = {"mask": "ref_mask", "box": "ref_box", "scribble": "ref_scribble"}


# Optional dense scene labels (0 background, 1 + category) that only generated training records carry; batches
# of such records have `category_map` uint8 (B, S, S) beside the contract's fields.
CATEGORY_MAP_KEY = "category_map"


class BadExampleError(ValueError):
  """A record that cannot become a training/evaluation example; the message names the record and the problem."""


def describe_record(example: Example) -> str:
  """'record 12 (id='abc')': how errors name a record, by source index and id, whichever are known."""
  index = example.get(INDEX_KEY, example.get("index"))
  record_id = example.get("id")
  if isinstance(record_id, (bytes, np.bytes_)):
    record_id = bytes(record_id).decode("utf-8", errors="replace")
  return f"record {index if index is not None else '?'} (id={record_id!r})"


def _fail(example: Example, problem: str) -> BadExampleError:
  return BadExampleError(f"{describe_record(example)}: {problem}")


def _as_text(value: Any) -> str:
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8")
  if isinstance(value, np.ndarray) and value.shape == ():
    return _as_text(value.item())
  return str(value)


def _as_int(example: Example, field: str, names: Sequence[str]) -> int:
  """An integer code field, checked against the names it encodes."""
  if field not in example:
    raise _fail(example, f"field {field!r} is missing (expected an int code of {list(names)}).")
  value = example[field]
  if isinstance(value, (str, bytes, np.bytes_, np.str_)):  # A name, as generators yield before TFDS encodes it.
    name = _as_text(value)
    if name not in names:
      raise _fail(example, f"{field}={name!r} is not one of {list(names)}.")
    return names.index(name)
  value = int(np.asarray(value))
  if not 0 <= value < len(names):
    raise _fail(example, f"{field}={value} is not a valid code; expected 0..{len(names) - 1} for {list(names)}.")
  return value


def _decode_array(example: Example, field: str, channels: int) -> np.ndarray:
  """A uint8 (H, W, channels) array from a decoded array or from PNG/JPEG bytes; fails clearly otherwise."""
  if field not in example or example[field] is None:
    raise _fail(example, f"field {field!r} is missing; every record needs it (the features are listed in "
                         "tfds_omniref/omniref/features.py).")
  value = example[field]
  if isinstance(value, np.ndarray) and value.dtype.kind in "SO" and value.shape == ():
    value = value.item()
  if isinstance(value, (bytes, np.bytes_)):
    if not value:
      raise _fail(example, f"{field} is empty bytes; expected an encoded PNG/JPEG image.")
    try:
      with Image.open(io.BytesIO(bytes(value))) as pil_image:
        if channels == 3:
          value = np.asarray(pil_image.convert("RGB"))
        elif pil_image.mode in ("1", "L", "P", "I", "I;16"):  # Keep stored values (palette indices, 0/1).
          value = np.asarray(pil_image)
        else:
          value = np.asarray(pil_image.convert("L"))
    except Exception as error:  # PIL raises several types for corrupt data; all mean the same here.
      raise _fail(example, f"{field} bytes could not be decoded as an image ({type(error).__name__}: {error}); "
                           "the stored file is corrupt or not PNG/JPEG.") from error
    if channels == 1:
      value = value[..., None]
  value = np.asarray(value)
  if channels == 1 and value.ndim == 2:
    value = value[..., None]
  if value.ndim != 3 or value.shape[-1] != channels:
    raise _fail(example, f"{field} must have shape (H, W, {channels}); got shape={value.shape}.")
  if value.shape[0] == 0 or value.shape[1] == 0:
    raise _fail(example, f"{field} is empty: shape={value.shape}.")
  if channels == 1:
    if value.dtype != bool and not np.issubdtype(value.dtype, np.integer):
      raise _fail(example, f"{field} must be a binary integer/bool mask; got dtype={value.dtype}.")
    return (value[..., 0] > 0).astype(np.uint8)
  if value.dtype != np.uint8:
    raise _fail(example, f"{field} must be uint8 RGB; got dtype={value.dtype} (convert to 0..255 uint8 first).")
  return value


def _check_same_size(example: Example, field: str, array: np.ndarray, reference: str, size: tuple[int, int]):
  if array.shape[:2] != size:
    raise _fail(example, f"{field} has size {array.shape[:2]} but {reference} has size {size}; a mask must be "
                         f"the same height and width as its image.")


class AttachIndex(grain.transforms.MapWithIndex):
  """Copies the record with its index in the source, which becomes the batch's `index` field.

  grain hands `map_with_index` positions past the end once the dataset repeats (it reads index modulo length),
  so the position is reduced modulo `num_records`, the source's length.
  """

  def __init__(self, num_records: int):
    self.num_records = num_records

  def map_with_index(self, index: int, element: Example) -> Example:
    index %= self.num_records
    if not isinstance(element, dict):
      raise BadExampleError(f"record {index}: a data source must yield dicts of features; got "
                            f"{type(element).__name__}.")
    return {**element, INDEX_KEY: index}


class MarkPadding(grain.transforms.Map):
  """Marks a copied record as padding; `AssembleContract` then gives it `index = -1`."""

  def map(self, element: Example) -> Example:
    return {**element, PADDING_KEY: True}


class TagBatchSource(grain.transforms.Map):
  """Adds `source` (B,) int32 to a batch: which source of a mixed stream it came from (0 text, 1 visual)."""

  def __init__(self, source: int):
    self.source = source

  def map(self, batch: Example) -> Example:
    return {**batch, "source": np.full(len(batch["index"]), self.source, np.int32)}


class DecodeAndValidate(grain.transforms.Map):
  """Decodes images given as bytes and checks every field a record needs, naming the record when one is bad.

  Output: the record with `image`/`ref_image` uint8 (H, W, 3); every mask and spatial prompt uint8 (H, W) of
  {0, 1}; `text` a str; `has_text`/`has_visual` from the modality; `ref_*` set to None when there is no visual
  prompt.
  """

  def map(self, element: Example) -> Example:
    example = dict(element)
    example["id"] = _as_text(example.get("id", ""))
    modality = _as_int(example, "modality", MODALITY_NAMES)
    example["modality"] = modality
    example["setting"] = _as_int(example, "setting", SETTING_NAMES)
    example["prompt_type"] = _as_int(example, "prompt_type", PROMPT_TYPE_NAMES)
    has_text = modality in (MODALITY_TEXT, MODALITY_OMNI)
    has_visual = modality in (MODALITY_VISUAL, MODALITY_OMNI)
    example["has_text"], example["has_visual"] = has_text, has_visual

    image = _decode_array(example, "image", channels=3)
    example["image"] = image
    size = image.shape[:2]
    for field in _TARGET_MASK_FIELDS:
      example[field] = _decode_array(example, field, channels=1)
      _check_same_size(example, field, example[field], "image", size)

    if example.get(CATEGORY_MAP_KEY) is not None:  # optional dense scene labels (generated training data)
      labels = np.asarray(example[CATEGORY_MAP_KEY])
      if labels.ndim != 2 or labels.dtype != np.uint8:
        raise _fail(example, f"{CATEGORY_MAP_KEY} must be a uint8 (H, W) array; got {labels.dtype} "
                             f"{labels.shape}.")
      _check_same_size(example, CATEGORY_MAP_KEY, labels, "image", size)
      example[CATEGORY_MAP_KEY] = labels

    if "no_target" not in example:
      raise _fail(example, "field 'no_target' is missing.")
    example["no_target"] = bool(np.asarray(example["no_target"]))
    if example["no_target"] and example["mask"].any():
      raise _fail(example, f"no_target is True but mask has {int(example['mask'].sum())} foreground pixels.")

    try:
      text = _as_text(example.get("text", ""))
    except UnicodeDecodeError as error:
      raise _fail(example, f"text is not valid UTF-8 ({error}).") from error
    if has_text and not text.strip():
      raise _fail(example, f"text={text!r} is empty but modality={MODALITY_NAMES[modality]!r} says the record has "
                           "a text prompt; give it an expression or mark it modality='visual'.")
    example["text"] = text if has_text else ""

    if has_visual:
      ref_image = _decode_array(example, "ref_image", channels=3)
      example["ref_image"] = ref_image
      for field in _REF_PROMPT_FIELDS.values():
        example[field] = _decode_array(example, field, channels=1)
        _check_same_size(example, field, example[field], "ref_image", ref_image.shape[:2])
    else:
      example["ref_image"] = None
      for field in _REF_PROMPT_FIELDS.values():
        example[field] = None
    return example


def _with_prompt(example: Example, prompt_name: str, prompt: np.ndarray) -> Example:
  """The example with `ref_prompt` set (and the three stored prompts dropped); rejects empty prompts."""
  if not prompt.any():
    raise _fail(example, f"the {prompt_name} prompt ({_REF_PROMPT_FIELDS[prompt_name]}) is empty; a visual prompt "
                         "must mark at least one pixel of the reference object.")
  out = {key: value for key, value in example.items() if key not in _REF_PROMPT_FIELDS.values()}
  out["ref_prompt"] = prompt
  out["prompt_type"] = PROMPT_TYPE_NAMES.index(prompt_name)
  return out


def _without_prompt(example: Example) -> Example:
  out = {key: value for key, value in example.items() if key not in _REF_PROMPT_FIELDS.values()}
  out["ref_prompt"] = None
  out["prompt_type"] = 0
  return out


class SelectStoredPrompt(grain.transforms.Map):
  """Evaluation: the spatial prompt is the one the record stores in `prompt_type`, so every run is the same."""

  def map(self, element: Example) -> Example:
    if not element["has_visual"]:
      return _without_prompt(element)
    prompt_type = element["prompt_type"]
    if prompt_type == 0:
      raise _fail(element, f"prompt_type=0 ('none') but modality={MODALITY_NAMES[element['modality']]!r} has a "
                           "visual prompt; store which of mask/box/scribble the test uses.")
    prompt_name = PROMPT_TYPE_NAMES[prompt_type]
    return _with_prompt(element, prompt_name, element[_REF_PROMPT_FIELDS[prompt_name]])


class SampleSpatialPrompt(grain.transforms.RandomMap):
  """Training: a spatial prompt type drawn uniformly from `prompt_types` for each visual example.

  With `regenerate=True`, boxes and scribbles are drawn afresh from `ref_mask` (`prompts.box_from_mask`,
  `prompts.scribble_from_mask`), so the model sees a new scribble every epoch instead of the stored one.
  """

  def __init__(self, prompt_types: Sequence[str], regenerate: bool = False):
    prompt_types = tuple(prompt_types)
    unknown = [name for name in prompt_types if name not in SPATIAL_PROMPT_TYPES]
    if not prompt_types or unknown:
      raise ValueError(f"{prompt_types=} must be a non-empty subset of {SPATIAL_PROMPT_TYPES}.")
    self.prompt_types = prompt_types
    self.regenerate = regenerate

  def random_map(self, element: Example, rng: np.random.Generator) -> Example:
    if not element["has_visual"]:
      return _without_prompt(element)
    prompt_name = self.prompt_types[int(rng.integers(len(self.prompt_types)))]
    if not self.regenerate or prompt_name == "mask":
      return _with_prompt(element, prompt_name, element[_REF_PROMPT_FIELDS[prompt_name]])
    ref_mask = element["ref_mask"]
    if not ref_mask.any():
      raise _fail(element, f"ref_mask is empty, so no {prompt_name} prompt can be regenerated from it.")
    if prompt_name == "box":
      prompt = prompts.box_from_mask(ref_mask)
    else:
      prompt = prompts.scribble_from_mask(ref_mask, rng)
    return _with_prompt(element, prompt_name, prompt)


def _resize(array: np.ndarray, resolution: int, resample: Image.Resampling) -> np.ndarray:
  if array.shape[:2] == (resolution, resolution):
    return array
  return np.asarray(Image.fromarray(array).resize((resolution, resolution), resample=resample))


class ResizeToResolution(grain.transforms.Map):
  """Non-uniform resize to `resolution` x `resolution` (paper: 480): images bilinear, masks and prompts nearest.

  Nearest keeps masks binary. Absent reference images and prompts become zeros, so every example has the same
  shapes and batches stack.
  """

  def __init__(self, resolution: int):
    if resolution < 1:
      raise ValueError(f"{resolution=} must be positive.")
    self.resolution = resolution

  def map(self, element: Example) -> Example:
    size = self.resolution
    example = dict(element)
    example["image"] = _resize(element["image"], size, Image.Resampling.BILINEAR)
    for field in _TARGET_MASK_FIELDS:
      example[field] = _resize(element[field], size, Image.Resampling.NEAREST)
    if element.get(CATEGORY_MAP_KEY) is not None:
      example[CATEGORY_MAP_KEY] = _resize(element[CATEGORY_MAP_KEY], size, Image.Resampling.NEAREST)
    if element["ref_image"] is None:
      example["ref_image"] = np.zeros((size, size, 3), np.uint8)
      example["ref_prompt"] = np.zeros((size, size), np.uint8)
    else:
      example["ref_image"] = _resize(element["ref_image"], size, Image.Resampling.BILINEAR)
      example["ref_prompt"] = _resize(element["ref_prompt"], size, Image.Resampling.NEAREST)
    return example


# grain runs transforms on several threads. Building the tokenizer lazily from two threads at once fails
# (transformers' lazy module import is not thread-safe: "cannot import name 'BertTokenizer'"), and a Rust-backed
# HF tokenizer used from two threads at once can raise "Already borrowed"; one lock per process serialises both.
# The lock is cheap: one expression tokenises in microseconds.
_TOKENIZER_LOCK = threading.Lock()


class Tokenize(grain.transforms.Map):
  """The text prompt as BERT ids and attention mask of `max_text_len` ([CLS] ... [SEP] [PAD]...); zeros if none.

  The tokenizer pickles as its vocabulary path and is rebuilt lazily in each worker process.
  """

  def __init__(self, max_text_len: int = 20, vocab_path: str | None = None, keep_sep: bool = True):
    self.max_text_len = max_text_len
    self.tokenizer = tokenizer_lib.Tokenizer(vocab_path, keep_sep=keep_sep)

  def map(self, element: Example) -> Example:
    example = dict(element)
    if element["has_text"]:
      try:
        with _TOKENIZER_LOCK:
          ids, attention_mask = self.tokenizer.encode(element["text"], self.max_text_len)
      except ValueError as error:
        raise _fail(element, f"text={element['text']!r} cannot be tokenised: {error}") from error
    else:
      ids = np.zeros((self.max_text_len,), np.int32)
      attention_mask = np.zeros((self.max_text_len,), np.int32)
    example["text_ids"], example["text_attention_mask"] = ids, attention_mask
    return example


class AssembleContract(grain.transforms.Map):
  """Keeps exactly the batch-contract fields (see `pipeline.py`) with their promised dtypes."""

  def map(self, element: Example) -> Example:
    extra = {}
    if element.get(CATEGORY_MAP_KEY) is not None:
      extra[CATEGORY_MAP_KEY] = element[CATEGORY_MAP_KEY].astype(np.uint8, copy=False)
    return extra | {
        "image": element["image"].astype(np.uint8, copy=False),
        "text_ids": element["text_ids"].astype(np.int32, copy=False),
        "text_attention_mask": element["text_attention_mask"].astype(np.int32, copy=False),
        "ref_image": element["ref_image"].astype(np.uint8, copy=False),
        "ref_prompt": element["ref_prompt"].astype(np.float32),
        "has_text": np.bool_(element["has_text"]),
        "has_visual": np.bool_(element["has_visual"]),
        "mask": element["mask"].astype(np.uint8, copy=False),
        "text_mask": element["text_mask"].astype(np.uint8, copy=False),
        "visual_mask": element["visual_mask"].astype(np.uint8, copy=False),
        "no_target": np.bool_(element["no_target"]),
        "modality": np.int32(element["modality"]),
        "setting": np.int32(element["setting"]),
        "prompt_type": np.int32(element["prompt_type"]),
        "index": np.int64(-1 if element.get(PADDING_KEY, False) else element[INDEX_KEY]),
    }
