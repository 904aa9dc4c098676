"""Regenerates `dummy_data/`: every real OmniRef / COCO / gRefCOCO / RefCOCO file format, from real pixels.

No COCO image may ship here, so the fixture is built from photos that Python packages ship: `imgviz.data.voc()`
(a real PASCAL VOC photo of a cafeteria with 19 instance masks: persons, chairs, dining tables, a bottle) and
scikit-image's sample photos (`astronaut`, `chelsea` the cat, `coffee`, `rocket`) with instance polygons drawn
by hand below, plus three crops/mirrors of them (so that each visual-prompt category appears in a second,
different image to take a reference from). Every expression below was written by looking at the photos.

The files are the formats the real loaders read (see dummy_data/README.md for what each file is and its counts):
  train2014/COCO_train2014_%012d.jpg      the images, as in the COCO train2014 folder
  annotations/instances_train2014.json    COCO instances (polygon, compressed-RLE and iscrowd uncompressed-RLE)
  omniref/OmniRef.json                    refs keyed by split ('visual-train', 'visual-test', 'text-test',
                                          'omni-test'), as As-Time-Goes-By/OmniSegNet's loaders read them
  omniref/instances.json                  COCO-format instances keyed by the same split names (the release's)
  omniref/SuppImageAnns.json              category id (str) -> reference instances in other images
  grefcoco/grefs(unc).json, grefcoco/instances.json          gRefCOCO as ReLA reads it
  refcoco/refs(unc).p, refcoco+/refs(unc).p, refcocog/refs(umd).p (+ instances.json each), as lichengunc/refer

Run from anywhere (deterministic: the same bytes every time):
  python -m tfds_omniref.omniref.make_dummy_data [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import re
from typing import Any

import imgviz
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
import skimage.data
import skimage.draw
import skimage.measure

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dummy_data")

# COCO category ids and names (the real ones) of the objects in the fixture photos.
CATEGORIES = [
    {"supercategory": "person", "id": 1, "name": "person"},
    {"supercategory": "vehicle", "id": 5, "name": "airplane"},
    {"supercategory": "animal", "id": 17, "name": "cat"},
    {"supercategory": "kitchen", "id": 44, "name": "bottle"},
    {"supercategory": "kitchen", "id": 47, "name": "cup"},
    {"supercategory": "kitchen", "id": 50, "name": "spoon"},
    {"supercategory": "furniture", "id": 62, "name": "chair"},
    {"supercategory": "furniture", "id": 67, "name": "dining table"},
]
PERSON, AIRPLANE, CAT, BOTTLE, CUP, SPOON, CHAIR, TABLE = 1, 5, 17, 44, 47, 50, 62, 67
_VOC_TO_COCO = {"person": PERSON, "chair": CHAIR, "diningtable": TABLE, "bottle": BOTTLE}

# Image ids of the fixture (file COCO_train2014_%012d.jpg).
CAFETERIA, ASTRONAUT, CAT_PHOTO, COFFEE, ROCKET = 101, 102, 103, 104, 105
CAFETERIA_RIGHT, CAT_MIRROR, COFFEE_MIRROR = 106, 107, 108

# Hand-drawn polygons (x, y in the original photo's pixels) of the objects in the scikit-image photos.
_ASTRONAUT_PERSON = [(150, 60), (180, 20), (230, 12), (280, 30), (300, 80), (295, 150), (305, 200), (300, 250),
                     (345, 285), (360, 330), (320, 380), (290, 420), (280, 511), (25, 511), (20, 400), (30, 320),
                     (50, 270), (110, 235), (115, 190), (165, 150), (155, 100)]
_ASTRONAUT_SHUTTLE = [(405, 5), (425, 0), (435, 40), (440, 70), (455, 200), (470, 270), (365, 270), (355, 210),
                      (385, 80), (400, 40)]
_CAT = [(0, 299), (0, 40), (30, 0), (120, 0), (300, 0), (360, 0), (385, 40), (370, 120), (350, 200), (360, 250),
        (420, 299)]
_CUP = [(175, 100), (190, 50), (240, 22), (300, 18), (360, 25), (400, 60), (410, 110), (395, 170), (380, 230),
        (340, 260), (280, 265), (245, 300), (210, 300), (195, 260), (200, 225), (185, 170)]
_SPOON = [(410, 68), (422, 75), (395, 170), (385, 230), (400, 260), (405, 300), (385, 320), (355, 325), (330, 305),
          (325, 270), (345, 245), (365, 232), (380, 170)]

# How each instance's segmentation is stored: COCO polygons, compressed RLE (counts as a string), or an
# iscrowd=1 uncompressed RLE (counts as a list of ints), so readers meet all three.
POLYGON, RLE, CROWD = "polygon", "rle", "crowd"


@dataclasses.dataclass
class Instance:
  """One object of a fixture image: its category, mask (at the fixture size) and how it is stored."""

  name: str  # a short handle used below to refer to it, e.g. 'hat_man'
  category_id: int
  mask: np.ndarray  # (H, W) bool
  style: str = POLYGON
  ann_id: int = -1


@dataclasses.dataclass
class FixtureImage:
  image_id: int
  pixels: np.ndarray  # (H, W, 3) uint8
  instances: list[Instance]

  @property
  def file_name(self) -> str:
    return f"COCO_train2014_{self.image_id:012d}.jpg"

  def find(self, name: str) -> Instance:
    for instance in self.instances:
      if instance.name == name:
        return instance
    raise KeyError(f"{name!r} is not an instance of image {self.image_id}")


# ----------------------------------------------------------------------------------------------------------
# Images and masks
# ----------------------------------------------------------------------------------------------------------


def _resize_image(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
  return np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.LANCZOS))


def _resize_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
  return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height),
                                                                         Image.Resampling.NEAREST)) > 127


def _polygon_mask(points, height: int, width: int) -> np.ndarray:
  xs, ys = zip(*points)
  rows, cols = skimage.draw.polygon(np.asarray(ys, float), np.asarray(xs, float), (height, width))
  mask = np.zeros((height, width), bool)
  mask[rows, cols] = True
  return mask


def _scaled(pixels, masks: dict[str, np.ndarray], width: int, height: int):
  return _resize_image(pixels, width, height), {k: _resize_mask(m, width, height) for k, m in masks.items()}


def _cafeteria_masks() -> tuple[np.ndarray, list[tuple[str, int, np.ndarray, str]]]:
  """The VOC photo and its instances with names that say which person/table is which (by looking at it)."""
  voc = imgviz.data.voc()
  names = {  # index in voc['masks'] -> handle; the rest are chairs
      0: "bottle", 9: "background_person_left", 10: "background_person_far", 11: "person_behind_hat_man",
      14: "standing_person_right", 15: "man_back_to_camera", 16: "hat_man", 17: "green_shirt_man",
      12: "table_back_left", 13: "table_back_right", 18: "front_table",
  }
  styles = {"person_behind_hat_man": RLE, "standing_person_right": RLE, "front_table": RLE}
  instances = []
  crowd = voc["masks"][9] | voc["masks"][10]  # two blurry people far behind, annotated as one crowd region
  for index, (label, mask) in enumerate(zip(voc["labels"], voc["masks"])):
    if index in (9, 10):
      continue
    class_name = voc["class_names"][label]
    name = names.get(index, f"chair_{index}")
    instances.append((name, _VOC_TO_COCO[class_name], mask, styles.get(name, POLYGON)))
  instances.append(("background_people", PERSON, crowd, CROWD))
  return voc["rgb"], instances


def make_images() -> dict[int, FixtureImage]:
  """Every fixture image at its stored size (about 160-240 px), with its instance masks at that size."""
  images = {}

  def add(image_id, pixels, named_masks, min_area=20):
    instances = [Instance(name, category, mask, style) for name, category, mask, style in named_masks
                 if mask.sum() >= min_area]
    images[image_id] = FixtureImage(image_id, np.ascontiguousarray(pixels), instances)

  # The cafeteria (VOC): 240x180, and its right part (x from 200 of 500) as another image at 160x200.
  rgb, voc_instances = _cafeteria_masks()
  small = _resize_image(rgb, 240, 180)
  add(CAFETERIA, small, [(n, c, _resize_mask(m, 240, 180), s) for n, c, m, s in voc_instances])
  crop = rgb[:, 200:]
  right = []
  for name, category, mask, style in voc_instances:
    inside = mask[:, 200:]
    if inside.sum() >= 0.5 * mask.sum() and style != CROWD:
      right.append((name, category, _resize_mask(inside, 160, 200), POLYGON))
  add(CAFETERIA_RIGHT, _resize_image(crop, 160, 200), right)

  # The astronaut (512x512 -> 200x200): the astronaut and the space shuttle model (COCO's 'airplane').
  astronaut = skimage.data.astronaut()
  person = _polygon_mask(_ASTRONAUT_PERSON, 512, 512)
  shuttle = _polygon_mask(_ASTRONAUT_SHUTTLE, 512, 512)
  add(ASTRONAUT, _resize_image(astronaut, 200, 200),
      [("astronaut", PERSON, _resize_mask(person, 200, 200), POLYGON),
       ("shuttle", AIRPLANE, _resize_mask(shuttle, 200, 200), RLE)])

  # Chelsea the cat (451x300 -> 240x160), and a mirrored crop of her right side as a second cat photo.
  cat_pixels = skimage.data.chelsea()
  cat = _polygon_mask(_CAT, 300, 451)
  add(CAT_PHOTO, _resize_image(cat_pixels, 240, 160), [("cat", CAT, _resize_mask(cat, 240, 160), POLYGON)])
  mirrored, mirrored_cat = cat_pixels[:, ::-1][:, :300], cat[:, ::-1][:, :300]
  add(CAT_MIRROR, _resize_image(np.ascontiguousarray(mirrored), 160, 160),
      [("cat", CAT, _resize_mask(mirrored_cat, 160, 160), RLE)])

  # Espresso (600x400 -> 240x160): the cup and the spoon; and a mirrored crop around the cup (300x330 -> 160x176).
  coffee = skimage.data.coffee()
  cup, spoon = _polygon_mask(_CUP, 400, 600), _polygon_mask(_SPOON, 400, 600)
  cup &= ~spoon  # the spoon lies in front of the cup's rim: each pixel belongs to one instance, as in COCO
  add(COFFEE, _resize_image(coffee, 240, 160),
      [("cup", CUP, _resize_mask(cup, 240, 160), POLYGON), ("spoon", SPOON, _resize_mask(spoon, 240, 160), POLYGON)])
  box = (slice(0, 330), slice(150, 450))
  flip = lambda a: np.ascontiguousarray(a[box][:, ::-1])  # noqa: E731
  add(COFFEE_MIRROR, _resize_image(flip(coffee), 160, 176),
      [("cup", CUP, _resize_mask(flip(cup), 160, 176), RLE), ("spoon", SPOON, _resize_mask(flip(spoon), 160, 176),
                                                                POLYGON)])

  # The rocket on its launch pad (640x427 -> 240x160): no COCO object at all (a no-target image).
  add(ROCKET, _resize_image(skimage.data.rocket(), 240, 160), [])

  next_id = 1001
  for image_id in sorted(images):
    for instance in images[image_id].instances:
      instance.ann_id = next_id
      next_id += 1
  return images


# ----------------------------------------------------------------------------------------------------------
# COCO encodings
# ----------------------------------------------------------------------------------------------------------


def _polygons(mask: np.ndarray) -> list[list[float]]:
  """COCO polygons [x0, y0, x1, y1, ...] tracing each component of `mask` (pixel-centre coordinates)."""
  padded = np.pad(mask.astype(np.uint8), 1)
  polygons = []
  for contour in skimage.measure.find_contours(padded, 0.5):
    contour = skimage.measure.approximate_polygon(contour - 1, tolerance=0.4)
    if len(contour) < 4:  # closed contours repeat the first point; a polygon needs 3 distinct points
      continue
    polygons.append([round(float(v), 2) for y, x in contour[:-1] for v in (x, y)])
  return polygons


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
  """COCO's iscrowd RLE: run lengths of the column-major flattened mask, starting with a run of zeros."""
  flat = np.asfortranarray(mask).reshape(-1, order="F").astype(np.uint8)
  change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
  counts = np.diff(np.concatenate([[0], change])).tolist()
  return {"size": list(mask.shape), "counts": counts}


