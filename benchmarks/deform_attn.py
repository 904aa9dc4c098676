"""Multi-scale deformable attention: the "xla" (jnp gather) vs "pallas" (Triton kernel) implementations.

Why: deformable attention is the hot spot of the pixel encoder (self-attention over every pixel of strides
8/16/32) and of the prompt generator (20 queries over the reference image's four levels). This times the
forward and the forward+backward of both implementations at the paper's shapes and reports how close each
gets to the device's memory bandwidth and how much device memory each needs.

  python benchmarks/deform_attn.py                       # on a GPU: the paper shapes
  python benchmarks/deform_attn.py --reduced             # on CPU: small shapes, Pallas in interpret mode

Shapes (paper configuration: 256 channels = 8 heads x 32, 4 points, bf16 values and attention weights,
float32 sampling locations, as the model passes them):
  pixel:  batch 8, levels 60x60, 30x30, 15x15 (480x480 input at strides 8/16/32); queries = all 4725 pixels.
  prompt: batch 8, 20 queries over the reference image's 4 levels at 480: 120x120, 60x60, 30x30, 15x15.
`--reduced` divides every level side by 4 (at least 1) and uses batch 1.

What is reported, per shape, implementation and pass (fwd, fwd+bwd):
  * ms: median wall time of `--iterations` calls after 2 warm-up calls (compilation excluded).
  * speedup: xla ms / pallas ms.
  * GB/s: compulsory bytes / time. Compulsory bytes = every input read once and every output written once
    (fwd: value, locations, weights in, output out; fwd+bwd adds the cotangent in and the three gradients
    out). Repeated reads of value rows (up to L*P*4 per query) are cache traffic and not counted, so this is
    a lower bound on what the kernel moves, and the fraction of the device's bandwidth says how far from
    memory-bound the implementation is.
  * peak MB: XLA's compiled memory analysis of the jitted call (arguments + outputs + temporaries - aliased),
    i.e. the device memory that call needs; deterministic, unlike process-wide peak counters.
On CPU the Pallas kernels run in Pallas' interpreter (a scan over the grid, in XLA:CPU): the figures say
nothing about kernel speed and are printed only so the script itself is exercised.
"""

from __future__ import annotations

import datetime
import statistics
import sys
import time
from typing import Callable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from omniris_jax.models import deform_attn

_REDUCED = flags.DEFINE_bool("reduced", False, "small shapes (level sides / 4, batch 1); required on CPU.")
_SHAPES = flags.DEFINE_list("shapes", ["pixel", "prompt"], "which shapes to time: pixel, prompt.")
_ITERATIONS = flags.DEFINE_integer("iterations", 20, "timed calls per figure (after 2 warm-ups).")
_BANDWIDTH = flags.DEFINE_float("device_bandwidth_gbs", 0.0,
                                "device memory bandwidth in GB/s; 0 looks the device kind up in a table.")

HEADS, HEAD_DIM, POINTS, BATCH = 8, 32, 4, 8
PAPER_SHAPES = {
    "pixel": {"levels": ((60, 60), (30, 30), (15, 15)), "queries": None},  # None: all pixels of the levels
    "prompt": {"levels": ((120, 120), (60, 60), (30, 30), (15, 15)), "queries": 20},
}
# Peak HBM bandwidth (GB/s) by jax device_kind, from the vendors' data sheets.
DEVICE_BANDWIDTH_GBS = {
    "NVIDIA H100 80GB HBM3": 3350.0, "NVIDIA H100 PCIe": 2000.0, "NVIDIA H100 NVL": 3900.0,
    "NVIDIA H200": 4800.0, "NVIDIA A100-SXM4-80GB": 2039.0, "NVIDIA A100-SXM4-40GB": 1555.0,
    "NVIDIA A100-PCIE-40GB": 1555.0, "NVIDIA A100 80GB PCIe": 1935.0, "NVIDIA L4": 300.0,
    "NVIDIA A10G": 600.0, "Tesla T4": 320.0,
}


