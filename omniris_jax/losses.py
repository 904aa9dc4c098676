"""OmniSegNet's training losses: what the model's output dict is pulled towards, for any batch of the contract.

The terms (ReLA's and the release's `ReferringCriterion`; paper eq. 11 with free lambdas):

  mask       class-weighted 2-class cross-entropy of the stride-4 mask logits against the ground-truth mask at
             full resolution: the logits are bilinearly UPSAMPLED to the ground truth's size (half-pixel centres,
             as F.interpolate(align_corners=False)); the ground truth is never downsampled (`mask_resolution`
             'logits' does that instead, a cheaper option for large inputs).
  region     class-weighted cross-entropy of the q x q region ("minimap") logits against the ground truth resized
             to q x q. 'center' (ReLA): bilinear resize without antialiasing, then truncation to int, i.e. a cell is
             foreground when the ground truth is foreground at (all pixels around) its centre; 'any': the cell
             holds any referent pixel (max-pool), which keeps small objects visible on a coarse grid.
  no_target  cross-entropy of the (B, 2) no-target logits against `no_target` (channel 1 = no target):
             'ce' (ReLA: class weights [0.9, 1.1]), 'balanced' (the two classes of the batch weigh equally
             whatever their frequency), or 'focal' (focal loss with `focal_gamma`, class weights as alpha).

  dice       (optional, `dice_weight`, 0 in ReLA) 1 - (2 sum(p g) + 1) / (sum p + sum g + 1) per example on the
             full-resolution foreground probability p, averaged over the examples WITH a referent. The
             class-weighted CE alone lets an unsure model paint nothing when referents are small (p_fg < 0.5
             everywhere is its cheapest guess); dice scores the overlap itself. On an empty ground truth dice would
             charge half its maximum for one painted pixel, so no-target examples are left to the CE and the
             no-target term.

  `mask_loss_on_no_target=False` also drops no-target examples from the mask and region terms (ReLA: True).

  total = loss_scale * (mask_weight * mask + region_weight * region + nt_weight * no_target + dice_weight * dice)
          + per_prompt_weight * (the same sum on each prompt's own outputs, omni examples only)

Per-prompt terms: an omni example (has_text and has_visual) also carries each prompt's own ground truth
(`text_mask`, `visual_mask`), so the per-prompt outputs (`text_*_logits`, `visual_*_logits`) get the three terms
against it; a prompt's no-target label is "its ground truth is empty". Examples that lack either prompt are
masked out of these terms (their per-prompt outputs are an empty prompt's, and for single-prompt examples the
combined outputs already are the prompt's), so they add nothing and get no gradient from them.

Cross-entropies with class weights are normalised like torch's `F.cross_entropy(weight=...)`: the sum of
w[y] * nll over the counted elements divided by the sum of w[y] over them. Padding rows (`index == -1`) and
masked-out examples count nowhere. Everything is computed in float32.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections

Array = jax.Array

MASK_RESOLUTIONS = ("full", "logits")
REGION_TARGETS = ("center", "any")
NT_LOSSES = ("ce", "balanced", "focal")
_PER_PROMPT = ("text", "visual")
# A bilinear downsample of a binary mask equals 1 only up to float rounding when every tap is foreground.
_CENTER_THRESHOLD = 1.0 - 1e-3


def default_loss_config() -> ml_collections.ConfigDict:
  """The loss config (the trainer keeps it at `config.loss`); defaults = the release/ReLA recipe."""
  c = ml_collections.ConfigDict()
  c.loss_scale = 5.0  # Multiplies the three combined terms (ReLA's loss weight 5.0).
  c.mask_weight = 1.0  # lambda_1: full-resolution mask cross-entropy.
  c.region_weight = 0.1  # lambda_2: region ("minimap") cross-entropy on the q x q grid.
  c.nt_weight = 0.1  # lambda_3: no-target cross-entropy.
  c.class_weights = (0.9, 1.1)  # (background, foreground) weights of every cross-entropy (ReLA).
  # 'full': upsample the stride-4 logits to the ground truth's size (ReLA); 'logits': downsample the ground
  # truth to the logits' size (antialiased bilinear, threshold 0.5): cheaper at 480, coarser boundaries.
  c.mask_resolution = "full"
  # 'center': ReLA's bilinear resize + truncation; 'any': a cell is foreground if any referent pixel falls in it.
  c.region_target = "center"
  # 'ce' (ReLA, class_weights), 'balanced' (both classes of the batch weigh half), 'focal' (class_weights as alpha).
  c.nt_loss = "ce"
  c.focal_gamma = 2.0  # Only for nt_loss='focal'.
  # Weight of the per-prompt terms of omni examples, relative to the combined terms (each uses the same scale and
  # lambdas); 0 skips them (and their cost).
  c.per_prompt_weight = 1.0
  c.dice_weight = 0.0  # Weight of the optional dice term on the full-resolution mask (0 = ReLA: CE only).
  # Whether no-target examples also train the masks towards empty (ReLA). False: the mask and region terms count
  # only examples with a referent, and the no-target head alone answers "is it there?".
  c.mask_loss_on_no_target = True
  return c


def _check_config(config: Any) -> None:
  for name, allowed in (("mask_resolution", MASK_RESOLUTIONS), ("region_target", REGION_TARGETS),
                        ("nt_loss", NT_LOSSES)):
    if getattr(config, name) not in allowed:
      raise ValueError(f"loss config: {name}={getattr(config, name)!r} must be one of {allowed}")
  if len(tuple(config.class_weights)) != 2:
    raise ValueError(f"loss config: class_weights={config.class_weights!r} must be (background, foreground)")


def weighted_cross_entropy(logits: Array, labels: Array, class_weights: Any, valid: Array | None = None) -> Array:
  """torch `F.cross_entropy(logits, labels, weight=class_weights)` over the `valid` elements.

  Args:
    logits: (..., C) unnormalised scores.
    labels: (...) integer classes.
    class_weights: (C,) per-class weights.
    valid: (...) bool or {0, 1}, broadcastable to labels; None counts every element.

  Returns:
    sum(valid * w[y] * nll) / sum(valid * w[y]); 0 when nothing is counted.
  """
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.int32)
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[..., None], axis=-1)[..., 0]
  weights = jnp.asarray(class_weights, jnp.float32)[labels]
  if valid is not None:
    weights = weights * jnp.broadcast_to(valid, labels.shape).astype(jnp.float32)
  denominator = weights.sum()
  return (weights * nll).sum() / jnp.maximum(denominator, 1e-12)


def _per_example_valid(valid: Array, ndim: int) -> Array:
  return valid.reshape(valid.shape + (1,) * (ndim - 1))


def mask_loss(mask_logits: Array, gt_mask: Array, class_weights: Any, valid: Array,
              resolution: str = "full") -> Array:
  """Class-weighted CE of (B, h, w, 2) logits against a (B, H, W) {0, 1} mask (see the module docstring)."""
  batch, height, width = gt_mask.shape
  if mask_logits.ndim != 4 or mask_logits.shape[0] != batch or mask_logits.shape[-1] != 2:
    raise ValueError(f"mask_loss: {mask_logits.shape=} must be (B={batch}, h, w, 2) for gt {gt_mask.shape=}")
  labels = gt_mask.astype(jnp.int32)
  logits = mask_logits.astype(jnp.float32)
  if resolution == "full":
    if logits.shape[1:3] != (height, width):
      logits = jax.image.resize(logits, (batch, height, width, 2), method="bilinear", antialias=False)
  else:
    h, w = logits.shape[1:3]
    if (h, w) != (height, width):
      area = jax.image.resize(gt_mask.astype(jnp.float32), (batch, h, w), method="linear", antialias=True)
      labels = (area >= 0.5).astype(jnp.int32)
  return weighted_cross_entropy(logits, labels, class_weights, _per_example_valid(valid, 3))


def dice_loss(mask_logits: Array, gt_mask: Array, valid: Array) -> Array:
  """Mean over the `valid` examples of 1 - (2 sum(p g) + 1) / (sum p + sum g + 1), p = softmax foreground
  probability of the logits upsampled (bilinear) to the (B, H, W) ground truth's size."""
  batch, height, width = gt_mask.shape
  logits = mask_logits.astype(jnp.float32)
  if logits.shape[1:3] != (height, width):
    logits = jax.image.resize(logits, (batch, height, width, 2), method="bilinear", antialias=False)
  probability = jax.nn.softmax(logits, axis=-1)[..., 1]
  target = gt_mask.astype(jnp.float32)
  numerator = 2.0 * (probability * target).sum(axis=(1, 2)) + 1.0
  denominator = probability.sum(axis=(1, 2)) + target.sum(axis=(1, 2)) + 1.0
  valid = valid.astype(jnp.float32)
  return ((1.0 - numerator / denominator) * valid).sum() / jnp.maximum(valid.sum(), 1.0)


