"""OmniRef rebuilt from its sources: the paper's four-step construction (Sec. 4.2, Fig. 5) as plain Python.

Inputs (a manual directory, see MANUAL_DOWNLOAD_INSTRUCTIONS): COCO train2014 instances and images, gRefCOCO
(`grefs(unc).json`) and RefCOCOg (`refs(umd).p`). Output: OmniRIS examples (features.py) in four splits,
train / text_test / visual_test / omni_test, as the released OmniRef has. Nothing here imports TFDS: the
builder (`omniref_dataset_builder.py`, config `rebuilt`) stores what `generate_split` yields, and
`plan(...)` alone gives the statistics of a build without decoding a pixel.

The four steps, with the exact criteria chosen where the paper leaves them open (all in `RebuiltConfig`):

Step I  image selection. An instance is *obvious* when it is not a crowd region and covers at least
        `min_instance_area` (0.3%) of the image (about COCO's 32x32 'small' limit at 640x480). An image is
        *rich* when it has at least `min_instances` (2) obvious instances of at least `min_categories` (2)
        categories, *well-distributed*: the bounding box of all obvious instances' boxes covers at least
        `min_spread` (30%) of the image (objects spread over the frame, not one cluster). Target images are rich
        images that gRefCOCO or RefCOCOg annotate (every OmniRef image has text prompts, Sec. 4.2 Step III).
Step II visual reference set. Reference images are OTHER COCO images: neither a target image nor an image of a
        held-out split of gRefCOCO/RefCOCOg. Their reference instances are, per image and category, the largest
        non-crowd instance if it covers at least `min_reference_area` (1%) of the image (an "obvious visual
        instance"); mask = its COCO mask, box = the tight filled rectangle, scribble = random strokes inside the
        mask (omniris_jax/data/prompts.py). A visual prompt of category c on a target refers to every instance
        of c there (instances of one category merge into one mask, Step II); single-target when c has one
        instance, multi-target otherwise. Categories with a crowd region on the target are not prompted (their
        ground truth would be ambiguous). Each target image gets one positive prompt per prompted category and
        one no-target prompt: a category absent from the target, preferring one of the same COCO supercategory
        as a category present ("visually similar ... challenging negative pairs").
Step III text prompts, from the held-out splits (gRefCOCO val/testA/testB, RefCOCOg umd val/test) for the test
        images: multi-target = gRefCOCO expressions with two or more non-crowd referents; no-target = gRefCOCO
        expressions with ann_id [-1]; single-target = RefCOCOg expressions of at least `min_long_text_words`
        (8) words ("long and complex"). gRefCOCO single-target expressions are not used (the paper takes
        single-target text from RefCOCOg). One example per sentence.
Step IV omni merging, on the omni_test images: each text prompt is paired with one visual prompt of its image;
        a pair is kept only under the paper's rules (`omni_target_kind`): multi-target = the prompts refer to
        different categories, or to one category whose instances they jointly cover; single-target = both
        refer to the same instance, the only one of its category; no-target = neither referent is in the image.
        A single-target text whose instance is the only one of its category takes that category's visual prompt
        (the only way to get a single-target pair); any other targeted text takes a seeded random positive
        visual prompt; a no-target text takes the image's no-target visual prompt.

Splits, and how images are assigned (no image is in two splits; a reference image is never a target image):
  * test images: target images with a held-out gRefCOCO/RefCOCOg expression. Sorted by a seeded hash of the
    image id and dealt round-robin to text_test, visual_test, omni_test (so each gets a third). (The paper lets
    the three test splits share their 6,549 images; here each test image serves one split.)
  * train images: the other target images; an image of any held-out split of gRefCOCO/RefCOCOg is never a
    train image (OmniRef-trained models are evaluated on those benchmarks, Table 3). train is visual-only, as
    the released visual-train is.
  * reference images are dealt to train, visual_test and omni_test by a seeded hash with the weights
    `reference_split_weights` (3:1:1); a prompt takes its reference from its own split's pool.
  * test splits store a fixed reference, default prompt type (mask/box/scribble in turn) and scribble; train
    stores a seeded random prompt type. Everything is a function of the seed and the input files: two builds
    give the same bytes.

The paper ends with a manual check of every example; this construction has none, so expect some label noise
(e.g. COCO instances that are not annotated).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import multiprocessing
import os
import pickle
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from omniris_jax.data import prompts
from tfds_omniref.omniref import released as released_lib

COCO_INSTANCES = os.path.join("annotations", "instances_train2014.json")
GREFCOCO_REFS = os.path.join("grefcoco", "grefs(unc).json")
REFCOCOG_REFS = os.path.join("refcocog", "refs(umd).p")
IMAGE_DIR = "train2014"

SPLITS = ("train", "text_test", "visual_test", "omni_test")
SPLIT_MODALITY = {"train": "visual", "text_test": "text", "visual_test": "visual", "omni_test": "omni"}
TEST_SPLITS = ("text_test", "visual_test", "omni_test")
# Splits of the text sources whose images are held out (test images here, never train or reference images).
HELD_OUT_SPLITS = {"grefcoco": ("val", "testA", "testB"), "refcocog": ("val", "test")}
_SPLIT_CODES = {"train": 1, "text_test": 2, "visual_test": 3, "omni_test": 4}
_SPATIAL_PROMPTS = ("mask", "box", "scribble")
_PLACEHOLDER_IMAGE = np.zeros((1, 1, 3), np.uint8)
_PLACEHOLDER_MASK = np.zeros((1, 1, 1), np.uint8)
# Environment variable with the number of worker processes that decode and encode examples (build.py --workers).
WORKERS_ENV = "OMNIREF_BUILD_WORKERS"

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
`omniref/rebuilt` rebuilds OmniRef from its sources (the paper's four steps). Put these in the manual directory
(`--manual_dir`, default `<data_dir>/downloads/manual/`):

  <manual_dir>/annotations/instances_train2014.json  COCO 2014 instances, from
                     http://images.cocodataset.org/annotations/annotations_trainval2014.zip (unzip into <manual_dir>)
  <manual_dir>/train2014/COCO_train2014_*.jpg        COCO 2014 train images, from
                     http://images.cocodataset.org/zips/train2014.zip (unzip into <manual_dir>)
  <manual_dir>/grefcoco/grefs(unc).json              gRefCOCO expressions (https://github.com/henghuiding/gRefCOCO,
                                                     the files the ReLA code reads; its instances.json is not needed)
  <manual_dir>/refcocog/refs(umd).p                  RefCOCOg, UMD splits (refcocog.zip of
                                                     https://github.com/lichengunc/refer)

Annotation ids of gRefCOCO and RefCOCOg are COCO's, looked up in instances_train2014.json.
tfds_omniref/omniref/dummy_data/ is a tiny example of the layout.
"""

