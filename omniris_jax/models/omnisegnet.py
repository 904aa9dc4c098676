"""OmniSegNet: segment what a text, a visual prompt on a reference image, or both refer to in a target image.

Composition (paper Sec. 5 and Fig. 8; parameter path prefixes are stable, the trainer freezes groups by regex):

  image_encoder/    Swin. Encodes the target image and, with the same weights, the reference image.
  text_encoder/     BERT. Its last hidden states are the text prompt (max `max_text_len` tokens).
  text_projection/  LayerNorm (+ Dense when BERT's width differs from the prompt width) on BERT's states, the
                    release's `lang_norm`; it makes text tokens look like the visual tokens.
  pixel_encoder/    deformable multi-scale encoder + FPN on the target's Swin features -> strides 32/16/8 for the
                    decoder groups and the stride-4 `mask_features`.
  prompt_encoder/   omni-prompt encoder (PEM + Prompt Generator) on the reference's Swin features and the binary
                    spatial prompt (mask, box and scribble are all just binary maps) -> n visual prompt tokens.
  mask_decoder/     region-query decoder -> 2-class mask logits at stride 4, q x q region logits, no-target logits.

Late fusion (the paper's figures, the default): the prompt meets the image only in the mask decoder, so the
target image is encoded once (`encode_image`) and any number of prompts are decoded against it (`decode`); the
full forward `__call__` is encode_image + encode_text + encode_visual + decode (equal up to float rounding: when
target and reference have one shape, `__call__` runs them through the image encoder as one batch). 

Early fusion (`early_fusion=True`, the release, after LAVT): the prompt tokens are also fused into every Swin
stage by LAVT's pixel-word attention module (PWAM, `stage{s}/pwam/` under image_encoder/). The stage's output
(its res feature) is the PWAM product itself; the next stage gets `x + gate * product`, with a tanh gate that
starts closed (`stage{s}/gate/`, none on the last stage). The target's features then depend on the prompt:
`__call__` encodes the target once per prompt set (text, visual, joint) and `encode_image` / `decode` refuse.
The reference image is encoded without fusion.

Omni fusion (`omni_fusion`), when an example has both a text and a visual prompt:
  'union' (the release): each prompt is decoded on its own (the prompt sets are stacked along the batch into one
    decoder call). The combined mask is the per-pixel OR of the per-prompt masks, done in logit space: at every
    pixel the combined (background, foreground) logits are those of the prompt with the larger foreground margin
    (logit_fg - logit_bg), so argmax(combined) = OR of the per-prompt argmaxes and the result is still a pair of
    logits for the cross-entropy loss. Likewise for the region logits. No target is called only if every
    available prompt calls it: the combined no-target logits are those of the prompt with the smaller
    no-target margin (AND).
  'joint' (the paper, Sec. 5 "F_t and F_p are combined and fed to MaskDecoder"): the text and visual tokens are
    concatenated (with their masks) into one decode, which gives the combined outputs; the per-prompt outputs
    still come from decoding each prompt alone (three prompt sets stacked along the batch).
Examples that lack a prompt (`has_text` / `has_visual` False) have that prompt's tokens zeroed and masked out, so
whatever ids or reference image they carry cannot influence any output. Their per-prompt outputs are then the
decoder's response to an empty prompt: meaningless, to be masked out of the loss by the trainer. An example with
neither prompt gets the visual branch's (empty-prompt) outputs as its combined outputs.

Output dict of `__call__` / `decode` (channel 1 = foreground / referent region / no target):
  "mask_logits" (B, H/4, W/4, 2), "region_logits" (B, q, q, 2), "nt_logits" (B, 2)    combined
  "text_mask_logits", "text_region_logits", "text_nt_logits"                          when text inputs are given
  "visual_mask_logits", "visual_region_logits", "visual_nt_logits"                    when visual inputs are given
Passing `text_ids=None` (or `ref_image=None`) skips that encoder and that decode altogether (e.g. a visual-only
training stage); the combined outputs are then the other prompt's.

Extensions (e.g. `models/proj/shapes/`) subclass `OmniSegNet`: its methods are the pieces they recombine.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from omniris_jax.models import layers, swin
from omniris_jax.models.bert import BertConfig, BertEncoder, load_hf_bert
from omniris_jax.models.mask_decoder import MaskDecoder, MaskDecoderConfig
from omniris_jax.models.pixel_encoder import PixelEncoder, PixelEncoderConfig
from omniris_jax.models.prompt_encoder import OmniPromptEncoder, PromptEncoderConfig
from omniris_jax.models.swin import Swin, SwinConfig

Array = jax.Array
# {"mask_features": (B,H/4,W/4,M), "multi_scale_features": [3 x (B,h,w,D)]}; extensions may add entries.
ImageFeatures = dict[str, Any]

# ImageNet statistics on the 0..255 scale, as Swin's pretraining (and detectron2's PIXEL_MEAN/STD) use them.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

OMNI_FUSION_MODES = ("union", "joint")
PARAMETER_GROUPS = ("image_encoder", "text_encoder", "text_projection", "pixel_encoder", "prompt_encoder",
                    "mask_decoder")

_SUB_CONFIGS = {"swin": SwinConfig, "bert": BertConfig, "pixel_encoder": PixelEncoderConfig,
                "prompt_encoder": PromptEncoderConfig, "mask_decoder": MaskDecoderConfig}


@dataclasses.dataclass(frozen=True)
class OmniSegNetConfig:
  """Everything that shapes an OmniSegNet.

  Sub-configs may be given as dicts (e.g. from ml_collections: `OmniSegNetConfig(**cfg.model.to_dict())`); they
  are converted to their dataclasses.

  Attributes:
    swin: the image encoder.
    bert: the text encoder.
    pixel_encoder: the target image's multi-scale encoder; its `mask_dim` must equal the decoder's.
    prompt_encoder: the omni-prompt encoder; its `prompt_dim` is the width of every prompt token.
    mask_decoder: the mask decoder.
    omni_fusion: 'union' (decode each prompt, OR the masks; the release) or 'joint' (one decode over the
      concatenated prompt tokens; the paper).
    early_fusion: also fuse the prompt into the Swin stages (PWAM, ReLA/release); costs one target encoding per
      prompt set instead of one per image.
    max_text_len: the longest token sequence accepted (20 in the paper).
  """

  swin: SwinConfig
  bert: BertConfig
  pixel_encoder: PixelEncoderConfig
  prompt_encoder: PromptEncoderConfig
  mask_decoder: MaskDecoderConfig
  omni_fusion: str = "union"
  early_fusion: bool = False
  max_text_len: int = 20

  def __post_init__(self):
    for name, config_class in _SUB_CONFIGS.items():
      value = getattr(self, name)
      if isinstance(value, Mapping):
        object.__setattr__(self, name, config_class(**value))
      elif not isinstance(value, config_class):
        raise TypeError(f"OmniSegNetConfig.{name} must be a {config_class.__name__} or a dict of its fields; "
                        f"got {type(value).__name__}")
    if self.omni_fusion not in OMNI_FUSION_MODES:
      raise ValueError(f"OmniSegNetConfig: {self.omni_fusion=} must be one of {OMNI_FUSION_MODES}")
    if self.mask_decoder.mask_dim != self.pixel_encoder.mask_dim:
      raise ValueError(f"OmniSegNetConfig: mask_decoder.mask_dim={self.mask_decoder.mask_dim} must equal "
                       f"pixel_encoder.mask_dim={self.pixel_encoder.mask_dim} (the decoder dots its mask "
                       "embeddings with the pixel encoder's mask_features)")
    if self.max_text_len > self.bert.max_position_embeddings:
      raise ValueError(f"OmniSegNetConfig: {self.max_text_len=} exceeds bert.max_position_embeddings="
                       f"{self.bert.max_position_embeddings}")

  @property
  def prompt_dim(self) -> int:
    """Width of every prompt token (text and visual) entering the mask decoder."""
    return self.prompt_encoder.prompt_dim

  @classmethod
  def tiny_test(cls, **overrides: Any) -> OmniSegNetConfig:
    """The smallest consistent model, for unit tests: each part's tiny config, cut to one layer per stage where
    that keeps every code path (few ops = fast jit compiles). Inputs of 64 x 64 pixels give a 2 x 2 stride-32 map.
    """
    fields = dict(swin=dataclasses.replace(SwinConfig.tiny_test(), depths=(1, 1, 1, 1)),
                  bert=dataclasses.replace(BertConfig.tiny_test(), num_layers=1),
                  pixel_encoder=PixelEncoderConfig.tiny_test(),
                  prompt_encoder=dataclasses.replace(PromptEncoderConfig.tiny_test(), num_layers=1),
                  mask_decoder=MaskDecoderConfig.tiny_test(), max_text_len=8)
    return cls(**{**fields, **overrides})

  @classmethod
  def demo(cls, **overrides: Any) -> OmniSegNetConfig:
    """The CPU demo: a small Swin and the real all-MiniLM-L6-v2 text encoder (384 wide, 6 layers, 12 heads)."""
    fields = dict(swin=SwinConfig.demo(), bert=BertConfig.minilm_l6(), pixel_encoder=PixelEncoderConfig.demo(),
                  prompt_encoder=PromptEncoderConfig.demo(), mask_decoder=MaskDecoderConfig.demo())
    return cls(**{**fields, **overrides})

  @classmethod
  def paper(cls, **overrides: Any) -> OmniSegNetConfig:
    """The paper's model: Swin-B (window 12) + BERT-base, 480 x 480 inputs, 20 text tokens."""
    fields = dict(swin=SwinConfig.swin_b(), bert=BertConfig.bert_base(), pixel_encoder=PixelEncoderConfig.paper(),
                  prompt_encoder=PromptEncoderConfig.paper(), mask_decoder=MaskDecoderConfig.paper())
    return cls(**{**fields, **overrides})

  @classmethod
  def release(cls, **overrides: Any) -> OmniSegNetConfig:
    """What the authors' released code computes (and their published checkpoint holds): the paper's sizes with
    PWAM early fusion in every Swin stage, the release's prompt encoder and decoder, per-prompt decoding with
    the masks OR-ed. Row by row: docs/paper_vs_release.md."""
    fields = dict(swin=SwinConfig.swin_b(), bert=BertConfig.bert_base(), pixel_encoder=PixelEncoderConfig.paper(),
                  prompt_encoder=PromptEncoderConfig.release(), mask_decoder=MaskDecoderConfig.release(),
                  early_fusion=True, omni_fusion="union")
    return cls(**{**fields, **overrides})


