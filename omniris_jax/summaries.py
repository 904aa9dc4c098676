"""Training scalars to TensorBoard event files, a CSV beside them, and a learning-curve PNG — without TensorFlow.

`flax.metrics.tensorboard` imports TensorFlow and tensorboardX is not a dependency, so this writes the event file
format directly: a TFRecord stream (length, masked CRC-32C of the length, payload, masked CRC-32C of the payload)
of `Event` protocol buffers (wall_time, step, summary{value{tag, simple_value}}), hand-encoded (a few fields of
two small messages). TensorBoard reads the files as usual (`tensorboard --logdir WORKDIR`). The same scalars go
to `metrics.csv` (step, tag, value), which `plot_learning_curves` turns into a PNG.

Plot a finished or running workdir's stages one after the other (the key scalars by default):
  python -m omniris_jax.summaries WORKDIR --out curves.png [--tags train/loss eval/text_test/cIoU ...]
"""

from __future__ import annotations

import argparse
import csv
import os
import socket
import struct
import time
from collections.abc import Iterator, Mapping

# ---------------------------------------------------------------------------------------------------------------
# TFRecord framing: CRC-32C (Castagnoli), masked as TensorFlow does.
# ---------------------------------------------------------------------------------------------------------------


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C of `data` (the checksum TFRecord uses)."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _record(payload: bytes) -> bytes:
  length = struct.pack("<Q", len(payload))
  return length + struct.pack("<I", _masked_crc(length)) + payload + struct.pack("<I", _masked_crc(payload))


# ---------------------------------------------------------------------------------------------------------------
# Protocol-buffer encoding of the two messages we need.
# ---------------------------------------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
  out = bytearray()
  while True:
    bits = value & 0x7F
    value >>= 7
    if value:
      out.append(bits | 0x80)
    else:
      out.append(bits)
      return bytes(out)


def _field(number: int, wire_type: int) -> bytes:
  return _varint((number << 3) | wire_type)


def _length_delimited(number: int, payload: bytes) -> bytes:
  return _field(number, 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: str | None = None,
           scalars: Mapping[str, float] | None = None) -> bytes:
  """An `Event` message: wall_time (1, double), step (2, int64), file_version (3) or summary (5)."""
  message = _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(step)
  if file_version is not None:
    message += _length_delimited(3, file_version.encode())
  if scalars:
    summary = b"".join(_length_delimited(1, _length_delimited(1, tag.encode()) + _field(2, 5) +
                                         struct.pack("<f", float(value)))
                       for tag, value in scalars.items())
    message += _length_delimited(5, summary)
  return message


class SummaryWriter:
  """Scalars to `<logdir>/events.out.tfevents.*` (TensorBoard) and `<logdir>/metrics.csv`.

  Appends: a resumed run adds a new event file beside the old ones and continues the CSV (TensorBoard shows
  the overlap of steps redone after the last checkpoint as both runs wrote them).
  """

  def __init__(self, logdir: str, enabled: bool = True):
    self.logdir = logdir
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(logdir, exist_ok=True)
    now = time.time()
    name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
    self._events = open(os.path.join(logdir, name), "ab")
    self._events.write(_record(_event(now, 0, file_version="brain.Event:2")))
    self.csv_path = os.path.join(logdir, "metrics.csv")
    new = not os.path.exists(self.csv_path)
    cut_short = not new and _ends_without_newline(self.csv_path)
    self._csv_file = open(self.csv_path, "a", newline="")
    if cut_short:  # a killed run's last line: end it, so our rows start on lines of their own
      self._csv_file.write("\n")
    self._csv = csv.writer(self._csv_file)
    if new:
      self._csv.writerow(("step", "tag", "value"))

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    """Writes one step's scalars to both files."""
    if not self.enabled:
      return
    values = {tag: float(value) for tag, value in values.items()}
    self._events.write(_record(_event(time.time(), int(step), scalars=values)))
    for tag, value in values.items():
      self._csv.writerow((int(step), tag, repr(value)))
    self.flush()  # whole lines on disk at every log step, so a killed run leaves a readable file

  def flush(self) -> None:
    if self.enabled:
      self._events.flush()
      self._csv_file.flush()

  def close(self) -> None:
    if self.enabled:
      self._events.close()
      self._csv_file.close()


def _ends_without_newline(path: str) -> bool:
  with open(path, "rb") as file:
    file.seek(0, os.SEEK_END)
    if file.tell() == 0:
      return False
    file.seek(-1, os.SEEK_END)
    return file.read(1) != b"\n"


def read_events(path: str) -> Iterator[tuple[int, dict[str, float]]]:
  """(step, {tag: value}) for every scalar event in one event file (checks the CRCs; for tests and tools)."""
  with open(path, "rb") as file:
    data = file.read()
  offset = 0
  while offset < len(data):
    (length,) = struct.unpack_from("<Q", data, offset)
    header = data[offset:offset + 8]
    if struct.unpack_from("<I", data, offset + 8)[0] != _masked_crc(header):
      raise ValueError(f"{path}: corrupt record length at byte {offset}")
    payload = data[offset + 12:offset + 12 + length]
    if struct.unpack_from("<I", data, offset + 12 + length)[0] != _masked_crc(payload):
      raise ValueError(f"{path}: corrupt record at byte {offset}")
    offset += 16 + length
    step, scalars = _parse_event(payload)
    if scalars:
      yield step, scalars


