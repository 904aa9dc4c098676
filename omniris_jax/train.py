"""Train and evaluate one stage of the paper's regime, or several stages in sequence.

`train_and_evaluate(config, workdir)` reads top to bottom (big_vision style): mesh, input pipeline, model and
optimizer, shard and transfer, update step, load checkpoint, evals, train loop. Everything a stage writes goes
to `WORKDIR/<config.stage>/`:

  checkpoints/<step>/      train state + input iterator (checkpointing.py); the last `keep_checkpoints`
  tensorboard/             event files + metrics.csv (summaries.py); learning_curves.png
  evals/step_<N>.json      every evaluation, full breakdowns; evals/step_<N>.png prediction overlays
  results.md, results.json the stage's final evaluation in the paper's Table 1 layout, beside the baseline

`run_stages(config, workdir)` first runs the stages named in `config.run_before` (their configs are in
`config.stage_configs`), each initialising from the one before (`init_from`), then this config's stage. A stage
whose final checkpoint and results exist is skipped, so re-running the same command after a kill resumes where
it stopped.

The loop makes no cross-host collective of its own: every process runs the same steps on its shard of each
global batch, and which compiled step a batch takes is read from the batch itself (`source`, which the mixed
stream records and which is the same on every process at a given step).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from omniris_jax import checkpointing, optim, progress, sharding, steps, summaries
from omniris_jax.data import sources
from omniris_jax.evaluators import referring
from omniris_jax.models import factory, omnisegnet

# The scalars a progress line shows (all of them go to TensorBoard and metrics.csv).
PROGRESS_KEYS = ("mask_loss", "dice_loss", "region_loss", "nt_loss", "category_loss", "colour_loss", "nt_accuracy",
                 "grad_norm", "learning_rate")
# `source` of a text batch in a stream mixed by whole batches (pipeline.make_mixed_dataset).
TEXT_SOURCE = 0


class NonFiniteError(FloatingPointError):
  """A NaN/inf loss or gradient: the message names the step, the batch's record indices and the last checkpoint."""


# Fault injection, for tests only (tests/test_fault_injection.py): OMNIRIS_FAULT="<action>:<point>:<stage>:<step>"
# acts when the trainer reaches that point. Points: `step` (before step <step>'s update, the previous step's still
# running), `save` (the async write of checkpoint <step> started, not finished), `eval` (an evaluation at <step>
# computed, nothing of it written), `stage` (stage <stage> of <step> steps finished, the next one not started).
# Actions: `kill` (SIGKILL: a preemption at a known moment); `nan` (point `step` only: the parameters turn NaN
# before step <step>'s update, so its loss is NaN). Unset: nothing happens.
_FAULT = os.environ.get("OMNIRIS_FAULT", "")


def _fault_point(point: str, stage: str, step: int, state: steps.TrainState | None = None) -> Any:
  """`state`, NaN-poisoned when OMNIRIS_FAULT says `nan` here; the process killed when it says `kill` here."""
  action, _, where = _FAULT.partition(":")
  if where != f"{point}:{stage}:{step}":
    return state
  if action == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
  return state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))


# ===============================================================================================================
# Building blocks (small and importable: Colab, tests and tools use them too)
# ===============================================================================================================


def init_params(model: nn.Module, config: Any, rng: jax.Array) -> Any:
  """Fresh parameters of `model` for `config`'s inputs, boxed with their logical axes."""
  return model.init(rng, **factory.dummy_inputs(config))["params"]


def create_train_state(model: nn.Module, tx: Any, config: Any, rng: jax.Array) -> steps.TrainState:
  """The initial train state (boxed parameters: call under `jax.eval_shape` or `jax.jit` with shardings)."""
  params = init_params(model, config, rng)
  return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def pick_train_step(batch: Mapping[str, Any], full_step: Callable, text_step: Callable | None) -> Callable:
  """The compiled step for this batch: the text-only one for a text batch of a stream mixed by whole batches.

  Read from the host batch alone (`source`, the same on every process at a step): no collective.
  """
  if text_step is not None and "source" in batch and int(np.asarray(batch["source"])[0]) == TEXT_SOURCE:
    return text_step
  return full_step


