"""Tests of `omniref/rebuilt`: the paper's four-step construction, built through TFDS and read back.

The input is the dummy_data fixture (real formats, real pixels) repeated twelve times with renumbered ids
(`rebuilt.repeat_manual_dir`): the 8-image fixture alone has too few images per category to fill every split
once targets and references must be different images. The checks read the source files directly (json, pickle,
pycocotools), not through rebuilt.py, so they test the construction against the inputs: Step I criteria, the
split assignment (no image in two splits), Step II references, Step III text origins and the Step IV rules on
every built omni example; then determinism, the grain pipeline on every split, the build command's statistics
and the bad-input errors.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import shutil

import numpy as np
import pytest
from pycocotools import mask as mask_utils
import tensorflow_datasets as tfds

from omniris_jax.data import pipeline
from omniris_jax.data import prompts
from tfds_omniref.omniref import features as features_lib
from tfds_omniref.omniref import omniref_dataset_builder as builder_lib
from tfds_omniref.omniref import rebuilt

FIXTURE = os.path.join(os.path.dirname(builder_lib.__file__), "dummy_data")
COPIES = 12
SPLITS = {"train": 48, "text_test": 11, "visual_test": 15, "omni_test": 13}
_NO_GCS = dict(try_download_gcs=False)


def _build(data_dir, manual_dir) -> builder_lib.Builder:
  builder = builder_lib.Builder(config="rebuilt", data_dir=os.fspath(data_dir), file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir),
                                                                           **_NO_GCS))
  return builder


class Truth:
  """The source files read directly: COCO masks via pycocotools, expressions -> referents from the ref files."""

  def __init__(self, manual_dir):
    with open(os.path.join(manual_dir, rebuilt.COCO_INSTANCES)) as f:
      coco = json.load(f)
    self.images = {image["id"]: image for image in coco["images"]}
    self.anns = {ann["id"]: ann for ann in coco["annotations"]}
    self.categories = {c["id"]: c for c in coco["categories"]}
    self.by_image = collections.defaultdict(list)
    for ann in coco["annotations"]:
      self.by_image[ann["image_id"]].append(ann)
    with open(os.path.join(manual_dir, rebuilt.GREFCOCO_REFS)) as f:
      grefs = json.load(f)
    with open(os.path.join(manual_dir, rebuilt.REFCOCOG_REFS), "rb") as f:
      refcocog = pickle.load(f)
    # (image id, expression) -> (source, split, referent ann ids: [] for no target)
    self.expressions = {}
    for source, refs in (("grefcoco", grefs), ("refcocog", refcocog)):
      for ref in refs:
        ann_ids = [ref["ann_id"]] if isinstance(ref["ann_id"], int) else [a for a in ref["ann_id"] if a != -1]
        for sentence in ref["sentences"]:
          self.expressions[(ref["image_id"], sentence["sent"])] = (source, ref["split"], ann_ids)
    self.held_out = {image_id for (image_id, _), (source, split, _) in self.expressions.items()
                     if split in rebuilt.HELD_OUT_SPLITS[source]}

  def mask(self, ann_ids, image_id) -> np.ndarray:
    image = self.images[image_id]
    out = np.zeros((image["height"], image["width"]), np.uint8)
    for ann_id in ann_ids:
      segmentation = self.anns[ann_id]["segmentation"]
      if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, image["height"], image["width"]))
      elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, image["height"], image["width"])
      else:
        rle = segmentation
      out |= mask_utils.decode(rle).astype(np.uint8)
    return out

  def instances(self, image_id, category_id) -> list[int]:
    """Non-crowd instances of a category on an image."""
    return sorted(a["id"] for a in self.by_image[image_id] if a["category_id"] == category_id and not a["iscrowd"])

  def category_ids(self, image_id) -> set[int]:
    return {a["category_id"] for a in self.by_image[image_id]}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  manual_dir = tmp_path_factory.mktemp("manual")
  rebuilt.repeat_manual_dir(FIXTURE, os.fspath(manual_dir), COPIES)
  data_dir = tmp_path_factory.mktemp("tfds")
  builder = _build(data_dir, manual_dir)
  examples = {split: [features_lib.readable(e) for e in builder.as_data_source(split=split)] for split in SPLITS}
  return manual_dir, data_dir, builder, examples, Truth(os.fspath(manual_dir))


def _all(examples):
  return [e for split in SPLITS for e in examples[split]]


def _visual_referents(truth: Truth, e: dict) -> list[int]:
  return [] if e["no_target"] and e["modality"] == "visual" else truth.instances(e["image_id"], e["ref_category_id"])


# ----------------------------------------------------------------------------------------------------------
# Counts, splits, Step I
# ----------------------------------------------------------------------------------------------------------


def test_split_counts_are_exact(built):
  _, _, builder, examples, _ = built
  assert {name: info.num_examples for name, info in builder.info.splits.items()} == SPLITS
  assert {split: len(rows) for split, rows in examples.items()} == SPLITS
  assert builder.builder_config.name == "rebuilt"


def test_no_image_is_in_two_splits_and_references_are_never_targets(built):
  _, _, _, examples, _ = built
  targets = {split: {e["image_id"] for e in rows} for split, rows in examples.items()}
  references = {split: {e["ref_image_id"] for e in rows} - {-1} for split, rows in examples.items()}
  names = list(SPLITS)
  for i, first in enumerate(names):
    for second in names[i + 1:]:
      assert not (targets[first] | references[first]) & (targets[second] | references[second]), (first, second)
  all_targets = set().union(*targets.values())
  assert not all_targets & set().union(*references.values())
  assert all(targets[split] for split in SPLITS) and references["train"] and references["omni_test"]


def test_target_images_pass_step_one_and_train_avoids_held_out_benchmark_images(built):
  _, _, _, examples, truth = built
  config = rebuilt.RebuiltConfig()
  for split, rows in examples.items():
    for image_id in {e["image_id"] for e in rows}:
      image, anns = truth.images[image_id], truth.by_image[image_id]
      area = image["height"] * image["width"]
      obvious = [a for a in anns if not a["iscrowd"] and a["area"] >= config.min_instance_area * area]
      assert len(obvious) >= config.min_instances and len({a["category_id"] for a in obvious}) >= 2, image_id
      x0 = min(a["bbox"][0] for a in obvious)
      x1 = max(a["bbox"][0] + a["bbox"][2] for a in obvious)
      y0 = min(a["bbox"][1] for a in obvious)
      y1 = max(a["bbox"][1] + a["bbox"][3] for a in obvious)
      assert (x1 - x0) * (y1 - y0) >= config.min_spread * area, image_id
      assert (image_id in truth.held_out) == (split != "train"), (split, image_id)


def test_step_one_criteria_on_the_fixture_photos():
  sources = rebuilt.load(FIXTURE)
  rich = {i for i in sources.images if rebuilt.is_rich(sources.images[i], sources.anns_by_image[i], sources.config)}
  # cafeteria (4 categories), astronaut + shuttle, cup + spoon (x2), cafeteria crop; not: cat (1 category),
  # rocket (no instance), mirrored cat.
  assert rich == {101, 102, 104, 106, 108}
  stricter = rebuilt.RebuiltConfig(min_spread=0.35, min_instances=3)
  assert {i for i in sources.images if rebuilt.is_rich(sources.images[i], sources.anns_by_image[i], stricter)} == {
      101, 106}  # cup + spoon sit together (spread 0.32); two instances are too few


# ----------------------------------------------------------------------------------------------------------
# Prompts and the Step IV rules, on the built examples
# ----------------------------------------------------------------------------------------------------------


def test_modalities_settings_and_prompt_types_per_split(built):
  _, _, _, examples, _ = built
  assert {e["modality"] for e in examples["train"]} == {"visual"}
  for split in ("text_test", "visual_test", "omni_test"):
    assert {e["modality"] for e in examples[split]} == {rebuilt.SPLIT_MODALITY[split]}, split
  assert {e["prompt_type"] for e in examples["text_test"]} == {"none"}
  for split in ("visual_test", "omni_test"):
    assert [e["prompt_type"] for e in examples[split]] == [("mask", "box", "scribble")[i % 3]
                                                           for i in range(len(examples[split]))]
  for split, rows in examples.items():  # every split has single-, multi- and no-target examples
    expected = ({"many_vs_one", "many_vs_many", "no_target"} if split == "omni_test"
                else {"one_vs_one", "one_vs_many", "no_target"})
    assert {e["setting"] for e in rows} == expected, split


def test_text_prompts_come_from_held_out_grefcoco_and_long_refcocog(built):
  _, _, _, examples, truth = built
  for e in examples["text_test"] + examples["omni_test"]:
    source, split, ann_ids = truth.expressions[(e["image_id"], e["text"])]
    assert split in rebuilt.HELD_OUT_SPLITS[source], e["id"]
    np.testing.assert_array_equal(e["text_mask"][..., 0], truth.mask(ann_ids, e["image_id"]), err_msg=e["id"])
    if source == "refcocog":  # single-target, long
      assert len(ann_ids) == 1 and len(e["text"].split()) >= rebuilt.RebuiltConfig().min_long_text_words, e["id"]
    else:  # multi-target or no-target
      assert len(ann_ids) != 1, e["id"]


def test_visual_referent_is_every_instance_of_the_reference_category(built):
  _, _, _, examples, truth = built
  for e in _all(examples):
    if e["ref_image_id"] == -1:
      continue
    ref_category_anns = truth.instances(e["ref_image_id"], e["ref_category_id"])
    assert any(np.array_equal(e["ref_mask"][..., 0], truth.mask([a], e["ref_image_id"])) for a in ref_category_anns)
    np.testing.assert_array_equal(e["ref_box"], prompts.box_from_mask(e["ref_mask"]), err_msg=e["id"])
    assert e["ref_scribble"].any() and np.all(e["ref_mask"][e["ref_scribble"] == 1] == 1), e["id"]
    target_instances = truth.instances(e["image_id"], e["ref_category_id"])
    np.testing.assert_array_equal(e["visual_mask"][..., 0], truth.mask(target_instances, e["image_id"]),
                                  err_msg=e["id"])
    if e["modality"] == "visual":
      expected = ("no_target" if not target_instances else "one_vs_one" if len(target_instances) == 1
                  else "one_vs_many")
      assert e["setting"] == expected, e["id"]


def test_omni_examples_follow_the_step_four_rules(built):
  _, _, _, examples, truth = built
  seen = set()
  for e in examples["omni_test"]:
    image_id = e["image_id"]
    _, _, text_anns = truth.expressions[(image_id, e["text"])]
    visual_anns = truth.instances(image_id, e["ref_category_id"])
    category = lambda a: truth.anns[a]["category_id"]  # noqa: E731
    if e["setting"] == "many_vs_one":  # single target: the same instance, the only one of its category
      assert text_anns == visual_anns and len(text_anns) == 1, e["id"]
      assert truth.instances(image_id, category(text_anns[0])) == text_anns, e["id"]
      np.testing.assert_array_equal(e["text_mask"], e["visual_mask"])
    elif e["setting"] == "many_vs_many":  # different categories, or jointly all instances of the shared one
      assert text_anns and visual_anns, e["id"]
      shared = {category(a) for a in text_anns} & {e["ref_category_id"]}
      for c in shared:
        assert set(truth.instances(image_id, c)) <= set(text_anns) | set(visual_anns), e["id"]
      assert len(set(text_anns) | set(visual_anns)) >= 2, e["id"]
    else:  # no target: both referents absent
      assert e["setting"] == "no_target" and not text_anns and not visual_anns, e["id"]
    seen.add(e["setting"])
    np.testing.assert_array_equal(e["mask"], e["text_mask"] | e["visual_mask"], err_msg=e["id"])
  assert seen == {"many_vs_one", "many_vs_many", "no_target"}


def test_no_target_examples_have_empty_masks_and_absent_categories(built):
  _, _, _, examples, truth = built
  count = 0
  for e in _all(examples):
    assert e["no_target"] == (e["setting"] == "no_target") == (not e["mask"].any()), e["id"]
    if not e["no_target"]:
      assert len(e["category_ids"]) > 0, e["id"]
      continue
    count += 1
    assert not e["text_mask"].any() and not e["visual_mask"].any() and len(e["category_ids"]) == 0, e["id"]
    if e["ref_category_id"] != -1:
      assert e["ref_category_id"] not in truth.category_ids(e["image_id"]), e["id"]
    if e["text"]:
      source, _, ann_ids = truth.expressions[(e["image_id"], e["text"])]
      assert source == "grefcoco" and not ann_ids, e["id"]
  assert count >= 10


def test_omni_rule_function_accepts_and_rejects_as_the_paper_says():
  by_category = {1: [10, 11, 12], 2: [20], 3: [30, 31]}
  category_of = {a: c for c, anns in by_category.items() for a in anns}
  kind = lambda text, visual: rebuilt.omni_target_kind(text, visual, by_category, category_of)  # noqa: E731
  assert kind([20], [20]) == "single"  # the same instance, the only one of its category
  assert kind([10], [10]) is None  # the same instance, but category 1 has others
  assert kind([10, 11], [30, 31]) == "multi"  # different categories
  assert kind([10], [10, 11, 12]) == "multi"  # same category, jointly all of its instances
  assert kind([10], [11]) is None  # same category, instance 12 left out
  assert kind([], []) == "no_target"
  assert kind([20], []) is None and kind([], [30, 31]) is None  # one present, one absent


# ----------------------------------------------------------------------------------------------------------
# Determinism, parallel generation, reading, statistics
# ----------------------------------------------------------------------------------------------------------


def test_building_twice_gives_identical_files(built, tmp_path):
  manual_dir, data_dir, _, _, _ = built
  _build(tmp_path, manual_dir)
  names = sorted(p.name for p in (tmp_path / "omniref" / "rebuilt" / str(builder_lib.Builder.VERSION)).iterdir() if "array_record" in p.name)
  assert len(names) == len(SPLITS)
  for name in names:
    assert ((data_dir / "omniref" / "rebuilt" / str(builder_lib.Builder.VERSION) / name).read_bytes() ==
            (tmp_path / "omniref" / "rebuilt" / str(builder_lib.Builder.VERSION) / name).read_bytes()), name


def test_worker_processes_give_the_same_examples_in_the_same_order(built):
  manual_dir, _, _, _, _ = built
  sources = rebuilt.load(os.fspath(manual_dir))
  rows = rebuilt.plan(sources).examples["train"]
  serial = list(rebuilt.encoded_examples(sources, rows, workers=1))
  parallel = list(rebuilt.encoded_examples(sources, rows, workers=2))
  assert [key for key, _ in serial] == [key for key, _ in parallel]
  assert all(a["image"] == b["image"] and a["ref_scribble"] == b["ref_scribble"] for (_, a), (_, b) in
             zip(serial, parallel))


def test_cached_image_pngs_equal_plain_encoding(built):
  manual_dir, _, _, _, _ = built
  sources = rebuilt.load(os.fspath(manual_dir))
  rows = rebuilt.plan(sources).examples["omni_test"]
  plain = [features_lib.encode_example(e) for e in rebuilt.generate_split(sources, rows)]
  cached = [e for _, e in rebuilt.encoded_examples(sources, rows, workers=1)]
  assert len({e["image_id"] for e in plain}) < len(plain)  # images recur, so the cache is hit
  for a, b in zip(plain, cached, strict=True):
    assert a["image"] == b["image"] and a["ref_image"] == b["ref_image"] and a["mask"] == b["mask"], a["id"]


@pytest.mark.parametrize("split", list(SPLITS))
def test_the_grain_pipeline_draws_a_batch_from_every_split(built, split):
  _, data_dir, _, _, _ = built
  source = pipeline.from_tfds("omniref/rebuilt", split, data_dir=os.fspath(data_dir))
  batch = next(iter(pipeline.make_dataset(source, resolution=32, batch_size=2, shuffle=False, num_epochs=1,
                                          read_threads=0)))
  assert batch["image"].shape[:3] == (2, 32, 32) and batch["mask"].shape[:3] == (2, 32, 32)
  assert list(batch["modality"]) == [source[i]["modality"] for i in range(2)]


def test_build_command_prints_the_fig4_statistics(built, capsys):
  from tfds_omniref import build  # pylint: disable=g-import-not-at-top
  manual_dir, data_dir, _, _, _ = built
  build.main(["--config", "rebuilt", "--data_dir", os.fspath(data_dir), "--manual_dir", os.fspath(manual_dir),
              "--stats"])
  out = capsys.readouterr().out
  assert "'omni_test': 13" in out
  assert "| train | 16 | 20 | 48 |" in out  # target images, reference images, prompts
  assert "| omni_test | 13 | 0 | 0 | 13 | 4 | 6 | 3 |" in out  # examples, modalities, single/multi/no-target


def test_plan_statistics_match_the_built_counts(built):
  manual_dir, _, _, examples, _ = built
  stats = rebuilt.plan_statistics(rebuilt.plan(rebuilt.load(os.fspath(manual_dir))))
  for split, rows in examples.items():
    assert stats[split]["examples"] == len(rows)
    assert stats[split]["no_target"] == sum(e["no_target"] for e in rows)


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", [rebuilt.GREFCOCO_REFS, rebuilt.REFCOCOG_REFS, rebuilt.COCO_INSTANCES])
def test_a_missing_manual_file_names_the_file_and_where_to_get_it(built, tmp_path, missing):
  manual_dir = built[0]
  copy = tmp_path / "manual"
  shutil.copytree(manual_dir, copy)
  os.remove(copy / missing)
  with pytest.raises(FileNotFoundError, match=r"(?s)" + missing.replace("(", r"\(").replace(")", r"\)") +
                     ".*How to get them.*images.cocodataset.org"):
    _build(tmp_path / "tfds", copy)
  dataset_dir = tmp_path / "tfds" / "omniref" / "rebuilt"
  assert not dataset_dir.exists() or not list(dataset_dir.iterdir())


def test_a_ref_naming_an_unknown_annotation_names_the_file_the_ref_and_the_field(tmp_path):
  rebuilt.repeat_manual_dir(FIXTURE, os.fspath(tmp_path), 1)
  path = tmp_path / rebuilt.GREFCOCO_REFS
  refs = json.loads(path.read_text())
  refs[2]["ann_id"] = [1022, 999999]
  path.write_text(json.dumps(refs))
  with pytest.raises(rebuilt.MalformedRecordError, match=r"grefs\(unc\)\.json: ref_id=2002: field 'ann_id' names "
                     r"annotation 999999"):
    rebuilt.load(os.fspath(tmp_path))


def test_sources_too_small_for_a_split_fail_before_writing(tmp_path):
  with pytest.raises(ValueError, match=r"(?s)split\(s\) \['train', 'visual_test'\] empty.*train needs rich images"):
    _build(tmp_path, FIXTURE)  # the fixture as it is: no train-only rich image
  dataset_dir = tmp_path / "omniref" / "rebuilt"
  assert not dataset_dir.exists() or not list(dataset_dir.iterdir())


def test_bad_parameters_fail_clearly():
  with pytest.raises(ValueError, match="min_spread"):
    rebuilt.RebuiltConfig(min_spread=1.5)
  with pytest.raises(ValueError, match="reference_split_weights"):
    rebuilt.RebuiltConfig(reference_split_weights=(("train", 1),))
  with pytest.raises(ValueError, match="RebuiltConfig"):
    builder_lib.OmnirefConfig(name="rebuilt_broken", source="rebuilt")
