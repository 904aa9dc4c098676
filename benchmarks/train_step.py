"""Seconds per optimiser step of the demo recipe, per stage, with and without differentiating frozen parameters.

The demo freezes its pretrained MiniLM (22.6 M of its 26.4 M parameters). `steps.train_step` differentiates only
the trainable leaves when it is given the frozen mask (as `train.py` does); `--compare_all_leaves` also times the
formulation that differentiates every leaf and lets the optimiser zero the frozen updates, so the saving is
measured on the same machine in the same minute. It also gives a figure to compare machines and days by: the
demo's wall time is almost all optimiser steps.

  python benchmarks/train_step.py [--variant=demo_long] [--stages=alignment,visual,joint] [--steps=20]
      [--compare_all_leaves]

Timed: `--steps` steps after one warm-up (the compile) of each step kind, on batches drawn from the real pipeline
beforehand, so the figure excludes input time (the pipeline's own throughput is benchmarks/input_pipeline.py).
Each batch takes the step the trainer gives it: with `mix_unit='batch'` (both demos), joint's text batches take
the text-only step.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from configs import joint  # noqa: E402
from omniris_jax import optim, steps, train  # noqa: E402
from omniris_jax.data import sources  # noqa: E402
from omniris_jax.models import factory  # noqa: E402

_STAGES = flags.DEFINE_list("stages", ["alignment", "visual", "joint"], "stages of configs/joint.py:<variant> to time.")
_VARIANT = flags.DEFINE_enum("variant", "demo", ["demo", "demo_long"], "config variant of configs/joint.py.")
_STEPS = flags.DEFINE_integer("steps", 20, "timed steps per figure (after one warm-up step).")
_COMPARE = flags.DEFINE_bool("compare_all_leaves", False,
                             "also time the step that differentiates the frozen parameters too.")


def _device_batch(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """The numeric fields of a pipeline batch (strings such as the expression text stay on the host)."""
  return {k: jnp.asarray(v) for k, v in batch.items() if np.asarray(v).dtype.kind not in "OUS"}


def time_stage(stage: str, num_steps: int, differentiate_frozen: bool) -> float:
  """Mean seconds per step over `num_steps` steps (one compile + warm-up step excluded)."""
  config = joint.get_config(_VARIANT.value)  # Stage 3 itself; it holds the configs of the stages before it.
  config = config if stage == config.stage else train.stage_config(config, stage)
  model = factory.make_model(config)
  tx, _ = optim.make_optimizer(config.optimizer, config.total_steps)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), **factory.dummy_inputs(config))["params"])
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  frozen = None if differentiate_frozen else optim.frozen_mask(params, tuple(config.optimizer.schedule))
  jit_step = lambda prompts: jax.jit(functools.partial(  # noqa: E731
      steps.train_step, model=model, tx=tx, loss_config=config.loss, seed=config.seed, prompts=prompts,
      loss_fn=factory.loss_fn(config), frozen=frozen), donate_argnums=0)
  full_step = jit_step(tuple(config.prompts))
  text_step = jit_step(("text",)) if config.train_data == "mixed" and config.mix_unit == "batch" else None
  # The trainer's choice: a text batch of a stream mixed by whole batches takes the text-only step.
  pick = lambda batch: train.pick_train_step(batch, full_step, text_step)  # noqa: E731
  iterator = sources.make_train_iterator(config, config.input.batch_size)
  batches = [next(iterator) for _ in range(num_steps)]
  step_fns = [pick(batch) for batch in batches]
  batches = [_device_batch(batch) for batch in batches]
  for step_fn in {id(f): f for f in step_fns}.values():  # compile and warm up each step kind once
    state, metrics = step_fn(state, batches[step_fns.index(step_fn)])
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for step_fn, batch in zip(step_fns, batches):
    state, metrics = step_fn(state, batch)
  jax.block_until_ready(metrics)
  return (time.perf_counter() - start) / num_steps


def main(argv):
  del argv
  print(f"# {platform.node()} ({os.cpu_count()} CPUs), jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, configs/joint.py:{_VARIANT.value}, {_STEPS.value} timed steps")
  print("| stage | ms/step (frozen leaves skipped) |" + (" ms/step (all leaves differentiated) | saving |"
                                                         if _COMPARE.value else ""))
  print("|---|---:|" + ("---:|---:|" if _COMPARE.value else ""))
  for stage in _STAGES.value:
    skipped = time_stage(stage, _STEPS.value, differentiate_frozen=False)
    row = f"| {stage} | {skipped * 1e3:.0f} |"
    if _COMPARE.value:
      everything = time_stage(stage, _STEPS.value, differentiate_frozen=True)
      row += f" {everything * 1e3:.0f} | {100 * (1 - skipped / everything):.0f}% |"
    print(row, flush=True)


if __name__ == "__main__":
  app.run(main)
