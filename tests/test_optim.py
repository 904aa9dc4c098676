"""The optimiser: which parameters decay, which are frozen (unchanged, no Adam state), and the schedule."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import linen as nn

from omniris_jax import optim
from omniris_jax.models.bert import BertConfig
from omniris_jax.models.mask_decoder import MaskDecoderConfig
from omniris_jax.models.omnisegnet import OmniSegNet, OmniSegNetConfig

from configs import joint, visual  # noqa: E402  (configs/ is importable from the repo root, where pytest runs)
from test_omnisegnet import _batch  # noqa: E402  (tests/ is on sys.path under pytest)

# Paths as the model names them (see models/omnisegnet.py), one of each kind the rules must tell apart.
PATHS = {
    ("image_encoder", "stage0", "block0", "mlp", "fc1", "kernel"): True,
    ("image_encoder", "stage0", "block0", "mlp", "fc1", "bias"): False,
    ("image_encoder", "stage0", "block0", "layernorm_before", "scale"): False,
    ("image_encoder", "stage0", "block0", "relative_position_bias_table"): False,
    ("text_encoder", "embeddings", "word_embeddings", "embedding"): False,
    ("text_encoder", "layer0", "attention", "query", "kernel"): True,
    ("mask_decoder", "query_features"): False,
    ("mask_decoder", "level_embed"): False,
    ("pixel_encoder", "output_conv", "kernel"): True,
}


def _params():
  tree = {}
  for index, path in enumerate(PATHS):
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = jnp.full((3, 2), 1.0 + index)
  return tree


def _leaf(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _config(**overrides):
  c = ml_collections.ConfigDict(dict(
      learning_rate=0.1, warmup_steps=2, lr_schedule="poly", power=1.0, end_learning_rate=0.0, boundaries=(),
      factor=0.1, b1=0.9, b2=0.999, eps=1e-8,
      weight_decay=0.05, no_decay=optim.DEFAULT_NO_DECAY, grad_clip_norm=None, schedule=((".*", "default"),)))
  c.update(overrides)
  return c


def test_weight_decay_skips_norms_biases_embeddings_and_tables():
  mask = optim.decay_mask(_params())
  assert {path: bool(_leaf(mask, path)) for path in PATHS} == PATHS


def test_decay_only_moves_decayed_params_when_gradients_are_zero():
  params = _params()
  tx, _ = optim.make_optimizer(_config(warmup_steps=0), total_steps=10)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  for path, decays in PATHS.items():
    moved = bool(jnp.any(_leaf(updates, path) != 0))
    assert moved == decays, path


def test_frozen_groups_are_unchanged_and_hold_no_adam_state():
  params = _params()
  config = _config(schedule=(("text_encoder/.*", None), (".*", "default")))
  tx, _ = optim.make_optimizer(config, total_steps=10)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  fresh = _params()
  for path in PATHS:
    changed = not np.array_equal(_leaf(params, path), _leaf(fresh, path))
    assert changed == (path[0] != "text_encoder"), path
  # The Adam moments only cover trainable parameters: no leaf of the state has the text encoder's values.
  state_size = sum(x.size for x in jax.tree.leaves(state) if x.ndim)
  trainable = sum(x.size for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
                  if "text_encoder" not in optim.path_string(path))
  assert state_size == 2 * trainable  # mu and nu of the trainable leaves only


def test_schedule_warms_up_then_decays_to_the_end_value():
  schedule = optim.learning_rate_schedule(learning_rate=1.0, total_steps=10, warmup_steps=2, power=1.0)
  assert [float(schedule(s)) for s in (0, 1, 2, 6, 10)] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])


def test_clipping_bounds_the_first_update():
  params = _params()
  tx, _ = optim.make_optimizer(_config(warmup_steps=0, grad_clip_norm=1e-3, weight_decay=0.0), total_steps=10)
  grads = jax.tree.map(lambda x: 1e6 * jnp.ones_like(x), params)
  clipped = optax.clip_by_global_norm(1e-3).update(grads, None)[0]
  assert float(optax.global_norm(clipped)) == pytest.approx(1e-3, rel=1e-4)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(updates))


def test_a_path_that_matches_no_rule_is_named():
  with pytest.raises(ValueError, match="matches no regex.*end the schedule with"):
    optim.frozen_mask(_params(), (("text_encoder/.*", None),))


def _optax_schedule(learning_rate, total_steps, warmup_steps, power, end):
  """The reference: optax's linear warmup joined to its polynomial decay."""
  decay = optax.polynomial_schedule(init_value=learning_rate, end_value=end, power=power,
                                    transition_steps=max(total_steps - warmup_steps, 1))
  if warmup_steps == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps), decay], [warmup_steps])


