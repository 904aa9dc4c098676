"""Swin Transformer image encoder (the OmniSegNet target/reference image backbone) and its HF weight importer.

The module reproduces transformers' PyTorch `SwinBackbone` with `out_features=stage1..stage4`, which is also what
Mask2Former/ReLA's detectron2 Swin computes: every stage partitions into windows (`always_partition=True` in HF),
feature maps whose size is not a window multiple are zero-padded *after* `layernorm_before`, the shifted-window
mask is built on the padded size, and each stage's output (before patch merging) gets its own LayerNorm.
Pretrained Swin weights come from HF-format checkpoints (`load_hf_swin`); no Swin weights ship in any package, so
the importer is proven by parity against the PyTorch model on random weights (tests/test_swin.py).

Parameter tree of `Swin(config)` (what `load_hf_swin` returns; S = number of stages, D_s = depths[s]):

  patch_embed/projection/{kernel (p, p, 3, C), bias (C,)}          4x4 stride-4 conv, HWIO
  patch_embed/norm/{scale, bias} (C,)
  stage{s}/block{b}/layernorm_before/{scale, bias} (C_s,)          s < S, b < D_s, C_s = C * 2**s
  stage{s}/block{b}/attention/{query,key,value,out}/{kernel (C_s, C_s), bias (C_s,)}
  stage{s}/block{b}/relative_position_bias_table ((2w-1)**2, heads_s)
  stage{s}/block{b}/layernorm_after/{scale, bias} (C_s,)
  stage{s}/block{b}/mlp/fc1/{kernel (C_s, r*C_s), bias}, mlp/fc2/{kernel (r*C_s, C_s), bias}
  stage{s}/patch_merging/norm/{scale, bias} (4*C_s,)                s < S - 1
  stage{s}/patch_merging/reduction/kernel (4*C_s, 2*C_s)            (no bias)
  norm_res{s+2}/{scale, bias} (C_s,)                                 one output norm per stage

Deviations from HF, on purpose: drop-path is applied to both residual branches (attention and MLP) as in the
original Swin and detectron2's Swin (HF applies it to the attention branch only; identical at inference). The
window never shrinks for small stages: HF's `SwinLayer` shrinks it only on `SwinModel`'s path
(`always_partition=False`), which in transformers 5.x crashes when it triggers (the bias table keeps the
configured window), while `SwinBackbone` always partitions with the configured window and shift.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from omniris_jax.models import layers

Array = jax.Array

# HF's shifted-window mask value (not -inf): kept so imported weights reproduce HF logits exactly.
_SHIFT_MASK_VALUE = -100.0


@dataclasses.dataclass(frozen=True)
class SwinConfig:
  """Hyper-parameters of the Swin encoder; field names follow HF's `SwinConfig` where they overlap.

  Attributes:
    embed_dim: width C of stage 0; stage s has width C * 2**s.
    depths: number of Swin blocks per stage.
    num_heads: attention heads per stage.
    window_size: side of the square attention window (the relative-position table covers (2w-1)**2 offsets).
    patch_size: side (and stride) of the patch-embedding convolution.
    mlp_ratio: MLP hidden width as a multiple of the block width.
    drop_path_rate: stochastic-depth rate of the last block; block i of N gets rate * i / (N - 1).
    layer_norm_eps: epsilon of the blocks' two LayerNorms (HF uses 1e-5 for all other norms; so do we).
    dtype: computation dtype name ("float32" or "bfloat16"); parameters and norm statistics stay float32.
    remat: recompute each block in the backward pass (saves activation memory at 480x480).
  """

  embed_dim: int = 96
  depths: tuple[int, ...] = (2, 2, 6, 2)
  num_heads: tuple[int, ...] = (3, 6, 12, 24)
  window_size: int = 7
  patch_size: int = 4
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  layer_norm_eps: float = 1e-5
  dtype: str = "float32"
  remat: bool = False

  def __post_init__(self):
    # Lists from ml_collections / JSON become tuples so the config stays hashable (a static jit argument).
    object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
    object.__setattr__(self, "num_heads", tuple(int(h) for h in self.num_heads))
    if len(self.depths) != len(self.num_heads):
      raise ValueError(f"{self.depths=} and {self.num_heads=} must have one entry per stage")
    for stage, heads in enumerate(self.num_heads):
      width = self.embed_dim * 2**stage
      if width % heads:
        raise ValueError(f"stage {stage} width {width} (embed_dim * 2**stage) must be a multiple of its "
                         f"num_heads={heads}")
    if self.window_size < 1 or self.patch_size < 1:
      raise ValueError(f"{self.window_size=} and {self.patch_size=} must be positive")
    if not 0.0 <= self.drop_path_rate < 1.0:
      raise ValueError(f"{self.drop_path_rate=} must be in [0, 1)")

  @property
  def num_stages(self) -> int:
    return len(self.depths)

  @property
  def output_names(self) -> tuple[str, ...]:
    """Names of the stage outputs, 'res2' (stride 4) onwards."""
    return tuple(f"res{stage + 2}" for stage in range(self.num_stages))

  @property
  def output_channels(self) -> dict[str, int]:
    return {name: self.embed_dim * 2**stage for stage, name in enumerate(self.output_names)}

  @classmethod
  def tiny_test(cls) -> SwinConfig:
    """About 40k parameters: fast to compile; has shifted blocks in every stage."""
    return cls(embed_dim=4, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2), window_size=4)

  @classmethod
  def demo(cls) -> SwinConfig:
    """About 2M parameters, for the CPU demo (128x128 inputs give 32/16/8/4 stage sizes)."""
    return cls(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=8, drop_path_rate=0.1)

  @classmethod
  def swin_t(cls) -> SwinConfig:
    """Swin-T (drop-path 0.3 as in Mask2Former/ReLA's Swin configs)."""
    return cls(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, drop_path_rate=0.3)

  @classmethod
  def swin_b(cls) -> SwinConfig:
    """Swin-B with window 12, the paper's image encoder (ImageNet-22k 384 checkpoints)."""
    return cls(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12,
               drop_path_rate=0.3)


# ----------------------------------------------------------------------------------------------------------
# Static helpers: window partition, relative-position index, shift mask (numpy at trace time = constants)
# ----------------------------------------------------------------------------------------------------------


def window_partition(x: Array, window_size: int) -> Array:
  """(B, H, W, C) with H, W multiples of the window -> (B, num_windows, window_size**2, C), row-major windows."""
  batch, height, width, channels = x.shape
  x = x.reshape(batch, height // window_size, window_size, width // window_size, window_size, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch, -1, window_size * window_size, channels)


def window_merge(windows: Array, window_size: int, height: int, width: int) -> Array:
  """Inverse of `window_partition`: (B, num_windows, window_size**2, C) -> (B, H, W, C)."""
  batch, _, _, channels = windows.shape
  x = windows.reshape(batch, height // window_size, width // window_size, window_size, window_size, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch, height, width, channels)


def relative_position_index(window_size: int) -> np.ndarray:
  """(w*w, w*w) index into the (2w-1)**2 bias table for each (query, key) pair of a window.

  The offset (dh, dw) = query - key, each in [-(w-1), w-1], is flattened as (dh + w - 1) * (2w - 1) + dw + w - 1.
  Computed, never stored: it depends on the window size only.
  """
  coords = np.stack(np.meshgrid(np.arange(window_size), np.arange(window_size), indexing="ij"))  # (2, w, w)
  coords = coords.reshape(2, -1)
  offsets = coords[:, :, None] - coords[:, None, :] + (window_size - 1)  # (2, w*w, w*w), in [0, 2w-2]
  return offsets[0] * (2 * window_size - 1) + offsets[1]


def shifted_window_mask(height: int, width: int, window_size: int, shift_size: int) -> np.ndarray:
  """(num_windows, w*w, w*w) additive mask for the cyclically shifted (padded) map of size height x width.

  After rolling by -shift, each window may hold pixels from up to 3x3 regions that were not neighbours; a
  query may attend only to keys of its own region (0 for the same region, -100 otherwise, as HF and the
  original Swin do).
  """

  def regions(size):
    index = np.arange(size)
    return (index >= size - window_size).astype(np.int32) + (index >= size - shift_size).astype(np.int32)

  region = regions(height)[:, None] * 3 + regions(width)[None, :]  # (H, W)
  region_windows = np.asarray(window_partition(region[None, :, :, None], window_size))[0, :, :, 0]  # (nW, w*w)
  same_region = region_windows[:, :, None] == region_windows[:, None, :]
  return np.where(same_region, 0.0, _SHIFT_MASK_VALUE).astype(np.float32)


def pad_to_multiple(x: Array, multiple: int) -> Array:
  """Zero-pads (B, H, W, C) at the bottom/right so H and W divide by `multiple` (as HF's maybe_pad)."""
  _, height, width, _ = x.shape
  pad_h, pad_w = -height % multiple, -width % multiple
  if pad_h or pad_w:
    x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
  return x


_ACTIVATION_AXES = ("batch", "height", "width", "embed")


def _drop_path(module: nn.Module, x: Array, rate: float, deterministic: bool) -> Array:
  """Stochastic depth: zeroes the whole residual branch per sample with probability `rate`, rescaling the rest."""
  if deterministic or rate == 0.0:
    return x
  keep_prob = 1.0 - rate
  keep = jax.random.bernoulli(module.make_rng("dropout"), keep_prob, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / keep_prob, jnp.zeros_like(x))


# ----------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------


class PatchEmbedding(nn.Module):
  """Non-overlapping patch_size x patch_size patches -> embed_dim channels (strided conv), then LayerNorm."""

  embed_dim: int
  patch_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: Array) -> Array:
    """(B, H, W, 3) -> (B, ceil(H/p), ceil(W/p), C); sizes that are not multiples of p are zero-padded first."""
    x = pad_to_multiple(images.astype(self.dtype), self.patch_size)
    x = layers.Conv(self.embed_dim, (self.patch_size, self.patch_size), strides=(self.patch_size,) * 2,
                    padding="VALID", dtype=self.dtype, name="projection")(x)
    x = layers.LayerNorm(1e-5, dtype=self.dtype, name="norm")(x)
    return layers.constrain(x, _ACTIVATION_AXES)


class SwinBlock(nn.Module):
  """One Swin block: (shifted) window attention with relative-position bias, then an MLP; pre-norm residuals.

  Attributes:
    num_heads: attention heads.
    window_size: window side.
    shift_size: cyclic shift (0 for regular windows, window_size // 2 for shifted ones).
    mlp_ratio: MLP hidden width / block width.
    drop_path_rate: stochastic-depth rate of this block.
    layer_norm_eps: epsilon of the two LayerNorms.
    dtype: computation dtype.
  """

  num_heads: int
  window_size: int
  shift_size: int
  mlp_ratio: float
  drop_path_rate: float = 0.0
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    """(B, H, W, C) -> (B, H, W, C). `deterministic` is positional so `nn.remat` can mark it static."""
    _, height, width, channels = x.shape
    window, shift = self.window_size, self.shift_size

    shortcut = x
    x = layers.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="layernorm_before")(x)
    # Pad after the norm, as HF does: padded positions are exact zeros that still act as keys.
    x = pad_to_multiple(x, window)
    padded_height, padded_width = x.shape[1:3]
    if shift:
      x = jnp.roll(x, (-shift, -shift), axis=(1, 2))
    windows = window_partition(x, window)  # (B, nW, w*w, C)

    table = self.param(
        "relative_position_bias_table",
        # ('table', None): the heads dimension is num_heads itself (tiny), not the fused projection width.
        nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02), ("table", None)),
        ((2 * window - 1) ** 2, self.num_heads),
        jnp.float32,
    )
    index = relative_position_index(window).reshape(-1)
    bias = table[index].reshape(window * window, window * window, self.num_heads).transpose(2, 0, 1)  # (h, N, N)
    if shift:
      mask = shifted_window_mask(padded_height, padded_width, window, shift)  # (nW, N, N)
      bias = bias[None] + jnp.asarray(mask)[:, None]  # (nW, h, N, N), broadcasts over the batch
    attended = layers.MultiHeadAttention(
        num_heads=self.num_heads, kernel_init=nn.initializers.truncated_normal(0.02), dtype=self.dtype,
        name="attention")(windows, bias=bias, deterministic=deterministic)

    x = window_merge(attended, window, padded_height, padded_width)
    if shift:
      x = jnp.roll(x, (shift, shift), axis=(1, 2))
    x = x[:, :height, :width, :]
    x = shortcut + _drop_path(self, x, self.drop_path_rate, deterministic)
    x = layers.constrain(x, _ACTIVATION_AXES)

    y = layers.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="layernorm_after")(x)
    y = layers.Mlp(int(self.mlp_ratio * channels), dtype=self.dtype, name="mlp")(y, deterministic=deterministic)
    x = x + _drop_path(self, y, self.drop_path_rate, deterministic)
    return layers.constrain(x, _ACTIVATION_AXES)


