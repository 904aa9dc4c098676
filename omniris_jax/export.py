"""The predictor's two compiled halves as `jax.export` artifacts: run them without the model code.

  python -m omniris_jax.export --workdir workdir/demo --out exported/ [--prompts 4]

writes `encode_image.bin` (target image -> features), `decode_prompts.bin` (features + K prompts -> mask and
no-target logits), `params.npz` (the parameters as a flat list, the order the two functions take them) and
`predictor.json` (input size, text length, platform) with the tokenizer's `vocab.txt`. `ExportedPredictor` loads the
folder and answers prompts like `predict.Predictor`, importing nothing from `omniris_jax.models`.

The decoder is exported for K prompts carrying both a text and a visual slot; `has_text` / `has_visual` say which
each prompt uses (a text-only prompt passes an empty reference). Fewer prompts are padded to K.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from omniris_jax import predict

# The decoder's outputs the exported program returns: combined, and per modality for the predictor's union.
OUTPUTS = ("mask_logits", "nt_logits", "text_mask_logits", "text_nt_logits", "visual_mask_logits",
           "visual_nt_logits")
ENCODE, DECODE, PARAMS, METADATA, VOCAB = ("encode_image.bin", "decode_prompts.bin", "params.npz", "predictor.json",
                                           "vocab.txt")


def export_predictor(predictor: predict.Predictor, directory: str, num_prompts: int = 4) -> None:
  """Writes the predictor's two halves, its parameters and its preprocessing to `directory` (module docstring)."""
  if predictor.early_fusion:
    raise ValueError("export: this model fuses each prompt into its image encoder (early fusion, as a converted "
                     "release checkpoint does), so it has no image half to export; export a late-fusion model.")
  model, size, length = predictor.model, predictor.resolution, predictor.max_text_len
  leaves, params_tree = jax.tree.flatten(predictor.params)
  image_spec = jax.ShapeDtypeStruct((1, size, size, 3), jnp.uint8)
  features_tree = []

  def encode(param_leaves, image):
    features = model.apply({"params": jax.tree.unflatten(params_tree, param_leaves)}, image,
                           method=model.encode_image)
    flat, tree = jax.tree.flatten(features)
    features_tree[:] = [tree]
    return flat

  def decode(param_leaves, feature_leaves, text_ids, text_mask, ref_image, ref_prompt, has_text, has_visual):
    params = jax.tree.unflatten(params_tree, param_leaves)
    features = jax.tree.unflatten(features_tree[0], feature_leaves)
    outputs = predictor.decode_fn(params, features, text_ids, text_mask, ref_image, ref_prompt,
                                   has_text, has_visual)
    return {key: outputs[key] for key in OUTPUTS}

  leaf_specs = [jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for leaf in leaves]
  k = num_prompts
  with jax.set_mesh(predictor.mesh), nn.logical_axis_rules(predictor.rules):
    encoded = jax.export.export(jax.jit(encode))(leaf_specs, image_spec)
    feature_specs = [jax.ShapeDtypeStruct(aval.shape, aval.dtype) for aval in encoded.out_avals]
    decoded = jax.export.export(jax.jit(decode))(
        leaf_specs, feature_specs, jax.ShapeDtypeStruct((k, length), jnp.int32),
        jax.ShapeDtypeStruct((k, length), jnp.int32), jax.ShapeDtypeStruct((k, size, size, 3), jnp.uint8),
        jax.ShapeDtypeStruct((k, size, size), jnp.float32), jax.ShapeDtypeStruct((k,), jnp.bool_),
        jax.ShapeDtypeStruct((k,), jnp.bool_))
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, ENCODE), "wb") as file:
    file.write(encoded.serialize())
  with open(os.path.join(directory, DECODE), "wb") as file:
    file.write(decoded.serialize())
  np.savez(os.path.join(directory, PARAMS), *[np.asarray(leaf) for leaf in jax.device_get(leaves)])
  shutil.copyfile(predictor.tokenizer.vocab_path, os.path.join(directory, VOCAB))
  with open(os.path.join(directory, METADATA), "w") as file:
    json.dump({"resolution": size, "max_text_len": length, "keep_sep": predictor.tokenizer.keep_sep,
               "union": predictor.union, "num_prompts": k,
               "platforms": list(decoded.platforms)}, file, indent=1)


class ExportedPredictor:
  """`predict.Predictor`'s `set_image` / `predict` over an exported folder (no model code)."""

  def __init__(self, directory: str):
    from omniris_jax.data import tokenizer  # pylint: disable=g-import-not-at-top
    with open(os.path.join(directory, METADATA)) as file:
      metadata = json.load(file)
    self.resolution, self.max_text_len = metadata["resolution"], metadata["max_text_len"]
    self.num_prompts, self.union = metadata["num_prompts"], metadata.get("union", True)
    with open(os.path.join(directory, ENCODE), "rb") as file:
      self._encode = jax.export.deserialize(bytearray(file.read()))
    with open(os.path.join(directory, DECODE), "rb") as file:
      self._decode = jax.export.deserialize(bytearray(file.read()))
    with np.load(os.path.join(directory, PARAMS)) as saved:
      self._params = [jnp.asarray(saved[f"arr_{i}"]) for i in range(len(saved.files))]
    self.tokenizer = tokenizer.Tokenizer(os.path.join(directory, VOCAB), keep_sep=metadata.get("keep_sep", True))
    self._features, self._image_size = None, None

  def set_image(self, image: predict.ImageLike) -> None:
    array = predict.load_image(image, "image")
    self._image_size = array.shape[:2]
    resized = predict.resize_square(array, self.resolution, bilinear=True)[None]
    self._features = self._encode.call(self._params, jnp.asarray(resized))

  def predict(self, prompts: Sequence[predict.Prompt]) -> predict.Prediction:
    if self._features is None:
      raise RuntimeError("ExportedPredictor.predict: call set_image(image) first.")
    if not 0 < len(prompts) <= self.num_prompts:
      raise ValueError(f"ExportedPredictor.predict: give 1 to {self.num_prompts} prompts (exported for "
                       f"{self.num_prompts}); got {len(prompts)}.")
    arrays = predict.prompt_arrays(prompts, self.tokenizer, self.resolution, self.max_text_len, self.num_prompts)
    outputs = jax.device_get(self._decode.call(self._params, self._features, *arrays))
    count, (has_text, has_visual) = len(prompts), arrays[-2:]
    return predict.to_prediction(outputs["mask_logits"][:count], outputs["nt_logits"][:count], self._image_size,
                                 parts=predict.union_parts(outputs, has_text, has_visual, count) if self.union
                                 else ())


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m omniris_jax.export", description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a trained workdir, e.g. workdir/demo")
  parser.add_argument("--stage", default=None, help="the stage to export (default: the last trained one)")
  parser.add_argument("--out", required=True, help="the folder to write")
  parser.add_argument("--prompts", type=int, default=4, help="prompts per decoder call (K)")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  try:
    export_predictor(predict.Predictor.from_workdir(args.workdir, args.stage), args.out, args.prompts)
  except (FileNotFoundError, ValueError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  print(f"Wrote {args.out}: {ENCODE}, {DECODE}, {PARAMS}, {METADATA}, {VOCAB}.")
  return 0


if __name__ == "__main__":
  sys.exit(main())

