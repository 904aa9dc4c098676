"""Tests of omniris_jax.losses: each term by hand on small cases, torch parity for the resizes, masking, gradients.

The reference for the mask and region terms is ReLA's criterion in PyTorch: `F.interpolate(bilinear,
align_corners=False)` + `F.cross_entropy(weight=[0.9, 1.1])`, and `.long()` of the bilinearly downsampled mask.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omniris_jax import losses

WEIGHTS = (0.9, 1.1)


def _config(**overrides):
  config = losses.default_loss_config()
  config.update(overrides)
  return config


def _outputs_and_batch(seed=0, batch=3, size=16, grid=4, omni=(True, False, False)):
  """Random model outputs (stride 4) and a batch of the contract with a mix of omni / single-prompt examples."""
  rng = np.random.default_rng(seed)

  def logits(*shape):
    return jnp.asarray(rng.normal(size=shape).astype(np.float32))

  outputs = {}
  for prefix in ("", "text_", "visual_"):
    outputs[f"{prefix}mask_logits"] = logits(batch, size // 4, size // 4, 2)
    outputs[f"{prefix}region_logits"] = logits(batch, grid, grid, 2)
    outputs[f"{prefix}nt_logits"] = logits(batch, 2)
  text_mask = (rng.random((batch, size, size)) < 0.3).astype(np.uint8)
  visual_mask = (rng.random((batch, size, size)) < 0.3).astype(np.uint8)
  text_mask[1] = 0  # an empty per-prompt ground truth -> that prompt's no-target label is 1
  omni = np.asarray(omni)
  batch_dict = {
      "mask": np.maximum(text_mask, visual_mask),
      "text_mask": text_mask,
      "visual_mask": visual_mask,
      "no_target": np.zeros((batch,), bool),
      "has_text": np.ones((batch,), bool),
      "has_visual": omni.copy(),
      "index": np.arange(batch),
  }
  return outputs, batch_dict


# ----------------------------------------------------------------------------------------------------------------
# Cross-entropy with class weights
# ----------------------------------------------------------------------------------------------------------------


def test_weighted_cross_entropy_by_hand():
  logits = jnp.array([[0.0, 0.0], [0.0, math.log(3.0)]])
  labels = jnp.array([0, 1])
  # nll: log 2 (uniform) and -log(3/4); torch normalises by the sum of the weights of the labels.
  expected = (0.9 * math.log(2.0) + 1.1 * math.log(4.0 / 3.0)) / (0.9 + 1.1)
  np.testing.assert_allclose(losses.weighted_cross_entropy(logits, labels, WEIGHTS), expected, rtol=1e-6)
  # A masked-out element counts in neither the sum nor the normaliser.
  np.testing.assert_allclose(losses.weighted_cross_entropy(logits, labels, WEIGHTS, jnp.array([False, True])),
                             math.log(4.0 / 3.0), rtol=1e-6)


def test_mask_loss_upsamples_logits_to_the_ground_truth_by_hand():
  # Constant logits (0, a) stay constant when upsampled, so every pixel has the same two nll values.
  a = 1.5
  logits = jnp.broadcast_to(jnp.array([0.0, a]), (1, 2, 2, 2))
  gt = np.zeros((1, 8, 8), np.uint8)
  gt[0, :, :2] = 1  # 16 foreground pixels, 48 background
  nll_fg, nll_bg = math.log1p(math.exp(-a)), math.log1p(math.exp(a))
  expected = (1.1 * 16 * nll_fg + 0.9 * 48 * nll_bg) / (1.1 * 16 + 0.9 * 48)
  got = losses.mask_loss(logits, jnp.asarray(gt), WEIGHTS, jnp.ones((1,), bool))
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_mask_and_region_terms_equal_relas_torch_criterion():
  torch = pytest.importorskip("torch")
  functional = torch.nn.functional
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 8, 8, 2)).astype(np.float32) * 3
  region_logits = rng.normal(size=(2, 10, 10, 2)).astype(np.float32)
  gt = np.zeros((2, 32, 32), np.uint8)
  gt[0, 3:20, 5:29] = 1
  gt[1, 10:31, 0:9] = 1
  gt[1, 0:4, 28:32] = 1
  weight = torch.tensor(WEIGHTS)
  torch_gt = torch.from_numpy(gt).float()[:, None]

  upsampled = functional.interpolate(torch.from_numpy(logits).permute(0, 3, 1, 2), (32, 32), mode="bilinear",
                                     align_corners=False)
  expected_mask = functional.cross_entropy(upsampled, torch_gt[:, 0].long(), weight=weight).item()
  # ReLA truncates with .long(), so a cell whose taps are all foreground but whose float sum rounds to 0.99999994
  # is lost; ours counts it (threshold 1 - 1e-3), which is the rule ReLA's truncation means.
  minimap = (functional.interpolate(torch_gt, (10, 10), mode="bilinear", align_corners=False)[:, 0]
             >= 1 - 1e-3).long()
  expected_region = functional.cross_entropy(torch.from_numpy(region_logits).permute(0, 3, 1, 2), minimap,
                                             weight=weight).item()

  valid = jnp.ones((2,), bool)
  np.testing.assert_array_equal(losses.region_targets(jnp.asarray(gt), (10, 10), "center"), minimap.numpy())
  np.testing.assert_allclose(losses.mask_loss(jnp.asarray(logits), jnp.asarray(gt), WEIGHTS, valid),
                             expected_mask, rtol=1e-4)
  np.testing.assert_allclose(losses.region_loss(jnp.asarray(region_logits), jnp.asarray(gt), WEIGHTS, valid),
                             expected_region, rtol=1e-4)


def test_dice_loss_by_hand():
  # Uniform logits -> p = 0.5 at every one of 64 pixels; 16 are foreground.
  gt = np.zeros((2, 8, 8), np.uint8)
  gt[:, :, :2] = 1
  logits = jnp.zeros((2, 2, 2, 2)).at[1].set(jnp.array([0.0, 50.0]))  # example 1: everything foreground
  expected_0 = 1.0 - (2 * 0.5 * 16 + 1) / (0.5 * 64 + 16 + 1)
  expected_1 = 1.0 - (2 * 16 + 1) / (64 + 16 + 1)
  np.testing.assert_allclose(losses.dice_loss(logits, jnp.asarray(gt), jnp.array([True, False])), expected_0,
                             rtol=1e-6)
  np.testing.assert_allclose(losses.dice_loss(logits, jnp.asarray(gt), jnp.array([True, True])),
                             (expected_0 + expected_1) / 2, rtol=1e-6)


def test_mask_resolution_logits_downsamples_the_ground_truth_instead():
  gt = np.zeros((1, 8, 8), np.uint8)
  gt[0, :4, :4] = 1  # exactly the top-left stride-4 cell
  logits = jnp.zeros((1, 2, 2, 2)).at[0, 0, 0].set(jnp.array([0.0, 10.0])).at[0, 1, :, 0].set(10.0).at[
      0, 0, 1, 0].set(10.0)
  # Every stride-4 cell is predicted confidently right: loss ~ log(1 + e^-10), far below the full-res loss of the
  # same logits (whose bilinear upsampling blurs the cell borders).
  low = losses.mask_loss(logits, jnp.asarray(gt), WEIGHTS, jnp.ones((1,), bool), resolution="logits")
  full = losses.mask_loss(logits, jnp.asarray(gt), WEIGHTS, jnp.ones((1,), bool), resolution="full")
  np.testing.assert_allclose(low, math.log1p(math.exp(-10.0)), rtol=1e-3)
  assert full > 10 * low


# ----------------------------------------------------------------------------------------------------------------
# Region ground truth on the query grid
# ----------------------------------------------------------------------------------------------------------------


def test_region_targets_center_by_hand():
  gt = np.zeros((1, 8, 8), np.uint8)
  gt[0, :4, :4] = 1  # the top-left quadrant: cell (0, 0) of a 2 x 2 grid is foreground at its centre
  gt[0, 6, 6] = 1  # one of the four bilinear taps of cell (1, 1) (pixels 5..6 x 5..6): 0.25, truncated to 0
  expected = np.array([[[1, 0], [0, 0]]])
  np.testing.assert_array_equal(losses.region_targets(jnp.asarray(gt), (2, 2), "center"), expected)


def test_region_targets_any_marks_every_cell_a_pixel_touches():
  # 10 x 10 on a 3 x 3 grid: cells cover rows/cols [0, 4), [3, 7), [6, 10); pixel (3, 3) lies in four cells.
  gt = np.zeros((1, 10, 10), np.uint8)
  gt[0, 3, 3] = 1
  gt[0, 9, 0] = 1
  expected = np.array([[[1, 1, 0], [1, 1, 0], [1, 0, 0]]])
  np.testing.assert_array_equal(losses.region_targets(jnp.asarray(gt), (3, 3), "any"), expected)


# ----------------------------------------------------------------------------------------------------------------
# No-target variants
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nt_case():
  logits = jnp.array([[0.0, 1.0], [2.0, 0.0], [0.0, 0.5]])
  labels = jnp.array([True, False, False])
  log_p = np.log(np.exp(np.asarray(logits)) / np.exp(np.asarray(logits)).sum(-1, keepdims=True))
  nll = -log_p[np.arange(3), np.asarray(labels).astype(int)]
  return logits, labels, nll


def test_no_target_ce_uses_class_weights(nt_case):
  logits, labels, nll = nt_case
  expected = (1.1 * nll[0] + 0.9 * nll[1] + 0.9 * nll[2]) / (1.1 + 0.9 + 0.9)
  got = losses.no_target_loss(logits, labels, jnp.ones((3,), bool), _config(nt_loss="ce"))
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_no_target_balanced_weighs_the_two_classes_equally(nt_case):
  logits, labels, nll = nt_case
  expected = 0.5 * nll[0] + 0.5 * (nll[1] + nll[2]) / 2
  got = losses.no_target_loss(logits, labels, jnp.ones((3,), bool), _config(nt_loss="balanced"))
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  # With one class absent from the batch, the present class alone is averaged (no division by an empty class).
  only_targets = losses.no_target_loss(logits[1:], labels[1:], jnp.ones((2,), bool), _config(nt_loss="balanced"))
  np.testing.assert_allclose(only_targets, (nll[1] + nll[2]) / 2, rtol=1e-6)


def test_no_target_focal_by_hand(nt_case):
  logits, labels, nll = nt_case
  p = np.exp(-nll)
  alpha = np.array([1.1, 0.9, 0.9])
  expected = (alpha * (1 - p) ** 2 * nll).sum() / alpha.sum()
  got = losses.no_target_loss(logits, labels, jnp.ones((3,), bool), _config(nt_loss="focal", focal_gamma=2.0))
  np.testing.assert_allclose(got, expected, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# compute_losses: weighting, per-prompt terms, masking of absent prompts, gradients
# ----------------------------------------------------------------------------------------------------------------


def test_total_is_the_configured_weighted_sum():
  outputs, batch = _outputs_and_batch()
  config = _config(loss_scale=2.0, mask_weight=1.0, region_weight=0.3, nt_weight=0.7, per_prompt_weight=0.5,
                   dice_weight=0.4)
  total, metrics = losses.compute_losses(outputs, batch, config)

  def weighted(prefix):
    return 2.0 * (metrics[f"{prefix}mask_loss"] + 0.3 * metrics[f"{prefix}region_loss"]
                  + 0.7 * metrics[f"{prefix}nt_loss"] + 0.4 * metrics[f"{prefix}dice_loss"])

  expected = weighted("") + 0.5 * (weighted("text_") + weighted("visual_"))
  np.testing.assert_allclose(total, expected, rtol=1e-6)
  np.testing.assert_allclose(metrics["loss"], total)
  assert float(metrics["num_omni"]) == 1.0
  # The combined mask term is the one mask_loss computes on the union ground truth.
  np.testing.assert_allclose(
      metrics["mask_loss"],
      losses.mask_loss(outputs["mask_logits"], jnp.asarray(batch["mask"]), WEIGHTS, jnp.ones((3,), bool)),
      rtol=1e-6)


def test_mask_loss_on_no_target_false_paints_only_examples_with_a_referent():
  outputs, batch = _outputs_and_batch(omni=(True, True, False))
  batch["no_target"] = np.array([False, True, False])
  batch["mask"][1] = 0
  config = _config(mask_loss_on_no_target=False, dice_weight=1.0, region_target="any")
  _, metrics = losses.compute_losses(outputs, batch, config)
  painted = jnp.array([True, False, True])
  gt = jnp.asarray(batch["mask"])
  np.testing.assert_allclose(metrics["mask_loss"], losses.mask_loss(outputs["mask_logits"], gt, WEIGHTS, painted),
                             rtol=1e-6)
  np.testing.assert_allclose(metrics["region_loss"], losses.region_loss(outputs["region_logits"], gt, WEIGHTS,
                                                                        painted, "any"), rtol=1e-6)
  np.testing.assert_allclose(metrics["dice_loss"], losses.dice_loss(outputs["mask_logits"], gt, painted), rtol=1e-6)
  # The no-target head still sees every example; the per-prompt terms skip the prompt whose ground truth is empty.
  np.testing.assert_allclose(metrics["nt_loss"], losses.no_target_loss(
      outputs["nt_logits"], jnp.asarray(batch["no_target"]), jnp.ones((3,), bool), config), rtol=1e-6)
  text_gt = jnp.asarray(batch["text_mask"])
  np.testing.assert_allclose(metrics["text_mask_loss"], losses.mask_loss(
      outputs["text_mask_logits"], text_gt, WEIGHTS, jnp.array([True, False, False])), rtol=1e-6)
  # The default (ReLA) trains the no-target example's mask towards empty too.
  _, default = losses.compute_losses(outputs, batch, _config(dice_weight=1.0, region_target="any"))
  np.testing.assert_allclose(default["mask_loss"], losses.mask_loss(outputs["mask_logits"], gt, WEIGHTS,
                                                                    jnp.ones((3,), bool)), rtol=1e-6)
  assert abs(float(default["mask_loss"]) - float(metrics["mask_loss"])) > 1e-4
  # Dice always skips the example without a referent: on an empty ground truth one painted pixel would cost half
  # its maximum, which taught the demo model to paint nothing whenever a prompt might be absent.
  np.testing.assert_allclose(default["dice_loss"], losses.dice_loss(outputs["mask_logits"], gt, painted), rtol=1e-6)


def test_per_prompt_terms_use_only_omni_examples_and_their_own_ground_truth():
  # Examples 0 and 1 are omni; example 1's text ground truth is empty -> its text no-target label is 1.
  outputs, batch = _outputs_and_batch(omni=(True, True, False))
  _, metrics = losses.compute_losses(outputs, batch, _config(nt_loss="ce"))
  omni = jnp.array([True, True, False])
  text_gt = jnp.asarray(batch["text_mask"])
  expected_mask = losses.mask_loss(outputs["text_mask_logits"], text_gt, WEIGHTS, omni)
  expected_nt = losses.weighted_cross_entropy(outputs["text_nt_logits"], jnp.array([0, 1, 0]), WEIGHTS, omni)
  np.testing.assert_allclose(metrics["text_mask_loss"], expected_mask, rtol=1e-6)
  np.testing.assert_allclose(metrics["text_nt_loss"], expected_nt, rtol=1e-6)
  # The union ground truth would give a different value: the per-prompt term really reads text_mask.
  union_mask = losses.mask_loss(outputs["text_mask_logits"], jnp.asarray(batch["mask"]), WEIGHTS, omni)
  assert abs(float(union_mask) - float(expected_mask)) > 1e-4


def test_absent_prompts_are_masked_out_of_the_loss_and_its_gradient():
  outputs, batch = _outputs_and_batch(omni=(True, False, False))
  config = _config()

  def total(outs):
    return losses.compute_losses(outs, batch, config)[0]

  grads = jax.grad(total)(outputs)
  for prefix in ("text_", "visual_"):
    for key in ("mask_logits", "region_logits", "nt_logits"):
      grad = np.asarray(grads[f"{prefix}{key}"])
      assert np.all(grad[1:] == 0), f"{prefix}{key}: a single-prompt example got a per-prompt gradient"
      assert np.any(grad[0] != 0), f"{prefix}{key}: the omni example got no per-prompt gradient"
  # Changing the per-prompt outputs of non-omni examples changes nothing.
  changed = dict(outputs)
  changed["visual_mask_logits"] = outputs["visual_mask_logits"].at[1:].add(5.0)
  np.testing.assert_allclose(total(changed), total(outputs), rtol=1e-6)


def test_padding_rows_count_nowhere():
  outputs, batch = _outputs_and_batch(omni=(True, True, False))
  base, _ = losses.compute_losses(outputs, batch, _config())
  padded_batch = dict(batch, index=np.array([0, 1, -1]))
  changed = {key: value.at[2].add(3.0) for key, value in outputs.items()}
  # Row 2 as padding: its outputs cannot move the loss.
  np.testing.assert_allclose(losses.compute_losses(changed, padded_batch, _config())[0],
                             losses.compute_losses(outputs, padded_batch, _config())[0], rtol=1e-6)
  assert abs(float(losses.compute_losses(outputs, padded_batch, _config())[0]) - float(base)) > 1e-4


@pytest.mark.parametrize("nt_loss", losses.NT_LOSSES)
def test_gradients_are_finite_even_without_omni_or_no_target_examples(nt_loss):
  outputs, batch = _outputs_and_batch(omni=(False, False, False))
  config = _config(nt_loss=nt_loss, region_target="any")
  (total, metrics), grads = jax.value_and_grad(
      lambda outs: losses.compute_losses(outs, batch, config), has_aux=True)(outputs)
  assert np.isfinite(float(total))
  assert all(np.isfinite(float(v)) for v in metrics.values())
  for key, grad in grads.items():
    assert np.all(np.isfinite(np.asarray(grad))), key
  # No omni example: the per-prompt terms are exactly 0 and pass no gradient.
  assert float(metrics["text_loss"]) == 0.0 and float(metrics["visual_loss"]) == 0.0
  assert not np.any(np.asarray(grads["text_mask_logits"]))


def test_per_prompt_weight_zero_skips_the_per_prompt_terms():
  outputs, batch = _outputs_and_batch()
  slim = {key: outputs[key] for key in ("mask_logits", "region_logits", "nt_logits")}
  total, metrics = losses.compute_losses(slim, {"mask": batch["mask"], "no_target": batch["no_target"]},
                                         _config(per_prompt_weight=0.0))
  assert "text_loss" not in metrics
  np.testing.assert_allclose(total, 5.0 * (metrics["mask_loss"] + 0.1 * metrics["region_loss"]
                                           + 0.1 * metrics["nt_loss"]), rtol=1e-6)


def test_bad_config_and_inputs_fail_with_the_field_named():
  outputs, batch = _outputs_and_batch()
  with pytest.raises(ValueError, match="nt_loss"):
    losses.compute_losses(outputs, batch, _config(nt_loss="hinge"))
  with pytest.raises(KeyError, match="text_mask"):
    losses.compute_losses(outputs, {"mask": batch["mask"], "no_target": batch["no_target"]}, _config())
  with pytest.raises(ValueError, match="mask_logits"):
    losses.mask_loss(outputs["mask_logits"][..., :1], jnp.asarray(batch["mask"]), WEIGHTS, jnp.ones((3,), bool))