class PatchMerging(nn.Module):
  """Halves the resolution and doubles the width: 2x2 neighbourhoods concatenated, LayerNorm, Linear 4C -> 2C."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C); odd sizes are zero-padded at the bottom/right first."""
    channels = x.shape[-1]
    x = pad_to_multiple(x, 2)
    # The order is part of the weight layout of every pretrained Swin: (0,0), (1,0), (0,1), (1,1) as (row, col).
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
    x = layers.LayerNorm(1e-5, axis_name="mlp", dtype=self.dtype, name="norm")(x)
    x = layers.Dense(2 * channels, ("mlp", "embed"), use_bias=False,
                     kernel_init=nn.initializers.truncated_normal(0.02), dtype=self.dtype, name="reduction")(x)
    return layers.constrain(x, _ACTIVATION_AXES)


class SwinStage(nn.Module):
  """The blocks of one stage (regular and shifted windows alternating), then optional patch merging.

  Attributes:
    config: the encoder config.
    stage: index of this stage.
    drop_path_rates: one stochastic-depth rate per block.
    downsample: whether a patch-merging layer follows (all stages but the last).
  """

  config: SwinConfig
  stage: int
  drop_path_rates: tuple[float, ...]
  downsample: bool

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> tuple[Array, Array | None]:
    """Returns (stage output before merging, input of the next stage or None after the last stage)."""
    config = self.config
    dtype = jnp.dtype(config.dtype)
    block_cls = nn.remat(SwinBlock, static_argnums=(2,)) if config.remat else SwinBlock
    for block in range(config.depths[self.stage]):
      x = block_cls(
          num_heads=config.num_heads[self.stage],
          window_size=config.window_size,
          shift_size=0 if block % 2 == 0 else config.window_size // 2,
          mlp_ratio=config.mlp_ratio,
          drop_path_rate=self.drop_path_rates[block],
          layer_norm_eps=config.layer_norm_eps,
          dtype=dtype,
          name=f"block{block}",
      )(x, deterministic)
    merged = PatchMerging(dtype=dtype, name="patch_merging")(x) if self.downsample else None
    return x, merged


