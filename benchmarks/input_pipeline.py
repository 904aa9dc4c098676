"""Input-pipeline throughput: examples/s that one grain worker (one process) delivers, and where the time goes.

Whether the input pipeline can keep an accelerator busy is a question of examples per second per CPU worker:
a trainer needs `global batch x steps/s / examples-per-worker-per-s` worker processes in all. This script
measures that figure on the procedural `omniref/shapes` training split (128x128 scenes) with the full training
transforms: decode, random prompt type with box/scribble regenerated from the reference mask, resize,
tokenisation, and batching, at the paper's 480x480 and at the demo's 128x128.

  python benchmarks/input_pipeline.py [--data_dir=DIR] [--batches=20] [--batch_size=16] [--worker_counts=0,1,2]

Without --data_dir the dataset is built into a temporary directory first (about a minute for `shapes`).
Prints one line per (resolution, read threads) and a per-stage breakdown in milliseconds per example.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

from omniris_jax.data import pipeline
from omniris_jax.data import transforms

_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir holding omniref/shapes (built there if absent); "
                                "a temporary directory when unset.")
_CONFIG = flags.DEFINE_string("config", "shapes", "omniref config to read ('shapes' or 'shapes_tiny').")
_BATCHES = flags.DEFINE_integer("batches", 20, "timed batches per measurement (after 2 warm-up batches).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "examples per batch.")
_RESOLUTIONS = flags.DEFINE_list("resolutions", ["480", "128"], "square sizes S to measure.")
_THREADS = flags.DEFINE_list("read_threads", ["0", "2"], "grain read threads per process to measure "
                             "(0 = everything on the calling thread: the per-worker figure).")
_WORKER_COUNTS = flags.DEFINE_list("worker_counts", ["0"], "grain worker processes to measure; counts above 0 "
                                   "add the cost of shipping batches between processes (read_threads=0 there).")
_STAGE_EXAMPLES = flags.DEFINE_integer("stage_examples", 200, "examples for the per-stage breakdown.")


def _open_source(data_dir: str):
  from tfds_omniref import omniref  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  source = omniref.data_source(_CONFIG.value, "train", data_dir=data_dir)
  print(f"dataset omniref/{_CONFIG.value} train: {len(source)} records in {data_dir} "
        f"(opened/built in {time.perf_counter() - start:.1f} s)")
  return source


def _throughput(source, resolution: int, worker_count: int, read_threads: int) -> float:
  """Examples per second out of the training pipeline, after warm-up (tokenizer load, thread/worker start)."""
  dataset = pipeline.make_dataset(source, resolution=resolution, batch_size=_BATCH_SIZE.value, seed=0,
                                  shuffle=True, num_epochs=None, prompt_types=transforms.SPATIAL_PROMPT_TYPES,
                                  regenerate_prompts=True, worker_count=worker_count, read_threads=read_threads)
  iterator = iter(dataset)
  try:
    for _ in range(2 + worker_count):
      next(iterator)
    start = time.perf_counter()
    for _ in range(_BATCHES.value):
      next(iterator)
    return _BATCHES.value * _BATCH_SIZE.value / (time.perf_counter() - start)
  finally:
    iterator.close()


def _stage_breakdown(source, resolution: int) -> dict[str, float]:
  """Milliseconds per example spent in each transform, run one after another on the calling thread."""
  stages = [
      ("read+index", None),
      ("decode/validate", transforms.DecodeAndValidate()),
      ("prompt (regen)", transforms.SampleSpatialPrompt(transforms.SPATIAL_PROMPT_TYPES, regenerate=True)),
      ("resize", transforms.ResizeToResolution(resolution)),
      ("tokenize", transforms.Tokenize(20)),
      ("assemble", transforms.AssembleContract()),
  ]
  stages[4][1].tokenizer.encode("warm up", 20)
  totals = {name: 0.0 for name, _ in stages}
  rng = np.random.default_rng(0)
  attach = transforms.AttachIndex(len(source))
  count = min(_STAGE_EXAMPLES.value, len(source))
  for index in range(count):
    start = time.perf_counter()
    element = attach.map_with_index(index, source[index])
    totals["read+index"] += time.perf_counter() - start
    for name, transform in stages[1:]:
      start = time.perf_counter()
      if isinstance(transform, transforms.SampleSpatialPrompt):
        element = transform.random_map(element, rng)
      else:
        element = transform.map(element)
      totals[name] += time.perf_counter() - start
  return {name: 1000 * total / count for name, total in totals.items()}


def main(argv):
  del argv
  print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"python {platform.python_version()}; batch_size={_BATCH_SIZE.value}, timed batches={_BATCHES.value}")
  with tempfile.TemporaryDirectory() as temporary_dir:
    source = _open_source(_DATA_DIR.value or temporary_dir)
    for resolution in map(int, _RESOLUTIONS.value):
      for worker_count in map(int, _WORKER_COUNTS.value):
        for read_threads in map(int, _THREADS.value) if worker_count == 0 else (0,):
          rate = _throughput(source, resolution, worker_count, read_threads)
          print(f"S={resolution:4d}  worker_count={worker_count} read_threads={read_threads}: {rate:8.1f} "
                f"examples/s ({1000 / rate:6.2f} ms/example)", flush=True)
      breakdown = _stage_breakdown(source, resolution)
      print(f"S={resolution:4d}  per stage (ms/example, one thread): "
            + ", ".join(f"{name} {ms:.2f}" for name, ms in breakdown.items())
            + f"; total {sum(breakdown.values()):.2f}")


if __name__ == "__main__":
  app.run(main)
