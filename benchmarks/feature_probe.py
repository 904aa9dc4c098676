"""Where a trained model keeps each shape's colour: a linear read-out of it from the features of every layer.

Referring to "the orange star" beside a red one needs the colour of each star in the features the fusion head
reads. This script runs a trained checkpoint on the images of a shapes test split, averages each layer's
features over every shape's pixels, and fits a linear read-out (ridge least squares on one-hot targets) of the
shape's colour on two thirds of the shapes; it prints the read-out's accuracy on the other third, over all
seven colours and among the warm ones alone (red, orange, yellow: the group the model confuses most). A layer
that has washed a colour out reads it back near chance (1/7 over all, about 1/3 among the warm ones).

  python benchmarks/feature_probe.py --config=configs/joint.py:demo_long --workdir=workdir/demo_long \
      [--stage=joint] [--split=text_test] [--layers=patch_embed,norm_res2,mask_features,pixel_fusion]

Only layers with square maps of at least 4 x 4 pixels, run on the target images alone, are probed; `--layers`
keeps those whose path contains one of the given names (default: the path from the Swin stem to the fusion head).
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
import jax
import numpy as np
from flax import linen as nn
from flax import traverse_util
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from omniris_jax import steps, train  # noqa: E402
from omniris_jax.data import pipeline  # noqa: E402
from omniris_jax.models import factory  # noqa: E402
from tfds_omniref.omniref import omniref_dataset_builder, shapes  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/joint.py:demo_long", "The config the run trained with.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir.", required=True)
_STAGE = flags.DEFINE_string("stage", None, "The stage whose newest checkpoint to probe (default: the config's).")
_SPLIT = flags.DEFINE_string("split", "text_test", "The shapes test split whose images to probe.")
_LAYERS = flags.DEFINE_list(
    "layers", ["patch_embed/__call__", "norm_res2", "lateral_conv", "output_norm", "pixel_encoder/mask_features",
               "pixel_fusion/pixel_projection", "pixel_fusion/low_level_projection"],
    "Keep the layers whose path contains one of these.")

_WARM = ("red", "orange", "yellow")


def readout_accuracy(train_x, train_y, test_x, test_y, classes: int, ridge: float = 1.0):
  """Accuracy of a ridge least-squares read-out (one-hot targets) of the labels, features standardised."""
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  a, b = (train_x - mean) / std, (test_x - mean) / std
  weights = np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T @ np.eye(classes)[train_y])
  return (np.argmax(b @ weights, axis=1) == test_y).mean()


def main(argv):
  del argv
  try:
    generator = omniref_dataset_builder.shapes_generator(_CONFIG.value.dataset.test_name)
  except ValueError as error:
    raise app.UsageError(str(error)) from error
  trained = train.load_trained_stage(_CONFIG.value, _WORKDIR.value, _STAGE.value)
  config, mesh, rules, model, params = trained.config, trained.mesh, trained.rules, trained.model, trained.params
  source = pipeline.from_tfds(config.dataset.test_name, _SPLIT.value, config.dataset.data_dir)
  dataset = pipeline.make_dataset(
      source, resolution=config.input.resolution, batch_size=config.eval.batch_size,
      max_text_len=config.input.max_text_len, seed=config.seed, shuffle=False, num_epochs=1, prompt_types=None,
      pad_to_full_batches=True, vocab_path=factory.text_encoder_vocab(config))
  capture = jax.jit(lambda p, batch: model.apply(
      {"params": p}, **steps.model_inputs(batch, ("text",)), deterministic=True, capture_intermediates=True,
      mutable=["intermediates"])[1]["intermediates"])

  colours = list(shapes.COLOURS)
  features: dict[str, list] = {}
  sizes: dict[str, int] = {}
  labels, seen = [], 0
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for batch in dataset:
      flat = traverse_util.flatten_dict(jax.device_get(capture(params, batch)), sep="/")
      layers = {}
      for path, value in flat.items():
        value = value[0] if isinstance(value, tuple) else value
        wanted = any(name in path for name in _LAYERS.value)
        if not wanted or getattr(value, "ndim", 0) != 4 or value.shape[1] != value.shape[2] or value.shape[1] < 4:
          continue
        if value.shape[0] != batch["index"].shape[0]:
          continue  # a layer run on more than the target images (e.g. with the reference image)
        layers[path] = value
        sizes.setdefault(path, value.shape[1])
      rows = [r for r in range(batch["index"].shape[0]) if batch["index"][r] >= 0]
      for row in rows:
        _, scene = shapes.generate_example_and_scene(generator, _SPLIT.value, int(batch["index"][row]))
        for path, value in layers.items():
          size = sizes[path]
          centres = ((np.arange(size) + 0.5) * generator.image_size / size).astype(int)
          per_object = []
          for mask in scene.instance_masks:
            small = mask[centres][:, centres]
            per_object.append(value[row][small].mean(0) if small.any() else value[row].mean((0, 1)))
          features.setdefault(path, []).append(np.asarray(per_object, np.float32))
        labels += [colours.index(obj.colour) for obj in scene.objects]
        seen += 1
  labels = np.asarray(labels)
  order = np.random.default_rng(0).permutation(len(labels))
  train_ids, test_ids = order[: 2 * len(order) // 3], order[2 * len(order) // 3:]
  warm = np.isin(labels[test_ids], [colours.index(c) for c in _WARM])
  print(f"\nColour read-out from each layer: {seen} images of {_SPLIT.value}, {len(labels)} shapes "
        f"({len(test_ids)} held out), stage {config.stage!r} at step {trained.step} ({_WORKDIR.value}).\n")
  print("| layer | stride | channels | all 7 colours | warm only (red / orange / yellow) |")
  print("|---|---:|---:|---:|---:|")
  for path, parts in features.items():
    x = np.concatenate(parts)
    accuracy = readout_accuracy(x[train_ids], labels[train_ids], x[test_ids], labels[test_ids], len(colours))
    warm_accuracy = readout_accuracy(x[train_ids], labels[train_ids], x[test_ids][warm], labels[test_ids][warm],
                                     len(colours))
    stride = config.input.resolution // sizes[path]
    print(f"| {path.removesuffix('/__call__')} | {stride} | {x.shape[1]} | {accuracy:.2f} | {warm_accuracy:.2f} |")


if __name__ == "__main__":
  app.run(main)