class TextProjection(nn.Module):
  """BERT hidden states -> text prompt tokens: LayerNorm (the release's lang_norm), then Dense if widths differ."""

  prompt_dim: int

  @nn.compact
  def __call__(self, hidden: Array) -> Array:
    hidden = layers.LayerNorm(name="norm")(hidden)
    if hidden.shape[-1] != self.prompt_dim:
      hidden = layers.Dense(self.prompt_dim, ("embed", "mlp"), name="dense")(hidden)
    return layers.constrain(hidden, ("batch", "length", "embed"))


class PixelWordAttention(nn.Module):
  """LAVT's pixel-word attention module (PWAM): (B, H, W, C) pixels and prompt tokens -> their fusion product.

  Every pixel attends to the prompt tokens (one head; queries and outputs instance-normalised over the pixels,
  as in LAVT); the result is multiplied elementwise with a projection of the pixel itself and projected again.
  Padded tokens get LAVT's additive -10^4 and zero keys/values.
  """

  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: Array, prompt_tokens: Array, prompt_mask: Array, *, deterministic: bool = True) -> Array:
    """x (B, H, W, C), prompt_tokens (B, L, D), prompt_mask (B, L) -> (B, H, W, C)."""
    channels = x.shape[-1]

    def dense(features, name):
      return layers.Dense(features, ("embed", "mlp"), name=name)

    def instance_norm(y):  # over the pixels, per channel, no affine (torch InstanceNorm1d defaults)
      mean = y.mean(axis=(1, 2), keepdims=True)
      return (y - mean) * jax.lax.rsqrt(y.var(axis=(1, 2), keepdims=True) + 1e-5)

    dropout = nn.Dropout(self.dropout_rate)
    pixels = dropout(layers.gelu(dense(channels, "pixel_projection")(x)), deterministic=deterministic)
    valid = prompt_mask.astype(bool)
    query = instance_norm(dense(channels, "query")(x))
    key = dense(channels, "key")(prompt_tokens) * valid[..., None]
    value = dense(channels, "value")(prompt_tokens) * valid[..., None]
    logits = jnp.einsum("bhwc,blc->bhwl", query, key).astype(jnp.float32) / np.sqrt(channels)
    logits = logits - 1e4 * (1.0 - valid[:, None, None, :])
    attended = jnp.einsum("bhwl,blc->bhwc", jax.nn.softmax(logits, axis=-1).astype(value.dtype), value)
    attended = instance_norm(dense(channels, "output")(attended))
    fused = dropout(layers.gelu(dense(channels, "fused_projection")(pixels * attended)), deterministic=deterministic)
    return layers.constrain(fused, ("batch", "height", "width", "embed"))


