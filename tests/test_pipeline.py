"""The grain input pipeline keeps the batch contract, shards, mixes, restores and rejects bad records clearly."""

from __future__ import annotations

import io
import json

import grain
import numpy as np
import pytest
from PIL import Image

from omniris_jax.data import pipeline
from omniris_jax.data import tokenizer as tokenizer_lib
from omniris_jax.data import transforms

RESOLUTION = 32
MAX_TEXT_LEN = 12
SPATIAL = ("mask", "box", "scribble")
CONTRACT = {  # field: (dtype, shape without the batch dimension)
    "image": (np.uint8, (RESOLUTION, RESOLUTION, 3)),
    "text_ids": (np.int32, (MAX_TEXT_LEN,)),
    "text_attention_mask": (np.int32, (MAX_TEXT_LEN,)),
    "ref_image": (np.uint8, (RESOLUTION, RESOLUTION, 3)),
    "ref_prompt": (np.float32, (RESOLUTION, RESOLUTION)),
    "has_text": (np.bool_, ()),
    "has_visual": (np.bool_, ()),
    "mask": (np.uint8, (RESOLUTION, RESOLUTION)),
    "text_mask": (np.uint8, (RESOLUTION, RESOLUTION)),
    "visual_mask": (np.uint8, (RESOLUTION, RESOLUTION)),
    "no_target": (np.bool_, ()),
    "modality": (np.int32, ()),
    "setting": (np.int32, ()),
    "prompt_type": (np.int32, ()),
    "index": (np.int64, ()),
}


def _rectangle_mask(height: int, width: int, top: int, left: int, bottom: int, right: int) -> np.ndarray:
  mask = np.zeros((height, width, 1), np.uint8)
  mask[top:bottom, left:right] = 1
  return mask


