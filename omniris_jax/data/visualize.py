"""Pictures of OmniRIS examples: target with ground truth (and predictions), reference image with its prompt.

`render_preview` serves three readers: the dataset preview (`python -m tfds_omniref.omniref.shapes --preview
out.png`), the main command's look at its data, and the evaluator's prediction overlays (`draw_predictions`).
It takes examples in either form that exists in this project: as generated (numpy arrays, class names as
strings) or as read back from TFDS (`text`/`id` as bytes, class labels as integer indices).
matplotlib is imported when a picture is drawn, never at import time.
"""

from __future__ import annotations

import textwrap
from typing import Any, Mapping, Sequence

import numpy as np

# Label names in the order of the TFDS ClassLabel features (tfds_omniref/omniref/features.py keeps the same).
_LABEL_NAMES = {
    "modality": ("text", "visual", "omni"),
    "setting": ("one_vs_one", "one_vs_many", "many_vs_one", "many_vs_many", "no_target"),
    "prompt_type": ("none", "mask", "box", "scribble"),
}
# Overlay colours: the text referent, the visual referent, both, the spatial prompt, a prediction.
_TEXT_COLOUR = np.array([255, 60, 60], np.float32)
_VISUAL_COLOUR = np.array([40, 140, 255], np.float32)
_BOTH_COLOUR = np.array([200, 60, 255], np.float32)
_PROMPT_COLOUR = np.array([255, 235, 0], np.float32)
_PREDICTION_COLOUR = np.array([0, 255, 120], np.float32)


def _label(example: Mapping[str, Any], key: str) -> str:
  """A class feature as its name, whether stored as a name or as a TFDS index."""
  value = example.get(key, "")
  if isinstance(value, bytes):
    return value.decode()
  if isinstance(value, (int, np.integer)):
    return _LABEL_NAMES[key][int(value)]
  return str(value)


def _text(example: Mapping[str, Any], key: str) -> str:
  value = example.get(key, "")
  return value.decode() if isinstance(value, bytes) else str(value)


def _mask2d(mask: Any) -> np.ndarray:
  """(H, W) bool from a (H, W) or (H, W, 1) mask (or a zero placeholder when missing)."""
  mask = np.asarray(mask if mask is not None else np.zeros((1, 1)))
  return (mask[..., 0] if mask.ndim == 3 else mask).astype(bool)


def _boundary(mask: np.ndarray) -> np.ndarray:
  """Pixels of `mask` with a 4-neighbour outside it, so outlines stay visible over any fill."""
  padded = np.pad(mask, 1)
  interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
  return mask & ~interior


def highlight(image: np.ndarray, layers: Sequence[tuple[Any, np.ndarray]], *, dim: float = 0.45,
              fill: float = 0.0) -> np.ndarray:
  """`image` with everything outside the `layers` masks dimmed and each mask outlined in its colour.

  Dimming the background rather than tinting the object keeps the object's own colour readable, which matters
  when the colour is what a text prompt is about ("the blue circle"). `fill` > 0 also tints the mask.

  Args:
    image: (H, W, 3) uint8.
    layers: (mask, colour) pairs; masks are (H, W) or (H, W, 1) binary, colours RGB floats.
    dim: brightness kept outside every mask.
    fill: tint strength inside the masks.

  Returns:
    (H, W, 3) uint8.
  """
  out = np.asarray(image, np.float32).copy()
  masks = [_mask2d(mask) for mask, _ in layers]
  for mask in masks:
    if mask.shape != out.shape[:2]:
      raise ValueError(f"mask shape {mask.shape} must match image shape {out.shape[:2]}.")
  covered = np.zeros(out.shape[:2], bool)
  for mask in masks:
    covered |= mask
  out[~covered] *= dim
  for mask, (_, colour) in zip(masks, layers):
    if fill:
      out[mask] = (1 - fill) * out[mask] + fill * colour
    out[_boundary(mask)] = colour
  return np.clip(out, 0, 255).astype(np.uint8)


def ground_truth_overlay(example: Mapping[str, Any]) -> np.ndarray:
  """The target image with the ground truth lit and outlined: text referent red, visual blue, both purple."""
  image = np.asarray(example["image"])
  text_mask = _mask2d(example.get("text_mask"))
  visual_mask = _mask2d(example.get("visual_mask"))
  if text_mask.shape != image.shape[:2]:
    text_mask = np.zeros(image.shape[:2], bool)
  if visual_mask.shape != image.shape[:2]:
    visual_mask = np.zeros(image.shape[:2], bool)
  if not (text_mask | visual_mask).any():
    return highlight(image, [], dim=0.8)  # no target: a lightly dimmed image, nothing outlined
  return highlight(image, [(text_mask & ~visual_mask, _TEXT_COLOUR), (visual_mask & ~text_mask, _VISUAL_COLOUR),
                           (text_mask & visual_mask, _BOTH_COLOUR)])


