"""Every crash point is survivable and nothing is lost: kill -9 anywhere, a corrupted newest checkpoint, a NaN loss.

The runs are the main command on a two-stage tiny sequence (tests/tiny_config.py's joint stage preceded by its
alignment stage, 6 steps each, a checkpoint every 2 steps, an evaluation at the end of each), as subprocesses
sharing JAX's persistent compilation cache with the other trainer tests. The trainer's test hook
OMNIRIS_FAULT="<action>:<point>:<stage>:<step>" (omniris_jax/train.py `_fault_point`) kills the process with
SIGKILL, or turns the parameters NaN, at a deterministic point: `step` (before that step's update), `save` (while
that checkpoint's async write is under way), `eval` (inside that evaluation), `stage` (between two stages).

The kill sweep draws its points by seed from every point of the sequence (21) and restarts the same command after
each kill; the final state must be bitwise the uninterrupted run's. By default (CI) it draws one point of each
kind (the file: 2 minutes on 2 cores, 4 when other jobs share them);
    OMNIRIS_FAULT_SWEEP=20 pytest tests/test_fault_injection.py
draws 20 distinct points instead (7 minutes); OMNIRIS_FAULT_SEED (default 0) picks the draw. The sweep runs
in the test's thread while one background thread runs the other launches (uninterrupted, NaN, corrupted
checkpoint): two processes at a time, one per core.
"""

from __future__ import annotations

import concurrent.futures
import glob
import os
import random
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from omniris_jax import train
from omniris_jax.data import prepare, sources

from test_train import REPO  # noqa: E402  (tests/ is on sys.path under pytest's rootdir conftest)
import tiny_config  # noqa: E402

STEPS = 6  # of each stage
STAGES = ("alignment", "joint")
OVERRIDES = ("--config.run_before=('alignment',)", f"--config.stage_configs.alignment.total_steps={STEPS}",
             f"--config.total_steps={STEPS}", "--config.init_from=alignment", "--config.checkpoint_every=2",
             "--config.mix_unit=example", "--config.log_every=100")
KINDS = ("step", "save", "eval", "stage")  # in the order they come within one step
NAN_AT = 3  # the alignment step whose update meets NaN parameters


def launch(workdir, fault: str = "") -> subprocess.CompletedProcess:
  """The main command on the sequence, as test_train.run_main runs it, with OMNIRIS_FAULT=`fault` (an explicit
  environment: two launches run at once)."""
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=tiny_config.TINY_CACHE_DIR,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONUNBUFFERED="1", OMNIRIS_FAULT=fault)
  command = [sys.executable, "-m", "omniris_jax.main", "--config=tests/tiny_config.py:joint",
             f"--workdir={workdir}", *OVERRIDES]
  return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def output(result: subprocess.CompletedProcess) -> str:
  return result.stdout + result.stderr


def finished(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
  assert result.returncode == 0, f"main failed ({result.returncode}):\n{result.stdout[-3000:]}\n" + \
      result.stderr[-5000:]
  return result


def fault_points() -> list[tuple[int, int, int, str]]:
  """Every point of the sequence as (stage index, step, kind index, OMNIRIS_FAULT value), in the order run."""
  points = []
  for index, stage in enumerate(STAGES):
    for step in range(1, STEPS + 1):
      kinds = ["step"]
      kinds += ["save"] if step % 2 == 0 or step == STEPS else []
      kinds += ["eval"] if step == STEPS else []
      kinds += ["stage"] if step == STEPS and index < len(STAGES) - 1 else []
      points += [(index, step, KINDS.index(kind), f"kill:{kind}:{stage}:{step}") for kind in kinds]
  return points


def draw_points(seed: int, count: int | None) -> list[str]:
  """`count` distinct points (None: one of each kind), in the order the run reaches them. Each is reached again
  after the kill before it: a restart resumes at or before the killed point, and no point is drawn twice.

  With None, the `step` and `save` points are drawn from after the stage's first checkpoint is complete (the save
  of step 4 waits for it), so that their restarts resume mid-stage from a checkpoint.
  """
  rng, points = random.Random(seed), fault_points()
  if count is None:
    mid_stage = {"step": 5, "save": 4}
    chosen = [rng.choice([p for p in points if p[2] == kind and p[1] >= mid_stage.get(KINDS[kind], 0)])
              for kind in range(len(KINDS))]
  else:
    chosen = rng.sample(points, min(count, len(points)))
  return [p[3] for p in sorted(chosen)]


def checkpoint_steps(workdir, stage):
  return sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, stage, "checkpoints", "*"))
                if os.path.basename(p).isdigit())


def saved_state(workdir, stage, step):
  return ocp.PyTreeCheckpointer().restore(os.path.join(workdir, stage, "checkpoints", str(step), "state"))


def batch_indices(stage, step):
  """The record indices of `stage`'s batch at `step` (1-based) in the sequence."""
  config = train.stage_config(tiny_config.get_config("joint"), stage)
  iterator = sources.make_train_iterator(config, config.input.batch_size)
  for _ in range(step):
    batch = next(iterator)
  return np.asarray(batch["index"]).tolist()


