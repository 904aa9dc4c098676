"""The main job: `python -m omniris_jax.main --config=configs/joint.py:demo --workdir=DIR`.

Deliberately thin: the work lives in library modules that can be imported and tested (and used from Colab).
Until the staged trainer lands, the job prepares the configured dataset (building the synthetic one on first use),
prints its statistics, writes `WORKDIR/preview.png`, and draws batches through the input pipeline.
"""

from __future__ import annotations

import os
import time

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/joint.py:demo.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where outputs (preview, later checkpoints and results) go.")
flags.mark_flags_as_required(["config", "workdir"])


def prepare_data(config, workdir: str) -> None:
  """Builds (if synthetic) and summarises the dataset, writes a preview, and times the input pipeline."""
  from omniris_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from omniris_jax.data import prepare  # pylint: disable=g-import-not-at-top
  from omniris_jax.data import visualize  # pylint: disable=g-import-not-at-top

  name, data_dir = config.dataset.name, config.dataset.data_dir
  prepare.ensure_built(name, data_dir)
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  prepare_data(_CONFIG.value, _WORKDIR.value)
  print("\nThe staged trainer is not part of this build yet; this job prepared and checked the data.")


if __name__ == "__main__":
  app.run(main)
