"""Multi-scale deformable attention (Deformable DETR) in plain jax.numpy, and the module built on it.

Both the pixel encoder (self-attention over the target image's strides 8/16/32) and the omni-prompt encoder
(cross-attention from learnable prompt queries into the reference image's features) attend this way: each query
looks at a few learned points per head and level instead of every pixel, which is what makes attention over
~20k multi-scale positions affordable.

The sampling semantics are those of Deformable DETR's `ms_deform_attn_core_pytorch`, i.e. `F.grid_sample` with
`mode='bilinear', padding_mode='zeros', align_corners=False`: a normalised location `loc` in [0, 1] maps to the
pixel coordinate `loc * size - 0.5` (pixel centres sit at half-integers of the normalised grid), and each of the
four bilinear corners that falls outside the feature map contributes zero. The tests pin this against
`torch.nn.functional.grid_sample`.

`multi_scale_deformable_attention(..., implementation=...)` is the single dispatch point between the jnp
version here ("xla", the reference) and accelerator kernels. A kernel module plugs in by calling
`register_implementation(name, fn)` at import; names listed in `_PLUGIN_MODULES` are imported on first use, so
callers only ever pass a string and never import a kernel module themselves.
"""

from __future__ import annotations

import importlib
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from omniris_jax.models import layers

Array = jax.Array
SpatialShapes = tuple[tuple[int, int], ...]
# fn(value, spatial_shapes, sampling_locations, attention_weights) -> (B, Q, heads * head_dim); inputs are
# already validated by `multi_scale_deformable_attention`.
Implementation = Callable[[Array, SpatialShapes, Array, Array], Array]

_IMPLEMENTATIONS: dict[str, Implementation] = {}
# Implementations that live in optional modules: imported (which registers them) the first time they are asked
# for, so `import omniris_jax` never pays for Pallas and callers never import kernels.
_PLUGIN_MODULES: dict[str, str] = {"pallas": "omniris_jax.kernels.deform_attn_pallas"}


def register_implementation(name: str, fn: Implementation) -> None:
  """Makes `fn` selectable as `implementation=name` everywhere deformable attention is used."""
  _IMPLEMENTATIONS[name] = fn


def available_implementations() -> list[str]:
  """Names that `implementation=` accepts (registered or importable plugins), sorted."""
  return sorted(set(_IMPLEMENTATIONS) | set(_PLUGIN_MODULES))


def get_implementation(name: str) -> Implementation:
  """Returns the registered implementation `name`, importing its plugin module if needed."""
  if name not in _IMPLEMENTATIONS and name in _PLUGIN_MODULES:
    module_name = _PLUGIN_MODULES[name]
    try:
      importlib.import_module(module_name)
    except ImportError as e:
      raise ValueError(
          f"implementation={name!r} is not available: its module {module_name} could not be imported ({e}). "
          f"Use one of {sorted(_IMPLEMENTATIONS)}.") from e
    if name not in _IMPLEMENTATIONS:
      raise ValueError(f"implementation={name!r}: module {module_name} was imported but did not call "
                       f"register_implementation({name!r}, ...).")
  if name not in _IMPLEMENTATIONS:
    raise ValueError(f"implementation={name!r} is unknown; choose one of {available_implementations()}.")
  return _IMPLEMENTATIONS[name]