class Swin(nn.Module):
  """Swin encoder returning four normalised feature maps at strides 4, 8, 16, 32 (NHWC).

  Attributes:
    config: a `SwinConfig`.
  """

  config: SwinConfig

  @nn.compact
  def __call__(self, images: Array, *, deterministic: bool = True) -> dict[str, Array]:
    """Encodes already-normalised images (B, H, W, 3) of any size.

    Returns:
      {"res2": (B, H2, W2, C), "res3": (B, H3, W3, 2C), "res4": (.., 4C), "res5": (.., 8C)} with
      H2 = ceil(H / patch_size) and each later size ceil(previous / 2), each after its own LayerNorm.
    """
    config = self.config
    if images.ndim != 4:
      raise ValueError(f"{images.shape=} must be (batch, height, width, channels) NHWC")
    dtype = jnp.dtype(config.dtype)
    x = self.patch_embedding(images)

    total_blocks = sum(config.depths)
    rates = [config.drop_path_rate * i / max(total_blocks - 1, 1) for i in range(total_blocks)]
    outputs = {}
    for stage, name in enumerate(config.output_names):
      first = sum(config.depths[:stage])
      stage_out, x = SwinStage(
          config, stage, tuple(rates[first:first + config.depths[stage]]),
          downsample=stage < config.num_stages - 1, name=f"stage{stage}")(x, deterministic)
      out = layers.LayerNorm(1e-5, dtype=dtype, name=f"norm_{name}")(stage_out)
      outputs[name] = layers.constrain(out, _ACTIVATION_AXES)
    return outputs

  def patch_embedding(self, images: Array) -> Array:
    """The stem, images -> stage-0 tokens (params under `patch_embed/`); a subclass may replace it."""
    config = self.config
    return PatchEmbedding(config.embed_dim, config.patch_size, dtype=jnp.dtype(config.dtype),
                          name="patch_embed")(images)


