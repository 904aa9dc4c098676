"""Tests of the `omniref` TFDS builder on its `shapes_tiny` config, read back the way the pipeline reads it.

`tfds.testing.DatasetBuilderTestCase` cannot run here: it reads through `as_dataset` (tf.data) and imports
TensorFlow and dill, and this project builds and reads without TensorFlow. These tests make the same checks
(registration, info, exact split counts, splits that do not overlap, examples that match the features) through
`as_data_source`, plus the OmniRIS content rules and the bad-input behaviour.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from omniris_jax.data import prompts
from tfds_omniref.omniref import features as features_lib
from tfds_omniref.omniref import omniref_dataset_builder as builder_lib
from tfds_omniref.omniref import shapes as shapes_lib

SPLITS = {"train": 18, "text_test": 9, "visual_test": 9, "omni_test": 9}
_NO_GCS = tfds.download.DownloadConfig(try_download_gcs=False)
_SINGLE, _MULTI = {"one_vs_one", "many_vs_one"}, {"one_vs_many", "many_vs_many"}


def _build(data_dir) -> builder_lib.Builder:
  builder = builder_lib.Builder(config="shapes_tiny", data_dir=os.fspath(data_dir), file_format="array_record")
  builder.download_and_prepare(download_config=_NO_GCS)
  return builder


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  builder = _build(data_dir)
  examples = {split: [features_lib.readable(e) for e in builder.as_data_source(split=split)] for split in SPLITS}
  return data_dir, builder, examples


def _all(examples):
  return [e for split in SPLITS for e in examples[split]]


# ----------------------------------------------------------------------------------------------------------
# What DatasetBuilderTestCase checks
# ----------------------------------------------------------------------------------------------------------


def test_builder_is_registered_under_its_name():
  assert builder_lib.Builder.name == "omniref"
  assert tfds.builder_cls("omniref") is builder_lib.Builder


def test_info_has_the_feature_spec_description_citation_and_release_notes(built):
  _, builder, _ = built
  assert set(builder.info.features.keys()) == set(features_lib.omniris_features().keys())
  assert "Omni-Referring" in builder.info.description
  assert "Omni-Referring Image Segmentation" in builder.info.citation
  assert str(builder.info.version) in builder.builder_config.release_notes  # shapes* carry their own version
  assert builder.builder_config.name == "shapes_tiny"


def test_split_counts_are_exact(built):
  _, builder, examples = built
  assert {name: info.num_examples for name, info in builder.info.splits.items()} == SPLITS
  assert {split: len(rows) for split, rows in examples.items()} == SPLITS


def test_splits_do_not_overlap(built):
  _, _, examples = built
  # Stronger than TFDS's whole-example hash (ids alone would differ): no target image is shared either.
  image_hashes = {split: {hashlib.md5(e["image"].tobytes()).hexdigest() for e in rows}
                  for split, rows in examples.items()}
  names = list(SPLITS)
  for i, first in enumerate(names):
    for second in names[i + 1:]:
      assert not image_hashes[first] & image_hashes[second], f"{first} and {second} share images"
  everything = _all(examples)
  assert len({e["id"] for e in everything}) == len(everything)
  assert len({e["image_id"] for e in everything}) == len(everything)


def test_examples_decode_to_the_data_contract(built):
  _, _, examples = built
  size = builder_lib.SHAPES_TINY.shapes.image_size
  for e in _all(examples):
    assert e["image"].shape == (size, size, 3) and e["image"].dtype == np.uint8
    for key in ("text_mask", "visual_mask", "mask"):
      assert e[key].shape == (size, size, 1) and e[key].dtype == np.uint8, key
    for key in features_lib.MASK_KEYS:
      assert set(np.unique(e[key])) <= {0, 1}, (e["id"], key)
    has_ref = e["ref_image_id"] != -1
    ref_shape = (size, size) if has_ref else (1, 1)
    assert e["ref_image"].shape == ref_shape + (3,)
    for key in ("ref_mask", "ref_box", "ref_scribble"):
      assert e[key].shape == ref_shape + (1,), (e["id"], key)
    assert e["id"].startswith("shapes_tiny/")


# ----------------------------------------------------------------------------------------------------------
# OmniRIS content rules
# ----------------------------------------------------------------------------------------------------------


def test_every_modality_and_setting_appears_where_it_applies(built):
  _, _, examples = built
  expected = {
      "train": (set(features_lib.MODALITY_NAMES), set(features_lib.SETTING_NAMES)),
      "text_test": ({"text"}, {"one_vs_one", "one_vs_many", "no_target"}),
      "visual_test": ({"visual"}, {"one_vs_one", "one_vs_many", "no_target"}),
      "omni_test": ({"omni"}, {"many_vs_one", "many_vs_many", "no_target"}),
  }
  for split, (modalities, settings) in expected.items():
    assert {e["modality"] for e in examples[split]} == modalities, split
    assert {e["setting"] for e in examples[split]} == settings, split


def test_test_splits_are_one_third_single_multi_and_no_target(built):
  _, _, examples = built
  for split in ("text_test", "visual_test", "omni_test"):
    settings = [e["setting"] for e in examples[split]]
    third = len(settings) // 3
    assert sum(s in _SINGLE for s in settings) == third, split
    assert sum(s in _MULTI for s in settings) == third, split
    assert settings.count("no_target") == third, split


def test_prompt_types_follow_the_modality(built):
  _, _, examples = built
  assert {e["prompt_type"] for e in examples["text_test"]} == {"none"}
  for split in ("visual_test", "omni_test"):
    assert {e["prompt_type"] for e in examples[split]} == {"mask", "box", "scribble"}, split


def test_prompts_are_present_exactly_as_the_modality_says(built):
  _, _, examples = built
  for e in _all(examples):
    has_text, has_visual = e["modality"] in ("text", "omni"), e["modality"] in ("visual", "omni")
    assert bool(e["text"]) == has_text, e["id"]
    assert (e["ref_image_id"] != -1) == has_visual == (e["ref_category_id"] != -1), e["id"]
    if not has_text:
      assert not e["text_mask"].any(), e["id"]
    if not has_visual:
      assert not e["visual_mask"].any(), e["id"]
    many = e["setting"] in ("many_vs_one", "many_vs_many")
    assert e["setting"] == "no_target" or many == (e["modality"] == "omni"), e["id"]


def test_reference_comes_from_a_different_image(built):
  _, _, examples = built
  target_ids = {e["image_id"] for e in _all(examples)}
  for e in _all(examples):
    if e["ref_image_id"] != -1:
      assert e["ref_image_id"] != e["image_id"] and e["ref_image_id"] not in target_ids, e["id"]
      assert not np.array_equal(e["ref_image"], e["image"]), e["id"]


def test_box_is_the_tight_filled_rectangle_of_the_reference_mask(built):
  _, _, examples = built
  for e in _all(examples):
    if e["ref_image_id"] == -1:
      continue
    rows, cols = np.nonzero(e["ref_mask"][..., 0])
    assert rows.size, e["id"]
    expected = np.zeros_like(e["ref_mask"])
    expected[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = 1
    np.testing.assert_array_equal(e["ref_box"], expected, err_msg=e["id"])
    np.testing.assert_array_equal(e["ref_box"], prompts.box_from_mask(e["ref_mask"]), err_msg=e["id"])


def test_scribble_is_inside_the_reference_mask_and_not_empty(built):
  _, _, examples = built
  for e in _all(examples):
    if e["ref_image_id"] != -1:
      assert e["ref_scribble"].any(), e["id"]
      assert np.all(e["ref_mask"][e["ref_scribble"] == 1] == 1), e["id"]


def test_mask_is_the_union_of_text_and_visual_masks(built):
  _, _, examples = built
  for e in _all(examples):
    np.testing.assert_array_equal(e["mask"], e["text_mask"] | e["visual_mask"], err_msg=e["id"])


def test_no_target_exactly_when_the_mask_is_empty(built):
  _, _, examples = built
  for e in _all(examples):
    assert e["no_target"] == (not e["mask"].any()) == (e["setting"] == "no_target"), e["id"]
    assert (len(e["category_ids"]) == 0) == e["no_target"], e["id"]


def test_building_twice_gives_identical_bytes(built, tmp_path):
  data_dir, builder, _ = built
  again = _build(tmp_path)
  for split in SPLITS:
    first = [e["image"].tobytes() + e["ref_scribble"].tobytes() for e in builder.as_data_source(split=split)]
    second = [e["image"].tobytes() + e["ref_scribble"].tobytes() for e in again.as_data_source(split=split)]
    assert first == second, split
  files = sorted(p.name for p in (tmp_path / "omniref" / "shapes_tiny" / str(builder_lib.SHAPES_TINY.version)).iterdir()
                 if "array_record" in p.name)
  assert len(files) == len(SPLITS)
  for name in files:
    original = (data_dir / "omniref" / "shapes_tiny" / str(builder_lib.SHAPES_TINY.version) / name).read_bytes()
    assert original == (tmp_path / "omniref" / "shapes_tiny" / str(builder_lib.SHAPES_TINY.version) / name).read_bytes(), name


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------


def test_unknown_config_lists_the_known_configs(tmp_path):
  with pytest.raises(ValueError, match=r"known configs: \['shapes', 'shapes_tiny'"):
    builder_lib.Builder(config="shapez", data_dir=os.fspath(tmp_path))
  with pytest.raises(ValueError, match="shapes_tiny"):
    tfds.builder("omniref/nope", data_dir=os.fspath(tmp_path))
  with pytest.raises(ValueError, match="splits are"):
    builder_lib.data_source("shapes_tiny", "validation", data_dir=os.fspath(tmp_path))


@pytest.mark.parametrize("kwargs, message", [
    (dict(image_size=32), "image_size"),
    (dict(num_text_test=10), "multiple of 3"),
    (dict(num_omni_test=0), "multiple of 3"),
    (dict(num_train=4), "num_train"),
    (dict(min_objects=2), "min_objects"),
    (dict(min_objects=5, max_objects=4), "max_objects"),
])
def test_impossible_generator_parameters_fail_clearly(kwargs, message):
  with pytest.raises(ValueError, match=message):
    shapes_lib.ShapesConfig(**kwargs)


def test_config_without_generator_parameters_fails_clearly():
  with pytest.raises(ValueError, match="source"):
    builder_lib.OmnirefConfig(name="coco", source="coco")
  with pytest.raises(ValueError, match="ShapesConfig"):
    builder_lib.OmnirefConfig(name="shapes_broken", source="shapes")


def test_failure_mid_generation_leaves_no_dataset_behind(tmp_path, monkeypatch):
  real = shapes_lib.generate_example

  def failing(config, split, index, config_name="shapes"):
    if split == "visual_test" and index == 4:
      raise RuntimeError("disk full (simulated)")
    return real(config, split, index, config_name)

  monkeypatch.setattr(shapes_lib, "generate_example", failing)
  with pytest.raises(RuntimeError, match="simulated"):
    _build(tmp_path)
  dataset_dir = tmp_path / "omniref" / "shapes_tiny"
  leftovers = [p.name for p in dataset_dir.iterdir()] if dataset_dir.exists() else []
  assert leftovers == [], f"half-written data left in {dataset_dir}: {leftovers}"


def test_preview_renders_examples_as_read_from_tfds(built, tmp_path):
  from omniris_jax.data import visualize  # pylint: disable=g-import-not-at-top
  _, builder, _ = built
  source = builder.as_data_source(split="omni_test")
  path = tmp_path / "omni_test.png"
  visualize.render_preview([source[i] for i in range(3)], str(path))  # bytes text, integer class labels
  assert path.read_bytes()[:4] == b"\x89PNG"


def test_build_command_builds_without_the_tfds_cli(tmp_path, capsys):
  from tfds_omniref import build  # pylint: disable=g-import-not-at-top
  build.main(["--config", "shapes_tiny", "--data_dir", str(tmp_path)])
  assert "'omni_test': 9" in capsys.readouterr().out
  assert len(list((tmp_path / "omniref" / "shapes_tiny" / str(builder_lib.SHAPES_TINY.version)).glob("*.array_record-*"))) == len(SPLITS)
  with pytest.raises(SystemExit):  # argparse names the valid choices on stderr
    build.main(["--config", "shapez", "--data_dir", str(tmp_path)])


def test_encoding_rejects_examples_that_break_the_spec():
  example = shapes_lib.generate_example(builder_lib.SHAPES_TINY.shapes, "omni_test", 0)
  assert set(features_lib.encode_example(example)) == features_lib.feature_names()
  with pytest.raises(ValueError, match=r"missing \['text'\]"):
    features_lib.encode_example({k: v for k, v in example.items() if k != "text"})
  with pytest.raises(ValueError, match="mask of example .* must be 0/1"):
    features_lib.encode_example(dict(example, mask=example["mask"] * 255))
  with pytest.raises(ValueError, match="uint8"):
    features_lib.encode_example(dict(example, image=example["image"].astype(np.float32)))


# ----------------------------------------------------------------------------------------------------------
# Train examples generated on demand (training on fresh scenes instead of the stored split)
# ----------------------------------------------------------------------------------------------------------


def _assert_same_record(stored, generated, where):
  assert set(stored) == set(generated), f"{where}: keys differ by {set(stored) ^ set(generated)}"
  for key, value in stored.items():
    other = generated[key]
    if isinstance(value, np.ndarray):
      assert value.dtype == other.dtype and value.shape == other.shape, f"{where}: {key}"
      np.testing.assert_array_equal(value, other, err_msg=f"{where}: {key}")
    else:
      assert type(value) is type(other) and value == other, f"{where}: {key} {value!r} != {other!r}"


def test_generated_train_source_starts_with_the_stored_train_split_record_for_record(built):
  _, builder, _ = built
  stored = builder.as_data_source(split="train")
  generated = shapes_lib.GeneratedTrainSource(builder_lib.SHAPES_TINY.shapes, config_name="shapes_tiny")
  assert len(generated) == shapes_lib.MAX_GENERATED_TRAIN
  for index in range(len(stored)):
    _assert_same_record(stored[index], generated[index], f"train/{index}")
  beyond = generated[len(stored) + 5]  # new scenes past the stored split, same record format
  assert beyond["id"] == f"shapes_tiny/train/{len(stored) + 5:06d}".encode()
  assert not np.array_equal(beyond["image"], generated[5]["image"])


def test_generated_train_source_keeps_only_the_asked_modalities_in_order(built):
  _, builder, _ = built
  stored = builder.as_data_source(split="train")
  visual = shapes_lib.GeneratedTrainSource(builder_lib.SHAPES_TINY.shapes, ("omni", "visual"), length=18,
                                           config_name="shapes_tiny")
  wanted = [i for i in range(len(stored)) if stored[i]["modality"] in (1, 2)]
  assert len(visual) == len(wanted) == 12
  for position, index in enumerate(wanted):
    _assert_same_record(stored[index], visual[position], f"visual[{position}] = train/{index}")
  assert len(shapes_lib.GeneratedTrainSource(builder_lib.SHAPES_TINY.shapes, ("text",), length=10)) == 4
  with pytest.raises(IndexError, match=r"outside \[0, 12\)"):
    visual[12]


@pytest.mark.parametrize("kwargs, message", [
    (dict(modalities=("video",)), "modalities"),
    (dict(modalities=("text", "text")), "distinct"),
    (dict(length=shapes_lib.MAX_GENERATED_TRAIN + 1), "length"),
])
def test_generated_train_source_rejects_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    shapes_lib.GeneratedTrainSource(builder_lib.SHAPES_TINY.shapes, **kwargs)


def test_generated_category_maps_label_every_object_with_its_category(built):
  _, builder, _ = built
  generated = shapes_lib.GeneratedTrainSource(builder_lib.SHAPES_TINY.shapes, category_maps=True,
                                              config_name="shapes_tiny")
  for index in range(30):
    record = generated[index]
    example, scene = shapes_lib.generate_example_and_scene(generated.config, "train", index, "shapes_tiny")
    labels = record["category_map"]
    assert labels.dtype == np.uint8 and labels.shape == record["image"].shape[:2]
    np.testing.assert_array_equal(labels > 0, scene.instance_masks.any(axis=0))
    for obj, mask in zip(scene.objects, scene.instance_masks):
      assert (labels[mask] == obj.category + 1).all(), (index, obj)
    referent = record["mask"][..., 0].astype(bool)
    assert set(np.unique(labels[referent])) <= {c + 1 for c in record["category_ids"]}
  assert "category_map" not in shapes_lib.GeneratedTrainSource(builder_lib.SHAPES_TINY.shapes)[0]


def test_shapes_generator_names_the_generator_behind_a_shapes_dataset():
  assert builder_lib.shapes_generator("omniref/shapes") == builder_lib.SHAPES.shapes
  assert builder_lib.shapes_generator("omniref/shapes_tiny:1.1.0") == builder_lib.SHAPES_TINY.shapes
  for other in ("omniref/released", "ris/grefcoco", "shapes"):
    with pytest.raises(ValueError, match="not a synthetic shapes dataset"):
      builder_lib.shapes_generator(other)
