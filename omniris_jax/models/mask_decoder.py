"""OmniSegNet's mask decoder: region queries that read the target image and the prompt, then paint the mask.

The paper (Appendix A.2) stacks nine decoder blocks in three groups, one group per pixel-encoder scale (strides
32, 16, 8, cycled as in Mask2Former). Each block is

  cross-attention to the pixel features  ->  cross-attention to the prompt tokens  ->  self-attention  ->  FFN

over a learnable set of q x q "region" queries (ReLA's 10 x 10 minimap). The released code is ReLA's decoder,
which attends to the prompt only in block 0, through a zero-initialised projection behind a sigmoid gate;
`MaskDecoderConfig.prompt_cross_attention` selects between the two ('all' = paper, 'first' = release). The
release's block-0 prompt attention is exactly

  queries += prompt_gate_scale * sigmoid(gate) * LayerNorm(queries + MHA(queries, W_p prompt, W_p prompt))

with no query positions and W_p (no bias) starting at zero, so the block starts prompt-blind and learns to listen.

Padded prompt tokens (`prompt_mask` False) are not attended unless `attend_to_padded_prompt` (the release drops
the text mask before its decoder, so it attends to the padded positions of BERT's output too).

Masked attention (Mask2Former/ReLA): block i's pixel cross-attention only sees the pixels that the previous
prediction's per-query masks call foreground; a query whose mask is empty falls back to full attention.

Heads (ReLA's construction, our own code), all on the layer-normed region features R (B, Q, C):
  region logits  (B, q, q, 2)  = Linear(R), the minimap; channel 1 = "this region holds the referent".
  mask logits    (B, H/4, W/4, 2): per-query mask embeddings E = MLP(R) (B, Q, M) are dotted with the stride-4
                 `mask_features` F (B, H/4, W/4, M); the two output channels are the region-weighted sums
                 sum_q w[q, a] * <E_q, F>, with w = softmax(region logits) ('probabilities', default) or the raw
                 region logits ('logits', what ReLA's code does). Channel 1 = foreground.
  no-target logits (B, 2) = mean over queries of MLP(R); channel 1 = "no target".

`MaskDecoder.decode` also returns the intermediates that extensions build on (the region features and the
foreground/background embeddings), so a subclass can add heads without the core branching for them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from omniris_jax.models import layers

Array = jax.Array

# Additive attention bias for keys a query may not see. Finite, so a row can never become all -inf.
_MASKED_LOGIT = -1e9

_PROMPT_CROSS_ATTENTION_MODES = ("all", "first")
_REGION_WEIGHTINGS = ("probabilities", "logits")


@dataclasses.dataclass(frozen=True)
class MaskDecoderConfig:
  """Hyper-parameters of `MaskDecoder` (defaults = the paper's decoder).

  Attributes:
    hidden_dim: width of the region queries and of every attention/FFN block.
    num_heads: attention heads of every attention layer.
    ffn_dim: hidden width of the feed-forward blocks.
    query_grid: q; the decoder has q * q region queries laid out row-major on a q x q grid (the "minimap").
    num_blocks: decoder blocks; block i reads pixel-encoder scale i % num_feature_levels.
    num_feature_levels: how many pixel-encoder scales the blocks cycle over (strides 32, 16, 8).
    mask_dim: width of the mask embeddings; must equal the width of `mask_features`.
    prompt_cross_attention: 'all' (paper: every block attends to the prompt tokens) or 'first' (release/ReLA:
      block 0 only, the gated residual of the module docstring).
    prompt_gate_scale: the fixed factor of the 'first' variant's gated prompt attention (ReLA's rla_weight).
    masked_attention: restrict each block's pixel cross-attention to the previous prediction's foreground.
    region_weighting: 'probabilities' (softmax of the region logits weights the per-query masks) or 'logits'
      (the raw region logits do, as in ReLA's code).
    attend_to_padded_prompt: let the prompt cross-attention see tokens whose `prompt_mask` is False (release).
    positions_at_pixel_centres: the pixel memories' sine positions at pixel centres, (i + 0.5) / n * 2 pi (ours),
      or Mask2Former's (i + 1) / (n + 1e-6) * 2 pi (release).
    dropout_rate: dropout after every attention / FFN (0 in ReLA).
    layer_norm_eps: epsilon of every LayerNorm.
  """

  hidden_dim: int = 256
  num_heads: int = 8
  ffn_dim: int = 2048
  query_grid: int = 10
  num_blocks: int = 9
  num_feature_levels: int = 3
  mask_dim: int = 256
  prompt_cross_attention: str = "all"
  prompt_gate_scale: float = 0.1
  masked_attention: bool = True
  region_weighting: str = "probabilities"
  attend_to_padded_prompt: bool = False
  positions_at_pixel_centres: bool = True
  dropout_rate: float = 0.0
  layer_norm_eps: float = 1e-5

  def __post_init__(self):
    if self.prompt_cross_attention not in _PROMPT_CROSS_ATTENTION_MODES:
      raise ValueError(f"MaskDecoderConfig: {self.prompt_cross_attention=} must be one of "
                       f"{_PROMPT_CROSS_ATTENTION_MODES}")
    if self.region_weighting not in _REGION_WEIGHTINGS:
      raise ValueError(f"MaskDecoderConfig: {self.region_weighting=} must be one of {_REGION_WEIGHTINGS}")
    if self.hidden_dim % self.num_heads:
      raise ValueError(f"MaskDecoderConfig: {self.hidden_dim=} must be a multiple of {self.num_heads=}")
    if self.hidden_dim % 4:
      raise ValueError(f"MaskDecoderConfig: {self.hidden_dim=} must be a multiple of 4 (2-D sine positions)")
    if self.query_grid < 1 or self.num_blocks < 1 or self.num_feature_levels < 1:
      raise ValueError(f"MaskDecoderConfig: {self.query_grid=}, {self.num_blocks=} and "
                       f"{self.num_feature_levels=} must all be >= 1")

  @property
  def num_queries(self) -> int:
    """q * q region queries (row-major on the q x q minimap)."""
    return self.query_grid * self.query_grid

  @classmethod
  def paper(cls) -> MaskDecoderConfig:
    """The paper's decoder: 9 blocks, 256 wide, 8 heads, 10 x 10 queries, prompt attention in every block."""
    return cls()

  @classmethod
  def release(cls) -> MaskDecoderConfig:
    """The released code's (ReLA's) decoder: gated prompt attention in block 0 only, over every token (padding
    included), raw-logit region weighting, Mask2Former's sine positions."""
    return cls(prompt_cross_attention="first", region_weighting="logits", attend_to_padded_prompt=True,
               positions_at_pixel_centres=False)

  @classmethod
  def demo(cls) -> MaskDecoderConfig:
    """A narrow decoder for the CPU demo (same structure as the paper's; widths of `PixelEncoderConfig.demo`)."""
    return cls(hidden_dim=64, num_heads=4, ffn_dim=256, mask_dim=64)

  @classmethod
  def tiny_test(cls) -> MaskDecoderConfig:
    """A few-thousand-parameter decoder for unit tests: 3 blocks (one per scale), 4 x 4 queries."""
    return cls(hidden_dim=16, num_heads=2, ffn_dim=32, query_grid=4, num_blocks=3, mask_dim=16)


class MlpHead(nn.Module):
  """ReLU MLP `hidden_dim -> ... -> out_features` for the prediction heads (ReLA's MLP)."""

  hidden_dim: int
  out_features: int
  num_layers: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    # Alternate the logical axes so no kernel names the same axis twice; the last layer is replicated when small.
    hidden_axes = [("embed", "mlp"), ("mlp", "embed")]
    for i in range(self.num_layers - 1):
      x = nn.relu(layers.Dense(self.hidden_dim, hidden_axes[i % 2], name=f"layers_{i}")(x))
    in_axis = "embed" if (self.num_layers - 1) % 2 == 0 else "mlp"
    return layers.Dense(self.out_features, (in_axis, None), name=f"layers_{self.num_layers - 1}")(x)


class MaskDecoderBlock(nn.Module):
  """One decoder block: pixel cross-attn -> prompt cross-attn (per variant) -> self-attn -> FFN, post-norm."""

  config: MaskDecoderConfig
  attend_to_prompt: bool
  gated_prompt: bool

  @nn.compact
  def __call__(self, queries: Array, query_pos: Array, pixels: Array, pixel_pos: Array,
               pixel_bias: Array | None, prompt_tokens: Array, prompt_mask: Array, *,
               deterministic: bool = True) -> Array:
    cfg = self.config
    # Xavier-uniform projections as in Mask2Former; positions go into queries and keys, not values (DETR).
    attention = functools.partial(layers.MultiHeadAttention, cfg.num_heads, dropout_rate=cfg.dropout_rate,
                                  kernel_init=nn.initializers.xavier_uniform())

    def residual(x, update, name):
      update = nn.Dropout(cfg.dropout_rate)(update, deterministic=deterministic)
      return layers.LayerNorm(cfg.layer_norm_eps, name=name)(x + update)

    update = attention(name="pixel_cross_attention")(
        queries + query_pos, pixels + pixel_pos, inputs_v=pixels, bias=pixel_bias, deterministic=deterministic)
    queries = residual(queries, update, "pixel_cross_attention_norm")

    key_mask = None if cfg.attend_to_padded_prompt else prompt_mask
    if self.attend_to_prompt and self.gated_prompt:
      # The release's language attention (module docstring): no positions, a post-norm residual of its own, scaled
      # into the queries by a fixed factor and a learnt sigmoid gate (0.5 at init).
      projected = layers.Dense(cfg.hidden_dim, ("embed", "mlp"), use_bias=False,
                               kernel_init=nn.initializers.zeros_init(), name="prompt_projection")(prompt_tokens)
      update = attention(name="prompt_cross_attention")(queries, projected, key_padding_mask=key_mask,
                                                        deterministic=deterministic)
      attended = residual(queries, update, "prompt_cross_attention_norm")
      gate = self.param("prompt_gate", nn.with_logical_partitioning(nn.initializers.zeros_init(), ()), ())
      queries = queries + cfg.prompt_gate_scale * jax.nn.sigmoid(gate) * attended
    elif self.attend_to_prompt:
      update = attention(name="prompt_cross_attention")(
          queries + query_pos, prompt_tokens, key_padding_mask=key_mask, deterministic=deterministic)
      queries = residual(queries, update, "prompt_cross_attention_norm")

    update = attention(name="self_attention")(
        queries + query_pos, queries + query_pos, inputs_v=queries, deterministic=deterministic)
    queries = residual(queries, update, "self_attention_norm")

    update = layers.Mlp(cfg.ffn_dim, activation=nn.relu, dropout_rate=cfg.dropout_rate, name="ffn")(
        queries, deterministic=deterministic)
    queries = residual(queries, update, "ffn_norm")
    return layers.constrain(queries, ("batch", "length", "embed"))


class _PredictionHeads(nn.Module):
  """Shared heads applied after every block (for the attention masks) and at the end.

  Returns (region_features (B,Q,C), per-query mask logits (B,Q,H/4,W/4), region logits (B,Q,2),
  mask embeddings (B,Q,M)).
  """

  config: MaskDecoderConfig

  @nn.compact
  def __call__(self, queries: Array, mask_features: Array):
    cfg = self.config
    region_features = layers.LayerNorm(cfg.layer_norm_eps, name="decoder_norm")(queries)
    region_logits = layers.Dense(2, ("embed", None), name="region_head")(region_features)
    mask_embed = MlpHead(cfg.hidden_dim, cfg.mask_dim, 3, name="mask_embed")(region_features)
    query_masks = jnp.einsum("bqc,bhwc->bqhw", mask_embed, mask_features)
    return region_features, query_masks, region_logits, mask_embed


class MaskDecoder(nn.Module):
  """Region-query mask decoder (see the module docstring for the architecture and output conventions)."""

  config: MaskDecoderConfig

  @nn.compact
  def __call__(self, multi_scale_features: Sequence[Array], mask_features: Array, prompt_tokens: Array,
               prompt_mask: Array, *, deterministic: bool = True) -> dict[str, Array]:
    """Decodes one prompt set per example; the outputs of `decode`."""
    return self.decode(multi_scale_features, mask_features, prompt_tokens, prompt_mask,
                       deterministic=deterministic)[0]

  def decode(self, multi_scale_features: Sequence[Array], mask_features: Array, prompt_tokens: Array,
             prompt_mask: Array, *, deterministic: bool = True) -> tuple[dict[str, Array], dict[str, Array]]:
    """The decoder's body, for `__call__` and for subclasses' `__call__` (it defines the submodules).

    Args:
      multi_scale_features: `num_feature_levels` arrays (B, h, w, D) from the pixel encoder, coarsest first
        (strides 32, 16, 8).
      mask_features: (B, H/4, W/4, mask_dim) stride-4 features F_m^0.
      prompt_tokens: (B, Lp, Dp) prompt tokens (text or visual or both concatenated).
      prompt_mask: (B, Lp) True/1 for tokens to attend to.
      deterministic: disables dropout when True.

    Returns:
      (outputs, intermediates). outputs: {"mask_logits": (B, H/4, W/4, 2), "region_logits": (B, q, q, 2),
      "nt_logits": (B, 2)}; channel 1 is foreground / referent region / no target respectively.
      intermediates: {"region_features": (B, Q, C) the normed queries, "target_embed": (B, 2, M) the
      background/foreground embeddings that `mask_logits` dots with `mask_features`}.
    """
    cfg = self.config
    multi_scale_features = list(multi_scale_features)
    if len(multi_scale_features) != cfg.num_feature_levels:
      raise ValueError(f"MaskDecoder: got {len(multi_scale_features)} multi_scale_features, expected "
                       f"{cfg.num_feature_levels=} (pixel-encoder outputs at strides 32, 16, 8)")
    batch = mask_features.shape[0]
    if mask_features.ndim != 4 or mask_features.shape[-1] != cfg.mask_dim:
      raise ValueError(f"MaskDecoder: {mask_features.shape=} must be (B, H/4, W/4, {cfg.mask_dim=})")
    for level, feature in enumerate(multi_scale_features):
      if feature.ndim != 4 or feature.shape[0] != batch:
        raise ValueError(f"MaskDecoder: multi_scale_features[{level}].shape={feature.shape} must be "
                         f"(B={batch}, h, w, D)")
    if prompt_tokens.ndim != 3 or prompt_tokens.shape[0] != batch or prompt_mask.shape != prompt_tokens.shape[:2]:
      raise ValueError(f"MaskDecoder: {prompt_tokens.shape=} must be (B={batch}, Lp, Dp) and "
                       f"{prompt_mask.shape=} must be (B, Lp)")

    # Pixel memories: project to the decoder width when needed, add a level embedding; sine positions.
    level_embed = self.param("level_embed", nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ("table", "embed")), (cfg.num_feature_levels, cfg.hidden_dim))
    pixels, pixel_pos, sizes = [], [], []
    for level, feature in enumerate(multi_scale_features):
      _, h, w, width = feature.shape
      if width != cfg.hidden_dim:
        feature = layers.Dense(cfg.hidden_dim, ("embed", "mlp"), kernel_init=nn.initializers.xavier_uniform(),
                               name=f"input_projection_{level}")(feature)
      pixels.append(feature.reshape(batch, h * w, cfg.hidden_dim) + level_embed[level])
      pixel_pos.append(jnp.asarray(layers.sine_position_encoding(
          h, w, cfg.hidden_dim, pixel_centres=cfg.positions_at_pixel_centres))
                       .reshape(1, h * w, cfg.hidden_dim))
      sizes.append((h, w))

    query_init = nn.with_logical_partitioning(nn.initializers.normal(1.0), ("table", "embed"))
    queries = self.param("query_features", query_init, (cfg.num_queries, cfg.hidden_dim))
    query_pos = self.param("query_positions", query_init, (cfg.num_queries, cfg.hidden_dim))
    queries = jnp.broadcast_to(queries, (batch, *queries.shape))
    query_pos = query_pos[None]

    heads = _PredictionHeads(cfg, name="heads")
    prompt_mask = prompt_mask.astype(bool)
    pixel_bias = None
    if cfg.masked_attention:
      pixel_bias = _attention_bias(heads(queries, mask_features)[1], sizes[0])
    for i in range(cfg.num_blocks):
      level = i % cfg.num_feature_levels
      queries = MaskDecoderBlock(
          cfg, attend_to_prompt=(cfg.prompt_cross_attention == "all" or i == 0),
          gated_prompt=(cfg.prompt_cross_attention == "first"), name=f"blocks_{i}")(
              queries, query_pos, pixels[level], pixel_pos[level], pixel_bias, prompt_tokens, prompt_mask,
              deterministic=deterministic)
      if cfg.masked_attention and i + 1 < cfg.num_blocks:
        pixel_bias = _attention_bias(heads(queries, mask_features)[1],
                                     sizes[(i + 1) % cfg.num_feature_levels])

    region_features, _, region_logits, mask_embed = heads(queries, mask_features)
    if cfg.region_weighting == "probabilities":
      region_weights = jax.nn.softmax(region_logits.astype(jnp.float32), axis=-1)
    else:
      region_weights = region_logits
    target_embed = jnp.einsum("bqa,bqc->bac", region_weights, mask_embed)
    mask_logits = jnp.einsum("bac,bhwc->bhwa", target_embed, mask_features)
    nt_logits = MlpHead(cfg.hidden_dim, 2, 2, name="nt_head")(region_features).mean(axis=1)
    outputs = {
        "mask_logits": layers.constrain(mask_logits, ("batch", "height", "width", None)),
        "region_logits": region_logits.reshape(batch, cfg.query_grid, cfg.query_grid, 2),
        "nt_logits": nt_logits,
    }
    return outputs, {"region_features": region_features, "target_embed": target_embed}


def _attention_bias(query_masks: Array, size: tuple[int, int]) -> Array:
  """Masked-attention bias (B, 1, Q, h*w): 0 where the query's mask says foreground at that pixel, else -1e9.

  The per-query mask logits are resized (bilinear, no antialiasing, like F.interpolate) to the memory's size.
  A query whose mask is empty everywhere attends everywhere. No gradient flows through the mask.
  """
  batch, num_queries = query_masks.shape[:2]
  resized = jax.image.resize(query_masks, (batch, num_queries, *size), method="bilinear", antialias=False)
  visible = jax.lax.stop_gradient(resized.reshape(batch, num_queries, -1) >= 0.0)  # sigmoid >= 0.5
  visible = visible | ~visible.any(axis=-1, keepdims=True)
  return jnp.where(visible, 0.0, _MASKED_LOGIT)[:, None].astype(jnp.float32)