class ResidualGate(nn.Module):
  """tanh(W2 relu(W1 m)), LAVT's gate on the PWAM product before it joins the residual stream; W1 and W2 start at
  zero, so a fresh fused Swin passes the plain Swin's stream from stage to stage."""

  @nn.compact
  def __call__(self, product: Array) -> Array:
    channels = product.shape[-1]
    zeros = nn.initializers.zeros_init()
    hidden = nn.relu(layers.Dense(channels, ("embed", "mlp"), use_bias=False, kernel_init=zeros, name="gate_in")(
        product))
    return jnp.tanh(layers.Dense(channels, ("mlp", "embed"), use_bias=False, kernel_init=zeros, name="gate_out")(
        hidden))


class _FusedSwinStage(nn.Module):
  """`swin.SwinStage` with PWAM after the blocks: the stage outputs the PWAM product, patch merging reads
  `x + gate * product` (same parameter names as `SwinStage` + `pwam/` and, before a merging, `gate/`)."""

  config: SwinConfig
  stage: int
  drop_path_rates: tuple[float, ...]
  downsample: bool

  @nn.compact
  def __call__(self, x: Array, prompt_tokens: Array | None, prompt_mask: Array | None,
               deterministic: bool = True) -> tuple[Array, Array | None]:
    config = self.config
    dtype = jnp.dtype(config.dtype)
    block_cls = nn.remat(swin.SwinBlock, static_argnums=(2,)) if config.remat else swin.SwinBlock
    for block in range(config.depths[self.stage]):
      x = block_cls(num_heads=config.num_heads[self.stage], window_size=config.window_size,
                    shift_size=0 if block % 2 == 0 else config.window_size // 2, mlp_ratio=config.mlp_ratio,
                    drop_path_rate=self.drop_path_rates[block], layer_norm_eps=config.layer_norm_eps, dtype=dtype,
                    name=f"block{block}")(x, deterministic)
    out = x
    if prompt_tokens is not None:
      out = PixelWordAttention(name="pwam")(x, prompt_tokens, prompt_mask, deterministic=deterministic)
      if self.downsample:
        x = x + ResidualGate(name="gate")(out) * out
    merged = swin.PatchMerging(dtype=dtype, name="patch_merging")(x) if self.downsample else None
    return out, merged


