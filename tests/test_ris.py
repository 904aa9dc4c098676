"""Tests of the `ris` TFDS builder (gRefCOCO, RefCOCO, RefCOCO+, RefCOCOg) built from the real-format fixture.

The fixture is tfds_omniref/omniref/dummy_data/, laid out as the manual directory. As for the omniref builder,
`tfds.testing.DatasetBuilderTestCase` cannot run without TensorFlow; these tests make its checks (registration,
exact split counts, examples that match the features) through `as_data_source`, and compare the content with
independent readers: masks with pycocotools' own `COCO.annToMask`, refs with plain `json`/`pickle` loads,
images with PIL.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import pickle
import shutil

import numpy as np
from PIL import Image
from pycocotools import coco as coco_lib
import pytest
import tensorflow_datasets as tfds

from omniris_jax.data import pipeline
from tfds_omniref.omniref import features as features_lib
from tfds_omniref.ris import refer_files
from tfds_omniref.ris import ris_dataset_builder as builder_lib

DUMMY = os.path.join(os.path.dirname(features_lib.__file__), "dummy_data")
# Sentences per split, counted by hand from dummy_data/README.md (one example per sentence).
COUNTS = {
    "grefcoco": {"train": 5, "val": 2, "testA": 3, "testB": 2},
    "refcoco": {"train": 4, "val": 3, "testA": 2, "testB": 2},
    "refcoco_plus": {"train": 4, "val": 2, "testA": 2, "testB": 2},
    "refcocog": {"train": 3, "val": 2, "test": 2},
}
FILES = {"grefcoco": "grefcoco/grefs(unc).json", "refcoco": "refcoco/refs(unc).p",
         "refcoco_plus": "refcoco+/refs(unc).p", "refcocog": "refcocog/refs(umd).p"}


def _raw_refs(config: str) -> list[dict]:
  """The refs file read the way refer / ReLA read it (plain pickle / json), independently of refer_files."""
  path = os.path.join(DUMMY, FILES[config])
  with open(path, "rb") as file:
    return json.load(file) if path.endswith(".json") else pickle.load(file)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  examples = {}
  for config in COUNTS:
    builder = builder_lib.build(config, data_dir=str(data_dir), manual_dir=DUMMY)
    examples[config] = {split: [features_lib.readable(e) for e in builder.as_data_source(split=split)] for split in COUNTS[config]}
  return str(data_dir), examples


@pytest.fixture(scope="module")
def coco():
  with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress
    return coco_lib.COCO(os.path.join(DUMMY, "grefcoco", "instances.json"))


# ----------------------------------------------------------------------------------------------------------
# What DatasetBuilderTestCase checks
# ----------------------------------------------------------------------------------------------------------


def test_builder_is_registered_with_its_configs():
  assert builder_lib.Builder.name == "ris"
  assert tfds.builder_cls("ris") is builder_lib.Builder
  assert [c.name for c in builder_lib.Builder.BUILDER_CONFIGS] == list(COUNTS)
  assert "train2014" in builder_lib.Builder.MANUAL_DOWNLOAD_INSTRUCTIONS


@pytest.mark.parametrize("config", list(COUNTS))
def test_every_config_builds_with_exact_split_counts(built, config):
  data_dir, examples = built
  builder = builder_lib.Builder(config=config, data_dir=data_dir)
  assert {name: split.num_examples for name, split in builder.info.splits.items()} == COUNTS[config]
  assert {split: len(rows) for split, rows in examples[config].items()} == COUNTS[config]
  assert set(builder.info.features.keys()) == features_lib.feature_names()
  assert "GRES" in builder.info.citation


@pytest.mark.parametrize("config", list(COUNTS))
def test_one_example_per_sentence_in_file_order_with_the_raw_text(built, config):
  _, examples = built
  for split in COUNTS[config]:
    expected = [(f"{config}/{split}/{ref['ref_id']}/{s['sent_id']}", s["raw"], ref["image_id"])
                for ref in _raw_refs(config) if ref["split"] == split for s in ref["sentences"]]
    assert [(e["id"], e["text"], e["image_id"]) for e in examples[config][split]] == expected


@pytest.mark.parametrize("config", list(COUNTS))
def test_masks_are_pycocotools_decodings_of_the_ref_annotations(built, coco, config):
  _, examples = built
  refs = {ref["ref_id"]: ref for ref in _raw_refs(config)}
  for split in COUNTS[config]:
    for e in examples[config][split]:
      ref = refs[int(e["id"].split("/")[2])]
      ann_ids = ref["ann_id"] if isinstance(ref["ann_id"], list) else [ref["ann_id"]]
      info = coco.imgs[ref["image_id"]]
      expected = np.zeros((info["height"], info["width"]), np.uint8)
      if ann_ids != [-1]:
        for ann_id in ann_ids:  # the union of the instances (fixture refs refer to no crowd regions)
          expected |= coco.annToMask(coco.anns[ann_id])
      assert expected.any() == (ann_ids != [-1]), e["id"]
      np.testing.assert_array_equal(e["mask"][..., 0], expected, err_msg=e["id"])
      np.testing.assert_array_equal(e["text_mask"], e["mask"], err_msg=e["id"])
      want_setting = {0: "no_target", 1: "one_vs_one"}.get(len(ann_ids) - (ann_ids == [-1]), "one_vs_many")
      assert e["setting"] == want_setting, e["id"]
      categories = sorted({coco.anns[a]["category_id"] for a in ann_ids if a != -1})
      assert list(e["category_ids"]) == categories, e["id"]


def test_grefcoco_has_multi_target_and_no_target_refs_and_their_fields(built):
  _, examples = built
  rows = [e for split in COUNTS["grefcoco"] for e in examples["grefcoco"][split]]
  no_target = [e for e in rows if e["no_target"]]
  assert {e["id"].split("/")[2] for e in no_target} == {"2003", "2005", "2007", "2009"}  # ann_id [-1]
  for e in no_target:
    assert not e["mask"].any() and not e["text_mask"].any(), e["id"]
    assert e["setting"] == "no_target" and len(e["category_ids"]) == 0, e["id"]
  settings = collections.Counter(e["setting"] for e in rows)
  assert settings == {"one_vs_many": 6, "no_target": 4, "one_vs_one": 2}


@pytest.mark.parametrize("config", list(COUNTS))
def test_examples_are_text_examples_with_placeholder_visual_fields(built, config):
  _, examples = built
  for split in COUNTS[config]:
    for e in examples[config][split]:
      assert (e["modality"], e["prompt_type"]) == ("text", "none"), e["id"]
      assert e["ref_image"].shape == (1, 1, 3) and not e["ref_image"].any(), e["id"]
      for key in ("ref_mask", "ref_box", "ref_scribble"):
        assert e[key].shape == (1, 1, 1) and not e[key].any(), (e["id"], key)
      assert e["ref_image_id"] == -1 and e["ref_category_id"] == -1, e["id"]
      assert e["visual_mask"].shape == e["mask"].shape and not e["visual_mask"].any(), e["id"]
      assert e["no_target"] == (not e["mask"].any()), e["id"]
      if config != "grefcoco":
        assert e["setting"] == "one_vs_one" and not e["no_target"], e["id"]


def test_images_are_the_coco_files_pixels(built, coco):
  _, examples = built
  for e in examples["grefcoco"]["val"] + examples["refcocog"]["test"]:
    path = os.path.join(DUMMY, "train2014", coco.imgs[e["image_id"]]["file_name"])
    with Image.open(path) as image:
      np.testing.assert_array_equal(e["image"], np.asarray(image.convert("RGB")), err_msg=e["id"])


def test_grayscale_image_is_stored_as_rgb(tmp_path, coco):
  manual = _manual_copy(tmp_path, "refcocog")
  path = os.path.join(manual, "train2014", coco.imgs[101]["file_name"])
  with Image.open(path) as image:
    image.convert("L").save(path, format="JPEG")
  with Image.open(path) as image:
    assert image.mode == "L"
    gray = np.asarray(image)
  builder = builder_lib.build("refcocog", data_dir=str(tmp_path / "tfds"), manual_dir=manual)
  example = next(e for e in builder.as_data_source(split="train") if e["image_id"] == 101)
  assert example["image"].shape == (180, 240, 3)
  np.testing.assert_array_equal(example["image"], np.repeat(gray[..., None], 3, axis=-1))


@pytest.mark.parametrize("config, split", [("grefcoco", "val"), ("refcoco", "testA"), ("refcoco_plus", "testB"),
                                           ("refcocog", "test")])
def test_the_grain_pipeline_draws_a_batch(built, config, split):
  data_dir, examples = built
  source = pipeline.from_tfds(f"ris/{config}", split, data_dir)
  dataset = pipeline.make_dataset(source, resolution=32, batch_size=2, max_text_len=12, shuffle=False,
                                  num_epochs=1, drop_remainder=False, read_threads=0)
  batch = next(iter(dataset))
  assert batch["image"].shape == (2, 32, 32, 3) and batch["mask"].shape == (2, 32, 32)
  assert batch["has_text"].all() and not batch["has_visual"].any()
  assert list(batch["no_target"]) == [e["no_target"] for e in examples[config][split][:2]]
  assert batch["text_attention_mask"][:, 0].all()


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------


def _manual_copy(tmp_path, folder: str) -> str:
  """A manual directory with train2014/ and one dataset folder copied from the fixture, for breaking."""
  manual = tmp_path / "manual"
  shutil.copytree(os.path.join(DUMMY, "train2014"), manual / "train2014")
  shutil.copytree(os.path.join(DUMMY, folder), manual / folder)
  return str(manual)


def _assert_nothing_written(data_dir, config: str) -> None:
  dataset_dir = os.path.join(data_dir, "ris", config)
  leftovers = os.listdir(dataset_dir) if os.path.exists(dataset_dir) else []
  assert leftovers == [], f"half-written data left in {dataset_dir}: {leftovers}"


def test_missing_file_names_the_file_and_the_instructions(tmp_path):
  manual = _manual_copy(tmp_path, "refcoco")
  os.remove(os.path.join(manual, "refcoco", "refs(unc).p"))
  with pytest.raises(FileNotFoundError, match=r"(?s)refcoco/refs\(unc\)\.p, which does not exist.*refcoco\.zip"):
    builder_lib.build("refcoco", data_dir=str(tmp_path / "tfds"), manual_dir=manual)
  with pytest.raises(FileNotFoundError, match=r"(?s)grefcoco/grefs\(unc\)\.json.*Put these files"):
    builder_lib.build("grefcoco", data_dir=str(tmp_path / "tfds"), manual_dir=manual)
  shutil.copy(os.path.join(DUMMY, "refcoco", "refs(unc).p"), os.path.join(manual, "refcoco"))
  shutil.rmtree(os.path.join(manual, "train2014"))
  with pytest.raises(FileNotFoundError, match=r"(?s)No COCO train2014 image folder.*train2014\.zip"):
    builder_lib.build("refcoco", data_dir=str(tmp_path / "tfds"), manual_dir=manual)
  with pytest.raises(AssertionError, match=r"(?s)does not exist or is empty.*refcoco\+\.zip"):  # TFDS's check
    builder_lib.build("refcoco", data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "nowhere"))
  _assert_nothing_written(tmp_path / "tfds", "refcoco")


def _rewrite_grefs(manual: str, edit) -> None:
  path = os.path.join(manual, "grefcoco", "grefs(unc).json")
  with open(path) as file:
    refs = json.load(file)
  edit(refs)
  with open(path, "w") as file:
    json.dump(refs, file)


def _rewrite_pickle(manual: str, folder: str, name: str, edit) -> None:
  path = os.path.join(manual, folder, name)
  with open(path, "rb") as file:
    refs = pickle.load(file)
  edit(refs)
  with open(path, "wb") as file:
    pickle.dump(refs, file, protocol=2)


def _ref(refs, ref_id):
  return next(r for r in refs if r["ref_id"] == ref_id)


@pytest.mark.parametrize("config, edit, error, message", [
    ("grefcoco", lambda m: _rewrite_grefs(m, lambda refs: _ref(refs, 2004).pop("sentences")), ValueError,
     r"grefcoco/grefs\(unc\)\.json: ref_id=2004 has no field 'sentences'"),
    ("refcoco", lambda m: _rewrite_pickle(m, "refcoco", "refs(unc).p", lambda refs: _ref(refs, 3000).update(
        ann_id=99999)), ValueError,
     r"refcoco/refs\(unc\)\.p: ref_id=3000 field 'ann_id': annotation 99999 is not in .*refcoco/instances\.json"),
    ("grefcoco", lambda m: _rewrite_grefs(m, lambda refs: _ref(refs, 2004)["ann_id"].append(-1)), ValueError,
     r"ref_id=2004 field 'ann_id' mixes -1"),
    ("refcocog", lambda m: _rewrite_pickle(m, "refcocog", "refs(umd).p", lambda refs: _ref(refs, 5000).update(
        split="testA")), ValueError, r"ref_id=5000 field 'split' is 'testA'; expected one of \['train', 'val', "
                                     r"'test'\]"),
    ("refcocog", lambda m: os.remove(os.path.join(m, "train2014", "COCO_train2014_000000000104.jpg")),
     FileNotFoundError, r"refcocog/refs\(umd\)\.p: ref_id=\d+: the file of image 104 \(field 'file_name' in "
                        r".*instances\.json\) is missing: .*COCO_train2014_000000000104\.jpg"),
])
def test_malformed_record_names_the_file_the_ref_and_the_field(tmp_path, config, edit, error, message):
  folder = FILES[config].split("/")[0]
  manual = _manual_copy(tmp_path, folder)
  edit(manual)
  with pytest.raises(error, match=message):
    builder_lib.build(config, data_dir=str(tmp_path / "tfds"), manual_dir=manual)
  _assert_nothing_written(tmp_path / "tfds", config)


def test_segmentation_that_does_not_decode_fails_mid_build_and_leaves_nothing(tmp_path):
  manual = _manual_copy(tmp_path, "refcocog")
  path = os.path.join(manual, "refcocog", "instances.json")
  with open(path) as file:
    instances = json.load(file)
  target = _ref(pickle.load(open(os.path.join(manual, "refcocog", "refs(umd).p"), "rb")), 5004)  # a test ref
  next(a for a in instances["annotations"] if a["id"] == target["ann_id"])["segmentation"] = [[3.0, 4.0]]
  with open(path, "w") as file:
    json.dump(instances, file)
  with pytest.raises(ValueError, match=rf"refs\(umd\)\.p: ref_id=5004: annotation {target['ann_id']} field "
                                       r"'segmentation' does not decode"):
    builder_lib.build("refcocog", data_dir=str(tmp_path / "tfds"), manual_dir=manual)
  _assert_nothing_written(tmp_path / "tfds", "refcocog")


def test_refs_pickle_that_would_run_code_is_refused(tmp_path):
  path = tmp_path / "refs(unc).p"
  path.write_bytes(pickle.dumps([{"ref_id": 1, "run": os.getcwd}], protocol=2))
  with pytest.raises(ValueError, match=r"not a readable refs file .*refers to \w+\.getcwd"):
    refer_files.load_ref_records(str(path))


def test_crowd_regions_stay_out_of_a_multi_target_union(coco):
  instances = refer_files.load_instances(os.path.join(DUMMY, "grefcoco", "instances.json"))
  ref = refer_files.Ref(ref_id=1, image_id=101, split="val", ann_ids=(1015, 1018), sentences=())
  mask, used = refer_files.target_mask(ref, instances=instances, where="test")
  assert coco.anns[1018]["iscrowd"] == 1 and [a["id"] for a in used] == [1015]
  np.testing.assert_array_equal(mask, coco.annToMask(coco.anns[1015]))
  crowd_only = refer_files.Ref(ref_id=2, image_id=101, split="val", ann_ids=(1018,), sentences=())
  mask, used = refer_files.target_mask(crowd_only, instances=instances, where="test")
  np.testing.assert_array_equal(mask, coco.annToMask(coco.anns[1018]))


def test_unknown_config_and_split_fail_clearly(tmp_path):
  with pytest.raises(ValueError, match=r"known configs: \['grefcoco', 'refcoco', 'refcoco_plus', 'refcocog'\]"):
    builder_lib.Builder(config="refcoco+", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="its splits are"):
    builder_lib.data_source("refcocog", "testA", data_dir=str(tmp_path), manual_dir=DUMMY)


def test_python2_refs_pickle_reads_as_text(tmp_path):
  # The real refs(unc).p files were pickled by Python 2, whose `str` is bytes (opcode SHORT_BINSTRING 'U'), which
  # Python 3 cannot write; these are the opcodes of `[{'ref_id': 7, 'raw': 'caf\xc3\xa9'}]` pickled by Python 2.
  def short(data: bytes) -> bytes:
    return b"U" + bytes([len(data)]) + data
  body = b"\x80\x02]q\x00}q\x01(" + short(b"ref_id") + b"K\x07" + short(b"raw") + short("café".encode()) + b"ua."
  path = tmp_path / "refs(unc).p"
  path.write_bytes(body)
  assert refer_files.load_ref_records(str(path)) == [{"ref_id": 7, "raw": "café"}]