def reference_overlay(example: Mapping[str, Any]) -> np.ndarray | None:
  """The reference image with its default spatial prompt (mask/box/scribble) in yellow; None without one."""
  ref_image = np.asarray(example.get("ref_image", np.zeros((1, 1, 3), np.uint8)))
  if ref_image.shape[0] <= 1:
    return None
  prompt_type = _label(example, "prompt_type")
  prompt = example.get(f"ref_{prompt_type}", example.get("ref_mask"))
  return highlight(ref_image, [(prompt, _PROMPT_COLOUR)], fill=0.8 if prompt_type == "scribble" else 0.0)


def render_preview(
    examples: Sequence[Mapping[str, Any]],
    path: str,
    *,
    predictions: Sequence[np.ndarray] | None = None,
    examples_per_row: int = 3,
    title: str | None = None,
) -> None:
  """Draws a grid of examples to a PNG at `path`.

  Each example gets two panels, three with predictions: the target image with its ground truth lit and
  outlined (text referent red, visual referent blue, both purple; the rest dimmed), the reference image with the
  spatial prompt of its `prompt_type` (yellow), and the predicted union mask (green) when `predictions` (one
  (H, W) or (H, W, 1) mask per example) is given. Captions show modality, setting, prompt type, the text
  prompt and the no-target flag.

  Args:
    examples: examples under the OmniRIS feature names, as generated or as read from TFDS.
    path: where to write the PNG (its folder must exist).
    predictions: optional predicted masks, aligned with `examples`.
    examples_per_row: how many examples side by side.
    title: optional figure title.
  """
  if not examples:
    raise ValueError("render_preview needs at least one example; got none.")
  if predictions is not None and len(predictions) != len(examples):
    raise ValueError(f"predictions ({len(predictions)}) must align with examples ({len(examples)}).")
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  panels_per_example = 3 if predictions is not None else 2
  per_row = max(1, min(examples_per_row, len(examples)))
  rows = -(-len(examples) // per_row)
  columns = per_row * panels_per_example
  figure, axes = plt.subplots(rows, columns, figsize=(2.3 * columns, 2.9 * rows), squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  for index, example in enumerate(examples):
    row, first = divmod(index, per_row)
    ax_target = axes[row, first * panels_per_example]
    ax_target.imshow(ground_truth_overlay(example), interpolation="nearest")
    text = _text(example, "text")
    caption = [f"{_label(example, 'modality')} | {_label(example, 'setting')}"]
    caption += textwrap.wrap(f'"{text}"', 34) if text else ["(no text prompt)"]
    if bool(np.asarray(example.get("no_target", False))):
      caption.append("NO TARGET")
    ax_target.set_title("\n".join(caption), fontsize=7, loc="left")

    ax_ref = axes[row, first * panels_per_example + 1]
    reference = reference_overlay(example)
    if reference is None:
      ax_ref.text(0.5, 0.5, "no visual prompt", ha="center", va="center", fontsize=7, color="grey")
    else:
      ax_ref.imshow(reference, interpolation="nearest")
      ax_ref.set_title(f"reference: {_label(example, 'prompt_type')}", fontsize=7, loc="left")

    if predictions is not None:
      ax_pred = axes[row, first * panels_per_example + 2]
      ax_pred.imshow(highlight(np.asarray(example["image"]), [(predictions[index], _PREDICTION_COLOUR)]),
                     interpolation="nearest")
      ax_pred.set_title("prediction", fontsize=7, loc="left")
  if title:
    figure.suptitle(title, fontsize=9)
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


def draw_predictions(samples: Sequence[Mapping[str, Any]], texts: Sequence[Any], path: str, title: str) -> None:
  """Draws samples of `Evaluator.predict` to a PNG: ground truth and prompts as `visualize.render_preview` draws
  them, the predicted mask in green. `texts` are the samples' text prompts (from their source records)."""
  examples = []
  for sample, text in zip(samples, texts, strict=True):
    prompt = sample["ref_prompt"].astype(np.uint8)
    examples.append({"image": sample["image"], "text": text, "text_mask": sample["text_mask"],
                     "visual_mask": sample["visual_mask"], "mask": sample["gt_mask"],
                     "ref_image": sample["ref_image"], "ref_mask": prompt, "ref_box": prompt,
                     "ref_scribble": prompt, "modality": int(sample["modality"]),
                     "setting": int(sample["setting"]), "prompt_type": int(sample["prompt_type"]),
                     "no_target": sample["gt_nt"]})
  render_preview(examples, path, predictions=[sample["pred_mask"] for sample in samples], title=title)
