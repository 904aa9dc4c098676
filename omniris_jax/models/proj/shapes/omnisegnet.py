"""OmniSegNet for the synthetic `shapes` demo: the core model plus what a small model trained briefly needs.

Each addition is a switch of `ShapesOmniSegNetConfig` (all off = the late-fusion core OmniSegNet, same parameters
and outputs). Parameter paths stay under the core's groups (`image_encoder/`, `prompt_encoder/`, `mask_decoder/`), so
freezing by path works unchanged; the top-level heads are `category_head/`, `colour_head/` and `category_match`.

  conv_stem              the image encoder embeds patches with log2(patch_size) overlapping 3x3 stride-2 convs
                         (GELU after each) and a 1x1 projection (the "early convolutions" stem), which sees the
                         shape of objects a few patches wide; params `patch_embed/stem{i}`, `patch_embed/projection`.
  prototype_queries      every prompt-generator query starts from the prompt's prototype: the masked average of
                         each fused reference level under the prompt (few-shot segmentation's masked average
                         pooling), concatenated over levels, projected and normed (`prototype_proj`, `_norm`).
  queries_in_prompt_box  the queries' reference points are laid out inside the prompt's bounding box (the learned
                         points, in [0, 1], are relative to the box); an empty prompt keeps the whole image.
  prompt_kernel          the mean of the valid prompt tokens, through an MLP, is added to the decoder's foreground
                         embedding (CRIS's sentence-as-kernel): a pixel's foreground logit rises with its match to
                         the prompt.
  pixel_fusion           a per-pixel head adds a prompt-conditioned term to the foreground logits: the stride-4
                         features, FiLM-modulated by the pooled prompt and told their (x, y), two 3x3 convs, a
                         linear read-out (`PixelPromptFusion`).
  pixel_word_attention   in that head each pixel also attends to the prompt tokens one by one (LAVT's pixel-word
                         attention), through a zero-initialised projection onto the FiLM scale and shift.
  fusion_low_level       that head's pixels also read the image encoder's stride-4 output.
  nt_evidence            the no-target logits also read a linear map of the decoder's own evidence: sigmoid of the
                         largest region margin, of the largest pixel margin, and the mean foreground probability.
  mask_positions         a zero-initialised projection of the pixels' sine positions is added to the mask features
                         the heads read, so a mask embedding can say "these pixels, near here".
  num_categories         a scene-parsing head: a linear read of the target's mask features into 1 + K classes
                         (background first), output as `category_logits`, for `losses.category_loss`.
  category_matching      visual prompts are also matched by category: the head's category probabilities averaged
                         over the prompt on the reference are dotted with the target's per-pixel ones; the match
                         map m(x) in [0, 1] is added to the visual prompt's foreground logits and max m to its
                         no-target logits, with learned gains and offsets (`category_match`).
  colour_head            a linear read of the mask features back into the image's colour, output as `colour`, for
                         the self-supervised `losses.colour_loss`.

The additions are built for late fusion (the target is encoded once per image).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from omniris_jax.models import layers, swin
from omniris_jax.models import omnisegnet as core
from omniris_jax.models.bert import BertEncoder
from omniris_jax.models.mask_decoder import MaskDecoder, MlpHead
from omniris_jax.models.pixel_encoder import PixelEncoder
from omniris_jax.models.prompt_encoder import OmniPromptEncoder
from omniris_jax.models.proj.shapes.losses import compute_losses  # noqa: F401  (the model's loss, for the trainer)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ShapesOmniSegNetConfig(core.OmniSegNetConfig):
  """`OmniSegNetConfig` plus the shapes additions (module docstring); the presets are the core's."""

  conv_stem: bool = False
  prototype_queries: bool = False
  queries_in_prompt_box: bool = False
  prompt_kernel: bool = False
  pixel_fusion: bool = False
  pixel_word_attention: bool = False
  fusion_low_level: bool = False
  nt_evidence: bool = False
  mask_positions: bool = False
  num_categories: int = 0
  category_matching: bool = False
  colour_head: bool = False

  def __post_init__(self):
    super().__post_init__()
    if self.early_fusion:
      raise ValueError("ShapesOmniSegNetConfig: the shapes additions are built for late fusion "
                       "(early_fusion=False)")
    patch = self.swin.patch_size
    if self.conv_stem and patch & (patch - 1):
      raise ValueError(f"ShapesOmniSegNetConfig: conv_stem=True needs a power-of-two swin.patch_size (one "
                       f"stride-2 conv per halving), got {patch}")
    for switch in ("pixel_word_attention", "fusion_low_level"):
      if getattr(self, switch) and not self.pixel_fusion:
        raise ValueError(f"ShapesOmniSegNetConfig: {switch}=True needs pixel_fusion=True (it feeds that head)")
    if self.category_matching and not self.num_categories:
      raise ValueError("ShapesOmniSegNetConfig: category_matching=True needs the scene-parsing head "
                       "(num_categories > 0)")