MalformedRecordError = released_lib.MalformedRecordError


@dataclasses.dataclass(frozen=True)
class RebuiltConfig:
  """The parameters of the construction; the module docstring says what each criterion means.

  Attributes:
    seed: fixes every choice (split assignment, references, prompt types, scribbles).
    min_instance_area: Step I, smallest obvious instance as a fraction of the image area.
    min_instances: Step I, fewest obvious instances of a rich image.
    min_categories: Step I, fewest categories among them.
    min_spread: Step I, smallest fraction of the image covered by the bounding box of all obvious instances.
    min_reference_area: Step II, smallest reference instance as a fraction of its image's area.
    reference_split_weights: Step II, how reference images are dealt to the splits that have visual prompts.
    min_long_text_words: Step III, fewest words of a RefCOCOg single-target expression.
  """

  seed: int = 0
  min_instance_area: float = 0.003
  min_instances: int = 2
  min_categories: int = 2
  min_spread: float = 0.3
  min_reference_area: float = 0.01
  reference_split_weights: tuple[tuple[str, int], ...] = (("train", 3), ("visual_test", 1), ("omni_test", 1))
  min_long_text_words: int = 8

  def __post_init__(self):
    if not isinstance(self.seed, int) or self.seed < 0:
      raise ValueError(f"RebuiltConfig {self.seed=} must be a non-negative int.")
    for name in ("min_instance_area", "min_spread", "min_reference_area"):
      value = getattr(self, name)
      if not 0.0 <= value <= 1.0:
        raise ValueError(f"RebuiltConfig {name}={value} must be a fraction of the image area in [0, 1].")
    if self.min_categories < 1 or self.min_instances < self.min_categories:
      raise ValueError(f"RebuiltConfig needs 1 <= {self.min_categories=} <= {self.min_instances=}.")
    splits = [split for split, _ in self.reference_split_weights]
    if sorted(splits) != sorted(("train", "visual_test", "omni_test")) or any(
        not isinstance(w, int) or w < 1 for _, w in self.reference_split_weights):
      raise ValueError(f"RebuiltConfig {self.reference_split_weights=} must give each of train, visual_test and "
                       "omni_test (the splits with visual prompts) a positive int weight.")
    if self.min_long_text_words < 1:
      raise ValueError(f"RebuiltConfig {self.min_long_text_words=} must be at least 1.")


def _hash01(*parts: Any) -> float:
  """A uniform number in [0, 1) fixed by `parts` (stable across Python runs, unlike hash())."""
  digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little") / 2.0**64


# ----------------------------------------------------------------------------------------------------------
# Reading the sources
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TextRef:
  """One referring expression group of gRefCOCO or RefCOCOg after Step III filtering.

  Attributes:
    source: 'grefcoco' or 'refcocog'.
    ref_id: the ref id in its file.
    image_id: the COCO image it refers into.
    split: its split in the source file.
    ann_ids: non-crowd COCO annotation ids of the referents; () for no target.
    sentences: the expressions kept (one example each).
  """

  source: str
  ref_id: int
  image_id: int
  split: str
  ann_ids: tuple[int, ...]
  sentences: tuple[str, ...]

  @property
  def held_out(self) -> bool:
    """Whether the ref is in a held-out (val/test) split of its source: its image can only be a test image."""
    return self.split in HELD_OUT_SPLITS[self.source]