def segmentation_of(instance: Instance) -> Any:
  """The instance's segmentation in its storage style."""
  mask = instance.mask
  if instance.style == POLYGON:
    return _polygons(mask)
  if instance.style == CROWD:
    return _uncompressed_rle(mask)
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
  """(H, W) bool mask of any COCO segmentation (what a reader of the fixture should get)."""
  if isinstance(segmentation, list):
    rles = mask_utils.frPyObjects(segmentation, height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)
  if isinstance(segmentation["counts"], list):
    segmentation = mask_utils.frPyObjects(segmentation, height, width)
  return mask_utils.decode(segmentation).astype(bool)


def coco_annotation(image: FixtureImage, instance: Instance) -> dict[str, Any]:
  segmentation = segmentation_of(instance)
  height, width = instance.mask.shape
  decoded = decode_segmentation(segmentation, height, width)
  rle = mask_utils.encode(np.asfortranarray(decoded.astype(np.uint8)))
  return {
      "segmentation": segmentation,
      "area": float(mask_utils.area(rle)),
      "iscrowd": int(instance.style == CROWD),
      "image_id": image.image_id,
      "bbox": [round(float(v), 2) for v in mask_utils.toBbox(rle)],
      "category_id": instance.category_id,
      "id": instance.ann_id,
  }