def make_record(index: int, modality: int | None = None) -> dict:
  """A record with the features a TFDS OmniRIS source yields (decoded), of varying sizes and modalities."""
  rng = np.random.default_rng(index)
  modality = index % 3 if modality is None else modality
  height, width = int(rng.integers(20, 48)), int(rng.integers(20, 48))
  no_target = index % 5 == 4
  target = (np.zeros((height, width, 1), np.uint8) if no_target
            else _rectangle_mask(height, width, 2, 3, height // 2, width // 2))
  has_text = modality in (0, 2)
  has_visual = modality in (1, 2)
  record = {
      "id": f"rec-{index}".encode(),
      "image_id": index,
      "image": rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
      "text": b"the red circle on the left" if has_text else b"",
      "text_mask": target if has_text else np.zeros_like(target),
      "visual_mask": target if has_visual else np.zeros_like(target),
      "mask": target,
      "no_target": no_target,
      "modality": modality,
      "setting": 4 if no_target else index % 4,
      "prompt_type": int(rng.integers(1, 4)) if has_visual else 0,
      "category_ids": np.asarray([1, 2], np.int64),
      "ref_category_id": 1,
  }
  if has_visual:
    ref_height, ref_width = int(rng.integers(16, 40)), int(rng.integers(16, 40))
    ref_mask = np.zeros((ref_height, ref_width, 1), np.uint8)
    ref_mask[4:12, 5:14] = 1
    ref_mask[6:9, 7] = 0  # Not a rectangle, so the box differs from the mask.
    ref_scribble = np.zeros_like(ref_mask)
    ref_scribble[8, 6:13] = 1
    record.update(ref_image=rng.integers(0, 256, (ref_height, ref_width, 3), dtype=np.uint8), ref_image_id=index,
                  ref_mask=ref_mask, ref_box=_rectangle_mask(ref_height, ref_width, 4, 5, 12, 14),
                  ref_scribble=ref_scribble)
  else:
    placeholder = np.zeros((1, 1, 1), np.uint8)
    record.update(ref_image=np.zeros((1, 1, 3), np.uint8), ref_image_id=-1, ref_mask=placeholder,
                  ref_box=placeholder, ref_scribble=placeholder)
  return record


SOURCE = [make_record(index) for index in range(30)]


def make(source=SOURCE, **overrides):
  kwargs = dict(resolution=RESOLUTION, max_text_len=MAX_TEXT_LEN, batch_size=4, seed=0, shuffle=True,
                num_epochs=None, prompt_types=("mask", "box", "scribble"), regenerate_prompts=True)
  kwargs.update(overrides)
  return pipeline.make_dataset(source, **kwargs)


def take(dataset, count):
  iterator = iter(dataset)
  return [next(iterator) for _ in range(count)]


def assert_batches_equal(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for batch_a, batch_b in zip(batches_a, batches_b):
    assert batch_a.keys() == batch_b.keys()
    for key in batch_a:
      np.testing.assert_array_equal(batch_a[key], batch_b[key], err_msg=key)


@pytest.fixture(scope="module")
def train_batches():
  return take(make(), 8)


@pytest.fixture(scope="module")
def eval_batches():
  return list(make(shuffle=False, num_epochs=1, prompt_types=None, drop_remainder=False))


def test_batches_follow_the_contract(train_batches, eval_batches):
  for batch in train_batches + eval_batches[:-1]:
    assert set(batch) == set(CONTRACT)
    for key, (dtype, shape) in CONTRACT.items():
      assert batch[key].dtype == dtype, key
      assert batch[key].shape == (4, *shape), key
  assert eval_batches[-1]["image"].shape[0] == len(SOURCE) % 4  # The partial last batch is kept for evaluation.


def test_masks_and_prompts_stay_binary_after_resize(train_batches):
  for batch in train_batches:
    for key in ("mask", "text_mask", "visual_mask", "ref_prompt"):
      assert set(np.unique(batch[key])) <= {0, 1}, key


def _nearest_reference(array: np.ndarray, size: int) -> np.ndarray:
  """Nearest-neighbour resize by its definition: output pixel i reads input pixel floor((i + 0.5) * in / out)."""
  rows = np.floor((np.arange(size) + 0.5) * array.shape[0] / size).astype(int)
  cols = np.floor((np.arange(size) + 0.5) * array.shape[1] / size).astype(int)
  return array[rows][:, cols]


def test_category_maps_ride_along_nearest_resized_when_records_have_them():
  rng = np.random.default_rng(1)
  record = make_record(3, modality=0)
  height, width = record["image"].shape[:2]
  record["category_map"] = rng.integers(0, 9, (height, width)).astype(np.uint8)
  batch = take(make([record], batch_size=1), 1)[0]
  assert batch["category_map"].dtype == np.uint8 and batch["category_map"].shape == (1, RESOLUTION, RESOLUTION)
  np.testing.assert_array_equal(batch["category_map"][0], np.asarray(Image.fromarray(record["category_map"]).resize(
      (RESOLUTION, RESOLUTION), Image.Resampling.NEAREST)))
  assert "category_map" not in take(make([make_record(3, modality=0)], batch_size=1), 1)[0]
  with pytest.raises(transforms.BadExampleError, match="category_map has size"):
    _prepare(dict(record, category_map=np.zeros((5, 5), np.uint8)))


def test_resize_is_non_uniform_nearest_for_masks_and_prompts():
  rng = np.random.default_rng(0)
  record = make_record(3, modality=2)
  for height, width, key in ((20, 45, "mask"), (37, 13, "ref_mask")):
    noise = (rng.random((height, width, 1)) > 0.5).astype(np.uint8)
    record[key] = noise * 255  # Stored as 0/255: the pipeline binarises.
  record["image"] = rng.integers(0, 256, (20, 45, 3), dtype=np.uint8)
  record["text_mask"] = record["visual_mask"] = record["mask"]
  record["ref_image"] = rng.integers(0, 256, (37, 13, 3), dtype=np.uint8)
  record["ref_box"] = record["ref_scribble"] = record["ref_mask"]
  record["no_target"], record["prompt_type"] = False, 1
  batch = take(make([record], batch_size=1, prompt_types=None), 1)[0]
  np.testing.assert_array_equal(batch["mask"][0], _nearest_reference(record["mask"][..., 0] > 0, RESOLUTION))
  np.testing.assert_array_equal(batch["ref_prompt"][0],
                                _nearest_reference(record["ref_mask"][..., 0] > 0, RESOLUTION))


def test_images_resize_bilinear_like_pil_and_torch_antialias():
  """detectron2 (ReLA) resizes with PIL bilinear, which antialiases when shrinking; torch's antialias mode too."""
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(1)
  record = make_record(4, modality=0)
  record["image"] = rng.integers(0, 256, (20, 45, 3), dtype=np.uint8)
  record["mask"] = record["text_mask"] = record["visual_mask"] = np.zeros((20, 45, 1), np.uint8)
  record["no_target"] = True
  batch = take(make([record], batch_size=1), 1)[0]
  image = torch.from_numpy(record["image"]).permute(2, 0, 1)[None].double()
  expected = torch.nn.functional.interpolate(image, size=(RESOLUTION, RESOLUTION), mode="bilinear",
                                             align_corners=False, antialias=True)
  expected = expected[0].permute(1, 2, 0).round().clamp(0, 255).numpy()
  assert np.abs(batch["image"][0].astype(np.float64) - expected).max() <= 1


def test_text_tokens_start_with_cls_and_end_with_sep(train_batches):
  tokenizer = tokenizer_lib.Tokenizer()
  for batch in train_batches:
    for ids, attention, has_text in zip(batch["text_ids"], batch["text_attention_mask"], batch["has_text"]):
      if has_text:
        length = int(attention.sum())
        assert ids[0] == tokenizer.cls_id and ids[length - 1] == tokenizer.sep_id
        assert (attention[:length] == 1).all() and (attention[length:] == 0).all()
        assert (ids[1:length - 1] != tokenizer.unk_id).all()
      else:
        assert not ids.any() and not attention.any()


def test_index_names_the_source_record_across_epochs(train_batches):
  indices = np.concatenate([batch["index"] for batch in train_batches])
  assert len(indices) > len(SOURCE)  # The fixture crosses an epoch boundary.
  assert sorted(indices[:len(SOURCE)]) == list(range(len(SOURCE)))  # First epoch: a permutation.
  for batch in train_batches:
    for row, index in enumerate(batch["index"]):
      record = SOURCE[index]
      assert batch["modality"][row] == record["modality"] and batch["setting"][row] == record["setting"]
      assert batch["no_target"][row] == record["no_target"]


def test_absent_prompts_are_zero_and_flags_follow_modality(train_batches):
  seen_modalities = set()
  for batch in train_batches:
    for row in range(4):
      modality = int(batch["modality"][row])
      seen_modalities.add(modality)
      assert batch["has_text"][row] == (modality in (0, 2))
      assert batch["has_visual"][row] == (modality in (1, 2))
      if not batch["has_visual"][row]:
        assert not batch["ref_image"][row].any() and not batch["ref_prompt"][row].any()
        assert batch["prompt_type"][row] == 0
      else:
        assert batch["ref_prompt"][row].any() and batch["prompt_type"][row] in (1, 2, 3)
      if batch["no_target"][row]:
        assert not batch["mask"][row].any()
  assert seen_modalities == {0, 1, 2}


def test_evaluation_uses_the_stored_prompt(eval_batches):
  for batch in eval_batches:
    for row, index in enumerate(batch["index"]):
      record = SOURCE[index]
      assert batch["prompt_type"][row] == record["prompt_type"]
      if batch["has_visual"][row]:
        stored = record[{1: "ref_mask", 2: "ref_box", 3: "ref_scribble"}[record["prompt_type"]]][..., 0]
        expected = np.asarray(Image.fromarray(stored).resize((RESOLUTION, RESOLUTION), Image.Resampling.NEAREST))
        np.testing.assert_array_equal(batch["ref_prompt"][row], expected.astype(np.float32))
  indices = np.concatenate([batch["index"] for batch in eval_batches])
  np.testing.assert_array_equal(indices, np.arange(len(SOURCE)))  # Unshuffled, one epoch, nothing dropped.


def test_training_draws_every_prompt_type_and_regenerates_them():
  batches = take(make(batch_size=10), 6)
  drawn = {int(t) for batch in batches for t, v in zip(batch["prompt_type"], batch["has_visual"]) if v}
  assert drawn == {1, 2, 3}
  stored_prompts = take(make(batch_size=10, regenerate_prompts=False), 6)
  for regenerated, stored in zip(batches, stored_prompts):
    np.testing.assert_array_equal(regenerated["prompt_type"], stored["prompt_type"])
    scribbles = regenerated["prompt_type"] == 3
    if scribbles.any():  # Fresh scribbles are not the stored one-line scribble.
      assert not np.array_equal(regenerated["ref_prompt"][scribbles], stored["ref_prompt"][scribbles])


def test_record_bytes_are_decoded_like_arrays():
  record = make_record(1, modality=1)
  encoded = dict(record)
  for key in ("image", "ref_image"):
    buffer = io.BytesIO()
    Image.fromarray(record[key]).save(buffer, format="PNG")
    encoded[key] = buffer.getvalue()
  # Masks as PNGs of the modes datasets use: 0/255 grey, 1-bit, and palette indices 0/1 (palette colour of
  # index 1 is black here, so a grey conversion would lose the mask).
  grey, one_bit, palette = (Image.fromarray(record["mask"][..., 0] * 255),
                            Image.fromarray(record["ref_mask"][..., 0].astype(bool)),
                            Image.fromarray(record["ref_box"][..., 0], mode="P"))
  palette.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
  for key, pil_image in (("mask", grey), ("ref_mask", one_bit), ("ref_box", palette)):
    buffer = io.BytesIO()
    pil_image.save(buffer, format="PNG")
    encoded[key] = buffer.getvalue()
  record["prompt_type"] = encoded["prompt_type"] = 2  # The box: read from the palette PNG.
  from_arrays = take(make([record], batch_size=1, prompt_types=None), 1)
  from_bytes = take(make([encoded], batch_size=1, prompt_types=None), 1)
  assert_batches_equal(from_arrays, from_bytes)


def test_same_seed_same_batches_other_seed_other_batches(train_batches):
  assert_batches_equal(train_batches, take(make(), 8))
  other = take(make(seed=1), 8)
  assert not np.array_equal(np.concatenate([b["index"] for b in train_batches]),
                            np.concatenate([b["index"] for b in other]))


def test_process_shards_are_disjoint_and_cover_the_epoch():
  shards = []
  for process_index in range(2):
    dataset = make(num_epochs=1, drop_remainder=False, process_index=process_index, process_count=2, batch_size=3)
    shards.append(np.concatenate([batch["index"] for batch in dataset]))
  assert not set(shards[0]) & set(shards[1])
  assert sorted(np.concatenate(shards)) == list(range(len(SOURCE)))
  assert abs(len(shards[0]) - len(shards[1])) <= 1


def test_padded_evaluation_gives_every_process_the_same_full_batches():
  shards = []
  for process_index in range(2):
    dataset = make(shuffle=False, num_epochs=1, prompt_types=None, process_index=process_index, process_count=2,
                   batch_size=4, drop_remainder=False, pad_to_full_batches=True)
    batches = list(dataset)
    assert len(batches) == 4 and all(batch["index"].shape == (4,) for batch in batches)  # ceil(ceil(30/2)/4)
    shards.append(np.concatenate([batch["index"] for batch in batches]))
  real = np.concatenate(shards)
  assert (real == -1).sum() == 2 * 16 - len(SOURCE)
  assert sorted(real[real >= 0]) == list(range(len(SOURCE)))


def test_restored_iterator_yields_the_same_batches():
  dataset = make()
  iterator = iter(dataset)
  for _ in range(6):
    next(iterator)
  state = json.loads(json.dumps(iterator.get_state()))  # What a checkpoint stores must survive JSON.
  expected = [next(iterator) for _ in range(4)]
  restored = iter(make())
  restored.set_state(state)
  assert_batches_equal([next(restored) for _ in range(4)], expected)


def test_orbax_checkpoint_of_the_iterator_restores_the_same_batches(tmp_path):
  """The trainer saves the iterator next to the train state with orbax's grain handler; this is that round trip."""
  ocp = pytest.importorskip("orbax.checkpoint")
  iterator = iter(make())
  for _ in range(5):
    next(iterator)
  manager = ocp.CheckpointManager(tmp_path / "checkpoints", item_names=("data",),
                                  item_handlers={"data": grain.checkpoint.CheckpointHandler()})
  manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
  manager.wait_until_finished()
  expected = [next(iterator) for _ in range(3)]
  restored = iter(make())
  manager.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  assert_batches_equal([next(restored) for _ in range(3)], expected)


def test_mixed_dataset_keeps_the_7_to_2_ratio_and_restores():
  text_source = [make_record(index, modality=0) for index in range(11)]
  visual_source = [make_record(index, modality=1) for index in range(7)]
  dataset = pipeline.make_mixed_dataset(text_source, visual_source, resolution=8, max_text_len=MAX_TEXT_LEN,
                                        batch_size=9, seed=3, read_threads=0)
  iterator = iter(dataset)
  batches = [next(iterator) for _ in range(20)]
  modality = np.concatenate([batch["modality"] for batch in batches])
  assert abs((modality == 0).mean() - 7 / 9) < 0.02, (modality == 0).mean()
  assert {int(i) for b in batches for i, m in zip(b["index"], b["modality"]) if m == 1} == set(range(7))
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(2)]
  restored = iter(pipeline.make_mixed_dataset(text_source, visual_source, resolution=8,
                                              max_text_len=MAX_TEXT_LEN, batch_size=9, seed=3, read_threads=0))
  restored.set_state(state)
  assert_batches_equal([next(restored) for _ in range(2)], expected)


def test_mixed_dataset_by_batch_keeps_each_batch_to_one_source_at_7_to_2_and_restores():
  text_source = [make_record(index, modality=0) for index in range(11)]
  visual_source = [make_record(index, modality=1) for index in range(7)]
  make_mixed = lambda: pipeline.make_mixed_dataset(  # noqa: E731
      text_source, visual_source, mix_unit="batch", resolution=8, max_text_len=MAX_TEXT_LEN, batch_size=4,
      seed=3, read_threads=0)
  iterator = iter(make_mixed())
  batches = [next(iterator) for _ in range(18)]
  kinds = [set(batch["modality"].tolist()) for batch in batches]
  assert all(len(kind) == 1 for kind in kinds), kinds  # one source per batch
  for start in (0, 9):  # every 9 consecutive batches: 7 text, 2 visual
    assert sum(kind == {0} for kind in kinds[start:start + 9]) == 7, kinds
  assert not any(batch["has_visual"].any() for batch, kind in zip(batches, kinds) if kind == {0})
  assert {int(i) for b in batches if b["modality"][0] == 1 for i in b["index"]} == set(range(7))
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(3)]
  restored = iter(make_mixed())
  restored.set_state(state)
  assert_batches_equal([next(restored) for _ in range(3)], expected)
  with pytest.raises(ValueError, match="mix_unit"):
    pipeline.make_mixed_dataset(text_source, visual_source, mix_unit="epoch", resolution=8, batch_size=4)


def test_worker_process_gives_the_same_batches(train_batches):
  dataset = make(worker_count=1)
  iterator = iter(dataset)
  try:
    assert_batches_equal([next(iterator) for _ in range(3)], train_batches[:3])
  finally:
    iterator.close()


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="prompt_types"):
    make(prompt_types=("mask", "polygon"))
  with pytest.raises(ValueError, match="process_index"):
    make(process_index=2, process_count=2)
  with pytest.raises(ValueError, match="ratio"):
    pipeline.make_mixed_dataset(SOURCE, SOURCE, ratio=(7, 0), resolution=8, batch_size=2)
  with pytest.raises(ValueError, match="empty"):
    make([])


