"""The metrics pin every case of the reference (GRES/ReLA) evaluator with hand-computed masks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from omniris_jax import metrics


def _mask(rows: list[str]) -> np.ndarray:
  """'#' is foreground; rows of a small mask drawn as text make the expected counts easy to check by eye."""
  return np.array([[c == "#" for c in row] for row in rows], dtype=np.uint8)


GT = _mask(["##..",
            "##..",
            "....",
            "...."])  # 4 pixels
PRED = _mask(["#...",
              "#...",
              "#...",
              "...."])  # 3 pixels; I = 2, U = 5
EMPTY = np.zeros((4, 4), np.uint8)


def test_targeted_and_found_scores_iou_and_adds_i_and_u():
  score = metrics.score_sample(PRED, False, GT, False)
  assert (score.outcome, score.intersection, score.union) == ("TN", 2, 5)
  assert score.iou == pytest.approx(2 / 5)


def test_targeted_but_predicted_no_target_zeroes_i_and_keeps_u():
  score = metrics.score_sample(PRED, True, GT, False)
  assert (score.outcome, score.iou, score.intersection, score.union) == ("FP", 0.0, 0, 5)


def test_no_target_correctly_called_adds_nothing_even_with_a_nonempty_mask():
  score = metrics.score_sample(PRED, True, EMPTY, True)
  assert (score.outcome, score.iou, score.intersection, score.union) == ("TP", 1.0, 0, 0)


def test_no_target_missed_adds_the_predicted_area_to_u():
  score = metrics.score_sample(PRED, False, EMPTY, True)
  assert (score.outcome, score.iou, score.intersection, score.union) == ("FN", 0.0, 0, 3)


def test_targeted_with_empty_union_has_iou_zero():
  # Ground truth says there is a target but the mask is empty (it can happen after resizing tiny objects).
  score = metrics.score_sample(EMPTY, False, EMPTY, False)
  assert (score.outcome, score.iou, score.union) == ("TN", 0.0, 0)


def test_aggregates_over_the_four_cases():
  perfect = GT
  samples = [
      dict(pred_mask=PRED, pred_nt=False, gt_mask=GT, gt_nt=False, modality="text"),     # TN, IoU .4, I2 U5
      dict(pred_mask=perfect, pred_nt=False, gt_mask=GT, gt_nt=False, modality="text"),  # TN, IoU 1, I4 U4
      dict(pred_mask=PRED, pred_nt=True, gt_mask=GT, gt_nt=False, modality="visual"),    # FP, IoU 0, I0 U5
      dict(pred_mask=PRED, pred_nt=True, gt_mask=EMPTY, gt_nt=True, modality="visual"),  # TP, IoU 1, I0 U0
      dict(pred_mask=PRED, pred_nt=False, gt_mask=EMPTY, gt_nt=True, modality="omni"),   # FN, IoU 0, I0 U3
  ]
  result = metrics.evaluate_predictions(samples)
  overall = result["overall"]
  assert overall["cIoU"] == pytest.approx(100 * 6 / 17)
  assert overall["gIoU"] == pytest.approx(100 * (0.4 + 1 + 0 + 1 + 0) / 5)
  assert overall["N_acc"] == pytest.approx(50.0)
  assert overall["T_acc"] == pytest.approx(100 * 2 / 3)
  # Pr@X counts targeted samples only: IoUs .4, 1, 0 -> one of three passes every threshold.
  for threshold in ("0.7", "0.8", "0.9"):
    assert overall[f"Pr@{threshold}"] == pytest.approx(100 / 3)
  assert (overall["num_samples"], overall["num_no_target"]) == (5, 2)
  assert result["by_modality"]["text"]["cIoU"] == pytest.approx(100 * 6 / 9)
  assert result["by_modality"]["visual"]["gIoU"] == pytest.approx(50.0)
  assert result["by_modality"]["omni"]["N_acc"] == pytest.approx(0.0)
  assert math.isnan(result["by_modality"]["text"]["N_acc"])  # no no-target samples: undefined, not 0


def test_pr_thresholds_are_inclusive():
  gt = np.zeros((10, 10), np.uint8)
  gt[:, :10] = 1
  pred = gt.copy()
  pred[:, 8:] = 0  # IoU exactly 0.8
  overall = metrics.evaluate_predictions([dict(pred_mask=pred, pred_nt=False, gt_mask=gt, gt_nt=False)])["overall"]
  assert (overall["Pr@0.7"], overall["Pr@0.8"], overall["Pr@0.9"]) == (100.0, 100.0, 0.0)


def _reference_evaluator(samples):
  """The reference evaluator's accumulation loop, restated plainly (independent of metrics.py)."""
  acc_i = acc_u = acc_iou = 0.0
  tp = tn = fp = fn = 0
  pr = {0.7: 0, 0.8: 0, 0.9: 0}
  targeted = 0
  for s in samples:
    pred, gt = s["pred_mask"].astype(bool), s["gt_mask"].astype(bool)
    i, u = np.logical_and(pred, gt).sum(), np.logical_or(pred, gt).sum()
    if s["gt_nt"]:
      if s["pred_nt"]:
        tp += 1
        acc_iou += 1
      else:
        fn += 1
        acc_u += u
    else:
      if s["pred_nt"]:
        fp += 1
        i = 0
      else:
        tn += 1
      iou = 0.0 if u == 0 else i / u
      acc_iou += iou
      acc_i += i
      acc_u += u
      targeted += 1
      for t in pr:
        pr[t] += iou >= t
  out = {"gIoU": 100 * acc_iou / len(samples), "cIoU": 100 * acc_i / acc_u,
         "N_acc": 100 * tp / (tp + fn), "T_acc": 100 * tn / (tn + fp)}
  out.update({f"Pr@{t:.1f}": 100 * c / targeted for t, c in pr.items()})
  return out