@dataclasses.dataclass(frozen=True)
class TrainedStage:
  """A trained stage loaded for tools that evaluate or probe it (`load_trained_stage`)."""

  config: Any  # the stage's config
  mesh: jax.sharding.Mesh
  rules: Any  # logical-axis rules
  model: nn.Module
  params: Any  # laid out as the trainer lays them out
  shardings: Any  # of params
  checkpoint_dir: str
  step: int  # of the checkpoint loaded


def load_trained_stage(config: Any, workdir: str, stage: str | None = None, log: Callable = print) -> TrainedStage:
  """The newest checkpoint of WORKDIR/<stage>/checkpoints (stage: the config's by default) with its model, mesh
  and shardings; parameters the checkpoint lacks are freshly initialised (and listed)."""
  stage = stage or config.stage
  if stage != config.stage:
    config = stage_config(config, stage)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.make_rules(config.sharding.rules)
  checkpoint_dir = os.path.join(workdir, stage, "checkpoints")
  model = factory.make_model(config)
  init = functools.partial(init_params, model, config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract_boxed = jax.eval_shape(init, jax.random.PRNGKey(config.seed))
  shardings = sharding.state_shardings(abstract_boxed, mesh, rules)
  shapes_tree = sharding.plain(abstract_boxed)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes_tree, shardings)
  fresh = lambda: jax.jit(lambda rng: nn.unbox(init(rng)), out_shardings=shardings)(  # noqa: E731
      jax.random.PRNGKey(config.seed))
  params = checkpointing.load_params_from(checkpoint_dir, abstract, fresh, log=log)
  step = int(os.path.basename(checkpointing.latest_step_directory(checkpoint_dir)))
  return TrainedStage(config, mesh, rules, model, params, shardings, checkpoint_dir, step)


class _PendingMetrics:
  """Step metrics left on the device between host syncs, checked for NaN/inf when fetched."""

  def __init__(self, stage: str):
    self.stage, self.items = stage, []

  def add(self, step: int, step_metrics: Any, indices: np.ndarray) -> None:
    self.items.append((step, step_metrics, indices))

  def fetch(self, manager: Any, last_checkpoint: str) -> dict[str, float] | None:
    """The last step's metrics as floats; at the first non-finite step, waits for `manager`'s pending save and
    raises NonFiniteError."""
    last = None
    for step, step_metrics, indices in self.items:
      values = jax.device_get(step_metrics)
      if int(values["nonfinite"]):
        manager.wait_until_finished()
        raise NonFiniteError(
            f"Stage {self.stage!r}: non-finite loss or gradient at step {step} (loss={float(values['loss'])}, "
            f"grad_norm={float(values['grad_norm'])}); the batch's record indices (`index`, in their source) "
            f"were {indices.tolist()}. The update was not applied. Last good checkpoint: {last_checkpoint}.")
      last = {key: float(value) for key, value in values.items()}
    self.items.clear()
    return last


def evaluate(evaluator: referring.Evaluator, writer: summaries.SummaryWriter, params: Any, step: int, *,
             mesh: jax.sharding.Mesh, rules: Any, log: Callable = print) -> dict[str, Any]:
  """Runs `evaluator` on `params`, prints its table and writes its scalars; returns the results."""
  start = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    results = evaluator.run(params, step)
  _fault_point("eval", evaluator.config.stage, step)
  table = evaluator.report(results, step)
  log(f"\n[{evaluator.config.stage}] evaluation at step {step} ({time.perf_counter() - start:.0f} s):\n{table}\n",
      flush=True)
  writer.scalars(step, {f"eval/{split}/{name}": value for split, result in results.items()
                        for name, value in result["overall"].items()
                        if name in ("cIoU", "gIoU", "N_acc", "T_acc") and not math.isnan(value)})
  writer.flush()
  return results


