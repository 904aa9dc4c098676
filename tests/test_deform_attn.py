"""Multi-scale deformable attention matches Deformable DETR's grid_sample formulation, values and gradients.

The reference is written here in PyTorch from the published semantics of `ms_deform_attn_core_pytorch`: split
the value per level, sample each level with `F.grid_sample(bilinear, zeros, align_corners=False)` at
`2 * loc - 1`, weight by the attention weights and sum over levels and points.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from omniris_jax.models import deform_attn

# Non-square levels, a 1x1 level and a single-row level; the order is arbitrary on purpose.
SPATIAL_SHAPES = ((6, 9), (3, 4), (1, 1), (2, 5), (1, 7))
BATCH, QUERIES, HEADS, HEAD_DIM, POINTS = 2, 5, 3, 4, 3


def torch_reference(value, spatial_shapes, sampling_locations, attention_weights):
  """Deformable DETR's pure-PyTorch core: per-level grid_sample, weighted sum over levels and points."""
  batch, _, heads, head_dim = value.shape
  _, queries, _, levels, points, _ = sampling_locations.shape
  per_level_values = value.split([h * w for h, w in spatial_shapes], dim=1)
  grids = 2.0 * sampling_locations - 1.0  # grid_sample's [-1, 1] convention
  sampled = []
  for level, (h, w) in enumerate(spatial_shapes):
    # (B, H*W, heads, d) -> (B*heads, d, H, W)
    level_value = per_level_values[level].permute(0, 2, 3, 1).reshape(batch * heads, head_dim, h, w)
    # (B, Q, heads, P, 2) -> (B*heads, Q, P, 2)
    level_grid = grids[:, :, :, level].permute(0, 2, 1, 3, 4).reshape(batch * heads, queries, points, 2)
    sampled.append(F.grid_sample(level_value, level_grid, mode="bilinear", padding_mode="zeros",
                                 align_corners=False))  # (B*heads, d, Q, P)
  sampled = torch.stack(sampled, dim=-2).reshape(batch * heads, head_dim, queries, levels * points)
  weights = attention_weights.permute(0, 2, 1, 3, 4).reshape(batch * heads, 1, queries, levels * points)
  output = (sampled * weights).sum(-1).reshape(batch, heads * head_dim, queries)
  return output.transpose(1, 2)


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  num_values = sum(h * w for h, w in SPATIAL_SHAPES)
  levels = len(SPATIAL_SHAPES)
  value = rng.standard_normal((BATCH, num_values, HEADS, HEAD_DIM)).astype(np.float32)
  # Locations spread over [-0.3, 1.3] so many corners (and some whole points) fall outside the maps.
  locations = rng.uniform(-0.3, 1.3, (BATCH, QUERIES, HEADS, levels, POINTS, 2)).astype(np.float32)
  weights = rng.uniform(0.0, 1.0, (BATCH, QUERIES, HEADS, levels, POINTS)).astype(np.float32)
  cotangent = rng.standard_normal((BATCH, QUERIES, HEADS * HEAD_DIM)).astype(np.float32)
  return value, locations, weights, cotangent


@pytest.fixture(scope="module")
def torch_results(inputs):
  value, locations, weights, cotangent = (torch.tensor(x, dtype=torch.float64) for x in inputs)
  for t in (value, locations, weights):
    t.requires_grad_(True)
  output = torch_reference(value, SPATIAL_SHAPES, locations, weights)
  (output * cotangent).sum().backward()
  return tuple(t.detach().numpy() for t in (output, value.grad, locations.grad, weights.grad))


@pytest.fixture(scope="module")
def jax_results(inputs):
  value, locations, weights, cotangent = inputs

  def loss(value, locations, weights):
    output = deform_attn.multi_scale_deformable_attention(value, SPATIAL_SHAPES, locations, weights)
    return jnp.sum(output * cotangent), output

  grads, output = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(value, locations, weights)
  return tuple(np.asarray(x) for x in (output, *grads))