def region_targets(gt_mask: Array, grid: tuple[int, int], mode: str = "center") -> Array:
  """The (B, q, q) int labels of the region head: the (B, H, W) ground truth resized to the query grid.

  'center' is ReLA's `F.interpolate(bilinear, align_corners=False).long()` (truncation: 1 only where every
  bilinear tap is foreground); 'any' marks a cell that contains any foreground pixel (the grid need not divide
  the image: cell i covers pixels [floor(i H / q), ceil((i + 1) H / q))).
  """
  batch, height, width = gt_mask.shape
  rows, cols = grid
  mask = gt_mask.astype(jnp.float32)
  if mode == "center":
    resized = jax.image.resize(mask, (batch, rows, cols), method="linear", antialias=False)
    return (resized >= _CENTER_THRESHOLD).astype(jnp.int32)

  def cell_bounds(size, cells):
    starts = [(i * size) // cells for i in range(cells)]
    stops = [-(-((i + 1) * size) // cells) for i in range(cells)]
    return starts, stops

  row_starts, row_stops = cell_bounds(height, rows)
  col_starts, col_stops = cell_bounds(width, cols)
  # Cumulative maxima are not separable by slicing, so reduce each band (static, small loops: q <= ~16).
  row_bands = jnp.stack([mask[:, a:b].max(axis=1) for a, b in zip(row_starts, row_stops)], axis=1)
  cells = jnp.stack([row_bands[:, :, a:b].max(axis=2) for a, b in zip(col_starts, col_stops)], axis=2)
  return (cells > 0).astype(jnp.int32)


def region_loss(region_logits: Array, gt_mask: Array, class_weights: Any, valid: Array,
                mode: str = "center") -> Array:
  """Class-weighted CE of (B, q, q, 2) region logits against the ground truth resized to q x q."""
  if region_logits.ndim != 4 or region_logits.shape[-1] != 2 or region_logits.shape[0] != gt_mask.shape[0]:
    raise ValueError(f"region_loss: {region_logits.shape=} must be (B={gt_mask.shape[0]}, q, q, 2)")
  labels = region_targets(gt_mask, region_logits.shape[1:3], mode)
  return weighted_cross_entropy(region_logits, labels, class_weights, _per_example_valid(valid, 3))


def no_target_loss(nt_logits: Array, no_target: Array, valid: Array, config: Any) -> Array:
  """Loss of the (B, 2) no-target logits (channel 1 = no target) by `config.nt_loss` (module docstring)."""
  labels = no_target.astype(jnp.int32)
  valid = valid.astype(jnp.float32)
  if config.nt_loss == "ce":
    return weighted_cross_entropy(nt_logits, labels, config.class_weights, valid)
  log_probs = jax.nn.log_softmax(nt_logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
  if config.nt_loss == "balanced":
    # Mean NLL of each class present in the batch, averaged over the classes present: a 1:2 batch still
    # pulls as hard towards "no target" as towards "target", so the head cannot settle at the class prior.
    per_class, present = [], []
    for label in (0, 1):
      member = valid * (labels == label)
      count = member.sum()
      per_class.append((member * nll).sum() / jnp.maximum(count, 1.0))
      present.append((count > 0).astype(jnp.float32))
    present = jnp.stack(present)
    return (jnp.stack(per_class) * present).sum() / jnp.maximum(present.sum(), 1.0)
  # Focal: alpha[y] * (1 - p_y)^gamma * nll, normalised by the alpha weights like the CE.
  p_true = jnp.exp(-nll)
  alpha = jnp.asarray(config.class_weights, jnp.float32)[labels] * valid
  focal = alpha * (1.0 - p_true) ** config.focal_gamma * nll
  return focal.sum() / jnp.maximum(alpha.sum(), 1e-12)


def _terms(outputs: Mapping[str, Array], prefix: str, gt_mask: Array, no_target: Array, valid: Array,
           config: Any) -> dict[str, Array]:
  """The three weighted-sum inputs for one output set (prefix '' combined, 'text_' or 'visual_')."""
  painted = valid if getattr(config, "mask_loss_on_no_target", True) else valid & ~no_target
  return {
      "mask": mask_loss(outputs[f"{prefix}mask_logits"], gt_mask, config.class_weights, painted,
                        config.mask_resolution),
      "region": region_loss(outputs[f"{prefix}region_logits"], gt_mask, config.class_weights, painted,
                            config.region_target),
      "no_target": no_target_loss(outputs[f"{prefix}nt_logits"], no_target, valid, config),
      "dice": (dice_loss(outputs[f"{prefix}mask_logits"], gt_mask, valid & ~no_target) if _dice_weight(config)
               else jnp.zeros((), jnp.float32)),
  }


def _weighted_sum(terms: Mapping[str, Array], config: Any) -> Array:
  return config.loss_scale * (config.mask_weight * terms["mask"] + config.region_weight * terms["region"]
                              + config.nt_weight * terms["no_target"] + _dice_weight(config) * terms["dice"])


def _dice_weight(config: Any) -> float:
  return getattr(config, "dice_weight", 0.0)  # Configs written before the dice term have none.


def compute_losses(outputs: Mapping[str, Array], batch: Mapping[str, Any], config: Any) -> tuple[Array, dict]:
  """The training loss of one batch and its parts.

  Args:
    outputs: OmniSegNet's output dict (omnisegnet.py docstring): "mask_logits" (B, h, w, 2), "region_logits"
      (B, q, q, 2), "nt_logits" (B, 2), and, for the per-prompt terms, "text_*"/"visual_*" of the same shapes.
    batch: the batch contract (data/pipeline.py): "mask" (B, H, W), "no_target" (B,); for the per-prompt terms
      also "text_mask", "visual_mask", "has_text", "has_visual"; an optional "index" marks padding rows with -1.
    config: `default_loss_config()` or a ConfigDict/object with the same fields.

  Returns:
    (total loss scalar, metrics): metrics holds float32 scalars "loss", "mask_loss", "region_loss",
    "nt_loss", "dice_loss" (0 when dice_weight is 0), "nt_accuracy" (batch accuracy of the combined no-target
    call), and per prompt "{text,visual}_{mask,region,nt,dice}_loss" and "{text,visual}_loss" plus "num_omni"
    when the per-prompt terms are on.
  """
  _check_config(config)
  for key in ("mask", "no_target"):
    if key not in batch:
      raise KeyError(f"compute_losses: batch lacks {key!r}; pass a batch of the contract in data/pipeline.py")
  for key in ("mask_logits", "region_logits", "nt_logits"):
    if key not in outputs:
      raise KeyError(f"compute_losses: outputs lack {key!r} (have {sorted(outputs)}); pass OmniSegNet's output dict")
  gt_mask = jnp.asarray(batch["mask"])
  if gt_mask.ndim == 4 and gt_mask.shape[-1] == 1:
    gt_mask = gt_mask[..., 0]
  if gt_mask.ndim != 3:
    raise ValueError(f"compute_losses: batch['mask'].shape={gt_mask.shape} must be (B, H, W)")
  batch_size = gt_mask.shape[0]
  no_target = jnp.asarray(batch["no_target"]).astype(bool)
  valid = jnp.ones((batch_size,), bool)
  if "index" in batch:
    valid = jnp.asarray(batch["index"]) >= 0

  terms = _terms(outputs, "", gt_mask, no_target, valid, config)
  total = _weighted_sum(terms, config)
  metrics = {"mask_loss": terms["mask"], "region_loss": terms["region"], "nt_loss": terms["no_target"],
             "dice_loss": terms["dice"]}
  predicted_nt = jnp.argmax(outputs["nt_logits"], axis=-1).astype(bool)
  metrics["nt_accuracy"] = ((predicted_nt == no_target) * valid).sum() / jnp.maximum(valid.sum(), 1)

  if config.per_prompt_weight:
    missing = [k for k in ("text_mask", "visual_mask", "has_text", "has_visual") if k not in batch]
    if missing:
      raise KeyError(f"compute_losses: per_prompt_weight={config.per_prompt_weight} needs batch keys {missing}; "
                     "set config.loss.per_prompt_weight=0 for batches without per-prompt ground truth")
    omni = valid & jnp.asarray(batch["has_text"]).astype(bool) & jnp.asarray(batch["has_visual"]).astype(bool)
    metrics["num_omni"] = omni.sum().astype(jnp.float32)
    for name in _PER_PROMPT:
      if f"{name}_mask_logits" not in outputs:
        continue  # A batch without this modality at all (e.g. a visual-only stage): no omni examples either.
      prompt_gt = jnp.asarray(batch[f"{name}_mask"])
      if prompt_gt.ndim == 4:
        prompt_gt = prompt_gt[..., 0]
      prompt_nt = ~prompt_gt.astype(bool).any(axis=(1, 2))
      prompt_terms = _terms(outputs, f"{name}_", prompt_gt, prompt_nt, omni, config)
      # No omni example in the batch -> every term is 0 (normalisers are guarded), and so is the gradient.
      prompt_total = _weighted_sum(prompt_terms, config)
      total = total + config.per_prompt_weight * prompt_total
      metrics.update({f"{name}_mask_loss": prompt_terms["mask"], f"{name}_region_loss": prompt_terms["region"],
                      f"{name}_nt_loss": prompt_terms["no_target"], f"{name}_dice_loss": prompt_terms["dice"],
                      f"{name}_loss": prompt_total})
  metrics["loss"] = total
  return total, {key: jnp.asarray(value, jnp.float32) for key, value in metrics.items()}