# ===============================================================================================================
# One stage
# ===============================================================================================================


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
  """Trains one stage (resuming if its checkpoints exist), evaluates it, and returns the final results."""
  stage_dir = os.path.join(workdir, config.stage)
  is_chief = jax.process_index() == 0
  log = print if is_chief else (lambda *args, **kwargs: None)
  os.makedirs(stage_dir, exist_ok=True)
  results_path = os.path.join(stage_dir, "results.json")
  if is_chief:  # what the predictor rebuilds the model from (predict.Predictor.from_workdir)
    with open(os.path.join(stage_dir, "config.json"), "w") as file:
      file.write(config.to_json_best_effort(indent=1))

  # ----------------------------------------------------------------------------------------------------------
  # Mesh
  # ----------------------------------------------------------------------------------------------------------
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.make_rules(config.sharding.rules)
  local_batch = sharding.check_batch_size(config.input.batch_size, mesh)
  log(f"\n=== Stage {config.stage!r}: {config.total_steps} steps, batch {config.input.batch_size} "
      f"({local_batch} per process), mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} "
      "device(s) ===", flush=True)

  # ----------------------------------------------------------------------------------------------------------
  # Input pipeline
  # ----------------------------------------------------------------------------------------------------------
  train_iter = sources.make_train_iterator(config, local_batch)

  # ----------------------------------------------------------------------------------------------------------
  # Model and optimizer
  # ----------------------------------------------------------------------------------------------------------
  model = factory.make_model(config)
  tx, learning_rate_fn = optim.make_optimizer(config.optimizer, config.total_steps)
  prompts = tuple(config.prompts)

  # ----------------------------------------------------------------------------------------------------------
  # Shard and transfer: shapes and shardings first, then the state is created sharded
  # ----------------------------------------------------------------------------------------------------------
  init_rng = jax.random.PRNGKey(config.seed)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract_boxed = jax.eval_shape(functools.partial(create_train_state, model, tx, config), init_rng)
  state_shardings = sharding.state_shardings(abstract_boxed, mesh, rules)
  shapes = sharding.plain(abstract_boxed)
  abstract_state = checkpointing.abstract_state(state_shardings, shapes)
  log("Parameters: " + ", ".join(f"{k} {v:,}" for k, v in omnisegnet.parameter_counts(shapes.params).items())
      + f"\nSharding: {sharding.describe(state_shardings, shapes)}", flush=True)

  # ----------------------------------------------------------------------------------------------------------
  # Update step
  # ----------------------------------------------------------------------------------------------------------
  batch_sharding = sharding.batch_sharding(mesh)
  frozen = optim.frozen_mask(shapes.params, tuple(config.optimizer.schedule))

  def jit_train_step(step_prompts):
    return jax.jit(
        functools.partial(steps.train_step, model=model, tx=tx, loss_config=config.loss, seed=config.seed,
                          prompts=step_prompts, loss_fn=factory.loss_fn(config), frozen=frozen),
        in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None), donate_argnums=0)

  train_fn = jit_train_step(prompts)
  # A text batch of a stream mixed by whole batches gets the same loss and gradients from a step that skips the
  # reference image's backbone pass and the visual decode; it is compiled at its first such batch.
  text_train_fn = None
  if set(prompts) == {"text", "visual"} and config.train_data == "mixed" and config.mix_unit == "batch":
    text_train_fn = jit_train_step(("text",))
  eval_fn = jax.jit(functools.partial(steps.eval_step, model=model),
                    in_shardings=(state_shardings.params, batch_sharding))

  # ----------------------------------------------------------------------------------------------------------
  # Load checkpoint: resume > init_from (parameters) > scratch
  # ----------------------------------------------------------------------------------------------------------
  manager = checkpointing.make_manager(os.path.join(stage_dir, "checkpoints"),
                                       max_to_keep=config.keep_checkpoints,
                                       save_interval_steps=config.checkpoint_every,
                                       async_save=config.async_checkpointing)
  # Outside the mesh context: every sharding is explicit here (and the HF importer unboxes abstract values).
  state = checkpointing.restore_latest(manager, abstract_state, train_iter, log=log)
  if state is not None:
    state = state.replace(opt_state=optim.with_total_steps(state.opt_state, config.total_steps))
  else:
    state = _initial_state(config, workdir, model, tx, state_shardings, abstract_state, init_rng, log)
  start_step = int(jax.device_get(state.step))
  last_checkpoint = (os.path.join(manager.directory, str(manager.latest_step()))
                     if manager.latest_step() is not None else "none (the stage's initial state)")

  if start_step >= config.total_steps and os.path.exists(results_path):
    log(f"Stage {config.stage!r} already finished (step {start_step}); its results are in {stage_dir}.")
    manager.close()
    with open(results_path) as file:
      return json.load(file)["model"]

  # ----------------------------------------------------------------------------------------------------------
  # Evals
  # ----------------------------------------------------------------------------------------------------------
  evaluator = referring.Evaluator(config, mesh, eval_fn, stage_dir, workdir)
  writer = summaries.SummaryWriter(os.path.join(stage_dir, "tensorboard"), enabled=is_chief)
  run_eval = functools.partial(evaluate, evaluator, writer, mesh=mesh, rules=rules, log=log)

  # ----------------------------------------------------------------------------------------------------------
  # Train loop
  # ----------------------------------------------------------------------------------------------------------
  log(f"Training from step {start_step}.", flush=True)
  pending = _PendingMetrics(config.stage)
  timer, loop_start = progress.StepTimer(start_step, config.total_steps), time.perf_counter()

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step = start_step
    while step < config.total_steps:
      batch = next(train_iter)
      step_fn = pick_train_step(batch, train_fn, text_train_fn)
      state = _fault_point("step", config.stage, step + 1, state)
      state, step_metrics = step_fn(state, sharding.global_batch(batch, mesh))
      step += 1
      pending.add(step, step_metrics, np.asarray(batch["index"]))
      if step % config.log_every == 0 or step == config.total_steps or step == start_step + 1:
        values = pending.fetch(manager, last_checkpoint)
        # On the host: the schedule's numbers stay out of the compiled step (optim.scale_by_stage_schedule).
        values["learning_rate"] = float(learning_rate_fn(step - 1))
        writer.scalars(step, {f"train/{key}": value for key, value in values.items() if key != "nonfinite"})
        rate, eta = timer.tick(step)
        log(f"[{config.stage}] step {step}/{config.total_steps}  loss {values['loss']:.4f}  "
            + "".join(f"  {k} {values[k]:.3g}" for k in PROGRESS_KEYS if k in values)
            + f"  {rate:.2f} steps/s  ETA {'--' if eta is None else progress.format_duration(eta)}", flush=True)
      if step % config.checkpoint_every == 0 or step == config.total_steps:
        pending.fetch(manager, last_checkpoint)
        if checkpointing.save(manager, state, train_iter, force=step == config.total_steps):
          last_checkpoint = os.path.join(manager.directory, str(step))
          _fault_point("save", config.stage, step)
      if manager.reached_preemption(step):
        pending.fetch(manager, last_checkpoint)
        checkpointing.save(manager, state, train_iter, force=True)
        manager.wait_until_finished()
        log(f"Preempted at step {step}: saved {os.path.join(manager.directory, str(step))}; exiting.")
        raise SystemExit(0)
      if config.eval_every and step % config.eval_every == 0 and step != config.total_steps:
        run_eval(state.params, step)
        timer.restart(step)  # the evaluation's time is not training time
  manager.wait_until_finished()
  log(f"[{config.stage}] trained {config.total_steps - start_step} steps in "
      f"{progress.format_duration(time.perf_counter() - loop_start)}.", flush=True)

  final_step = int(jax.device_get(state.step))
  results = run_eval(state.params, final_step)
  if is_chief:
    referring.write_results(stage_dir, evaluator.report(results, final_step), results, evaluator.baseline(),
                            final_step, config)
    summaries.plot_learning_curves({config.stage: writer.csv_path},
                                   os.path.join(stage_dir, "learning_curves.png"))
    log(f"Wrote {os.path.join(stage_dir, 'results.md')} and results.json.", flush=True)
  writer.close()
  manager.close()
  return results


