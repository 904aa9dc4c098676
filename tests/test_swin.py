"""Tests of the Flax Swin encoder and its importer against transformers' PyTorch `SwinBackbone`.

The reference is a small random `SwinBackbone` (all four stages out) written by `save_pretrained`, with every
weight perturbed so that no LayerNorm, bias or relative-position table hides behind its ones/zeros init. The
input sizes force every padding path: patch padding (not a multiple of 4), window padding (sizes not multiples
of 7), odd sizes at patch merging, and stages smaller than the window (which HF's backbone still shifts).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from safetensors.numpy import load_file, save_file

from omniris_jax.models import swin

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

_PARITY_TOLERANCE = 1e-4


def _hf_config(**overrides):
  fields = dict(image_size=64, embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=7,
                drop_path_rate=0.2, out_features=["stage1", "stage2", "stage3", "stage4"])
  fields.update(overrides)
  return transformers.SwinConfig(**fields)


def _randomise(model):
  """Replaces every weight by a draw whose scale keeps activations O(1) through all blocks."""
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.LayerNorm):
        module.weight.copy_(1.0 + 0.2 * torch.randn_like(module.weight))
        module.bias.copy_(0.2 * torch.randn_like(module.bias))
      elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
        fan_in = module.weight[0].numel()
        module.weight.copy_(torch.randn_like(module.weight) / fan_in**0.5)
        if module.bias is not None:
          module.bias.copy_(0.1 * torch.randn_like(module.bias))
    for name, parameter in model.named_parameters():
      if name.endswith("relative_position_bias_table"):
        parameter.copy_(torch.randn_like(parameter))


@pytest.fixture(scope="module")
def hf_backbone(tmp_path_factory):
  """(folder written by save_pretrained, the eval-mode PyTorch SwinBackbone)."""
  torch.manual_seed(0)
  model = transformers.SwinBackbone(_hf_config()).eval()
  _randomise(model)
  folder = tmp_path_factory.mktemp("hf_swin_backbone")
  model.save_pretrained(folder, safe_serialization=True)
  return folder, model


@pytest.fixture(scope="module")
def imported(hf_backbone):
  folder, _ = hf_backbone
  return swin.load_hf_swin(folder)


def _hf_feature_maps(model, images_nhwc: np.ndarray) -> list[np.ndarray]:
  with torch.no_grad():
    output = model(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy()))
  return [feature.numpy().transpose(0, 2, 3, 1) for feature in output.feature_maps]  # NCHW -> NHWC


# ----------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("height,width", [(72, 56), (37, 50)])
def test_stage_outputs_match_hf_swin_backbone(hf_backbone, imported, height, width):
  """Every stage's normalised output equals HF's `feature_maps` (72x56: stage sizes 18x14 .. 3x2 with window 7;
  37x50: patch padding, odd merges, and stages 3x4 and 2x2 below the window)."""
  _, model = hf_backbone
  config, params = imported
  images = np.random.default_rng(height).standard_normal((2, height, width, 3)).astype(np.float32)
  expected = _hf_feature_maps(model, images)
  ours = jax.jit(lambda p, x: swin.Swin(config).apply({"params": p}, x))(params, images)
  errors = {}
  for name, reference in zip(config.output_names, expected):
    assert ours[name].shape == reference.shape, name
    errors[name] = float(np.max(np.abs(np.asarray(ours[name]) - reference)))
  print(f"parity max-abs-error {height}x{width}: {errors}")
  assert max(errors.values()) < _PARITY_TOLERANCE, errors


def test_config_read_from_hf_config_json(imported):
  config, _ = imported
  assert config == swin.SwinConfig(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=7,
                                   drop_path_rate=0.2)


# --------------------------------------------------------------------------------------------------- importer
def _flat(params):
  return {tuple(k.key for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_import_accepts_swinmodel_layout_and_in_memory_key_names(hf_backbone, imported, tmp_path):
  """A SwinModel checkpoint (no `swin.` prefix, final `layernorm`, no output norms) and a raw state_dict
  (`swin.` prefix, 5.x names q_proj/o_proj/mlp.fc1) import to the same weights; SwinModel output norms start
  as identity, as HF's SwinBackbone.from_pretrained initialises them."""
  folder, backbone = hf_backbone
  config, params = imported
  reference = _flat(params)

  swin_model = transformers.SwinModel(_hf_config(), add_pooling_layer=False).eval()
  swin_model.load_state_dict(backbone.swin.state_dict())
  swin_model.save_pretrained(tmp_path / "swin_model", safe_serialization=True)
  _, model_params = swin.load_hf_swin(tmp_path / "swin_model")
  for path, value in _flat(model_params).items():
    if path[0].startswith("norm_res"):
      np.testing.assert_array_equal(value, np.ones_like(value) if path[-1] == "scale" else np.zeros_like(value))
    else:
      np.testing.assert_array_equal(value, reference[path], err_msg=str(path))

  state_dict = {key: value.numpy() for key, value in backbone.state_dict().items()}
  assert any(".q_proj." in key for key in state_dict) and all(key.startswith(("swin.", "hidden_states_norms."))
                                                               for key in state_dict)
  save_file(state_dict, str(tmp_path / "raw.safetensors"))
  hf_config_dict = json.loads((folder / "config.json").read_text())
  _, raw_params = swin.load_hf_swin(tmp_path / "raw.safetensors", config=hf_config_dict)
  raw = _flat(raw_params)
  assert raw.keys() == reference.keys()
  for path, value in raw.items():
    np.testing.assert_array_equal(value, reference[path], err_msg=str(path))