def test_random_samples_match_the_reference_accumulation():
  rng = np.random.default_rng(0)
  samples = []
  for _ in range(200):
    gt_nt = rng.random() < 0.3
    gt = np.zeros((8, 8), np.uint8) if gt_nt else (rng.random((8, 8)) < rng.random()).astype(np.uint8)
    pred = (rng.random((8, 8)) < rng.random()).astype(np.uint8)
    if rng.random() < 0.3:
      pred = gt.copy()
    samples.append(dict(pred_mask=pred, pred_nt=bool(rng.random() < 0.3), gt_mask=gt, gt_nt=gt_nt))
  expected = _reference_evaluator(samples)
  overall = metrics.evaluate_predictions(samples)["overall"]
  for key, value in expected.items():
    assert overall[key] == pytest.approx(value), key


def test_integer_codes_are_named_in_breakdowns():
  sample = dict(pred_mask=GT, pred_nt=False, gt_mask=GT, gt_nt=False, modality=2, setting=3, prompt_type=3)
  result = metrics.evaluate_predictions([sample])
  assert list(result["by_modality"]) == ["omni"]
  assert list(result["by_setting"]) == ["many_vs_many"]
  assert list(result["by_prompt_type"]) == ["scribble"]


def test_shape_mismatch_and_missing_keys_are_reported():
  with pytest.raises(ValueError, match="differs from gt_mask shape"):
    metrics.score_sample(np.zeros((2, 2)), False, np.zeros((3, 3)), False)
  with pytest.raises(KeyError, match="sample 0 lacks"):
    metrics.evaluate_predictions([dict(pred_mask=GT, gt_mask=GT, gt_nt=False)])


def test_table1_layout():
  samples = [dict(pred_mask=GT, pred_nt=False, gt_mask=GT, gt_nt=False),
             dict(pred_mask=EMPTY, pred_nt=True, gt_mask=EMPTY, gt_nt=True)]
  result = metrics.evaluate_predictions(samples)
  table = metrics.table1_markdown({"OmniSegNet": {"text_test": result, "omni_test": result}})
  lines = table.splitlines()
  assert lines[0].startswith("| Method | Text-test cIoU | Text-test gIoU | Text-test N_acc | Visual-test cIoU")
  assert lines[2] == "| OmniSegNet | 100.00 | 100.00 | 100.00 | - | - | - | 100.00 | 100.00 | 100.00 |"