class EarlyFusionSwin(swin.Swin):
  """Swin with the prompt fused into every stage by PWAM (LAVT/ReLA/the release's early fusion).

  Same parameter tree as `swin.Swin` plus `stage{s}/pwam/` and `stage{s}/gate/`, so Swin checkpoints load into
  it; with no prompt (the reference image) it is exactly `swin.Swin`.
  """

  @nn.compact
  def __call__(self, images: Array, prompt_tokens: Array | None = None, prompt_mask: Array | None = None, *,
               deterministic: bool = True) -> dict[str, Array]:
    """Like `swin.Swin.__call__`; prompt_tokens (B, L, D) with prompt_mask (B, L) are fused after every stage."""
    config = self.config
    dtype = jnp.dtype(config.dtype)
    x = self.patch_embedding(images)
    total_blocks = sum(config.depths)
    rates = [config.drop_path_rate * i / max(total_blocks - 1, 1) for i in range(total_blocks)]
    outputs = {}
    for stage, name in enumerate(config.output_names):
      first = sum(config.depths[:stage])
      stage_out, x = _FusedSwinStage(config, stage, tuple(rates[first:first + config.depths[stage]]),
                                     downsample=stage < config.num_stages - 1, name=f"stage{stage}")(
                                         x, prompt_tokens, prompt_mask, deterministic)
      out = layers.LayerNorm(1e-5, dtype=dtype, name=f"norm_{name}")(stage_out)
      outputs[name] = layers.constrain(out, ("batch", "height", "width", "embed"))
    return outputs


