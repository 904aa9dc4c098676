"""Tests of the mask decoder: shapes, the prompt paths, masked attention and the mask-head construction."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from omniris_jax.models import layers, mask_decoder
from omniris_jax.models.mask_decoder import MaskDecoder, MaskDecoderConfig

BATCH = 2
PROMPT_LEN = 5


def _inputs(config: MaskDecoderConfig, seed: int = 0):
  keys = jax.random.split(jax.random.key(seed), 5)
  width = config.hidden_dim
  multi_scale = [jax.random.normal(keys[i], (BATCH, s, s, width)) for i, s in enumerate((2, 4, 8))]
  mask_features = jax.random.normal(keys[3], (BATCH, 16, 16, config.mask_dim))
  prompt_tokens = jax.random.normal(keys[4], (BATCH, PROMPT_LEN, width))
  prompt_mask = jnp.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], bool)
  return multi_scale, mask_features, prompt_tokens, prompt_mask


def _build(config: MaskDecoderConfig):
  """Initialises a decoder and returns (variables, jitted apply(variables, ms, mf, tokens, mask))."""
  model = MaskDecoder(config)
  variables = model.init(jax.random.key(0), *_inputs(config))
  return variables, jax.jit(model.apply)


@pytest.fixture(scope="module")
def paper_decoder():
  return _build(MaskDecoderConfig.tiny_test())


@pytest.fixture(scope="module")
def release_decoder():
  return _build(dataclasses.replace(MaskDecoderConfig.tiny_test(), prompt_cross_attention="first",
                                    region_weighting="logits"))


def test_output_shapes_and_finite(paper_decoder, release_decoder):
  config = MaskDecoderConfig.tiny_test()
  for variables, apply in (paper_decoder, release_decoder):
    out = apply(variables, *_inputs(config))
    assert out["mask_logits"].shape == (BATCH, 16, 16, 2)
    assert out["region_logits"].shape == (BATCH, config.query_grid, config.query_grid, 2)
    assert out["nt_logits"].shape == (BATCH, 2)
    for name, value in out.items():
      assert np.isfinite(np.asarray(value)).all(), name


def test_padded_prompt_tokens_are_ignored(paper_decoder):
  variables, apply = paper_decoder
  multi_scale, mask_features, tokens, mask = _inputs(MaskDecoderConfig.tiny_test())
  garbage = jnp.where(mask[..., None], tokens, 1e3 * jax.random.normal(jax.random.key(7), tokens.shape))
  base = apply(variables, multi_scale, mask_features, tokens, mask)
  changed = apply(variables, multi_scale, mask_features, garbage, mask)
  for name in base:
    np.testing.assert_allclose(changed[name], base[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_paper_variant_listens_to_the_prompt(paper_decoder):
  variables, apply = paper_decoder
  multi_scale, mask_features, tokens, mask = _inputs(MaskDecoderConfig.tiny_test())
  base = apply(variables, multi_scale, mask_features, tokens, mask)
  other = apply(variables, multi_scale, mask_features, -tokens, mask)
  assert np.abs(np.asarray(other["mask_logits"] - base["mask_logits"])).max() > 1e-3


def test_release_variant_starts_prompt_blind_through_its_zero_projection(release_decoder):
  variables, apply = release_decoder
  params = variables["params"]
  # Only block 0 attends to the prompt in the release variant.
  assert "prompt_cross_attention" in params["blocks_0"]
  assert all("prompt_cross_attention" not in params[f"blocks_{i}"] for i in (1, 2))
  multi_scale, mask_features, tokens, mask = _inputs(MaskDecoderConfig.tiny_test())
  base = apply(variables, multi_scale, mask_features, tokens, mask)
  other = apply(variables, multi_scale, mask_features, -tokens, mask)
  np.testing.assert_allclose(other["mask_logits"], base["mask_logits"], rtol=1e-6, atol=1e-6)
  # Once the projection has learnt something, the prompt matters.
  projection = params["blocks_0"]["prompt_projection"]["kernel"]
  trained = jax.tree.map(lambda x: x, variables)
  trained["params"]["blocks_0"]["prompt_projection"]["kernel"] = projection.replace_boxed(
      jax.random.normal(jax.random.key(3), projection.value.shape))
  base = apply(trained, multi_scale, mask_features, tokens, mask)
  other = apply(trained, multi_scale, mask_features, -tokens, mask)
  assert np.abs(np.asarray(other["mask_logits"] - base["mask_logits"])).max() > 1e-3


def test_mask_logits_are_region_weighted_query_masks():
  """The 2 mask channels are the per-query masks weighted by softmax(region logits), summed over queries."""
  config = dataclasses.replace(MaskDecoderConfig.tiny_test(), masked_attention=False)
  model = MaskDecoder(config)
  multi_scale, mask_features, tokens, mask = _inputs(config)
  variables = model.init(jax.random.key(0), multi_scale, mask_features, tokens, mask)
  out, state = model.apply(variables, multi_scale, mask_features, tokens, mask,
                           capture_intermediates=lambda module, _: module.name == "heads")
  # The final call of the shared heads: (region_features, query_masks, region_logits, mask_embed).
  _, query_masks, region_logits, _ = state["intermediates"]["heads"]["__call__"][-1]
  weights = jax.nn.softmax(region_logits, axis=-1)  # (B, Q, 2)
  expected = jnp.einsum("bqa,bqhw->bhwa", weights, query_masks)
  np.testing.assert_allclose(out["mask_logits"], expected, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out["region_logits"].reshape(BATCH, -1, 2), region_logits, rtol=1e-6)


def test_attention_bias_keeps_foreground_and_falls_back_to_full():
  # Query 0: foreground in the left half; query 1: empty mask -> may attend everywhere.
  query_masks = np.full((1, 2, 4, 4), -5.0, np.float32)
  query_masks[0, 0, :, :2] = 5.0
  bias = np.asarray(mask_decoder._attention_bias(jnp.asarray(query_masks), (2, 2)))
  assert bias.shape == (1, 1, 2, 4)
  np.testing.assert_array_equal(bias[0, 0, 0] == 0.0, [True, False, True, False])
  np.testing.assert_array_equal(bias[0, 0, 1], np.zeros(4))


def test_masked_attention_changes_the_decoding(paper_decoder):
  config = dataclasses.replace(MaskDecoderConfig.tiny_test(), masked_attention=False)
  variables, _ = paper_decoder  # same parameter tree: masked attention adds no parameters
  inputs = _inputs(config)
  unmasked = MaskDecoder(config).apply(variables, *inputs)
  masked = MaskDecoder(MaskDecoderConfig.tiny_test()).apply(variables, *inputs)
  assert np.abs(np.asarray(unmasked["mask_logits"] - masked["mask_logits"])).max() > 1e-4


def test_sine_position_encoding_values():
  pos = layers.sine_position_encoding(3, 5, 8, pixel_centres=True).reshape(15, 8)  # the decoder's
  assert pos.shape == (15, 8)
  # Row-major: index 1*5 + 2 is (y=1, x=2); channel 0 is sin(y) at frequency 1, channel 4 is sin(x).
  y = (1 + 0.5) / 3 * 2 * math.pi
  x = (2 + 0.5) / 5 * 2 * math.pi
  np.testing.assert_allclose(pos[7, 0], math.sin(y), rtol=1e-6)
  np.testing.assert_allclose(pos[7, 1], math.cos(y), rtol=1e-6)
  np.testing.assert_allclose(pos[7, 4], math.sin(x), rtol=1e-6)
  np.testing.assert_allclose(pos[7, 6], math.sin(x / 10000 ** 0.5), rtol=1e-6)
  assert len({tuple(np.round(p, 5)) for p in pos}) == 15  # every position distinct


def test_every_parameter_has_logical_axis_names(paper_decoder, release_decoder):
  for variables, _ in (paper_decoder, release_decoder):
    leaves = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves
    for leaf in leaves:
      assert isinstance(leaf, nn.LogicallyPartitioned), leaf
      assert len(leaf.names) == leaf.value.ndim


def test_bad_inputs_say_what_is_wrong(paper_decoder):
  variables, _ = paper_decoder
  multi_scale, mask_features, tokens, mask = _inputs(MaskDecoderConfig.tiny_test())
  model = MaskDecoder(MaskDecoderConfig.tiny_test())
  with pytest.raises(ValueError, match="multi_scale_features"):
    model.apply(variables, multi_scale[:2], mask_features, tokens, mask)
  with pytest.raises(ValueError, match="prompt_mask"):
    model.apply(variables, multi_scale, mask_features, tokens, mask[:, :3])
  with pytest.raises(ValueError, match="prompt_cross_attention"):
    MaskDecoderConfig(prompt_cross_attention="middle")


def _with_leaf(variables, path, value):
  """A copy of `variables` with params[path...] (a boxed leaf) replaced by `value`."""
  params = jax.tree.map(lambda x: x, variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  node = params
  for key in path[:-1]:
    node = node[key]
  node[path[-1]] = node[path[-1]].replace_boxed(value)
  return {"params": params}


def _with_and_without(option: str):
  """The tiny decoder with `option` on and the same parameters without it: (inputs, out, plain, option params,
  the mean of the valid prompt tokens)."""
  config = dataclasses.replace(MaskDecoderConfig.tiny_test(), **{option: True})
  inputs = _inputs(config)
  variables = MaskDecoder(config).init(jax.random.key(0), *inputs)
  plain_params = {k: v for k, v in variables["params"].items() if k != option}
  plain = MaskDecoder(MaskDecoderConfig.tiny_test()).apply({"params": plain_params}, *inputs)
  out = MaskDecoder(config).apply(variables, *inputs)
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
  config = dataclasses.replace(MaskDecoderConfig.tiny_test(), nt_evidence=True)
  inputs = _inputs(config)
  variables = MaskDecoder(config).init(jax.random.key(0), *inputs)
  weights = jnp.array([[0.0, 1.0], [0.0, -2.0], [0.0, 3.0]])
  variables = _with_leaf(variables, ("nt_evidence", "kernel"), weights)
  variables = _with_leaf(variables, ("nt_evidence", "bias"), jnp.array([0.0, 0.5]))
  out = MaskDecoder(config).apply(variables, *inputs)
  plain_params = {k: v for k, v in variables["params"].items() if k != "nt_evidence"}
  plain = MaskDecoder(MaskDecoderConfig.tiny_test()).apply({"params": plain_params}, *inputs)
  region_margin = (out["region_logits"][..., 1] - out["region_logits"][..., 0]).reshape(BATCH, -1)
  pixel_margin = out["mask_logits"][..., 1] - out["mask_logits"][..., 0]
  evidence = jnp.stack([jax.nn.sigmoid(region_margin.max(1)), jax.nn.sigmoid(pixel_margin.max((1, 2))),
                        jax.nn.sigmoid(pixel_margin).mean((1, 2))], -1)
  np.testing.assert_allclose(out["nt_logits"] - plain["nt_logits"], evidence @ weights + jnp.array([0.0, 0.5]),
                             rtol=1e-5, atol=1e-5)


def test_pixel_fusion_adds_a_prompt_and_position_dependent_term_to_the_foreground_only():
  inputs, out, plain, fusion_params, pooled = _with_and_without("pixel_fusion")
  mask_features = inputs[1]
  fusion = mask_decoder.PixelPromptFusion(MaskDecoderConfig.tiny_test().hidden_dim)
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
  words = mask_decoder.PixelPromptFusion(width, word_attention=True, num_heads=2)
  pooled_only = mask_decoder.PixelPromptFusion(width)
  keys = jax.random.split(jax.random.key(3), 3)
  features = jax.random.normal(keys[0], (BATCH, 16, 16, width))
  # Two words, and the same prompt said as their mean twice: one pooled vector, different words.
  two_words = jax.random.normal(keys[1], (BATCH, 2, width)) * 3.0
  averaged = jnp.broadcast_to(two_words.mean(1, keepdims=True), two_words.shape)
  valid = jnp.ones((BATCH, 2), bool)
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
  padded = jnp.concatenate([two_words, 100.0 * jnp.ones((BATCH, 1, width))], axis=1)
  np.testing.assert_allclose(
      words.apply({"params": params}, features, pooled, padded, jnp.array([[1, 1, 0]] * BATCH, bool)),
      heard_words, rtol=1e-5, atol=1e-5)


def test_pixel_word_attention_is_wired_into_the_decoder_and_needs_pixel_fusion():
  with pytest.raises(ValueError, match="needs pixel_fusion"):
    dataclasses.replace(MaskDecoderConfig.tiny_test(), pixel_word_attention=True)
  config = dataclasses.replace(MaskDecoderConfig.tiny_test(), pixel_fusion=True, pixel_word_attention=True)
  inputs = _inputs(config)
  variables = MaskDecoder(config).init(jax.random.key(0), *inputs)
  assert {"word_attention", "word_film"} <= set(variables["params"]["pixel_fusion"])
  start = MaskDecoder(config).apply(variables, *inputs)
  variables = _with_leaf(variables, ("pixel_fusion", "word_film", "kernel"),
                         jnp.ones((config.hidden_dim, 2 * config.hidden_dim)))
  out = MaskDecoder(config).apply(variables, *inputs)
  # What the pixels heard reaches the foreground logits, and only them.
  assert float(jnp.abs(out["mask_logits"][..., 1] - start["mask_logits"][..., 1]).max()) > 1e-3
  np.testing.assert_allclose(out["mask_logits"][..., 0], start["mask_logits"][..., 0], rtol=1e-5, atol=1e-5)


def test_fusion_low_level_lets_pixels_with_the_same_mask_features_differ_by_their_backbone_features():
  width = MaskDecoderConfig.tiny_test().hidden_dim
  fusion = mask_decoder.PixelPromptFusion(width)
  keys = jax.random.split(jax.random.key(4), 3)
  # Every pixel has the same mask features (the pixel encoder washed out what tells them apart) but its own
  # backbone features (say, its colour).
  features = jnp.broadcast_to(jax.random.normal(keys[0], (BATCH, 1, 1, width)), (BATCH, 16, 16, width))
  low_level = jax.random.normal(keys[1], (BATCH, 16, 16, 8))
  pooled = jax.random.normal(keys[2], (BATCH, width))
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
    dataclasses.replace(MaskDecoderConfig.tiny_test(), fusion_low_level=True)
  config = dataclasses.replace(MaskDecoderConfig.tiny_test(), pixel_fusion=True, fusion_low_level=True)
  inputs = _inputs(config)
  low_level = jax.random.normal(jax.random.key(7), (BATCH, 16, 16, 8))
  with pytest.raises(ValueError, match="low_level_features"):
    MaskDecoder(config).init(jax.random.key(0), *inputs)
  variables = MaskDecoder(config).init(jax.random.key(0), *inputs, low_level_features=low_level)
  out = MaskDecoder(config).apply(variables, *inputs, low_level_features=low_level)
  other = MaskDecoder(config).apply(variables, *inputs, low_level_features=low_level[:, ::-1])
  # The backbone features reach the foreground logits, and only them.
  assert float(jnp.abs(out["mask_logits"][..., 1] - other["mask_logits"][..., 1]).max()) > 1e-3
  np.testing.assert_allclose(out["mask_logits"][..., 0], other["mask_logits"][..., 0], rtol=1e-5, atol=1e-5)


def test_mask_positions_start_at_zero_and_add_projected_sine_positions_to_the_mask_features():
  config = dataclasses.replace(MaskDecoderConfig.tiny_test(), mask_positions=True)
  inputs = _inputs(config)
  variables = MaskDecoder(config).init(jax.random.key(0), *inputs)
  plain_params = {k: v for k, v in variables["params"].items() if k != "mask_position_projection"}
  plain_decoder = MaskDecoder(MaskDecoderConfig.tiny_test())
  # Zero-initialised: the switch alone changes nothing.
  start = MaskDecoder(config).apply(variables, *inputs)
  plain = plain_decoder.apply({"params": plain_params}, *inputs)
  for name in ("mask_logits", "region_logits", "nt_logits"):
    np.testing.assert_allclose(start[name], plain[name], rtol=1e-6, atol=1e-6)
  # Trained: every head reads F + P @ W, P the (16 x 16) sine encoding, so two pixels with the same features
  # no longer get the same logit.
  weights = jax.random.normal(jax.random.key(1), (config.mask_dim, config.mask_dim))
  variables = _with_leaf(variables, ("mask_position_projection", "kernel"), weights)
  multi_scale, mask_features, tokens, mask = inputs
  flat = jnp.broadcast_to(mask_features[:, :1, :1], mask_features.shape)
  out = MaskDecoder(config).apply(variables, multi_scale, flat, tokens, mask)
  positions = layers.sine_position_encoding(16, 16, config.mask_dim, pixel_centres=True)
  by_hand = plain_decoder.apply({"params": plain_params}, multi_scale, flat + positions @ weights, tokens, mask)
  for name in ("mask_logits", "region_logits", "nt_logits"):
    np.testing.assert_allclose(out[name], by_hand[name], rtol=1e-4, atol=1e-4)
  margin = out["mask_logits"][..., 1] - out["mask_logits"][..., 0]
  assert float(jnp.abs(margin - margin[:, :1, :1]).max()) > 1e-2