# ----------------------------------------------------------------------------------------------------------
# HF importer
# ----------------------------------------------------------------------------------------------------------

# Checkpoint keys that carry nothing `Swin` uses: buffers we recompute, the pooled/classifier heads and the
# final `layernorm` of SwinModel/SwinForImageClassification (the backbone normalises each stage itself).
_IGNORED_KEYS = (
    re.compile(r".*relative_position_index$"),
    re.compile(r"^layernorm\.(weight|bias)$"),
    re.compile(r"^pooler\..*"),
    re.compile(r"^classifier\..*"),
)

# Older HF checkpoints (and `save_pretrained` of transformers 5.x, which writes the legacy layout) name the
# block's sub-layers differently from the in-memory 5.x modules; both map to one canonical form.
_LEGACY_RENAMES = (
    (re.compile(r"\.attention\.self\.query\."), ".attention.q_proj."),
    (re.compile(r"\.attention\.self\.key\."), ".attention.k_proj."),
    (re.compile(r"\.attention\.self\.value\."), ".attention.v_proj."),
    (re.compile(r"\.attention\.self\.relative_position_bias_table$"),
     ".attention.relative_position_bias.relative_position_bias_table"),
    (re.compile(r"\.attention\.output\.dense\."), ".attention.o_proj."),
    (re.compile(r"\.intermediate\.dense\."), ".mlp.fc1."),
    (re.compile(r"(\.blocks\.\d+)\.output\.dense\."), r"\1.mlp.fc2."),
)