class OmniSegNet(nn.Module):
  """The OmniSegNet model (see the module docstring). Methods work with `model.apply(..., method=...)`."""

  config: OmniSegNetConfig

  def setup(self):
    cfg = self.config
    self.image_encoder = EarlyFusionSwin(cfg.swin) if cfg.early_fusion else Swin(cfg.swin)
    self.text_encoder = BertEncoder(cfg.bert)
    self.text_projection = TextProjection(cfg.prompt_dim)
    self.pixel_encoder = PixelEncoder(cfg.pixel_encoder)
    self.prompt_encoder = OmniPromptEncoder(cfg.prompt_encoder)
    self.mask_decoder = MaskDecoder(cfg.mask_decoder)

  # ---------------------------------------------------------------------------------------------------------
  # Encoders
  # ---------------------------------------------------------------------------------------------------------

  def _backbone(self, image: Array, name: str, deterministic: bool, prompt_tokens: Array | None = None,
                prompt_mask: Array | None = None) -> dict[str, Array]:
    """ImageNet-normalises a uint8 / 0..255 float NHWC image and runs Swin (fusing the prompt if given)."""
    if image.ndim != 4 or image.shape[-1] != 3:
      raise ValueError(f"OmniSegNet: {name}.shape={image.shape} must be (B, H, W, 3) NHWC, values 0..255")
    image = image.astype(jnp.float32)
    image = (image - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
    if self.config.early_fusion:
      return self.image_encoder(image, prompt_tokens, prompt_mask, deterministic=deterministic)
    return self.image_encoder(image, deterministic=deterministic)

  def _check_late_fusion(self, method: str) -> None:
    if self.config.early_fusion:
      raise ValueError(f"OmniSegNet.{method}: with early_fusion=True the target image's features depend on the "
                       "prompt, so the image cannot be encoded once and decoded later; call the model itself "
                       "(__call__), or use early_fusion=False")

  def encode_image(self, image: Array, *, deterministic: bool = True) -> ImageFeatures:
    """Target image (B, H, W, 3), uint8 or float 0..255 -> the features every prompt is decoded against.

    Late fusion only. Returns:
      {"mask_features": (B, H/4, W/4, mask_dim), "multi_scale_features": [(B, H/32, W/32, D),
      (B, H/16, W/16, D), (B, H/8, W/8, D)]}.
    """
    self._check_late_fusion("encode_image")
    return self._pixel_features(self._backbone(image, "image", deterministic), deterministic)

  def _pixel_features(self, backbone_features: dict[str, Array], deterministic: bool) -> ImageFeatures:
    mask_features, multi_scale_features = self.pixel_encoder(backbone_features, deterministic=deterministic)
    return {"mask_features": mask_features, "multi_scale_features": list(multi_scale_features)}

  def encode_text(self, text_ids: Array, text_attention_mask: Array, *,
                  deterministic: bool = True) -> tuple[Array, Array]:
    """Token ids (B, L) and their padding mask (B, L) -> (text tokens (B, L, prompt_dim), mask (B, L) bool)."""
    if text_ids.ndim != 2 or text_ids.shape[1] > self.config.max_text_len:
      raise ValueError(f"OmniSegNet: {text_ids.shape=} must be (B, L) with L <= {self.config.max_text_len=} "
                       "(tokenize with that max length)")
    hidden = self.text_encoder(text_ids, text_attention_mask, deterministic=deterministic)
    return self.text_projection(hidden), text_attention_mask.astype(bool)

  def encode_call_text(self, text_ids: Array | None, text_attention_mask: Array | None, ref_image: Array | None,
                       ref_prompt: Array | None, *, deterministic: bool = True) -> tuple[Array | None, Array | None]:
    """`__call__`'s prompt arguments checked, and its text encoded ((None, None) without text)."""
    if ref_image is not None and ref_prompt is None:
      raise ValueError("OmniSegNet: ref_image needs ref_prompt (B, Hr, Wr) binary")
    if ref_image is None and text_ids is None:
      raise ValueError("OmniSegNet: give a text prompt (text_ids) or a visual prompt (ref_image, ref_prompt)")
    if text_ids is None:
      return None, None
    if text_attention_mask is None:
      raise ValueError("OmniSegNet: text_ids needs text_attention_mask (B, L) {0, 1}")
    return self.encode_text(text_ids, text_attention_mask, deterministic=deterministic)

  def encode_prompts(self, text_ids: Array | None = None, text_attention_mask: Array | None = None,
                     ref_image: Array | None = None, ref_prompt: Array | None = None, *,
                     deterministic: bool = True) -> dict[str, Array | None]:
    """A batch of prompts encoded for `decode` (its keyword arguments; an absent modality's are None).

    Late fusion only: with `encode_image` this answers prompts about an image encoded once.
    """
    self._check_late_fusion("encode_prompts")
    text_tokens, text_mask = self.encode_call_text(text_ids, text_attention_mask, ref_image, ref_prompt,
                                                   deterministic=deterministic)
    visual_tokens = visual_mask = None
    if ref_image is not None:
      visual_tokens, visual_mask = self.encode_visual(ref_image, ref_prompt, deterministic=deterministic)
    return {"text_tokens": text_tokens, "text_mask": text_mask, "visual_tokens": visual_tokens,
            "visual_mask": visual_mask}

  def encode_visual(self, ref_image: Array, ref_prompt: Array, *,
                    deterministic: bool = True) -> tuple[Array, Array]:
    """Reference image (B, Hr, Wr, 3) 0..255 and its binary prompt (B, Hr, Wr) -> (tokens (B, n, prompt_dim),
    mask (B, n) bool). The reference goes through the same image encoder (weights) as the target (with early
    fusion: without any prompt fused in, as in the release)."""
    ref_features = self._backbone(ref_image, "ref_image", deterministic)
    return self.prompt_encoder(ref_features, ref_prompt, deterministic=deterministic)

  # ---------------------------------------------------------------------------------------------------------
  # Decoding
  # ---------------------------------------------------------------------------------------------------------

  def decode_prompts(self, image_features: ImageFeatures, prompt_tokens: Array, prompt_mask: Array, *,
                     deterministic: bool = True) -> dict[str, Array]:
    """One mask decoder call for one prompt set per example; image features of batch 1 are broadcast.

    This is the primitive a predictor uses to decode K prompts against an image encoded once.
    """
    batch = prompt_tokens.shape[0]
    image_features = broadcast_features(image_features, batch)
    return self.mask_decoder(image_features["multi_scale_features"], image_features["mask_features"],
                             prompt_tokens, prompt_mask, deterministic=deterministic)

  def decode(self, image_features: ImageFeatures, text_tokens: Array | None = None,
             text_mask: Array | None = None, visual_tokens: Array | None = None,
             visual_mask: Array | None = None, has_text: Array | None = None, has_visual: Array | None = None, *,
             deterministic: bool = True) -> dict[str, Array]:
    """Decodes the text and/or visual prompts of each example and fuses them (see the module docstring).

    Late fusion only.

    Args:
      image_features: from `encode_image`; batch B, or 1 to share one image among all prompts.
      text_tokens, text_mask: from `encode_text`, or None when the batch carries no text.
      visual_tokens, visual_mask: from `encode_visual`, or None when the batch carries no visual prompt.
      has_text, has_visual: (B,) bool, which examples have that prompt (all True when None); ignored for a
        modality whose tokens are None.

    Returns:
      the output dict described in the module docstring.
    """
    self._check_late_fusion("decode")
    prompts = prepare_prompts(text_tokens, text_mask, visual_tokens, visual_mask, has_text, has_visual)
    prompt_sets = make_prompt_sets(prompts, self.config.omni_fusion)
    decoded = self.decode_prompt_sets(image_features, prompt_sets, deterministic=deterministic)
    return assemble_outputs(decoded, prompts, prompt_sets)

  def decode_prompt_sets(self, image_features: ImageFeatures, prompt_sets: list[tuple[str, Array, Array]], *,
                         deterministic: bool = True) -> dict[str, Array]:
    """The prompt sets stacked along the batch (set-major) and decoded in one mask-decoder call."""
    tokens, mask = stack_prompt_sets(prompt_sets)
    features = broadcast_features(image_features, prompt_sets[0][1].shape[0])
    features = jax.tree.map(lambda x: jnp.concatenate([x] * len(prompt_sets)), features)
    return self.decode_prompts(features, tokens, mask, deterministic=deterministic)

  def encode_pair(self, image: Array, ref_image: Array | None, *,
                  deterministic: bool = True) -> tuple[dict[str, Array], dict[str, Array] | None]:
    """The image encoder's features of the target and of the reference (None without one), late fusion.

    When both have one shape they share one image-encoder call, concatenated along the batch (same weights,
    one bigger batch); the result equals the separate calls.
    """
    if ref_image is not None and ref_image.shape == image.shape:
      batch = image.shape[0]
      both = self._backbone(jnp.concatenate([image.astype(jnp.float32), ref_image.astype(jnp.float32)]),
                            "image and ref_image", deterministic)
      return jax.tree.map(lambda x: x[:batch], both), jax.tree.map(lambda x: x[batch:], both)
    target = self._backbone(image, "image", deterministic)
    return target, None if ref_image is None else self._backbone(ref_image, "ref_image", deterministic)

  def __call__(self, image: Array, text_ids: Array | None = None, text_attention_mask: Array | None = None,
               ref_image: Array | None = None, ref_prompt: Array | None = None, has_text: Array | None = None,
               has_visual: Array | None = None, *, deterministic: bool = True) -> dict[str, Array]:
    """Full forward = encode_image + encode_text + encode_visual + decode.

    Target and reference share one image-encoder call when they have one shape (`encode_pair`). With early
    fusion the target image is encoded once per prompt set, with that set's tokens fused into the Swin stages.

    Args:
      image: target images (B, H, W, 3), uint8 or float 0..255.
      text_ids, text_attention_mask: (B, L) int token ids and {0, 1} padding mask; None for no text at all.
      ref_image: (B, Hr, Wr, 3) reference images, 0..255; None for no visual prompt at all.
      ref_prompt: (B, Hr, Wr) binary spatial prompt (mask, box or scribble) on the reference image.
      has_text, has_visual: (B,) bool, which examples carry that prompt (all True when None).
      deterministic: disables dropout / drop-path when True.
    """
    text_tokens, text_mask = self.encode_call_text(text_ids, text_attention_mask, ref_image, ref_prompt,
                                                   deterministic=deterministic)
    visual_tokens = visual_mask = None

    if self.config.early_fusion:
      if ref_image is not None:
        visual_tokens, visual_mask = self.encode_visual(ref_image, ref_prompt, deterministic=deterministic)
      prompts = prepare_prompts(text_tokens, text_mask, visual_tokens, visual_mask, has_text, has_visual)
      prompt_sets = make_prompt_sets(prompts, self.config.omni_fusion)
      tokens, mask = stack_prompt_sets(prompt_sets)
      images = jnp.concatenate([image] * len(prompt_sets))
      features = self._pixel_features(self._backbone(images, "image", deterministic, tokens, mask), deterministic)
      decoded = self.decode_prompts(features, tokens, mask, deterministic=deterministic)
      return assemble_outputs(decoded, prompts, prompt_sets)

    target_features, ref_features = self.encode_pair(image, ref_image, deterministic=deterministic)
    image_features = self._pixel_features(target_features, deterministic)
    if ref_features is not None:
      visual_tokens, visual_mask = self.prompt_encoder(ref_features, ref_prompt, deterministic=deterministic)
    return self.decode(image_features, text_tokens, text_mask, visual_tokens, visual_mask, has_text, has_visual,
                       deterministic=deterministic)


# A prompt of one modality for a batch: (tokens (B, L, D) zeroed where absent, mask (B, L), available (B,)).
_Prompt = tuple[Array, Array, Array]


def prepare_prompts(text_tokens, text_mask, visual_tokens, visual_mask, has_text,
                     has_visual) -> dict[str, _Prompt]:
  """Validates the prompts and blanks the absent ones: zero tokens, attended by no one."""
  prompts = {}
  for name, tokens, mask, available in (("text", text_tokens, text_mask, has_text),
                                        ("visual", visual_tokens, visual_mask, has_visual)):
    if tokens is None:
      continue
    if mask is None or tokens.ndim != 3 or mask.shape != tokens.shape[:2]:
      raise ValueError(f"OmniSegNet.decode: {name}_tokens (B, L, D) needs a {name}_mask (B, L); got "
                       f"{getattr(tokens, 'shape', None)} and {getattr(mask, 'shape', None)}")
    batch = tokens.shape[0]
    available = jnp.ones((batch,), bool) if available is None else jnp.asarray(available).astype(bool)
    if available.shape != (batch,):
      raise ValueError(f"OmniSegNet.decode: has_{name}.shape={available.shape} must be ({batch},)")
    tokens = tokens * available[:, None, None].astype(tokens.dtype)
    mask = mask.astype(bool) & available[:, None]
    prompts[name] = (tokens, mask, available)
  if not prompts:
    raise ValueError("OmniSegNet.decode: give text_tokens or visual_tokens (or both)")
  batches = {name: p[0].shape[0] for name, p in prompts.items()}
  if len(set(batches.values())) != 1:
    raise ValueError(f"OmniSegNet.decode: the prompts' batch sizes differ: {batches}")
  return prompts


def prompt_batch(prompts: dict[str, _Prompt]) -> int:
  return next(iter(prompts.values()))[0].shape[0]


def make_prompt_sets(prompts: dict[str, _Prompt], omni_fusion: str) -> list[tuple[str, Array, Array]]:
  """The prompt sets to decode: one per modality, plus their concatenation for 'joint' fusion of two."""
  sets = [(name, tokens, mask) for name, (tokens, mask, _) in prompts.items()]
  if omni_fusion == "joint" and len(prompts) == 2:
    (_, text_tokens, text_mask), (_, visual_tokens, visual_mask) = sets
    sets.append(("joint", jnp.concatenate([text_tokens, visual_tokens], 1),
                 jnp.concatenate([text_mask, visual_mask], 1)))
  return sets


def stack_prompt_sets(prompt_sets: list[tuple[str, Array, Array]]) -> tuple[Array, Array]:
  """Stacks the sets along the batch (set-major), padded to one length with masked zeros: one decoder call."""
  length = max(tokens.shape[1] for _, tokens, _ in prompt_sets)
  tokens = jnp.concatenate(
      [jnp.pad(tokens, ((0, 0), (0, length - tokens.shape[1]), (0, 0))) for _, tokens, _ in prompt_sets])
  mask = jnp.concatenate([jnp.pad(mask, ((0, 0), (0, length - mask.shape[1]))) for _, _, mask in prompt_sets])
  return tokens, mask


def assemble_outputs(decoded: dict[str, Array], prompts: dict[str, _Prompt],
                      prompt_sets: list[tuple[str, Array, Array]]) -> dict[str, Array]:
  """Splits the stacked decode per set and names the outputs; combined = joint decode, union, or the one prompt."""
  batch = prompt_batch(prompts)
  per_set = {name: jax.tree.map(lambda x, i=i: x[i * batch:(i + 1) * batch], decoded)
             for i, (name, _, _) in enumerate(prompt_sets)}
  outputs = {}
  for name in prompts:
    outputs.update({f"{name}_{key}": value for key, value in per_set[name].items()})
  if "joint" in per_set:
    combined = per_set["joint"]
  elif len(prompts) == 2:
    combined = union_outputs(per_set["text"], per_set["visual"], prompts["text"][2], prompts["visual"][2])
  else:
    combined = per_set[next(iter(prompts))]
  outputs.update(combined)
  return outputs


def broadcast_features(image_features: ImageFeatures, batch: int) -> ImageFeatures:
  """Returns the features with batch `batch`, broadcasting a batch of 1 (one image, many prompts)."""
  image_batch = image_features["mask_features"].shape[0]
  if image_batch == batch:
    return image_features
  if image_batch != 1:
    raise ValueError(f"OmniSegNet: the image features have batch {image_batch} but the prompts have batch "
                     f"{batch}; they must match, or the image batch must be 1 (shared by every prompt)")
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (batch, *x.shape[1:])), image_features)