class Sources:
  """COCO instances + gRefCOCO + RefCOCOg from a manual directory, validated and indexed. Use `load(...)`."""

  def __init__(self, manual_dir: str, config: RebuiltConfig):
    self.config = config
    self.manual_dir = manual_dir
    self.image_dir = os.path.join(manual_dir, IMAGE_DIR)
    self.paths = {name: os.path.join(manual_dir, name) for name in (COCO_INSTANCES, GREFCOCO_REFS, REFCOCOG_REFS)}
    missing = [path for path in self.paths.values() if not os.path.isfile(path)]
    if not os.path.isdir(self.image_dir):
      missing.append(self.image_dir + os.sep)
    if missing:
      raise FileNotFoundError(
          f"omniref/rebuilt needs {', '.join(missing)} (missing in the manual directory {manual_dir!r}). "
          f"How to get them:\n{MANUAL_DOWNLOAD_INSTRUCTIONS}")
    self._read_instances()
    self.refs: list[TextRef] = []
    self.all_ref_images: dict[str, set[int]] = {}  # split kind ('held_out'/'train') -> image ids, any ref kept or not
    self._read_grefcoco()
    self._read_refcocog()

  # ---- COCO -------------------------------------------------------------------------------------------------

  def _read_instances(self) -> None:
    path = self.paths[COCO_INSTANCES]
    coco = _load_json(path)
    if not isinstance(coco, dict):
      raise MalformedRecordError(path, "top level", "-", "must be a COCO instances dict")
    for field in ("images", "annotations", "categories"):
      if not isinstance(coco.get(field), list):
        raise MalformedRecordError(path, "top level", field, "must be a list (COCO instances format)")
    self.images: dict[int, dict[str, Any]] = {}
    for position, image in enumerate(coco["images"]):
      where = f"images #{position}"
      for field, kind in (("id", int), ("file_name", str), ("height", int), ("width", int)):
        _check(image, field, kind, path, where)
      self.images[image["id"]] = image
    self.categories: dict[int, dict[str, Any]] = {}
    for position, category in enumerate(coco["categories"]):
      _check(category, "id", int, path, f"categories #{position}")
      self.categories[category["id"]] = category
    self.anns: dict[int, dict[str, Any]] = {}
    self.anns_by_image: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
    for position, ann in enumerate(coco["annotations"]):
      where = f"annotations #{position}"
      _check(ann, "id", int, path, where)
      where = f"annotation id={ann['id']}"
      for field, kind in (("image_id", int), ("category_id", int), ("segmentation", (list, dict)),
                          ("area", (int, float)), ("bbox", list)):
        _check(ann, field, kind, path, where)
      if ann["image_id"] not in self.images:
        raise MalformedRecordError(path, where, "image_id", f"is {ann['image_id']}, which is not in 'images'")
      if ann["category_id"] not in self.categories:
        raise MalformedRecordError(path, where, "category_id", f"is {ann['category_id']}, not in 'categories'")
      if len(ann["bbox"]) != 4:
        raise MalformedRecordError(path, where, "bbox", f"must be [x, y, width, height]; got {ann['bbox']!r:.60}")
      self.anns[ann["id"]] = ann
      self.anns_by_image[ann["image_id"]].append(ann)

  def image_path(self, image_id: int) -> str:
    return os.path.join(self.image_dir, self.images[image_id]["file_name"])

  # ---- Text sources -------------------------------------------------------------------------------------------

  def _ref_targets(self, ann_ids: Sequence[int], image_id: int, path: str, where: str) -> tuple[int, ...]:
    """The non-crowd referents of a ref, every id checked against the COCO instances."""
    kept = []
    for ann_id in ann_ids:
      ann = self.anns.get(ann_id) if isinstance(ann_id, int) else None
      if ann is None:
        raise MalformedRecordError(path, where, "ann_id",
                                   f"names annotation {ann_id!r}, which is not in {self.paths[COCO_INSTANCES]}")
      if ann["image_id"] != image_id:
        raise MalformedRecordError(path, where, "ann_id", f"names annotation {ann_id} of image {ann['image_id']}, "
                                   f"but the ref is on image {image_id}")
      if not ann.get("iscrowd", 0):
        kept.append(ann_id)
    return tuple(sorted(kept))

  def _ref_common(self, ref: Any, path: str, position: int) -> tuple[str, int, str, list[str]]:
    where = f"ref #{position}"
    if not isinstance(ref, dict):
      raise MalformedRecordError(path, where, "-", f"must be a dict; got {ref!r:.60}")
    if "ref_id" in ref:
      where = f"ref_id={ref['ref_id']}"
    for field, kind in (("ref_id", int), ("image_id", int), ("split", str), ("sentences", list)):
      _check(ref, field, kind, path, where)
    if ref["image_id"] not in self.images:
      raise MalformedRecordError(path, where, "image_id",
                                 f"is {ref['image_id']}, which is not in {self.paths[COCO_INSTANCES]}")
    sentences = []
    for index, sentence in enumerate(ref["sentences"]):
      if not isinstance(sentence, dict) or not isinstance(sentence.get("sent", sentence.get("raw")), str):
        raise MalformedRecordError(path, f"{where} sentence #{index}", "sent",
                                   f"must be a dict with the expression in 'sent' (or 'raw'); got {sentence!r:.60}")
      text = " ".join(sentence.get("sent", sentence.get("raw")).split())
      if text:
        sentences.append(text)
    if not sentences:
      raise MalformedRecordError(path, where, "sentences", "has no non-empty expression")
    return where, ref["image_id"], ref["split"], sentences

  def _note_image(self, source: str, split: str, image_id: int) -> None:
    kind = "held_out" if split in HELD_OUT_SPLITS[source] else "train"
    self.all_ref_images.setdefault(kind, set()).add(image_id)

  def _read_grefcoco(self) -> None:
    path = self.paths[GREFCOCO_REFS]
    refs = _load_json(path)
    if not isinstance(refs, list):
      raise MalformedRecordError(path, "top level", "-", "must be a list of refs (gRefCOCO grefs(unc).json)")
    for position, ref in enumerate(refs):
      where, image_id, split, sentences = self._ref_common(ref, path, position)
      self._note_image("grefcoco", split, image_id)
      ann_ids = _check(ref, "ann_id", list, path, where)
      if ann_ids == [-1]:
        targets = ()
      elif not ann_ids or -1 in ann_ids:
        raise MalformedRecordError(path, where, "ann_id", f"must be [-1] (no target) or annotation ids; got {ann_ids}")
      else:
        targets = self._ref_targets(ann_ids, image_id, path, where)
        if len(targets) < 2:  # Step III: single-target text comes from RefCOCOg
          continue
      self.refs.append(TextRef("grefcoco", ref["ref_id"], image_id, split, targets, tuple(sentences)))

  def _read_refcocog(self) -> None:
    path = self.paths[REFCOCOG_REFS]
    try:
      with open(path, "rb") as f:
        refs = pickle.load(f)
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
      raise MalformedRecordError(path, "whole file", "-", f"is not a readable pickle: {error}") from None
    if not isinstance(refs, list):
      raise MalformedRecordError(path, "top level", "-", "must be a list of refs (refer's refs(umd).p)")
    for position, ref in enumerate(refs):
      where, image_id, split, sentences = self._ref_common(ref, path, position)
      self._note_image("refcocog", split, image_id)
      ann_id = _check(ref, "ann_id", int, path, where)
      targets = self._ref_targets([ann_id], image_id, path, where)
      long_sentences = tuple(s for s in sentences if len(s.split()) >= self.config.min_long_text_words)
      if targets and long_sentences:
        self.refs.append(TextRef("refcocog", ref["ref_id"], image_id, split, targets, long_sentences))