def _shape(name: str, reduced: bool):
  """(batch, levels, queries) of a named shape, reduced for CPU if asked."""
  levels = PAPER_SHAPES[name]["levels"]
  batch = BATCH
  if reduced:
    levels = tuple((max(1, h // 4), max(1, w // 4)) for h, w in levels)
    batch = 1
  queries = PAPER_SHAPES[name]["queries"] or sum(h * w for h, w in levels)
  return batch, levels, queries


def _inputs(batch, levels, queries):
  rng = np.random.default_rng(0)
  num_values = sum(h * w for h, w in levels)
  value = jnp.asarray(rng.standard_normal((batch, num_values, HEADS, HEAD_DIM)), jnp.bfloat16)
  locations = jnp.asarray(rng.uniform(-0.05, 1.05, (batch, queries, HEADS, len(levels), POINTS, 2)), jnp.float32)
  logits = rng.standard_normal((batch, queries, HEADS, len(levels) * POINTS))
  weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  weights = jnp.asarray(weights.reshape(batch, queries, HEADS, len(levels), POINTS), jnp.bfloat16)
  cotangent = jnp.asarray(rng.standard_normal((batch, queries, HEADS * HEAD_DIM)), jnp.bfloat16)
  return value, locations, weights, cotangent


def _functions(implementation: str, levels) -> dict[str, Callable]:
  def forward(value, locations, weights, cotangent):
    del cotangent
    return deform_attn.multi_scale_deformable_attention(value, levels, locations, weights,
                                                        implementation=implementation)

  def forward_backward(value, locations, weights, cotangent):
    output, vjp = jax.vjp(lambda v, l, w: forward(v, l, w, None), value, locations, weights)
    return output, vjp(cotangent)

  return {"fwd": jax.jit(forward), "fwd+bwd": jax.jit(forward_backward)}


def _nbytes(*arrays) -> int:
  return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in arrays)


def _compulsory_bytes(pass_name, value, locations, weights, cotangent) -> int:
  forward = _nbytes(value, locations, weights, cotangent)  # the output has the cotangent's shape and dtype
  if pass_name == "fwd":
    return forward
  return forward + _nbytes(cotangent, value, locations, weights)  # + cotangent in, three gradients out


def _peak_bytes(function, args) -> int | None:
  try:
    stats = function.lower(*args).compile().memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if stats is None:
    return None
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
          - stats.alias_size_in_bytes)


def _median_ms(function, args) -> float:
  for _ in range(2):
    jax.block_until_ready(function(*args))
  times = []
  for _ in range(_ITERATIONS.value):
    start = time.perf_counter()
    jax.block_until_ready(function(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def _scaled_differences(reference, other) -> list[float]:
  """max|other - reference| / max|reference| per array (output, then each gradient)."""
  return [float(jnp.max(jnp.abs(y.astype(jnp.float32) - x)) / jnp.maximum(jnp.max(jnp.abs(x)), 1e-30))
          for x, y in zip(jax.tree.leaves(reference), jax.tree.leaves(other))]


def main(argv):
  del argv
  device = jax.devices()[0]
  on_cpu = device.platform == "cpu"
  if on_cpu and not _REDUCED.value:
    sys.exit("On CPU the Pallas kernels run in interpret mode, far too slowly for the paper shapes: pass "
             "--reduced (and read the figures as a smoke test, not as speed).")
  bandwidth = _BANDWIDTH.value or DEVICE_BANDWIDTH_GBS.get(device.device_kind)
  print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, jax {jax.__version__}, device "
        f"{device.device_kind} ({device.platform}), bandwidth "
        f"{f'{bandwidth:.0f} GB/s' if bandwidth else 'unknown (pass --device_bandwidth_gbs)'}")
  if on_cpu:
    print("NOTE: CPU run, Pallas in INTERPRET mode: these times are NOT a speed measurement of the kernel.")
  print("\n| shape | impl | pass | ms | speedup vs xla | GB/s (compulsory) | % of bandwidth | peak MB |")
  print("|---|---|---|---:|---:|---:|---:|---:|")
  for shape_name in _SHAPES.value:
    batch, levels, queries = _shape(shape_name, _REDUCED.value)
    args = _inputs(batch, levels, queries)
    label = f"{shape_name} B{batch} Q{queries} {'+'.join(f'{h}x{w}' for h, w in levels)}"
    results = {}
    for implementation in ("xla", "pallas"):
      for pass_name, function in _functions(implementation, levels).items():
        milliseconds = _median_ms(function, args)
        results[implementation, pass_name] = (milliseconds, function(*args))
        speedup = results["xla", pass_name][0] / milliseconds
        gbs = _compulsory_bytes(pass_name, *args) / milliseconds / 1e6
        share = f"{100 * gbs / bandwidth:.1f}%" if bandwidth else "n/a"
        peak = _peak_bytes(function, args)
        peak_text = f"{peak / 2**20:.1f}" if peak is not None else "n/a"
        print(f"| {label} | {implementation} | {pass_name} | {milliseconds:.3f} | {speedup:.2f}x | {gbs:.1f} | "
              f"{share} | {peak_text} |", flush=True)
    # Accuracy against the float32 reference ("xla" on the upcast inputs), output and each gradient.
    reference = _functions("xla", levels)["fwd+bwd"](*(a.astype(jnp.float32) for a in args))
    names = ("output", "grad value", "grad locations", "grad weights")
    for implementation in ("xla", "pallas"):
      errors = _scaled_differences(reference, results[implementation, "fwd+bwd"][1])
      print(f"  {shape_name} {implementation} (bf16) vs float32 reference, max|diff| / max|ref|: "
            + ", ".join(f"{name} {error:.1e}" for name, error in zip(names, errors)))


if __name__ == "__main__":
  app.run(main)
