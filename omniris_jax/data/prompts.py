"""Spatial prompts derived from an instance mask: the box and the scribble of OmniRIS visual prompts.

OmniRef (paper Sec. 4.2, Step II) derives two of its three spatial prompts from the instance mask: the box is the
tight bounding rectangle of the mask, the scribble is a few random lines drawn inside the mask. The dataset
builders store fixed boxes and scribbles for the test splits (so evaluations repeat exactly); the training
pipeline may call these same functions to draw fresh scribbles every epoch. Plain numpy: no JAX, no TFDS.

Masks are (H, W) or (H, W, 1) arrays of {0, 1} (any integer or bool dtype); every function returns an array of
the same shape and dtype, so a uint8 PNG mask in gives a uint8 mask out.
"""

from __future__ import annotations

import math

import numpy as np


def _as_binary_2d(mask: np.ndarray, name: str) -> np.ndarray:
  """The (H, W) bool view of a (H, W) or (H, W, 1) mask; rejects anything else with a clear message."""
  mask = np.asarray(mask)
  if mask.ndim == 3 and mask.shape[-1] == 1:
    mask = mask[..., 0]
  if mask.ndim != 2:
    raise ValueError(f"{name} must have shape (H, W) or (H, W, 1); got {mask.shape=}.")
  if mask.dtype != bool and not np.issubdtype(mask.dtype, np.integer):
    raise ValueError(f"{name} must be a bool or integer array of 0/1; got {mask.dtype=}.")
  return mask.astype(bool)


def _like(binary_2d: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Casts a 2-D bool result back to the caller's mask shape and dtype."""
  mask = np.asarray(mask)
  return binary_2d.reshape(mask.shape).astype(mask.dtype)


def box_from_mask(mask: np.ndarray) -> np.ndarray:
  """The filled tight bounding rectangle of `mask` (all zeros for an empty mask), as OmniRef's box prompt."""
  binary = _as_binary_2d(mask, "mask")
  box = np.zeros_like(binary)
  rows = np.flatnonzero(binary.any(axis=1))
  if rows.size:
    cols = np.flatnonzero(binary.any(axis=0))
    box[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = True
  return _like(box, mask)


def _disc_offsets(radius: int) -> list[tuple[int, int]]:
  """The (dy, dx) offsets of a digital disc; dilation and erosion by a disc are ORs/ANDs over these shifts."""
  return [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
          if dy * dy + dx * dx <= radius * radius]


def _shifted(binary: np.ndarray, dy: int, dx: int, fill: bool) -> np.ndarray:
  """`binary` moved by (dy, dx) pixels; pixels shifted in from outside take `fill`."""
  height, width = binary.shape
  out = np.full_like(binary, fill)
  out[max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = (
      binary[max(-dy, 0):height + min(-dy, 0), max(-dx, 0):width + min(-dx, 0)])
  return out


def _dilate(binary: np.ndarray, radius: int) -> np.ndarray:
  """Binary dilation by a disc of `radius` pixels (vectorised over the image, a loop over the few offsets)."""
  out = binary.copy()
  for dy, dx in _disc_offsets(radius):
    out |= _shifted(binary, dy, dx, fill=False)
  return out


def _erode(binary: np.ndarray, radius: int) -> np.ndarray:
  """Binary erosion by a disc of `radius` pixels; the image border counts as background."""
  out = binary.copy()
  for dy, dx in _disc_offsets(radius):
    out &= _shifted(binary, dy, dx, fill=False)
  return out


def scribble_from_mask(
    mask: np.ndarray,
    rng: np.random.Generator,
    *,
    num_strokes: int | None = None,
    stroke_radius: int | None = None,
) -> np.ndarray:
  """Random smooth strokes drawn inside `mask`, as a user's scribble on the referred instance.

  Each stroke starts at a random interior pixel and walks one pixel per step with a slowly drifting heading
  (a smoothed random turn rate), turning back when it would leave the mask; its length is about the mask's
  extent. The strokes are thickened to a disc of `stroke_radius` and clipped to the mask, so the scribble is
  always inside the mask and, for a non-empty mask, never empty (the start pixel lies in the mask).

  Args:
    mask: (H, W) or (H, W, 1) binary mask of the instance.
    rng: the source of randomness (a `np.random.Generator`); the same seed gives the same scribble.
    num_strokes: how many strokes; default 1 to 3 at random.
    stroke_radius: half-width of a stroke in pixels; default grows with the mask (1 for small masks, at most 3).

  Returns:
    The scribble, same shape and dtype as `mask` (all zeros for an empty mask).
  """
  if not isinstance(rng, np.random.Generator):
    raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)); got {type(rng)}.")
  binary = _as_binary_2d(mask, "mask")
  if num_strokes is not None and num_strokes < 1:
    raise ValueError(f"{num_strokes=} must be at least 1.")
  if stroke_radius is not None and stroke_radius < 0:
    raise ValueError(f"{stroke_radius=} must be non-negative.")
  area = int(binary.sum())
  if area == 0:
    return _like(np.zeros_like(binary), mask)

  extent = math.sqrt(area)
  if stroke_radius is None:
    stroke_radius = int(np.clip(round(extent / 24), 1, 3))
  if num_strokes is None:
    num_strokes = int(rng.integers(1, 4))
  # Start and walk in the eroded interior where there is one, so thick strokes stay visibly inside thin parts.
  interior = _erode(binary, stroke_radius)
  walkable = interior if interior.any() else binary
  height, width = binary.shape
  start_ys, start_xs = np.nonzero(walkable)

  centre_line = np.zeros_like(binary)
  for _ in range(num_strokes):
    pick = int(rng.integers(start_ys.size))
    y, x = float(start_ys[pick]), float(start_xs[pick])
    heading = float(rng.uniform(0.0, 2.0 * math.pi))
    turn_rate = 0.0
    steps = int(extent * rng.uniform(0.6, 1.4)) + 1
    turns = rng.normal(0.0, 0.12, size=steps)
    reversals = rng.normal(0.0, 0.6, size=steps)
    points = [(int(round(y)), int(round(x)))]
    for step in range(steps):
      turn_rate = 0.8 * turn_rate + float(turns[step])
      heading += turn_rate
      next_y, next_x = y + math.sin(heading), x + math.cos(heading)
      row, col = int(round(next_y)), int(round(next_x))
      if not (0 <= row < height and 0 <= col < width and walkable[row, col]):
        # Bounce back into the mask: reverse with some jitter, or stop if that is blocked too.
        heading += math.pi + float(reversals[step])
        turn_rate = 0.0
        next_y, next_x = y + math.sin(heading), x + math.cos(heading)
        row, col = int(round(next_y)), int(round(next_x))
        if not (0 <= row < height and 0 <= col < width and walkable[row, col]):
          break
      y, x = next_y, next_x
      points.append((row, col))
    rows, cols = np.asarray(points).T
    centre_line[rows, cols] = True

  scribble = _dilate(centre_line, stroke_radius) & binary
  return _like(scribble, mask)