# -------------------------------------------------------------------------------------------------------------
# Image encoder: the convolutional stem
# -------------------------------------------------------------------------------------------------------------


class ConvStem(nn.Module):
  """log2(p) overlapping 3x3 stride-2 convs (widths C / 2**(n-1), ..., C, each at least 8; GELU after each), a
  1x1 projection and a LayerNorm: (B, H, W, 3) -> (B, ceil(H/p), ceil(W/p), C)."""

  embed_dim: int
  patch_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: Array) -> Array:
    x = swin.pad_to_multiple(images.astype(self.dtype), self.patch_size)
    num_convs = self.patch_size.bit_length() - 1
    for i in range(num_convs):
      width = max(self.embed_dim // 2**(num_convs - 1 - i), 8)
      x = layers.gelu(layers.Conv(width, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), dtype=self.dtype,
                                  name=f"stem{i}")(x))
    x = layers.Conv(self.embed_dim, (1, 1), dtype=self.dtype, name="projection")(x)
    x = layers.LayerNorm(1e-5, dtype=self.dtype, name="norm")(x)
    return layers.constrain(x, ("batch", "height", "width", "embed"))


class ConvStemSwin(swin.Swin):
  """`swin.Swin` whose patch embedding is `ConvStem`."""

  def patch_embedding(self, images: Array) -> Array:
    config = self.config
    return ConvStem(config.embed_dim, config.patch_size, dtype=jnp.dtype(config.dtype), name="patch_embed")(images)


# -------------------------------------------------------------------------------------------------------------
# Prompt encoder: prototype queries, queries inside the prompt's box
# -------------------------------------------------------------------------------------------------------------


def prompt_box(prompt: Array) -> tuple[Array, Array]:
  """(B, H, W) binary prompt -> its bounding box as (top-left (B, 2), size (B, 2)), both (x, y) in [0, 1].

  The box spans whole pixels (the last foreground pixel's far edge); an empty prompt gives the whole image.
  """
  _, height, width = prompt.shape
  foreground = prompt > 0.5

  def extent(occupied, length):  # occupied (B, length) -> (start, end) as fractions of length
    first = jnp.argmax(occupied, axis=-1)
    last = length - 1 - jnp.argmax(occupied[:, ::-1], axis=-1)
    any_set = occupied.any(axis=-1)
    return jnp.where(any_set, first / length, 0.0), jnp.where(any_set, (last + 1) / length, 1.0)

  x0, x1 = extent(foreground.any(axis=1), width)
  y0, y1 = extent(foreground.any(axis=2), height)
  return jnp.stack([x0, y0], -1), jnp.stack([x1 - x0, y1 - y0], -1)


def prompt_average(features: Array, prompt: Array) -> Array:
  """(B, h, w, C) features averaged under a (B, H, W) prompt of any size -> (B, C).

  Each cell weighs the fraction of it the prompt covers (an antialiased resize of the prompt: area-like weights
  at any size ratio): few-shot segmentation's masked average pooling.
  """
  batch, height, width, _ = features.shape
  coverage = jax.image.resize(prompt.astype(jnp.float32), (batch, height, width), "linear", antialias=True)
  return ((coverage[..., None] * features).sum((1, 2))
          / jnp.maximum(coverage.sum((1, 2))[:, None], 1e-6)).astype(features.dtype)


