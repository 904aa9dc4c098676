"""The pixel encoder and the omni-prompt encoder build, run under jit, train (finite gradients), and use the
spatial prompt exactly as their fusion mode says."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from omniris_jax.models import pixel_encoder as pixel_encoder_lib
from omniris_jax.models import prompt_encoder as prompt_encoder_lib

BATCH, SIZE = 2, 64
# Swin-like channels C, 2C, 4C, 8C with C = 8 at strides 4, 8, 16, 32.
CHANNELS = {"res2": 8, "res3": 16, "res4": 32, "res5": 64}


def swin_like_features(seed: int, size: int = SIZE) -> dict[str, jax.Array]:
  rng = np.random.default_rng(seed)
  return {name: jnp.asarray(rng.standard_normal((BATCH, size // 2 ** (i + 2), size // 2 ** (i + 2), channels)),
                            jnp.float32) for i, (name, channels) in enumerate(CHANNELS.items())}


def box_prompt(top: int, left: int, bottom: int, right: int, size: int = SIZE) -> jax.Array:
  return jnp.zeros((BATCH, size, size), jnp.float32).at[:, top:bottom, left:right].set(1.0)


def all_finite(tree) -> bool:
  return all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree.leaves(tree))


def unbox(variables):
  return jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, variables,
                      is_leaf=lambda x: hasattr(x, "value"))


# ----------------------------------------------------------------------------------------------------------
# Pixel encoder
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pixel_run():
  """Init eagerly, then one jit of value_and_grad that also returns the outputs."""
  module = pixel_encoder_lib.PixelEncoder(pixel_encoder_lib.PixelEncoderConfig.tiny_test())
  features = swin_like_features(0)
  variables = module.init(jax.random.key(0), features)

  def loss(variables):
    mask_features, multi_scale = module.apply(variables, features)
    total = jnp.mean(mask_features ** 2) + sum(jnp.mean(level ** 2) for level in multi_scale)
    return total, (mask_features, multi_scale)

  (value, outputs), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables)
  return variables, value, outputs, grads


def test_pixel_encoder_shapes_and_finiteness(pixel_run):
  _, value, (mask_features, multi_scale), _ = pixel_run
  cfg = pixel_encoder_lib.PixelEncoderConfig.tiny_test()
  assert mask_features.shape == (BATCH, SIZE // 4, SIZE // 4, cfg.mask_dim)
  assert [level.shape for level in multi_scale] == [(BATCH, SIZE // s, SIZE // s, cfg.hidden_dim)
                                                    for s in (32, 16, 8)]
  assert np.isfinite(float(value)) and all_finite((mask_features, multi_scale))


def test_pixel_encoder_gradients_are_finite_and_reach_every_parameter(pixel_run):
  _, _, _, grads = pixel_run
  grads = unbox(grads)
  assert all_finite(grads)
  flat = jax.tree_util.tree_flatten_with_path(grads["params"])[0]
  dead = [jax.tree_util.keystr(path) for path, g in flat if float(jnp.abs(g).max()) == 0.0]
  # Offsets and attention weights start from zero kernels yet get gradients. The level embedding is the one
  # exception, as in Deformable DETR: it only enters the queries, which at init feed nothing but those zero
  # kernels, so its first gradient is exactly zero (it moves from the second step on).
  assert dead == ["['level_embed']"], f"parameters without gradient: {dead}"


def test_pixel_encoder_params_carry_logical_axes(pixel_run):
  variables = pixel_run[0]
  leaves = jax.tree.leaves(variables["params"], is_leaf=lambda x: hasattr(x, "names"))
  assert leaves and all(hasattr(leaf, "names") and len(leaf.names) == leaf.value.ndim for leaf in leaves)


def test_pixel_encoder_names_the_missing_stage():
  module = pixel_encoder_lib.PixelEncoder(pixel_encoder_lib.PixelEncoderConfig.tiny_test())
  features = swin_like_features(0)
  del features["res2"]
  with pytest.raises(ValueError, match=r"lack \['res2'\]"):
    module.init(jax.random.key(0), features)


def test_sine_position_encoding_matches_detr_formula():
  """Channel layout: y half then x half; even channels sin, odd cos, frequency pairs; normalised to 2*pi."""
  height, width, dim = 3, 5, 8
  encoding = np.asarray(pixel_encoder_lib.sine_position_encoding(height, width, dim))
  row, col = 2, 1
  y = (row + 1) / (height + 1e-6) * 2 * np.pi
  x = (col + 1) / (width + 1e-6) * 2 * np.pi
  dim_t = 10000.0 ** (2 * (np.arange(4) // 2) / 4)
  expected_y = [np.sin(y / dim_t[0]), np.cos(y / dim_t[1]), np.sin(y / dim_t[2]), np.cos(y / dim_t[3])]
  expected_x = [np.sin(x / dim_t[0]), np.cos(x / dim_t[1]), np.sin(x / dim_t[2]), np.cos(x / dim_t[3])]
  np.testing.assert_allclose(encoding[row, col], expected_y + expected_x, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Omni-prompt encoder
# ----------------------------------------------------------------------------------------------------------
PROMPT_A = box_prompt(8, 4, 40, 30)
PROMPT_B = box_prompt(30, 20, 60, 62)


def prompt_config(**changes) -> prompt_encoder_lib.PromptEncoderConfig:
  return dataclasses.replace(prompt_encoder_lib.PromptEncoderConfig.tiny_test(), **changes)


def prompt_tokens_for_both_prompts(config):
  """Tokens for PROMPT_A and PROMPT_B on the same reference features and parameters (one compile)."""
  module = prompt_encoder_lib.OmniPromptEncoder(config)
  features = swin_like_features(1)
  variables = module.init(jax.random.key(0), features, PROMPT_A)
  apply = jax.jit(module.apply)
  return variables, apply(variables, features, PROMPT_A), apply(variables, features, PROMPT_B)


@pytest.fixture(scope="module")
def add_run():
  """Default config ("add"): forward for two prompts and gradients, from one jit of value_and_grad."""
  config = prompt_config()
  module = prompt_encoder_lib.OmniPromptEncoder(config)
  features = swin_like_features(1)
  variables = module.init(jax.random.key(0), features, PROMPT_A)

  def loss(variables, prompt):
    tokens, mask = module.apply(variables, features, prompt)
    return jnp.mean(tokens[..., :3] ** 3), (tokens, mask)

  step = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (_, outputs_a), grads = step(variables, PROMPT_A)
  (_, outputs_b), _ = step(variables, PROMPT_B)
  return config, variables, outputs_a, outputs_b, grads


def test_prompt_encoder_shapes_mask_and_finiteness(add_run):
  config, _, (tokens, mask), _, grads = add_run
  assert tokens.shape == (BATCH, config.num_queries, config.prompt_dim)
  assert mask.shape == (BATCH, config.num_queries) and mask.dtype == jnp.bool_ and bool(mask.all())
  assert all_finite(tokens) and all_finite(unbox(grads))


def test_prompt_encoder_gradients_reach_the_prompt_path_and_queries(add_run):
  grads = unbox(add_run[4])["params"]
  for name in ("prompt_downscaler", "input_proj_3", "query_embed", "query_pos", "reference_points",
               "level_embed", "layer_0", "prompt_proj"):
    assert float(max(jnp.abs(g).max() for g in jax.tree.leaves(grads[name]))) > 0, name


def test_add_fusion_depends_on_the_prompt(add_run):
  tokens_a, tokens_b = add_run[2][0], add_run[3][0]
  assert float(jnp.abs(tokens_a - tokens_b).max()) > 1e-3


def test_prompt_encoder_init_facts(add_run):
  config, variables, *_ = add_run
  params = unbox(variables)["params"]
  # The release's 4 x 5 grid generalises to rows x cols; tiny has 6 queries -> 2 x 3.
  np.testing.assert_allclose(jax.nn.sigmoid(params["reference_points"]),
                             prompt_encoder_lib.query_grid(config.num_queries), atol=1e-6)
  np.testing.assert_allclose(prompt_encoder_lib.query_grid(20)[:5, 0], (np.arange(5) + 0.5) / 5)
  np.testing.assert_allclose(prompt_encoder_lib.query_grid(20)[::5, 1], (np.arange(4) + 0.5) / 4)
  # The level embedding is initialised (the release's is not): finite, non-zero, about unit scale.
  level_embed = np.asarray(params["level_embed"])
  assert level_embed.shape == (4, config.hidden_dim) and 0.5 < level_embed.std() < 2.0
  leaves = jax.tree.leaves(variables["params"], is_leaf=lambda x: hasattr(x, "names"))
  assert all(hasattr(leaf, "names") and len(leaf.names) == leaf.value.ndim for leaf in leaves)


def test_multiply_fusion_depends_on_the_prompt():
  _, (tokens_a, _), (tokens_b, _) = prompt_tokens_for_both_prompts(prompt_config(fusion="multiply", num_layers=1))
  assert all_finite((tokens_a, tokens_b))
  assert float(jnp.abs(tokens_a - tokens_b).max()) > 1e-3


def test_no_fusion_ignores_the_prompt():
  variables, (tokens_a, _), (tokens_b, _) = prompt_tokens_for_both_prompts(prompt_config(fusion="none",
                                                                                         num_layers=1))
  assert "prompt_downscaler" not in variables["params"]
  np.testing.assert_array_equal(np.asarray(tokens_a), np.asarray(tokens_b))


def test_release_value_masking_makes_even_no_fusion_prompt_dependent():
  """`mask_values_outside_prompt` (the release's behaviour) hides the reference outside the prompt."""
  _, (tokens_a, _), (tokens_b, _) = prompt_tokens_for_both_prompts(
      prompt_config(fusion="none", num_layers=1, mask_values_outside_prompt=True))
  assert float(jnp.abs(tokens_a - tokens_b).max()) > 1e-3


def test_nearest_resize_matches_torch_interpolate():
  prompt = np.random.default_rng(2).uniform(size=(2, 13, 22)) > 0.5
  ours = prompt_encoder_lib._nearest_resize(jnp.asarray(prompt, jnp.float32), 4, 6)
  theirs = F.interpolate(torch.tensor(prompt, dtype=torch.float32)[:, None], size=(4, 6), mode="nearest")[:, 0]
  np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())


def test_prompt_at_the_wrong_resolution_is_explained():
  module = prompt_encoder_lib.OmniPromptEncoder(prompt_config(num_layers=1))
  with pytest.raises(ValueError, match="reference image's resolution"):
    module.init(jax.random.key(0), swin_like_features(1), box_prompt(0, 0, 8, 8, size=SIZE // 2))


def test_unknown_fusion_is_rejected():
  with pytest.raises(ValueError, match="fusion"):
    prompt_config(fusion="concat")
