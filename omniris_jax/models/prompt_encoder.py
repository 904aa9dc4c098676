"""The omni-prompt encoder: a reference image plus a spatial prompt -> prompt tokens shaped like text tokens.

A visual prompt (mask, box or scribble drawn on a reference image) has to reach the same mask decoder as a
sentence. The paper (Sec. 5, Appendix A.1) does it in two steps:

  PEM (Prompt Embed Module), eq. 5: the binary prompt P is convolved down to every scale i of the reference
    features F_r and fused with them, F'_s(i) = F_r(i) + Conv_i(P(i)); the fused levels are flattened and
    concatenated into F'_r.
  Prompt Generator, eqs. 6-7: n learnable queries pass 3 layers of [deformable cross-attention into F'_r ->
    self-attention -> FFN]; n is the maximum text length (20), so the n output tokens, projected to the text
    width, stand in for a sentence in the decoder.

Which reference features: the paper says the reference image is "processed by the vision backbone to obtain the
visual features F_r" and fuses the prompt at four scales, i in {0, 1, 2, 3}, while the pixel encoder offers
only three scales plus a stride-4 map and is never mentioned for the reference. The release agrees: it feeds
the Swin backbone's res2..res5 of the reference image into the prompt encoder. So `ref_features` here are the
image encoder's (Swin's) outputs for the reference image, with the same weights that encode the target, and
this module projects each stage to D with a 1x1 conv + GroupNorm (its own `input_proj_*`). The pixel encoder
is not run on the reference image, which also keeps the cost of a visual prompt to one backbone pass.

Choices where the paper is silent, taken from the release unless noted:
  * PEM convolutions: SAM's mask downscaler. Stride 4: Conv(1->c/4, k2 s2), LN, ReLU, Conv(c/4->c, k2 s2), LN,
    ReLU, Conv(c->D, k1) with c = `mask_in_chans` (16); strides 8/16/32: Conv(D->D, k2 s2), LN, ReLU each. LN is
    a per-pixel LayerNorm over channels (eps 1e-6). Odd sizes are padded at the bottom/right before each
    stride-2 conv, the same ceil rounding as Swin's patch merging, so any reference size that Swin accepts works.
  * Fusion (`fusion`): "add" (paper default, eq. 5), "multiply" or "none" (Table 2b); with "none" the prompt
    is not used at all (and the downscaler has no parameters).
  * `mask_values_outside_prompt`: the release also zeroes every value vector whose position lies outside the
    prompt (nearest-resized to each level) before deformable sampling. The paper describes the PEM as fusion
    only, and Table 2b's "no fusion" row (62.6 cIoU, not chance) only makes sense if the prompt reaches the
    model through fusion alone; so the default is False (paper), True reproduces the release.
  * Levels are ordered coarse to fine (res5, res4, res3, res2), as in the release.
  * `level_embed` (L, D), N(0, 1) (`level_embedding`): the release allocates it uninitialised and then hands it
    (with sine positions) to an argument its deformable cross-attention ignores. Here it is initialised and added
    to the values, so every sampled vector carries which scale it came from; `level_embedding=False` is the
    release (no table at all). Sine positions are not added: a prompt token should say what the referent looks
    like, not where it sat in the reference image (the release computes them and ignores them too).
  * Queries: learned content `query_embed` (n, D) and positional `query_pos` (n, D), N(0, 1) like the release's
    nn.Embedding; reference points on the centres of a rows x cols grid (4 x 5 for n = 20, the release's grid),
    shared by all levels. With `learned_reference_points` (ours) they are parameters `reference_points` (n, 2),
    stored as logits (sigmoid keeps them inside the map) and initialised on the grid; the release keeps the grid
    fixed (its `reference_points` and `refpoint_embed` tables are never read).
  * Layers are post-norm (cross-attn, self-attn, FFN each followed by residual + LayerNorm), FFN 2048 wide with
    ReLU and dropout 0 (the release); self-attention takes query + query_pos as queries and keys and the plain
    queries as values (as the release does). A final LayerNorm, then Dense(D -> prompt_dim) +
    LayerNorm(prompt_dim) projects the tokens to the text width (the release's `lang_in_linear` / `lang_in_norm`).

`OmniPromptEncoder.__call__` is three steps that a subclass can recombine: `embed_reference` (PEM -> the memory
the queries read), `initial_queries` (the learned queries and their reference points) and `generate` (the Prompt
Generator and the projection).

Input contract (what the decoder helper passes):
  ref_features: dict from the image encoder run on the reference image (normalised like the target):
    {"res2": (B, h2, w2, C2), "res3": (B, h3, w3, C3), "res4": (B, h4, w4, C4), "res5": (B, h5, w5, C5)} at
    strides 4, 8, 16, 32 (Swin: C2..C5 = C, 2C, 4C, 8C; any channel counts work).
  ref_prompt: (B, Hr, Wr) binary (bool, int or float in {0, 1}) at the reference image's resolution, so that
    ceil(Hr/4) = h2 and halving with ceil gives h3, h4, h5 (likewise for W). Mask, box and scribble prompts are
    all just binary maps here.
Output: prompt_tokens (B, n, prompt_dim) and prompt_mask (B, n) bool, all True (every token is valid, unlike
  padded text).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from omniris_jax.models import deform_attn, layers
from omniris_jax.models.pixel_encoder import GroupNorm, check_features

Array = jax.Array

# Reference levels, coarse to fine (the release's order); `ref_features` must hold all four.
REFERENCE_FEATURE_NAMES = ("res5", "res4", "res3", "res2")
FUSION_MODES = ("add", "multiply", "none")


@dataclasses.dataclass(frozen=True)
class PromptEncoderConfig:
  """Width and depth of the omni-prompt encoder.

  Attributes:
    hidden_dim: D, the width of the fused reference features and of the queries (256).
    prompt_dim: width of the output tokens, = the text encoder's width so both share the decoder (768 for
      BERT-base; 384 for MiniLM).
    num_queries: n, = the maximum text length (20).
    num_layers: Prompt Generator layers (3).
    num_heads: heads of the deformable cross-attention and the self-attention (8).
    num_points: deformable sampling points per head and level (4).
    ffn_dim: FFN hidden width (2048, the release; the paper does not say).
    dropout_rate: dropout after each sub-layer (0.0, the release).
    fusion: how PEM fuses the prompt embedding with the reference features: "add" (paper), "multiply", "none".
    mask_values_outside_prompt: zero the values outside the (resized) prompt before sampling (release: True;
      default False per the paper, see the module docstring).
    level_embedding: add a learnt level embedding to the reference values (ours; the release adds none).
    learned_reference_points: learn the queries' reference points (ours) or keep them on the fixed grid (release).
    mask_in_chans: channels of the stride-4 mask downscaler (16, SAM's and the release's).
    group_norm_groups: groups of the input-projection GroupNorms (32); must divide `hidden_dim`.
    implementation: deformable-attention kernel, see `deform_attn.available_implementations()`.
  """

  hidden_dim: int = 256
  prompt_dim: int = 768
  num_queries: int = 20
  num_layers: int = 3
  num_heads: int = 8
  num_points: int = 4
  ffn_dim: int = 2048
  dropout_rate: float = 0.0
  fusion: str = "add"
  mask_values_outside_prompt: bool = False
  level_embedding: bool = True
  learned_reference_points: bool = True
  mask_in_chans: int = 16
  group_norm_groups: int = 32
  implementation: str = "xla"

  def __post_init__(self):
    if self.fusion not in FUSION_MODES:
      raise ValueError(f"{self.fusion=} must be one of {FUSION_MODES}")
    if self.hidden_dim % self.num_heads:
      raise ValueError(f"{self.hidden_dim=} must be a multiple of {self.num_heads=}")
    if self.hidden_dim % self.group_norm_groups:
      raise ValueError(f"{self.hidden_dim=} must be a multiple of {self.group_norm_groups=}")
    if self.mask_in_chans % 4:
      raise ValueError(f"{self.mask_in_chans=} must be a multiple of 4 (the first conv has mask_in_chans // 4)")

  @classmethod
  def paper(cls) -> PromptEncoderConfig:
    """OmniSegNet: D=256, 3 layers, 20 queries, output width 768 (BERT-base)."""
    return cls()

  @classmethod
  def release(cls) -> PromptEncoderConfig:
    """The released prompt encoder: values outside the prompt zeroed, no level embedding, fixed reference grid."""
    return cls(mask_values_outside_prompt=True, level_embedding=False, learned_reference_points=False)

  @classmethod
  def demo(cls) -> PromptEncoderConfig:
    """Small enough for the CPU demo; 384 wide to match MiniLM."""
    return cls(hidden_dim=64, prompt_dim=384, num_layers=2, num_heads=4, num_points=4, ffn_dim=256,
               group_norm_groups=16)

  @classmethod
  def tiny_test(cls) -> PromptEncoderConfig:
    """For tests: 6 queries, 1 layer, width 32."""
    return cls(hidden_dim=32, prompt_dim=24, num_queries=6, num_layers=1, num_heads=4, num_points=2,
               ffn_dim=64, mask_in_chans=8, group_norm_groups=8)


def query_grid(num_queries: int) -> np.ndarray:
  """Centres of a rows x cols grid with rows * cols = n, rows the largest divisor <= sqrt(n): (n, 2) as (x, y)."""
  rows = max(d for d in range(1, math.isqrt(num_queries) + 1) if num_queries % d == 0)
  cols = num_queries // rows
  ys, xs = np.meshgrid((np.arange(rows) + 0.5) / rows, (np.arange(cols) + 0.5) / cols, indexing="ij")
  return np.stack([xs.reshape(-1), ys.reshape(-1)], -1).astype(np.float32)


def reference_point_logits_init(key, shape, dtype=jnp.float32):
  """Inverse sigmoid of `query_grid(n)`, so sigmoid(param) starts on the grid; shape (n, 2)."""
  del key
  grid = query_grid(shape[0])
  return jnp.asarray(np.log(grid / (1.0 - grid)), dtype)


def _pad_to_even(x: Array) -> Array:
  """Pads NHWC bottom/right to even height/width, so a k2 s2 conv rounds up like Swin's patch merging."""
  return jnp.pad(x, ((0, 0), (0, x.shape[1] % 2), (0, x.shape[2] % 2), (0, 0)))


