"""Fingerprints a config's model: its initial parameters, outputs, loss and gradients on a fixed random batch.

Two fingerprints taken before and after a refactor that should not change what a model computes must be equal
bit for bit (a different XLA program order or a renamed parameter shows up here before it shows up in a run).

  python benchmarks/model_fingerprint.py --variant=demo --out=/tmp/after.npz [--compare=/tmp/before.npz]
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "configs")]

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402
from flax import traverse_util  # noqa: E402

import joint  # noqa: E402  pylint: disable=g-import-not-at-top
from omniris_jax import steps  # noqa: E402
from omniris_jax.models import factory  # noqa: E402

_VARIANT = flags.DEFINE_string("variant", "demo", "variant of configs/joint.py ('' is the paper's model).")
_OUT = flags.DEFINE_string("out", None, "where to write the fingerprint (.npz).", required=True)
_COMPARE = flags.DEFINE_string("compare", None, "a fingerprint to compare with, array by array.")


def fixed_batch(size: int, length: int, batch: int = 4) -> dict[str, np.ndarray]:
  """A batch of the contract with every prompt combination (text only, omni, visual only) and a no-target row."""
  rng = np.random.default_rng(0)
  return {"image": rng.integers(0, 255, (batch, size, size, 3)).astype(np.uint8),
          "text_ids": rng.integers(1000, 2000, (batch, length)).astype(np.int32),
          "text_attention_mask": (np.arange(length)[None] < np.array([[5], [8], [length], [3]])).astype(np.int32),
          "ref_image": rng.integers(0, 255, (batch, size, size, 3)).astype(np.uint8),
          "ref_prompt": (rng.random((batch, size, size)) > 0.7).astype(np.float32),
          "has_text": np.array([1, 1, 0, 1], bool), "has_visual": np.array([0, 1, 1, 1], bool),
          "mask": (rng.random((batch, size, size)) > 0.8).astype(np.int32),
          "no_target": np.array([0, 0, 1, 0], bool),
          "text_mask": (rng.random((batch, size, size)) > 0.8).astype(np.int32),
          "visual_mask": (rng.random((batch, size, size)) > 0.8).astype(np.int32),
          "category_map": rng.integers(0, 9, (batch, size, size)).astype(np.int32), "index": np.arange(batch)}


def fingerprint(config) -> dict[str, np.ndarray]:
  model, loss_fn = factory.make_model(config), factory.loss_fn(config)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), **factory.dummy_inputs(config))["params"])
  result = {"param/" + "/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
  batch = fixed_batch(config.input.resolution, config.input.max_text_len)
  half = config.input.resolution // 2
  smaller_reference = dict(batch, ref_image=batch["ref_image"][:, :half], ref_prompt=batch["ref_prompt"][:, :half])
  for name, inputs in (("out", batch), ("out_other_reference_size", smaller_reference)):
    outputs = jax.jit(lambda p, b: model.apply({"params": p}, **steps.model_inputs(b)))(params, inputs)
    result.update({f"{name}/{key}": np.asarray(value) for key, value in outputs.items()})

  def objective(p):
    return loss_fn(model.apply({"params": p}, **steps.model_inputs(batch)), batch, config.loss)

  (loss, metrics), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(params)
  result["loss"] = np.asarray(loss)
  result.update({"metric/" + k: np.asarray(v) for k, v in metrics.items()})
  result.update({"grad/" + "/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(grads).items()})
  return result


def main(argv):
  del argv
  result = fingerprint(joint.get_config(_VARIANT.value))
  np.savez(_OUT.value, **result)
  print(f"{len(result)} arrays, loss {float(result['loss']):.6f} -> {_OUT.value}")
  if _COMPARE.value:
    other = np.load(_COMPARE.value)
    only = sorted(set(result) ^ set(other.files))
    differ = [k for k in sorted(set(result) & set(other.files))
              if result[k].shape != other[k].shape or not np.array_equal(result[k], other[k])]
    print(f"{len(set(result) & set(other.files))} arrays in both; {len(only)} in one only {only[:10]}; "
          f"{len(differ)} differ {differ[:10]}")


if __name__ == "__main__":
  app.run(main)
