"""Readers for the referring-expression files of the RIS benchmarks, checked record by record.

The benchmarks ship as two annotation files per dataset folder (the layout of lichengunc/refer and of ReLA's
gRefCOCO loader), plus the COCO train2014 images they all draw from:

  refcoco/refs(unc).p, refcoco+/refs(unc).p, refcocog/refs(umd).p   pickled list of refs (Python 2 pickles)
  grefcoco/grefs(unc).json                                           JSON list of refs
  <dataset>/instances.json                                           COCO instances of that dataset's images

A ref is `{ref_id, image_id, split, ann_id, sentences: [{raw, sent_id, ...}], category_id, ...}`; in the refer
pickles `ann_id` is one annotation id, in gRefCOCO a list of them, `[-1]` meaning "no target".

This module turns those records into plain `Ref` values and the target masks of their annotations. Everything is
checked while reading, so a broken record fails with the file, the ref id and the field it concerns, before any
example is written. Only reading and decoding happen here; the TFDS builder (ris_dataset_builder.py) turns refs
into examples.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils

NO_TARGET_ANN_ID = -1


@dataclasses.dataclass(frozen=True)
class Sentence:
  """One referring expression of a ref: its id and its text (the `raw` string, as ReLA and LAVT read it)."""

  sent_id: int
  text: str


@dataclasses.dataclass(frozen=True)
class Ref:
  """One referred object set: the annotations it refers to (none for a no-target ref) and its sentences."""

  ref_id: int
  image_id: int
  split: str
  ann_ids: tuple[int, ...]
  sentences: tuple[Sentence, ...]


@dataclasses.dataclass(frozen=True)
class Instances:
  """The COCO instances of one dataset folder, indexed by id, and the file they came from (for messages)."""

  path: str
  images: Mapping[int, Mapping[str, Any]]
  annotations: Mapping[int, Mapping[str, Any]]


class _PlainDataUnpickler(pickle.Unpickler):
  """Unpickles plain data only (lists, dicts, strings, numbers), so a refs file cannot run code when loaded."""

  def find_class(self, module, name):
    raise pickle.UnpicklingError(
        f"refers to {module}.{name}; a refer refs file holds only lists, dicts, strings and numbers")


def _text(value: Any) -> Any:
  """Python 2 `str` values of a refer pickle (loaded as bytes) as text, recursively; UTF-8, else Latin-1."""
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError:
      return value.decode("latin-1")
  if isinstance(value, list):
    return [_text(item) for item in value]
  if isinstance(value, tuple):
    return tuple(_text(item) for item in value)
  if isinstance(value, dict):
    return {_text(key): _text(item) for key, item in value.items()}
  return value


def load_ref_records(path: str) -> list[Any]:
  """The raw ref records of a refs file: a refer pickle (`*.p`) or a gRefCOCO JSON (`*.json`).

  The refer pickles were written by Python 2; they are read as bytes and decoded here (UTF-8, else Latin-1),
  which also reads pickles written by Python 3. Only plain data is unpickled.
  """
  try:
    if path.endswith(".json"):
      with open(path, "rb") as file:
        records = json.load(file)
    else:
      with open(path, "rb") as file:
        records = _text(_PlainDataUnpickler(file, encoding="bytes").load())
  except (pickle.UnpicklingError, json.JSONDecodeError, EOFError, UnicodeDecodeError, ValueError) as error:
    raise ValueError(f"{path} is not a readable refs file ({type(error).__name__}: {error}); download it again "
                     "(see the builder's MANUAL_DOWNLOAD_INSTRUCTIONS).") from error
  if not isinstance(records, list):
    raise ValueError(f"{path} must hold a list of refs; got {type(records).__name__}.")
  return records


def load_instances(path: str) -> Instances:
  """The COCO instances file of a dataset folder, indexed by image id and annotation id."""
  try:
    with open(path, "rb") as file:
      data = json.load(file)
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise ValueError(f"{path} is not valid JSON ({error}); download it again.") from error
  if not isinstance(data, dict):
    raise ValueError(f"{path} must be a COCO instances object with 'images' and 'annotations'; "
                     f"got {type(data).__name__}.")
  for field in ("images", "annotations"):
    if not isinstance(data.get(field), list):
      raise ValueError(f"{path} must have a list field {field!r} (COCO instances format).")
  images, annotations = {}, {}
  for position, image in enumerate(data["images"]):
    if not isinstance(image, dict) or "id" not in image:
      raise ValueError(f"{path}: images[{position}] has no field 'id'.")
    images[image["id"]] = image
  for position, annotation in enumerate(data["annotations"]):
    if not isinstance(annotation, dict) or "id" not in annotation:
      raise ValueError(f"{path}: annotations[{position}] has no field 'id'.")
    annotations[annotation["id"]] = annotation
  return Instances(path=path, images=images, annotations=annotations)


def parse_refs(records: Sequence[Any], *, path: str, instances: Instances, splits: Sequence[str],
               image_dir: str) -> list[Ref]:
  """Checked `Ref`s from the raw records of `path`, against `instances` and the images in `image_dir`.

  Raises:
    ValueError: a record lacks a field, names a split not in `splits`, an annotation not in `instances` (or one
      on another image), an image not in `instances`, or has no sentence; the message names `path`, the ref id
      and the field. FileNotFoundError: a ref's image file is not in `image_dir`.
  """
  refs, seen_images = [], set()
  for position, record in enumerate(records):
    where = f"{path}: record #{position}"
    if not isinstance(record, dict):
      raise ValueError(f"{where} must be a dict (a ref); got {type(record).__name__}.")
    if "ref_id" in record:
      where = f"{path}: ref_id={record['ref_id']}"
    for field in ("ref_id", "image_id", "split", "ann_id", "sentences"):
      if field not in record:
        raise ValueError(f"{where} has no field {field!r}; every ref needs ref_id, image_id, split, ann_id and "
                         "sentences (is this the right file?).")
    ref_id, image_id, split = record["ref_id"], record["image_id"], record["split"]
    if split not in splits:
      raise ValueError(f"{where} field 'split' is {split!r}; expected one of {list(splits)}.")
    ann_ids = _ann_ids(record["ann_id"], where=where)
    image = instances.images.get(image_id)
    if image is None:
      raise ValueError(f"{where} field 'image_id': image {image_id} is not in {instances.path}.")
    for ann_id in ann_ids:
      annotation = instances.annotations.get(ann_id)
      if annotation is None:
        raise ValueError(f"{where} field 'ann_id': annotation {ann_id} is not in {instances.path}.")
      if annotation.get("image_id") != image_id:
        raise ValueError(f"{where} field 'ann_id': annotation {ann_id} is on image {annotation.get('image_id')}, "
                         f"not on the ref's image {image_id}.")
    if image_id not in seen_images:
      image_path(image, instances=instances, image_dir=image_dir, where=where)  # raises when missing
      seen_images.add(image_id)
    refs.append(Ref(ref_id=int(ref_id), image_id=int(image_id), split=split, ann_ids=ann_ids,
                    sentences=_sentences(record["sentences"], where=where)))
  return refs


def _ann_ids(value: Any, *, where: str) -> tuple[int, ...]:
  """The annotation ids of a ref (an int in refer pickles, a list in gRefCOCO); () for `[-1]` (no target)."""
  ids = value if isinstance(value, (list, tuple)) else [value]
  if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
    raise ValueError(f"{where} field 'ann_id' must be an annotation id or a non-empty list of them; got {value!r}.")
  if NO_TARGET_ANN_ID in ids:
    if len(ids) != 1:
      raise ValueError(f"{where} field 'ann_id' mixes -1 (no target) with annotation ids: {value!r}.")
    return ()
  return tuple(dict.fromkeys(ids))  # unique, in the file's order


def _sentences(value: Any, *, where: str) -> tuple[Sentence, ...]:
  """The sentences of a ref; the text is `raw` (what ReLA and LAVT feed their models), else `sent`."""
  if not isinstance(value, list) or not value:
    raise ValueError(f"{where} field 'sentences' must be a non-empty list; got {value!r}.")
  sentences = []
  for position, sentence in enumerate(value):
    if not isinstance(sentence, dict) or "sent_id" not in sentence:
      raise ValueError(f"{where} field 'sentences'[{position}] has no 'sent_id'.")
    text = str(sentence.get("raw") or "").strip() or str(sentence.get("sent") or "").strip()
    if not text:
      raise ValueError(f"{where} field 'sentences'[{position}] (sent_id={sentence['sent_id']}) has no text in "
                       "'raw' or 'sent'.")
    sentences.append(Sentence(sent_id=int(sentence["sent_id"]), text=text))
  return tuple(sentences)


def image_path(image: Mapping[str, Any], *, instances: Instances, image_dir: str, where: str) -> str:
  """The path of a COCO image record's file in `image_dir`; FileNotFoundError naming what is missing."""
  file_name = image.get("file_name")
  if not file_name:
    raise ValueError(f"{where}: image {image.get('id')} in {instances.path} has no field 'file_name'.")
  path = os.path.join(image_dir, file_name)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{where}: the file of image {image.get('id')} (field 'file_name' in "
                            f"{instances.path}) is missing: {path}. Put the COCO train2014 images there (see the "
                            "builder's MANUAL_DOWNLOAD_INSTRUCTIONS).")
  return path