@pytest.mark.parametrize("warmup_steps,power,end", [(2, 1.0, 0.0), (0, 0.9, 0.01), (10, 2.0, 0.0)])
def test_schedule_matches_optax_warmup_then_polynomial_decay(warmup_steps, power, end):
  ours = optim.learning_rate_schedule(learning_rate=0.1, total_steps=10, warmup_steps=warmup_steps, power=power,
                                      end_learning_rate=end)
  reference = _optax_schedule(0.1, 10, warmup_steps, power, end)
  steps = range(0, 14)
  np.testing.assert_allclose([float(ours(s)) for s in steps], [float(reference(s)) for s in steps],
                             rtol=1e-6, atol=1e-9)


def _reference_adamw(config, total_steps):
  """The same optimiser from optax's own parts: clip, adamw with its schedule and decay mask, frozen groups."""
  schedule = _optax_schedule(config.learning_rate, total_steps, config.warmup_steps, config.power,
                             config.end_learning_rate)
  trainable = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm),
                          optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                                      weight_decay=config.weight_decay, mask=optim.decay_mask))
  labels = lambda params: optim.map_paths(lambda path: optim.group_of(path, config.schedule), params)  # noqa: E731
  return optax.multi_transform({optim.TRAINABLE: trainable, optim.FROZEN: optax.set_to_zero()}, labels)


def test_updates_match_optax_adamw_with_clipping_and_frozen_groups():
  config = _config(grad_clip_norm=1.0, schedule=(("text_encoder/.*", None), (".*", "default")))
  tx, _ = optim.make_optimizer(config, total_steps=10)
  reference = _reference_adamw(config, total_steps=10)
  params = reference_params = _params()
  state, reference_state = tx.init(params), reference.init(params)
  for step in range(5):
    grads = jax.tree.map(lambda x, s=step: jnp.sin(x * (s + 1)), params)
    updates, state = tx.update(grads, state, params)
    expected, reference_state = reference.update(grads, reference_state, reference_params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), updates, expected)
    params = reference_params = optax.apply_updates(params, updates)


def test_stages_of_different_lengths_compile_to_one_program():
  """The stage length is optimiser state, not a constant of the step (the demo's joint stage reuses the compiled
  visual stage), yet each stage still follows its own schedule."""
  params = _params()
  grads = jax.tree.map(jnp.ones_like, params)
  programs, updates = [], []
  for total_steps in (10, 30):
    tx, _ = optim.make_optimizer(_config(warmup_steps=2), total_steps=total_steps)
    update = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p)[0])
    state = tx.init(params)
    for _ in range(5):  # into the decay, where the two schedules differ
      state = tx.update(grads, state, params)[1]
    programs.append(update.lower(grads, state, params).as_text(debug_info=False))
    updates.append(update(grads, state, params))
  assert programs[0] == programs[1]
  kernel = ("pixel_encoder", "output_conv", "kernel")
  assert not np.allclose(_leaf(updates[0], kernel), _leaf(updates[1], kernel))


def test_a_resumed_state_follows_the_configured_stage_length():
  params = _params()
  grads = jax.tree.map(jnp.ones_like, params)
  short, _ = optim.make_optimizer(_config(warmup_steps=0), total_steps=10)
  long, _ = optim.make_optimizer(_config(warmup_steps=0), total_steps=40)
  state_short, state_long = short.init(params), long.init(params)
  for _ in range(4):
    state_short = short.update(grads, state_short, params)[1]
    state_long = long.update(grads, state_long, params)[1]
  resumed = optim.with_total_steps(state_short, 40)
  jax.tree.map(np.testing.assert_array_equal, long.update(grads, resumed, params)[0],
               long.update(grads, state_long, params)[0])