def _load_json(path: str) -> Any:
  try:
    with open(path, "rb") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise MalformedRecordError(path, "whole file", "-", f"is not valid JSON: {error}") from None


def _check(record: Any, field: str, kind, path: str, where: str) -> Any:
  """record[field], which must exist and be of `kind`; else a MalformedRecordError naming file, record, field."""
  if not isinstance(record, dict) or field not in record:
    raise MalformedRecordError(path, where, field, "is missing")
  value = record[field]
  if not isinstance(value, kind) or isinstance(value, bool):
    names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
    raise MalformedRecordError(path, where, field, f"must be {names}; got {type(value).__name__} {value!r:.60}")
  return value


def load(manual_dir: str, config: RebuiltConfig = RebuiltConfig()) -> Sources:
  """Reads and validates the sources in `manual_dir`; a missing file names itself and the instructions."""
  return Sources(os.fspath(manual_dir), config)


# ----------------------------------------------------------------------------------------------------------
# Step I: image selection
# ----------------------------------------------------------------------------------------------------------


def is_rich(image: Mapping[str, Any], anns: Sequence[Mapping[str, Any]], config: RebuiltConfig) -> bool:
  """Step I: enough obvious instances, of enough categories, spread over the frame (module docstring)."""
  image_area = image["height"] * image["width"]
  obvious = [a for a in anns if not a.get("iscrowd", 0) and a["area"] >= config.min_instance_area * image_area]
  if len(obvious) < config.min_instances or len({a["category_id"] for a in obvious}) < config.min_categories:
    return False
  x0 = min(a["bbox"][0] for a in obvious)
  y0 = min(a["bbox"][1] for a in obvious)
  x1 = max(a["bbox"][0] + a["bbox"][2] for a in obvious)
  y1 = max(a["bbox"][1] + a["bbox"][3] for a in obvious)
  return (x1 - x0) * (y1 - y0) >= config.min_spread * image_area


# ----------------------------------------------------------------------------------------------------------
# Step IV rule
# ----------------------------------------------------------------------------------------------------------


def omni_target_kind(text_ann_ids: Sequence[int], visual_ann_ids: Sequence[int],
                     instances_by_category: Mapping[int, Sequence[int]],
                     category_of: Mapping[int, int]) -> str | None:
  """The target kind of an omni pair under the paper's Step IV rules, or None when the pair is not allowed.

  Args:
    text_ann_ids: the text prompt's referents (empty for no target).
    visual_ann_ids: the visual prompt's referents (empty for no target).
    instances_by_category: category id -> every non-crowd instance id of that category in the target image.
    category_of: annotation id -> category id.

  Returns:
    'no_target' when both referents are absent; 'single' when both prompts refer to the same single instance and
    it is the only one of its category; 'multi' when they refer to different categories, or to one category
    whose instances they jointly cover; None otherwise (also when one prompt has a target and the other not).
  """
  text, visual = set(text_ann_ids), set(visual_ann_ids)
  if not text and not visual:
    return "no_target"
  if not text or not visual:
    return None
  if len(text) == 1 and text == visual:
    (ann_id,) = text
    return "single" if list(instances_by_category[category_of[ann_id]]) == [ann_id] else None
  text_categories = {category_of[a] for a in text}
  visual_categories = {category_of[a] for a in visual}
  if not text_categories & visual_categories:
    return "multi"
  shared = text_categories & visual_categories
  if all(set(instances_by_category[c]) <= text | visual for c in shared):
    return "multi"
  return None


# ----------------------------------------------------------------------------------------------------------
# Planning: every choice of the construction, made before any pixel is decoded
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VisualPrompt:
  """A visual prompt on a target: the referents (all instances of `category_id`; () = no target) and the
  reference instance it shows (`ref_ann_id` on `ref_image_id`)."""

  category_id: int
  ann_ids: tuple[int, ...]
  ref_image_id: int
  ref_ann_id: int


@dataclasses.dataclass(frozen=True)
class ExamplePlan:
  """One example to generate: ids only, every choice made (see `plan`)."""

  split: str
  index: int
  image_id: int
  text: str
  text_ann_ids: tuple[int, ...]
  visual: VisualPrompt | None
  prompt_type: str
  target_kind: str  # 'single', 'multi' or 'no_target'
  text_source: str = ""  # 'grefcoco:<ref_id>' / 'refcocog:<ref_id>' for text and omni examples

  @property
  def modality(self) -> str:
    return SPLIT_MODALITY[self.split]

  @property
  def setting(self) -> str:
    if self.target_kind == "no_target":
      return "no_target"
    if self.modality == "omni":
      return "many_vs_one" if self.target_kind == "single" else "many_vs_many"
    return "one_vs_one" if self.target_kind == "single" else "one_vs_many"


