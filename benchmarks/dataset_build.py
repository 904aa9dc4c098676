"""Dataset build throughput: examples/s of `omniref/rebuilt`, and what a full OmniRef build would take.

The dummy_data fixture is repeated `--copies` times (`rebuilt.repeat_manual_dir`: renumbered ids, so the
construction has enough images to fill every split) and, with `--scale`, its images and annotations are
resized to COCO's typical 640x480 (the fixture photos are ~240x180; decoding and PNG encoding cost grows with
the pixels, so timing at the fixture's size would flatter the estimate). Then it times:

  1. planning (Steps I-IV on ids: reading the JSON/pickle sources and choosing every example), per image;
  2. generating + encoding examples (decode JPEG and masks, box and scribble, PNG-encode) in 1 and N processes
     (`rebuilt.encoded_examples(workers=...)`), examples/s;
  3. the whole TFDS build (`Builder.download_and_prepare`, array_record) with 1 and N workers, examples/s,
     which adds TFDS's own encoding, serialisation and writing in the main process;
  4. that writing alone: the same build fed with examples encoded beforehand (the main process's share, which
     bounds a build however many workers generate).

Each figure is the best of `--repeats` runs (the machine is shared; the best run is the least disturbed one)

and prints an estimate of the full OmniRef build (about 187k prompts on 31k target images, paper Sec. 4.1) on a
16-core machine from the measured per-example costs (assumptions printed with it).

  python benchmarks/dataset_build.py [--copies 36] [--scale 2.667] [--workers 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import shutil
import tempfile
import time

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
import tensorflow_datasets as tfds

from tfds_omniref.omniref import features as features_lib
from tfds_omniref.omniref import omniref_dataset_builder as builder_lib
from tfds_omniref.omniref import rebuilt

FIXTURE = os.path.join(os.path.dirname(builder_lib.__file__), "dummy_data")
# The paper's OmniRef (Sec. 4.1): prompts (examples) and target images.
FULL_EXAMPLES = 186_939
FULL_TARGET_IMAGES = 30_956
COCO_TRAIN_IMAGES = 82_783


def _rescale(manual_dir: str, scale: float) -> None:
  """Resizes every image and annotation of a repeated manual directory by `scale` (in place)."""
  path = os.path.join(manual_dir, rebuilt.COCO_INSTANCES)
  with open(path) as f:
    coco = json.load(f)
  sizes = {}
  for image in coco["images"]:
    old = (image["height"], image["width"])
    image["height"], image["width"] = round(old[0] * scale), round(old[1] * scale)
    sizes[image["id"]] = (old, (image["height"], image["width"]))
    file_path = os.path.join(manual_dir, rebuilt.IMAGE_DIR, image["file_name"])
    with Image.open(file_path) as pixels:
      resized = pixels.convert("RGB").resize((image["width"], image["height"]), Image.BILINEAR)
    buffer = io.BytesIO()
    resized.save(buffer, format="JPEG", quality=90)
    with open(file_path, "wb") as f:
      f.write(buffer.getvalue())
  for ann in coco["annotations"]:
    (old_h, old_w), (new_h, new_w) = sizes[ann["image_id"]]
    segmentation = ann["segmentation"]
    if isinstance(segmentation, list):
      ann["segmentation"] = [[v * scale for v in polygon] for polygon in segmentation]
    else:
      rle = (mask_utils.frPyObjects(segmentation, old_h, old_w) if isinstance(segmentation["counts"], list)
             else segmentation)
      mask = mask_utils.decode(rle)
      mask = np.asarray(Image.fromarray(mask).resize((new_w, new_h), Image.NEAREST))
      encoded = mask_utils.encode(np.asfortranarray(mask))
      ann["segmentation"] = {"size": [new_h, new_w], "counts": encoded["counts"].decode("ascii")}
    ann["bbox"] = [v * scale for v in ann["bbox"]]
    ann["area"] = ann["area"] * scale * scale
  with open(path, "w") as f:
    json.dump(coco, f)


def _timed(function) -> float:
  """CPU seconds of one call (this process)."""
  start = time.process_time()
  function()
  return time.process_time() - start


def _examples_per_s(sources, rows, workers: int) -> tuple[float, float]:
  """(examples per wall second, examples per CPU second of this process) of generate + encode."""
  start, start_cpu = time.perf_counter(), time.process_time()
  count = sum(1 for _ in rebuilt.encoded_examples(sources, rows, workers=workers))
  return count / (time.perf_counter() - start), count / (time.process_time() - start_cpu)


def _tfds_build(manual_dir: str, workers: int, cached=None) -> tuple[int, float, int, float]:
  """(examples, wall s, bytes written, main-process CPU s) of a build; `cached` pairs replace generation."""
  os.environ[rebuilt.WORKERS_ENV] = str(workers)
  real_encoded_examples = rebuilt.encoded_examples
  if cached is not None:
    by_key = dict(cached)
    rebuilt.encoded_examples = lambda sources, rows, config_name, **_: (
        (key, by_key[key]) for key in (f"{config_name}/{row.split}/{row.index:06d}" for row in rows))
  data_dir = tempfile.mkdtemp(prefix="omniref_bench_")
  try:
    builder = builder_lib.Builder(config="rebuilt", data_dir=data_dir, file_format="array_record")
    start, start_cpu = time.perf_counter(), time.process_time()
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False,
                                                                             manual_dir=manual_dir))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    size = sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(data_dir) for name in names)
    return sum(split.num_examples for split in builder.info.splits.values()), seconds, size, cpu_seconds
  finally:
    rebuilt.encoded_examples = real_encoded_examples
    os.environ.pop(rebuilt.WORKERS_ENV, None)
    shutil.rmtree(data_dir, ignore_errors=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--copies", type=int, default=36, help="repetitions of the fixture (8 images each)")
  parser.add_argument("--scale", type=float, default=640 / 240, help="image resize factor (1 = fixture size)")
  parser.add_argument("--workers", type=int, default=2, help="worker processes for the parallel measurement")
  parser.add_argument("--cores", type=int, default=16, help="cores of the machine the estimate is for")
  parser.add_argument("--repeats", type=int, default=3, help="runs per figure; the best is reported")
  args = parser.parse_args()

  print(f"# dataset_build benchmark, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
  manual_dir = tempfile.mkdtemp(prefix="omniref_manual_")
  try:
    counts = rebuilt.repeat_manual_dir(FIXTURE, manual_dir, args.copies)
    if args.scale != 1:
      _rescale(manual_dir, args.scale)
    start = time.process_time()
    sources = rebuilt.load(manual_dir)
    load_s = time.process_time() - start
    start = time.process_time()
    construction = rebuilt.plan(sources)
    plan_s = time.process_time() - start
    rows = [row for split in rebuilt.SPLITS for row in construction.examples[split]]
    sizes = [f"{sources.images[i]['width']}x{sources.images[i]['height']}" for i in list(sources.images)[:3]]
    print(f"input: fixture x {args.copies} = {counts['images']} images ({', '.join(sizes)}, ...), "
          f"{counts['annotations']} annotations, {counts['refs']} refs -> {len(rows)} examples "
          f"({ {s: len(r) for s, r in construction.examples.items()} })")
    per_image_ms = 1000 * (load_s + plan_s) / counts["images"]
    print(f"read + validate sources {load_s:.2f} CPU s, plan (Steps I-IV on ids) {plan_s:.3f} CPU s: "
          f"{per_image_ms:.2f} ms per COCO image")

    first = sources.images[min(sources.images)]
    pixels = np.asarray(Image.open(os.path.join(manual_dir, rebuilt.IMAGE_DIR, first["file_name"])).convert("RGB"))
    png_s = min(_timed(lambda: features_lib.encode_png(pixels)) for _ in range(5 * args.repeats))  # CPU s
    print(f"one RGB PNG ({pixels.shape[1]}x{pixels.shape[0]}): {1000 * png_s:.1f} ms")
    cache_size = rebuilt._PNG_CACHE_SIZE  # pylint: disable=protected-access
    rebuilt._PNG_CACHE_SIZE = 0  # pylint: disable=protected-access
    uncached_wall, uncached = max(_examples_per_s(sources, rows, 1) for _ in range(args.repeats))
    rebuilt._PNG_CACHE_SIZE = cache_size  # pylint: disable=protected-access
    print(f"generate + encode, 1 process, no PNG cache: {uncached_wall:.1f} examples/s wall, "
          f"{uncached:.1f} per CPU second")
    rates = {}
    for workers in sorted({1, args.workers}):
      rates[workers], cpu_rate = max(_examples_per_s(sources, rows, workers) for _ in range(args.repeats))
      cpu = f", {cpu_rate:.1f} per CPU second" if workers == 1 else ""
      print(f"generate + encode, {workers} process(es): {rates[workers]:.1f} examples/s wall{cpu}")
    builds = {}
    for workers in sorted({1, args.workers}):
      total, seconds, size, _ = min((_tfds_build(manual_dir, workers) for _ in range(args.repeats)),
                                 key=lambda r: r[1])
      builds[workers] = total / seconds
      print(f"TFDS build (array_record), {workers} worker(s): {total} examples in {seconds:.2f} s = "
            f"{builds[workers]:.1f} examples/s")
    cached = list(rebuilt.encoded_examples(sources, rows, workers=1))
    total, seconds, _, cpu_seconds = min((_tfds_build(manual_dir, 1, cached) for _ in range(args.repeats)),
                                         key=lambda r: r[3])
    write_rate = total / cpu_seconds
    print(f"TFDS writing alone (examples encoded beforehand): {total} examples in {seconds:.2f} s wall, "
          f"{cpu_seconds:.2f} CPU s = {write_rate:.1f} examples per CPU second")

    # Estimate from CPU time (wall time on this shared machine moves 1.5x between runs): the main process writes
    # (TFDS encode + serialise + write, measured alone); the other cores generate in parallel, each at the
    # single-process rate (no contention for memory bandwidth or disk assumed).
    # The fixture repeats few images, so its cache hit rate flatters; at full scale a target image recurs in
    # ~6 consecutive examples (PNG once per target) while reference images rarely repeat within the cache:
    # start from the uncached cost and take off the target PNGs saved.
    per_example_gen = 1.0 / uncached - png_s * (1 - FULL_TARGET_IMAGES / FULL_EXAMPLES)
    per_example_write = 1.0 / write_rate
    generators = max(args.cores - 1, 1)
    rate_full = min(generators / per_example_gen, 1.0 / per_example_write)
    plan_full_s = per_image_ms / 1000 * COCO_TRAIN_IMAGES
    total_s = plan_full_s + FULL_EXAMPLES / rate_full
    print(f"per example at full scale: generate+encode {1000 * per_example_gen:.1f} ms, TFDS write in the main process "
          f"{1000 * per_example_write:.1f} ms")
    print(f"estimate, full OmniRef ({FULL_EXAMPLES} examples on {FULL_TARGET_IMAGES} target images, sources of "
          f"{COCO_TRAIN_IMAGES} COCO train2014 images) on {args.cores} cores with --workers {generators}: "
          f"plan {plan_full_s / 60:.1f} min + examples at {rate_full:.0f}/s "
          f"({'writer' if rate_full == 1.0 / per_example_write else 'generators'}-bound) = "
          f"{total_s / 60:.0f} min ({total_s / 3600:.2f} h)")
    print(f"disk: {size / total / 1e6:.2f} MB per example on the fixture (PNG target + reference image + masks), "
          f"so about {size / total * FULL_EXAMPLES / 1e9:.0f} GB for the full OmniRef")
    print(f"(load average {os.getloadavg()[0]:.1f} at the end)")
  finally:
    shutil.rmtree(manual_dir, ignore_errors=True)


if __name__ == "__main__":
  main()
