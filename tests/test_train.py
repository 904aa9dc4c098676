"""The real trainer, end to end, through the main command on the tiny config (tests/tiny_config.py).

Runs as a subprocess (`python -m omniris_jax.main --config=tests/tiny_config.py:alignment`) with JAX's
persistent compilation cache, so the checkpointing tests' runs of the same shapes skip the compile.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from omniris_jax import summaries

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
import tiny_config  # noqa: E402  pylint: disable=g-import-not-at-top


def run_main(workdir, *overrides, stage="alignment", check=True, **popen_kwargs):
  """The main command on the tiny config; returns the CompletedProcess (or the Popen with `popen=True`)."""
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=tiny_config.TINY_CACHE_DIR,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONUNBUFFERED="1")
  command = [sys.executable, "-m", "omniris_jax.main", f"--config=tests/tiny_config.py:{stage}",
             f"--workdir={workdir}", *overrides]
  if popen_kwargs.pop("popen", False):
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen_kwargs)
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  if check and result.returncode:
    raise AssertionError(f"main failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
  return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("train")
  result = run_main(workdir)
  return workdir, result.stdout + result.stderr


def test_progress_lines_and_the_table_with_the_baseline_are_printed(trained):
  _, out = trained
  assert "=== Stage 'alignment': 6 steps, batch 4" in out
  assert "[alignment] step 6/6  loss" in out and "steps/s  ETA" in out
  assert "| Method | Text-test cIoU | Text-test gIoU | Text-test N_acc |" in out
  assert "| OmniSegNet (alignment, step 6) |" in out
  assert "| Baseline: every object, never no-target |" in out
  assert "| train | 18 |" in out  # the dataset statistics at the start of the run


def test_the_eta_leaves_out_the_compile_and_evaluations_and_one_slow_interval_barely_moves_it():
  from omniris_jax import progress  # pylint: disable=g-import-not-at-top
  now = [0.0]
  timer = progress.StepTimer(0, 1000, smoothing=0.25, clock=lambda: now[0])
  now[0] = 60.0  # step 1 holds the compile
  assert timer.tick(1) == (1 / 60, None)
  now[0] += 9.0  # steps 2-10 at 1 s each
  assert timer.tick(10) == (1.0, 990.0)
  assert timer.tick(10)[1] == 990.0  # no step since the last line: nothing to average
  now[0] += 300.0  # an evaluation
  timer.restart(10)
  now[0] += 10.0
  assert timer.tick(20) == (1.0, 980.0)
  now[0] += 50.0  # one interval at 5 s per step (a checkpoint write, a busy machine)
  rate, eta = timer.tick(30)
  assert rate == 0.2 and eta == pytest.approx(970 * (1 + 0.25 * 4))


def test_results_files_are_written(trained):
  workdir, _ = trained
  stage_dir = os.path.join(workdir, "alignment")
  results = json.load(open(os.path.join(stage_dir, "results.json")))
  assert results["step"] == 6 and set(results["model"]) == {"text_test", "visual_test", "omni_test"}
  assert results["model"]["omni_test"]["overall"]["num_samples"] == 9  # every example once, padding dropped
  # The baseline never says no-target: N_acc 0 where no-target samples exist, and it is a real mask.
  baseline = results["baseline"]["text_test"]["overall"]
  assert baseline["N_acc"] == 0 and baseline["cIoU"] > 5
  assert "| Baseline: every object, never no-target |" in open(os.path.join(stage_dir, "results.md")).read()
  for picture in ("evals/step_6.png", "learning_curves.png", "../preview.png"):
    assert os.path.getsize(os.path.join(stage_dir, picture)) > 5_000, picture


def test_scalars_are_in_tensorboard_event_files_and_the_csv(trained):
  workdir, _ = trained
  [events] = glob.glob(os.path.join(workdir, "alignment", "tensorboard", "events.out.tfevents.*"))
  scalars = {}
  for step, values in summaries.read_events(events):
    scalars.setdefault(step, {}).update(values)
  assert sorted(step for step, values in scalars.items() if "train/loss" in values) == [1, 2, 4, 6]
  assert "eval/text_test/cIoU" in scalars[6]
  series = summaries.read_csv(os.path.join(workdir, "alignment", "tensorboard", "metrics.csv"))
  assert [step for step, _ in series["train/loss"]] == [1, 2, 4, 6]
  assert series["train/loss"][-1][1] == pytest.approx(scalars[6]["train/loss"], rel=1e-6)


def test_the_plot_command_draws_a_workdirs_stages_and_names_what_is_wrong(trained, tmp_path, capsys):
  workdir, _ = trained
  out = tmp_path / "curves.png"
  summaries.main([str(workdir), "--out", str(out), "--tags", "train/loss", "eval/text_test/cIoU"])
  assert out.stat().st_size > 5_000 and "over the stages alignment" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    summaries.main([str(workdir), "--tags", "train/no_such_scalar"])
  assert "train/no_such_scalar" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    summaries.main([str(tmp_path / "not_a_run")])
  assert "holds no <stage>/tensorboard/metrics.csv" in capsys.readouterr().err


def test_checkpoints_follow_the_schedule(trained):
  workdir, _ = trained
  steps = sorted(int(name) for name in os.listdir(os.path.join(workdir, "alignment", "checkpoints"))
                 if name.isdigit())
  assert steps == [2, 4, 6]


def test_real_dataset_that_is_missing_fails_fast_naming_it(tmp_path):
  result = run_main(tmp_path / "work", f"--config.dataset.data_dir={tmp_path / 'empty'}",
                    "--config.dataset.name=omniref/released", check=False)
  assert result.returncode != 0
  assert "Dataset 'omniref/released' is not built" in result.stderr
  assert "python -m tfds_omniref.build" in result.stderr and "Traceback" not in result.stdout


def test_a_text_encoder_smaller_than_the_tokenizer_vocabulary_is_refused():
  # Ids past the embedding table give NaN text features without any error; the config must not get that far.
  from omniris_jax.models import factory  # pylint: disable=g-import-not-at-top
  config = tiny_config.get_config("alignment")
  config.model.overrides.bert = {"vocab_size": 99}
  with pytest.raises(ValueError, match=r"has 30522 tokens but the model's text encoder embeds only"):
    factory.model_config(config)


def test_generated_training_source_is_the_procedural_train_split_and_refuses_stored_splits():
  import ml_collections  # pylint: disable=g-import-not-at-top
  from omniris_jax.data import sources  # pylint: disable=g-import-not-at-top

  source_config = ml_collections.ConfigDict(dict(
      name="omniref/shapes_tiny", split="train", data_dir=tiny_config.TINY_DATA_DIR, modalities=("text",),
      generated=True, category_maps=True))
  source = sources.open_training_source(source_config)
  assert len(source) > 1_000_000  # far beyond the 18 stored examples: every step sees new scenes
  assert all(source[i]["modality"] == 0 for i in range(3)) and "category_map" in source[0]
  source_config.split = "text_test"
  with pytest.raises(ValueError, match="generated=True needs the train split of a procedural dataset"):
    sources.open_training_source(source_config)


def _text_only_batch(batch_size: int = 4, size: int = 64, text_len: int = 8) -> dict:
  """A joint-stage batch of the contract in which no example has a visual prompt (text and no-target rows)."""
  rng = np.random.default_rng(0)
  mask = np.zeros((batch_size, size, size), np.uint8)
  mask[0, 8:24, 8:30] = 1
  mask[1, 30:60, 20:40] = 1
  text_mask = np.ones((batch_size, text_len), np.int32)
  text_mask[:, 6:] = 0
  return {
      "image": rng.integers(0, 256, (batch_size, size, size, 3)).astype(np.uint8),
      "text_ids": rng.integers(1000, 2000, (batch_size, text_len)).astype(np.int32) * text_mask,
      "text_attention_mask": text_mask,
      "ref_image": np.zeros((batch_size, size, size, 3), np.uint8),
      "ref_prompt": np.zeros((batch_size, size, size), np.float32),
      "has_text": np.ones(batch_size, bool), "has_visual": np.zeros(batch_size, bool),
      "mask": mask, "text_mask": mask, "visual_mask": np.zeros_like(mask),
      "no_target": ~mask.any(axis=(1, 2)),
      "category_map": (mask * 3).astype(np.uint8),
      "index": np.arange(batch_size, dtype=np.int64),
  }


def test_a_batch_without_visual_prompts_gets_the_same_update_from_the_text_only_step():
  # The trainer gives such batches (every text batch of mix_unit='batch') the cheaper text-only step; it must
  # be the very update the full step computes, or mixing by batch would change what is learned.
  import functools  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy.testing as npt  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top

  from omniris_jax import optim, steps  # pylint: disable=g-import-not-at-top
  from omniris_jax.models import factory  # pylint: disable=g-import-not-at-top

  config = tiny_config.get_config("joint")
  model = factory.make_model(config)
  tx, _ = optim.make_optimizer(config.optimizer, config.total_steps)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), **factory.dummy_inputs(config))["params"])
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  frozen = optim.frozen_mask(params, tuple(config.optimizer.schedule))
  batch = _text_only_batch(config.input.batch_size, config.input.resolution, config.input.max_text_len)

  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  full_step, text_step = (jax.jit(functools.partial(steps.train_step, model=model, tx=tx, loss_config=config.loss,
                                                    seed=config.seed, prompts=prompts, frozen=frozen,
                                                    loss_fn=factory.loss_fn(config)))
                          for prompts in (("text", "visual"), ("text",)))
  state, _ = full_step(state, batch)  # past the warmup's zero learning rate
  params = state.params
  (full_state, full_metrics), (text_state, text_metrics) = full_step(state, batch), text_step(state, batch)
  npt.assert_allclose(float(text_metrics["loss"]), float(full_metrics["loss"]), rtol=1e-5)
  npt.assert_allclose(float(text_metrics["grad_norm"]), float(full_metrics["grad_norm"]), rtol=1e-4)
  moved = 0
  for (path, full), text, before in zip(jax.tree_util.tree_leaves_with_path(full_state.params),
                                        jax.tree.leaves(text_state.params), jax.tree.leaves(params)):
    if jax.tree_util.keystr(path).endswith("['key']['bias']"):
      # Softmax ignores a shift shared by all keys, so these gradients are zero but for rounding, which
      # Adam's normalisation turns into steps of either sign: nothing to compare.
      continue
    npt.assert_allclose(np.asarray(text), np.asarray(full), rtol=1e-4, atol=1e-6,
                        err_msg=jax.tree_util.keystr(path))
    moved += int(not np.array_equal(np.asarray(full), np.asarray(before)))
  assert moved > 10  # the step really updated parameters (so the comparison compares something)


def _no_collectives(monkeypatch):
  """Makes every multi-host collective of jax.experimental.multihost_utils raise."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  def refuse(*args, **kwargs):
    raise AssertionError("a cross-host collective was called")

  for name in ("process_allgather", "sync_global_devices", "broadcast_one_to_all"):
    monkeypatch.setattr(multihost_utils, name, refuse)