def test_sampling_really_crosses_the_border(inputs):
  """Guards the parity cases: some points must sit outside [0, 1], else zero padding is untested."""
  locations = inputs[1]
  assert (locations < 0).any() and (locations > 1).any()


@pytest.mark.parametrize("index,name", [(0, "output"), (1, "grad value"), (2, "grad sampling_locations"),
                                        (3, "grad attention_weights")])
def test_matches_torch_grid_sample(jax_results, torch_results, index, name):
  ours, reference = jax_results[index], torch_results[index]
  assert ours.shape == reference.shape, name
  np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5, err_msg=name)
  assert np.abs(reference).max() > 0.1, f"{name} reference is degenerate"


def test_exact_pixel_centre_reads_the_pixel():
  """A location at a pixel centre ((x + 0.5) / W) returns that pixel exactly: the align_corners=False map."""
  height, width = 3, 4
  value = jnp.arange(height * width, dtype=jnp.float32).reshape(1, height * width, 1, 1)
  row, col = 1, 2
  location = jnp.asarray([(col + 0.5) / width, (row + 0.5) / height], jnp.float32).reshape(1, 1, 1, 1, 1, 2)
  output = deform_attn.multi_scale_deformable_attention(value, ((height, width),), location,
                                                        jnp.ones((1, 1, 1, 1, 1)))
  np.testing.assert_allclose(np.asarray(output).ravel(), [row * width + col], atol=1e-6)


def test_unknown_implementation_lists_the_choices(inputs):
  value, locations, weights, _ = inputs
  with pytest.raises(ValueError, match=r"implementation='cuda'.*\['pallas', 'xla'\]"):
    deform_attn.multi_scale_deformable_attention(value, SPATIAL_SHAPES, locations, weights,
                                                 implementation="cuda")


def test_registered_implementation_is_dispatched(inputs):
  """A kernel module plugs in through the registry; callers only change the string."""
  value, locations, weights, _ = inputs
  calls = []

  def fake(value, spatial_shapes, sampling_locations, attention_weights):
    calls.append(spatial_shapes)
    return jnp.zeros((value.shape[0], sampling_locations.shape[1], value.shape[2] * value.shape[3]))

  deform_attn.register_implementation("test_fake", fake)
  try:
    output = deform_attn.multi_scale_deformable_attention(value, SPATIAL_SHAPES, locations, weights,
                                                          implementation="test_fake")
  finally:
    del deform_attn._IMPLEMENTATIONS["test_fake"]
  assert calls == [SPATIAL_SHAPES] and output.shape == (BATCH, QUERIES, HEADS * HEAD_DIM)


def test_shape_mismatch_is_explained(inputs):
  value, locations, weights, _ = inputs
  with pytest.raises(ValueError, match="flatten each level"):
    deform_attn.multi_scale_deformable_attention(value[:, 1:], SPATIAL_SHAPES, locations, weights)
  with pytest.raises(ValueError, match="attention_weights.shape"):
    deform_attn.multi_scale_deformable_attention(value, SPATIAL_SHAPES, locations, weights[..., 1:])


# ----------------------------------------------------------------------------------------------------------
# MSDeformAttn module
# ----------------------------------------------------------------------------------------------------------
MODULE_SHAPES = ((4, 6), (2, 3))
DIM, MODULE_HEADS, MODULE_POINTS = 16, 4, 3


@pytest.fixture(scope="module")
def module_and_params():
  module = deform_attn.MSDeformAttn(DIM, MODULE_HEADS, len(MODULE_SHAPES), MODULE_POINTS)
  num_values = sum(h * w for h, w in MODULE_SHAPES)
  query = jnp.ones((1, 3, DIM))
  reference_points = jnp.full((1, 3, len(MODULE_SHAPES), 2), 0.5)
  value_input = jnp.ones((1, num_values, DIM))
  params = module.init(jax.random.key(0), query, reference_points, value_input, MODULE_SHAPES)
  return module, params