def assert_bitwise_equal(actual, expected, what):
  expected_leaves = jax.tree_util.tree_flatten_with_path(expected)[0]
  actual_leaves = jax.tree.leaves(actual)
  assert len(actual_leaves) == len(expected_leaves), what
  for (path, want), got in zip(expected_leaves, actual_leaves):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want),
                                  err_msg=f"{what}: {jax.tree_util.keystr(path)}")


def _corrupted_run(uninterrupted, workdir):
  """A copy of the finished `uninterrupted` workdir whose newest joint checkpoint has truncated array files, run
  again."""
  shutil.copytree(uninterrupted, workdir)
  for path in glob.glob(str(workdir / "joint" / "checkpoints" / str(STEPS) / "state" / "ocdbt.process_0" / "d" /
                            "*")):
    with open(path, "r+b") as file:
      file.truncate(os.path.getsize(path) // 2)
  return workdir, launch(workdir)


@pytest.fixture(scope="module")
def background(tmp_path_factory):
  """The launches other than the sweep's, in order in one background thread: futures of (workdir, result)."""
  root = tmp_path_factory.mktemp("background")
  prepare.ensure_built("omniref/shapes_tiny", tiny_config.TINY_DATA_DIR)  # here: two launches would both build it
  with concurrent.futures.ThreadPoolExecutor(1) as executor:
    uninterrupted = executor.submit(lambda: (root / "uninterrupted", finished(launch(root / "uninterrupted"))))
    nan = executor.submit(lambda: (root / "nan", launch(root / "nan", f"nan:step:alignment:{NAN_AT}")))
    corrupted = executor.submit(lambda: _corrupted_run(uninterrupted.result()[0], root / "corrupted"))
    yield {"uninterrupted": uninterrupted, "nan": nan, "corrupted": corrupted}


def test_killed_anywhere_and_restarted_the_run_ends_bitwise_as_the_uninterrupted_one(background, tmp_path):
  count = int(os.environ["OMNIRIS_FAULT_SWEEP"]) if os.environ.get("OMNIRIS_FAULT_SWEEP") else None
  points = draw_points(int(os.environ.get("OMNIRIS_FAULT_SEED", "0")), count)
  workdir = tmp_path / "killed"
  outputs = []
  for point in points:
    result = launch(workdir, point)
    outputs.append(output(result))
    # -9: the point was reached and the process died there (a run that finished would have skipped it).
    assert result.returncode == -9, f"{point} (of {points}) not reached: rc {result.returncode}\n" + \
        output(result)[-5000:]
    assert "could not be read" not in output(result), point  # a kill never leaves a broken checkpoint
  out = output(finished(launch(workdir)))
  assert "could not be read" not in out
  # At least one restart trained on from a checkpoint in mid-stage (state and input position restored).
  assert re.search(rf"Training from step [1-{STEPS - 1}]\.", "".join(outputs[1:]) + out), points
  uninterrupted, _ = background["uninterrupted"].result()
  for stage in STAGES:
    assert os.path.exists(workdir / stage / "results.json"), stage
    assert_bitwise_equal(saved_state(workdir, stage, STEPS), saved_state(uninterrupted, stage, STEPS),
                         f"{stage} after kills at {points}")


def test_a_corrupted_newest_checkpoint_is_named_and_the_run_resumes_from_the_one_before(background):
  uninterrupted, _ = background["uninterrupted"].result()
  workdir, result = background["corrupted"].result()
  out = output(finished(result))
  bad = workdir / "joint" / "checkpoints" / str(STEPS)
  assert f"WARNING: checkpoint {bad} could not be read" in out
  assert f"WARNING: moved the unreadable checkpoint {bad} to {bad}.unreadable-" in out
  assert f"Resumed from checkpoint {workdir / 'joint' / 'checkpoints' / str(STEPS - 2)}." in out
  assert "[joint] trained 2 steps" in out
  assert len(glob.glob(f"{bad}.unreadable-*/state")) == 1  # kept aside, not deleted
  assert_bitwise_equal(saved_state(workdir, "joint", STEPS), saved_state(uninterrupted, "joint", STEPS),
                       "joint after the fallback")


def test_a_nan_loss_stops_the_run_naming_the_step_and_batch_and_keeps_the_last_good_checkpoint(background):
  uninterrupted, _ = background["uninterrupted"].result()
  workdir, result = background["nan"].result()
  out = output(result)
  assert result.returncode == 1, out[-5000:]
  # The NaN guard's host sync is at step 4's checkpoint (log_every=100): that checkpoint is never written.
  good = workdir / "alignment" / "checkpoints" / "2"
  message = out[out.index("NonFiniteError: "):].splitlines()[0]
  assert f"Stage 'alignment': non-finite loss or gradient at step {NAN_AT} (loss=nan" in message
  assert (f"the batch's record indices (`index`, in their source) were {batch_indices('alignment', NAN_AT)}."
          in message)
  assert message.endswith(f"Last good checkpoint: {good}.")
  assert checkpoint_steps(workdir, "alignment") == [2]
  assert not os.path.exists(workdir / "alignment" / "results.json") and not os.path.exists(workdir / "joint")
  assert_bitwise_equal(saved_state(workdir, "alignment", 2), saved_state(uninterrupted, "alignment", 2),
                       "the last good checkpoint")