# ---------------------------------------------------------------------------------------------------------------
# Bad records: each fails with the record's index and id, the field, and the problem.
# ---------------------------------------------------------------------------------------------------------------


def _prepare(record, index=7, stored_prompt=True):
  """Runs the per-record transforms up to (and including) the prompt choice."""
  element = transforms.AttachIndex(num_records=100).map_with_index(index, record)
  element = transforms.DecodeAndValidate().map(element)
  if stored_prompt:
    return transforms.SelectStoredPrompt().map(element)
  return transforms.SampleSpatialPrompt(("box",), regenerate=True).random_map(element, np.random.default_rng(0))


def _with(modality=1, **changes):
  record = make_record(2, modality=modality)
  record.update(changes)
  return record


@pytest.mark.parametrize("changes, message", [
    (dict(image=b"\x89PNG not really"), r"image bytes could not be decoded"),
    (dict(image=b""), r"image is empty bytes"),
    (dict(image=None), r"field 'image' is missing"),
    (dict(image=np.zeros((20, 20, 3), np.float32)), r"image must be uint8 RGB; got dtype=float32"),
    (dict(image=np.zeros((20, 20), np.uint8)), r"image must have shape \(H, W, 3\); got shape=\(20, 20\)"),
    (dict(ref_image=np.zeros((16, 16, 4), np.uint8)), r"ref_image must have shape \(H, W, 3\)"),
    (dict(mask=np.zeros((5, 5, 1), np.uint8)), r"mask has size \(5, 5\) but image has size"),
    (dict(visual_mask=np.zeros((5, 5, 1), np.uint8)), r"visual_mask has size \(5, 5\) but image has size"),
    (dict(ref_box=np.ones((3, 3, 1), np.uint8)), r"ref_box has size \(3, 3\) but ref_image has size"),
    (dict(modality=0, text=b""), r"text='' is empty but modality='text'"),
    (dict(modality=2, text=b"  \t "), r"text='  \\t ' is empty but modality='omni'"),
    (dict(prompt_type=2, ref_box=None), r"field 'ref_box' is missing"),
    (dict(modality=7), r"modality=7 is not a valid code"),
    (dict(modality=0, text=b"\xff\xfe the cat"), r"text is not valid UTF-8"),
    (dict(no_target=True), r"no_target is True but mask has"),
    (dict(prompt_type=0), r"prompt_type=0 \('none'\) but modality='visual'"),
])
def test_bad_record_errors_name_the_record_and_problem(changes, message):
  record = _with(**changes)
  with pytest.raises(transforms.BadExampleError, match=r"record 7 \(id='rec-2'\): " + message):
    _prepare(record)