def annotation_mask(annotation: Mapping[str, Any], *, height: int, width: int, where: str) -> np.ndarray:
  """The (height, width) 0/1 uint8 mask of one COCO annotation, decoded with pycocotools.

  Polygons (a list of [x0, y0, x1, y1, ...]) are rasterised; polygons of fewer than three points are left out,
  as ReLA's loader does (pycocotools would read a 4-number polygon as a box). RLE (`counts` a list, or a
  compressed string) is decoded as it is; its size must be the image's.
  """
  segmentation = annotation.get("segmentation")
  try:
    if isinstance(segmentation, list):
      polygons = [p for p in segmentation if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
      if not polygons:
        raise ValueError(f"no polygon with at least three points in {segmentation!r:.80}")
      rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict):
      if list(segmentation.get("size", ())) != [height, width]:
        raise ValueError(f"RLE size {segmentation.get('size')} is not the image's [height, width] "
                         f"{[height, width]}")
      if isinstance(segmentation.get("counts"), list):  # uncompressed RLE (iscrowd regions)
        rle = mask_utils.frPyObjects(segmentation, height, width)
      else:
        rle = dict(segmentation)
        if isinstance(rle.get("counts"), str):
          rle["counts"] = rle["counts"].encode("ascii")
      decoded = mask_utils.decode(rle)
      return (decoded > 0).astype(np.uint8)
    else:
      raise ValueError(f"expected polygons or an RLE dict; got {type(segmentation).__name__}")
    return (mask_utils.decode(rle) > 0).astype(np.uint8)
  except (ValueError, TypeError, KeyError, UnicodeEncodeError) as error:
    raise ValueError(f"{where}: annotation {annotation.get('id')} field 'segmentation' does not decode: "
                     f"{error}") from error