def _canonical_key(key: str) -> str:
  """Strips the `swin.` prefix and maps legacy sub-layer names to the transformers 5.x module names."""
  if key.startswith("swin."):
    key = key[len("swin."):]
  for pattern, replacement in _LEGACY_RENAMES:
    key = pattern.sub(replacement, key)
  return key


def _swin_config_from_hf(hf_config: Mapping[str, Any]) -> SwinConfig:
  """Builds a `SwinConfig` from an HF config.json dict, refusing features `Swin` does not implement."""
  unsupported = {
      "use_absolute_embeddings": (hf_config.get("use_absolute_embeddings", False), False),
      "hidden_act": (hf_config.get("hidden_act", "gelu"), "gelu"),
      "qkv_bias": (hf_config.get("qkv_bias", True), True),
  }
  for field, (value, supported) in unsupported.items():
    if value != supported:
      raise ValueError(f"HF Swin config has {field}={value!r}; Swin supports only {field}={supported!r}")
  if "model_type" in hf_config and hf_config["model_type"] != "swin":
    raise ValueError(f"config.json has model_type={hf_config['model_type']!r}; load_hf_swin reads 'swin' "
                     "checkpoints (SwinModel / SwinBackbone)")
  return SwinConfig(
      embed_dim=int(hf_config["embed_dim"]),
      depths=tuple(hf_config["depths"]),
      num_heads=tuple(hf_config["num_heads"]),
      window_size=int(hf_config["window_size"]),
      patch_size=int(hf_config.get("patch_size", 4)),
      mlp_ratio=float(hf_config.get("mlp_ratio", 4.0)),
      drop_path_rate=float(hf_config.get("drop_path_rate", 0.0)),
      layer_norm_eps=float(hf_config.get("layer_norm_eps", 1e-5)),
  )


