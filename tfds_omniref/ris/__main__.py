"""Builds a `ris` config into a TFDS data directory without TensorFlow (TFDS's `tfds build` imports it):

  python -m tfds_omniref.ris --config grefcoco --manual_dir ~/ris_data --data_dir ~/tensorflow_datasets

It prints the split sizes and the build time; building an already-built config is a quick no-op. The manual
directory layout is in ris_dataset_builder.MANUAL_DOWNLOAD_INSTRUCTIONS (`--help` prints it).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Sequence

from tfds_omniref.ris import ris_dataset_builder


def main(argv: Sequence[str] | None = None) -> None:
  """Command line entry point (see the module docstring)."""
  known = [config.name for config in ris_dataset_builder.Builder.BUILDER_CONFIGS]
  parser = argparse.ArgumentParser(
      description="Build a RIS benchmark config (array_record, no TensorFlow).",
      epilog=ris_dataset_builder.MANUAL_DOWNLOAD_INSTRUCTIONS, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, choices=known, help="benchmark to build")
  parser.add_argument("--manual_dir", default=None, help="folder with the downloaded files (layout below)")
  parser.add_argument("--data_dir", default=os.path.join("~", "tensorflow_datasets"), help="TFDS data directory")
  args = parser.parse_args(argv)

  manual_dir = os.path.expanduser(args.manual_dir) if args.manual_dir else None
  start = time.perf_counter()
  builder = ris_dataset_builder.build(args.config, data_dir=os.path.expanduser(args.data_dir),
                                      manual_dir=manual_dir)
  seconds = time.perf_counter() - start
  sizes = {name: split.num_examples for name, split in builder.info.splits.items()}
  print(f"ris/{args.config} in {builder.data_dir}: {sizes} ({seconds:.1f} s)")


if __name__ == "__main__":
  main()