def coco_image(image: FixtureImage) -> dict[str, Any]:
  height, width = image.pixels.shape[:2]
  return {
      "license": 1, "file_name": image.file_name,
      "coco_url": f"http://images.cocodataset.org/train2014/{image.file_name}",
      "height": height, "width": width, "date_captured": "2013-11-14 16:28:13",
      "flickr_url": "", "id": image.image_id,
  }


def coco_instances(images: list[FixtureImage]) -> dict[str, Any]:
  """A COCO instances file (the layout of instances_train2014.json) over `images`."""
  return {
      "info": {"description": "omniris_jax test fixture in the COCO instances format (not COCO data)",
               "version": "1.0", "year": 2026},
      "licenses": [{"id": 1, "name": "see dummy_data/README.md", "url": ""}],
      "images": [coco_image(image) for image in images],
      "annotations": [coco_annotation(image, instance) for image in images for instance in image.instances],
      "categories": CATEGORIES,
  }


# ----------------------------------------------------------------------------------------------------------
# Referring expressions
# ----------------------------------------------------------------------------------------------------------


class SentenceIds:
  """Hands out sent_ids and ref_ids that are unique within one file, as the real files have."""

  def __init__(self, start: int):
    self.next_sent, self.next_ref = start, start

  def sentences(self, raws: list[str]) -> list[dict[str, Any]]:
    out = []
    for raw in raws:
      tokens = re.findall(r"[a-z0-9']+", raw.lower())
      out.append({"tokens": tokens, "raw": raw, "sent_id": self.next_sent, "sent": " ".join(tokens)})
      self.next_sent += 1
    return out

  def ref_id(self) -> int:
    self.next_ref += 1
    return self.next_ref - 1


