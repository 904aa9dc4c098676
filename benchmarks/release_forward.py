"""The released model's forward: our converted JAX model beside the PyTorch statement of the release's code.

  python benchmarks/release_forward.py [--runs=3] [--threads=0]

Builds the released OmniSegNet at its real size (Swin-B, BERT-base, 480 x 480, 232.8 M parameters) in PyTorch
(tests/release_torch.py, the same modules the parity tests check against, with random weights), writes it in
the release's checkpoint format, converts it with `omniris_jax.convert_release` and times, on the same inputs:
  torch     `ReleaseOmniSegNet.forward` in eval mode under torch.no_grad (float32, the pure-PyTorch
            deformable attention that the release falls back to off CUDA)
  jax       `release_forward`'s model call, jitted (float32; first call = compile, reported apart)
for a text prompt and a visual (mask) prompt at batch 1, and prints the largest logit difference between the two.
Each figure is the median of `--runs` runs after one warm-up.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from omniris_jax import convert_release  # noqa: E402
from omniris_jax.models.omnisegnet import OmniSegNet  # noqa: E402
import release_torch  # noqa: E402  pylint: disable=g-import-not-at-top

_RUNS = flags.DEFINE_integer("runs", 3, "timed runs per figure (after one warm-up).")
_THREADS = flags.DEFINE_integer("threads", 0, "torch intra-op threads (0: torch's default).")


def _median_s(fn, runs):
  fn()
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv):
  del argv
  if _THREADS.value:
    torch.set_num_threads(_THREADS.value)
  torch.manual_seed(0)
  model = release_torch.randomize_(release_torch.ReleaseOmniSegNet(release_torch.ReleaseConfig()), seed=0).eval()
  with tempfile.TemporaryDirectory() as directory:
    path = os.path.join(directory, "release.pth")
    release_torch.save_release_checkpoint(model, path)
    start = time.perf_counter()
    config, params = convert_release.load_release_checkpoint(path)
    convert_s = time.perf_counter() - start
  params = jax.device_put(params)

  rng = np.random.default_rng(0)
  size = 480
  image = rng.uniform(0, 255, (1, 3, size, size)).astype(np.float32)
  reference = rng.uniform(0, 255, (1, 3, size, size)).astype(np.float32)
  mask = np.zeros((1, size, size), np.float32)
  mask[0, 100:300, 150:400] = 1
  tokens = np.zeros((1, 1, 20), np.int64)
  tokens[0, 0, :9] = [101, 1996, 2158, 2006, 1996, 2187, 2007, 1037, 102]
  ref_data = {"image": image, "lang_tokens": tokens, "lang_mask": (tokens > 0).astype(np.int64)}
  supp_data = {"image": image, "supp_image": release_torch.normalise_reference(torch.from_numpy(reference)).numpy(),
               "supp_mask": mask}

  jax_model = OmniSegNet(config)
  apply = jax.jit(jax_model.apply)
  inputs = {
      "text": dict(image=image.transpose(0, 2, 3, 1), text_ids=tokens[:, 0].astype(np.int32),
                   text_attention_mask=(tokens[:, 0] > 0).astype(np.int32)),
      "visual": dict(image=image.transpose(0, 2, 3, 1), ref_image=reference.transpose(0, 2, 3, 1),
                     ref_prompt=mask),
  }
  torch_inputs = {"text": (ref_data, None), "visual": (None, supp_data)}
  as_torch = lambda d: None if d is None else {k: torch.from_numpy(v) for k, v in d.items()}  # noqa: E731

  print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), jax {jax.__version__} ({jax.devices()[0].platform}); conversion of "
        f"the {sum(np.prod(v.shape) for v in jax.tree.leaves(params)) / 1e6:.1f} M-parameter file: {convert_s:.1f} s")
  print("| prompt | torch forward (s) | jax compile (s) | jax forward (s) | torch / jax | max abs logit diff |")
  print("|---|---|---|---|---|---|")
  for name in ("text", "visual"):
    ref, supp = (as_torch(d) for d in torch_inputs[name])

    def run_torch():
      with torch.no_grad():
        return model(ref, supp)

    def run_jax():
      return jax.block_until_ready(apply({"params": params}, **inputs[name]))

    start = time.perf_counter()
    ours = run_jax()
    compile_s = time.perf_counter() - start
    jax_s = _median_s(run_jax, _RUNS.value)
    torch_s = _median_s(run_torch, _RUNS.value)
    theirs = run_torch()["pred_masks"].numpy().transpose(0, 2, 3, 1)
    diff = float(np.abs(np.asarray(ours["mask_logits"]) - theirs).max())
    print(f"| {name} | {torch_s:.2f} | {compile_s:.1f} | {jax_s:.2f} | {torch_s / jax_s:.2f} | {diff:.1e} |")


if __name__ == "__main__":
  app.run(main)