def _check_inputs(value: Array, spatial_shapes: SpatialShapes, sampling_locations: Array,
                  attention_weights: Array) -> None:
  """Raises a ValueError naming the argument whose shape disagrees with the others."""
  if value.ndim != 4:
    raise ValueError(f"value must be (batch, sum(H*W), heads, head_dim); got {value.shape=}")
  batch, num_values, num_heads, _ = value.shape
  expected_values = sum(h * w for h, w in spatial_shapes)
  if num_values != expected_values:
    raise ValueError(f"value has {num_values} positions but {spatial_shapes=} sums to {expected_values}; "
                     "flatten each level row-major and concatenate them in the order of spatial_shapes.")
  if sampling_locations.ndim != 6 or sampling_locations.shape[-1] != 2:
    raise ValueError("sampling_locations must be (batch, queries, heads, levels, points, 2); got "
                     f"{sampling_locations.shape=}")
  _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
  expected_loc = (batch, num_queries, num_heads, len(spatial_shapes), num_points, 2)
  if sampling_locations.shape != expected_loc:
    raise ValueError(f"{sampling_locations.shape=} must be {expected_loc} "
                     f"(batch and heads from {value.shape=}, levels from {len(spatial_shapes)=}).")
  if attention_weights.shape != expected_loc[:-1]:
    raise ValueError(f"{attention_weights.shape=} must be {expected_loc[:-1]} to match sampling_locations.")


def multi_scale_deformable_attention(
    value: Array,
    spatial_shapes: Sequence[Sequence[int]],
    sampling_locations: Array,
    attention_weights: Array,
    *,
    implementation: str = "xla",
) -> Array:
  """Weighted sum of bilinearly sampled values: the core of multi-scale deformable attention.

  Args:
    value: (B, S, heads, head_dim), S = sum(H_l * W_l); levels flattened row-major, concatenated in the order
      of `spatial_shapes`.
    spatial_shapes: static sequence of (H_l, W_l), one per level.
    sampling_locations: (B, Q, heads, L, P, 2) normalised (x, y); (0, 0) is the top-left corner of the map and
      (1, 1) the bottom-right; values outside [0, 1] are allowed and read zeros beyond the border.
    attention_weights: (B, Q, heads, L, P), usually a softmax over L*P.
    implementation: "xla" (this module's jnp version) or a registered kernel; see
      `available_implementations()`.

  Returns:
    (B, Q, heads * head_dim), heads major.
  """
  spatial_shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
  _check_inputs(value, spatial_shapes, sampling_locations, attention_weights)
  return get_implementation(implementation)(value, spatial_shapes, sampling_locations, attention_weights)


def _bilinear_corners(locations: Array, spatial_shapes: SpatialShapes) -> tuple[Array, Array]:
  """Flat value indices and weights of the four bilinear corners, `grid_sample(align_corners=False)` style.

  Args:
    locations: (..., L, P, 2) normalised (x, y), level axis third from the end.
    spatial_shapes: the L (H_l, W_l).

  Returns:
    (index, weight), each (..., L, P, 4): `index` into the concatenated levels (level start offsets added),
    `weight` the bilinear weight. A corner outside its map gets a clipped index and weight 0, which is exactly
    zero padding; the weights keep their gradient w.r.t. the locations (floor() has none), as grid_sample's do.
  """
  heights = jnp.asarray([h for h, _ in spatial_shapes], jnp.float32)[:, None]  # (L, 1) against (L, P)
  widths = jnp.asarray([w for _, w in spatial_shapes], jnp.float32)[:, None]
  starts = jnp.asarray(np.cumsum([0] + [h * w for h, w in spatial_shapes[:-1]]), jnp.int32)[:, None]
  x = locations[..., 0] * widths - 0.5
  y = locations[..., 1] * heights - 0.5
  x0 = jnp.floor(x)
  y0 = jnp.floor(y)
  frac_x = x - x0
  frac_y = y - y0
  indices, weights = [], []
  for dy, weight_y in ((0, 1.0 - frac_y), (1, frac_y)):
    for dx, weight_x in ((0, 1.0 - frac_x), (1, frac_x)):
      corner_x = x0 + dx
      corner_y = y0 + dy
      inside = (corner_x >= 0) & (corner_x <= widths - 1) & (corner_y >= 0) & (corner_y <= heights - 1)
      flat = jnp.clip(corner_y, 0, heights - 1) * widths + jnp.clip(corner_x, 0, widths - 1)
      indices.append(starts + flat.astype(jnp.int32))
      weights.append(jnp.where(inside, weight_x * weight_y, 0.0))
  return jnp.stack(indices, -1), jnp.stack(weights, -1)