def _rewrite(folder, destination, edit):
  tensors = edit(load_file(str(folder / "model.safetensors")))
  destination.mkdir()
  save_file(tensors, str(destination / "model.safetensors"))
  (destination / "config.json").write_text((folder / "config.json").read_text())
  return destination


def test_import_error_names_missing_and_unexpected_keys(hf_backbone, tmp_path):
  folder, _ = hf_backbone
  missing_key = "encoder.layers.2.blocks.1.attention.self.relative_position_bias_table"

  def drop_and_add(tensors):
    del tensors[missing_key]
    tensors["encoder.layers.0.blocks.0.attention.surprise.weight"] = np.zeros((2, 2), np.float32)
    return tensors

  broken = _rewrite(folder, tmp_path / "broken", drop_and_add)
  with pytest.raises(ValueError) as error:
    swin.load_hf_swin(broken)
  message = str(error.value)
  assert "missing keys" in message
  assert "encoder.layers.2.blocks.1.attention.relative_position_bias.relative_position_bias_table" in message
  assert "encoder.layers.0.blocks.0.attention.surprise.weight" in message


def test_import_error_names_shape_mismatch(hf_backbone):
  folder, _ = hf_backbone
  wrong_window = swin.SwinConfig(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4)
  with pytest.raises(ValueError, match=r"shape mismatches .*relative_position_bias_table: checkpoint \(169, 1\)"):
    swin.load_hf_swin(folder / "model.safetensors", config=wrong_window)


def test_import_refuses_unsupported_hf_features():
  with pytest.raises(ValueError, match="use_absolute_embeddings"):
    swin._swin_config_from_hf(dict(_hf_config(use_absolute_embeddings=True).to_dict()))


# ------------------------------------------------------------------------------------- static window helpers
def test_relative_position_index_and_shift_mask_match_hf():
  from transformers.models.swin import modeling_swin
  bias = modeling_swin.SwinRelativePositionBias(num_heads=1, window_size=(5, 5))
  np.testing.assert_array_equal(swin.relative_position_index(5),
                                bias._create_relative_position_index().numpy())
  layer = modeling_swin.SwinLayer(_hf_config(window_size=5), dim=16, input_resolution=(10, 15), num_heads=1,
                                  shift_size=2)
  hf_mask = layer.get_attn_mask(10, 15, dtype=torch.float32, device="cpu").numpy()
  np.testing.assert_array_equal(swin.shifted_window_mask(10, 15, window_size=5, shift_size=2), hf_mask)