def test_empty_box_prompt_is_rejected():
  record = _with(prompt_type=2)
  record["ref_box"] = np.zeros_like(record["ref_box"])
  with pytest.raises(transforms.BadExampleError, match=r"record 7 \(id='rec-2'\): the box prompt \(ref_box\) is empty"):
    _prepare(record)


def test_regenerating_from_an_empty_reference_mask_is_rejected():
  record = _with()
  record["ref_mask"] = np.zeros_like(record["ref_mask"])
  with pytest.raises(transforms.BadExampleError, match=r"record 7 .*ref_mask is empty, so no box prompt"):
    _prepare(record, stored_prompt=False)


def test_bad_record_error_reaches_the_caller_through_the_pipeline():
  source = list(SOURCE[:6])
  source[5] = dict(source[5], image=b"corrupt")
  with pytest.raises(ValueError, match=r"record 5 \(id='rec-5'\): image bytes could not be decoded"):
    take(make(source, shuffle=False, num_epochs=1, batch_size=2), 3)


def _require_omniref_builder():
  tfds = pytest.importorskip("tensorflow_datasets")
  pytest.importorskip("tfds_omniref.omniref")
  try:
    tfds.builder_cls("omniref")
  except tfds.core.registered.DatasetNotFoundError:
    pytest.skip("the omniref TFDS builder is not registered in this checkout yet")