def _hf_key_map(config: SwinConfig) -> dict[tuple[str, ...], tuple[str, str]]:
  """Our param path -> (canonical HF key, conversion) with conversion in {'copy', 'linear', 'conv'}."""
  mapping = {
      ("patch_embed", "projection", "kernel"): ("embeddings.patch_embeddings.projection.weight", "conv"),
      ("patch_embed", "projection", "bias"): ("embeddings.patch_embeddings.projection.bias", "copy"),
      ("patch_embed", "norm", "scale"): ("embeddings.norm.weight", "copy"),
      ("patch_embed", "norm", "bias"): ("embeddings.norm.bias", "copy"),
  }

  def norm(ours, theirs):
    mapping[ours + ("scale",)] = (theirs + ".weight", "copy")
    mapping[ours + ("bias",)] = (theirs + ".bias", "copy")

  def linear(ours, theirs, bias=True):
    mapping[ours + ("kernel",)] = (theirs + ".weight", "linear")
    if bias:
      mapping[ours + ("bias",)] = (theirs + ".bias", "copy")

  for stage in range(config.num_stages):
    hf_stage = f"encoder.layers.{stage}"
    for block in range(config.depths[stage]):
      ours, theirs = (f"stage{stage}", f"block{block}"), f"{hf_stage}.blocks.{block}"
      norm(ours + ("layernorm_before",), f"{theirs}.layernorm_before")
      for our_name, hf_name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("out", "o_proj")):
        linear(ours + ("attention", our_name), f"{theirs}.attention.{hf_name}")
      mapping[ours + ("relative_position_bias_table",)] = (
          f"{theirs}.attention.relative_position_bias.relative_position_bias_table", "copy")
      norm(ours + ("layernorm_after",), f"{theirs}.layernorm_after")
      linear(ours + ("mlp", "fc1"), f"{theirs}.mlp.fc1")
      linear(ours + ("mlp", "fc2"), f"{theirs}.mlp.fc2")
    if stage < config.num_stages - 1:
      norm((f"stage{stage}", "patch_merging", "norm"), f"{hf_stage}.downsample.norm")
      linear((f"stage{stage}", "patch_merging", "reduction"), f"{hf_stage}.downsample.reduction", bias=False)
    norm((f"norm_res{stage + 2}",), f"hidden_states_norms.stage{stage + 1}")
  return mapping