def _read_varint(data: bytes, offset: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    byte = data[offset]
    offset += 1
    value |= (byte & 0x7F) << shift
    shift += 7
    if not byte & 0x80:
      return value, offset


def _fields(data: bytes) -> Iterator[tuple[int, int, object]]:
  offset = 0
  while offset < len(data):
    key, offset = _read_varint(data, offset)
    number, wire_type = key >> 3, key & 7
    if wire_type == 0:
      value, offset = _read_varint(data, offset)
    elif wire_type == 1:
      value, offset = data[offset:offset + 8], offset + 8
    elif wire_type == 5:
      value, offset = data[offset:offset + 4], offset + 4
    elif wire_type == 2:
      length, offset = _read_varint(data, offset)
      value, offset = data[offset:offset + length], offset + length
    else:
      raise ValueError(f"unsupported protobuf wire type {wire_type}")
    yield number, wire_type, value


def _parse_event(payload: bytes) -> tuple[int, dict[str, float]]:
  step, scalars = 0, {}
  for number, _, value in _fields(payload):
    if number == 2:
      step = value
    elif number == 5:
      for _, _, summary_value in _fields(value):
        tag, simple = None, None
        for inner_number, _, inner in _fields(summary_value):
          if inner_number == 1:
            tag = inner.decode()
          elif inner_number == 2:
            simple = struct.unpack("<f", inner)[0]
        if tag is not None and simple is not None:
          scalars[tag] = simple
  return step, scalars


def read_csv(path: str) -> dict[str, list[tuple[int, float]]]:
  """tag -> [(step, value), ...] from a metrics.csv (later rows for the same step win: a resumed run's)."""
  series: dict[str, dict[int, float]] = {}
  with open(path, newline="") as file:
    for row in csv.reader(file):
      try:
        step, tag, value = row
        series.setdefault(tag, {})[int(step)] = float(value)
      except ValueError:
        continue  # the header, or a line cut short by a killed run (the resumed run rewrote those steps)
  return {tag: sorted(points.items()) for tag, points in series.items()}


def plot_learning_curves(csv_paths: Mapping[str, str], path: str, tags: tuple[str, ...] | None = None) -> None:
  """One panel per tag, one line per run (e.g. per stage, steps offset so the stages follow each other)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  runs = {name: read_csv(csv_path) for name, csv_path in csv_paths.items() if os.path.exists(csv_path)}
  if not runs:
    return
  all_tags = sorted({tag for series in runs.values() for tag in series})
  tags = [tag for tag in (tags or all_tags) if tag in all_tags]
  if not tags:
    return
  columns = min(3, len(tags))
  rows = -(-len(tags) // columns)
  figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  offset_by_run, offset = {}, 0
  for name, series in runs.items():
    offset_by_run[name] = offset
    offset += max((step for points in series.values() for step, _ in points), default=0)
  for ax, tag in zip(axes.flat, tags):
    ax.axis("on")
    for name, series in runs.items():
      if tag in series:
        steps, values = zip(*series[tag])
        ax.plot([offset_by_run[name] + s for s in steps], values, label=name, marker="." if len(steps) < 30
                else None)
    ax.set_title(tag, fontsize=9)
    ax.set_xlabel("step (stages in sequence)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)


# The panels `python -m omniris_jax.summaries` draws by default (those a run has).
DEFAULT_TAGS = ("train/loss", "train/category_loss", "train/nt_accuracy",
                "eval/text_test/cIoU", "eval/visual_test/cIoU", "eval/omni_test/cIoU",
                "eval/text_test/N_acc", "eval/visual_test/N_acc", "eval/omni_test/N_acc")
_STAGE_ORDER = ("alignment", "visual", "joint")  # configs/common.py STAGES (configs are loaded by path)


def stage_csvs(workdir: str) -> dict[str, str]:
  """stage name -> its metrics.csv, for the stages of `workdir` that have one, in training order."""
  names = [name for name in sorted(os.listdir(workdir))
           if os.path.isfile(os.path.join(workdir, name, "tensorboard", "metrics.csv"))]
  names.sort(key=lambda name: (_STAGE_ORDER.index(name) if name in _STAGE_ORDER else len(_STAGE_ORDER), name))
  return {name: os.path.join(workdir, name, "tensorboard", "metrics.csv") for name in names}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m omniris_jax.summaries",
                                   description="Plot the learning curves of a workdir's stages, one after the other.")
  parser.add_argument("workdir", help="the --workdir of a run (holds <stage>/tensorboard/metrics.csv)")
  parser.add_argument("--out", default=None, help="PNG to write (default: WORKDIR/learning_curves.png)")
  parser.add_argument("--tags", nargs="*", default=None,
                      help=f"scalars to plot, one panel each (default: those of {DEFAULT_TAGS} the run has)")
  args = parser.parse_args(argv)
  csvs = stage_csvs(args.workdir) if os.path.isdir(args.workdir) else {}
  if not csvs:
    parser.error(f"{args.workdir!r} holds no <stage>/tensorboard/metrics.csv; give the --workdir of a run.")
  out = args.out or os.path.join(args.workdir, "learning_curves.png")
  present = {tag for path in csvs.values() for tag in read_csv(path)}
  tags = tuple(args.tags) if args.tags else tuple(tag for tag in DEFAULT_TAGS if tag in present)
  missing = [tag for tag in tags if tag not in present]
  if missing:
    parser.error(f"no stage of {args.workdir!r} has the scalars {missing}; it has {sorted(present)}.")
  plot_learning_curves(csvs, out, tags or None)
  print(f"Wrote {out}: {', '.join(tags) or 'every scalar'} over the stages {', '.join(csvs)}.")


if __name__ == "__main__":
  main()
