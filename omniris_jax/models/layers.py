"""Building blocks shared by every OmniSegNet module, with logical axis names on every parameter.

Models never name a mesh axis. They name *logical* axes, and the config's rules map those to mesh axes
(`omniris_jax.sharding`). The vocabulary, used everywhere in `models/`:

  parameters:  'embed'  a model-width dimension (the input side of a projection, norms)
               'mlp'    the hidden width of a feed-forward block
               'heads'  the fused heads x head_dim side of query/key/value/output projections
               'vocab'  token / position / type embedding tables
               'conv_in', 'conv_out'  channel dimensions of convolution kernels (spatial dims are None)
               'table'  small lookup tables (relative-position biases, level embeddings, learnable queries)
  activations: 'batch', 'length' (tokens / queries), 'height', 'width', 'embed', 'mlp', 'heads'

A rule such as ('mlp', 'model') shards feed-forward weights over the model axis; unmapped names replicate.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

default_kernel_init = nn.initializers.lecun_normal()


def gelu(x: Array) -> Array:
  """GELU in its exact erf form, as BERT and Swin define it (not the tanh approximation)."""
  return nn.gelu(x, approximate=False)


def sine_position_encoding(height: int, width: int, dim: int, *, pixel_centres: bool,
                           temperature: float = 10000.0) -> np.ndarray:
  """DETR's 2-D sine position encoding of a (height, width) grid: (height, width, dim) float32, a constant.

  The first dim/2 channels encode y, the last dim/2 encode x; channel k of each half is sin(p / f_k) for even
  k and cos(p / f_k) for odd k, with f_k = temperature^(2*(k//2)/(dim/2)). Positions are normalised to
  (0, 2*pi], so the encoding does not depend on the resolution:
    pixel_centres=True:  p = (i + 0.5) / n * 2*pi, the centre of pixel i (the mask decoder's);
    pixel_centres=False: p = (i + 1) / (n + 1e-6) * 2*pi, Mask2Former's `PositionEmbeddingSine(dim // 2,
                         normalize=True)` on an unpadded map (the pixel encoder's).
  """
  if dim % 4:
    raise ValueError(f"{dim=} must be a multiple of 4 (sin and cos for each of y and x)")
  num_features = dim // 2

  def normalised(n):
    if pixel_centres:
      return (np.arange(n, dtype=np.float64) + 0.5) / n * 2 * math.pi
    return np.arange(1, n + 1, dtype=np.float64) / (n + 1e-6) * 2 * math.pi

  k = np.arange(num_features)
  frequencies = temperature ** (2 * (k // 2) / num_features)

  def encode(positions):
    angles = positions[:, None] / frequencies
    return np.where(k % 2 == 0, np.sin(angles), np.cos(angles))

  pos_y = np.broadcast_to(encode(normalised(height))[:, None, :], (height, width, num_features))
  pos_x = np.broadcast_to(encode(normalised(width))[None, :, :], (height, width, num_features))
  return np.concatenate([pos_y, pos_x], axis=-1).astype(np.float32)


def constrain(x: Array, axes: Sequence[str | None]) -> Array:
  """Annotates an activation with logical axes; a no-op outside a mesh with rules."""
  return nn.with_logical_constraint(x, tuple(axes))


def Dense(  # noqa: N802 - a factory that reads like the module it returns
    features: int,
    kernel_axes: tuple[str | None, str | None] = ("embed", "mlp"),
    *,
    use_bias: bool = True,
    kernel_init: Initializer = default_kernel_init,
    bias_init: Initializer = nn.initializers.zeros_init(),
    dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Dense:
  """`nn.Dense` whose kernel (in, out) and bias (out,) carry logical axis names."""
  return nn.Dense(
      features,
      use_bias=use_bias,
      dtype=dtype,
      kernel_init=nn.with_logical_partitioning(kernel_init, kernel_axes),
      bias_init=nn.with_logical_partitioning(bias_init, (kernel_axes[-1],)),
      name=name,
  )


def LayerNorm(  # noqa: N802
    epsilon: float = 1e-5, axis_name: str = "embed", *, dtype: Dtype = jnp.float32, name: str | None = None
) -> nn.LayerNorm:
  """`nn.LayerNorm` (params `scale`, `bias`) with logical axis names; statistics in float32."""
  return nn.LayerNorm(
      epsilon=epsilon,
      dtype=dtype,
      param_dtype=jnp.float32,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (axis_name,)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axis_name,)),
      name=name,
  )


def Conv(  # noqa: N802
    features: int,
    kernel_size: tuple[int, int],
    strides: tuple[int, int] = (1, 1),
    padding: Any = "SAME",
    *,
    use_bias: bool = True,
    kernel_init: Initializer = default_kernel_init,
    dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Conv:
  """NHWC `nn.Conv` whose kernel (kh, kw, in, out) carries logical axis names."""
  return nn.Conv(
      features,
      kernel_size,
      strides=strides,
      padding=padding,
      use_bias=use_bias,
      dtype=dtype,
      kernel_init=nn.with_logical_partitioning(kernel_init, (None, None, "conv_in", "conv_out")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
      name=name,
  )


class MultiHeadAttention(nn.Module):
  """Multi-head attention with separate `query`/`key`/`value` projections and an `out` projection.

  One module serves BERT self-attention, Swin window attention (relative-position bias and shift mask come in
  through `bias`) and the decoders' cross-attention. Softmax runs in float32.

  Attributes:
    num_heads: number of heads; the width must divide by it.
    out_features: output width (defaults to the query width).
    qkv_features: width of the query/key/value projections (defaults to the query width).
    dropout_rate: dropout on the attention probabilities.
  """

  num_heads: int
  out_features: int | None = None
  qkv_features: int | None = None
  dropout_rate: float = 0.0
  use_bias: bool = True
  kernel_init: Initializer = default_kernel_init
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self,
      inputs_q: Array,
      inputs_kv: Array | None = None,
      *,
      inputs_v: Array | None = None,
      bias: Array | None = None,
      key_padding_mask: Array | None = None,
      deterministic: bool = True,
  ) -> Array:
    """Attends from `inputs_q` (..., Lq, D) to `inputs_kv` (..., Lk, Dkv) (self-attention when None).

    Args:
      inputs_v: values from a different input than the keys (..., Lk, Dv); DETR-style decoders add positions to
        queries and keys but not to values. Defaults to `inputs_kv`.
      bias: additive logits bias broadcastable to (..., heads, Lq, Lk).
      key_padding_mask: (..., Lk) with True (or 1) for keys that may be attended to.
    """
    if inputs_kv is None:
      inputs_kv = inputs_q
    if inputs_v is None:
      inputs_v = inputs_kv
    qkv_features = self.qkv_features or inputs_q.shape[-1]
    out_features = self.out_features or inputs_q.shape[-1]
    if qkv_features % self.num_heads:
      raise ValueError(f"{qkv_features=} must be a multiple of {self.num_heads=}")
    head_dim = qkv_features // self.num_heads

    def project(x, name):
      y = Dense(qkv_features, ("embed", "heads"), use_bias=self.use_bias, kernel_init=self.kernel_init,
                dtype=self.dtype, name=name)(x)
      return y.reshape(*y.shape[:-1], self.num_heads, head_dim)

    query = project(inputs_q, "query")
    key = project(inputs_kv, "key")
    value = project(inputs_v, "value")
    logits = jnp.einsum("...qhd,...khd->...hqk", query, key).astype(jnp.float32) / jnp.sqrt(head_dim)
    if bias is not None:
      logits = logits + bias.astype(jnp.float32)
    if key_padding_mask is not None:
      valid = key_padding_mask.astype(bool)[..., None, None, :]
      logits = jnp.where(valid, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    probs = nn.Dropout(self.dropout_rate)(probs, deterministic=deterministic)
    out = jnp.einsum("...hqk,...khd->...qhd", probs, value)
    out = out.reshape(*out.shape[:-2], qkv_features)
    return Dense(out_features, ("heads", "embed"), use_bias=self.use_bias, kernel_init=self.kernel_init,
                 dtype=self.dtype, name="out")(out)


class Mlp(nn.Module):
  """Two-layer feed-forward block `fc1 -> activation -> dropout -> fc2` (transformer FFN)."""

  hidden_features: int
  out_features: int | None = None
  activation: Callable[[Array], Array] = gelu
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
    out_features = self.out_features or x.shape[-1]
    x = Dense(self.hidden_features, ("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
    x = self.activation(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    return Dense(out_features, ("mlp", "embed"), dtype=self.dtype, name="fc2")(x)