def swin_param_shapes(config: SwinConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Shapes of every parameter of `Swin(config)`, by path, from an abstract init (no compute, no memory)."""
  abstract = jax.eval_shape(
      lambda: Swin(config).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float32)))
  flat = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract["params"]))[0]
  return {tuple(entry.key for entry in path): tuple(leaf.shape) for path, leaf in flat}


def _convert(array: np.ndarray, conversion: str) -> np.ndarray:
  if conversion == "linear":  # torch Linear (out, in) -> Dense (in, out)
    return array.T
  if conversion == "conv":  # torch Conv2d OIHW -> flax HWIO
    return array.transpose(2, 3, 1, 0)
  return array


def load_hf_swin(path: str | os.PathLike,
                 config: SwinConfig | Mapping[str, Any] | None = None) -> tuple[SwinConfig, dict[str, Any]]:
  """Imports HF Swin weights (SwinModel, SwinBackbone or SwinForImageClassification layout) for `Swin`.

  Args:
    path: an HF-format folder (config.json + model.safetensors) or a single .safetensors file; for a file the
      config comes from `config` or from a config.json next to it.
    config: a `SwinConfig`, or an HF config dict, overriding the config.json (required for a lone file).

  Returns:
    (SwinConfig, params): params is the plain nested dict documented in this module's docstring, float32,
    ready for `Swin(config).apply({"params": params}, images)`. Checkpoints without the backbone's
    `hidden_states_norms` (SwinModel / classification) get identity output norms (scale 1, bias 0), as HF's
    `SwinBackbone.from_pretrained` initialises them.

  Raises:
    FileNotFoundError: no safetensors file or no config.
    ValueError: missing or unexpected keys, or shape mismatches (all named).
  """
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  path = os.fspath(path)
  if os.path.isdir(path):
    weights_path, config_path = os.path.join(path, "model.safetensors"), os.path.join(path, "config.json")
  else:
    weights_path, config_path = path, os.path.join(os.path.dirname(path), "config.json")
  if not os.path.isfile(weights_path):
    raise FileNotFoundError(f"{weights_path=} does not exist: pass an HF folder with model.safetensors or a "
                            ".safetensors file (sharded checkpoints are not supported)")
  if isinstance(config, SwinConfig):
    swin_config = config
  elif config is not None:
    swin_config = _swin_config_from_hf(config)
  elif os.path.isfile(config_path):
    with open(config_path) as f:
      swin_config = _swin_config_from_hf(json.load(f))
  else:
    raise FileNotFoundError(f"no config for {weights_path=}: expected {config_path=} or the `config` argument")

  raw = load_file(weights_path)
  tensors: dict[str, np.ndarray] = {}
  for key, value in raw.items():
    canonical = _canonical_key(key)
    if any(pattern.match(canonical) for pattern in _IGNORED_KEYS):
      continue
    if canonical in tensors:
      raise ValueError(f"checkpoint key {key!r} duplicates another key after prefix/legacy-name normalisation")
    tensors[canonical] = value

  key_map = _hf_key_map(swin_config)
  expected_shapes = swin_param_shapes(swin_config)
  if set(key_map) != set(expected_shapes):  # a programming error, not a user one
    raise AssertionError(f"importer map and module disagree: {set(key_map) ^ set(expected_shapes)}")

  output_norm_keys = {hf for hf, _ in key_map.values() if hf.startswith("hidden_states_norms.")}
  fill_output_norms = not output_norm_keys & set(tensors)
  if fill_output_norms:
    logging.info("load_hf_swin: %s has no hidden_states_norms (not a SwinBackbone checkpoint); "
                 "output norms start as identity", weights_path)

  missing, mismatched, flat = [], [], {}
  for ours, (hf_key, conversion) in key_map.items():
    shape = expected_shapes[ours]
    if hf_key not in tensors:
      if fill_output_norms and hf_key in output_norm_keys:
        flat[ours] = np.ones(shape, np.float32) if ours[-1] == "scale" else np.zeros(shape, np.float32)
      else:
        missing.append(hf_key)
      continue
    value = _convert(np.asarray(tensors[hf_key], np.float32), conversion)
    if value.shape != shape:
      mismatched.append(f"{hf_key}: checkpoint {tensors[hf_key].shape} ({value.shape} after the {conversion} "
                        f"conversion) vs Swin {'/'.join(ours)} {shape}")
    flat[ours] = value
  unexpected = sorted(set(tensors) - {hf for hf, _ in key_map.values()})
  problems = []
  if missing:
    problems.append(f"missing keys {missing}")
  if unexpected:
    problems.append(f"unexpected keys {unexpected}")
  if mismatched:
    problems.append(f"shape mismatches {mismatched}")
  if problems:
    raise ValueError(f"{weights_path} does not match {swin_config}: " + "; ".join(problems)
                     + ". Check that config.json describes this checkpoint (embed_dim, depths, num_heads, "
                     "window_size).")

  params: dict[str, Any] = {}
  for ours, value in flat.items():
    node = params
    for part in ours[:-1]:
      node = node.setdefault(part, {})
    node[ours[-1]] = value
  return swin_config, params
