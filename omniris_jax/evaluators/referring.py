"""The paper's evaluation: the test splits scored as the GRES/ReLA evaluator does (metrics.py), in Table 1's layout.

`Evaluator(config, mesh, eval_fn, stage_dir, workdir).run(params, step)` returns {split: results} and writes
`evals/step_<N>.json` and a PNG of predictions; `report` gives the markdown table beside a baseline.

The baseline ("segment every object, never say no-target") predicts, for every example, the union of all object
instances in the target image and never calls no-target. The records carry no all-objects mask, so it is only
available for the procedural `shapes` configs, whose scenes are regenerated from (split, index) by the generator
(exact); for other datasets the row is left out with a note.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from PIL import Image

from omniris_jax import metrics, sharding
from omniris_jax.data import pipeline, prepare, visualize
from omniris_jax.models import factory


def every_object_masks(dataset_name: str, split: str, data_dir: str | None, indices: Sequence[int],
                       resolution: int) -> dict[int, np.ndarray] | None:
  """The union of every object instance of each target image, nearest-resized to `resolution` (the baseline's
  prediction); None when the dataset cannot provide it (only the procedural shapes scenes can)."""
  builder = prepare.ensure_built(dataset_name, data_dir)
  config = builder.builder_config
  if getattr(config, "source", None) != "shapes":
    return None
  from tfds_omniref.omniref import shapes  # pylint: disable=g-import-not-at-top  (only for synthetic data)
  masks = {}
  for index in indices:
    _, scene = shapes.generate_example_and_scene(config.shapes, split, int(index), config.name)
    union = scene.instance_masks.any(axis=0).astype(np.uint8)
    if union.shape != (resolution, resolution):
      union = np.asarray(Image.fromarray(union).resize((resolution, resolution), Image.Resampling.NEAREST))
    masks[int(index)] = union.astype(bool)
  return masks


class Evaluator:
  """Runs the model over the test splits and scores it as the paper does (metrics.py), beside the baseline.

  `run(params, step)` returns {split: evaluate_predictions result}; it also writes the per-eval JSON and the
  prediction-overlay PNG. The baseline is computed once per workdir (WORKDIR/baseline.json) and reused.
  """

  def __init__(self, config: Any, mesh: jax.sharding.Mesh, eval_fn: Any, stage_dir: str, workdir: str):
    self.config, self.mesh, self.eval_fn = config, mesh, eval_fn
    self.stage_dir, self.workdir = stage_dir, workdir
    self.local_batch = sharding.check_batch_size(config.eval.batch_size, mesh, name="config.eval.batch_size")
    self.sources = {split: pipeline.from_tfds(config.dataset.test_name, split, config.dataset.data_dir)
                    for split in config.dataset.test_splits}
    self._baseline = None

  def _batches(self, split: str):
    dataset = pipeline.make_dataset(
        self.sources[split], resolution=self.config.input.resolution, batch_size=self.local_batch,
        max_text_len=self.config.input.max_text_len, seed=self.config.seed, shuffle=False, num_epochs=1,
        prompt_types=None, process_index=jax.process_index(), process_count=jax.process_count(),
        pad_to_full_batches=True, vocab_path=factory.text_encoder_vocab(self.config),
        keep_sep=self.config.input.get("keep_sep", True))
    yield from dataset

  def _host(self, tree: Any) -> Any:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)

  def predict(self, params: Any, split: str) -> list[dict[str, Any]]:
    """Per-example predictions and ground truth of a split (padding rows dropped)."""
    samples = []
    for batch in self._batches(split):
      predictions = self._host(self.eval_fn(params, sharding.global_batch(batch, self.mesh)))
      keep = ("mask", "no_target", "modality", "setting", "prompt_type", "index", "image", "ref_image",
              "ref_prompt", "text_mask", "visual_mask")
      local = self._host(sharding.global_batch({key: batch[key] for key in keep}, self.mesh))
      for row in range(local["index"].shape[0]):
        if local["index"][row] < 0:
          continue
        samples.append({"pred_mask": predictions["pred_mask"][row], "pred_nt": bool(predictions["pred_nt"][row]),
                        "gt_mask": local["mask"][row], "gt_nt": bool(local["no_target"][row]),
                        **{key: local[key][row] for key in keep}})
    return samples

  def baseline(self) -> dict[str, Any] | None:
    """The 'every object, never no-target' results per split (cached in WORKDIR/baseline_<dataset>_<S>.json)."""
    if self._baseline is not None:
      return self._baseline or None
    path = os.path.join(self.workdir, f"baseline_{self.config.dataset.test_name.replace('/', '_')}_"
                                      f"{self.config.input.resolution}.json")
    if os.path.exists(path):
      with open(path) as file:
        self._baseline = json.load(file)
      return self._baseline or None
    results = {}
    for split in self.config.dataset.test_splits:
      samples = self._baseline_samples(split)
      if samples is None:  # the dataset cannot say where every object is: no baseline
        results = {}
        break
      results[split] = metrics.evaluate_predictions(samples)
    if jax.process_index() == 0:
      with open(path, "w") as file:
        json.dump(results, file, indent=1)
    self._baseline = results
    return results or None

  def _baseline_samples(self, split: str) -> list[dict[str, Any]] | None:
    samples = []
    for batch in self._batches(split):
      rows = [row for row, index in enumerate(batch["index"]) if index >= 0]
      masks = every_object_masks(self.config.dataset.test_name, split, self.config.dataset.data_dir,
                                 [int(batch["index"][row]) for row in rows], self.config.input.resolution)
      if masks is None:
        return None
      samples += [{"pred_mask": masks[int(batch["index"][row])], "pred_nt": False, "gt_mask": batch["mask"][row],
                   "gt_nt": bool(batch["no_target"][row]), "modality": batch["modality"][row],
                   "setting": batch["setting"][row], "prompt_type": batch["prompt_type"][row]} for row in rows]
    return samples

  def run(self, params: Any, step: int) -> dict[str, Any]:
    """Evaluates `params` on every test split; writes evals/step_<step>.json and .png; returns the results."""
    results, previews = {}, []
    for split in self.config.dataset.test_splits:
      samples = self.predict(params, split)
      results[split] = metrics.evaluate_predictions(samples)
      previews += [(split, sample) for sample in samples[:self.config.eval.preview_per_split]]
    if jax.process_index() == 0:
      evals_dir = os.path.join(self.stage_dir, "evals")
      os.makedirs(evals_dir, exist_ok=True)
      with open(os.path.join(evals_dir, f"step_{step}.json"), "w") as file:
        json.dump(results, file, indent=1)
      if previews:
        self._render(previews, os.path.join(evals_dir, f"step_{step}.png"), step)
    return results

  def _render(self, previews: list[tuple[str, dict]], path: str, step: int) -> None:
    visualize.draw_predictions([sample for _, sample in previews],
                     [self.sources[split][int(sample["index"])]["text"] for split, sample in previews], path,
                     title=f"{self.config.stage}, step {step}: predictions (green) on the test splits")

  def report(self, results: Mapping[str, Any], step: int) -> str:
    """The Table 1 layout: the model's row and the baseline's."""
    rows = {f"OmniSegNet ({self.config.stage}, step {step})": results}
    baseline = self.baseline()
    if baseline:
      rows["Baseline: every object, never no-target"] = baseline
    table = metrics.table1_markdown(rows)
    if not baseline:
      table += ("\n\n(No baseline: the dataset's records carry no all-objects mask; only the synthetic shapes "
                "scenes can be regenerated to get one.)")
    return table


def write_results(stage_dir: str, table: str, results: Mapping[str, Any], baseline: Any, step: int,
                  config: Any) -> None:
  """WORKDIR/<stage>/results.md and results.json."""
  with open(os.path.join(stage_dir, "results.md"), "w") as file:
    file.write(f"# {config.stage}: results at step {step}\n\nDataset {config.dataset.test_name}, "
               f"{config.input.resolution}x{config.input.resolution}. cIoU, gIoU, N_acc in percent "
               "(metrics.py).\n\n" + table + "\n")
  with open(os.path.join(stage_dir, "results.json"), "w") as file:
    json.dump({"stage": config.stage, "step": step, "model": results, "baseline": baseline}, file, indent=1)
