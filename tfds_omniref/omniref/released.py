"""The released OmniRef files (manual download) -> validated OmniRIS examples (features.py).

The authors release OmniRef as three JSON files beside the COCO train2014 images. Their loaders (repository
As-Time-Goes-By/OmniSegNet, `datasets/dataloader_OmniRef*.py`, `omniref_refer.py`) read them as follows, and
so does this module (field names come from reading those loaders, not the files: a mismatch fails with a
message naming the file, the record and the field):

  OmniRef.json        {split: [ref, ...]}, split in 'visual-train', 'visual-test', 'text-test', 'omni-test'.
                      ref: ref_id, image_id, file_name, height, width, split, ann_id (list; [-1] = no target),
                      category_id (the visual category), categories; text refs add sentences [{raw, sent_id,
                      tokens}] (one example per sentence); no-target visual refs add supp_image_id and
                      supp_cat_ids (the reference is the SuppImageAnns instance of one of those categories at
                      that image); omni refs are text refs plus visual_data, a visual ref on the same image.
  instances.json      {split: {images, annotations, categories}} in the COCO format (a plain COCO file is
                      accepted too); ann_ids of every split (and visual_data's) are looked up here.
  SuppImageAnns.json  {str(category_id): [{image_id, file_name, height, width, annotations: {segmentation}}]}:
                      the reference instances a visual prompt is drawn from.

The release draws the reference image of a visual prompt at random at every evaluation, so its test numbers
move from run to run. Here the reference, the default prompt type and the scribble are drawn once from a seed
and the (split, ref_id, sentence) of the example, and stored: every evaluation sees the same prompts, and the
build gives the same bytes every time. The box is the tight filled rectangle of the reference mask.

Everything is validated before the first example is written (fields, ids, image files, reference candidates);
only segmentations that fail to decode are found while generating, and TFDS then removes the half-written split
(it writes to an `incomplete.*` folder and renames it only on success).

TFDS splits: train <- 'visual-train', text_test <- 'text-test', visual_test <- 'visual-test',
omni_test <- 'omni-test'.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from omniris_jax.data import prompts

OMNIREF_JSON = "OmniRef.json"
INSTANCES_JSON = "instances.json"
SUPP_JSON = "SuppImageAnns.json"

# TFDS split -> the key of that split in OmniRef.json / instances.json, and its modality.
SPLIT_KEYS = {"train": "visual-train", "text_test": "text-test", "visual_test": "visual-test",
              "omni_test": "omni-test"}
SPLIT_MODALITY = {"train": "visual", "text_test": "text", "visual_test": "visual", "omni_test": "omni"}
_SPLIT_CODES = {"train": 1, "text_test": 2, "visual_test": 3, "omni_test": 4}
_SPATIAL_PROMPTS = ("mask", "box", "scribble")
# A 1x1 black placeholder for the reference image and prompts of text-only examples (features.py).
_PLACEHOLDER_IMAGE = np.zeros((1, 1, 3), np.uint8)
_PLACEHOLDER_MASK = np.zeros((1, 1, 1), np.uint8)

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
`omniref/released` reads the OmniRef files that the authors release, and the COCO train2014 images. Put them in
the manual directory (`--manual_dir`, default `<data_dir>/downloads/manual/`) like this:

  <manual_dir>/omniref/OmniRef.json          from the OmniRef dataset on Hugging Face,
  <manual_dir>/omniref/instances.json          https://huggingface.co/datasets/TUZKI/OmniRef
  <manual_dir>/omniref/SuppImageAnns.json      (e.g. `huggingface-cli download TUZKI/OmniRef --repo-type dataset`)
  <manual_dir>/train2014/COCO_train2014_*.jpg  COCO 2014 train images: http://images.cocodataset.org/zips/train2014.zip
                                               (from https://cocodataset.org/#download; unzip into <manual_dir>)

`instances.json` is the release's own split-keyed COCO-format annotation file (the masks of the referents);
a plain COCO instances file with the same annotation ids (e.g. annotations/instances_train2014.json from
http://images.cocodataset.org/annotations/annotations_trainval2014.zip) also works. If the release names the
files differently, rename them to the names above. tfds_omniref/omniref/dummy_data/ is a tiny example of the
layout.
"""