class ShapesPromptEncoder(OmniPromptEncoder):
  """`OmniPromptEncoder` with `prototype_queries` and `queries_in_prompt_box` (module docstring)."""

  prototype_queries: bool = False
  queries_in_prompt_box: bool = False

  @nn.compact
  def __call__(self, ref_features, ref_prompt: Array, *, deterministic: bool = True) -> tuple[Array, Array]:
    reference = self.embed_reference(ref_features, ref_prompt)
    queries, query_pos, reference_points = self.initial_queries(ref_prompt.shape[0])
    prompt = ref_prompt.astype(jnp.float32)
    if self.queries_in_prompt_box:
      box_start, box_size = prompt_box(prompt)
      reference_points = box_start[:, None] + reference_points * box_size[:, None]
    if self.prototype_queries:
      prototype = jnp.concatenate([prompt_average(level, prompt) for level in reference.levels], axis=-1)
      prototype = layers.Dense(self.config.hidden_dim, ("mlp", "embed"), name="prototype_proj")(prototype)
      queries = queries + layers.LayerNorm(name="prototype_norm")(prototype)[:, None]
    return self.generate(queries, query_pos, reference_points, reference, deterministic=deterministic)


# -------------------------------------------------------------------------------------------------------------
# Mask decoder: direct paths from the prompt to the pixels, no-target evidence, positions
# -------------------------------------------------------------------------------------------------------------


class PixelPromptFusion(nn.Module):
  """Per-pixel fusion of the stride-4 features with the pooled prompt -> a foreground logit term (B, h, w).

  Each pixel's features are FiLM-modulated by the prompt (scale and shift from the pooled prompt vector) and told
  where they are (normalised (x, y), for words such as "left"), then two 3 x 3 convs and a linear read-out.
  `word_attention`: each pixel and its position also attend to the tokens, and a zero-initialised projection of
  the answer adds a per-pixel scale and shift (so the head starts as the pooled one). `low_level`: the pixels
  also carry a projection of these (B, h, w, C) features.
  """

  hidden_dim: int
  word_attention: bool = False
  num_heads: int = 4

  @nn.compact
  def __call__(self, mask_features: Array, prompt: Array, tokens: Array | None = None,
               token_mask: Array | None = None, low_level: Array | None = None) -> Array:
    batch, height, width, _ = mask_features.shape
    pixels = layers.Dense(self.hidden_dim, ("embed", "mlp"), name="pixel_projection")(
        layers.LayerNorm(name="pixel_norm")(mask_features))
    if low_level is not None:
      if low_level.shape[:3] != mask_features.shape[:3]:
        raise ValueError(f"PixelPromptFusion: {low_level.shape=} must match the mask features' (B, H/4, W/4) "
                         f"{mask_features.shape[:3]}")
      pixels = pixels + layers.Dense(self.hidden_dim, ("embed", "mlp"), name="low_level_projection")(
          layers.LayerNorm(name="low_level_norm")(low_level))
    scale = layers.Dense(self.hidden_dim, ("embed", "mlp"), name="prompt_scale")(prompt)[:, None, None]
    shift = layers.Dense(self.hidden_dim, ("embed", "mlp"), name="prompt_shift")(prompt)[:, None, None]
    ys, xs = np.meshgrid((np.arange(height) + 0.5) / height * 2 - 1, (np.arange(width) + 0.5) / width * 2 - 1,
                         indexing="ij")
    coordinates = jnp.asarray(np.stack([xs, ys], -1), mask_features.dtype)
    where = layers.Dense(self.hidden_dim, (None, "mlp"), name="coordinate_projection")(coordinates)
    if self.word_attention:
      if tokens is None or token_mask is None:
        raise ValueError("PixelPromptFusion: word_attention=True needs the prompt tokens and their mask")
      asking = (pixels + where).reshape(batch, height * width, self.hidden_dim)
      heard = layers.MultiHeadAttention(self.num_heads, name="word_attention")(
          asking, tokens, key_padding_mask=token_mask)
      word_film = layers.Dense(2 * self.hidden_dim, ("embed", "mlp"), kernel_init=nn.initializers.zeros_init(),
                               name="word_film")(heard).reshape(batch, height, width, 2 * self.hidden_dim)
      scale = scale + word_film[..., :self.hidden_dim]
      shift = shift + word_film[..., self.hidden_dim:]
    x = nn.relu(pixels * (1.0 + scale) + shift + where)
    for index in range(2):
      x = nn.relu(layers.Conv(self.hidden_dim, (3, 3), name=f"conv_{index}")(x))
    return layers.Dense(1, ("mlp", None), name="readout")(x)[..., 0]