def _ann_ids(image: FixtureImage, names: list[str]) -> list[int]:
  return [image.find(name).ann_id for name in names]


def _category_ids(image: FixtureImage, names: list[str]) -> list[int]:
  return sorted({image.find(name).category_id for name in names})


def _all_of(image: FixtureImage, category_id: int) -> list[str]:
  return [i.name for i in image.instances if i.category_id == category_id and i.style != CROWD]


def omniref_files(images: dict[int, FixtureImage]) -> tuple[dict, dict, dict]:
  """OmniRef.json, the split-keyed instances.json and SuppImageAnns.json of the release's format."""
  ids = SentenceIds(start=500)

  def base(split, image_id):
    image = images[image_id]
    height, width = image.pixels.shape[:2]
    return {"ref_id": ids.ref_id(), "image_id": image_id, "file_name": image.file_name, "height": height,
            "width": width, "split": split}

  def visual(split, image_id, category_id):
    """A visual ref: every instance of `category_id` in the target is the referent."""
    image = images[image_id]
    names = _all_of(image, category_id)
    return dict(base(split, image_id), ann_id=_ann_ids(image, names), category_id=category_id,
                categories=[category_id])

  def visual_absent(split, image_id, supp_image_id, supp_cat_ids):
    """A no-target visual ref: the reference shows a category (of supp_image_id) absent from the target."""
    image = images[image_id]
    for category_id in supp_cat_ids:
      assert not _all_of(image, category_id), (image_id, category_id)
    return dict(base(split, image_id), ann_id=[-1], category_id=-1, categories=[],
                supp_image_id=supp_image_id, supp_cat_ids=list(supp_cat_ids))

  def text(split, image_id, names, raws):
    image = images[image_id]
    ann_id = _ann_ids(image, names) if names else [-1]
    categories = _category_ids(image, names) if names else []
    return dict(base(split, image_id), ann_id=ann_id, category_id=categories[0] if categories else -1,
                categories=categories, sentences=ids.sentences(raws))

  refs = {
      "visual-train": [
          visual("visual-train", CAFETERIA, PERSON),
          visual("visual-train", CAFETERIA, CHAIR),
          visual("visual-train", CAT_PHOTO, CAT),
          visual("visual-train", COFFEE, CUP),
          visual("visual-train", ASTRONAUT, PERSON),
          visual_absent("visual-train", ROCKET, CAT_MIRROR, [CAT]),
      ],
      "visual-test": [
          visual("visual-test", CAFETERIA_RIGHT, PERSON),
          visual("visual-test", CAT_MIRROR, CAT),
          visual("visual-test", COFFEE_MIRROR, SPOON),
          visual_absent("visual-test", ASTRONAUT, COFFEE, [CUP, SPOON]),
      ],
      "text-test": [
          text("text-test", CAFETERIA, ["hat_man"],
               ["the man wearing a brown hat", "man in the middle with glasses and a hat"]),
          text("text-test", CAFETERIA, ["hat_man", "green_shirt_man"],
               ["the two men looking at the camera", "the man in the hat and the man in the green shirt"]),
          text("text-test", CAT_PHOTO, [], ["the dog lying on the sofa"]),
      ],
  }
  # Omni refs: a text ref plus `visual_data`, a visual ref on the same target image (its annotations are looked
  # up in the 'visual-test' instances, as the release's OmniRIS loader does).
  omni_visual = [
      visual("visual-test", COFFEE, CUP),
      visual("visual-test", ASTRONAUT, PERSON),
      visual_absent("visual-test", ROCKET, COFFEE_MIRROR, [CUP]),
  ]
  refs["omni-test"] = [
      dict(text("omni-test", COFFEE, ["spoon"], ["the spoon on the saucer", "the silver spoon next to the cup"]),
           visual_data=omni_visual[0]),
      dict(text("omni-test", ASTRONAUT, ["astronaut"], ["the smiling astronaut in the orange suit"]),
           visual_data=omni_visual[1]),
      dict(text("omni-test", ROCKET, [], ["the cat sitting next to the rocket"]), visual_data=omni_visual[2]),
  ]

  # instances.json of the release: one COCO dict per split with the images (and their annotations) its refs use.
  def touched(split_refs):
    image_ids = set()
    for ref in split_refs:
      image_ids.add(ref["image_id"])
    return [images[i] for i in sorted(image_ids)]

  visual_test_images = touched(refs["visual-test"] + omni_visual)
  instances = {
      "visual-train": coco_instances(touched(refs["visual-train"])),
      "visual-test": coco_instances(visual_test_images),
      "text-test": coco_instances(touched(refs["text-test"])),
      "omni-test": coco_instances(touched(refs["omni-test"])),
  }
  for split_instances in instances.values():
    del split_instances["info"], split_instances["licenses"]

  # SuppImageAnns: per category, one reference instance (the largest) of each image that has the category.
  supp: dict[str, list[dict[str, Any]]] = {}
  for image_id in sorted(images):
    image = images[image_id]
    height, width = image.pixels.shape[:2]
    for category in CATEGORIES:
      candidates = [i for i in image.instances if i.category_id == category["id"] and i.style != CROWD]
      if not candidates:
        continue
      largest = max(candidates, key=lambda i: int(i.mask.sum()))
      supp.setdefault(str(category["id"]), []).append({
          "image_id": image_id, "file_name": image.file_name, "height": height, "width": width,
          "annotations": coco_annotation(image, largest),
      })
  return refs, instances, supp


