"""Tests of the shapes project's model (omniris_jax/models/proj/shapes/omnisegnet.py): each switch on its piece
(conv stem, prompt encoder, mask decoder, heads of the model) and, with every switch off, the core OmniSegNet."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from omniris_jax.models import layers, swin
from omniris_jax.models import prompt_encoder as prompt_encoder_lib
from omniris_jax.models.mask_decoder import MaskDecoder, MaskDecoderConfig
from omniris_jax.models.omnisegnet import OmniSegNet, OmniSegNetConfig
from omniris_jax.models.proj.shapes import omnisegnet as shapes
from omniris_jax.models.proj.shapes.omnisegnet import (ConvStem, ConvStemSwin, PixelPromptFusion, ShapesMaskDecoder,
                                                       ShapesOmniSegNet, ShapesOmniSegNetConfig, ShapesPromptEncoder)

from test_mask_decoder import BATCH as DECODER_BATCH  # noqa: E402  (tests/ is on sys.path under pytest)
from test_mask_decoder import _inputs as _decoder_inputs  # noqa: E402
from test_omnisegnet import BATCH, SIZE, _batch  # noqa: E402


def _with_leaf(variables, path, value):
  """A copy of `variables` with params[path...] (a boxed leaf) replaced by `value`."""
  params = jax.tree.map(lambda x: x, variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  node = params
  for key in path[:-1]:
    node = node[key]
  node[path[-1]] = node[path[-1]].replace_boxed(value)
  return {"params": params}


def _max_abs(tree) -> float:
  return max(float(np.abs(np.asarray(leaf)).max()) for leaf in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------------------------------------
# Image encoder: the conv stem
# ----------------------------------------------------------------------------------------------------------


def test_conv_stem_overlaps_patches_and_keeps_the_strides():
  """The conv stem gives the same stride-4 grid as swin.PatchEmbedding, and a token sees pixels of its
  neighbouring patches (the plain patch embedding does not): that overlap is what the stem is for."""
  images = np.random.default_rng(0).standard_normal((1, 16, 16, 3)).astype(np.float32)
  nudged = images.copy()
  nudged[0, 3, 3] += 1.0  # the bottom-right pixel of token (0, 0)'s patch, next to token (1, 1)'s
  outputs = {}
  for conv_stem, embed in ((False, swin.PatchEmbedding(8, 4)), (True, ConvStem(8, 4))):
    params = nn.unbox(embed.init(jax.random.key(0), images)["params"])
    outputs[conv_stem] = [np.asarray(embed.apply({"params": params}, x)) for x in (images, nudged)]
    if conv_stem:
      assert sorted(params) == ["norm", "projection", "stem0", "stem1"]
      assert params["stem0"]["kernel"].shape == (3, 3, 3, 8)  # width max(8 // 2, 8): never below 8
      assert params["projection"]["kernel"].shape == (1, 1, 8, 8)
  for conv_stem, (plain, changed) in outputs.items():
    assert plain.shape == (1, 4, 4, 8)
    moved = np.abs(changed - plain).max(-1) > 1e-6
    assert moved[0, 0, 0]
    assert moved[0, 1, 1] == conv_stem, f"{conv_stem=}: token (1, 1) must see its neighbour only with the stem"
    assert not moved[0, 2:, :].any() and not moved[0, :, 2:].any()  # a token's field is 7 px wide, not the image


def test_conv_stem_needs_a_power_of_two_patch():
  patch_3 = dataclasses.replace(OmniSegNetConfig.tiny_test().swin, patch_size=3)
  ShapesOmniSegNetConfig.tiny_test(swin=patch_3)  # the stem off: any patch size
  with pytest.raises(ValueError, match="power-of-two swin.patch_size"):
    ShapesOmniSegNetConfig.tiny_test(swin=patch_3, conv_stem=True)


def _parameter_shapes(params) -> dict[str, tuple[int, ...]]:
  return {name: leaf.value.shape for name, leaf in traverse_util.flatten_dict(params, sep="/").items()}


def test_conv_stem_swin_keeps_swin_s_parameters_outside_patch_embed():
  """Only `patch_embed/` differs (abstract evaluation, no compile); the model's conv_stem switch uses it."""
  config = swin.SwinConfig.tiny_test()
  images = jax.ShapeDtypeStruct((2, 40, 56, 3), jnp.float32)
  plain_out, plain = jax.eval_shape(swin.Swin(config).init_with_output, jax.random.key(0), images)
  stem_out, stem = jax.eval_shape(ConvStemSwin(config).init_with_output, jax.random.key(0), images)
  plain, stem = _parameter_shapes(plain["params"]), _parameter_shapes(stem["params"])
  outside = lambda shapes_by_name: {k: v for k, v in shapes_by_name.items()  # noqa: E731
                                    if not k.startswith("patch_embed/")}
  assert outside(stem) == outside(plain) and len(outside(plain)) > 0
  assert sorted(k for k in stem if k.startswith("patch_embed/")) == [
      "patch_embed/norm/bias", "patch_embed/norm/scale", "patch_embed/projection/bias",
      "patch_embed/projection/kernel", "patch_embed/stem0/bias", "patch_embed/stem0/kernel",
      "patch_embed/stem1/bias", "patch_embed/stem1/kernel"]
  assert stem["patch_embed/projection/kernel"] == (1, 1, 8, config.embed_dim)
  assert jax.tree.map(lambda x: x.shape, stem_out) == jax.tree.map(lambda x: x.shape, plain_out)

  batch = _batch()
  model_params = jax.eval_shape(ShapesOmniSegNet(ShapesOmniSegNetConfig.tiny_test(conv_stem=True)).init,
                                jax.random.key(0), **batch)["params"]
  assert "stem0" in model_params["image_encoder"]["patch_embed"]