def _nearest_resize(prompt: Array, height: int, width: int) -> Array:
  """F.interpolate(mode='nearest') of (B, H, W): output pixel i reads input pixel floor(i * H / height)."""
  rows = np.floor(np.arange(height) * prompt.shape[1] / height).astype(np.int32)
  cols = np.floor(np.arange(width) * prompt.shape[2] / width).astype(np.int32)
  return prompt[:, rows][:, :, cols]


class PromptDownscaler(nn.Module):
  """SAM-style convolutions taking the binary prompt to D channels at strides 4, 8, 16, 32 (PEM's Conv_i)."""

  hidden_dim: int
  mask_in_chans: int

  @nn.compact
  def __call__(self, prompt: Array) -> list[Array]:
    """prompt: (B, Hr, Wr, 1) float. Returns [stride 4, 8, 16, 32] maps of shape (B, h, w, D)."""

    def conv_norm_relu(x, features, index):
      x = layers.Conv(features, (2, 2), strides=(2, 2), padding="VALID", name=f"conv_{index}")(_pad_to_even(x))
      return nn.relu(layers.LayerNorm(1e-6, "conv_out", name=f"norm_{index}")(x))

    x = conv_norm_relu(prompt, self.mask_in_chans // 4, 0)
    x = conv_norm_relu(x, self.mask_in_chans, 1)
    x = layers.Conv(self.hidden_dim, (1, 1), name="conv_2")(x)
    outputs = [x]
    for index in range(3, 6):
      x = conv_norm_relu(x, self.hidden_dim, index)
      outputs.append(x)
    return outputs


class PromptGeneratorLayer(nn.Module):
  """Deformable cross-attention into the fused reference -> self-attention -> FFN, each post-norm."""

  config: PromptEncoderConfig
  num_levels: int

  @nn.compact
  def __call__(self, queries: Array, query_pos: Array, reference_points: Array, memory: Array,
               spatial_shapes: Sequence[tuple[int, int]], memory_mask: Array | None, *,
               deterministic: bool = True) -> Array:
    cfg = self.config
    dropout = nn.Dropout(cfg.dropout_rate)
    attended = deform_attn.MSDeformAttn(cfg.hidden_dim, cfg.num_heads, self.num_levels, cfg.num_points,
                                        implementation=cfg.implementation, name="cross_attn")(
                                            queries + query_pos, reference_points, memory, spatial_shapes,
                                            memory_mask)
    queries = layers.LayerNorm(name="norm1")(queries + dropout(attended, deterministic=deterministic))
    with_pos = queries + query_pos
    attended = layers.MultiHeadAttention(cfg.num_heads, dropout_rate=cfg.dropout_rate, name="self_attn")(
        with_pos, with_pos, inputs_v=queries, deterministic=deterministic)
    queries = layers.LayerNorm(name="norm2")(queries + dropout(attended, deterministic=deterministic))
    hidden = layers.Mlp(cfg.ffn_dim, activation=nn.relu, dropout_rate=cfg.dropout_rate, name="ffn")(
        queries, deterministic=deterministic)
    queries = layers.LayerNorm(name="norm3")(queries + dropout(hidden, deterministic=deterministic))
    return layers.constrain(queries, ("batch", "length", "embed"))


@dataclasses.dataclass(frozen=True)
class ReferenceMemory:
  """What the Prompt Generator reads: the fused reference levels, flattened and concatenated (coarse first).

  Attributes:
    memory: (B, S, D) the levels' values, each with its level embedding added.
    memory_mask: (B, S) bool, False where values are zeroed (`mask_values_outside_prompt`), else None.
    spatial_shapes: ((h, w), ...) of the levels.
    levels: the fused levels (B, h, w, D) before the level embedding, for extensions that pool them.
  """

  memory: Array
  memory_mask: Array | None
  spatial_shapes: tuple[tuple[int, int], ...]
  levels: tuple[Array, ...]


class OmniPromptEncoder(nn.Module):
  """(reference Swin features, binary spatial prompt) -> (prompt_tokens (B, n, prompt_dim), prompt_mask (B, n)).

  See the module docstring for the exact input contract and the choices made where the paper is silent.
  """

  config: PromptEncoderConfig

  @nn.compact
  def __call__(self, ref_features: Mapping[str, Array], ref_prompt: Array, *,
               deterministic: bool = True) -> tuple[Array, Array]:
    reference = self.embed_reference(ref_features, ref_prompt)
    queries, query_pos, reference_points = self.initial_queries(ref_prompt.shape[0])
    return self.generate(queries, query_pos, reference_points, reference, deterministic=deterministic)

  def embed_reference(self, ref_features: Mapping[str, Array], ref_prompt: Array) -> ReferenceMemory:
    """PEM: the prompt embedded per scale and fused with the projected reference features (module docstring)."""
    cfg = self.config
    check_features(ref_features, REFERENCE_FEATURE_NAMES, "OmniPromptEncoder")
    batch = ref_features["res2"].shape[0]
    if ref_prompt.ndim != 3 or ref_prompt.shape[0] != batch:
      raise ValueError(f"OmniPromptEncoder: {ref_prompt.shape=} must be (B={batch}, Hr, Wr), the binary prompt "
                       "at the reference image's resolution.")
    prompt = ref_prompt.astype(jnp.float32)
    prompt_embeddings = {}
    if cfg.fusion != "none":
      downscaled = PromptDownscaler(cfg.hidden_dim, cfg.mask_in_chans, name="prompt_downscaler")(prompt[..., None])
      prompt_embeddings = dict(zip(("res2", "res3", "res4", "res5"), downscaled))
    level_embed = jnp.zeros((len(REFERENCE_FEATURE_NAMES), cfg.hidden_dim))
    if cfg.level_embedding:
      level_embed = self.param("level_embed", nn.with_logical_partitioning(
          nn.initializers.normal(1.0), ("table", "embed")), (len(REFERENCE_FEATURE_NAMES), cfg.hidden_dim))
    xavier = nn.initializers.xavier_uniform()
    spatial_shapes, fused, flat, masks = [], [], [], []
    for level, name in enumerate(REFERENCE_FEATURE_NAMES):
      x = layers.Conv(cfg.hidden_dim, (1, 1), kernel_init=xavier, name=f"input_proj_{level}")(ref_features[name])
      x = GroupNorm(cfg.group_norm_groups, name=f"input_norm_{level}")(x)
      _, height, width, _ = x.shape
      if name in prompt_embeddings:
        embedding = prompt_embeddings[name]
        if embedding.shape[1:3] != (height, width):
          raise ValueError(
              f"OmniPromptEncoder: ref_prompt {ref_prompt.shape[1:]} downscales to {embedding.shape[1:3]} at "
              f"{name}, but ref_features[{name!r}] is {(height, width)}; pass the prompt at the reference "
              "image's resolution (the one the image encoder saw).")
        x = x + embedding if cfg.fusion == "add" else x * embedding
      fused.append(x)
      spatial_shapes.append((height, width))
      flat.append((x + level_embed[level]).reshape(batch, height * width, cfg.hidden_dim))
      if cfg.mask_values_outside_prompt:
        masks.append(_nearest_resize(prompt, height, width).reshape(batch, height * width) > 0.5)
    memory = layers.constrain(jnp.concatenate(flat, axis=1), ("batch", "length", "embed"))
    memory_mask = jnp.concatenate(masks, axis=1) if masks else None
    return ReferenceMemory(memory, memory_mask, tuple(spatial_shapes), tuple(fused))

  def initial_queries(self, batch: int) -> tuple[Array, Array, Array]:
    """The learned queries (B, n, D), their positions (1, n, D) and reference points (B, n, 2) in [0, 1]."""
    cfg = self.config
    table = ("table", "embed")
    queries = self.param("query_embed", nn.with_logical_partitioning(nn.initializers.normal(1.0), table),
                         (cfg.num_queries, cfg.hidden_dim))
    query_pos = self.param("query_pos", nn.with_logical_partitioning(nn.initializers.normal(1.0), table),
                           (cfg.num_queries, cfg.hidden_dim))
    if cfg.learned_reference_points:
      reference_logits = self.param("reference_points",
                                    nn.with_logical_partitioning(reference_point_logits_init, ("table", None)),
                                    (cfg.num_queries, 2))
      points = jax.nn.sigmoid(reference_logits)
    else:
      points = jnp.asarray(query_grid(cfg.num_queries))
    reference_points = jnp.broadcast_to(points[None], (batch, cfg.num_queries, 2))
    return jnp.broadcast_to(queries[None], (batch, *queries.shape)), query_pos[None], reference_points

  def generate(self, queries: Array, query_pos: Array, reference_points: Array, reference: ReferenceMemory, *,
               deterministic: bool = True) -> tuple[Array, Array]:
    """The Prompt Generator over `reference`, then the projection to the text width -> (tokens, mask)."""
    cfg = self.config
    batch = queries.shape[0]
    num_levels = len(reference.spatial_shapes)
    reference_points = jnp.broadcast_to(reference_points[:, :, None], (batch, cfg.num_queries, num_levels, 2))
    for index in range(cfg.num_layers):
      queries = PromptGeneratorLayer(cfg, num_levels, name=f"layer_{index}")(
          queries, query_pos, reference_points, reference.memory, reference.spatial_shapes, reference.memory_mask,
          deterministic=deterministic)
    queries = layers.LayerNorm(name="final_norm")(queries)
    # Project to the text width so visual and text prompts share the decoder.
    tokens = layers.Dense(cfg.prompt_dim, ("embed", "mlp"), name="prompt_proj")(queries)
    tokens = layers.LayerNorm(name="prompt_norm")(tokens)
    tokens = layers.constrain(tokens, ("batch", "length", "embed"))
    return tokens, jnp.ones((batch, cfg.num_queries), bool)