def grefcoco_refs(images: dict[int, FixtureImage]) -> list[dict[str, Any]]:
  """grefs(unc).json: gRefCOCO refs (ann_id always a list; [-1] and no_target=True when nothing is referred)."""
  ids = SentenceIds(start=2000)
  refs = []

  def ref(split, image_id, names, raws):
    image = images[image_id]
    ann_id = _ann_ids(image, names) if names else [-1]
    refs.append({
        "sent_ids": [], "file_name": f"COCO_train2014_{image_id:012d}_{ann_id[0]}.jpg" if names else
        image.file_name, "ann_id": ann_id, "ref_id": ids.ref_id(), "image_id": image_id, "split": split,
        "sentences": ids.sentences(raws), "category_id": _category_ids(image, names) if names else [-1],
        "no_target": not names,
    })
    refs[-1]["sent_ids"] = [s["sent_id"] for s in refs[-1]["sentences"]]

  ref("train", CAFETERIA, ["hat_man", "green_shirt_man", "man_back_to_camera"],
      ["the three men at the front table", "all three men sitting at the big table"])
  ref("train", CAFETERIA, ["bottle"], ["the purple water bottle"])
  ref("train", COFFEE, ["cup", "spoon"], ["the cup and the spoon"])
  ref("train", CAT_PHOTO, [], ["the bird on the cat's head"])
  ref("val", ASTRONAUT, ["astronaut", "shuttle"], ["the astronaut and the space shuttle behind her"])
  ref("val", ROCKET, [], ["the person standing by the launch tower"])
  ref("testA", CAFETERIA, ["hat_man", "green_shirt_man"], ["men facing the camera", "the two men looking at us"])
  ref("testA", ASTRONAUT, [], ["the man holding the helmet"])
  ref("testB", COFFEE_MIRROR, ["spoon"], ["the spoon"])
  ref("testB", COFFEE, [], ["the second cup on the right"])
  return refs


