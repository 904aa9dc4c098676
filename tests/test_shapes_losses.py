"""Tests of the shapes project's loss (omniris_jax/models/proj/shapes/losses.py): the category and colour terms by
hand, and compute_losses = the core total plus those terms."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from omniris_jax import losses
from omniris_jax.models.proj.shapes import losses as shapes_losses

from test_losses import _outputs_and_batch  # noqa: E402  (tests/ is on sys.path under pytest)


def _config(**overrides):
  config = shapes_losses.default_loss_config()
  config.update(overrides)
  return config


def _core_total(outputs, batch):
  return losses.compute_losses(outputs, batch, losses.default_loss_config())[0]


def test_default_config_is_the_core_config_plus_the_terms_off():
  core = losses.default_loss_config().to_dict()
  config = shapes_losses.default_loss_config().to_dict()
  assert {k: v for k, v in config.items() if k in core} == core
  assert {k: v for k, v in config.items() if k not in core} == {
      "category_weight": 0.0, "category_background_weight": 1.0, "colour_weight": 0.0,
      "colour_background_weight": 1.0}
  # Terms off: the core loss and metrics, even with the heads' outputs present.
  outputs, batch = _outputs_and_batch()
  outputs["category_logits"] = jnp.zeros((3, 4, 4, 9))
  outputs["colour"] = jnp.zeros((3, 4, 4, 3))
  total, metrics = shapes_losses.compute_losses(outputs, batch, _config())
  core_total, core_metrics = losses.compute_losses(outputs, batch, losses.default_loss_config())
  np.testing.assert_array_equal(total, core_total)
  assert sorted(metrics) == sorted(core_metrics)
  for name, value in core_metrics.items():
    np.testing.assert_array_equal(metrics[name], value, err_msg=name)


def test_category_loss_by_hand_and_in_the_total():
  # 2 x 2 logits upsampled to 4 x 4 are constant within each stride-2 cell only at its centre, so use 1 x 1
  # logits (constant everywhere) for an exact hand computation.
  logits = jnp.asarray(np.log(np.array([0.7, 0.2, 0.1], np.float32)))[None, None, None]
  labels = np.zeros((1, 4, 4), np.int32)
  labels[0, :2] = 2  # 8 pixels of class 2, 8 of class 0
  expected = -(8 * math.log(0.7) + 8 * math.log(0.1)) / 16
  np.testing.assert_allclose(shapes_losses.category_loss(logits, jnp.asarray(labels), jnp.ones((1,), bool)),
                             expected, rtol=1e-5)
  outputs, batch = _outputs_and_batch()
  rng = np.random.default_rng(1)
  outputs["category_logits"] = jnp.asarray(rng.normal(size=(3, 4, 4, 9)).astype(np.float32))
  batch["category_map"] = rng.integers(0, 9, size=(3, 16, 16)).astype(np.uint8)
  plain = _core_total(outputs, batch)
  total, metrics = shapes_losses.compute_losses(outputs, batch, _config(category_weight=0.5))
  term = shapes_losses.category_loss(outputs["category_logits"], jnp.asarray(batch["category_map"]),
                                     jnp.ones((3,), bool))
  np.testing.assert_allclose(metrics["category_loss"], term, rtol=1e-6)
  np.testing.assert_allclose(total, plain + 5.0 * 0.5 * term, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], total)
  del batch["category_map"]
  with pytest.raises(KeyError, match="category_map"):
    shapes_losses.compute_losses(outputs, batch, _config(category_weight=0.5))


def test_colour_loss_by_hand_weighting_and_in_the_total():
  # A 4 x 4 image whose left half is red (255, 0, 0) and right half black, read on a 2 x 2 grid: each cell's
  # target is its 2 x 2 block's mean scaled to [-1, 1], so left cells (1, -1, -1) and right cells (-1, -1, -1).
  image = np.zeros((1, 4, 4, 3), np.uint8)
  image[0, :, :2, 0] = 255
  prediction = np.zeros((1, 2, 2, 3), np.float32)  # squared error 1 + 1 + 1 = 3 in every cell
  np.testing.assert_allclose(
      shapes_losses.colour_loss(jnp.asarray(prediction), jnp.asarray(image), jnp.ones((1,), bool)), 3.0, rtol=1e-6)
  prediction[0, :, 0] = (1, -1, -1)  # the left (object) cells now exact
  objects = np.zeros((1, 4, 4), bool)
  objects[0, :, :2] = True
  args = (jnp.asarray(prediction), jnp.asarray(image), jnp.ones((1,), bool))
  np.testing.assert_allclose(shapes_losses.colour_loss(*args), 1.5, rtol=1e-6)
  # Background at weight 0.2: (2 cells * 1 * 0 + 2 cells * 0.2 * 3) / (2 * 1 + 2 * 0.2)
  np.testing.assert_allclose(shapes_losses.colour_loss(*args, jnp.asarray(objects), 0.2), 1.2 / 2.4, rtol=1e-6)

  outputs, batch = _outputs_and_batch()
  rng = np.random.default_rng(2)
  outputs["colour"] = jnp.asarray(rng.normal(size=(3, 4, 4, 3)).astype(np.float32))
  batch["image"] = rng.integers(0, 256, size=(3, 16, 16, 3)).astype(np.uint8)
  batch["category_map"] = rng.integers(0, 9, size=(3, 16, 16)).astype(np.uint8)
  batch["index"] = np.array([0, 1, -1])  # a padding row counts nowhere
  plain = _core_total(outputs, batch)
  total, metrics = shapes_losses.compute_losses(outputs, batch,
                                                _config(colour_weight=0.5, colour_background_weight=0.1))
  term = shapes_losses.colour_loss(outputs["colour"][:2], jnp.asarray(batch["image"][:2]), jnp.ones((2,), bool),
                                   jnp.asarray(batch["category_map"][:2] > 0), 0.1)
  np.testing.assert_allclose(metrics["colour_loss"], term, rtol=1e-6)
  np.testing.assert_allclose(total, plain + 5.0 * 0.5 * term, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], total)
  del outputs["colour"]
  with pytest.raises(KeyError, match="colour_head"):
    shapes_losses.compute_losses(outputs, batch, _config(colour_weight=0.5))