class ShapesMaskDecoder(MaskDecoder):
  """`MaskDecoder` with the decoder switches of `ShapesOmniSegNetConfig` (module docstring)."""

  prompt_kernel: bool = False
  pixel_fusion: bool = False
  pixel_word_attention: bool = False
  fusion_low_level: bool = False
  nt_evidence: bool = False
  mask_positions: bool = False

  @nn.compact
  def __call__(self, multi_scale_features: Sequence[Array], mask_features: Array, prompt_tokens: Array,
               prompt_mask: Array, *, low_level_features: Array | None = None,
               deterministic: bool = True) -> dict[str, Array]:
    """`MaskDecoder.__call__`; `low_level_features` (B, H/4, W/4, C) feed `fusion_low_level`."""
    cfg = self.config
    if self.fusion_low_level and low_level_features is None:
      raise ValueError("ShapesMaskDecoder: fusion_low_level=True needs low_level_features (the image encoder's "
                       "stride-4 output)")
    fusion_features = mask_features
    if self.mask_positions and mask_features.ndim == 4:
      # Zero-initialised, so the decoder starts as the one without positions.
      _, height, width, _ = mask_features.shape
      positions = jnp.asarray(layers.sine_position_encoding(height, width, cfg.mask_dim, pixel_centres=True))
      mask_features = mask_features + layers.Dense(
          cfg.mask_dim, (None, None), use_bias=False, kernel_init=nn.initializers.zeros_init(),
          name="mask_position_projection")(positions).astype(mask_features.dtype)
    outputs, intermediates = self.decode(multi_scale_features, mask_features, prompt_tokens, prompt_mask,
                                         deterministic=deterministic)
    prompt_mask = prompt_mask.astype(bool)
    valid = prompt_mask[..., None].astype(prompt_tokens.dtype)
    pooled = (prompt_tokens * valid).sum(axis=1) / jnp.maximum(valid.sum(axis=1), 1.0)  # mean of valid tokens
    mask_logits = outputs["mask_logits"]
    if self.prompt_kernel:
      target_embed = intermediates["target_embed"]
      kernel = MlpHead(cfg.hidden_dim, cfg.mask_dim, 2, name="prompt_kernel")(pooled)
      target_embed = target_embed.at[:, 1].add(kernel.astype(target_embed.dtype))
      mask_logits = jnp.einsum("bac,bhwc->bhwa", target_embed, mask_features)
    if self.pixel_fusion:
      fused = PixelPromptFusion(cfg.hidden_dim, word_attention=self.pixel_word_attention, num_heads=cfg.num_heads,
                                name="pixel_fusion")(fusion_features, pooled, prompt_tokens, prompt_mask,
                                                     low_level_features if self.fusion_low_level else None)
      mask_logits = mask_logits.at[..., 1].add(fused.astype(mask_logits.dtype))
    nt_logits = outputs["nt_logits"]
    if self.nt_evidence:
      region_logits = outputs["region_logits"]
      region_margin = (region_logits[..., 1] - region_logits[..., 0]).astype(jnp.float32)
      pixel_margin = (mask_logits[..., 1] - mask_logits[..., 0]).astype(jnp.float32)
      evidence = jnp.stack([jax.nn.sigmoid(region_margin.max(axis=(1, 2))),
                            jax.nn.sigmoid(pixel_margin.max(axis=(1, 2))),
                            jax.nn.sigmoid(pixel_margin).mean(axis=(1, 2))], axis=-1)
      nt_logits = nt_logits + layers.Dense(2, (None, None), name="nt_evidence")(evidence)
    return {**outputs, "mask_logits": layers.constrain(mask_logits, ("batch", "height", "width", None)),
            "nt_logits": nt_logits}


# -------------------------------------------------------------------------------------------------------------
# The model
# -------------------------------------------------------------------------------------------------------------


