"""The optimiser: which parameters decay, which are frozen (unchanged, no Adam state), and the schedule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from omniris_jax import optim

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
      learning_rate=0.1, warmup_steps=2, power=1.0, end_learning_rate=0.0, b1=0.9, b2=0.999, eps=1e-8,
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
