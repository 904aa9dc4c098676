"""The shapes model's loss: the core OmniSegNet loss plus the terms of its two extra heads.

  category  (`category_weight`) CE of `category_logits` against the batch's `category_map` (0 background,
            1 + category; generated training data only), background weighted by `category_background_weight`,
            on every example.
  colour    (`colour_weight`) self-supervised: squared error of `colour` (B, h, w, 3) against the batch's own
            `image` area-averaged to (h, w) and scaled to [-1, 1], summed over the channels and averaged over the
            pixels; with a `category_map` in the batch, background pixels weigh `colour_background_weight`
            (objects 1), on every example.

  total = core total + loss_scale * (category_weight * category + colour_weight * colour)
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from omniris_jax import losses

Array = jax.Array


def default_loss_config() -> ml_collections.ConfigDict:
  """`losses.default_loss_config()` plus this module's fields (all terms off)."""
  c = losses.default_loss_config()
  c.category_weight = 0.0  # Weight of the scene-parsing CE; needs the model's num_categories and category maps.
  c.category_background_weight = 1.0  # Weight of the background class in that CE (objects weigh 1).
  c.colour_weight = 0.0  # Weight of the colour term; needs the model's colour_head.
  c.colour_background_weight = 1.0  # Weight of background pixels in it when the batch has a category_map.
  return c


def compute_losses(outputs: Mapping[str, Array], batch: Mapping[str, Any], config: Any) -> tuple[Array, dict]:
  """`losses.compute_losses` plus the category and colour terms (module docstring); their metrics are
  "category_loss" and "colour_loss" when the terms are on."""
  total, metrics = losses.compute_losses(outputs, batch, config)
  batch_size = jnp.asarray(batch["mask"]).shape[0]
  valid = jnp.asarray(batch["index"]) >= 0 if "index" in batch else jnp.ones((batch_size,), bool)
  category_weight = getattr(config, "category_weight", 0.0)
  if category_weight:
    if "category_logits" not in outputs or "category_map" not in batch:
      raise KeyError("compute_losses: category_weight > 0 needs outputs['category_logits'] (set the model's "
                     "num_categories) and batch['category_map'] (generated training data with category maps)")
    category_term = category_loss(outputs["category_logits"], jnp.asarray(batch["category_map"]), valid,
                                  getattr(config, "category_background_weight", 1.0))
    total = total + config.loss_scale * category_weight * category_term
    metrics["category_loss"] = category_term.astype(jnp.float32)
  colour_weight = getattr(config, "colour_weight", 0.0)
  if colour_weight:
    if "colour" not in outputs or "image" not in batch:
      raise KeyError("compute_losses: colour_weight > 0 needs outputs['colour'] (set the model's colour_head) and "
                     "batch['image']")
    objects = jnp.asarray(batch["category_map"]) > 0 if "category_map" in batch else None
    colour_term = colour_loss(outputs["colour"], jnp.asarray(batch["image"]), valid, objects,
                              getattr(config, "colour_background_weight", 1.0))
    total = total + config.loss_scale * colour_weight * colour_term
    metrics["colour_loss"] = colour_term.astype(jnp.float32)
  metrics["loss"] = jnp.asarray(total, jnp.float32)
  return total, metrics


def _per_example(valid: Array, ndim: int) -> Array:
  return valid.reshape(valid.shape + (1,) * (ndim - 1))


def category_loss(category_logits: Array, category_map: Array, valid: Array,
                  background_weight: float = 1.0) -> Array:
  """CE of (B, h, w, K) logits, bilinearly upsampled, against (B, H, W) integer labels in [0, K); class 0
  (background) weighs `background_weight`, every category 1 (normalised like torch's weighted CE)."""
  batch, height, width = category_map.shape
  logits = category_logits.astype(jnp.float32)
  if logits.shape[1:3] != (height, width):
    logits = jax.image.resize(logits, (batch, height, width, logits.shape[-1]), method="bilinear",
                              antialias=False)
  class_weights = jnp.ones((logits.shape[-1],)).at[0].set(background_weight)
  return losses.weighted_cross_entropy(logits, category_map, class_weights, _per_example(valid, 3))


def colour_loss(colour: Array, image: Array, valid: Array, objects: Array | None = None,
                background_weight: float = 1.0) -> Array:
  """Squared error of (B, h, w, 3) predictions against the (B, H, W, 3) 0..255 `image` area-averaged to (h, w)
  and scaled to [-1, 1], summed over channels and averaged over the `valid` examples' pixels; with (B, H, W)
  bool `objects`, a pixel weighs background_weight + (1 - background_weight) * (its object fraction)."""
  batch, h, w, channels = colour.shape
  if image.ndim != 4 or image.shape[0] != batch or image.shape[-1] != channels:
    raise ValueError(f"colour_loss: {image.shape=} must be (B={batch}, H, W, {channels}) for {colour.shape=}")
  target = _area_average(image.astype(jnp.float32), h, w) / 127.5 - 1.0
  error = jnp.square(colour.astype(jnp.float32) - target).sum(axis=-1)
  weights = jnp.broadcast_to(_per_example(valid, 3), error.shape).astype(jnp.float32)
  if objects is not None:
    fraction = _area_average(objects.astype(jnp.float32)[..., None], h, w)[..., 0]
    weights = weights * (background_weight + (1.0 - background_weight) * fraction)
  return (weights * error).sum() / jnp.maximum(weights.sum(), 1e-12)


def _area_average(x: Array, h: int, w: int) -> Array:
  """(B, H, W, C) -> (B, h, w, C): the mean of each cell's pixels when h and w divide H and W (the stride-4
  grid of any input the model accepts), else an antialiased bilinear resize."""
  batch, height, width, channels = x.shape
  if height % h or width % w:
    return jax.image.resize(x, (batch, h, w, channels), method="linear", antialias=True)
  return x.reshape(batch, h, height // h, w, width // w, channels).mean(axis=(2, 4))