@dataclasses.dataclass
class Plan:
  """The whole construction: which image went where, and every example of every split."""

  image_split: dict[int, str]  # target image id -> split
  reference_split: dict[int, str]  # reference image id -> split
  examples: dict[str, list[ExamplePlan]]


def _reference_pools(sources: Sources, reference_split: Mapping[int, str]) -> dict[str, dict[int, list]]:
  """split -> category -> [(image id, ann id)] of the Step II reference instances, sorted by id."""
  config = sources.config
  pools: dict[str, dict[int, list]] = {split: collections.defaultdict(list) for split in SPLITS}
  for image_id in sorted(reference_split):
    image = sources.images[image_id]
    min_area = config.min_reference_area * image["height"] * image["width"]
    largest: dict[int, dict[str, Any]] = {}
    for ann in sources.anns_by_image.get(image_id, []):
      if ann.get("iscrowd", 0) or ann["area"] < min_area:
        continue
      best = largest.get(ann["category_id"])
      if best is None or (ann["area"], -ann["id"]) > (best["area"], -best["id"]):
        largest[ann["category_id"]] = ann
    for category_id, ann in largest.items():
      pools[reference_split[image_id]][category_id].append((image_id, ann["id"]))
  return pools


def _has_reference_instance(sources: Sources, image_id: int) -> bool:
  image = sources.images[image_id]
  min_area = sources.config.min_reference_area * image["height"] * image["width"]
  return any(not a.get("iscrowd", 0) and a["area"] >= min_area for a in sources.anns_by_image.get(image_id, []))


def _visual_prompts(sources: Sources, image_id: int, pool: Mapping[int, list],
                    rng: np.random.Generator) -> tuple[list[VisualPrompt], VisualPrompt | None]:
  """Step II on one target: a positive prompt per promptable category, and one no-target prompt."""
  config = sources.config
  image = sources.images[image_id]
  min_area = config.min_instance_area * image["height"] * image["width"]
  anns = sources.anns_by_image.get(image_id, [])
  present = {a["category_id"] for a in anns}
  crowded = {a["category_id"] for a in anns if a.get("iscrowd", 0)}
  positives = []
  for category_id in sorted(present - crowded):
    instances = tuple(sorted(a["id"] for a in anns if a["category_id"] == category_id))
    if not pool.get(category_id) or not any(sources.anns[a]["area"] >= min_area for a in instances):
      continue
    ref_image_id, ref_ann_id = pool[category_id][int(rng.integers(len(pool[category_id])))]
    positives.append(VisualPrompt(category_id, instances, ref_image_id, ref_ann_id))
  absent = sorted(c for c in pool if pool[c] and c not in present)
  negative = None
  if absent:
    supercategories = {sources.categories[c].get("supercategory") for c in present}
    similar = [c for c in absent if sources.categories[c].get("supercategory") in supercategories]
    candidates = similar or absent
    category_id = candidates[int(rng.integers(len(candidates)))]
    ref_image_id, ref_ann_id = pool[category_id][int(rng.integers(len(pool[category_id])))]
    negative = VisualPrompt(category_id, (), ref_image_id, ref_ann_id)
  return positives, negative


def _text_kind(ref: TextRef) -> str:
  if not ref.ann_ids:
    return "no_target"
  return "single" if len(ref.ann_ids) == 1 else "multi"