def test_window_partition_round_trip():
  x = jnp.arange(2 * 6 * 9 * 2, dtype=jnp.float32).reshape(2, 6, 9, 2)
  windows = swin.window_partition(x, 3)
  assert windows.shape == (2, 6, 9, 2)
  np.testing.assert_array_equal(windows[0, 1, :, 0], x[0, 0:3, 3:6, 0].reshape(-1))  # row-major windows
  np.testing.assert_array_equal(swin.window_merge(windows, 3, 6, 9), x)


# ---------------------------------------------------------------------------------------------- presets/shape
@pytest.mark.parametrize("preset", ["tiny_test", "demo", "swin_t", "swin_b"])
def test_preset_output_shapes_and_strides(preset):
  """Abstract evaluation only (no compile): strides 4/8/16/32 with ceil rounding, widths C, 2C, 4C, 8C."""
  config = getattr(swin.SwinConfig, preset)()
  images = jax.ShapeDtypeStruct((2, 70, 50, 3), jnp.float32)
  outputs, _ = jax.eval_shape(
      lambda x: swin.Swin(config).init_with_output(jax.random.key(0), x), images)
  expected_sizes = [(18, 13), (9, 7), (5, 4), (3, 2)]
  assert list(outputs) == ["res2", "res3", "res4", "res5"]
  for stage, (name, (height, width)) in enumerate(zip(outputs, expected_sizes)):
    assert outputs[name].shape == (2, height, width, config.embed_dim * 2**stage), (preset, name)
    assert outputs[name].dtype == jnp.float32


def test_every_parameter_has_logical_axes():
  boxed = jax.eval_shape(lambda: swin.Swin(swin.SwinConfig.tiny_test()).init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3))))["params"]
  leaves = jax.tree_util.tree_flatten_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
  for path, leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), jax.tree_util.keystr(path)
    assert len(leaf.names) == leaf.value.ndim, jax.tree_util.keystr(path)
  table = boxed["stage0"]["block0"]["relative_position_bias_table"]
  assert table.names[0] == "table"


# -------------------------------------------------------------------------------------------------- drop-path
def test_drop_path_only_when_not_deterministic():
  """Stochastic depth changes outputs (differently per rng) in training only; with rate 0 training = eval."""
  # One stage is enough (rates 0 and 0.5 for its two blocks) and compiles in a fraction of the time of four.
  config = swin.SwinConfig(embed_dim=4, depths=(2,), num_heads=(1,), window_size=4, drop_path_rate=0.5)
  images = jnp.asarray(np.random.default_rng(0).standard_normal((4, 32, 32, 3)), jnp.float32)
  params = jax.jit(swin.Swin(config).init)(jax.random.key(0), images)["params"]

  @jax.jit
  def forward(params, key):
    """(training output at rate 0.5, eval output at rate 0.5, training output at rate 0)."""
    def run(model_config, deterministic):
      return swin.Swin(model_config).apply({"params": params}, images, deterministic=deterministic,
                                          rngs={"dropout": key})["res2"]
    return (run(config, False), run(config, True), run(dataclasses.replace(config, drop_path_rate=0.0), False))

  train_a, evaluation_a, no_drop_a = forward(params, jax.random.key(1))
  train_b, evaluation_b, _ = forward(params, jax.random.key(2))
  np.testing.assert_array_equal(evaluation_a, evaluation_b)
  assert not np.allclose(train_a, evaluation_a, atol=1e-3)
  assert not np.allclose(train_a, train_b, atol=1e-3)
  np.testing.assert_array_equal(no_drop_a, evaluation_a)


def test_config_rejects_inconsistent_heads():
  with pytest.raises(ValueError, match="num_heads"):
    swin.SwinConfig(embed_dim=6, depths=(2, 2), num_heads=(4, 4), window_size=7)

