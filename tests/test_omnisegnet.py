"""Tests of the composed OmniSegNet on its tiny config.

One config, module-scoped fixtures and five jit compiles in all (init, forward+grad, the encode/decode split,
joint fusion, the single-modality entry points): the whole file fits the CPU budget.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from omniris_jax.models import bert, omnisegnet, swin
from omniris_jax.models.omnisegnet import OmniSegNet, OmniSegNetConfig

SIZE = 64  # target and reference images are SIZE x SIZE
BATCH = 3
TEXT_LEN = 8
GROUPS = ("image_encoder", "text_encoder", "text_projection", "pixel_encoder", "prompt_encoder", "mask_decoder")


def _prompt_maps() -> np.ndarray:
  """A mask (disc), a box (filled rectangle) and a scribble (a thin stroke): all just binary maps."""
  yy, xx = np.mgrid[:SIZE, :SIZE]
  disc = (yy - 28) ** 2 + (xx - 24) ** 2 <= 144
  box = (yy >= 12) & (yy < 40) & (xx >= 20) & (xx < 52)
  scribble = (np.abs(yy - xx) <= 2) & (yy >= 16) & (yy < 48)
  return np.stack([disc, box, scribble]).astype(np.float32)


def _batch(seed: int = 0) -> dict[str, jax.Array]:
  """Row 0: omni (text + visual); row 1: text only; row 2: visual only."""
  rng = np.random.default_rng(seed)
  text_mask = np.ones((BATCH, TEXT_LEN), np.int32)
  text_mask[:, 5:] = 0
  return {
      "image": jnp.asarray(rng.integers(0, 256, (BATCH, SIZE, SIZE, 3)), jnp.uint8),
      "text_ids": jnp.asarray(rng.integers(1, 99, (BATCH, TEXT_LEN)), jnp.int32),
      "text_attention_mask": jnp.asarray(text_mask),
      "ref_image": jnp.asarray(rng.integers(0, 256, (BATCH, SIZE, SIZE, 3)), jnp.uint8),
      "ref_prompt": jnp.asarray(_prompt_maps()),
      "has_text": jnp.array([True, True, False]),
      "has_visual": jnp.array([True, False, True]),
  }


def _scalar(outputs: dict[str, jax.Array]) -> jax.Array:
  """A fixed generic linear functional of every output, so every output path carries gradient."""
  total = 0.0
  for name in sorted(outputs):
    x = outputs[name]
    total = total + jnp.mean(x * jnp.cos(jnp.arange(x.size, dtype=x.dtype)).reshape(x.shape))
  return total


@pytest.fixture(scope="module")
def model():
  return OmniSegNet(OmniSegNetConfig.tiny_test())


@pytest.fixture(scope="module")
def variables(model):
  return jax.jit(model.init)(jax.random.key(0), **_batch())


@pytest.fixture(scope="module")
def forward_and_grad(model):
  """jit(params, batch) -> ((scalar, outputs), grads): one compile serves every forward check."""

  def loss(params, batch):
    outputs = model.apply({"params": params}, **batch)
    return _scalar(outputs), outputs

  return jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.fixture(scope="module")
def omni_result(variables, forward_and_grad):
  return forward_and_grad(variables["params"], _batch())


def test_outputs_have_the_documented_shapes_and_are_finite(omni_result):
  (_, outputs), _ = omni_result
  config = OmniSegNetConfig.tiny_test()
  q = config.mask_decoder.query_grid
  expected = {"mask_logits": (BATCH, SIZE // 4, SIZE // 4, 2), "region_logits": (BATCH, q, q, 2),
              "nt_logits": (BATCH, 2)}
  expected.update({f"{prefix}_{k}": v for prefix in ("text", "visual") for k, v in dict(expected).items()})
  assert {k: v.shape for k, v in outputs.items()} == expected
  for name, value in outputs.items():
    assert np.isfinite(np.asarray(value)).all(), name


def test_union_is_or_of_masks_and_and_of_no_target(omni_result):
  (_, out), _ = omni_result
  text_fg = np.argmax(out["text_mask_logits"], -1).astype(bool)
  visual_fg = np.argmax(out["visual_mask_logits"], -1).astype(bool)
  combined_fg = np.argmax(out["mask_logits"], -1).astype(bool)
  np.testing.assert_array_equal(combined_fg[0], text_fg[0] | visual_fg[0])  # omni row: OR
  nt = lambda k: np.argmax(out[k], -1).astype(bool)  # noqa: E731
  assert nt("nt_logits")[0] == (nt("text_nt_logits")[0] and nt("visual_nt_logits")[0])  # omni row: AND
  # Single-prompt rows take that prompt's outputs whole.
  for key in ("mask_logits", "region_logits", "nt_logits"):
    np.testing.assert_array_equal(out[key][1], out[f"text_{key}"][1])
    np.testing.assert_array_equal(out[key][2], out[f"visual_{key}"][2])


def test_every_prompt_type_runs_and_matters(variables, forward_and_grad):
  batch = dict(_batch(), has_text=jnp.zeros(BATCH, bool), has_visual=jnp.ones(BATCH, bool))
  batch["ref_image"] = jnp.broadcast_to(batch["ref_image"][:1], batch["ref_image"].shape)  # same reference
  (_, out), _ = forward_and_grad(variables["params"], batch)
  logits = np.asarray(out["visual_mask_logits"])
  assert np.isfinite(logits).all()
  # Same reference image, mask vs box vs scribble prompt: the prompts reach the decoder.
  assert np.abs(logits[0] - logits[1]).max() > 1e-4
  assert np.abs(logits[1] - logits[2]).max() > 1e-4


def test_every_parameter_group_gets_finite_nonzero_gradient(omni_result):
  (_, _), grads = omni_result
  grads = jax.device_get(nn.unbox(grads))
  assert set(grads) == set(GROUPS)
  for group in GROUPS:
    leaves = jax.tree.leaves(grads[group])
    assert all(np.isfinite(g).all() for g in leaves), group
    assert sum(float(np.sum(np.square(g))) for g in leaves) > 0.0, group
  # Stronger: every single parameter gets gradient, except the pixel encoder's level embedding, which only
  # feeds the deformable attention's sampling offsets and weights, both zero-initialised (Deformable DETR).
  flat = traverse_util.flatten_dict(grads, sep="/")
  dead = sorted(name for name, g in flat.items() if not np.any(g))
  assert dead == ["pixel_encoder/level_embed"]


def test_absent_prompts_cannot_influence_outputs(variables, forward_and_grad, omni_result):
  (_, base), _ = omni_result
  batch = _batch()
  # Row 2 has no text, row 1 no visual prompt: scramble exactly what they lack.
  batch["text_ids"] = batch["text_ids"].at[2].set(jnp.arange(TEXT_LEN) + 50)
  batch["text_attention_mask"] = batch["text_attention_mask"].at[2].set(1)
  batch["ref_prompt"] = batch["ref_prompt"].at[1].set(1.0 - batch["ref_prompt"][1])
  batch["ref_image"] = batch["ref_image"].at[1].set(255 - batch["ref_image"][1])
  (_, changed), _ = forward_and_grad(variables["params"], batch)
  for name in base:
    np.testing.assert_allclose(changed[name], base[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_encode_once_then_decode_equals_the_full_forward(model, variables, omni_result):
  (_, full), _ = omni_result

  @jax.jit
  def split(variables, batch):
    image_features = model.apply(variables, batch["image"], method=OmniSegNet.encode_image)
    text = model.apply(variables, batch["text_ids"], batch["text_attention_mask"], method=OmniSegNet.encode_text)
    visual = model.apply(variables, batch["ref_image"], batch["ref_prompt"], method=OmniSegNet.encode_visual)
    decoded = model.apply(variables, image_features, *text, *visual, batch["has_text"], batch["has_visual"],
                          method=OmniSegNet.decode)
    # One image shared by several prompts: image features of batch 1 broadcast over the prompts.
    first_image = jax.tree.map(lambda x: x[:1], image_features)
    shared = model.apply(variables, first_image, *visual, method=OmniSegNet.decode_prompts)
    alone = model.apply(variables, first_image, visual[0][:1], visual[1][:1], method=OmniSegNet.decode_prompts)
    return decoded, shared, alone

  decoded, shared, alone = split(variables, _batch())
  assert set(decoded) == set(full)
  for name in full:
    np.testing.assert_allclose(decoded[name], full[name], rtol=1e-4, atol=1e-4, err_msg=name)
  for name in alone:
    np.testing.assert_allclose(shared[name][:1], alone[name], rtol=1e-4, atol=1e-4, err_msg=name)


def test_joint_fusion_decodes_the_concatenated_prompts(variables, omni_result):
  (_, union), _ = omni_result
  joint_model = OmniSegNet(OmniSegNetConfig.tiny_test(omni_fusion="joint"))
  joint = jax.jit(joint_model.apply)(variables, **_batch())  # same parameters: fusion adds none
  assert set(joint) == set(union)
  for name, value in joint.items():
    assert np.isfinite(np.asarray(value)).all(), name
  # Per-prompt outputs are the same solo decodes as in union mode ...
  for name in ("text_mask_logits", "visual_mask_logits", "visual_nt_logits"):
    np.testing.assert_allclose(joint[name], union[name], rtol=1e-4, atol=1e-4, err_msg=name)
  # ... rows with one prompt decode it alone, and the omni row decodes both prompts together.
  np.testing.assert_allclose(joint["mask_logits"][1], union["text_mask_logits"][1], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(joint["mask_logits"][2], union["visual_mask_logits"][2], rtol=1e-4, atol=1e-4)
  assert np.abs(np.asarray(joint["mask_logits"][0] - union["mask_logits"][0])).max() > 1e-4


def test_text_only_and_visual_only_batches_skip_the_other_encoder(model, variables, omni_result):
  (_, omni), _ = omni_result
  batch = _batch()

  @jax.jit
  def single_modality(variables, batch):
    text_only = model.apply(variables, batch["image"], batch["text_ids"], batch["text_attention_mask"])
    visual_only = model.apply(variables, batch["image"], ref_image=batch["ref_image"],
                              ref_prompt=batch["ref_prompt"])
    return text_only, visual_only

  text_only, visual_only = single_modality(variables, batch)
  assert set(text_only) == {"mask_logits", "region_logits", "nt_logits", "text_mask_logits",
                            "text_region_logits", "text_nt_logits"}
  assert set(visual_only) == {"mask_logits", "region_logits", "nt_logits", "visual_mask_logits",
                              "visual_region_logits", "visual_nt_logits"}
  # Rows that do have the prompt in the omni batch decode it identically here.
  np.testing.assert_allclose(text_only["mask_logits"][:2], omni["text_mask_logits"][:2], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(visual_only["mask_logits"])[[0, 2]],
                             np.asarray(omni["visual_mask_logits"])[[0, 2]], rtol=1e-4, atol=1e-4)


def test_training_mode_traces_with_a_dropout_rng(model, variables):
  """deterministic=False (dropout, drop-path) needs only a 'dropout' rng (traced, not compiled: cheap)."""
  config = OmniSegNetConfig.tiny_test(
      swin=dataclasses.replace(model.config.swin, drop_path_rate=0.2),
      bert=dataclasses.replace(model.config.bert, dropout_rate=0.1))
  out = jax.eval_shape(
      lambda v, key: OmniSegNet(config).apply(v, **_batch(), deterministic=False, rngs={"dropout": key}),
      variables, jax.random.key(1))
  assert out["mask_logits"].shape == (BATCH, SIZE // 4, SIZE // 4, 2)


def test_every_parameter_has_logical_axis_names(variables):
  params = variables["params"]
  assert set(params) == set(GROUPS)
  leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  unnamed = [leaf for leaf in leaves if not isinstance(leaf, nn.LogicallyPartitioned)]
  assert not unnamed, f"{len(unnamed)} parameters without logical axis names"
  for leaf in leaves:
    assert len(leaf.names) == leaf.value.ndim
    named = [name for name in leaf.names if name is not None]
    assert len(set(named)) == len(named), f"{leaf.names} repeats an axis: no mesh rule could shard it"
  specs = nn.get_partition_spec(params)
  assert len(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))) == len(leaves)


def test_load_pretrained_text_encoder_fills_only_the_text_encoder():
  path = bert.minilm_path()
  bert_config = bert.BertConfig.minilm_l6()
  ids = jnp.ones((1, 4), jnp.int32)
  text_params = jax.eval_shape(bert.BertEncoder(bert_config).init, jax.random.key(0), ids, ids)["params"]
  other = {"kernel": nn.LogicallyPartitioned(jnp.zeros((2, 3)), ("embed", "mlp"))}
  params = {"text_encoder": text_params, "mask_decoder": other}
  loaded = omnisegnet.load_pretrained_text_encoder({"params": params}, path)["params"]
  assert loaded["mask_decoder"] is other
  _, reference = bert.load_hf_bert(path)
  embedding = loaded["text_encoder"]["embeddings"]["word_embeddings"]["embedding"]
  assert isinstance(embedding, nn.LogicallyPartitioned)  # boxes (logical names) survive
  np.testing.assert_array_equal(embedding.value, reference["embeddings"]["word_embeddings"]["embedding"])
  kernel = loaded["text_encoder"]["layer_5"]["output"]["kernel"].value
  np.testing.assert_array_equal(kernel, reference["layer_5"]["output"]["kernel"])

  tiny = jax.eval_shape(bert.BertEncoder(bert.BertConfig.tiny_test()).init, jax.random.key(0), ids, ids)
  with pytest.raises(ValueError, match="OmniSegNetConfig.bert"):
    omnisegnet.load_pretrained_text_encoder({"text_encoder": tiny["params"]}, path)


def test_config_checks_and_presets():
  assert OmniSegNetConfig.paper().prompt_dim == OmniSegNetConfig.paper().bert.hidden_size == 768
  demo = OmniSegNetConfig.demo()
  assert (demo.bert.hidden_size, demo.bert.num_layers, demo.bert.num_heads, demo.bert.vocab_size) == (
      384, 6, 12, 30522)
  as_dicts = {name: dataclasses.asdict(getattr(demo, name))
              for name in ("swin", "bert", "pixel_encoder", "prompt_encoder", "mask_decoder")}
  assert OmniSegNetConfig(**as_dicts) == demo  # ml_collections-style nested dicts convert
  with pytest.raises(ValueError, match="mask_dim"):
    OmniSegNetConfig.tiny_test(mask_decoder=dataclasses.replace(demo.mask_decoder, mask_dim=7))
  with pytest.raises(ValueError, match="omni_fusion"):
    OmniSegNetConfig.tiny_test(omni_fusion="intersection")


# ---------------------------------------------------------------------------------------------------------------
# Early fusion (PWAM in the Swin stages)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def early_model():
  return OmniSegNet(OmniSegNetConfig.tiny_test(early_fusion=True))


@pytest.fixture(scope="module")
def early_variables(early_model):
  return jax.jit(early_model.init)(jax.random.key(1), **_batch())


def _without_fusion(params):
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if "pwam" not in k and "gate" not in k[:3]})


def _open_gates(params, seed: int, stages=range(4)):
  """Opens the residual gates of `stages` (random kernels instead of the closed zero init)."""
  flat = traverse_util.flatten_dict(params)
  keys = jax.random.split(jax.random.key(seed), len(flat))
  for key, name in zip(keys, sorted(flat)):
    if "gate" in name and any(f"stage{s}" in name for s in stages):
      flat[name] = flat[name].replace_boxed(jax.random.normal(key, flat[name].value.shape))
  return traverse_util.unflatten_dict(flat)


def test_early_fusion_adds_pwam_per_stage_and_gates_before_each_merging(early_variables):
  image_encoder = early_variables["params"]["image_encoder"]
  for stage in range(4):
    modules = image_encoder[f"stage{stage}"]
    assert set(modules["pwam"]) == {"pixel_projection", "query", "key", "value", "output", "fused_projection"}
    assert ("gate" in modules) == (stage < 3), stage  # The last stage has no patch merging and no gate.
    for leaf in jax.tree.leaves(modules, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)):
      assert isinstance(leaf, nn.LogicallyPartitioned) and len(leaf.names) == leaf.value.ndim


def test_opened_gates_change_the_model_and_stay_finite(early_model, early_variables):
  early_forward = jax.jit(early_model.apply)
  closed = early_forward(early_variables, **_batch())
  opened = early_forward({"params": _open_gates(early_variables["params"], 0)}, **_batch())
  for name in ("text_mask_logits", "visual_mask_logits"):
    assert np.isfinite(np.asarray(opened[name])).all()
    assert np.abs(np.asarray(opened[name] - closed[name])).max() > 1e-4, name


def test_early_fusion_swin_outputs_the_fusion_product_and_gates_only_the_stream():
  """The fused Swin re-runs Swin's stage loop. Without a prompt it is `swin.Swin`; with one, a stage's output is its
  PWAM product and the gate only feeds the next stages: opening stage 1's gate leaves stages 0-1 unchanged."""
  # A regular and a shifted block in the first stage, the patch merging chain through all four stages.
  config = dataclasses.replace(swin.SwinConfig.tiny_test(), depths=(2, 1, 1, 1))
  images = jax.random.normal(jax.random.key(0), (2, SIZE, SIZE, 3))
  tokens = jax.random.normal(jax.random.key(1), (2, 5, 12))
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  fused = omnisegnet.EarlyFusionSwin(config)

  @jax.jit
  def run(key, images, tokens, mask):  # init inside the one compiled function: no separate init compile
    variables = fused.init(key, images, tokens, mask)
    plain = swin.Swin(config).apply({"params": _without_fusion(variables["params"])}, images)
    no_prompt = fused.apply(variables, images)
    closed = fused.apply(variables, images, tokens, mask)
    opened = fused.apply({"params": _open_gates(variables["params"], 3, stages=(1,))}, images, tokens, mask)
    return plain, no_prompt, closed, opened

  plain, no_prompt, closed, opened = run(jax.random.key(2), images, tokens, mask)
  for name in plain:
    np.testing.assert_allclose(no_prompt[name], plain[name], rtol=1e-5, atol=1e-5, err_msg=name)
    assert np.abs(np.asarray(closed[name] - plain[name])).max() > 1e-3, name  # the product, not the stream
  for name in ("res2", "res3"):
    np.testing.assert_allclose(opened[name], closed[name], rtol=1e-6, atol=1e-6, err_msg=name)
  for name in ("res4", "res5"):
    assert np.abs(np.asarray(opened[name] - closed[name])).max() > 1e-3, name


def test_early_fusion_refuses_to_encode_the_image_alone(early_model, early_variables):
  with pytest.raises(ValueError, match="early_fusion"):
    early_model.apply(early_variables, _batch()["image"], method=OmniSegNet.encode_image)