class MalformedRecordError(ValueError):
  """A record of a released file that cannot be read: names the file, the record and the field."""

  def __init__(self, path: str, record: str, field: str, problem: str):
    self.path, self.record, self.field = path, record, field
    super().__init__(f"{path}: {record}: field {field!r} {problem}")


@dataclasses.dataclass(frozen=True)
class ReleasedConfig:
  """Where the released files are inside the manual directory, and the seed of the fixed test prompts.

  Attributes:
    omniref_subdir: folder (relative to the manual directory) holding OmniRef.json, instances.json and
      SuppImageAnns.json.
    image_subdir: folder (relative to the manual directory) holding the COCO train2014 images.
    seed: seeds the reference image, default prompt type and scribble of every example (test splits keep them).
    split_keys: (TFDS split, key in OmniRef.json / instances.json) pairs. The defaults are the names the released
      loaders use ('text-test' by analogy with 'visual-test' and 'omni-test': the text loader takes the name as
      an argument); change them here if a release spells them differently.
  """

  omniref_subdir: str = "omniref"
  image_subdir: str = "train2014"
  seed: int = 0
  split_keys: tuple[tuple[str, str], ...] = tuple(SPLIT_KEYS.items())

  def __post_init__(self):
    for name in ("omniref_subdir", "image_subdir"):
      value = getattr(self, name)
      if not isinstance(value, str) or os.path.isabs(value):
        raise ValueError(f"ReleasedConfig.{name}={value!r} must be a path relative to the manual directory.")
    if not isinstance(self.seed, int) or self.seed < 0:
      raise ValueError(f"ReleasedConfig.seed={self.seed!r} must be a non-negative int.")
    if sorted(split for split, _ in self.split_keys) != sorted(SPLIT_KEYS):
      raise ValueError(f"ReleasedConfig.split_keys={self.split_keys!r} must map each of {list(SPLIT_KEYS)} to a key.")


# ----------------------------------------------------------------------------------------------------------
# Segmentations
# ----------------------------------------------------------------------------------------------------------


def _rle_string_counts(counts: str) -> list[int]:
  """The run lengths of a compressed COCO RLE string (the format's 6-bit LEB128 with delta coding).

  pycocotools decodes some malformed strings into garbage masks without complaint (e.g. '' gives random bits),
  so the string is decoded here first and its runs are checked against the mask size.
  """
  runs: list[int] = []
  position = 0
  data = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
  while position < len(data):
    value, shift, more = 0, 0, True
    while more:
      if position >= len(data):
        raise ValueError("the RLE string ends in the middle of a run length")
      char = data[position] - 48
      if not 0 <= char < 64:
        raise ValueError(f"the RLE string has a character outside '0'..'o': {chr(data[position])!r}")
      value |= (char & 0x1F) << (5 * shift)
      more = bool(char & 0x20)
      position += 1
      shift += 1
      if not more and char & 0x10:
        value |= -1 << (5 * shift)
    if len(runs) > 2:
      value += runs[-2]
    runs.append(value)
  return runs