def _multi_scale_deformable_attention_xla(
    value: Array,
    spatial_shapes: SpatialShapes,
    sampling_locations: Array,
    attention_weights: Array,
) -> Array:
  """Gather-based reference implementation: one gather and one contraction, no Python loop over queries.

  Every (batch, head) pair gathers its L*P*4 corner vectors per query from its own (S, head_dim) table and
  contracts them with bilinear x attention weights. jit- and grad-friendly (the value gradient is the
  scatter-add XLA derives from the gather).
  """
  batch, _, num_heads, head_dim = value.shape
  num_queries = sampling_locations.shape[1]
  # Heads move next to batch so each (batch, head) pair gathers from its own (S, head_dim) table.
  value = jnp.transpose(value, (0, 2, 1, 3)).reshape(batch * num_heads, -1, head_dim)
  locations = jnp.transpose(sampling_locations, (0, 2, 1, 3, 4, 5)).reshape(
      batch * num_heads, num_queries, *sampling_locations.shape[3:])
  weights = jnp.transpose(attention_weights, (0, 2, 1, 3, 4)).reshape(
      batch * num_heads, num_queries, *attention_weights.shape[3:])
  index, corner_weight = _bilinear_corners(locations, spatial_shapes)  # (N, Q, L, P, 4)
  weights = (corner_weight * weights[..., None]).reshape(batch * num_heads, num_queries, -1)
  gather = jax.vmap(lambda table, rows: jnp.take(table, rows, axis=0, mode="clip"))
  sampled = gather(value, index.reshape(batch * num_heads, -1)).reshape(
      batch * num_heads, num_queries, -1, head_dim)
  output = jnp.einsum("nqkd,nqk->nqd", sampled, weights.astype(sampled.dtype))
  output = output.reshape(batch, num_heads, num_queries, head_dim)
  return jnp.transpose(output, (0, 2, 1, 3)).reshape(batch, num_queries, num_heads * head_dim)


register_implementation("xla", _multi_scale_deformable_attention_xla)


def sampling_offsets_bias_init(num_heads: int, num_levels: int, num_points: int):
  """Deformable DETR's offset bias: head h looks along direction 2*pi*h/heads, point p at distance p+1.

  Each direction is scaled so its larger component is 1 (points land on a square ring of pixels), the same
  for every level; with the zero kernel this spreads the initial samples around the reference point.
  Layout of the flat bias: (heads, levels, points, 2) with (x, y) last.
  """

  def init(key, shape, dtype=jnp.float32):
    del key
    thetas = np.arange(num_heads, dtype=np.float64) * (2.0 * math.pi / num_heads)
    directions = np.stack([np.cos(thetas), np.sin(thetas)], -1)
    directions = directions / np.abs(directions).max(-1, keepdims=True)
    distance = np.arange(1, num_points + 1, dtype=np.float64)[None, None, :, None]
    grid = np.broadcast_to(directions[:, None, None, :] * distance, (num_heads, num_levels, num_points, 2))
    flat = grid.reshape(-1)
    if flat.shape != tuple(shape):
      raise ValueError(f"offset bias {shape=} must be ({num_heads * num_levels * num_points * 2},)")
    return jnp.asarray(flat, dtype)

  return init


