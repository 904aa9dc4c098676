"""Builds a dataset config of this package into a TFDS data directory, without TensorFlow.

TFDS's own `tfds build` command imports TensorFlow (tensorflow-datasets 4.9.10), which this project does not
install; this command does the same job for our builders:

  python -m tfds_omniref.build --config shapes --data_dir ~/tensorflow_datasets [--preview /tmp/omni.png]
  python -m tfds_omniref.build --config rebuilt --data_dir DIR --manual_dir MANUAL --stats --workers 4
  python -m tfds_omniref.build --config ris/grefcoco --data_dir DIR --manual_dir MANUAL

`--config` is an `omniref` config name ('shapes', 'released', 'rebuilt', ...) or `<builder>/<config>` for any
builder this package registers (e.g. 'ris/refcocog'). The files are array_record (random access, no
TensorFlow). Besides TFDS's per-split bars, an overall line (examples done / total, examples/s, ETA) goes to
stderr every few seconds when the builder knows its split sizes (shapes, rebuilt); `--progress_file` also writes
it as JSON for launch/build_datasets.sh, which builds several configs in parallel processes. `--workers N` makes
the builders that support it (rebuilt) decode and encode examples in N forked processes. `--stats` prints the
paper's Fig. 4 statistics of what was built (images, prompts, single/multi/no-target per split and modality).
It prints the split sizes and the build time; building an already-built config is a quick no-op.
"""

from __future__ import annotations

import argparse
import collections.abc
import json
import os
import sys
import time
from typing import Any, Sequence

import tensorflow_datasets as tfds

import tfds_omniref  # noqa: F401  pylint: disable=unused-import  (registers every builder of the package)
from tfds_omniref.omniref import omniref_dataset_builder
from tfds_omniref.omniref import rebuilt as rebuilt_lib

# Builders of this package besides omniref (registered by `import tfds_omniref`); '<builder>/<config>' names of
# any other registered builder work too (see `_is_known`).
_OTHER_BUILDERS = ("ris",)
_IMAGE_FEATURES = ("image", "ref_image", "text_mask", "ref_mask", "ref_box", "ref_scribble", "visual_mask", "mask")


