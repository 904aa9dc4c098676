"""The main job: `python -m omniris_jax.main --config=configs/joint.py:demo --workdir=DIR`.

Deliberately thin (the flax examples' rule): the work lives in library modules that can be imported, tested and
used from Colab. The job
  1. initialises multi-host JAX when asked (`--multihost`: TPU pods, SLURM GPU clusters),
  2. makes sure the data exists (the synthetic set is built on first use; a missing real dataset fails at once,
     naming it and the command that builds it), prints its statistics and writes `WORKDIR/preview.png`,
  3. trains and evaluates: the config's stage, preceded by `config.run_before` stages (the demo runs all three),
     see omniris_jax/train.py for what lands in the workdir.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/joint.py:demo.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, results, event files and previews go.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() before anything else "
                               "(one process per host; coordinator from the environment).")
_CHECK_PIPELINE = flags.DEFINE_bool("check_pipeline", False, "Also draw and time a few training batches.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache_dir", "~/.cache/omniris_jax/jax_compilation_cache",
    "JAX's persistent compilation cache: a later stage or run whose step compiles to the same program loads it "
    "instead of compiling (the demo's joint stage reuses its visual stage's step, every evaluation after the "
    "first reuses the first's). '' turns it off; JAX_COMPILATION_CACHE_DIR, when set, is used instead.")
_COMPILATION_CACHE_MAX_MB = flags.DEFINE_integer(
    "compilation_cache_max_mb", 1024,
    "Size cap of that cache in MiB; JAX evicts the least recently used programs beyond it (a demo_long run writes "
    "about 9 MiB). -1: no cap; JAX_COMPILATION_CACHE_MAX_SIZE (bytes), when set, is used instead.")
flags.mark_flags_as_required(["config", "workdir"])


def _dataset_names(config) -> list[str]:
  names = [config.dataset.test_name]
  for source in (config.dataset.text_source, config.dataset.visual_source):
    if source.name not in names:
      names.append(source.name)
  return names


def prepare_data(config, workdir: str, *, time_pipeline: bool = True) -> None:
  """Builds (if synthetic) or checks every dataset the config reads, prints the statistics of the main one,
  writes a preview of test examples, and (optionally) draws and times training batches."""
  import time  # pylint: disable=g-import-not-at-top

  from omniris_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from omniris_jax.data import prepare  # pylint: disable=g-import-not-at-top
  from omniris_jax.data import visualize  # pylint: disable=g-import-not-at-top

  data_dir = config.dataset.data_dir
  for dataset_name in _dataset_names(config):  # fail fast, before any compile, naming what is missing
    prepare.ensure_built(dataset_name, data_dir)
  name = config.dataset.name
  splits = (config.dataset.train_split, *config.dataset.test_splits)
  statistics = {split: prepare.split_statistics(prepare.open_split(name, split, data_dir, decode_images=False))
                for split in splits}
  print(f"\n{name}: examples per split\n{prepare.format_statistics(statistics)}\n", flush=True)

  examples = []
  for split in config.dataset.test_splits:
    indices = prepare.one_per_target_kind(prepare.open_split(name, split, data_dir, decode_images=False))
    source = prepare.open_split(name, split, data_dir)
    examples += [source[i] for i in indices]
  os.makedirs(workdir, exist_ok=True)
  preview_path = os.path.join(workdir, "preview.png")
  visualize.render_preview(examples, preview_path, title=f"{name}: test examples (ground truth and prompts)")
  print(f"Wrote {preview_path}", flush=True)
  if not time_pipeline:
    return

  dataset = pipeline.make_dataset(
      pipeline.from_tfds(name, config.dataset.train_split, data_dir), resolution=config.input.resolution,
      batch_size=config.input.batch_size, max_text_len=config.input.max_text_len, seed=config.seed,
      prompt_types=config.input.prompt_types, regenerate_prompts=config.input.regenerate_prompts,
      worker_count=config.input.worker_count)
  iterator = iter(dataset)
  batch = next(iterator)
  print("One training batch:\n" + "\n".join(f"  {k:20s} {v.dtype!s:8s} {v.shape}" for k, v in batch.items()))
  num_batches, start = 10, time.perf_counter()
  for _ in range(num_batches):
    next(iterator)
  rate = num_batches * config.input.batch_size / (time.perf_counter() - start)
  print(f"Input pipeline: {rate:.0f} examples/s at {config.input.resolution}x{config.input.resolution} "
        f"(worker_count={config.input.worker_count}).", flush=True)


def configure_compilation_cache(directory: str, max_mb: int) -> None:
  """Turns on JAX's persistent compilation cache in `directory` ('' = off), capped at `max_mb` MiB (-1 = no cap).

  JAX's own settings win: a JAX_COMPILATION_CACHE_DIR or JAX_COMPILATION_CACHE_MAX_SIZE in the environment (or an
  earlier `jax.config.update`) is left as it is.
  """
  import jax  # pylint: disable=g-import-not-at-top

  if not directory or jax.config.jax_compilation_cache_dir:
    return
  jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
  if max_mb >= 0 and "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
    jax.config.update("jax_compilation_cache_max_size", max_mb * 2**20)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO; keep the progress lines readable
    logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=g-import-not-at-top

  configure_compilation_cache(_COMPILATION_CACHE.value, _COMPILATION_CACHE_MAX_MB.value)
  if _MULTIHOST.value:
    jax.distributed.initialize()
  from omniris_jax import train  # pylint: disable=g-import-not-at-top

  config, workdir = _CONFIG.value, _WORKDIR.value
  if jax.process_index() == 0:
    prepare_data(config, workdir, time_pipeline=_CHECK_PIPELINE.value)
  else:
    from omniris_jax.data import prepare  # pylint: disable=g-import-not-at-top
    for dataset_name in _dataset_names(config):
      prepare.ensure_built(dataset_name, config.dataset.data_dir)
  train.run_stages(config, workdir)


if __name__ == "__main__":
  app.run(main)