def _initial_state(config: Any, workdir: str, model: nn.Module, tx: Any, state_shardings: Any,
                   abstract_state: Any, rng: jax.Array, log: Callable) -> steps.TrainState:
  """A stage's first state: parameters from `init_from` (fresh ones only where it lacks some), else fresh (with
  the pretrained text encoder)."""
  fresh = lambda: jax.jit(lambda rng: nn.unbox(init_params(model, config, rng)),  # noqa: E731
                          out_shardings=state_shardings.params)(rng)
  if config.init_from:
    init_dir = checkpointing.init_directory(config.init_from, workdir)
    params = checkpointing.load_params_from(init_dir, abstract_state.params, fresh, log=log)
  else:
    params = fresh()
    path = factory.text_encoder_checkpoint(config)
    if path:
      params = jax.device_put(omnisegnet.load_pretrained_text_encoder(params, path), state_shardings.params)
      log(f"Text encoder initialised from {path}.")
  opt_state = jax.jit(tx.init, out_shardings=state_shardings.opt_state)(params)
  return steps.TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), state_shardings.step), params=params,
                          opt_state=opt_state)


# The fields a stage file sets for itself; every other field of a stage run by `run_stages` comes from the config
# given on the command line, so one override (`--config.input.batch_size=8`) applies to every stage.
STAGE_FIELDS = ("stage", "init_from", "train_data", "mix_ratio", "prompts", "total_steps", "run_before")
# ... and the `optimizer` fields it sets for itself: what is frozen, and the peak learning rate.
STAGE_OPTIMIZER_FIELDS = ("schedule", "learning_rate")


