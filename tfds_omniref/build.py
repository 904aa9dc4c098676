"""Builds an `omniref` config into a TFDS data directory, without TensorFlow.

TFDS's own `tfds build` command imports TensorFlow (tensorflow-datasets 4.9.10), which this project does not
install; this command does the same job for our builder:

  python -m tfds_omniref.build --config shapes --data_dir ~/tensorflow_datasets [--preview /tmp/omni.png]

It prints the split sizes and the build time; building an already-built config is a quick no-op.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Sequence

import tensorflow_datasets as tfds

from tfds_omniref.omniref import omniref_dataset_builder


def main(argv: Sequence[str] | None = None) -> None:
  """Command line entry point (see the module docstring)."""
  known = [config.name for config in omniref_dataset_builder.Builder.BUILDER_CONFIGS]
  parser = argparse.ArgumentParser(description="Build an omniref config (array_record, no TensorFlow).")
  parser.add_argument("--config", default="shapes", choices=known, help="builder config to build")
  parser.add_argument("--data_dir", default=os.path.join("~", "tensorflow_datasets"), help="TFDS data directory")
  parser.add_argument("--preview", default=None, help="optional PNG path: draw the first omni_test examples")
  args = parser.parse_args(argv)

  data_dir = os.path.expanduser(args.data_dir)
  builder = omniref_dataset_builder.Builder(config=args.config, data_dir=data_dir, file_format="array_record")
  start = time.perf_counter()
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  seconds = time.perf_counter() - start
  sizes = {name: split.num_examples for name, split in builder.info.splits.items()}
  print(f"omniref/{args.config} in {builder.data_dir}: {sizes} ({seconds:.1f} s)")
  if args.preview:
    from omniris_jax.data import visualize  # pylint: disable=g-import-not-at-top  (matplotlib only here)

    source = builder.as_data_source(split="omni_test")
    visualize.render_preview([source[i] for i in range(min(9, len(source)))], args.preview,
                             title=f"omniref/{args.config} omni_test")
    print(f"wrote {args.preview}")


if __name__ == "__main__":
  main()