def test_multistep_schedule_drops_by_the_factor_from_each_boundary_on():
  """detectron2's WarmupMultiStepLR as the release runs it: the rate at update i is lr * 0.1 ** (boundaries <= i)."""
  schedule = optim.learning_rate_schedule("multistep", learning_rate=1e-5, total_steps=40_000, warmup_steps=0,
                                          boundaries=(26_320, 33_840), factor=0.1)
  steps = (0, 1, 26_319, 26_320, 26_321, 33_839, 33_840, 39_999)
  assert [float(schedule(s)) for s in steps] == pytest.approx([1e-5] * 3 + [1e-6] * 3 + [1e-7] * 2, rel=1e-6)
  warm = optim.learning_rate_schedule("multistep", learning_rate=1.0, total_steps=10, warmup_steps=4,
                                      boundaries=(6,), factor=0.5)
  assert [float(warm(s)) for s in range(8)] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 0.5, 0.5])


def test_the_multistep_optimiser_steps_by_its_schedule():
  params = _params()
  tx, schedule = optim.make_optimizer(_config(lr_schedule="multistep", learning_rate=1.0, warmup_steps=0,
                                              boundaries=(2, 4), weight_decay=0.0), total_steps=6)
  grads, state = jax.tree.map(jnp.ones_like, params), tx.init(params)
  steps = []
  for _ in range(6):
    updates, state = tx.update(grads, state, params)
    steps.append(-float(_leaf(updates, ("pixel_encoder", "output_conv", "kernel"))[0, 0]))
  # Adam's step on a constant gradient is the learning rate.
  assert steps == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01], rel=1e-4)
  assert [float(schedule(s)) for s in range(6)] == pytest.approx(steps, rel=1e-4)


@pytest.fixture(scope="module")
def release_params():
  """The tiny OmniSegNet's parameters (all ones) with BERT-base's 12 layers and the release's gated decoder."""
  config = OmniSegNetConfig.tiny_test(
      bert=dataclasses.replace(BertConfig.tiny_test(), num_layers=12),
      mask_decoder=dataclasses.replace(MaskDecoderConfig.tiny_test(), prompt_cross_attention="first"))
  shapes = nn.unbox(jax.eval_shape(OmniSegNet(config).init, jax.random.key(0), **_batch())["params"])
  return jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), shapes)


