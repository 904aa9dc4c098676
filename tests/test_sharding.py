"""Sharding on 8 fake CPU devices: same losses as one device, parameters really sharded, bad meshes/batches named.

The model here is a small network built from the project's layers (logical axis names on every parameter and
activation), so three meshes compile in seconds; the train step, optimiser, rules and state creation are the
trainer's own (steps.train_step, optim.make_optimizer, sharding.*).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from omniris_jax import optim, sharding, steps
from omniris_jax.models import layers

from configs import common  # noqa: E402


class TinySegmenter(nn.Module):
  """Pixels + text ids -> 2-class mask logits and no-target logits (enough to exercise every logical axis kind)."""

  @nn.compact
  def __call__(self, image, text_ids, text_attention_mask, ref_image, ref_prompt, has_text, has_visual, *,
               deterministic=True):
    x = image.astype(jnp.float32) / 255.0
    x = layers.Conv(16, (3, 3), name="conv")(x)
    x = layers.constrain(x, ("batch", "height", "width", "embed"))
    words = nn.Embed(64, 16, embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                         ("vocab", "embed")))(text_ids % 64)
    x = x + words.mean(axis=1)[:, None, None, :]
    x = x + layers.Mlp(64, name="mlp")(x)
    x = layers.LayerNorm(name="norm")(x)
    mask_logits = layers.Dense(2, ("embed", None), name="mask_head")(x)
    nt_logits = layers.Dense(2, ("embed", None), name="nt_head")(x.mean(axis=(1, 2)))
    return {"mask_logits": mask_logits, "nt_logits": nt_logits}


def cross_entropy_loss(outputs, batch, config):
  """A stand-in loss for this test only (the real one is losses.compute_losses)."""
  del config
  mask = jax.nn.one_hot(batch["mask"], 2)
  mask_loss = -jnp.mean(jnp.sum(mask * jax.nn.log_softmax(outputs["mask_logits"]), -1))
  nt = jax.nn.one_hot(batch["no_target"].astype(jnp.int32), 2)
  nt_loss = -jnp.mean(jnp.sum(nt * jax.nn.log_softmax(outputs["nt_logits"]), -1))
  return mask_loss + nt_loss, {"mask_loss": mask_loss}


def make_batch(step, batch_size=8, size=16):
  rng = np.random.default_rng(step)
  return {"image": rng.integers(0, 255, (batch_size, size, size, 3), dtype=np.uint8),
          "text_ids": rng.integers(0, 100, (batch_size, 6)).astype(np.int32),
          "text_attention_mask": np.ones((batch_size, 6), np.int32),
          "ref_image": np.zeros((batch_size, size, size, 3), np.uint8),
          "ref_prompt": np.zeros((batch_size, size, size), np.float32),
          "has_text": np.ones((batch_size,), bool), "has_visual": np.zeros((batch_size,), bool),
          "mask": (rng.random((batch_size, size, size)) > 0.6).astype(np.uint8),
          "no_target": rng.random(batch_size) > 0.5}


def train_losses(mesh_config, num_steps=3, loss_fn=cross_entropy_loss, schedule=None, pass_frozen=False):
  """Losses of `num_steps` steps on the mesh, and the state (built with the trainer's sharding recipe).

  `schedule` replaces the demo optimiser's freeze rules; `pass_frozen` hands train_step their frozen mask (as
  train.py does) instead of differentiating every parameter.
  """
  mesh = sharding.make_mesh(mesh_config)
  rules = sharding.make_rules(common.base_config("demo").sharding.rules)
  model = TinySegmenter()
  optimizer_config = common.base_config("demo").optimizer
  optimizer_config.warmup_steps = 0
  if schedule is not None:
    optimizer_config.schedule = schedule
  tx, _ = optim.make_optimizer(optimizer_config, total_steps=10)
  sample = jax.tree.map(lambda x: jnp.asarray(x[:1]), make_batch(0))
  inputs = steps.model_inputs(sample)

  def init_boxed(rng):
    params = model.init(rng, **inputs)["params"]
    return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(init_boxed, jax.random.PRNGKey(0))
    shardings = sharding.state_shardings(abstract, mesh, rules)
    state = jax.jit(lambda rng: nn.unbox(init_boxed(rng)), out_shardings=shardings)(jax.random.PRNGKey(0))
    frozen = None
    if pass_frozen:
      frozen = optim.frozen_mask(sharding.plain(abstract).params, tuple(optimizer_config.schedule))
    step_fn = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, loss_config=None, seed=0,
                                        loss_fn=loss_fn, frozen=frozen),
                      in_shardings=(shardings, sharding.batch_sharding(mesh)), out_shardings=(shardings, None),
                      donate_argnums=0)
    initial = jax.tree.map(np.asarray, state.params)
    losses = []
    for step in range(num_steps):
      state, metrics = step_fn(state, sharding.global_batch(make_batch(step), mesh))
      losses.append(float(metrics["loss"]))
  return losses, state, metrics, initial


@pytest.fixture(scope="module")
def one_device():
  return train_losses({"data": 1, "fsdp": 1, "model": 1, "num_devices": 1})


@pytest.mark.parametrize("mesh_config", [{"data": 4, "fsdp": 1, "model": 2}, {"data": 8, "fsdp": 1, "model": 1},
                                         {"data": 2, "fsdp": 4, "model": 1}])
def test_sharded_training_gives_the_losses_of_one_device(one_device, mesh_config):
  losses, state, _, _ = train_losses(mesh_config)
  np.testing.assert_allclose(losses, one_device[0], rtol=2e-5)
  assert len(state.params["mask_head"]["kernel"].sharding.device_set) == 8


def test_large_parameters_are_really_sharded():
  _, state, _, _ = train_losses({"data": 2, "fsdp": 2, "model": 2}, num_steps=1)
  kernel = state.params["mlp"]["fc1"]["kernel"]  # (embed 16, mlp 64): embed on fsdp, mlp on model
  shard_shape = kernel.addressable_shards[0].data.shape
  assert np.prod(shard_shape) * 4 == np.prod(kernel.shape), (kernel.shape, shard_shape, kernel.sharding)
  # Adam's moments follow their parameters.
  moments = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, "shape", None) == kernel.shape]
  assert moments and all(x.sharding.is_equivalent_to(kernel.sharding, kernel.ndim) for x in moments)
  # The vocabulary table is never split (30522 rows divide by nothing useful).
  embedding = state.params["Embed_0"]["embedding"]
  assert embedding.sharding.spec[0] is None


def test_nonfinite_loss_skips_the_update_and_raises_the_flag():
  def nan_loss(outputs, batch, config):
    loss, metrics = cross_entropy_loss(outputs, batch, config)
    return loss * jnp.nan, metrics

  _, state, metrics, _ = train_losses({"data": 8, "fsdp": 1, "model": 1}, num_steps=1, loss_fn=nan_loss)
  assert int(metrics["nonfinite"]) == 1
  assert int(state.step) == 1 and all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


def test_mesh_that_does_not_match_the_devices_fails_with_the_numbers():
  with pytest.raises(ValueError, match=r"needs 6 devices but 8 are available"):
    sharding.make_mesh({"data": 3, "fsdp": 1, "model": 2})


def test_batch_that_does_not_divide_the_data_parallel_size_fails_with_the_numbers():
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2, "model": 1})
  with pytest.raises(ValueError, match=r"batch_size=12 must be a multiple of the data-parallel size 8 .*e\.g\. 16"):
    sharding.check_batch_size(12, mesh)
  assert sharding.check_batch_size(16, mesh, process_count=2) == 8


def test_vocab_rule_must_replicate():
  with pytest.raises(ValueError, match="'vocab' must map to None"):
    sharding.make_rules((("vocab", "model"),))


FREEZE_WORDS = (("Embed_0/.*", None), (".*", "default"))


def test_frozen_parameters_are_not_differentiated_and_come_back_unchanged():
  """train.py passes the frozen mask: the trained leaves move exactly as when every leaf is differentiated."""
  mesh_config = {"data": 8, "fsdp": 1, "model": 1}
  all_losses, all_state, all_metrics, initial = train_losses(mesh_config, schedule=FREEZE_WORDS)
  losses, state, metrics, _ = train_losses(mesh_config, schedule=FREEZE_WORDS, pass_frozen=True)
  np.testing.assert_array_equal(state.params["Embed_0"]["embedding"], initial["Embed_0"]["embedding"])
  assert not np.array_equal(state.params["mlp"]["fc1"]["kernel"], initial["mlp"]["fc1"]["kernel"])
  np.testing.assert_allclose(losses, all_losses, rtol=1e-6)
  for (path, new), old in zip(jax.tree_util.tree_leaves_with_path(state.params), jax.tree.leaves(all_state.params)):
    np.testing.assert_allclose(new, old, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))
  # The logged norm is the norm the optimiser clips: the frozen table's gradient is not in it.
  assert float(metrics["grad_norm"]) < float(all_metrics["grad_norm"])
