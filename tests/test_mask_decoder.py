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