def decode_segmentation(segmentation: Any, height: int, width: int, *, path: str, record: str,
                        field: str = "segmentation") -> np.ndarray:
  """The (height, width) uint8 0/1 mask of a COCO segmentation (polygons, RLE or iscrowd RLE), validated.

  Polygons with fewer than 3 points are dropped, as the release's loaders drop them. Anything that does not
  decode to a mask of the image's size raises MalformedRecordError naming `path`, `record` and `field`.
  """
  def bad(problem: str) -> MalformedRecordError:
    return MalformedRecordError(path, record, field, problem)

  if isinstance(segmentation, list):
    polygons = []
    for polygon in segmentation:
      if not isinstance(polygon, list) or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in polygon):
        raise bad(f"must be a list of polygons [x0, y0, x1, y1, ...] of numbers; got an item {polygon!r:.80}")
      if len(polygon) % 2 == 0 and len(polygon) >= 6:
        xs, ys = polygon[0::2], polygon[1::2]
        # COCO's points lie on the image, give or take rounding; beyond a pixel, the polygon is not this image's.
        if min(xs) < -1 or max(xs) > width + 1 or min(ys) < -1 or max(ys) > height + 1:
          raise bad(f"has a polygon outside the {height}x{width} image (height x width): its points span x "
                    f"{min(xs):g}..{max(xs):g}, y {min(ys):g}..{max(ys):g}; is the annotation from another image, "
                    "or are x and y swapped?")
        polygons.append([float(v) for v in polygon])
    if not polygons:
      raise bad(f"has no polygon with at least 3 points (x, y pairs); got {segmentation!r:.80}")
    rles = mask_utils.frPyObjects(polygons, height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(np.uint8)
  if not isinstance(segmentation, dict) or "counts" not in segmentation or "size" not in segmentation:
    raise bad(f"must be COCO polygons (a list) or an RLE dict with 'size' and 'counts'; got {segmentation!r:.80}")
  size, counts = segmentation["size"], segmentation["counts"]
  if list(size) != [height, width]:
    raise bad(f"has RLE size {size} but the image is {height}x{width} (height x width)")
  if isinstance(counts, list):
    runs = counts
    if not all(isinstance(run, int) and run >= 0 for run in runs):
      raise bad("has RLE counts that are not non-negative integers")
  elif isinstance(counts, (str, bytes)):
    try:
      runs = _rle_string_counts(counts)
    except ValueError as error:
      raise bad(f"does not decode: {error}") from None
  else:
    raise bad(f"has RLE counts of type {type(counts).__name__}; expected a string or a list of ints")
  if sum(runs) != height * width or any(run < 0 for run in runs):
    raise bad(f"does not decode: its RLE runs cover {sum(runs)} pixels, the image has {height * width}")
  rle = mask_utils.frPyObjects(segmentation, height, width) if isinstance(counts, list) else {
      "size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
  return mask_utils.decode(rle).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------
# Reading and validating the files
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Target:
  """What one ref refers to in its image: annotations (non-crowd) and the image file."""

  image_id: int
  image_path: str
  height: int
  width: int
  ann_ids: list[int]  # [] for no target


@dataclasses.dataclass
class _VisualPrompt:
  """The visual side of an example: its target and the pool its reference is drawn from."""

  target: _Target
  category_id: int  # -1 for no target
  pool: list[tuple[int, dict[str, Any]]]  # (category id, SuppImageAnns entry); entries on the target are skipped
  record: str  # where the visual ref is, for messages


@dataclasses.dataclass
class _Plan:
  """One example to generate, fully validated except for segmentation decoding."""

  ref_id: Any
  sentence_index: int
  text: str
  text_target: _Target | None
  visual: _VisualPrompt | None


class ReleasedFiles:
  """The three released JSON files, indexed, plus where the images are. Use `load(...)` to make one."""

  def __init__(self, manual_dir: str, config: ReleasedConfig):
    self.config = config
    self.omniref_dir = os.path.join(manual_dir, config.omniref_subdir)
    self.image_dir = os.path.join(manual_dir, config.image_subdir)
    self.paths = {name: os.path.join(self.omniref_dir, name) for name in (OMNIREF_JSON, INSTANCES_JSON, SUPP_JSON)}
    missing = [path for path in self.paths.values() if not os.path.isfile(path)]
    if not os.path.isdir(self.image_dir):
      missing.append(self.image_dir + os.sep)
    if missing:
      raise FileNotFoundError(
          f"omniref/released needs {', '.join(missing)} (missing in the manual directory {manual_dir!r}). "
          f"How to get them:\n{MANUAL_DOWNLOAD_INSTRUCTIONS}")
    self.refs = self._load_json(OMNIREF_JSON, dict)
    instances = self._load_json(INSTANCES_JSON, dict)
    self.supp = self._load_json(SUPP_JSON, dict)
    self.split_keys = dict(config.split_keys)
    for split, key in self.split_keys.items():
      if not isinstance(self.refs.get(key), list):
        raise MalformedRecordError(self.paths[OMNIREF_JSON], "top level", key,
                                   f"must be the list of {split} refs; the file has keys {sorted(self.refs)}")
    # Annotations of every split, by id (ids are COCO's, unique over the release); the release looks the omni
    # refs' visual_data up in the 'visual-test' annotations, which this index includes.
    coco_files = {"": instances} if "annotations" in instances else instances
    self.anns: dict[int, dict[str, Any]] = {}
    self.images: dict[int, dict[str, Any]] = {}
    for key, coco in coco_files.items():
      where = f"[{key!r}]" if key else "top level"
      if not isinstance(coco, dict) or not isinstance(coco.get("annotations"), list):
        raise MalformedRecordError(self.paths[INSTANCES_JSON], where, "annotations",
                                   "must be a COCO-format dict with an 'annotations' list")
      for position, ann in enumerate(coco["annotations"]):
        if not isinstance(ann, dict) or not isinstance(ann.get("id"), int):
          raise MalformedRecordError(self.paths[INSTANCES_JSON], f"{where} annotation #{position}", "id",
                                     "is missing or not an int")
        self.anns[ann["id"]] = ann
      for image in coco.get("images", []):
        if isinstance(image, dict) and isinstance(image.get("id"), int):
          self.images[image["id"]] = image
    self._pools: dict[int, list[tuple[int, dict[str, Any]]]] = {}
    self._pool_images: dict[int, set[int]] = {}

  def _load_json(self, name: str, kind: type) -> Any:
    path = self.paths[name]
    try:
      with open(path, "rb") as f:
        value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
      raise MalformedRecordError(path, "whole file", "-", f"is not valid JSON ({error}); the file is cut short or "
                                 "damaged: download it again (see MANUAL_DOWNLOAD_INSTRUCTIONS)") from None
    if not isinstance(value, kind):
      raise MalformedRecordError(path, "top level", "-", f"must be a JSON {kind.__name__}; got "
                                 f"{type(value).__name__}. Is this the {name} of the OmniRef release? (see "
                                 "MANUAL_DOWNLOAD_INSTRUCTIONS)")
    return value

  # --------------------------------------------------------------------------------------------------------
  # Field access with named errors
  # --------------------------------------------------------------------------------------------------------

  def _field(self, record: Mapping[str, Any], field: str, kind, where: str, file: str = OMNIREF_JSON) -> Any:
    if field not in record:
      raise MalformedRecordError(self.paths.get(file, file), where, field, "is missing")
    value = record[field]
    if kind is not None and (not isinstance(value, kind) or isinstance(value, bool)):
      names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
      raise MalformedRecordError(self.paths.get(file, file), where, field,
                                 f"must be {names}; got {type(value).__name__} {value!r:.60}")
    return value

  def _target(self, ref: Mapping[str, Any], where: str) -> _Target:
    """The image and referent annotations of a ref, checked against instances.json and the image folder."""
    image_id = self._field(ref, "image_id", int, where)
    image = self.images.get(image_id, {})
    values = {}
    for field, kind in (("file_name", str), ("height", int), ("width", int)):
      if field in ref:
        values[field] = self._field(ref, field, kind, where)
      elif field in image:
        values[field] = self._field(image, field, kind, f"image id={image_id}", INSTANCES_JSON)
      else:
        raise MalformedRecordError(self.paths[OMNIREF_JSON], where, field,
                                   f"is missing (and image {image_id} is not in {INSTANCES_JSON} either)")
    image_path = os.path.join(self.image_dir, values["file_name"])
    if not os.path.isfile(image_path):
      raise MalformedRecordError(self.paths[OMNIREF_JSON], where, "image_id",
                                 f"names image {image_id}, whose file {image_path} does not exist; put the COCO "
                                 f"train2014 images in {self.image_dir} (see MANUAL_DOWNLOAD_INSTRUCTIONS)")
    ann_ids = self._field(ref, "ann_id", None, where)
    ann_ids = ann_ids if isinstance(ann_ids, list) else [ann_ids]
    if not ann_ids or not all(isinstance(a, int) and not isinstance(a, bool) for a in ann_ids):
      raise MalformedRecordError(self.paths[OMNIREF_JSON], where, "ann_id",
                                 f"must be a non-empty list of annotation ids ([-1] = no target); got {ann_ids!r}")
    if ann_ids == [-1]:
      return _Target(image_id, image_path, values["height"], values["width"], [])
    kept = []
    for ann_id in ann_ids:
      ann = self.anns.get(ann_id)
      if ann is None:  # (-1 mixed with real ids lands here too: [-1] must stand alone)
        raise MalformedRecordError(self.paths[OMNIREF_JSON], where, "ann_id",
                                   f"names annotation {ann_id}, which is not in {self.paths[INSTANCES_JSON]}")
      ann_where = f"annotation id={ann_id}"
      if self._field(ann, "image_id", int, ann_where, INSTANCES_JSON) != image_id:
        raise MalformedRecordError(self.paths[INSTANCES_JSON], ann_where, "image_id",
                                   f"is {ann['image_id']}, but {where} of {OMNIREF_JSON} puts it on image {image_id}")
      self._field(ann, "segmentation", (list, dict), ann_where, INSTANCES_JSON)
      self._field(ann, "category_id", int, ann_where, INSTANCES_JSON)
      if not ann.get("iscrowd", 0):  # the release skips crowd regions of a referent
        kept.append(ann_id)
    if not kept:
      raise MalformedRecordError(self.paths[OMNIREF_JSON], where, "ann_id",
                                 f"names only iscrowd annotations {ann_ids}; a referent needs a non-crowd instance")
    return _Target(image_id, image_path, values["height"], values["width"], kept)

  def _supp_pool(self, category_id: int, where: str) -> list[tuple[int, dict[str, Any]]]:
    """The SuppImageAnns entries of a category as (category id, entry), each entry checked once per build."""
    if category_id not in self._pools:
      entries = self.supp.get(str(category_id))
      if not isinstance(entries, list) or not entries:
        raise MalformedRecordError(self.paths[SUPP_JSON], f"category {category_id} (needed by {where})",
                                   str(category_id), "is missing or empty: no reference instance of this category")
      for position, entry in enumerate(entries):
        self._check_supp_entry(entry, f"category {category_id} entry #{position}")
      self._pools[category_id] = [(category_id, entry) for entry in entries]
      self._pool_images[category_id] = {entry["image_id"] for entry in entries}
    return self._pools[category_id]

  def _check_supp_entry(self, entry: Any, where: str) -> None:
    if not isinstance(entry, dict):
      raise MalformedRecordError(self.paths[SUPP_JSON], where, "-", f"must be a dict; got {entry!r:.60}")
    for field, kind in (("image_id", int), ("file_name", str), ("height", int), ("width", int),
                        ("annotations", dict)):
      self._field(entry, field, kind, where, SUPP_JSON)
    self._field(entry["annotations"], "segmentation", (list, dict), where, SUPP_JSON)
    path = os.path.join(self.image_dir, entry["file_name"])
    if not os.path.isfile(path):
      raise MalformedRecordError(self.paths[SUPP_JSON], where, "image_id",
                                 f"names image {entry['image_id']}, whose file {path} does not exist; put the COCO "
                                 f"train2014 images in {self.image_dir} (see MANUAL_DOWNLOAD_INSTRUCTIONS)")

  def _visual_prompt(self, ref: Mapping[str, Any], where: str) -> _VisualPrompt:
    """The target of a visual ref and the reference pool the release would sample from."""
    target = self._target(ref, where)
    if target.ann_ids:
      category_id = self._field(ref, "category_id", int, where)
      pool = self._supp_pool(category_id, where)
      if not self._pool_images[category_id] - {target.image_id}:
        raise MalformedRecordError(self.paths[SUPP_JSON], f"category {category_id}", str(category_id),
                                   f"has no reference instance outside image {target.image_id}, the target of "
                                   f"{where} in {OMNIREF_JSON}")
      return _VisualPrompt(target, category_id, pool, where)
    # No target: the reference is the instance of one of supp_cat_ids at supp_image_id.
    supp_image_id = self._field(ref, "supp_image_id", int, where)
    supp_cat_ids = self._field(ref, "supp_cat_ids", list, where)
    if not supp_cat_ids or not all(isinstance(c, int) or (isinstance(c, str) and c.isdigit()) for c in supp_cat_ids):
      raise MalformedRecordError(self.paths[OMNIREF_JSON], where, "supp_cat_ids",
                                 f"must be a non-empty list of category ids; got {supp_cat_ids!r:.60}")
    supp_cat_ids = [int(c) for c in supp_cat_ids]
    if supp_image_id == target.image_id:
      raise MalformedRecordError(self.paths[OMNIREF_JSON], where, "supp_image_id",
                                 "is the target image itself; a reference must come from another image")
    pool = []
    for category_id in supp_cat_ids:
      matches = [item for item in self._supp_pool(category_id, where) if item[1]["image_id"] == supp_image_id]
      if not matches:
        raise MalformedRecordError(self.paths[OMNIREF_JSON], where, "supp_image_id",
                                   f"is {supp_image_id}, but {SUPP_JSON} has no instance of category "
                                   f"{category_id} (from supp_cat_ids) at that image")
      pool.append(matches[0])
    return _VisualPrompt(target, -1, pool, where)

  def _sentences(self, ref: Mapping[str, Any], where: str) -> list[str]:
    sentences = self._field(ref, "sentences", list, where)
    if not sentences:
      raise MalformedRecordError(self.paths[OMNIREF_JSON], where, "sentences",
                                 "is empty; a text ref needs at least one referring expression")
    texts = []
    for index, sentence in enumerate(sentences):
      sentence_where = f"{where} sentence #{index}"
      if not isinstance(sentence, dict):
        raise MalformedRecordError(self.paths[OMNIREF_JSON], sentence_where, "sentences",
                                   f"must hold dicts with 'raw'; got {sentence!r:.60}")
      raw = self._field(sentence, "raw", str, sentence_where)
      if not raw.strip():
        raise MalformedRecordError(self.paths[OMNIREF_JSON], sentence_where, "raw",
                                   f"is empty ({raw!r}); every sentence needs its referring expression")
      texts.append(raw)
    return texts

  def plan_split(self, split: str) -> list[_Plan]:
    """Validates every record of `split` and lists its examples in file order (one per sentence for text)."""
    if split not in SPLIT_KEYS:
      raise ValueError(f"{split=} must be one of {list(SPLIT_KEYS)}.")
    key, modality = self.split_keys[split], SPLIT_MODALITY[split]
    plans = []
    seen: set[Any] = set()
    for position, ref in enumerate(self.refs[key]):
      if not isinstance(ref, dict):
        raise MalformedRecordError(self.paths[OMNIREF_JSON], f"[{key!r}] ref #{position}", "-",
                                   f"must be a dict; got {ref!r:.60}")
      ref_id = ref.get("ref_id")
      where = f"[{key!r}] ref_id={ref_id}" if "ref_id" in ref else f"[{key!r}] ref #{position}"
      self._field(ref, "ref_id", (int, str), where)
      if ref_id in seen:
        raise MalformedRecordError(self.paths[OMNIREF_JSON], where, "ref_id", "is not unique in its split")
      seen.add(ref_id)
      if modality == "visual":
        plans.append(_Plan(ref_id, 0, "", None, self._visual_prompt(ref, where)))
        continue
      text_target = self._target(ref, where)
      visual = None
      if modality == "omni":
        visual_ref = self._field(ref, "visual_data", dict, where)
        visual = self._visual_prompt(visual_ref, f"{where} visual_data")
        if visual.target.image_id != text_target.image_id:
          raise MalformedRecordError(self.paths[OMNIREF_JSON], f"{where} visual_data", "image_id",
                                     f"is {visual.target.image_id}, but the omni ref's target image is "
                                     f"{text_target.image_id}; both prompts must refer into the same image")
      for index, text in enumerate(self._sentences(ref, where)):
        plans.append(_Plan(ref_id, index, text, text_target, visual))
    return plans


def load(manual_dir: str, config: ReleasedConfig = ReleasedConfig()) -> ReleasedFiles:
  """Reads and indexes the released files in `manual_dir`; a missing file names itself and the instructions."""
  return ReleasedFiles(os.fspath(manual_dir), config)


# ----------------------------------------------------------------------------------------------------------
# Examples
# ----------------------------------------------------------------------------------------------------------


def _read_rgb(path: str, height: int, width: int, *, file: str, where: str) -> np.ndarray:
  try:
    with Image.open(path) as image:
      pixels = np.asarray(image.convert("RGB"))
  except OSError as error:
    raise MalformedRecordError(file, where, "file_name", f"image {path} cannot be read ({error}); the file is cut "
                               "short or damaged: replace it with the COCO train2014 original") from None
  if pixels.shape[:2] != (height, width):
    raise MalformedRecordError(file, where, "height/width",
                               f"say {height}x{width} but the image file {path} is {pixels.shape[0]}x"
                               f"{pixels.shape[1]} (height x width)")
  return pixels


class _Decoder:
  """Decodes annotation masks, keeping the most recent ones (anns recur across a ref's sentences and refs)."""

  _CACHE_SIZE = 256  # masks of 640x480 COCO images: at most about 80 MB

  def __init__(self, files: ReleasedFiles):
    self.files = files
    self._masks: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()

  def ann_mask(self, ann_id: int, height: int, width: int) -> np.ndarray:
    if ann_id in self._masks:
      self._masks.move_to_end(ann_id)
    else:
      ann = self.files.anns[ann_id]
      mask = decode_segmentation(ann["segmentation"], height, width, path=self.files.paths[INSTANCES_JSON],
                                 record=f"annotation id={ann_id}")
      if not mask.any():
        raise MalformedRecordError(self.files.paths[INSTANCES_JSON], f"annotation id={ann_id}", "segmentation",
                                   "decodes to an empty mask")
      self._masks[ann_id] = mask
      if len(self._masks) > self._CACHE_SIZE:
        self._masks.popitem(last=False)
    return self._masks[ann_id]

  def target_mask(self, target: _Target) -> np.ndarray:
    mask = np.zeros((target.height, target.width), np.uint8)
    for ann_id in target.ann_ids:
      mask |= self.ann_mask(ann_id, target.height, target.width)
    return mask

  def categories(self, target: _Target) -> set[int]:
    return {int(self.files.anns[ann_id]["category_id"]) for ann_id in target.ann_ids}


def _rng(config: ReleasedConfig, split: str, ref_id: Any, sentence_index: int) -> np.random.Generator:
  """The example's own random stream: a function of (seed, split, ref_id, sentence), not of build order."""
  ref_key = ref_id if isinstance(ref_id, int) else int.from_bytes(str(ref_id).encode()[:16], "little")
  return np.random.default_rng([config.seed, _SPLIT_CODES[split], abs(ref_key), sentence_index])


def _reference(decoder: _Decoder, visual: _VisualPrompt, rng: np.random.Generator):
  """(reference image, mask, image id, category id): the first usable candidate in a seeded order.

  The release redraws until the reference mask has both 0s and 1s; walking a seeded permutation does the same,
  deterministically.
  """
  files = decoder.files
  for position in rng.permutation(len(visual.pool)):
    category_id, entry = visual.pool[int(position)]
    if entry["image_id"] == visual.target.image_id:
      continue
    where = f"category {category_id} entry image_id={entry['image_id']}"
    mask = decode_segmentation(entry["annotations"]["segmentation"], entry["height"], entry["width"],
                               path=files.paths[SUPP_JSON], record=where, field="annotations.segmentation")
    if mask.any() and not mask.all():
      image = _read_rgb(os.path.join(files.image_dir, entry["file_name"]), entry["height"], entry["width"],
                        file=files.paths[SUPP_JSON], where=where)
      return image, mask, entry["image_id"], category_id
  raise MalformedRecordError(files.paths[SUPP_JSON], f"reference candidates of {visual.record}",
                             "annotations.segmentation", "decode to empty (or full) masks for every candidate")


def _setting(modality: str, num_instances: int) -> str:
  if num_instances == 0:
    return "no_target"
  if modality == "omni":
    return "many_vs_one" if num_instances == 1 else "many_vs_many"
  return "one_vs_one" if num_instances == 1 else "one_vs_many"


def generate_split(files: ReleasedFiles, split: str, *, config_name: str = "released",
                   plans: Sequence[_Plan] | None = None) -> Iterator[dict[str, Any]]:
  """Yields the OmniRIS examples (numpy values, class labels as names) of `split`, in file order.

  Args:
    files: the loaded release (`load(...)`).
    split: 'train', 'text_test', 'visual_test' or 'omni_test'.
    config_name: the builder config name, the prefix of example ids ('<config>/<split>/<index:06d>').
    plans: `files.plan_split(split)` if already computed (it validates every record; the builder calls it for
      all splits before writing anything).
  """
  plans = files.plan_split(split) if plans is None else plans
  modality = SPLIT_MODALITY[split]
  decoder = _Decoder(files)
  images: dict[int, np.ndarray] = {}
  for index, plan in enumerate(plans):
    rng = _rng(files.config, split, plan.ref_id, plan.sentence_index)
    target = plan.text_target or plan.visual.target
    where = f"[{files.split_keys[split]!r}] ref_id={plan.ref_id}"
    if target.image_id not in images:
      images = {target.image_id: _read_rgb(target.image_path, target.height, target.width,
                                           file=files.paths[OMNIREF_JSON], where=where)}
    image = images[target.image_id]
    empty = np.zeros((target.height, target.width), np.uint8)
    text_mask = decoder.target_mask(plan.text_target) if plan.text_target else empty
    visual_mask = decoder.target_mask(plan.visual.target) if plan.visual else empty
    ann_ids = set(plan.text_target.ann_ids if plan.text_target else []) | set(
        plan.visual.target.ann_ids if plan.visual else [])
    category_ids = set()
    for part in (plan.text_target, plan.visual.target if plan.visual else None):
      if part is not None:
        category_ids |= decoder.categories(part)

    if plan.visual:
      ref_image, ref_mask, ref_image_id, ref_category_id = _reference(decoder, plan.visual, rng)
      ref_box = prompts.box_from_mask(ref_mask)
      ref_scribble = prompts.scribble_from_mask(ref_mask, rng)
      # Test splits cycle the three prompt types so each is a third of the split; train draws one.
      prompt_type = (_SPATIAL_PROMPTS[index % 3] if split != "train"
                     else _SPATIAL_PROMPTS[int(rng.integers(3))])
      ref_mask, ref_box, ref_scribble = (m[..., None] for m in (ref_mask, ref_box, ref_scribble))
    else:
      ref_image, ref_image_id, ref_category_id = _PLACEHOLDER_IMAGE, -1, -1
      ref_mask = ref_box = ref_scribble = _PLACEHOLDER_MASK
      prompt_type = "none"

    mask = text_mask | visual_mask
    yield {
        "id": f"{config_name}/{split}/{index:06d}",
        "image_id": target.image_id,
        "image": image,
        "text": plan.text,
        "text_mask": text_mask[..., None],
        "ref_image": ref_image,
        "ref_image_id": ref_image_id,
        "ref_mask": ref_mask,
        "ref_box": ref_box,
        "ref_scribble": ref_scribble,
        "visual_mask": visual_mask[..., None],
        "mask": mask[..., None],
        "no_target": not mask.any(),
        "modality": modality,
        "setting": _setting(modality, len(ann_ids)),
        "prompt_type": prompt_type,
        "category_ids": sorted(category_ids),
        "ref_category_id": ref_category_id,
    }