def target_mask(ref: Ref, *, instances: Instances, where: str) -> tuple[np.ndarray, list[Mapping[str, Any]]]:
  """The union mask of a ref's targets (all zero for no target) and the annotations it is the union of.

  Crowd regions (`iscrowd` 1) are left out of a union that has other instances, as ReLA's gRefCOCO loader does;
  a ref that refers to crowd regions only keeps them (otherwise it would have a target and an empty mask).
  """
  image = instances.images[ref.image_id]
  height, width = _image_size(image, instances=instances, where=where)
  annotations = [instances.annotations[ann_id] for ann_id in ref.ann_ids]
  used = [a for a in annotations if not a.get("iscrowd", 0)] or annotations
  mask = np.zeros((height, width), np.uint8)
  for annotation in used:
    mask |= annotation_mask(annotation, height=height, width=width, where=where)
  return mask, used


def _image_size(image: Mapping[str, Any], *, instances: Instances, where: str) -> tuple[int, int]:
  for field in ("height", "width"):
    if not isinstance(image.get(field), int) or image[field] <= 0:
      raise ValueError(f"{where}: image {image.get('id')} in {instances.path} field {field!r} must be a positive "
                       f"int; got {image.get(field)!r}.")
  return image["height"], image["width"]


def group_by_split(refs: Iterable[Ref], splits: Sequence[str]) -> dict[str, list[Ref]]:
  """Refs per split, in file order, with every split of `splits` present (possibly empty)."""
  grouped = {split: [] for split in splits}
  for ref in refs:
    grouped[ref.split].append(ref)
  return grouped