def _format_seconds(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
  """Counts examples over all splits of one build and reports done / total, rate and ETA.

  Split sizes come from the split iterables when they have a length (rebuilt.SplitExamples) or from
  `expected` (shapes); with no total the line still shows the count and the rate.
  """

  def __init__(self, name: str, *, interval_s: float = 5.0, progress_file: str | None = None, stream=None):
    self.name, self.interval_s, self.progress_file, self.stream = name, interval_s, progress_file, stream
    self.total: int | None = 0
    self.done = 0
    self.start = time.perf_counter()
    self._last = -float("inf")

  def add_split(self, size: int | None) -> None:
    self.total = None if size is None or self.total is None else self.total + size

  def line(self) -> str:
    elapsed = time.perf_counter() - self.start
    rate = self.done / elapsed if elapsed > 0 else 0.0
    if self.total:
      eta = _format_seconds((self.total - self.done) / rate) if rate > 0 else "?"
      return (f"[{self.name}] overall {self.done}/{self.total} examples ({100 * self.done / self.total:.1f}%), "
              f"{rate:.1f} examples/s, elapsed {_format_seconds(elapsed)}, ETA {eta}")
    return f"[{self.name}] overall {self.done} examples, {rate:.1f} examples/s, elapsed {_format_seconds(elapsed)}"

  def report(self, force: bool = False) -> None:
    now = time.perf_counter()
    if not force and now - self._last < self.interval_s:
      return
    self._last = now
    print(self.line(), file=self.stream or sys.stderr, flush=True)  # sys.stderr as of now (tests swap it)
    if self.progress_file:
      elapsed = now - self.start
      state = {"name": self.name, "done": self.done, "total": self.total, "elapsed_s": elapsed}
      tmp = self.progress_file + ".tmp"
      with open(tmp, "w") as f:
        json.dump(state, f)
      os.replace(tmp, self.progress_file)

  def wrap(self, examples):
    """Counts the examples of one split as TFDS draws them."""
    for item in examples:
      yield item
      self.done += 1
      self.report()


def _expected_sizes(builder) -> dict[str, int] | None:
  shapes = getattr(builder.builder_config, "shapes", None)
  return shapes.split_sizes() if shapes is not None else None


def _track(builder, progress: Progress) -> None:
  """Wraps the builder's split iterables so `progress` counts every example TFDS writes."""
  split_generators = builder._split_generators  # pylint: disable=protected-access
  expected = _expected_sizes(builder)

  def tracked(dl_manager):
    splits = split_generators(dl_manager)
    for split, examples in splits.items():
      if isinstance(examples, collections.abc.Sized):
        progress.add_split(len(examples))
      else:
        progress.add_split(expected.get(split) if expected else None)
    progress.report(force=True)
    return {split: progress.wrap(examples) for split, examples in splits.items()}

  builder._split_generators = tracked  # pylint: disable=protected-access


def resolve(name: str) -> tuple[str, str]:
  """('omniref', 'shapes') for 'shapes' or 'omniref/shapes'; ('ris', 'grefcoco') for 'ris/grefcoco'."""
  builder_name, _, config = name.rpartition("/")
  return builder_name or "omniref", config


def known_names() -> list[str]:
  """Every buildable name: plain omniref configs, then '<builder>/<config>' for the other builders."""
  names = [config.name for config in omniref_dataset_builder.Builder.BUILDER_CONFIGS]
  for builder_name in _OTHER_BUILDERS:
    try:
      cls = tfds.builder_cls(builder_name)
    except tfds.core.registered.DatasetNotFoundError:
      continue
    names += [f"{builder_name}/{config.name}" for config in cls.BUILDER_CONFIGS]
  return names


def _is_known(name: str, known: Sequence[str]) -> bool:
  """Whether `name` is in `known`, or names a config of some other registered builder ('<builder>/<config>')."""
  builder_name, config_name = resolve(name)
  if name in known or f"{builder_name}/{config_name}" in known or (builder_name == "omniref" and config_name in known):
    return True
  try:
    cls = tfds.builder_cls(builder_name)
  except tfds.core.registered.DatasetNotFoundError:
    return False
  return config_name in [config.name for config in getattr(cls, "BUILDER_CONFIGS", [])]


def built_statistics(builder) -> dict[str, dict[str, Any]]:
  """Fig. 4 statistics of a built dataset, read back from its files (images are not decoded)."""
  from omniris_jax.data import prepare  # pylint: disable=g-import-not-at-top

  decoders = {key: tfds.decode.SkipDecoding() for key in _IMAGE_FEATURES}
  stats = {}
  for split in builder.info.splits:
    source = builder.as_data_source(split=split, decoders=decoders)
    records = [source[i] for i in range(len(source))]
    stats[split] = prepare.split_statistics(records)
    stats[split]["images"] = len({int(r["image_id"]) for r in records})
    stats[split]["reference_images"] = len({int(r["ref_image_id"]) for r in records} - {-1})
  return stats


def format_built_statistics(name: str, stats: dict[str, dict[str, Any]]) -> str:
  """The statistics as markdown: images per split, then prompts per modality / target kind / prompt type."""
  from omniris_jax.data import prepare  # pylint: disable=g-import-not-at-top

  lines = [f"Statistics of {name} (paper Fig. 4):", "", "| split | target images | reference images | prompts |",
           "|---|---:|---:|---:|"]
  for split, row in stats.items():
    lines.append(f"| {split} | {row['images']} | {row['reference_images']} | {row['examples']} |")
  lines.append(f"| all | {sum(r['images'] for r in stats.values())} | "
               f"{sum(r['reference_images'] for r in stats.values())} | {sum(r['examples'] for r in stats.values())} |")
  lines += ["", prepare.format_statistics(stats)]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  """Command line entry point (see the module docstring)."""
  parser = argparse.ArgumentParser(description="Build a dataset config (array_record, no TensorFlow).")
  parser.add_argument("--config", default="shapes",
                      help="omniref config name (shapes, released, rebuilt, ...) or <builder>/<config>")
  parser.add_argument("--data_dir", default=os.path.join("~", "tensorflow_datasets"), help="TFDS data directory")
  parser.add_argument("--manual_dir", default=None,
                      help="folder with the manually downloaded files (default <data_dir>/downloads/manual)")
  parser.add_argument("--workers", type=int, default=None,
                      help=("processes that generate examples where the builder supports it (sets "
                            f"${rebuilt_lib.WORKERS_ENV})"))
  parser.add_argument("--stats", action="store_true", help="print the Fig. 4 statistics of the built dataset")
  parser.add_argument("--progress_file", default=None, help="also write the overall progress as JSON here")
  parser.add_argument("--progress_interval", type=float, default=5.0, help="seconds between progress lines")
  parser.add_argument("--preview", default=None, help="optional PNG path: draw the first omni_test examples")
  args = parser.parse_args(argv)

  known = known_names()
  builder_name, config_name = resolve(args.config)
  full_name = f"{builder_name}/{config_name}"
  if not _is_known(args.config, known):
    parser.error(f"argument --config: unknown {args.config!r}; choose from {known}")
  if args.workers is not None:
    if args.workers < 1:
      parser.error(f"argument --workers: {args.workers} must be at least 1")
    os.environ[rebuilt_lib.WORKERS_ENV] = str(args.workers)

  data_dir = os.path.expanduser(args.data_dir)
  manual_dir = os.path.expanduser(args.manual_dir) if args.manual_dir else None
  if builder_name == "omniref":
    builder = omniref_dataset_builder.Builder(config=config_name, data_dir=data_dir, file_format="array_record")
  else:
    builder = tfds.builder(full_name, data_dir=data_dir, file_format="array_record")
  progress = Progress(full_name, interval_s=args.progress_interval, progress_file=args.progress_file)
  _track(builder, progress)
  start = time.perf_counter()
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False,
                                                                           manual_dir=manual_dir))
  seconds = time.perf_counter() - start
  if progress.done:
    progress.report(force=True)
  sizes = {name: split.num_examples for name, split in builder.info.splits.items()}
  label = args.config if builder_name == "omniref" and "/" not in args.config else full_name
  print(f"{'omniref/' if label == config_name else ''}{label} in {builder.data_dir}: {sizes} ({seconds:.1f} s)")
  if args.stats:
    print(format_built_statistics(full_name, built_statistics(builder)))
  if args.preview:
    from omniris_jax.data import visualize  # pylint: disable=g-import-not-at-top  (matplotlib only here)

    split = "omni_test" if "omni_test" in sizes else next(iter(sizes))
    source = builder.as_data_source(split=split)
    visualize.render_preview([source[i] for i in range(min(9, len(source)))], args.preview,
                             title=f"{full_name} {split}")
    print(f"wrote {args.preview}")


if __name__ == "__main__":
  main()
