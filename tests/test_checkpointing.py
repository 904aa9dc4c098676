"""Checkpoints survive preemption: kill -9 and restart reaches bitwise the same parameters; a broken checkpoint
is named, moved aside and the previous one used; init_from loads the previous stage's parameters and lists the new
ones. tests/test_fault_injection.py kills, corrupts and poisons the trainer at chosen points.

The runs are the main command on the tiny config (tests/tiny_config.py) as subprocesses, sharing JAX's
persistent compilation cache with tests/test_train.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn

from omniris_jax import checkpointing, optim, sharding, steps
from omniris_jax.data import sources
from omniris_jax.models import factory

from test_train import run_main  # noqa: E402  (tests/ is on sys.path under pytest's rootdir conftest)
import tiny_config  # noqa: E402

TOTAL_STEPS = 24
OVERRIDES = (f"--config.total_steps={TOTAL_STEPS}", "--config.checkpoint_every=2", "--config.log_every=1")


def saved_params(workdir, step):
  return ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "alignment", "checkpoints", str(step), "state"))[
      "params"]


def checkpoint_steps(workdir):
  directory = os.path.join(workdir, "alignment", "checkpoints")
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  run_main(workdir, *OVERRIDES)
  return workdir


def test_killed_run_resumes_to_bitwise_the_same_parameters(uninterrupted, tmp_path):
  workdir = tmp_path / "killed"
  process = run_main(workdir, *OVERRIDES, popen=True)
  deadline = time.time() + 300
  # Kill -9 as soon as a checkpoint past the first exists, well before the end of the stage.
  while not [s for s in checkpoint_steps(workdir) if s >= 4] and process.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.wait()
  killed_at = checkpoint_steps(workdir)
  assert killed_at and max(killed_at) < TOTAL_STEPS, f"not killed mid-stage: {killed_at}"
  assert not os.path.exists(workdir / "alignment" / "results.json")

  result = run_main(workdir, *OVERRIDES)
  out = result.stdout + result.stderr
  assert "Resumed from checkpoint" in out and f"step {TOTAL_STEPS}/{TOTAL_STEPS}" in out
  resumed_from = int(out.split("Resumed from checkpoint ")[1].split(".")[0].rsplit("/", 1)[1])
  assert 4 <= resumed_from < TOTAL_STEPS
  expected, actual = saved_params(uninterrupted, TOTAL_STEPS), saved_params(workdir, TOTAL_STEPS)
  for (path, want), got in zip(jax.tree_util.tree_flatten_with_path(expected)[0], jax.tree.leaves(actual)):
    np.testing.assert_array_equal(got, want, err_msg=optim.path_string(path))


def _abstract_state_and_iterator(config):
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.make_rules(config.sharding.rules)
  model = factory.make_model(config)
  tx, _ = optim.make_optimizer(config.optimizer, config.total_steps)

  def init_boxed(rng):
    params = model.init(rng, **factory.dummy_inputs(config))["params"]
    return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(init_boxed, jax.random.PRNGKey(0))
  shardings = sharding.state_shardings(boxed, mesh, rules)
  abstract = checkpointing.abstract_state(shardings, sharding.plain(boxed))
  return abstract, sources.make_train_iterator(config, config.input.batch_size)


def test_unreadable_checkpoint_is_named_and_the_previous_one_used(uninterrupted, tmp_path):
  workdir = tmp_path / "broken"
  shutil.copytree(uninterrupted / "alignment" / "checkpoints", workdir)
  latest = max(int(n) for n in os.listdir(workdir) if n.isdigit())
  for root, _, files in os.walk(workdir / str(latest) / "state"):
    for name in files:
      if not name.startswith("_"):
        with open(os.path.join(root, name), "wb") as file:
          file.write(b"garbage")
  config = tiny_config.get_config("alignment")
  config.total_steps = TOTAL_STEPS
  abstract, iterator = _abstract_state_and_iterator(config)
  manager = checkpointing.make_manager(str(workdir), max_to_keep=10)
  messages = []
  state = checkpointing.restore_latest(manager, abstract, iterator, log=messages.append)
  assert int(state.step) == latest - 2
  assert f"checkpoint {workdir / str(latest)} could not be read" in messages[0]
  assert messages[-1] == f"Resumed from checkpoint {workdir / str(latest - 2)}."
  # Moved aside (kept for inspection), so that the resumed run can write that step again.
  [aside] = [name for name in os.listdir(workdir) if name.startswith(f"{latest}.unreadable-")]
  assert f"moved the unreadable checkpoint {workdir / str(latest)} to {workdir / aside}" in messages[1]
  assert latest not in manager.all_steps() and manager.latest_step() == latest - 2
  np.testing.assert_array_equal(state.params["mask_decoder"]["level_embed"],
                                saved_params(uninterrupted, latest - 2)["mask_decoder"]["level_embed"])
  manager.close()


def test_init_from_loads_every_matching_parameter_and_lists_the_new_ones(uninterrupted):
  config = tiny_config.get_config("alignment")
  abstract, _ = _abstract_state_and_iterator(config)
  # A next-stage model with one parameter more (absent in the checkpoint) and one of another shape.
  wanted = dict(abstract.params)
  wanted["extra_head"] = {"kernel": jax.ShapeDtypeStruct((3, 3), jnp.float32,
                                                         sharding=abstract.params["mask_decoder"]["level_embed"]
                                                         .sharding)}
  level = abstract.params["mask_decoder"]["level_embed"]
  wanted["mask_decoder"] = {**wanted["mask_decoder"], "level_embed": jax.ShapeDtypeStruct(
      (level.shape[0] + 1, level.shape[1]), level.dtype, sharding=level.sharding)}
  fresh = jax.tree.map(lambda x: jnp.full(x.shape, 7.0, x.dtype), wanted)
  messages = []
  loaded = checkpointing.load_params_from(str(uninterrupted / "alignment" / "checkpoints"), wanted, fresh,
                                          log=messages.append)
  saved = saved_params(uninterrupted, TOTAL_STEPS)
  np.testing.assert_array_equal(loaded["text_encoder"]["embeddings"]["word_embeddings"]["embedding"],
                                saved["text_encoder"]["embeddings"]["word_embeddings"]["embedding"])
  assert float(loaded["extra_head"]["kernel"][0, 0]) == 7.0
  assert float(loaded["mask_decoder"]["level_embed"][0, 0]) == 7.0
  assert "freshly initialised (absent or reshaped there): ['extra_head/kernel', 'mask_decoder/level_embed']" in \
      messages[0]
  with pytest.raises(FileNotFoundError, match="holds no checkpoint; run the previous stage first"):
    checkpointing.load_params_from(str(uninterrupted / "nowhere"), wanted, fresh)