# ----------------------------------------------------------------------------------------------------------
# Prompt encoder: prompt box, prototype queries, queries inside the prompt's box
# ----------------------------------------------------------------------------------------------------------
REF_BATCH, REF_HEIGHT, REF_WIDTH = 2, 72, 104
# Swin-like channels C, 2C, 4C, 8C with C = 8 at strides 4, 8, 16, 32.
CHANNELS = {"res2": 8, "res3": 16, "res4": 32, "res5": 64}


def _swin_like_features(seed: int) -> dict[str, jax.Array]:
  rng = np.random.default_rng(seed)
  sizes = [(-(-REF_HEIGHT // 4), -(-REF_WIDTH // 4))]
  for _ in range(3):
    sizes.append((-(-sizes[-1][0] // 2), -(-sizes[-1][1] // 2)))
  return {name: jnp.asarray(rng.standard_normal((REF_BATCH, h, w, channels)), jnp.float32)
          for (name, channels), (h, w) in zip(CHANNELS.items(), sizes)}


def _box_prompt(top: int, left: int, bottom: int, right: int) -> jax.Array:
  return jnp.zeros((REF_BATCH, REF_HEIGHT, REF_WIDTH), jnp.float32).at[:, top:bottom, left:right].set(1.0)


PROMPT_A = _box_prompt(8, 4, 40, 30)
PROMPT_B = _box_prompt(30, 50, 70, 100)


def _prompt_config(**changes) -> prompt_encoder_lib.PromptEncoderConfig:
  return dataclasses.replace(prompt_encoder_lib.PromptEncoderConfig.tiny_test(), **changes)


def test_prompt_box_spans_the_foreground_pixels():
  prompt = jnp.zeros((3, 8, 10)).at[0, 2:5, 3:7].set(1.0).at[1, 7, 9].set(1.0)
  start, size = shapes.prompt_box(prompt)
  np.testing.assert_allclose(start, [[0.3, 0.25], [0.9, 0.875], [0.0, 0.0]], atol=1e-6)
  np.testing.assert_allclose(size, [[0.4, 0.375], [0.1, 0.125], [1.0, 1.0]], atol=1e-6)  # empty: whole image


def test_prototype_queries_carry_the_prompt_without_fusion():
  """With fusion 'none' the prompt reaches the tokens only through the prototype added to the queries."""
  module = ShapesPromptEncoder(_prompt_config(fusion="none"), prototype_queries=True)
  features = _swin_like_features(1)
  variables = jax.jit(module.init)(jax.random.key(0), features, PROMPT_A)
  apply = jax.jit(module.apply)
  tokens_a, tokens_b = (apply(variables, features, prompt)[0] for prompt in (PROMPT_A, PROMPT_B))
  assert "prototype_proj" in variables["params"]
  assert _max_abs(tokens_a - tokens_b) > 1e-3


def test_queries_in_prompt_box_move_the_reference_points_only():
  features = _swin_like_features(1)
  plain = prompt_encoder_lib.OmniPromptEncoder(_prompt_config(fusion="none"))
  boxed = ShapesPromptEncoder(_prompt_config(fusion="none"), queries_in_prompt_box=True)
  variables = plain.init(jax.random.key(0), features, PROMPT_A)  # no parameters of its own
  whole_image = jnp.ones((REF_BATCH, REF_HEIGHT, REF_WIDTH))
  np.testing.assert_allclose(boxed.apply(variables, features, whole_image)[0],
                             plain.apply(variables, features, whole_image)[0], rtol=1e-5, atol=1e-5)
  tokens_a, tokens_b = (boxed.apply(variables, features, p)[0] for p in (PROMPT_A, PROMPT_B))
  assert _max_abs(tokens_a - tokens_b) > 1e-3


# ----------------------------------------------------------------------------------------------------------
# Mask decoder: prompt kernel, no-target evidence, pixel fusion (word attention, low-level features), positions
# ----------------------------------------------------------------------------------------------------------
def _with_and_without(option: str):
  """The tiny decoder with `option` on and the core decoder on the same parameters without it: (inputs, out,
  plain, option params, the mean of the valid prompt tokens)."""
  config = MaskDecoderConfig.tiny_test()
  inputs = _decoder_inputs(config)
  decoder = ShapesMaskDecoder(config, **{option: True})
  variables = decoder.init(jax.random.key(0), *inputs)
  plain_params = {k: v for k, v in variables["params"].items() if k != option}
  plain = MaskDecoder(config).apply({"params": plain_params}, *inputs)
  out = decoder.apply(variables, *inputs)
  _, _, tokens, mask = inputs
  pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)  # the valid tokens only
  return inputs, out, plain, variables["params"][option], pooled


def test_prompt_kernel_adds_the_pooled_prompt_match_to_the_foreground_only():
  inputs, out, plain, kernel_params, pooled = _with_and_without("prompt_kernel")
  # The kernel, by hand: MLP of the mean of the valid tokens, dotted with the mask features.
  mask_features = inputs[1]
  unbox = lambda name: kernel_params[name]  # noqa: E731
  hidden = nn.relu(pooled @ unbox("layers_0")["kernel"].value + unbox("layers_0")["bias"].value)
  kernel = hidden @ unbox("layers_1")["kernel"].value + unbox("layers_1")["bias"].value
  np.testing.assert_allclose(out["mask_logits"][..., 0], plain["mask_logits"][..., 0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["mask_logits"][..., 1] - plain["mask_logits"][..., 1],
                             jnp.einsum("bc,bhwc->bhw", kernel, mask_features), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out["region_logits"], plain["region_logits"], rtol=1e-6)


def test_nt_evidence_reads_the_mask_and_region_margins():
  config = MaskDecoderConfig.tiny_test()
  inputs = _decoder_inputs(config)
  decoder = ShapesMaskDecoder(config, nt_evidence=True)
  variables = decoder.init(jax.random.key(0), *inputs)
  weights = jnp.array([[0.0, 1.0], [0.0, -2.0], [0.0, 3.0]])
  variables = _with_leaf(variables, ("nt_evidence", "kernel"), weights)
  variables = _with_leaf(variables, ("nt_evidence", "bias"), jnp.array([0.0, 0.5]))
  out = decoder.apply(variables, *inputs)
  plain_params = {k: v for k, v in variables["params"].items() if k != "nt_evidence"}
  plain = MaskDecoder(config).apply({"params": plain_params}, *inputs)
  region_margin = (out["region_logits"][..., 1] - out["region_logits"][..., 0]).reshape(DECODER_BATCH, -1)
  pixel_margin = out["mask_logits"][..., 1] - out["mask_logits"][..., 0]
  evidence = jnp.stack([jax.nn.sigmoid(region_margin.max(1)), jax.nn.sigmoid(pixel_margin.max((1, 2))),
                        jax.nn.sigmoid(pixel_margin).mean((1, 2))], -1)
  np.testing.assert_allclose(out["nt_logits"] - plain["nt_logits"], evidence @ weights + jnp.array([0.0, 0.5]),
                             rtol=1e-5, atol=1e-5)


def test_pixel_fusion_adds_a_prompt_and_position_dependent_term_to_the_foreground_only():
  inputs, out, plain, fusion_params, pooled = _with_and_without("pixel_fusion")
  mask_features = inputs[1]
  fusion = PixelPromptFusion(MaskDecoderConfig.tiny_test().hidden_dim)
  term = fusion.apply({"params": fusion_params}, mask_features, pooled)
  np.testing.assert_allclose(out["mask_logits"][..., 0], plain["mask_logits"][..., 0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["mask_logits"][..., 1] - plain["mask_logits"][..., 1], term, rtol=1e-4,
                             atol=1e-4)
  # The term depends on the prompt and, for the same pixel features everywhere, still on the position.
  other = fusion.apply({"params": fusion_params}, mask_features, pooled[::-1])
  assert float(jnp.abs(other - term).max()) > 1e-3
  flat = jnp.broadcast_to(mask_features[:, :1, :1], mask_features.shape)
  positional = fusion.apply({"params": fusion_params}, flat, pooled)
  assert float(jnp.abs(positional[:, 0, 0] - positional[:, -1, -1]).max()) > 1e-3


def test_pixel_word_attention_starts_as_the_pooled_fusion_and_then_tells_apart_prompts_with_the_same_mean():
  width = MaskDecoderConfig.tiny_test().hidden_dim
  words = PixelPromptFusion(width, word_attention=True, num_heads=2)
  pooled_only = PixelPromptFusion(width)
  keys = jax.random.split(jax.random.key(3), 3)
  features = jax.random.normal(keys[0], (DECODER_BATCH, 16, 16, width))
  # Two words, and the same prompt said as their mean twice: one pooled vector, different words.
  two_words = jax.random.normal(keys[1], (DECODER_BATCH, 2, width)) * 3.0
  averaged = jnp.broadcast_to(two_words.mean(1, keepdims=True), two_words.shape)
  valid = jnp.ones((DECODER_BATCH, 2), bool)
  pooled = two_words.mean(1)
  params = words.init(jax.random.key(0), features, pooled, two_words, valid)["params"]
  plain_params = {k: v for k, v in params.items() if k not in ("word_attention", "word_film")}
  plain = pooled_only.apply({"params": plain_params}, features, pooled)
  # Zero-initialised read-out: the switch alone changes nothing.
  np.testing.assert_allclose(words.apply({"params": params}, features, pooled, two_words, valid), plain,
                             rtol=1e-6, atol=1e-6)
  # Trained: the pooled head cannot tell the two prompts apart (same mean); the word-reading head can.
  params = _with_leaf({"params": params}, ("word_film", "kernel"),
                      jax.random.normal(keys[2], (width, 2 * width)))["params"]
  heard_words = words.apply({"params": params}, features, pooled, two_words, valid)
  heard_mean = words.apply({"params": params}, features, pooled, averaged, valid)
  assert float(jnp.abs(heard_words - heard_mean).max()) > 1e-2
  # Padding is not heard: a third, padded token changes nothing.
  padded = jnp.concatenate([two_words, 100.0 * jnp.ones((DECODER_BATCH, 1, width))], axis=1)
  np.testing.assert_allclose(
      words.apply({"params": params}, features, pooled, padded, jnp.array([[1, 1, 0]] * DECODER_BATCH, bool)),
      heard_words, rtol=1e-5, atol=1e-5)


def test_pixel_word_attention_is_wired_into_the_decoder_and_needs_pixel_fusion():
  with pytest.raises(ValueError, match="needs pixel_fusion"):
    ShapesOmniSegNetConfig.tiny_test(pixel_word_attention=True)
  config = MaskDecoderConfig.tiny_test()
  decoder = ShapesMaskDecoder(config, pixel_fusion=True, pixel_word_attention=True)
  inputs = _decoder_inputs(config)
  variables = decoder.init(jax.random.key(0), *inputs)
  assert {"word_attention", "word_film"} <= set(variables["params"]["pixel_fusion"])
  start = decoder.apply(variables, *inputs)
  variables = _with_leaf(variables, ("pixel_fusion", "word_film", "kernel"),
                         jnp.ones((config.hidden_dim, 2 * config.hidden_dim)))
  out = decoder.apply(variables, *inputs)
  # What the pixels heard reaches the foreground logits, and only them.
  assert float(jnp.abs(out["mask_logits"][..., 1] - start["mask_logits"][..., 1]).max()) > 1e-3
  np.testing.assert_allclose(out["mask_logits"][..., 0], start["mask_logits"][..., 0], rtol=1e-5, atol=1e-5)


def test_fusion_low_level_lets_pixels_with_the_same_mask_features_differ_by_their_backbone_features():
  width = MaskDecoderConfig.tiny_test().hidden_dim
  fusion = PixelPromptFusion(width)
  keys = jax.random.split(jax.random.key(4), 3)
  # Every pixel has the same mask features (the pixel encoder washed out what tells them apart) but its own
  # backbone features (say, its colour).
  features = jnp.broadcast_to(jax.random.normal(keys[0], (DECODER_BATCH, 1, 1, width)),
                              (DECODER_BATCH, 16, 16, width))
  low_level = jax.random.normal(keys[1], (DECODER_BATCH, 16, 16, 8))
  pooled = jax.random.normal(keys[2], (DECODER_BATCH, width))
  params = fusion.init(jax.random.key(0), features, pooled, low_level=low_level)["params"]
  assert {"low_level_projection", "low_level_norm"} <= set(params)
  plain_params = {k: v for k, v in params.items() if not k.startswith("low_level")}
  plain = fusion.apply({"params": plain_params}, features, pooled)
  read = fusion.apply({"params": params}, features, pooled, low_level=low_level)
  # The term now follows each pixel's own backbone features: reorder them and it changes.
  assert float(jnp.abs(read - plain).max()) > 1e-3
  shuffled = fusion.apply({"params": params}, features, pooled, low_level=low_level[:, ::-1])
  assert float(jnp.abs(shuffled - read).max()) > 1e-3
  # A projection of zeros is the plain head.
  zeroed = _with_leaf({"params": params}, ("low_level_projection", "kernel"), jnp.zeros((8, width)))
  zeroed = _with_leaf(zeroed, ("low_level_projection", "bias"), jnp.zeros((width,)))
  np.testing.assert_allclose(fusion.apply(zeroed, features, pooled, low_level=low_level), plain, rtol=1e-6,
                             atol=1e-6)
  with pytest.raises(ValueError, match="low_level.shape"):
    fusion.apply({"params": params}, features, pooled, low_level=low_level[:, :8])


def test_fusion_low_level_is_wired_into_the_decoder_and_needs_its_features():
  with pytest.raises(ValueError, match="needs pixel_fusion"):
    ShapesOmniSegNetConfig.tiny_test(fusion_low_level=True)
  config = MaskDecoderConfig.tiny_test()
  decoder = ShapesMaskDecoder(config, pixel_fusion=True, fusion_low_level=True)
  inputs = _decoder_inputs(config)
  low_level = jax.random.normal(jax.random.key(7), (DECODER_BATCH, 16, 16, 8))
  with pytest.raises(ValueError, match="low_level_features"):
    decoder.init(jax.random.key(0), *inputs)
  variables = decoder.init(jax.random.key(0), *inputs, low_level_features=low_level)
  out = decoder.apply(variables, *inputs, low_level_features=low_level)
  other = decoder.apply(variables, *inputs, low_level_features=low_level[:, ::-1])
  # The backbone features reach the foreground logits, and only them.
  assert float(jnp.abs(out["mask_logits"][..., 1] - other["mask_logits"][..., 1]).max()) > 1e-3
  np.testing.assert_allclose(out["mask_logits"][..., 0], other["mask_logits"][..., 0], rtol=1e-5, atol=1e-5)


def test_mask_positions_start_at_zero_and_add_projected_sine_positions_to_the_mask_features():
  config = MaskDecoderConfig.tiny_test()
  decoder = ShapesMaskDecoder(config, mask_positions=True)
  inputs = _decoder_inputs(config)
  variables = decoder.init(jax.random.key(0), *inputs)
  plain_params = {k: v for k, v in variables["params"].items() if k != "mask_position_projection"}
  plain_decoder = MaskDecoder(config)
  # Zero-initialised: the switch alone changes nothing.
  start = decoder.apply(variables, *inputs)
  plain = plain_decoder.apply({"params": plain_params}, *inputs)
  for name in ("mask_logits", "region_logits", "nt_logits"):
    np.testing.assert_allclose(start[name], plain[name], rtol=1e-6, atol=1e-6)
  # Trained: every head reads F + P @ W, P the (16 x 16) sine encoding, so two pixels with the same features
  # no longer get the same logit.
  weights = jax.random.normal(jax.random.key(1), (config.mask_dim, config.mask_dim))
  variables = _with_leaf(variables, ("mask_position_projection", "kernel"), weights)
  multi_scale, mask_features, tokens, mask = inputs
  flat = jnp.broadcast_to(mask_features[:, :1, :1], mask_features.shape)
  out = decoder.apply(variables, multi_scale, flat, tokens, mask)
  positions = layers.sine_position_encoding(16, 16, config.mask_dim, pixel_centres=True)
  by_hand = plain_decoder.apply({"params": plain_params}, multi_scale, flat + positions @ weights, tokens, mask)
  for name in ("mask_logits", "region_logits", "nt_logits"):
    np.testing.assert_allclose(out[name], by_hand[name], rtol=1e-4, atol=1e-4)
  margin = out["mask_logits"][..., 1] - out["mask_logits"][..., 0]
  assert float(jnp.abs(margin - margin[:, :1, :1]).max()) > 1e-2


# ----------------------------------------------------------------------------------------------------------
# The model: every switch off = the core model; low-level features, scene parsing, colour, category matching
# ----------------------------------------------------------------------------------------------------------
def test_every_switch_off_is_the_core_model():
  """Same key: the same parameter tree (paths, logical names, values) and the same outputs as OmniSegNet."""
  core_model = OmniSegNet(OmniSegNetConfig.tiny_test())
  shapes_model = ShapesOmniSegNet(ShapesOmniSegNetConfig.tiny_test())

  @jax.jit
  def both(key, batch):
    return core_model.init_with_output(key, **batch), shapes_model.init_with_output(key, **batch)

  (core_out, core_vars), (shapes_out, shapes_vars) = both(jax.random.key(0), _batch())
  assert set(shapes_vars) == set(core_vars) == {"params"}
  is_boxed = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
  core_flat = traverse_util.flatten_dict(core_vars["params"], sep="/")
  shapes_flat = traverse_util.flatten_dict(shapes_vars["params"], sep="/")
  assert sorted(shapes_flat) == sorted(core_flat)
  for name, leaf in core_flat.items():
    assert is_boxed(leaf) and is_boxed(shapes_flat[name]) and shapes_flat[name].names == leaf.names, name
    assert np.array_equal(shapes_flat[name].value, leaf.value), name
  assert sorted(shapes_out) == sorted(core_out)
  assert {"text_mask_logits", "visual_mask_logits"} <= set(core_out)  # both prompts decoded
  for name, value in core_out.items():
    assert np.array_equal(shapes_out[name], value), name


def test_fusion_low_level_decodes_with_the_image_encoder_s_stride_4_features():
  model = ShapesOmniSegNet(ShapesOmniSegNetConfig.tiny_test(pixel_fusion=True, fusion_low_level=True))
  batch = _batch()
  variables = jax.jit(model.init)(jax.random.key(0), **batch)

  @jax.jit
  def run(variables, batch):
    features = model.apply(variables, batch["image"], method=ShapesOmniSegNet.encode_image)
    backbone = model.apply(variables, batch["image"].astype(jnp.float32), "image", True,
                           method=ShapesOmniSegNet._backbone)
    text = model.apply(variables, batch["text_ids"], batch["text_attention_mask"],
                       method=ShapesOmniSegNet.encode_text)
    decoded = model.apply(variables, features, *text, method=ShapesOmniSegNet.decode)
    blanked = {**features, "low_level_features": jnp.zeros_like(features["low_level_features"])}
    without = model.apply(variables, blanked, *text, method=ShapesOmniSegNet.decode)
    return features, backbone["res2"], decoded, without

  features, res2, decoded, without = run(variables, batch)
  np.testing.assert_array_equal(features["low_level_features"], res2)
  assert float(jnp.abs(decoded["mask_logits"] - without["mask_logits"]).max()) > 1e-4
  # The full forward reads them the same way (rows 0 and 1 have text; row 2 gets an empty prompt's outputs).
  full = model.apply(variables, **{k: v for k, v in batch.items() if k not in ("ref_image", "ref_prompt",
                                                                                   "has_visual")})
  np.testing.assert_allclose(full["mask_logits"][:2], decoded["mask_logits"][:2], rtol=1e-4, atol=1e-4)


def test_scene_parsing_head_reads_the_mask_features_into_background_plus_categories():
  model = ShapesOmniSegNet(ShapesOmniSegNetConfig.tiny_test(num_categories=5))
  abstract = jax.eval_shape(model.init, jax.random.key(0), **_batch())
  head = abstract["params"]["category_head"]
  mask_dim = OmniSegNetConfig.tiny_test().pixel_encoder.mask_dim
  assert head["kernel"].value.shape == (mask_dim, 6) and head["kernel"].names == ("embed", None)
  outputs = jax.eval_shape(lambda v, b: model.apply(v, **b), abstract, _batch())
  assert outputs["category_logits"].shape == (BATCH, SIZE // 4, SIZE // 4, 6)
  assert "category_head" not in jax.eval_shape(ShapesOmniSegNet(ShapesOmniSegNetConfig.tiny_test()).init,
                                               jax.random.key(0), **_batch())["params"]


def test_colour_head_reads_the_mask_features_into_rgb():
  model = ShapesOmniSegNet(ShapesOmniSegNetConfig.tiny_test(colour_head=True))
  batch = _batch()
  variables = jax.jit(model.init)(jax.random.key(0), **batch)
  head = variables["params"]["colour_head"]
  mask_dim = OmniSegNetConfig.tiny_test().pixel_encoder.mask_dim
  assert head["kernel"].value.shape == (mask_dim, 3) and head["kernel"].names == ("embed", None)
  colour = model.apply(variables, **batch)["colour"]
  mask_features = model.apply(variables, batch["image"], method=ShapesOmniSegNet.encode_image)["mask_features"]
  np.testing.assert_allclose(colour, mask_features @ head["kernel"].value + head["bias"].value, rtol=1e-4,
                             atol=1e-5)
  assert "colour" not in jax.eval_shape(
      lambda b: ShapesOmniSegNet(ShapesOmniSegNetConfig.tiny_test()).init_with_output(jax.random.key(0), **b)[0],
      batch)
  with pytest.raises(ValueError, match="late fusion"):
    ShapesOmniSegNetConfig.tiny_test(colour_head=True, early_fusion=True)


def test_category_matching_adds_the_reference_category_match_to_the_visual_prompt_only():
  model = ShapesOmniSegNet(ShapesOmniSegNetConfig.tiny_test(num_categories=3, category_matching=True))
  batch = _batch()
  params = jax.jit(model.init)(jax.random.key(1), **batch)["params"]
  forward = jax.jit(lambda p: model.apply({"params": p}, **batch))
  gains = jnp.array([1.5, -0.5, -2.0, 0.25])
  with_prior = forward({**params, "category_match": params["category_match"].replace_boxed(gains)})
  without = forward({**params, "category_match": params["category_match"].replace_boxed(jnp.zeros(4))})
  # The match map by hand: the target's per-pixel category probabilities (background dropped) dotted with the
  # reference's, averaged over the prompt at stride 4.
  plain = nn.unbox(params)
  target = model.apply({"params": plain}, batch["image"], method=model.encode_image)["mask_features"]
  reference = model.apply({"params": plain}, batch["ref_image"], method=model.encode_image)["mask_features"]
  kernel, bias = plain["category_head"]["kernel"], plain["category_head"]["bias"]
  head = lambda f: jax.nn.softmax(f @ kernel + bias)[..., 1:]  # noqa: E731
  weights = jax.image.resize(batch["ref_prompt"], (BATCH, SIZE // 4, SIZE // 4), "linear", antialias=True)
  ref_categories = (weights[..., None] * head(reference)).sum((1, 2)) / weights.sum((1, 2))[:, None]
  match = jnp.einsum("bhwk,bk->bhw", head(target), ref_categories)
  delta = with_prior["visual_mask_logits"] - without["visual_mask_logits"]
  np.testing.assert_allclose(delta[..., 0], 0.0, atol=1e-5)
  np.testing.assert_allclose(delta[..., 1], 1.5 * match - 0.5, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(with_prior["visual_nt_logits"][:, 1] - without["visual_nt_logits"][:, 1],
                             -2.0 * match.max((1, 2)) + 0.25, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(with_prior["text_mask_logits"], without["text_mask_logits"], atol=1e-6)
  with pytest.raises(ValueError, match="num_categories"):
    ShapesOmniSegNetConfig.tiny_test(category_matching=True)


def test_category_matching_with_a_reference_of_another_size_equals_the_public_methods_composed():
  """A reference of another size than the target takes its own encoder path (not the batched one); its result
  must be what encode_image + encode_visual + reference_categories + decode give."""
  model = ShapesOmniSegNet(ShapesOmniSegNetConfig.tiny_test(num_categories=3, category_matching=True))
  batch = _batch()
  small = SIZE * 3 // 4
  batch = {**batch, "ref_image": jax.image.resize(batch["ref_image"].astype(jnp.float32), (BATCH, small, small, 3),
                                                  "linear"),
           "ref_prompt": (jax.image.resize(batch["ref_prompt"], (BATCH, small, small), "linear") > 0.5
                          ).astype(jnp.float32)}
  params = nn.unbox(jax.jit(model.init)(jax.random.key(1), **batch)["params"])
  params["category_match"] = jnp.array([1.5, -0.5, -2.0, 0.25])

  @jax.jit
  def both(variables):
    full = model.apply(variables, **batch)
    call = lambda method, *args, **kwargs: model.apply(variables, *args, method=method, **kwargs)  # noqa: E731
    image_features = call(ShapesOmniSegNet.encode_image, batch["image"])
    text = call(ShapesOmniSegNet.encode_text, batch["text_ids"], batch["text_attention_mask"])
    visual = call(ShapesOmniSegNet.encode_visual, batch["ref_image"], batch["ref_prompt"])
    ref_categories = call(ShapesOmniSegNet.reference_categories,
                          call(ShapesOmniSegNet.encode_image, batch["ref_image"])["mask_features"],
                          batch["ref_prompt"])
    composed = call(ShapesOmniSegNet.decode, image_features, *text, *visual, batch["has_text"], batch["has_visual"],
                    ref_categories=ref_categories)
    unmatched = call(ShapesOmniSegNet.decode, image_features, *text, *visual, batch["has_text"],
                     batch["has_visual"])
    return full, composed, unmatched

  full, composed, unmatched = both({"params": params})
  for name in composed:
    np.testing.assert_allclose(full[name], composed[name], rtol=1e-4, atol=1e-4, err_msg=name)
  assert not np.allclose(full["visual_mask_logits"], unmatched["visual_mask_logits"], atol=1e-3)  # the prior acts
