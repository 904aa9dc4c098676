"""Tests for the spatial prompts derived from masks (box and scribble), which the builders and pipeline share."""

from __future__ import annotations

import numpy as np
import pytest

from omniris_jax.data import prompts


def _disc(size: int, cy: int, cx: int, radius: int) -> np.ndarray:
  yy, xx = np.mgrid[:size, :size]
  return ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2).astype(np.uint8)


def _random_masks(count: int) -> list[np.ndarray]:
  """Masks of many kinds: blobs, thin lines, single pixels, two separate parts, masks touching the border."""
  rng = np.random.default_rng(0)
  masks = []
  for i in range(count):
    size = int(rng.integers(8, 64))
    kind = i % 5
    mask = np.zeros((size, size), np.uint8)
    if kind == 0:
      mask = _disc(size, int(rng.integers(size)), int(rng.integers(size)), int(rng.integers(1, size)))
    elif kind == 1:
      mask[int(rng.integers(size)), int(rng.integers(size // 2)):] = 1
    elif kind == 2:
      mask[int(rng.integers(size)), int(rng.integers(size))] = 1
    elif kind == 3:
      mask[:size // 4, :size // 4] = 1
      mask[-3:, -5:] = 1
    else:
      mask = (rng.random((size, size)) < 0.3).astype(np.uint8)
    masks.append(mask)
  return masks


def test_box_is_the_tight_filled_rectangle():
  mask = np.zeros((10, 12), np.uint8)
  mask[2, 3] = 1  # an L shape: the box must span both arms
  mask[2:7, 3] = 1
  mask[6, 3:9] = 1
  expected = np.zeros_like(mask)
  expected[2:7, 3:9] = 1
  np.testing.assert_array_equal(prompts.box_from_mask(mask), expected)


def test_box_keeps_shape_and_dtype_and_is_empty_for_empty_mask():
  mask = np.zeros((5, 7, 1), bool)
  box = prompts.box_from_mask(mask)
  assert box.shape == (5, 7, 1) and box.dtype == bool and not box.any()
  mask[1:3, 2, 0] = True
  box = prompts.box_from_mask(mask)
  assert box.shape == (5, 7, 1) and box.dtype == bool and box.sum() == 2


@pytest.mark.parametrize("index", range(40))
def test_box_contains_mask_and_touches_it_on_every_side(index):
  mask = _random_masks(40)[index]
  box = prompts.box_from_mask(mask).astype(bool)
  assert np.all(box[mask.astype(bool)])
  rows, cols = np.nonzero(box)
  if rows.size:
    for edge in (mask[rows.min()], mask[rows.max()], mask[:, cols.min()], mask[:, cols.max()]):
      assert edge.any()
    assert box.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)  # filled


def test_scribble_is_inside_the_mask_and_never_empty():
  for seed, mask in enumerate(_random_masks(60)):
    scribble = prompts.scribble_from_mask(mask, np.random.default_rng(seed))
    assert scribble.shape == mask.shape and scribble.dtype == mask.dtype
    assert set(np.unique(scribble)) <= {0, 1}
    assert np.all(mask[scribble.astype(bool)] == 1), f"scribble leaves mask {seed}"
    assert scribble.sum() >= 1, f"empty scribble for non-empty mask {seed}"


def test_scribble_of_empty_mask_is_empty():
  scribble = prompts.scribble_from_mask(np.zeros((9, 9, 1), np.uint8), np.random.default_rng(0))
  assert scribble.shape == (9, 9, 1) and not scribble.any()


def test_scribble_is_a_stroke_not_a_fill():
  mask = _disc(96, 48, 48, 40)
  fractions = [prompts.scribble_from_mask(mask, np.random.default_rng(seed)).sum() / mask.sum()
               for seed in range(10)]
  assert max(fractions) < 0.5
  assert min(fractions) > 0.01  # a visible stroke, not a dot


def test_scribble_width_follows_stroke_radius():
  mask = np.ones((64, 64), np.uint8)
  thin = prompts.scribble_from_mask(mask, np.random.default_rng(3), num_strokes=1, stroke_radius=0)
  thick = prompts.scribble_from_mask(mask, np.random.default_rng(3), num_strokes=1, stroke_radius=2)
  assert thick.sum() > 2.5 * thin.sum()


def test_scribble_is_deterministic_given_the_seed():
  mask = _disc(64, 30, 34, 20)
  first = prompts.scribble_from_mask(mask, np.random.default_rng(7))
  again = prompts.scribble_from_mask(mask, np.random.default_rng(7))
  other = prompts.scribble_from_mask(mask, np.random.default_rng(8))
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)


def test_bad_inputs_say_what_is_wrong():
  with pytest.raises(ValueError, match="shape"):
    prompts.box_from_mask(np.zeros((4, 4, 3), np.uint8))
  with pytest.raises(ValueError, match="dtype"):
    prompts.box_from_mask(np.zeros((4, 4), np.float32))
  with pytest.raises(TypeError, match="Generator"):
    prompts.scribble_from_mask(np.ones((4, 4), np.uint8), 0)
  with pytest.raises(ValueError, match="num_strokes"):
    prompts.scribble_from_mask(np.ones((4, 4), np.uint8), np.random.default_rng(0), num_strokes=0)