def stage_config(config: Any, name: str) -> Any:
  """`config.stage_configs[name]` with every shared field (all but STAGE_FIELDS and STAGE_OPTIMIZER_FIELDS)
  taken from `config`."""
  stage = config.stage_configs[name]
  merged = config.copy_and_resolve_references()
  with merged.unlocked():
    del merged["stage_configs"]
    for field in STAGE_FIELDS:
      merged[field] = stage[field]
    for field in STAGE_OPTIMIZER_FIELDS:
      merged.optimizer[field] = stage.optimizer[field]
  return merged


def run_stages(config: Any, workdir: str) -> dict[str, Any]:
  """Runs `config.run_before` stages (from `config.stage_configs`) in order, then `config`'s own stage.

  The earlier stages take every shared field from `config` (see `stage_config`)."""
  results = {}
  for name in config.get("run_before", ()):
    results[name] = train_and_evaluate(stage_config(config, name), workdir)
    _fault_point("stage", name, config.stage_configs[name].total_steps)
  results[config.stage] = train_and_evaluate(config, workdir)
  if jax.process_index() == 0 and len(results) > 1:
    csvs = {name: os.path.join(workdir, name, "tensorboard", "metrics.csv") for name in results}
    summaries.plot_learning_curves(csvs, os.path.join(workdir, "learning_curves.png"), summaries.DEFAULT_TAGS)
    print(f"Wrote {os.path.join(workdir, 'learning_curves.png')} (the key scalars of all stages; each stage's own "
          "learning_curves.png has all of its scalars).", flush=True)
  return results
