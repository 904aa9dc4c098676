"""Getting a dataset ready to read: build the synthetic one on first use, explain how to build the real ones,
and summarise what a built dataset holds (the statistics of the paper's Fig. 4, per split).

The trainer calls `ensure_built` before it opens any split; `python -m omniris_jax.main` prints
`format_statistics(split_statistics(...))` and writes a preview grid of examples.
"""

from __future__ import annotations

import collections
import time
from typing import Any, Mapping, Sequence

from omniris_jax import metrics

# Builder configs that generate their data procedurally: safe to build without asking (seconds, no download).
SYNTHETIC_CONFIGS = ("omniref/shapes", "omniref/shapes_tiny")
_IMAGE_FEATURES = ("image", "ref_image", "text_mask", "ref_mask", "ref_box", "ref_scribble", "visual_mask", "mask")
_TARGET_KIND = {"one_vs_one": "single", "many_vs_one": "single", "one_vs_many": "multi", "many_vs_many": "multi",
                "no_target": "no_target"}


def build_command(name: str, data_dir: str | None = None) -> str:
  """The shell command that builds dataset `name` ('builder/config') into `data_dir`."""
  command = f"python -m tfds_omniref.build --config {name} --data_dir {data_dir or '~/tensorflow_datasets'}"
  if name not in SYNTHETIC_CONFIGS:
    command += " --manual_dir DIR_WITH_THE_DOWNLOADED_FILES"
  return command


def _builder(name: str, data_dir: str | None):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (heavy; only when touching TFDS)
  import tfds_omniref  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import  (registers our builders)

  try:
    return tfds.builder(name, data_dir=data_dir, file_format="array_record")
  except (tfds.core.registered.DatasetNotFoundError, ValueError) as error:
    raise ValueError(f"Unknown dataset {name!r} (config.dataset.name): {error}") from None


def ensure_built(name: str, data_dir: str | None = None) -> Any:
  """Returns the TFDS builder of `name`, building it first when it is synthetic and not yet built.

  Real datasets are never built implicitly (they need manual downloads and take hours): when one is missing this
  raises FileNotFoundError saying which one and how to build it.
  """
  builder = _builder(name, data_dir)
  if builder.is_prepared():
    return builder
  if name not in SYNTHETIC_CONFIGS:
    raise FileNotFoundError(
        f"Dataset {name!r} is not built in {builder.data_dir_root!s}. Real datasets are built once, from the "
        f"files you download (README, 'Datasets'), with `{build_command(name, str(builder.data_dir_root))}`; or "
        "train on the embedded synthetic data with --config=configs/joint.py:demo.")
  print(f"Building {name} into {builder.data_dir_root} (synthetic, no download) ...", flush=True)
  start = time.perf_counter()
  # TFDS writes into a temporary folder and renames it only when complete; never look for a prebuilt copy online.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  print(f"Built {name} in {time.perf_counter() - start:.0f} s.", flush=True)
  return builder


def open_split(name: str, split: str, data_dir: str | None = None, *, decode_images: bool = True) -> Any:
  """A built split as a random-access source; `decode_images=False` leaves images and masks as PNG bytes."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  decoders = None if decode_images else {k: tfds.decode.SkipDecoding() for k in _IMAGE_FEATURES}
  return tfds.data_source(name, split=split, data_dir=data_dir, decoders=decoders)


def split_statistics(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Counts per modality, target kind (single / multi / no-target), setting and default prompt type."""
  counts: dict[str, collections.Counter] = {k: collections.Counter() for k in ("modality", "target", "setting",
                                                                               "prompt_type")}
  for record in records:
    setting = metrics.SETTING_NAMES[int(record["setting"])]
    counts["modality"][metrics.MODALITY_NAMES[int(record["modality"])]] += 1
    counts["setting"][setting] += 1
    counts["target"][_TARGET_KIND[setting]] += 1
    counts["prompt_type"][metrics.PROMPT_TYPE_NAMES[int(record["prompt_type"])]] += 1
  return {"examples": len(records), **{key: dict(counter) for key, counter in counts.items()}}


def one_per_target_kind(records: Sequence[Mapping[str, Any]]) -> list[int]:
  """Indices of the first single-, multi- and no-target record (those present), to preview a split's variety."""
  first: dict[str, int] = {}
  for index in range(len(records)):
    first.setdefault(_TARGET_KIND[metrics.SETTING_NAMES[int(records[index]["setting"])]], index)
    if len(first) == 3:
      break
  return [first[kind] for kind in ("single", "multi", "no_target") if kind in first]


def format_statistics(statistics: Mapping[str, Mapping[str, Any]]) -> str:
  """A markdown table with one row per split (the paper's Fig. 4 numbers for what was built)."""
  columns = [("modality", metrics.MODALITY_NAMES), ("target", ("single", "multi", "no_target")),
             ("prompt_type", ("mask", "box", "scribble"))]
  header = ["split", "examples"] + [name for _, names in columns for name in names]
  lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
  for split, stats in statistics.items():
    cells = [split, str(stats["examples"])] + [str(stats[key].get(name, 0)) for key, names in columns
                                                for name in names]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)