def refer_refs(images: dict[int, FixtureImage], dataset: str) -> list[dict[str, Any]]:
  """refs(unc).p / refs(umd).p of lichengunc/refer: one ann_id (an int) per ref, category_id an int."""
  ids = SentenceIds(start={"refcoco": 3000, "refcoco+": 4000, "refcocog": 5000}[dataset])
  refs = []

  def ref(split, image_id, name, raws):
    image = images[image_id]
    instance = image.find(name)
    sentences = ids.sentences(raws)
    refs.append({
        "sent_ids": [s["sent_id"] for s in sentences],
        "file_name": f"COCO_train2014_{image_id:012d}_{instance.ann_id}.jpg", "ann_id": instance.ann_id,
        "ref_id": ids.ref_id(), "image_id": image_id, "split": split, "sentences": sentences,
        "category_id": instance.category_id,
    })

  if dataset == "refcoco":  # short, often locational
    ref("train", CAFETERIA, "hat_man", ["man in hat", "middle guy with glasses"])
    ref("train", CAFETERIA, "green_shirt_man", ["right guy in green"])
    ref("train", CAFETERIA, "man_back_to_camera", ["left man back to us"])
    ref("val", CAFETERIA_RIGHT, "green_shirt_man", ["man on right", "green shirt"])
    ref("val", COFFEE, "spoon", ["spoon on right"])
    ref("testA", ASTRONAUT, "astronaut", ["woman in orange"])
    ref("testA", CAFETERIA, "standing_person_right", ["person standing in back right"])
    ref("testB", COFFEE, "cup", ["cup in middle"])
    ref("testB", CAT_PHOTO, "cat", ["cat"])
  elif dataset == "refcoco+":  # no location words: appearance only
    ref("train", CAFETERIA, "hat_man", ["man with brown hat and beard"])
    ref("train", CAFETERIA, "green_shirt_man", ["green shirt and cap", "guy in green"])
    ref("train", COFFEE, "spoon", ["silver spoon"])
    ref("val", CAFETERIA_RIGHT, "hat_man", ["hat and plaid shirt"])
    ref("val", ASTRONAUT, "shuttle", ["white space shuttle model"])
    ref("testA", ASTRONAUT, "astronaut", ["smiling woman in orange suit"])
    ref("testA", CAFETERIA, "man_back_to_camera", ["grey sweater"])
    ref("testB", COFFEE_MIRROR, "cup", ["red and white cup of espresso"])
    ref("testB", CAT_MIRROR, "cat", ["tabby cat with green eyes"])
  elif dataset == "refcocog":  # long, descriptive
    ref("train", CAFETERIA, "hat_man", ["a man with a beard wearing a brown hat and a plaid shirt, resting his "
                                        "chin on his hands"])
    ref("train", COFFEE, "cup", ["a red cup filled with espresso standing on a matching red saucer"])
    ref("train", CAT_PHOTO, "cat", ["a tabby cat with green eyes looking straight at the camera"])
    ref("val", ASTRONAUT, "astronaut", ["a smiling woman astronaut in an orange flight suit holding her helmet"])
    ref("val", CAFETERIA, "bottle", ["a purple water bottle standing on the table among the trays"])
    ref("test", COFFEE_MIRROR, "spoon", ["a small silver spoon lying on the saucer next to the cup"])
    ref("test", CAFETERIA, "green_shirt_man", ["a man in a green shirt and cap sitting at the right end of the "
                                               "table"])
  else:
    raise ValueError(f"{dataset=} must be one of refcoco, refcoco+, refcocog")
  return refs


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------


