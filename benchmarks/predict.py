"""Latency of the predictor: an image encoded once, then each further prompt, beside one full forward.

  python benchmarks/predict.py [--models=demo,paper] [--runs=5] [--paper_runs=3] [--image=PATH]

Per model, with random weights (latency does not depend on their values), on one target image:
  set_image        the image resized on the host and encoded (`Predictor.set_image`), once per image
  + text prompt    `Predictor.predict(text=...)` about the encoded image: tokenise, text encoder, mask decoder,
                   masks upsampled to the image's size
  (its decoder)    the compiled decoder program of that prompt alone, without the host's work
  + visual prompt  `Predictor.predict(ref_image=..., ref_box=...)`: the reference through the image encoder and
                   the prompt encoder, then the mask decoder
  full forward     the whole model (`model.apply`, jitted) on one image and one text prompt, inputs already at
                   the model's size (no pre- or post-processing, so the ratio below is if anything pessimistic)
Each figure is the median of `--runs` runs (`--paper_runs` for the paper model) after one warm-up (the compile).
The ratio (extra text prompt / full forward) is what encoding once costs a further prompt; the goal is <= 0.10
for the paper model at 480x480. Models: `demo` = configs/joint.py:demo, `paper` = configs/joint.py (Swin-B +
BERT-base, 480x480, 20 tokens).
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import matplotlib.cbook
import numpy as np
from flax import linen as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from configs import joint  # noqa: E402
from omniris_jax import predict  # noqa: E402
from omniris_jax.models import factory  # noqa: E402

_MODELS = flags.DEFINE_list("models", ["demo", "paper"], "models to time: demo (joint.py:demo), paper (joint.py).")
_RUNS = flags.DEFINE_integer("runs", 5, "timed runs per figure of the demo model (after one warm-up).")
_PAPER_RUNS = flags.DEFINE_integer("paper_runs", 3, "timed runs per figure of the paper model (slow on a CPU).")
_IMAGE = flags.DEFINE_string("image", None, "target (and reference) image; default: matplotlib's grace_hopper.jpg.")
_TEXT = "the woman in the uniform"
_GOAL = 0.10  # extra text prompt / full forward, paper model


def _median_ms(fn: Callable[[], Any], runs: int) -> float:
  """Median wall time of `fn()` in ms over `runs` calls, after one warm-up call."""
  fn()
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def time_model(name: str, image: np.ndarray, runs: int) -> dict[str, Any]:
  """The latencies of one model (module docstring), in ms, with its size."""
  config = joint.get_config("demo" if name == "demo" else "")
  model = factory.make_model(config)
  init = jax.jit(lambda rng: nn.unbox(model.init(rng, **factory.dummy_inputs(config))["params"]))
  params = jax.block_until_ready(init(jax.random.PRNGKey(0)))
  size, length = config.input.resolution, config.input.max_text_len
  predictor = predict.Predictor(model, params, resolution=size, max_text_len=length,
                                vocab_path=factory.text_encoder_vocab(config))
  height, width = image.shape[:2]
  box = (width // 4, height // 4, 3 * width // 4, 3 * height // 4)

  def set_image():
    predictor.set_image(image)
    jax.block_until_ready(predictor._features)  # pylint: disable=protected-access  (set_image does not wait)

  figures = {"set_image": _median_ms(set_image, runs)}
  figures["text"] = _median_ms(lambda: predictor.predict(text=_TEXT), runs)
  figures["visual"] = _median_ms(lambda: predictor.predict(ref_image=image, ref_box=box), runs)
  # The text prompt's compiled decoder alone (the program `predict` runs), without the host's pre- and
  # post-processing (tokenising, the masks' upsampling to the image's size).
  text_ids, text_mask, _, _, has_text, has_visual = predict.prompt_arrays(
      [predict.Prompt(text=_TEXT)], predictor.tokenizer, size, length, 1)

  def decoder_only():
    features = predictor._features  # pylint: disable=protected-access
    with jax.set_mesh(predictor.mesh), nn.logical_axis_rules(predictor.rules):
      jax.block_until_ready(predictor._decode(  # pylint: disable=protected-access
          params, features, text_ids, text_mask, None, None, has_text, has_visual))

  figures["decoder"] = _median_ms(decoder_only, runs)

  resized = jnp.asarray(predict.resize_square(image, size, bilinear=True)[None])
  ids, mask = predictor.tokenizer.encode(_TEXT, length)
  ids, mask = jnp.asarray(ids[None]), jnp.asarray(mask[None])
  forward = jax.jit(lambda params, image, ids, mask: model.apply({"params": params}, image, ids, mask))

  def full_forward():
    with jax.set_mesh(predictor.mesh), nn.logical_axis_rules(predictor.rules):
      jax.block_until_ready(forward(params, resized, ids, mask))

  figures["full"] = _median_ms(full_forward, runs)
  figures.update(name=name, size=size, runs=runs, params=sum(x.size for x in jax.tree.leaves(params)))
  return figures


def main(argv):
  del argv
  unknown = [name for name in _MODELS.value if name not in ("demo", "paper")]
  if unknown:
    raise app.UsageError(f"--models: unknown {unknown}; choose demo, paper.")
  path = _IMAGE.value or matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
  image = predict.load_image(path)
  print(f"# {platform.node()} ({os.cpu_count()} CPUs), jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; image {os.path.basename(str(path))} "
        f"{image.shape[1]}x{image.shape[0]}; ms, median after one warm-up; load average "
        f"{os.getloadavg()[0]:.1f}")
  print("| model | input | parameters | runs | set_image | + text prompt | (its decoder program) | + visual prompt "
        "| full forward (text) | text / full |")
  print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
  for name in _MODELS.value:
    f = time_model(name, image, _PAPER_RUNS.value if name == "paper" else _RUNS.value)
    ratio = f["text"] / f["full"]
    print(f"| {name} | {f['size']}x{f['size']} | {f['params'] / 1e6:.1f} M | {f['runs']} | {f['set_image']:.1f} | "
          f"{f['text']:.1f} | {f['decoder']:.1f} | {f['visual']:.1f} | {f['full']:.1f} | {ratio:.3f} |", flush=True)
    if name == "paper":
      print(f"load average {os.getloadavg()[0]:.1f}. ", end="")
      print(f"paper model: extra text prompt / full forward = {ratio:.3f}, goal <= {_GOAL:.2f}: "
            f"{'met' if ratio <= _GOAL else 'NOT met'}.", flush=True)


if __name__ == "__main__":
  app.run(main)