def union_outputs(text: Mapping[str, Array], visual: Mapping[str, Array], has_text: Array,
                  has_visual: Array) -> dict[str, Array]:
  """OR of two prompts' masks/regions and AND of their no-target calls, in logit space (see module docstring).

  At each pixel (region cell) the combined logits are those of the available prompt with the larger foreground
  margin; the combined no-target logits are those of the available prompt with the smaller no-target margin.
  When only one prompt is available, its outputs are taken; with neither, the visual ones.
  """

  def take_text_where(text_better, key):
    t, v = text[key], visual[key]
    extra = (1,) * (t.ndim - 2)
    only_text = (has_text & ~has_visual).reshape(-1, *extra)
    both = (has_text & has_visual).reshape(-1, *extra)
    use_text = only_text | (both & text_better)
    return jnp.where(use_text[..., None], t, v)

  def margin(x):
    return x[..., 1] - x[..., 0]

  return {
      "mask_logits": take_text_where(margin(text["mask_logits"]) >= margin(visual["mask_logits"]), "mask_logits"),
      "region_logits": take_text_where(margin(text["region_logits"]) >= margin(visual["region_logits"]),
                                       "region_logits"),
      "nt_logits": take_text_where(margin(text["nt_logits"]) <= margin(visual["nt_logits"]), "nt_logits"),
  }