def plan(sources: Sources) -> Plan:
  """Steps I-IV on ids alone: assigns images to splits and lists every example (module docstring)."""
  config = sources.config
  held_out = sources.all_ref_images.get("held_out", set())
  text_images = held_out | sources.all_ref_images.get("train", set())
  held_out_refs: dict[int, list[TextRef]] = collections.defaultdict(list)
  for ref in sources.refs:
    if ref.held_out:
      held_out_refs[ref.image_id].append(ref)

  # Step I, and the split of every target image.
  targets = sorted(i for i in text_images
                   if is_rich(sources.images[i], sources.anns_by_image.get(i, []), config))
  test_images = [i for i in targets if i in held_out and held_out_refs.get(i)]
  train_images = [i for i in targets if i not in held_out]
  image_split = {image_id: "train" for image_id in train_images}
  ordered = sorted(test_images, key=lambda i: (_hash01(config.seed, "test", i), i))
  for position, image_id in enumerate(ordered):
    image_split[image_id] = TEST_SPLITS[position % 3]

  # Step II: the reference images and their split.
  target_set = set(targets)
  weights = dict(config.reference_split_weights)
  total = sum(weights.values())
  reference_split = {}
  for image_id in sorted(sources.images):
    if image_id in target_set or image_id in held_out or not _has_reference_instance(sources, image_id):
      continue
    draw, edge = _hash01(config.seed, "reference", image_id) * total, 0
    for split in ("train", "visual_test", "omni_test"):
      edge += weights[split]
      if draw < edge:
        reference_split[image_id] = split
        break
  pools = _reference_pools(sources, reference_split)

  examples: dict[str, list[ExamplePlan]] = {split: [] for split in SPLITS}

  def add(split, **fields):
    index = len(examples[split])
    if "prompt_type" not in fields:
      fields["prompt_type"] = _SPATIAL_PROMPTS[index % 3]
    examples[split].append(ExamplePlan(split=split, index=index, **fields))

  for image_id in sorted(image_split):
    split = image_split[image_id]
    rng = np.random.default_rng([config.seed, _SPLIT_CODES[split], image_id])
    if split in ("train", "visual_test"):
      positives, negative = _visual_prompts(sources, image_id, pools[split], rng)
      for visual in positives + ([negative] if negative else []):
        kind = "no_target" if not visual.ann_ids else ("single" if len(visual.ann_ids) == 1 else "multi")
        extra = {"prompt_type": _SPATIAL_PROMPTS[int(rng.integers(3))]} if split == "train" else {}
        add(split, image_id=image_id, text="", text_ann_ids=(), visual=visual, target_kind=kind, **extra)
      continue
    refs = sorted(held_out_refs[image_id], key=lambda r: (r.source, r.ref_id))
    if split == "text_test":
      for ref in refs:
        for sentence in ref.sentences:
          add(split, image_id=image_id, text=sentence, text_ann_ids=ref.ann_ids, visual=None,
              prompt_type="none", target_kind=_text_kind(ref), text_source=f"{ref.source}:{ref.ref_id}")
      continue
    # Step IV (omni_test).
    positives, negative = _visual_prompts(sources, image_id, pools[split], rng)
    anns = [a for a in sources.anns_by_image.get(image_id, []) if not a.get("iscrowd", 0)]
    by_category: dict[int, list[int]] = collections.defaultdict(list)
    for ann in sorted(anns, key=lambda a: a["id"]):
      by_category[ann["category_id"]].append(ann["id"])
    category_of = {a["id"]: a["category_id"] for a in anns}
    for ref in refs:
      for sentence in ref.sentences:
        if not ref.ann_ids:
          candidates = [negative] if negative else []
        else:
          same = [v for v in positives if len(ref.ann_ids) == 1 and v.ann_ids == ref.ann_ids]
          candidates = same or positives
        if not candidates:
          continue
        visual = candidates[int(rng.integers(len(candidates)))]
        kind = omni_target_kind(ref.ann_ids, visual.ann_ids, by_category, category_of)
        if kind is None:
          continue
        add(split, image_id=image_id, text=sentence, text_ann_ids=ref.ann_ids, visual=visual, target_kind=kind,
            text_source=f"{ref.source}:{ref.ref_id}")
  return Plan(image_split, reference_split, examples)


_SPLIT_NEEDS = {
    "train": "rich images annotated by gRefCOCO/RefCOCOg train splits only, and reference images of their "
             "categories",
    "text_test": "rich images with held-out gRefCOCO/RefCOCOg expressions",
    "visual_test": "rich images with held-out expressions, and reference images of their categories",
    "omni_test": "rich images with held-out expressions, and reference images that pair with them (Step IV)",
}


def check_not_empty(the_plan: Plan, manual_dir: str) -> None:
  """Raises ValueError naming every split the construction left empty (TFDS cannot write an empty split)."""
  empty = [split for split in SPLITS if not the_plan.examples[split]]
  if empty:
    needs = "; ".join(f"{split} needs {_SPLIT_NEEDS[split]}" for split in empty)
    raise ValueError(
        f"omniref/rebuilt: the sources in {manual_dir!r} leave split(s) {empty} empty ({needs}). The real COCO "
        "+ gRefCOCO + RefCOCOg fill every split; a small test directory may not (the dummy_data fixture needs "
        "rebuilt.repeat_manual_dir(..., copies=3) or more).")


def plan_statistics(the_plan: Plan) -> dict[str, dict[str, Any]]:
  """Fig. 4-style counts per split from the plan alone: images, reference images, examples per target kind."""
  stats = {}
  for split, rows in the_plan.examples.items():
    kinds = collections.Counter(row.target_kind for row in rows)
    stats[split] = {
        "images": len({row.image_id for row in rows}),
        "reference_images": len({row.visual.ref_image_id for row in rows if row.visual}),
        "examples": len(rows),
        "single": kinds["single"], "multi": kinds["multi"], "no_target": kinds["no_target"],
    }
  return stats


# ----------------------------------------------------------------------------------------------------------
# Examples
# ----------------------------------------------------------------------------------------------------------


class _Pixels:
  """Decodes images and annotation masks for one split, keeping only the current target's in memory."""

  def __init__(self, sources: Sources):
    self.sources = sources
    self._image_id, self._image = None, None

  def image(self, image_id: int) -> np.ndarray:
    if image_id == self._image_id:
      return self._image
    info = self.sources.images[image_id]
    path = self.sources.image_path(image_id)
    where = f"images id={image_id}"
    try:
      with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    except OSError as error:
      raise MalformedRecordError(self.sources.paths[COCO_INSTANCES], where, "file_name",
                                 f"names {path}, which cannot be read: {error}") from None
    if pixels.shape[:2] != (info["height"], info["width"]):
      raise MalformedRecordError(self.sources.paths[COCO_INSTANCES], where, "height/width",
                                 f"say {info['height']}x{info['width']} but {path} is "
                                 f"{pixels.shape[0]}x{pixels.shape[1]} (height x width)")
    self._image_id, self._image = image_id, pixels
    return pixels

  def mask(self, ann_ids: Sequence[int], image_id: int) -> np.ndarray:
    info = self.sources.images[image_id]
    mask = np.zeros((info["height"], info["width"]), np.uint8)
    for ann_id in ann_ids:
      ann = self.sources.anns[ann_id]
      mask |= released_lib.decode_segmentation(ann["segmentation"], info["height"], info["width"],
                                               path=self.sources.paths[COCO_INSTANCES],
                                               record=f"annotation id={ann_id}")
    return mask


def generate_example(sources: Sources, row: ExamplePlan, config_name: str = "rebuilt") -> dict[str, Any]:
  """The OmniRIS example (numpy values, class labels as names) of one planned row."""
  pixels = _Pixels(sources)
  return _generate(sources, pixels, row, config_name)


