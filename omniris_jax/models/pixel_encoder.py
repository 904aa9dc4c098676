"""The pixel encoder: Mask2Former/ReLA's multi-scale deformable-attention encoder plus an FPN to stride 4.

The mask decoder needs the target image at three scales that have seen each other (strides 32, 16, 8, one
scale per decoder group) and one high-resolution map to paint masks on (stride 4). Swin's four stages are
projected to a common width D, mixed across scales by deformable self-attention (every position of every
level samples a few points on all three levels), and the stride-8 result is upsampled onto Swin's stride-4
stage FPN-style. This is `MSDeformAttnPixelDecoder` of Mask2Former as ReLA and the OmniSegNet release use it.

Layout (parameter names under `pixel_encoder/`):
  input_proj_{0,1,2}   1x1 conv (xavier) + GroupNorm of res5, res4, res3 to D (level order: coarse to fine)
  level_embed          (3, D) learned level embedding, N(0, 1) as in Deformable DETR
  encoder_layer_{i}    deformable self-attention (heads, points) + post-norm, FFN (ReLU) + post-norm
  lateral_conv, lateral_norm   1x1 conv (no bias) + GroupNorm of res2
  output_conv, output_norm     3x3 conv (no bias) + GroupNorm + ReLU after adding the upsampled stride-8 level
  mask_features        1x1 conv to `mask_dim`
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from omniris_jax.models import deform_attn, layers

Array = jax.Array

# Swin stage names, finest first, and the three the deformable encoder attends over (coarse to fine, the order
# of `multi_scale_features`).
FEATURE_NAMES = ("res2", "res3", "res4", "res5")
ENCODER_FEATURE_NAMES = ("res5", "res4", "res3")


def GroupNorm(num_groups: int, *, name: str | None = None) -> nn.GroupNorm:  # noqa: N802
  """`nn.GroupNorm` over NHWC channels with PyTorch's epsilon (1e-5) and logical axis names on its params."""
  return nn.GroupNorm(
      num_groups=num_groups,
      epsilon=1e-5,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("conv_out",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
      name=name,
  )


def grid_reference_points(spatial_shapes: Sequence[tuple[int, int]]) -> Array:
  """Normalised pixel centres of every level, flattened and concatenated: (S, 2) as (x, y).

  Each position of the deformable encoder is a query whose reference point is its own centre; with unpadded
  maps (valid ratio 1) the same point serves every level.
  """
  points = []
  for height, width in spatial_shapes:
    ys, xs = np.meshgrid((np.arange(height) + 0.5) / height, (np.arange(width) + 0.5) / width, indexing="ij")
    points.append(np.stack([xs.reshape(-1), ys.reshape(-1)], -1))
  return jnp.asarray(np.concatenate(points, 0), jnp.float32)


@dataclasses.dataclass(frozen=True)
class PixelEncoderConfig:
  """Width and depth of the pixel encoder.

  Attributes:
    hidden_dim: D, the width of every level and of the FPN (256 in the paper).
    mask_dim: channels of `mask_features` (256).
    num_layers: deformable encoder layers (6).
    num_heads: deformable attention heads (8).
    num_points: sampling points per head and level (4).
    ffn_dim: hidden width of the encoder FFN (1024).
    dropout_rate: dropout in the encoder layers (Mask2Former/ReLA train with 0.0).
    group_norm_groups: groups of every GroupNorm (32); must divide `hidden_dim`.
    implementation: deformable-attention kernel, see `deform_attn.available_implementations()`.
  """

  hidden_dim: int = 256
  mask_dim: int = 256
  num_layers: int = 6
  num_heads: int = 8
  num_points: int = 4
  ffn_dim: int = 1024
  dropout_rate: float = 0.0
  group_norm_groups: int = 32
  implementation: str = "xla"

  def __post_init__(self):
    if self.hidden_dim % self.num_heads:
      raise ValueError(f"{self.hidden_dim=} must be a multiple of {self.num_heads=}")
    if self.hidden_dim % self.group_norm_groups:
      raise ValueError(f"{self.hidden_dim=} must be a multiple of {self.group_norm_groups=}")
    if self.hidden_dim % 4:
      raise ValueError(f"{self.hidden_dim=} must be a multiple of 4 (2-D sine positions)")

  @classmethod
  def paper(cls) -> PixelEncoderConfig:
    """OmniSegNet / ReLA / Mask2Former: D=256, 6 layers, 8 heads, 4 points, FFN 1024."""
    return cls()

  @classmethod
  def demo(cls) -> PixelEncoderConfig:
    """Small enough to train on a CPU in the demo."""
    return cls(hidden_dim=64, mask_dim=64, num_layers=2, num_heads=4, num_points=4, ffn_dim=256,
               group_norm_groups=16)

  @classmethod
  def tiny_test(cls) -> PixelEncoderConfig:
    """A few tens of thousands of parameters, for tests."""
    return cls(hidden_dim=32, mask_dim=16, num_layers=1, num_heads=4, num_points=2, ffn_dim=64,
               group_norm_groups=8)


class DeformableEncoderLayer(nn.Module):
  """Post-norm deformable self-attention + FFN over the flattened multi-scale map (Deformable DETR encoder)."""

  config: PixelEncoderConfig
  num_levels: int

  @nn.compact
  def __call__(self, features: Array, position: Array, reference_points: Array,
               spatial_shapes: Sequence[tuple[int, int]], *, deterministic: bool = True) -> Array:
    """features, position: (B, S, D); reference_points: (B, S, L, 2). Returns (B, S, D)."""
    cfg = self.config
    attended = deform_attn.MSDeformAttn(cfg.hidden_dim, cfg.num_heads, self.num_levels, cfg.num_points,
                                        implementation=cfg.implementation, name="self_attn")(
                                            features + position, reference_points, features, spatial_shapes)
    attended = nn.Dropout(cfg.dropout_rate)(attended, deterministic=deterministic)
    features = layers.LayerNorm(name="norm1")(features + attended)
    hidden = layers.Mlp(cfg.ffn_dim, activation=nn.relu, dropout_rate=cfg.dropout_rate, name="ffn")(
        features, deterministic=deterministic)
    hidden = nn.Dropout(cfg.dropout_rate)(hidden, deterministic=deterministic)
    features = layers.LayerNorm(name="norm2")(features + hidden)
    return layers.constrain(features, ("batch", "length", "embed"))


def check_features(features: Mapping[str, Array], names: Sequence[str], where: str) -> None:
  """Raises a ValueError naming the missing or malformed Swin stage."""
  missing = [name for name in names if name not in features]
  if missing:
    raise ValueError(f"{where}: features lack {missing}; pass the image encoder's dict with keys {list(names)} "
                     f"(got {sorted(features)}).")
  batch = features[names[0]].shape[0]
  for name in names:
    if features[name].ndim != 4 or features[name].shape[0] != batch:
      raise ValueError(f"{where}: features[{name!r}].shape={features[name].shape} must be (B={batch}, h, w, C) "
                       "NHWC.")


class PixelEncoder(nn.Module):
  """Swin features -> (mask_features at stride 4, [stride 32, 16, 8] features of width D).

  Call with the image encoder's dict `{"res2": (B, H/4, W/4, C2), ..., "res5": (B, H/32, W/32, C5)}`.
  Returns `(mask_features (B, H/4, W/4, mask_dim), [(B, H/32, W/32, D), (B, H/16, W/16, D),
  (B, H/8, W/8, D)])`; the list is the decoder's per-group memory, coarse to fine.
  """

  config: PixelEncoderConfig

  @nn.compact
  def __call__(self, features: Mapping[str, Array], *,
               deterministic: bool = True) -> tuple[Array, list[Array]]:
    cfg = self.config
    check_features(features, FEATURE_NAMES, "PixelEncoder")
    xavier = nn.initializers.xavier_uniform()
    c2_xavier = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")  # detectron2's c2_xavier_fill
    num_levels = len(ENCODER_FEATURE_NAMES)

    # ---- project res5, res4, res3 to D; positions = sine encoding + learned level embedding ----
    level_embed = self.param("level_embed", nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ("table", "embed")), (num_levels, cfg.hidden_dim))
    spatial_shapes, levels, positions = [], [], []
    for level, name in enumerate(ENCODER_FEATURE_NAMES):
      x = layers.Conv(cfg.hidden_dim, (1, 1), kernel_init=xavier, name=f"input_proj_{level}")(features[name])
      x = GroupNorm(cfg.group_norm_groups, name=f"input_norm_{level}")(x)
      batch, height, width, _ = x.shape
      spatial_shapes.append((height, width))
      levels.append(x.reshape(batch, height * width, cfg.hidden_dim))
      position = layers.sine_position_encoding(height, width, cfg.hidden_dim, pixel_centres=False)
      position = position + level_embed[level]
      positions.append(position.reshape(height * width, cfg.hidden_dim))
    spatial_shapes = tuple(spatial_shapes)
    flat = layers.constrain(jnp.concatenate(levels, axis=1), ("batch", "length", "embed"))
    position = jnp.concatenate(positions, axis=0)[None]
    reference_points = grid_reference_points(spatial_shapes)
    reference_points = jnp.broadcast_to(reference_points[None, :, None, :],
                                        (flat.shape[0], flat.shape[1], num_levels, 2))

    # ---- deformable encoder ----
    for index in range(cfg.num_layers):
      flat = DeformableEncoderLayer(cfg, num_levels, name=f"encoder_layer_{index}")(
          flat, position, reference_points, spatial_shapes, deterministic=deterministic)

    multi_scale_features, start = [], 0
    for height, width in spatial_shapes:
      level = flat[:, start:start + height * width].reshape(flat.shape[0], height, width, cfg.hidden_dim)
      multi_scale_features.append(layers.constrain(level, ("batch", "height", "width", "embed")))
      start += height * width

    # ---- FPN: res2 lateral + bilinearly upsampled stride-8 level -> 3x3 conv -> stride-4 map ----
    lateral = layers.Conv(cfg.hidden_dim, (1, 1), use_bias=False, kernel_init=c2_xavier,
                          name="lateral_conv")(features["res2"])
    lateral = GroupNorm(cfg.group_norm_groups, name="lateral_norm")(lateral)
    finest = multi_scale_features[-1]
    # jax.image.resize's bilinear upsampling uses half-pixel centres, i.e. F.interpolate(align_corners=False).
    upsampled = jax.image.resize(finest, (finest.shape[0], *lateral.shape[1:3], cfg.hidden_dim), "bilinear")
    fpn = layers.Conv(cfg.hidden_dim, (3, 3), use_bias=False, kernel_init=c2_xavier,
                      name="output_conv")(lateral + upsampled)
    fpn = nn.relu(GroupNorm(cfg.group_norm_groups, name="output_norm")(fpn))
    mask_features = layers.Conv(cfg.mask_dim, (1, 1), kernel_init=c2_xavier, name="mask_features")(fpn)
    mask_features = layers.constrain(mask_features, ("batch", "height", "width", "embed"))
    return mask_features, multi_scale_features
