"""OmniRIS metrics, defined exactly as the GRES/ReLA evaluator defines them.

Per sample, with `pred_mask` the argmax of the two mask channels and `pred_nt` the argmax of the no-target
logits, I = |pred AND gt| and U = |pred OR gt| are computed on the masks *as predicted* (a mask is not zeroed
because the model also said "no target"). Then:

  gt no-target, pred_nt      -> TP: IoU 1, adds nothing to the cumulative I and U
  gt no-target, not pred_nt  -> FN: IoU 0, adds U (= the predicted area) to the cumulative U
  gt target,    pred_nt      -> FP: I := 0, IoU 0, adds U to the cumulative U
  gt target,    not pred_nt  -> TN: IoU = I / U (0 when U = 0), adds I and U

  gIoU  = 100 * mean IoU over all samples          cIoU  = 100 * sum I / sum U
  N_acc = 100 * TP / (TP + FN)                     T_acc = 100 * TN / (TN + FP)
  Pr@X  = 100 * fraction of *targeted* samples whose IoU >= X, X in {0.7, 0.8, 0.9}

(The names TP/TN follow the reference evaluator, where "positive" means "no target".) Where the reference
reports a ratio with an empty denominator as 0, we report NaN and print "-", so that a split without
no-target samples does not show a misleading N_acc of 0.

`evaluate_predictions` returns these overall and broken down by modality, setting and prompt type;
`table1_markdown` lays results out as the paper's Table 1 (cIoU / gIoU / N_acc per test split).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping

import numpy as np

PR_THRESHOLDS = (0.7, 0.8, 0.9)
BREAKDOWN_KEYS = ("modality", "setting", "prompt_type")
# The names of the ClassLabel features, in order, so integer codes from a batch print as words.
MODALITY_NAMES = ("text", "visual", "omni")
SETTING_NAMES = ("one_vs_one", "one_vs_many", "many_vs_one", "many_vs_many", "no_target")
PROMPT_TYPE_NAMES = ("none", "mask", "box", "scribble")
_CODE_NAMES = {"modality": MODALITY_NAMES, "setting": SETTING_NAMES, "prompt_type": PROMPT_TYPE_NAMES}
# The test splits of OmniRef as the paper's Table 1 names them.
TABLE1_SPLITS = (("text_test", "Text-test"), ("visual_test", "Visual-test"), ("omni_test", "Omni-test"))


@dataclasses.dataclass(frozen=True)
class SampleScore:
  """What one sample contributes to the metrics."""

  outcome: str  # 'TP', 'FN', 'FP' or 'TN' in the reference evaluator's naming (positive = no target).
  iou: float
  intersection: int
  union: int

  @property
  def targeted(self) -> bool:
    return self.outcome in ("FP", "TN")


def score_sample(pred_mask: Any, pred_nt: Any, gt_mask: Any, gt_nt: Any) -> SampleScore:
  """Scores one sample; masks are (H, W) arrays whose non-zero entries are foreground."""
  pred = np.asarray(pred_mask).astype(bool)
  gt = np.asarray(gt_mask).astype(bool)
  if pred.shape != gt.shape:
    raise ValueError(f"pred_mask shape {pred.shape} differs from gt_mask shape {gt.shape}; resize the "
                     "prediction to the ground truth's resolution before scoring.")
  intersection = int(np.logical_and(pred, gt).sum())
  union = int(np.logical_or(pred, gt).sum())
  if bool(gt_nt):
    if bool(pred_nt):
      return SampleScore("TP", 1.0, 0, 0)
    return SampleScore("FN", 0.0, 0, union)
  if bool(pred_nt):
    return SampleScore("FP", 0.0, 0, union)
  return SampleScore("TN", intersection / union if union else 0.0, intersection, union)


def _ratio(numerator: float, denominator: float) -> float:
  return 100.0 * numerator / denominator if denominator else math.nan


def summarize(scores: Iterable[SampleScore]) -> dict[str, float]:
  """Aggregates sample scores into cIoU, gIoU, N_acc, T_acc, Pr@X (percent) and counts."""
  scores = list(scores)
  counts = {name: sum(s.outcome == name for s in scores) for name in ("TP", "FN", "FP", "TN")}
  targeted_ious = [s.iou for s in scores if s.targeted]
  result = {
      "cIoU": _ratio(sum(s.intersection for s in scores), sum(s.union for s in scores)),
      "gIoU": _ratio(sum(s.iou for s in scores), len(scores)),
      "N_acc": _ratio(counts["TP"], counts["TP"] + counts["FN"]),
      "T_acc": _ratio(counts["TN"], counts["TN"] + counts["FP"]),
  }
  for threshold in PR_THRESHOLDS:
    result[f"Pr@{threshold:.1f}"] = _ratio(sum(iou >= threshold for iou in targeted_ious), len(targeted_ious))
  result["num_samples"] = len(scores)
  result["num_no_target"] = counts["TP"] + counts["FN"]
  return result


def _group_name(key: str, value: Any) -> str:
  if isinstance(value, bytes):
    value = value.decode()
  if isinstance(value, (int, np.integer)) and key in _CODE_NAMES:
    return _CODE_NAMES[key][int(value)]
  return str(value)


def evaluate_predictions(samples: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
  """Computes the metrics over samples, overall and per modality, setting and prompt type.

  Args:
    samples: dicts with `pred_mask`, `pred_nt`, `gt_mask`, `gt_nt`, and optionally `modality`, `setting`,
      `prompt_type` (names, or the integer codes of the dataset's ClassLabels).

  Returns:
    {"overall": metrics, "by_modality": {name: metrics}, "by_setting": {...}, "by_prompt_type": {...}}, where
    metrics is the dict of `summarize`. Breakdowns only hold the groups that occur.
  """
  groups: dict[str, dict[str, list[SampleScore]]] = {key: {} for key in BREAKDOWN_KEYS}
  scores = []
  for index, sample in enumerate(samples):
    missing = [k for k in ("pred_mask", "pred_nt", "gt_mask", "gt_nt") if k not in sample]
    if missing:
      raise KeyError(f"sample {index} lacks {missing}; each sample needs pred_mask, pred_nt, gt_mask, gt_nt.")
    score = score_sample(sample["pred_mask"], sample["pred_nt"], sample["gt_mask"], sample["gt_nt"])
    scores.append(score)
    for key in BREAKDOWN_KEYS:
      if key in sample and sample[key] is not None:
        groups[key].setdefault(_group_name(key, sample[key]), []).append(score)
  results: dict[str, Any] = {"overall": summarize(scores)}
  for key in BREAKDOWN_KEYS:
    results[f"by_{key}"] = {name: summarize(group) for name, group in sorted(groups[key].items())}
  return results


def _cell(value: float | None) -> str:
  return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def table1_markdown(rows: Mapping[str, Mapping[str, Mapping[str, Any]]],
                    splits: tuple[tuple[str, str], ...] = TABLE1_SPLITS) -> str:
  """Lays results out as the paper's Table 1: one row per method, cIoU / gIoU / N_acc per test split.

  Args:
    rows: method name -> split name (e.g. 'text_test') -> the result of `evaluate_predictions` (or its
      'overall' dict). A split a method was not evaluated on prints '-'.
    splits: (key, title) pairs, in column order.
  """
  header = "| Method | " + " | ".join(f"{title} cIoU | {title} gIoU | {title} N_acc" for _, title in splits) + " |"
  rule = "|---|" + "---:|" * (3 * len(splits))
  lines = [header, rule]
  for method, by_split in rows.items():
    cells = []
    for key, _ in splits:
      result = by_split.get(key)
      overall = result.get("overall", result) if result is not None else {}
      cells += [_cell(overall.get(m)) for m in ("cIoU", "gIoU", "N_acc")]
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  return "\n".join(lines)
