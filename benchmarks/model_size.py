"""OmniSegNet's size and cost: parameters per module, XLA's FLOP estimate, and CPU latency of the demo model.

Two questions this answers: how big is the paper's model (Swin-B + BERT-base at 480x480), measured without
materialising a single weight (jax.eval_shape for the parameters, the lowered HLO's cost analysis for FLOPs:
lowering needs only abstract shapes), and what does late fusion buy: the target image is encoded once, and each
further prompt costs only its own encoder plus one decoder pass. The latter is measured on the demo model
(tiny Swin + the MiniLM-sized text encoder at 128x128) on this machine's CPU.

  python benchmarks/model_size.py [--iterations=10] [--skip_latency] [--skip_paper]

FLOPs are XLA's HloCostAnalysis estimate of the unoptimised forward graph: a multiply-add counts as 2 FLOPs;
gathers/elementwise ops count as they appear. Latencies are medians after warm-up (compilation excluded),
batch 1 unless said otherwise, with random weights (latency does not depend on their values).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Callable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from omniris_jax.models.omnisegnet import OmniSegNet, OmniSegNetConfig, parameter_counts

_ITERATIONS = flags.DEFINE_integer("iterations", 10, "timed iterations per latency figure (after 2 warm-ups).")
_SKIP_LATENCY = flags.DEFINE_bool("skip_latency", False, "skip the CPU latency of the demo model.")
_SKIP_PAPER = flags.DEFINE_bool("skip_paper", False, "skip the paper model's parameter and FLOP counts.")
_DEMO_RESOLUTION = flags.DEFINE_integer("demo_resolution", 128, "square input size of the demo model.")
_PAPER_RESOLUTION = flags.DEFINE_integer("paper_resolution", 480, "square input size of the paper model.")
_EXTRA_PROMPTS = flags.DEFINE_integer("extra_prompts", 8, "prompts decoded at once against one encoded image.")


def _inputs(config: OmniSegNetConfig, resolution: int, batch: int = 1, abstract: bool = False) -> dict[str, Any]:
  """One omni example per row: target, text (max length), reference image with a box prompt."""
  length = config.max_text_len
  shapes = {"image": ((batch, resolution, resolution, 3), jnp.uint8),
            "text_ids": ((batch, length), jnp.int32), "text_attention_mask": ((batch, length), jnp.int32),
            "ref_image": ((batch, resolution, resolution, 3), jnp.uint8),
            "ref_prompt": ((batch, resolution, resolution), jnp.float32),
            "has_text": ((batch,), jnp.bool_), "has_visual": ((batch,), jnp.bool_)}
  if abstract:
    return {name: jax.ShapeDtypeStruct(shape, dtype) for name, (shape, dtype) in shapes.items()}
  rng = np.random.default_rng(0)
  prompt = np.zeros((batch, resolution, resolution), np.float32)
  prompt[:, resolution // 4:resolution // 2, resolution // 3:2 * resolution // 3] = 1.0
  return {"image": jnp.asarray(rng.integers(0, 256, shapes["image"][0]), jnp.uint8),
          "text_ids": jnp.asarray(rng.integers(1000, 2000, (batch, length)), jnp.int32),
          "text_attention_mask": jnp.ones((batch, length), jnp.int32),
          "ref_image": jnp.asarray(rng.integers(0, 256, shapes["ref_image"][0]), jnp.uint8),
          "ref_prompt": jnp.asarray(prompt), "has_text": jnp.ones((batch,), bool),
          "has_visual": jnp.ones((batch,), bool)}


def _pieces(model: OmniSegNet) -> dict[str, Callable[..., Any]]:
  """The late-fusion pieces as functions of (params, inputs, image_features, prompt batch)."""

  def encode_image(params, x):
    return model.apply(params, x["image"], method=OmniSegNet.encode_image)

  def encode_text(params, x):
    return model.apply(params, x["text_ids"], x["text_attention_mask"], method=OmniSegNet.encode_text)

  def encode_visual(params, x):
    return model.apply(params, x["ref_image"], x["ref_prompt"], method=OmniSegNet.encode_visual)

  def decode_prompts(params, features, tokens, mask):
    return model.apply(params, features, tokens, mask, method=OmniSegNet.decode_prompts)

  def forward_text(params, x):
    return model.apply(params, x["image"], x["text_ids"], x["text_attention_mask"])

  def forward_omni(params, x):
    return model.apply(params, **x)

  return {"encode_image": encode_image, "encode_text": encode_text, "encode_visual": encode_visual,
          "decode_prompts": decode_prompts, "forward_text": forward_text, "forward_omni": forward_omni}


def _gflops(function, *args) -> float:
  return jax.jit(function).lower(*args).cost_analysis()["flops"] / 1e9


def paper_report() -> str:
  config = OmniSegNetConfig.paper()
  model = OmniSegNet(config)
  size = _PAPER_RESOLUTION.value
  x = _inputs(config, size, abstract=True)
  start = time.perf_counter()
  params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), **x))
  counts = parameter_counts(params)
  pieces = _pieces(model)
  features = jax.eval_shape(pieces["encode_image"], params, x)
  tokens, mask = jax.eval_shape(pieces["encode_text"], params, x)
  flops = {
      "encode_image (Swin-B + pixel encoder)": _gflops(pieces["encode_image"], params, x),
      "encode_text (BERT-base + projection)": _gflops(pieces["encode_text"], params, x),
      "encode_visual (Swin-B on the reference + prompt encoder)": _gflops(pieces["encode_visual"], params, x),
      "decode one prompt (mask decoder)": _gflops(pieces["decode_prompts"], params, features, tokens, mask),
      "full forward, text prompt": _gflops(pieces["forward_text"], params, x),
      "full forward, omni prompt (text + visual, union)": _gflops(pieces["forward_omni"], params, x),
  }
  early = OmniSegNet(OmniSegNetConfig.paper(early_fusion=True))
  early_params = nn.unbox(jax.eval_shape(early.init, jax.random.key(0), **x))
  early_pwam = parameter_counts(early_params)["total"] - counts["total"]
  flops["full forward, omni prompt, early_fusion=True (PWAM; target encoded per prompt)"] = _gflops(
      _pieces(early)["forward_omni"], early_params, x)
  lines = [f"### Paper model: Swin-B + BERT-base, {size}x{size}, {config.max_text_len} text tokens, "
           f"{config.mask_decoder.num_queries} queries, omni_fusion={config.omni_fusion!r}",
           "", "| module (parameter path prefix) | parameters | share |", "|---|---:|---:|"]
  for name, count in counts.items():
    if name != "total":
      lines.append(f"| {name}/ | {count:,} ({count / 1e6:.2f} M) | {100 * count / counts['total']:.1f}% |")
  lines.append(f"| **total** | **{counts['total']:,} ({counts['total'] / 1e6:.2f} M)** | 100% |")
  lines.append(f"| (early_fusion=True adds PWAM: image_encoder/stage*/pwam/) | +{early_pwam:,} "
               f"({early_pwam / 1e6:.2f} M) | |")
  lines += ["", "| forward piece (batch 1) | GFLOPs (XLA estimate) | GMACs |", "|---|---:|---:|"]
  for name, value in flops.items():
    lines.append(f"| {name} | {value:.1f} | {value / 2:.1f} |")
  lines.append(f"\n(abstract shapes only; counted in {time.perf_counter() - start:.0f} s)")
  return "\n".join(lines)


def _median_ms(function, *args) -> float:
  for _ in range(2):
    jax.block_until_ready(function(*args))
  times = []
  for _ in range(_ITERATIONS.value):
    start = time.perf_counter()
    jax.block_until_ready(function(*args))
    times.append(time.perf_counter() - start)
  return 1000 * statistics.median(times)


def demo_report() -> str:
  config = OmniSegNetConfig.demo()
  model = OmniSegNet(config)
  size = _DEMO_RESOLUTION.value
  x = _inputs(config, size)
  params = jax.jit(model.init)(jax.random.key(0), **x)
  counts = parameter_counts(params)
  pieces = {name: jax.jit(function) for name, function in _pieces(model).items()}
  features = pieces["encode_image"](params, x)
  tokens, mask = pieces["encode_text"](params, x)
  many = _EXTRA_PROMPTS.value
  many_tokens = jnp.broadcast_to(tokens, (many, *tokens.shape[1:]))
  many_mask = jnp.broadcast_to(mask, (many, *mask.shape[1:]))

  image_ms = _median_ms(pieces["encode_image"], params, x)
  text_ms = _median_ms(pieces["encode_text"], params, x)
  visual_ms = _median_ms(pieces["encode_visual"], params, x)
  decode_ms = _median_ms(pieces["decode_prompts"], params, features, tokens, mask)
  decode_many_ms = _median_ms(pieces["decode_prompts"], params, features, many_tokens, many_mask)
  forward_text_ms = _median_ms(pieces["forward_text"], params, x)
  forward_omni_ms = _median_ms(pieces["forward_omni"], params, x)
  marginal_ms = (decode_many_ms - decode_ms) / (many - 1)

  rows = [
      ("encode_image: target image encoded once (Swin + pixel encoder)", image_ms),
      ("encode_text: one text prompt (MiniLM-sized BERT + projection)", text_ms),
      ("encode_visual: one visual prompt (Swin on the reference + prompt encoder)", visual_ms),
      ("decode one prompt against the encoded image (mask decoder)", decode_ms),
      (f"decode {many} prompts at once against one encoded image", decode_many_ms),
      (f"marginal decode per extra prompt in that batch ((t{many} - t1) / {many - 1})", marginal_ms),
      ("extra text prompt on an encoded image (encode_text + decode)", text_ms + decode_ms),
      ("extra visual prompt on an encoded image (encode_visual + decode)", visual_ms + decode_ms),
      ("full forward, text prompt (__call__)", forward_text_ms),
      ("full forward, omni prompt: text + visual, union (__call__)", forward_omni_ms),
  ]
  lines = [f"### Demo model on this CPU: {size}x{size}, {counts['total'] / 1e6:.2f} M parameters "
           f"(image_encoder {counts['image_encoder'] / 1e6:.2f} M, text_encoder {counts['text_encoder'] / 1e6:.2f} M"
           f", pixel_encoder {counts['pixel_encoder'] / 1e6:.2f} M, prompt_encoder "
           f"{counts['prompt_encoder'] / 1e6:.2f} M, mask_decoder {counts['mask_decoder'] / 1e6:.2f} M)",
           "", f"| batch-1 latency, median of {_ITERATIONS.value} after warm-up | ms |", "|---|---:|"]
  lines += [f"| {name} | {value:.1f} |" for name, value in rows]
  return "\n".join(lines)


def main(argv):
  del argv
  load = os.getloadavg()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({platform.machine()}, {os.cpu_count()} cores, "
        f"load average {load[0]:.1f} at start), {time.strftime('%Y-%m-%d %H:%M %Z')}\n")
  if not _SKIP_PAPER.value:
    print(paper_report(), "\n", flush=True)
  if not _SKIP_LATENCY.value:
    print(demo_report())
    print(f"\n(load average {os.getloadavg()[0]:.1f} at the end)")


if __name__ == "__main__":
  app.run(main)
