"""Pallas kernels for multi-scale deformable attention, forward and backward, registered as "pallas".

Why: the jnp version (`omniris_jax.models.deform_attn`, "xla") gathers every (query, level, point, corner) value
row into one (batch*heads, Q, L*P*4, head_dim) tensor before contracting it; at the pixel-encoder shape of the
paper (batch 8, 4725 queries, 8 heads, 3 levels x 4 points, head_dim 32) that is ~0.9 GB in bf16, written and
read back, and its gradient is an XLA scatter of the same size. These kernels keep the sampled rows in
registers: each program owns one (batch, head, block of queries), loads the four bilinear corner rows of every
point straight from the value map, and accumulates the weighted sum. The backward pass recomputes the corners
(nothing but the inputs is saved), reduces the per-corner dot products with the output cotangent into the
location and attention-weight gradients, and scatter-adds the value gradient.

Semantics are those of the reference (`F.grid_sample(bilinear, zeros, align_corners=False)`): a normalised
location `loc` maps to the pixel coordinate `loc * size - 0.5`; a corner outside its map contributes zero (its
row index is clipped and its weight is zero, exactly as the reference does).

Backends:
  * GPU: Triton lowering (selected by `triton.CompilerParams`). The value gradient is a float32 `atomic_add`
    of each corner's (block_q, head_dim) contribution (Triton has no bf16 atomics; the result is cast to the
    value's dtype). Float atomics make the value gradient's summation order, hence its last bits, vary between
    runs.
  * CPU: interpret mode (`interpret=None` turns it on automatically on CPU). Pallas' interpreter discharges
    Triton's vector `atomic_add` as `ref.at[idx].set(ref[idx] + val)`, which drops duplicate rows within one
    call (and rejects an (array, slice) index), so in interpret mode the same contribution is added with a jnp
    scatter-add on the program's whole value-gradient block instead; every other line is shared.
  * TPU: not supported. Mosaic TPU lowers only take_along_axis-like in-register gathers; a row gather from a
    value map (`value_ref[rows, :]`) fails with "Cannot do int indexing on TPU" in jax 0.10.2. Compiled use on
    TPU raises a ValueError that says to use implementation="xla".

Multi-device: a pallas_call is opaque to XLA's SPMD partitioner, so under the trainer's `jax.set_mesh` and flax
logical-axis rules the kernels run inside `shard_map` over the mesh axes of "batch" and "heads"
(`_mesh_partition`); without a mesh they are called directly.

Public entry point: `multi_scale_deformable_attention_pallas(value, spatial_shapes, sampling_locations,
attention_weights, *, block_sizes=None, interpret=None, backend=None)`; the model reaches it through
`multi_scale_deformable_attention(..., implementation="pallas")`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec
from jax.experimental.pallas import triton as pl_triton

from omniris_jax.models import deform_attn

Array = jax.Array
SpatialShapes = tuple[tuple[int, int], ...]

# Backends with a compiled lowering of these kernels.
_COMPILED_BACKENDS = ("gpu", "cuda", "rocm")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """How the query axis is tiled, and Triton launch parameters.

  Attributes:
    block_q: queries per program; a power of two (Triton tensors must have power-of-two sizes). Queries are
      padded up to a multiple of it; with fewer queries than `block_q`, the next power of two above their
      number is used instead.
    num_warps: Triton warps per program (GPU only).
    num_stages: Triton software-pipelining stages (GPU only; the kernels have no pipelined loop, so 1).
  """

  block_q: int = 64
  num_warps: int = 4
  num_stages: int = 1

  @classmethod
  def for_backend(cls, backend: str) -> "BlockSizes":
    """Defaults per backend: 64 queries x head_dim 32 keeps a program's four corner tiles in registers on GPU;
    in interpret mode (CPU) each grid step is one iteration of a scan, so bigger blocks mean fewer steps."""
    if backend in _COMPILED_BACKENDS:
      return cls(block_q=64, num_warps=4, num_stages=1)
    return cls(block_q=128)


def _is_power_of_two(n: int) -> bool:
  return n > 0 and (n & (n - 1)) == 0


def _check_kernel_inputs(value: Array, spatial_shapes: SpatialShapes, sampling_locations: Array,
                         attention_weights: Array, block_sizes: BlockSizes, interpret: bool,
                         backend: str) -> None:
  """Raises a ValueError that names the offending argument and says what to do."""
  # The shape contract is the dispatcher's; one check, shared.
  deform_attn._check_inputs(  # pylint: disable=protected-access
      value, spatial_shapes, sampling_locations, attention_weights)
  for name, array in (("value", value), ("sampling_locations", sampling_locations),
                      ("attention_weights", attention_weights)):
    if not jnp.issubdtype(array.dtype, jnp.floating):
      raise ValueError(f"{name}.dtype={array.dtype} must be floating point.")
  if not _is_power_of_two(block_sizes.block_q):
    raise ValueError(f"{block_sizes.block_q=} must be a power of two (Triton tensor sizes are).")
  if interpret:
    return
  if backend == "tpu":
    raise ValueError(
        "implementation='pallas' has no TPU lowering: Mosaic TPU cannot gather value rows at data-dependent "
        "indices ('Cannot do int indexing on TPU' in jax 0.10.2). Use implementation='xla' on TPU.")
  if backend not in _COMPILED_BACKENDS:
    raise ValueError(f"{backend=} has no compiled lowering of the pallas deformable-attention kernel; pass "
                     "interpret=True (slow, for testing) or use implementation='xla'.")
  head_dim = value.shape[-1]
  if not _is_power_of_two(head_dim):
    raise ValueError(f"{head_dim=} (value.shape[-1]) must be a power of two for the Triton kernel; use "
                     "implementation='xla' for this model width.")


class _Corner(NamedTuple):
  """One of the four bilinear corners of a block of sampling points (all fields (block_q,))."""
  row: Array  # int32 row of the concatenated value map (clipped inside the level)
  weight: Array  # bilinear weight, 0 where the corner lies outside the map
  weight_dx: Array  # d weight / d x in pixels (0 outside)
  weight_dy: Array  # d weight / d y in pixels (0 outside)


def _bilinear_corners(location_x: Array, location_y: Array, height: int, width: int,
                      level_start: int) -> list[_Corner]:
  """The four corners of normalised (x, y) on one (height, width) level, align_corners=False."""
  x = location_x * width - 0.5
  y = location_y * height - 0.5
  x0 = jnp.floor(x)
  y0 = jnp.floor(y)
  frac_x = x - x0
  frac_y = y - y0
  corners = []
  for dy, weight_y, sign_y in ((0, 1.0 - frac_y, -1.0), (1, frac_y, 1.0)):
    for dx, weight_x, sign_x in ((0, 1.0 - frac_x, -1.0), (1, frac_x, 1.0)):
      corner_x = x0 + dx
      corner_y = y0 + dy
      inside = (corner_x >= 0) & (corner_x <= width - 1) & (corner_y >= 0) & (corner_y <= height - 1)
      flat = jnp.clip(corner_y, 0, height - 1) * width + jnp.clip(corner_x, 0, width - 1)
      row = flat.astype(jnp.int32) + level_start
      corners.append(_Corner(
          row=row,
          weight=jnp.where(inside, weight_x * weight_y, 0.0),
          weight_dx=jnp.where(inside, sign_x * weight_y, 0.0),
          weight_dy=jnp.where(inside, sign_y * weight_x, 0.0)))
  return corners


def _level_starts(spatial_shapes: SpatialShapes) -> list[int]:
  return [int(s) for s in np.cumsum([0] + [h * w for h, w in spatial_shapes[:-1]])]


def _load_rows(value_ref, rows: Array) -> Array:
  """value_ref[rows, :] as float32 (block_q, head_dim): one gathered row per query.

  Two broadcast integer indices (rather than (rows, slice)) because that is the form both Triton's pointer
  arithmetic and the interpreter's discharge rule accept.
  """
  columns = jnp.arange(value_ref.shape[-1], dtype=jnp.int32)
  return value_ref[rows[:, None], columns[None, :]].astype(jnp.float32)


def _forward_kernel(value_ref, locations_ref, weights_ref, output_ref, *, spatial_shapes: SpatialShapes,
                    num_points: int):
  """One (batch, head, query block): output = sum over levels, points, corners of weight * value row.

  Refs: value (S, head_dim); locations (block_q, L, P, 2); weights (block_q, L, P); output (block_q, head_dim).
  """
  accumulator = jnp.zeros(output_ref.shape, jnp.float32)
  for level, ((height, width), level_start) in enumerate(zip(spatial_shapes, _level_starts(spatial_shapes))):
    for point in range(num_points):
      location_x = locations_ref[:, level, point, 0].astype(jnp.float32)
      location_y = locations_ref[:, level, point, 1].astype(jnp.float32)
      attention = weights_ref[:, level, point].astype(jnp.float32)
      for corner in _bilinear_corners(location_x, location_y, height, width, level_start):
        accumulator += (attention * corner.weight)[:, None] * _load_rows(value_ref, corner.row)
  output_ref[...] = accumulator.astype(output_ref.dtype)


def _scatter_add_rows(grad_value_ref, rows: Array, contribution: Array, use_atomics: bool) -> None:
  """grad_value_ref[rows[i], :] += contribution[i] for every i, duplicates accumulating."""
  if use_atomics:
    columns = jnp.arange(grad_value_ref.shape[-1], dtype=jnp.int32)
    pl_triton.atomic_add(grad_value_ref, (rows[:, None], columns[None, :]), contribution)
  else:
    # Interpret mode: see the module docstring (the discharged atomic would drop duplicate rows).
    grad_value_ref[...] = grad_value_ref[...].at[rows].add(contribution)


def _backward_kernel(value_ref, locations_ref, weights_ref, grad_output_ref, grad_value_init_ref,
                     grad_value_ref, grad_locations_ref, grad_weights_ref, *, spatial_shapes: SpatialShapes,
                     num_points: int, use_atomics: bool):
  """One (batch, head, query block) of the VJP: recompute the corners, reduce and scatter their gradients.

  With s_c = <value row of corner c, grad_output> per query:
    d weights       = sum_c w_c * s_c
    d location_x    = weights * width * sum_c (d w_c / d x) * s_c   (same for y with height)
    d value[row_c] += weights * w_c * grad_output
  `grad_value_init_ref` is the zero-filled buffer aliased to `grad_value_ref` (float32, shared by all query
  blocks of a (batch, head)).
  """
  del grad_value_init_ref  # Same buffer as grad_value_ref.
  grad_output = grad_output_ref[...].astype(jnp.float32)
  for level, ((height, width), level_start) in enumerate(zip(spatial_shapes, _level_starts(spatial_shapes))):
    for point in range(num_points):
      location_x = locations_ref[:, level, point, 0].astype(jnp.float32)
      location_y = locations_ref[:, level, point, 1].astype(jnp.float32)
      attention = weights_ref[:, level, point].astype(jnp.float32)
      grad_attention = jnp.zeros_like(attention)
      grad_x = jnp.zeros_like(attention)
      grad_y = jnp.zeros_like(attention)
      for corner in _bilinear_corners(location_x, location_y, height, width, level_start):
        corner_dot = jnp.sum(_load_rows(value_ref, corner.row) * grad_output, axis=1)
        grad_attention += corner.weight * corner_dot
        grad_x += corner.weight_dx * corner_dot
        grad_y += corner.weight_dy * corner_dot
        _scatter_add_rows(grad_value_ref, corner.row, (attention * corner.weight)[:, None] * grad_output,
                          use_atomics)
      grad_weights_ref[:, level, point] = grad_attention.astype(grad_weights_ref.dtype)
      grad_locations_ref[:, level, point, 0] = (attention * width * grad_x).astype(grad_locations_ref.dtype)
      grad_locations_ref[:, level, point, 1] = (attention * height * grad_y).astype(grad_locations_ref.dtype)


def _pad_queries(array: Array, padded_queries: int) -> Array:
  """Zero-pads axis 1 (queries) to a whole number of blocks.

  Padded queries cannot leak: their outputs are sliced off, so their output cotangent is zero and every
  gradient they would scatter or reduce is zero too (and their zero attention weights sample nothing).
  """
  padding = padded_queries - array.shape[1]
  if padding == 0:
    return array
  return jnp.pad(array, [(0, 0), (0, padding)] + [(0, 0)] * (array.ndim - 2))


class _Config(NamedTuple):
  """Static (hashable) arguments of the custom-VJP op."""
  spatial_shapes: SpatialShapes
  block_sizes: BlockSizes
  interpret: bool
  backend: str


def _grid_and_specs(config: _Config, value: Array, locations: Array):
  """Grid (query blocks, batch, heads) and the BlockSpecs shared by forward and backward.

  Query blocks come first because Triton launches the first grid axis fastest: programs that run at the same
  time then read (and, backward, atomically update) the same (batch, head) value map, which stays in L2; the
  first axis is also the one without CUDA's 65535 limit.
  """
  batch, num_values, num_heads, head_dim = value.shape
  _, padded_queries, _, num_levels, num_points, _ = locations.shape
  block_q = config.block_sizes.block_q
  grid = (padded_queries // block_q, batch, num_heads)
  # `None` squeezes batch and head out of the kernel's view; the value map of one (batch, head) is whole.
  value_spec = pl.BlockSpec((None, num_values, None, head_dim), lambda q, b, h: (b, 0, h, 0))
  locations_spec = pl.BlockSpec((None, block_q, None, num_levels, num_points, 2),
                                lambda q, b, h: (b, q, h, 0, 0, 0))
  weights_spec = pl.BlockSpec((None, block_q, None, num_levels, num_points), lambda q, b, h: (b, q, h, 0, 0))
  rows_spec = pl.BlockSpec((None, block_q, None, head_dim), lambda q, b, h: (b, q, h, 0))
  return grid, value_spec, locations_spec, weights_spec, rows_spec


def _compiler_params(config: _Config):
  """Triton's parameters on GPU (they also select the Triton lowering over Mosaic GPU); none elsewhere."""
  if config.interpret or config.backend not in _COMPILED_BACKENDS:
    return None
  return pl_triton.CompilerParams(num_warps=config.block_sizes.num_warps,
                                  num_stages=config.block_sizes.num_stages)