class MSDeformAttn(nn.Module):
  """Multi-scale deformable attention: each query samples `num_points` points per head and level.

  Offsets and attention weights are predicted from the query; the sampling grid is centred on the query's
  reference point. Initialised as in Deformable DETR: zero offset kernel with the polar bias
  (`sampling_offsets_bias_init`), zero attention-weight kernel and bias (uniform attention over levels x points
  at init), xavier-uniform value/output projections with zero biases.

  Attributes:
    dim: model width D (input and output).
    num_heads: heads; D must divide by it.
    num_levels: feature levels L that `value_input` holds.
    num_points: sampling points P per head and level.
    implementation: the kernel behind `multi_scale_deformable_attention` ("xla" or a registered one).
  """

  dim: int
  num_heads: int
  num_levels: int
  num_points: int
  implementation: str = "xla"
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(
      self,
      query: Array,
      reference_points: Array,
      value_input: Array,
      spatial_shapes: Sequence[Sequence[int]],
      value_padding_mask: Array | None = None,
  ) -> Array:
    """Attends from `query` (B, Q, D) into `value_input` (B, S, D).

    Args:
      query: (B, Q, D), positional embeddings already added if wanted.
      reference_points: (B, Q, L, 2) normalised (x, y) per level.
      value_input: (B, S, D), levels flattened row-major in the order of `spatial_shapes`.
      spatial_shapes: static ((H_l, W_l), ...), length `num_levels`.
      value_padding_mask: optional (B, S), True where a value is valid; others are zeroed before sampling.

    Returns:
      (B, Q, D).
    """
    if self.dim % self.num_heads:
      raise ValueError(f"{self.dim=} must be a multiple of {self.num_heads=}")
    if len(spatial_shapes) != self.num_levels:
      raise ValueError(f"{len(spatial_shapes)=} must equal {self.num_levels=}")
    batch, num_queries, _ = query.shape
    if reference_points.shape != (batch, num_queries, self.num_levels, 2):
      raise ValueError(f"{reference_points.shape=} must be {(batch, num_queries, self.num_levels, 2)} "
                       "(batch, queries, levels, xy)")
    if value_padding_mask is not None and value_padding_mask.shape != value_input.shape[:2]:
      raise ValueError(f"{value_padding_mask.shape=} must be {value_input.shape[:2]} (batch, values)")
    head_dim = self.dim // self.num_heads
    xavier = nn.initializers.xavier_uniform()
    zeros = nn.initializers.zeros_init()

    value = layers.Dense(self.dim, ("embed", "heads"), kernel_init=xavier, dtype=self.dtype,
                         name="value_proj")(value_input)
    if value_padding_mask is not None:
      value = jnp.where(value_padding_mask.astype(bool)[..., None], value, 0)
    value = layers.constrain(value, ("batch", "length", "heads"))
    value = value.reshape(*value.shape[:2], self.num_heads, head_dim)

    offsets = layers.Dense(
        self.num_heads * self.num_levels * self.num_points * 2, ("embed", "heads"), kernel_init=zeros,
        bias_init=sampling_offsets_bias_init(self.num_heads, self.num_levels, self.num_points),
        dtype=self.dtype, name="sampling_offsets")(query)
    offsets = offsets.reshape(batch, num_queries, self.num_heads, self.num_levels, self.num_points, 2)
    logits = layers.Dense(self.num_heads * self.num_levels * self.num_points, ("embed", "heads"),
                          kernel_init=zeros, dtype=self.dtype, name="attention_weights")(query)
    logits = logits.reshape(batch, num_queries, self.num_heads, self.num_levels * self.num_points)
    attention_weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).reshape(
        batch, num_queries, self.num_heads, self.num_levels, self.num_points)

    # Offsets are in pixels of each level; dividing by (W_l, H_l) makes them normalised like the references.
    offset_normalizer = jnp.asarray([(w, h) for h, w in spatial_shapes], jnp.float32)
    sampling_locations = (reference_points[:, :, None, :, None, :].astype(jnp.float32)
                          + offsets.astype(jnp.float32) / offset_normalizer[None, None, None, :, None, :])
    output = multi_scale_deformable_attention(value, spatial_shapes, sampling_locations,
                                              attention_weights.astype(value.dtype),
                                              implementation=self.implementation)
    output = layers.constrain(output, ("batch", "length", "heads"))
    return layers.Dense(self.dim, ("heads", "embed"), kernel_init=xavier, dtype=self.dtype,
                        name="output_proj")(output)