def load_pretrained_text_encoder(params: Mapping[str, Any], path: str | os.PathLike) -> dict[str, Any]:
  """Returns `params` with its `text_encoder` subtree replaced by an HF-format BERT checkpoint's weights.

  Args:
    params: OmniSegNet parameters (the 'params' collection, or the full variables dict holding it), boxed
      (`nn.LogicallyPartitioned`, as `init` returns them) or plain arrays.
    path: an HF BERT folder (config.json + model.safetensors) or its .safetensors file; see `bert.load_hf_bert`.

  Raises:
    ValueError: when the checkpoint's shapes do not fit the model's text encoder (name the config to change).
  """
  if "params" in params and "text_encoder" not in params:
    return {**params, "params": load_pretrained_text_encoder(params["params"], path)}
  if "text_encoder" not in params:
    raise ValueError(f"load_pretrained_text_encoder: params have no 'text_encoder' subtree (top-level keys: "
                     f"{sorted(params)}); pass OmniSegNet parameters")
  checkpoint_config, loaded = load_hf_bert(path)
  ours = traverse_util.flatten_dict(params["text_encoder"])
  theirs = traverse_util.flatten_dict(loaded)
  if set(ours) != set(theirs):
    raise ValueError(f"BERT checkpoint {str(path)!r} has {checkpoint_config.num_layers} layers but the model's "
                     f"text encoder has different parameters: only in the model "
                     f"{sorted('/'.join(k) for k in set(ours) - set(theirs))[:6]}, only in the checkpoint "
                     f"{sorted('/'.join(k) for k in set(theirs) - set(ours))[:6]}; set OmniSegNetConfig.bert to "
                     "the checkpoint's config (BertConfig.from_hf_config)")
  replaced = {}
  for key, leaf in ours.items():
    value = theirs[key]
    current = leaf.value if isinstance(leaf, nn.meta.AxisMetadata) else leaf
    if tuple(value.shape) != tuple(current.shape):
      raise ValueError(f"BERT checkpoint {str(path)!r}: text_encoder/{'/'.join(key)} is {tuple(value.shape)} "
                       f"in the checkpoint but {tuple(current.shape)} in the model; set OmniSegNetConfig.bert "
                       "to the checkpoint's config (BertConfig.from_hf_config)")
    value = jnp.asarray(value, dtype=current.dtype)
    replaced[key] = leaf.replace_boxed(value) if isinstance(leaf, nn.meta.AxisMetadata) else value
  return {**params, "text_encoder": traverse_util.unflatten_dict(replaced)}


def parameter_counts(params: Mapping[str, Any]) -> dict[str, int]:
  """Number of parameters per top-level group (the documented path prefixes) and in total."""
  params = params.get("params", params)
  counts = {name: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(subtree)))
            for name, subtree in params.items()}
  counts["total"] = sum(counts.values())
  return counts


# The names `models.factory` looks up in every model module (big_vision's convention).
Config = OmniSegNetConfig
Model = OmniSegNet