def test_the_step_for_a_batch_is_read_from_the_batch_without_asking_the_other_processes(monkeypatch):
  # In a 2-process world every process must take the same compiled step at the same time; the choice is read
  # from the batch's recorded source, which the batch-mixed stream makes the same on every process.
  import jax  # pylint: disable=g-import-not-at-top

  from omniris_jax import train  # pylint: disable=g-import-not-at-top
  from omniris_jax.data import sources  # pylint: disable=g-import-not-at-top

  config = tiny_config.get_config("joint")
  assert config.mix_unit == "batch" and tuple(config.mix_ratio) == (7, 2)
  iterator = sources.make_train_iterator(config, config.input.batch_size)
  batches = [next(iterator) for _ in range(9)]
  _no_collectives(monkeypatch)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  picked = [train.pick_train_step(batch, "full", "text") for batch in batches]
  assert picked.count("text") == 7 and picked.count("full") == 2
  for batch, step in zip(batches, picked):  # the text-only step only for batches with no visual prompt at all
    assert (step == "text") == (not np.asarray(batch["has_visual"]).any())
  # Streams mixed example by example (the paper's) carry no source: always the full step.
  assert train.pick_train_step({k: v for k, v in batches[0].items() if k != "source"}, "full", "text") == "full"
  assert train.pick_train_step(batches[0], "full", None) == "full"


def test_the_paper_recipe_s_step_loop_makes_no_cross_host_collective(monkeypatch, tmp_path):
  # The joint stage mixed example by example (the paper's recipe), every collective refused: the loop, the
  # checkpoints and the final evaluation run through.
  from omniris_jax import train  # pylint: disable=g-import-not-at-top

  config = tiny_config.get_config("joint")
  with config.unlocked():
    config.mix_unit = "example"
    config.init_from = None
    config.total_steps = 3
  _no_collectives(monkeypatch)
  picked = []
  pick = train.pick_train_step
  monkeypatch.setattr(train, "pick_train_step", lambda *args: picked.append(pick(*args)) or picked[-1])
  results = train.train_and_evaluate(config, str(tmp_path))
  assert len(picked) == 3 and len(set(map(id, picked))) == 1  # one compiled step for every batch
  assert set(results) == set(config.dataset.test_splits)
  assert (tmp_path / "joint" / "checkpoints" / "3").is_dir()