def _by_path(tree):
  return {optim.path_string(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _bert_layer_trains(path):
  """The release's rule: BERT layers 0-9 train (on BERT-base: all but the last two); embeddings never."""
  layer = re.match(r"text_encoder/layer_(\d+)/", path)
  return bool(layer) and int(layer.group(1)) < 10


def test_release_variant_sets_the_released_recipe():
  c = joint.get_config("release")
  assert (c.model.preset, c.optimizer.learning_rate, c.optimizer.lr_schedule, tuple(c.optimizer.boundaries),
          c.optimizer.factor, c.optimizer.warmup_steps, c.optimizer.grad_clip_norm, c.optimizer.weight_decay,
          tuple(c.input.prompt_types), c.input.batch_size) == (
              "release", 1e-5, "multistep", (26_320, 33_840), 0.1, 0, 0.01, 0.05, ("mask",), 64)
  assert not c.get("run_before")  # one stage per command, as the paper recipe


def test_release_trains_bert_layers_0_to_9_only_and_holds_no_state_for_the_rest(release_params):
  params = release_params
  assert {"text_encoder/layer_9/output/kernel", "text_encoder/layer_11/output/kernel"} <= set(_by_path(params))
  config = joint.get_config("release").optimizer
  tx, _ = optim.make_optimizer(config, total_steps=10)
  state = tx.init(params)
  updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  trains = {path: not path.startswith("text_encoder/") or _bert_layer_trains(path) for path in _by_path(params)}
  assert {path: bool(jnp.any(u != 0)) for path, u in _by_path(updates).items()} == trains
  trainable = sum(x.size for path, x in _by_path(params).items() if trains[path] and x.ndim)
  # Adam's mu and nu of the trained parameters, nothing else (scalars left out: the counters, the gates).
  assert sum(x.size for x in jax.tree.leaves(state) if x.ndim) == 2 * trainable
  # Stage 2 keeps the paper's rule: all of BERT frozen.
  frozen = _by_path(optim.frozen_mask(params, visual.get_config("release").optimizer.schedule))
  assert frozen == {path: path.startswith("text_encoder/") for path in frozen}


# Release parameters and whether build_optimizer decays them (weight decay 0.05 unless 0.0).
RELEASE_DECAY = {
    "image_encoder/stage0/block0/layernorm_before/scale": False,  # nn.LayerNorm
    "image_encoder/stage0/block0/relative_position_bias_table": False,
    "image_encoder/stage0/block0/mlp/fc1/bias": True,  # biases decay
    "image_encoder/stage0/block0/mlp/fc1/kernel": True,
    "pixel_encoder/input_norm_0/scale": False,  # nn.GroupNorm
    "pixel_encoder/encoder_layer_0/norm1/bias": False,
    "pixel_encoder/level_embed": True,  # a plain nn.Parameter
    "mask_decoder/query_features": False,  # nn.Embedding query_feat
    "mask_decoder/query_positions": False,  # nn.Embedding query_embed
    "mask_decoder/level_embed": False,  # nn.Embedding
    "mask_decoder/blocks_0/prompt_gate": True,  # lang_weight, a plain nn.Parameter
    "mask_decoder/heads/decoder_norm/scale": False,
    "prompt_encoder/query_embed": False,  # vis_prompts, nn.Embedding
    "prompt_encoder/query_pos": False,  # vis_prompts_pos, nn.Embedding
    "prompt_encoder/prompt_downscaler/norm_0/scale": True,  # LayerNorm2d is no torch norm module
    "prompt_encoder/prompt_norm/bias": False,  # lang_in_norm
    "text_projection/norm/scale": False,  # lang_norm
    "text_encoder/layer_0/attention_norm/scale": True,  # BERT layers 0-9: one group with the default decay
    "text_encoder/layer_9/output/bias": True,
}


def test_release_decays_what_build_optimizer_decays(release_params):
  config = joint.get_config("release").optimizer
  mask = _by_path(optim.decay_mask(release_params, config.no_decay))
  assert {path: bool(mask[path]) for path in RELEASE_DECAY} == RELEASE_DECAY
  # With zero gradients only weight decay moves a parameter: the decayed trainable ones, nothing else.
  tx, _ = optim.make_optimizer(config, total_steps=10)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, release_params), tx.init(release_params), release_params)
  moved = {path: bool(jnp.any(u != 0)) for path, u in _by_path(updates).items()}
  assert moved == {path: bool(mask[path]) and (not path.startswith("text_encoder/") or _bert_layer_trains(path))
                   for path in moved}


def test_release_clips_the_trainable_gradients_to_global_norm_0_01(release_params):
  config = joint.get_config("release").optimizer
  tx, _ = optim.make_optimizer(config, total_steps=10)
  grads = jax.tree.map(lambda x: 1e3 * jnp.ones_like(x), release_params)
  _, state = tx.update(grads, tx.init(release_params), release_params)
  is_adam = lambda node: isinstance(node, optax.ScaleByAdamState)  # noqa: E731
  (adam,) = [node for node in jax.tree.leaves(state, is_leaf=is_adam) if is_adam(node)]
  # After one step Adam's first moment is (1 - b1) * the clipped gradient, whose global norm is the clip value:
  # computed over the trained gradients only (frozen BERT's would shrink it).
  assert float(optax.global_norm(adam.mu)) == pytest.approx((1 - config.b1) * 0.01, rel=1e-4)