def _generate(sources: Sources, pixels: _Pixels, row: ExamplePlan, config_name: str) -> dict[str, Any]:
  image = pixels.image(row.image_id)
  text_mask = pixels.mask(row.text_ann_ids, row.image_id)
  visual = row.visual
  if visual is None:
    visual_mask = np.zeros_like(text_mask)
    ref_image, ref_image_id, ref_category_id = _PLACEHOLDER_IMAGE, -1, -1
    ref_mask = ref_box = ref_scribble = _PLACEHOLDER_MASK
  else:
    visual_mask = pixels.mask(visual.ann_ids, row.image_id)
    ref_pixels = _Pixels(sources)
    ref_image = ref_pixels.image(visual.ref_image_id)
    ref_mask_2d = ref_pixels.mask([visual.ref_ann_id], visual.ref_image_id)
    if not ref_mask_2d.any():
      raise MalformedRecordError(sources.paths[COCO_INSTANCES], f"annotation id={visual.ref_ann_id}",
                                 "segmentation", "decodes to an empty mask (a reference instance needs pixels)")
    rng = np.random.default_rng([sources.config.seed, _SPLIT_CODES[row.split], row.index])
    ref_mask = ref_mask_2d[..., None]
    ref_box = prompts.box_from_mask(ref_mask)
    ref_scribble = prompts.scribble_from_mask(ref_mask, rng)
    ref_image_id, ref_category_id = visual.ref_image_id, visual.category_id
  mask = text_mask | visual_mask
  category_ids = {sources.anns[a]["category_id"] for a in row.text_ann_ids + (visual.ann_ids if visual else ())}
  return {
      "id": f"{config_name}/{row.split}/{row.index:06d}",
      "image_id": row.image_id,
      "image": image,
      "text": row.text,
      "text_mask": text_mask[..., None],
      "ref_image": ref_image,
      "ref_image_id": ref_image_id,
      "ref_mask": ref_mask,
      "ref_box": ref_box,
      "ref_scribble": ref_scribble,
      "visual_mask": visual_mask[..., None],
      "mask": mask[..., None],
      "no_target": not mask.any(),
      "modality": row.modality,
      "setting": row.setting,
      "prompt_type": row.prompt_type,
      "category_ids": sorted(category_ids),
      "ref_category_id": ref_category_id,
  }


def generate_split(sources: Sources, rows: Sequence[ExamplePlan], *,
                   config_name: str = "rebuilt") -> Iterator[dict[str, Any]]:
  """Yields the examples of planned `rows` in order (numpy values, class labels as names)."""
  pixels = _Pixels(sources)
  for row in rows:
    yield _generate(sources, pixels, row, config_name)


# ---- Several processes --------------------------------------------------------------------------------------

_WORKER_STATE: dict[str, Any] = {}
_PNG_CACHE_SIZE = 64  # RGB PNGs kept per process (~0.4 MB each at 640x480)


class _Encoder:
  """features.encode_example with the PNG of each target / reference image encoded once per process.

  An RGB PNG at 640x480 costs ~30 ms, most of an example's cost, and a target image recurs in consecutive
  examples (one per prompt), a reference image in many: the bytes are the same every time, so they are cached
  (least recently used dropped first). Masks are still validated and encoded by features.encode_example.
  """

  def __init__(self):
    from tfds_omniref.omniref import features as features_lib  # pylint: disable=g-import-not-at-top

    self.features = features_lib
    self._pngs: collections.OrderedDict[int, bytes] = collections.OrderedDict()

  def _png(self, image_id: int, pixels: np.ndarray, name: str) -> bytes:
    if image_id < 0:
      return self.features.encode_png(pixels, name=name)
    if image_id in self._pngs:
      self._pngs.move_to_end(image_id)
      return self._pngs[image_id]
    png = self._pngs[image_id] = self.features.encode_png(pixels, name=name)
    while len(self._pngs) > _PNG_CACHE_SIZE:
      self._pngs.popitem(last=False)
    return png

  def __call__(self, example: Mapping[str, Any]) -> dict[str, Any]:
    encoded = self.features.encode_example(dict(example, image=_PLACEHOLDER_IMAGE, ref_image=_PLACEHOLDER_IMAGE))
    encoded["image"] = self._png(example["image_id"], example["image"], f"image of example {example['id']!r}")
    encoded["ref_image"] = self._png(example["ref_image_id"], example["ref_image"],
                                     f"ref_image of example {example['id']!r}")
    return encoded


def _encode_row(row: ExamplePlan):
  """Worker: one planned row -> (key, the example as TFDS should store it); sources come in by fork."""
  sources, config_name = _WORKER_STATE["sources"], _WORKER_STATE["config_name"]
  pixels = _WORKER_STATE.setdefault("pixels", _Pixels(sources))
  encoder = _WORKER_STATE.setdefault("encoder", _Encoder())
  example = _generate(sources, pixels, row, config_name)
  return example["id"], encoder(example)


def num_workers() -> int:
  """Worker processes for generating examples: $OMNIREF_BUILD_WORKERS, default 1 (in the calling process)."""
  value = os.environ.get(WORKERS_ENV, "1")
  try:
    workers = int(value)
  except ValueError:
    raise ValueError(f"${WORKERS_ENV}={value!r} must be a positive int (worker processes).") from None
  if workers < 1:
    raise ValueError(f"${WORKERS_ENV}={value!r} must be a positive int (worker processes).")
  return workers


