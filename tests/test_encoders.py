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

from omniris_jax.models import layers
from omniris_jax.models import pixel_encoder as pixel_encoder_lib
from omniris_jax.models import prompt_encoder as prompt_encoder_lib

# A non-square image whose stride-16/32 sizes are odd-rounded (72x104 -> 18x26, 9x13, 5x7, 3x4), as Swin's
# patch merging pads them: exercises non-square levels and the prompt downscaler's ceil rounding.
BATCH, HEIGHT, WIDTH = 2, 72, 104
# Swin-like channels C, 2C, 4C, 8C with C = 8 at strides 4, 8, 16, 32.
CHANNELS = {"res2": 8, "res3": 16, "res4": 32, "res5": 64}


def stage_sizes(height: int, width: int) -> list[tuple[int, int]]:
  """Swin's stage sizes: /4 (ceil), then halved with ceil per stage."""
  sizes = [(-(-height // 4), -(-width // 4))]
  for _ in range(3):
    sizes.append((-(-sizes[-1][0] // 2), -(-sizes[-1][1] // 2)))
  return sizes


def swin_like_features(seed: int, height: int = HEIGHT, width: int = WIDTH) -> dict[str, jax.Array]:
  rng = np.random.default_rng(seed)
  return {name: jnp.asarray(rng.standard_normal((BATCH, h, w, channels)), jnp.float32)
          for (name, channels), (h, w) in zip(CHANNELS.items(), stage_sizes(height, width))}


def box_prompt(top: int, left: int, bottom: int, right: int, height: int = HEIGHT,
               width: int = WIDTH) -> jax.Array:
  return jnp.zeros((BATCH, height, width), jnp.float32).at[:, top:bottom, left:right].set(1.0)


def all_finite(tree) -> bool:
  return all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(tree))


def max_abs(tree) -> float:
  return max(float(np.abs(np.asarray(leaf)).max()) for leaf in jax.tree.leaves(tree))


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
  variables = jax.jit(module.init)(jax.random.key(0), features)

  def loss(variables):
    mask_features, multi_scale = module.apply(variables, features)
    total = jnp.mean(mask_features ** 2) + sum(jnp.mean(level ** 2) for level in multi_scale)
    return total, (mask_features, multi_scale)

  (value, outputs), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables)
  return variables, value, outputs, grads


def test_pixel_encoder_shapes_and_finiteness(pixel_run):
  _, value, (mask_features, multi_scale), _ = pixel_run
  cfg = pixel_encoder_lib.PixelEncoderConfig.tiny_test()
  sizes = stage_sizes(HEIGHT, WIDTH)
  assert mask_features.shape == (BATCH, *sizes[0], cfg.mask_dim)
  assert [level.shape for level in multi_scale] == [(BATCH, *size, cfg.hidden_dim) for size in sizes[:0:-1]]
  assert np.isfinite(float(value)) and all_finite((mask_features, multi_scale))


def test_pixel_encoder_gradients_are_finite_and_reach_every_parameter(pixel_run):
  _, _, _, grads = pixel_run
  grads = unbox(grads)
  assert all_finite(grads)
  flat = jax.tree_util.tree_flatten_with_path(grads["params"])[0]
  dead = [jax.tree_util.keystr(path) for path, g in flat if max_abs(g) == 0.0]
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
    jax.eval_shape(module.init, jax.random.key(0), features)


def test_sine_position_encoding_matches_detr_formula():
  """Channel layout: y half then x half; even channels sin, odd cos, frequency pairs; normalised to 2*pi."""
  height, width, dim = 3, 5, 8
  encoding = layers.sine_position_encoding(height, width, dim, pixel_centres=False)  # the pixel encoder's
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
PROMPT_B = box_prompt(30, 50, 70, 100)


def prompt_config(**changes) -> prompt_encoder_lib.PromptEncoderConfig:
  return dataclasses.replace(prompt_encoder_lib.PromptEncoderConfig.tiny_test(), **changes)


def prompt_tokens_for_both_prompts(config):
  """Tokens for PROMPT_A and PROMPT_B on the same reference features and parameters (one compile)."""
  module = prompt_encoder_lib.OmniPromptEncoder(config)
  features = swin_like_features(1)
  variables = jax.jit(module.init)(jax.random.key(0), features, PROMPT_A)
  apply = jax.jit(module.apply)
  return variables, apply(variables, features, PROMPT_A), apply(variables, features, PROMPT_B)


@pytest.fixture(scope="module")
def add_run():
  """Default config ("add"): forward for two prompts and gradients, from one jit of value_and_grad."""
  config = prompt_config()
  module = prompt_encoder_lib.OmniPromptEncoder(config)
  features = swin_like_features(1)
  variables = jax.jit(module.init)(jax.random.key(0), features, PROMPT_A)

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
    assert max_abs(grads[name]) > 0, name


def test_add_fusion_depends_on_the_prompt(add_run):
  tokens_a, tokens_b = add_run[2][0], add_run[3][0]
  assert max_abs(tokens_a - tokens_b) > 1e-3


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
  _, (tokens_a, _), (tokens_b, _) = prompt_tokens_for_both_prompts(prompt_config(fusion="multiply"))
  assert all_finite((tokens_a, tokens_b))
  assert max_abs(tokens_a - tokens_b) > 1e-3


def test_no_fusion_ignores_the_prompt():
  variables, (tokens_a, _), (tokens_b, _) = prompt_tokens_for_both_prompts(prompt_config(fusion="none"))
  assert "prompt_downscaler" not in variables["params"]
  np.testing.assert_array_equal(np.asarray(tokens_a), np.asarray(tokens_b))


def test_release_value_masking_makes_even_no_fusion_prompt_dependent():
  """`mask_values_outside_prompt` (the release's behaviour) hides the reference outside the prompt."""
  _, (tokens_a, _), (tokens_b, _) = prompt_tokens_for_both_prompts(
      prompt_config(fusion="none", mask_values_outside_prompt=True))
  assert max_abs(tokens_a - tokens_b) > 1e-3


def test_nearest_resize_matches_torch_interpolate():
  prompt = np.random.default_rng(2).uniform(size=(2, 13, 22)) > 0.5
  ours = prompt_encoder_lib._nearest_resize(jnp.asarray(prompt, jnp.float32), 4, 6)
  theirs = F.interpolate(torch.tensor(prompt, dtype=torch.float32)[:, None], size=(4, 6), mode="nearest")[:, 0]
  np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())


def test_prompt_at_the_wrong_resolution_is_explained():
  module = prompt_encoder_lib.OmniPromptEncoder(prompt_config())
  with pytest.raises(ValueError, match="reference image's resolution"):
    jax.eval_shape(module.init, jax.random.key(0), swin_like_features(1),
                   box_prompt(0, 0, 8, 8, height=HEIGHT // 2))


def test_unknown_fusion_is_rejected():
  with pytest.raises(ValueError, match="fusion"):
    prompt_config(fusion="concat")