class ShapesOmniSegNet(core.OmniSegNet):
  """`OmniSegNet` with the shapes additions; outputs add "category_logits" (B, H/4, W/4, 1 + K) and "colour"
  (B, H/4, W/4, 3) from `__call__` when their heads are on."""

  config: ShapesOmniSegNetConfig

  def setup(self):
    cfg = self.config
    self.image_encoder = (ConvStemSwin if cfg.conv_stem else swin.Swin)(cfg.swin)
    self.text_encoder = BertEncoder(cfg.bert)
    self.text_projection = core.TextProjection(cfg.prompt_dim)
    self.pixel_encoder = PixelEncoder(cfg.pixel_encoder)
    self.prompt_encoder = ShapesPromptEncoder(cfg.prompt_encoder, prototype_queries=cfg.prototype_queries,
                                              queries_in_prompt_box=cfg.queries_in_prompt_box)
    self.mask_decoder = ShapesMaskDecoder(
        cfg.mask_decoder, prompt_kernel=cfg.prompt_kernel, pixel_fusion=cfg.pixel_fusion,
        pixel_word_attention=cfg.pixel_word_attention, fusion_low_level=cfg.fusion_low_level,
        nt_evidence=cfg.nt_evidence, mask_positions=cfg.mask_positions)
    if cfg.num_categories:
      self.category_head = layers.Dense(cfg.num_categories + 1, ("embed", None), name="category_head")
    if cfg.colour_head:
      self.colour_head = layers.Dense(3, ("embed", None), name="colour_head")
    if cfg.category_matching:
      # (mask gain, mask offset, no-target gain, no-target offset) of the match map; the gains start at 4 so the
      # prior speaks from the first step, the offsets centre it (a match of 0.5 adds nothing).
      self.category_match = self.param("category_match", nn.with_logical_partitioning(
          lambda _, shape: jnp.array([4.0, -2.0, -4.0, 2.0]), (None,)), (4,))

  def _pixel_features(self, backbone_features: dict[str, Array], deterministic: bool) -> core.ImageFeatures:
    features = super()._pixel_features(backbone_features, deterministic)
    if self.config.fusion_low_level:
      features["low_level_features"] = backbone_features["res2"]
    return features

  def decode_prompts(self, image_features: core.ImageFeatures, prompt_tokens: Array, prompt_mask: Array, *,
                     deterministic: bool = True) -> dict[str, Array]:
    image_features = core.broadcast_features(image_features, prompt_tokens.shape[0])
    return self.mask_decoder(image_features["multi_scale_features"], image_features["mask_features"],
                             prompt_tokens, prompt_mask, low_level_features=image_features.get("low_level_features"),
                             deterministic=deterministic)

  def decode(self, image_features: core.ImageFeatures, text_tokens: Array | None = None,
             text_mask: Array | None = None, visual_tokens: Array | None = None,
             visual_mask: Array | None = None, has_text: Array | None = None, has_visual: Array | None = None,
             ref_categories: Array | None = None, *, deterministic: bool = True) -> dict[str, Array]:
    """`OmniSegNet.decode`; `ref_categories` (B, K) from `reference_categories` adds the category-match prior
    to the visual prompt's outputs (None: no prior)."""
  
    prompts = core.prepare_prompts(text_tokens, text_mask, visual_tokens, visual_mask, has_text, has_visual)
    prompt_sets = core.make_prompt_sets(prompts, self.config.omni_fusion)
    decoded = self.decode_prompt_sets(image_features, prompt_sets, deterministic=deterministic)
    if ref_categories is not None and "visual" in prompts:
      batch = core.prompt_batch(prompts)
      index = [name for name, _, _ in prompt_sets].index("visual")
      rows = slice(index * batch, (index + 1) * batch)
      visual = self._match_visual({k: v[rows] for k, v in decoded.items()},
                                  core.broadcast_features(image_features, batch), ref_categories)
      decoded = {k: v.at[rows].set(visual[k]) for k, v in decoded.items()}
    return core.assemble_outputs(decoded, prompts, prompt_sets)

  def __call__(self, image: Array, text_ids: Array | None = None, text_attention_mask: Array | None = None,
               ref_image: Array | None = None, ref_prompt: Array | None = None, has_text: Array | None = None,
               has_visual: Array | None = None, *, deterministic: bool = True) -> dict[str, Array]:
    """`OmniSegNet.__call__`, with the category-match prior and the extra heads."""
    text_tokens, text_mask = self.encode_call_text(text_ids, text_attention_mask, ref_image, ref_prompt,
                                                   deterministic=deterministic)
    visual_tokens = visual_mask = None
    target_features, ref_features = self.encode_pair(image, ref_image, deterministic=deterministic)
    ref_categories = None
    if ref_features is not None and self.config.category_matching:
      if ref_image.shape == image.shape:  # the reference's pixel features too, in the same pixel-encoder call
        batch = image.shape[0]
        both = self._pixel_features(jax.tree.map(lambda t, r: jnp.concatenate([t, r]), target_features,
                                                 ref_features), deterministic)
        image_features = jax.tree.map(lambda x: x[:batch], both)
        ref_mask_features = both["mask_features"][batch:]
      else:
        image_features = self._pixel_features(target_features, deterministic)
        ref_mask_features = self._pixel_features(ref_features, deterministic)["mask_features"]
      ref_categories = self.reference_categories(ref_mask_features, ref_prompt)
    else:
      image_features = self._pixel_features(target_features, deterministic)
    if ref_features is not None:
      visual_tokens, visual_mask = self.prompt_encoder(ref_features, ref_prompt, deterministic=deterministic)
    outputs = self.decode(image_features, text_tokens, text_mask, visual_tokens, visual_mask, has_text,
                          has_visual, ref_categories=ref_categories, deterministic=deterministic)
    if self.config.num_categories:
      outputs["category_logits"] = self.category_head(image_features["mask_features"])
    if self.config.colour_head:
      outputs["colour"] = self.colour_head(image_features["mask_features"])
    return outputs

  def encode_prompts(self, text_ids: Array | None = None, text_attention_mask: Array | None = None,
                     ref_image: Array | None = None, ref_prompt: Array | None = None, *,
                     deterministic: bool = True) -> dict[str, Array | None]:
    """`OmniSegNet.encode_prompts`, plus `ref_categories` for the category-match prior when it is on."""
    text_tokens, text_mask = self.encode_call_text(text_ids, text_attention_mask, ref_image, ref_prompt,
                                                   deterministic=deterministic)
    encoded = {"text_tokens": text_tokens, "text_mask": text_mask, "visual_tokens": None, "visual_mask": None}
    if ref_image is not None:
      ref_features = self._backbone(ref_image, "ref_image", deterministic)
      encoded["visual_tokens"], encoded["visual_mask"] = self.prompt_encoder(ref_features, ref_prompt,
                                                                             deterministic=deterministic)
      if self.config.category_matching:
        ref_mask_features = self._pixel_features(ref_features, deterministic)["mask_features"]
        encoded["ref_categories"] = self.reference_categories(ref_mask_features, ref_prompt)
    return encoded

  def _category_probabilities(self, mask_features: Array) -> Array:
    """(B, h, w, K) object-category probabilities of each pixel (background dropped, so they sum to <= 1)."""
    return jax.nn.softmax(self.category_head(mask_features).astype(jnp.float32), axis=-1)[..., 1:]

  def reference_categories(self, ref_mask_features: Array, ref_prompt: Array) -> Array:
    """(B, K): the reference's category probabilities averaged over its prompt (area-weighted at stride 4)."""
    return prompt_average(self._category_probabilities(ref_mask_features), ref_prompt)

  def _match_visual(self, outputs: dict[str, Array], image_features: core.ImageFeatures, ref_categories: Array):
    """Adds the category match map to one prompt set's (the visual one's) mask and no-target logits."""
    match = jnp.einsum("bhwk,bk->bhw", self._category_probabilities(image_features["mask_features"]),
                       ref_categories)
    mask_gain, mask_offset, nt_gain, nt_offset = self.category_match
    mask_logits = outputs["mask_logits"].at[..., 1].add(mask_gain * match + mask_offset)
    nt_logits = outputs["nt_logits"].at[:, 1].add(nt_gain * match.max(axis=(1, 2)) + nt_offset)
    return {**outputs, "mask_logits": mask_logits, "nt_logits": nt_logits}


Config = ShapesOmniSegNetConfig
Model = ShapesOmniSegNet