def encoded_examples(sources: Sources, rows: Sequence[ExamplePlan], *, config_name: str = "rebuilt",
                     workers: int | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
  """(key, encoded example) for `rows` in order; decoding and PNG encoding spread over `workers` processes.

  The order (and so every written byte) does not depend on `workers`. Worker processes are forked, so they
  share the already-read sources without pickling them (POSIX only; elsewhere use workers=1).
  """
  workers = num_workers() if workers is None else workers
  if workers <= 1 or len(rows) < 2 * workers:
    encoder = _Encoder()
    for example in generate_split(sources, rows, config_name=config_name):
      yield example["id"], encoder(example)
    return
  _WORKER_STATE.clear()
  _WORKER_STATE.update(sources=sources, config_name=config_name)
  context = multiprocessing.get_context("fork")
  with context.Pool(workers) as pool:
    yield from pool.imap(_encode_row, rows, chunksize=4)
  _WORKER_STATE.clear()


class SplitExamples:
  """A split's (key, encoded example) stream with a length, so progress can show an ETA (build.py)."""

  def __init__(self, sources: Sources, rows: Sequence[ExamplePlan], config_name: str):
    self.sources, self.rows, self.config_name = sources, list(rows), config_name

  def __len__(self) -> int:
    return len(self.rows)

  def __iter__(self):
    return encoded_examples(self.sources, self.rows, config_name=self.config_name)


# ----------------------------------------------------------------------------------------------------------
# A bigger manual directory from a small one (tests and the build-throughput benchmark)
# ----------------------------------------------------------------------------------------------------------


def repeat_manual_dir(source_dir: str, target_dir: str, copies: int) -> dict[str, int]:
  """Writes `copies` renumbered copies of the rebuilt sources in `source_dir` into `target_dir`.

  Copy j has every image, annotation, ref and sentence id shifted by j times a power of ten above the largest
  id, and its text refs re-labelled so that all roles occur: copies j % 3 == 0 keep their splits, copies
  j % 3 == 1 move every ref to 'train', copies j % 3 == 2 drop their refs (their images can only serve as
  reference images). The 8-image dummy_data fixture has only one image of most categories besides their target,
  which is too few for the construction to fill every split; three or more copies are enough. Pixels are
  copied unchanged (a reference may show the same photo as its target: fine for tests and timing, not for
  training).

  Returns:
    counts of what was written: images, annotations, refs.
  """
  if copies < 1:
    raise ValueError(f"{copies=} must be at least 1.")
  sources_paths = {name: os.path.join(source_dir, name) for name in (COCO_INSTANCES, GREFCOCO_REFS, REFCOCOG_REFS)}
  coco = _load_json(sources_paths[COCO_INSTANCES])
  grefs = _load_json(sources_paths[GREFCOCO_REFS])
  with open(sources_paths[REFCOCOG_REFS], "rb") as f:
    grefs_g = pickle.load(f)

  def stride(values) -> int:
    return 10 ** len(str(max([1] + [abs(v) for v in values])))

  image_stride = stride(image["id"] for image in coco["images"])
  ann_stride = stride(ann["id"] for ann in coco["annotations"])
  ref_stride = stride([r["ref_id"] for r in grefs + grefs_g] +
                      [s for r in grefs + grefs_g for s in r.get("sent_ids", [])])
  os.makedirs(os.path.join(target_dir, IMAGE_DIR), exist_ok=True)
  for name in sources_paths:
    os.makedirs(os.path.dirname(os.path.join(target_dir, name)), exist_ok=True)

  def file_name(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"

  out = {"images": [], "annotations": [], "categories": coco["categories"]}
  out_grefs, out_refcocog = [], []
  for copy in range(copies):
    for image in coco["images"]:
      new_id = image["id"] + copy * image_stride
      out["images"].append(dict(image, id=new_id, file_name=file_name(new_id)))
      src = os.path.join(source_dir, IMAGE_DIR, image["file_name"])
      dst = os.path.join(target_dir, IMAGE_DIR, file_name(new_id))
      if not os.path.exists(dst):
        with open(src, "rb") as f_in, open(dst, "wb") as f_out:
          f_out.write(f_in.read())
    for ann in coco["annotations"]:
      out["annotations"].append(dict(ann, id=ann["id"] + copy * ann_stride,
                                     image_id=ann["image_id"] + copy * image_stride))
    if copy % 3 == 2:
      continue
    for refs, out_refs in ((grefs, out_grefs), (grefs_g, out_refcocog)):
      for ref in refs:
        ann_ids = ref["ann_id"]
        shifted = (ann_ids + copy * ann_stride if isinstance(ann_ids, int)
                   else [a if a == -1 else a + copy * ann_stride for a in ann_ids])
        out_refs.append(dict(
            ref, ref_id=ref["ref_id"] + copy * ref_stride, image_id=ref["image_id"] + copy * image_stride,
            ann_id=shifted, split=ref["split"] if copy % 3 == 0 else "train",
            sent_ids=[s + copy * ref_stride for s in ref.get("sent_ids", [])],
            sentences=[dict(s, sent_id=s.get("sent_id", 0) + copy * ref_stride) for s in ref["sentences"]]))
  with open(os.path.join(target_dir, COCO_INSTANCES), "w") as f:
    json.dump(out, f)
  with open(os.path.join(target_dir, GREFCOCO_REFS), "w") as f:
    json.dump(out_grefs, f)
  with open(os.path.join(target_dir, REFCOCOG_REFS), "wb") as f:
    pickle.dump(out_refcocog, f, protocol=2)
  return {"images": len(out["images"]), "annotations": len(out["annotations"]),
          "refs": len(out_grefs) + len(out_refcocog)}