# ---------------------------------------------------------------------------------------------------------------
# The real TFDS source: omniref/shapes_tiny built into a temporary directory (under a second).
# ---------------------------------------------------------------------------------------------------------------

SHAPES_TINY_SPLITS = ("train", "text_test", "visual_test", "omni_test")


@pytest.fixture(scope="module")
def shapes_tiny_dir(tmp_path_factory):
  _require_omniref_builder()
  from tfds_omniref import omniref  # pylint: disable=g-import-not-at-top

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  omniref.data_source("shapes_tiny", "train", data_dir=data_dir)  # Builds every split once.
  return data_dir


@pytest.mark.parametrize("split", SHAPES_TINY_SPLITS)
def test_shapes_tiny_from_tfds_follows_the_contract(shapes_tiny_dir, split):
  source = pipeline.from_tfds("omniref/shapes_tiny", split, data_dir=shapes_tiny_dir)
  training = split == "train"
  dataset = make(source, shuffle=training, num_epochs=1, drop_remainder=False,
                 prompt_types=SPATIAL if training else None, regenerate_prompts=training)
  batches = list(dataset)
  indices = np.concatenate([batch["index"] for batch in batches])
  assert sorted(indices) == list(range(len(source)))
  for batch in batches:
    assert set(batch) == set(CONTRACT)
    for key, (dtype, shape) in CONTRACT.items():
      assert batch[key].dtype == dtype and batch[key].shape[1:] == shape, key
    for row, index in enumerate(batch["index"]):
      record = source[int(index)]
      assert batch["modality"][row] == record["modality"] and batch["no_target"][row] == record["no_target"]
      if not training:  # Test splits use the stored prompt, so evaluations repeat exactly.
        assert batch["prompt_type"][row] == record["prompt_type"]
      if batch["has_visual"][row]:
        assert batch["ref_prompt"][row].any()
      if not batch["no_target"][row]:
        assert batch["mask"][row].any()


def test_missing_tfds_dataset_names_it_and_how_to_build(tmp_path):
  _require_omniref_builder()
  with pytest.raises(FileNotFoundError, match=r"'omniref/shapes_tiny'.*not built.*python -m tfds_omniref.build"):
    pipeline.from_tfds("omniref/shapes_tiny", "train", data_dir=str(tmp_path))


def test_unknown_tfds_split_is_named(shapes_tiny_dir):
  with pytest.raises(ValueError, match=r"split='validation' is not a split of the TFDS dataset 'omniref/shapes_tiny'"):
    pipeline.from_tfds("omniref/shapes_tiny", "validation", data_dir=shapes_tiny_dir)