def test_offset_bias_is_the_polar_grid(module_and_params):
  _, params = module_and_params
  offsets = params["params"]["sampling_offsets"]
  np.testing.assert_array_equal(np.asarray(offsets["kernel"].value), 0.0)
  bias = np.asarray(offsets["bias"].value).reshape(MODULE_HEADS, len(MODULE_SHAPES), MODULE_POINTS, 2)
  # 4 heads: directions 0, 90, 180, 270 degrees -> (1, 0), (0, 1), (-1, 0), (0, -1); point p at distance p+1.
  directions = np.asarray([[1, 0], [0, 1], [-1, 0], [0, -1]], np.float32)
  expected = directions[:, None, None, :] * np.arange(1, MODULE_POINTS + 1)[None, None, :, None]
  np.testing.assert_allclose(bias, np.broadcast_to(expected, bias.shape), atol=1e-6)


def test_attention_starts_uniform_and_params_are_annotated(module_and_params):
  _, params = module_and_params
  attention = params["params"]["attention_weights"]
  np.testing.assert_array_equal(np.asarray(attention["kernel"].value), 0.0)
  np.testing.assert_array_equal(np.asarray(attention["bias"].value), 0.0)
  for name in ("value_proj", "output_proj"):
    np.testing.assert_array_equal(np.asarray(params["params"][name]["bias"].value), 0.0)
    assert np.abs(np.asarray(params["params"][name]["kernel"].value)).max() > 0
  names = jax.tree.leaves(jax.tree.map(lambda p: p.names, params["params"],
                                       is_leaf=lambda x: hasattr(x, "names")), is_leaf=lambda x: isinstance(x, tuple))
  assert ("embed", "heads") in names and ("heads", "embed") in names


def test_module_equals_manual_uniform_sampling_and_respects_padding(module_and_params):
  """At init the module is output_proj(mean over the polar samples of value_proj(value)), padding zeroed."""
  module, params = module_and_params
  rng = np.random.default_rng(1)
  num_values = sum(h * w for h, w in MODULE_SHAPES)
  query = jnp.asarray(rng.standard_normal((2, 3, DIM)), jnp.float32)
  reference_points = jnp.asarray(rng.uniform(0, 1, (2, 3, len(MODULE_SHAPES), 2)), jnp.float32)
  value_input = jnp.asarray(rng.standard_normal((2, num_values, DIM)), jnp.float32)
  padding_mask = jnp.asarray(rng.uniform(size=(2, num_values)) > 0.3)
  output = module.apply(params, query, reference_points, value_input, MODULE_SHAPES, padding_mask)

  p = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, params["params"],
                   is_leaf=lambda x: hasattr(x, "value"))
  value = (value_input @ p["value_proj"]["kernel"] + p["value_proj"]["bias"]) * padding_mask[..., None]
  value = value.reshape(2, num_values, MODULE_HEADS, DIM // MODULE_HEADS)
  offsets = p["sampling_offsets"]["bias"].reshape(MODULE_HEADS, len(MODULE_SHAPES), MODULE_POINTS, 2)
  normalizer = np.asarray([(w, h) for h, w in MODULE_SHAPES], np.float32)
  locations = reference_points[:, :, None, :, None, :] + (offsets / normalizer[:, None, :])[None, None]
  uniform = jnp.full((2, 3, MODULE_HEADS, len(MODULE_SHAPES), MODULE_POINTS),
                     1.0 / (len(MODULE_SHAPES) * MODULE_POINTS))
  sampled = torch_reference(torch.tensor(np.asarray(value)), MODULE_SHAPES, torch.tensor(np.asarray(locations)),
                            torch.tensor(np.asarray(uniform))).numpy()
  expected = sampled @ np.asarray(p["output_proj"]["kernel"]) + np.asarray(p["output_proj"]["bias"])
  np.testing.assert_allclose(np.asarray(output), expected, rtol=1e-5, atol=1e-5)