def _write_json(path: str, value) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(value, f, separators=(",", ":"))


def _write_pickle(path: str, value) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    pickle.dump(value, f, protocol=2)  # the released refs(*).p files are protocol-2 pickles (Python 2 era)


def write_fixture(out: str = DEFAULT_OUT) -> dict[str, int]:
  """Writes every fixture file under `out`; returns {relative path: size in bytes}."""
  images = make_images()
  image_dir = os.path.join(out, "train2014")
  os.makedirs(image_dir, exist_ok=True)
  for image in images.values():
    Image.fromarray(image.pixels).save(os.path.join(image_dir, image.file_name), format="JPEG", quality=88)

  everything = coco_instances([images[i] for i in sorted(images)])
  _write_json(os.path.join(out, "annotations", "instances_train2014.json"), everything)
  refs, split_instances, supp = omniref_files(images)
  _write_json(os.path.join(out, "omniref", "OmniRef.json"), refs)
  _write_json(os.path.join(out, "omniref", "instances.json"), split_instances)
  _write_json(os.path.join(out, "omniref", "SuppImageAnns.json"), supp)
  _write_json(os.path.join(out, "grefcoco", "grefs(unc).json"), grefcoco_refs(images))
  _write_json(os.path.join(out, "grefcoco", "instances.json"), everything)
  for dataset, split_by in (("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd")):
    _write_pickle(os.path.join(out, dataset, f"refs({split_by}).p"), refer_refs(images, dataset))
    _write_json(os.path.join(out, dataset, "instances.json"), everything)

  sizes = {}
  for root, _, files in os.walk(out):
    for name in files:
      path = os.path.join(root, name)
      sizes[os.path.relpath(path, out)] = os.path.getsize(path)
  return dict(sorted(sizes.items()))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=DEFAULT_OUT, help="where to write the fixture (default: dummy_data/)")
  args = parser.parse_args()
  sizes = write_fixture(args.out)
  for path, size in sizes.items():
    print(f"{size:9d}  {path}")
  print(f"{sum(sizes.values()):9d}  total")


if __name__ == "__main__":
  main()