def _forward(config: _Config, value: Array, locations: Array, weights: Array) -> Array:
  """pallas_call of the forward kernel on query-padded inputs; returns (B, Q_padded, heads, head_dim)."""
  batch, _, num_heads, head_dim = value.shape
  padded_queries, num_points = locations.shape[1], locations.shape[4]
  grid, value_spec, locations_spec, weights_spec, rows_spec = _grid_and_specs(config, value, locations)
  kernel = functools.partial(_forward_kernel, spatial_shapes=config.spatial_shapes, num_points=num_points)
  return pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[value_spec, locations_spec, weights_spec],
      out_specs=rows_spec,
      out_shape=jax.ShapeDtypeStruct((batch, padded_queries, num_heads, head_dim), value.dtype),
      compiler_params=_compiler_params(config),
      interpret=config.interpret,
      name="deform_attn_forward",
  )(value, locations, weights)


def _backward(config: _Config, value: Array, locations: Array, weights: Array,
              grad_output: Array) -> tuple[Array, Array, Array]:
  """pallas_call of the backward kernel; float32 gradients of value, locations, weights."""
  num_points = locations.shape[4]
  grid, value_spec, locations_spec, weights_spec, rows_spec = _grid_and_specs(config, value, locations)
  kernel = functools.partial(_backward_kernel, spatial_shapes=config.spatial_shapes, num_points=num_points,
                             use_atomics=not config.interpret)
  grad_value_init = jnp.zeros(value.shape, jnp.float32)
  return pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[value_spec, locations_spec, weights_spec, rows_spec, value_spec],
      out_specs=[value_spec, locations_spec, weights_spec],
      out_shape=[jax.ShapeDtypeStruct(value.shape, jnp.float32),
                 jax.ShapeDtypeStruct(locations.shape, jnp.float32),
                 jax.ShapeDtypeStruct(weights.shape, jnp.float32)],
      input_output_aliases={4: 0},
      compiler_params=_compiler_params(config),
      interpret=config.interpret,
      name="deform_attn_backward",
  )(value, locations, weights, grad_output, grad_value_init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _deform_attn(config: _Config, value: Array, locations: Array, weights: Array) -> Array:
  return _forward(config, value, locations, weights)


def _deform_attn_fwd(config: _Config, value: Array, locations: Array, weights: Array):
  # Only the inputs are saved: the backward kernel recomputes corners instead of storing (Q, L, P, 4) of them.
  return _forward(config, value, locations, weights), (value, locations, weights)


def _deform_attn_bwd(config: _Config, residuals, grad_output: Array):
  value, locations, weights = residuals
  grad_value, grad_locations, grad_weights = _backward(config, value, locations, weights, grad_output)
  return (grad_value.astype(value.dtype), grad_locations.astype(locations.dtype),
          grad_weights.astype(weights.dtype))


_deform_attn.defvjp(_deform_attn_fwd, _deform_attn_bwd)


def _split_axes(mesh, entry, dim: int):
  """`entry` (mesh axis, tuple of them, or None) if its devices divide `dim`, else None (replicated)."""
  if entry is None:
    return None
  axes = entry if isinstance(entry, tuple) else (entry,)
  size = math.prod(mesh.shape[axis] for axis in axes)
  return entry if size > 1 and dim % size == 0 else None


def _mesh_partition(value: Array):
  """PartitionSpecs that split the kernels over the ambient mesh's batch and heads axes, or None.

  A pallas_call is opaque to XLA's SPMD partitioner, which would gather its operands onto every device and
  repeat the whole batch there. Under `jax.set_mesh(...)` and flax logical-axis rules (as the trainer runs),
  the call is instead wrapped in `shard_map` over the mesh axes that the rules give "batch" and "heads":
  every (batch, head) pair is independent, so each device runs the kernels on its own slice, gradients
  included. A mesh axis that does not divide its dimension is left replicated.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  rules_spec = nn.logical_to_mesh_axes(("batch", "length", "heads", None))
  if rules_spec is None:
    return None
  batch_entry, _, heads_entry, _ = tuple(rules_spec) + (None,) * (4 - len(rules_spec))
  batch_axes = _split_axes(mesh, batch_entry, value.shape[0])
  heads_axes = _split_axes(mesh, heads_entry, value.shape[2])
  if batch_axes is None and heads_axes is None:
    return None
  rows = PartitionSpec(batch_axes, None, heads_axes)  # value, locations, weights, output: (B, *, heads, ...)
  return mesh, rows


def multi_scale_deformable_attention_pallas(
    value: Array,
    spatial_shapes: Sequence[Sequence[int]],
    sampling_locations: Array,
    attention_weights: Array,
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
    backend: str | None = None,
) -> Array:
  """Multi-scale deformable attention as Pallas kernels, differentiable in all three array arguments.

  Same contract as `omniris_jax.models.deform_attn.multi_scale_deformable_attention` (shapes, normalised
  (x, y) locations, zero padding, align_corners=False).

  Args:
    value: (B, S, heads, head_dim), levels flattened row-major and concatenated.
    spatial_shapes: static ((H_l, W_l), ...).
    sampling_locations: (B, Q, heads, L, P, 2) normalised (x, y); outside [0, 1] reads zeros.
    attention_weights: (B, Q, heads, L, P).
    block_sizes: tiling; defaults to `BlockSizes.for_backend(backend)`.
    interpret: run the kernels in Pallas' interpreter; None means "on CPU only".
    backend: the platform to compile for; None means `jax.default_backend()`. Only GPU compiles; on TPU a
      ValueError says to use implementation="xla".

  Returns:
    (B, Q, heads * head_dim) in value's dtype (accumulated in float32).
  """
  spatial_shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
  backend = backend or jax.default_backend()
  if interpret is None:
    interpret = backend == "cpu"
  block_sizes = block_sizes or BlockSizes.for_backend("cpu" if interpret else backend)
  _check_kernel_inputs(value, spatial_shapes, sampling_locations, attention_weights, block_sizes, interpret,
                       backend)
  batch, num_queries, num_heads = sampling_locations.shape[:3]
  head_dim = value.shape[-1]
  # Few queries (the prompt generator's 20) need no block larger than the next power of two above them.
  block_sizes = dataclasses.replace(block_sizes,
                                    block_q=min(block_sizes.block_q, pl.next_power_of_2(num_queries)))
  padded_queries = pl.cdiv(num_queries, block_sizes.block_q) * block_sizes.block_q
  config = _Config(spatial_shapes, block_sizes, bool(interpret), backend)
  attend = functools.partial(_deform_attn, config)
  partition = _mesh_partition(value)
  if partition is not None:
    mesh, rows = partition
    attend = jax.shard_map(attend, mesh=mesh, in_specs=(rows, rows, rows), out_specs=rows, check_vma=False)
  output = attend(value, _pad_queries(sampling_locations, padded_queries),
                  _pad_queries(attention_weights, padded_queries))
  return output[:, :num_queries].reshape(batch, num_queries, num_heads * head_dim)


def _registered(value: Array, spatial_shapes: SpatialShapes, sampling_locations: Array,
                attention_weights: Array) -> Array:
  """The registry entry: backend defaults, interpret mode on CPU."""
  return multi_scale_deformable_attention_pallas(value, spatial_shapes, sampling_locations, attention_weights)


deform_attn.register_implementation("pallas", _registered)
