"""Train and evaluate one stage of the paper's regime, or the demo's three stages in sequence.

`train_and_evaluate(config, workdir)` reads top to bottom (big_vision style): mesh, input pipeline, model and
optimizer, shard and transfer, update step, load checkpoint, evals, train loop. Everything a stage writes goes
to `WORKDIR/<config.stage>/`:

  checkpoints/<step>/      train state + input iterator (checkpointing.py); the last `keep_checkpoints`
  tensorboard/             event files + metrics.csv (summaries.py); learning_curves.png
  evals/step_<N>.json      every evaluation, full breakdowns; evals/step_<N>.png prediction overlays
  results.md, results.json the stage's final evaluation in the paper's Table 1 layout, beside the baseline

`run_stages(config, workdir)` first runs the stages named in `config.run_before` (their configs are in
`config.stage_configs`), each initialising from the one before (`init_from`), then this config's stage. A stage
whose final checkpoint and results exist is skipped, so re-running the same command after a kill resumes where
it stopped.

The baseline beside the model ("segment every object, never say no-target") predicts, for every example, the
union of all object instances in the target image and never calls no-target. The records carry no all-objects
mask, so it is only available for the procedural `shapes` configs, whose scenes are regenerated from (split,
index) by the generator (exact); for other datasets the row is left out with a note.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from PIL import Image

from omniris_jax import checkpointing, metrics, optim, sharding, steps, summaries
from omniris_jax.data import pipeline, prepare
from omniris_jax.models import omnisegnet

# The scalars a progress line shows (all of them go to TensorBoard and metrics.csv).
PROGRESS_KEYS = ("mask_loss", "dice_loss", "region_loss", "nt_loss", "category_loss", "colour_loss", "nt_accuracy",
                 "grad_norm", "learning_rate")
MODALITY_CODES = {name: code for code, name in enumerate(metrics.MODALITY_NAMES)}


class NonFiniteError(FloatingPointError):
  """A NaN/inf loss or gradient: the message names the step, the batch's record indices and the last checkpoint."""


# ===============================================================================================================
# Building blocks (small and importable: Colab, tests and tools use them too)
# ===============================================================================================================


def model_config(config: Any) -> omnisegnet.OmniSegNetConfig:
  """The OmniSegNetConfig of `config.model`: a preset plus per-part field overrides.

  `config.model.overrides` maps a part ('swin', 'bert', 'pixel_encoder', 'prompt_encoder', 'mask_decoder') to a
  dict of that part's fields, or a top-level field ('omni_fusion', ...) to its value.
  """
  preset = getattr(omnisegnet.OmniSegNetConfig, config.model.preset, None)
  if preset is None:
    raise ValueError(f"config.model.preset={config.model.preset!r} is not an OmniSegNetConfig preset "
                     "(tiny_test, demo, paper).")
  base = preset(max_text_len=config.input.max_text_len)
  changes = {}
  for name, value in dict(config.model.get("overrides", {})).items():
    current = getattr(base, name, None)
    if dataclasses.is_dataclass(current):
      changes[name] = dataclasses.replace(current, **dict(value))
    elif hasattr(base, name):
      changes[name] = value
    else:
      raise ValueError(f"config.model.overrides.{name}: OmniSegNetConfig has no field {name!r}.")
  model_cfg = dataclasses.replace(base, **changes)
  _check_vocabulary(model_cfg, text_encoder_vocab(config))
  return model_cfg


def _check_vocabulary(model_cfg: omnisegnet.OmniSegNetConfig, vocab_path: str | None) -> None:
  """Token ids at or above the embedding table's size silently give NaN text features; refuse that config."""
  from omniris_jax.data import tokenizer  # pylint: disable=g-import-not-at-top
  path = vocab_path or tokenizer.Tokenizer().vocab_path
  with open(path, encoding="utf-8") as f:
    vocab_size = sum(1 for _ in f)
  if vocab_size > model_cfg.bert.vocab_size:
    raise ValueError(f"The tokenizer's vocabulary ({path}) has {vocab_size} tokens but the model's text encoder "
                     f"embeds only {model_cfg.bert.vocab_size=}; set "
                     f"--config.model.overrides.bert.vocab_size={vocab_size} or use the matching vocabulary.")


def text_encoder_checkpoint(config: Any) -> str | None:
  """The HF-format BERT folder the text encoder starts from (None: random init); 'minilm' = the shipped MiniLM."""
  path = config.model.get("text_encoder_checkpoint")
  if path == "minilm":
    from omniris_jax.models import bert  # pylint: disable=g-import-not-at-top
    return str(bert.minilm_path())
  return path


class _Subset:
  """A random-access view of some records of a source (those of the wanted modalities)."""

  def __init__(self, source: Any, indices: Sequence[int]):
    self._source, self._indices = source, list(indices)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int) -> Any:
    return self._source[self._indices[index]]


def open_training_source(source_config: Any) -> Any:
  """A dataset split as a random-access source, restricted to `source_config.modalities` when given; with
  `source_config.generated`, a procedural dataset's train examples made on demand instead of the stored split."""
  builder = prepare.ensure_built(source_config.name, source_config.data_dir)
  modalities = source_config.get("modalities")
  unknown = [m for m in (modalities or ()) if m not in MODALITY_CODES]
  if unknown:
    raise ValueError(f"modalities={tuple(modalities)} of {source_config.name}:{source_config.split}: {unknown} "
                     f"are not among {metrics.MODALITY_NAMES}.")
  if source_config.get("generated"):
    return _generated_source(builder, source_config, modalities)
  source = pipeline.from_tfds(source_config.name, source_config.split, source_config.data_dir)
  if not modalities:
    return source
  wanted = {MODALITY_CODES[m] for m in modalities}
  light = prepare.open_split(source_config.name, source_config.split, source_config.data_dir, decode_images=False)
  indices = [i for i in range(len(light)) if int(light[i]["modality"]) in wanted]
  if not indices:
    raise ValueError(f"{source_config.name}:{source_config.split} has no examples of modalities "
                     f"{tuple(modalities)}.")
  return _Subset(source, indices)


def _generated_source(builder: Any, source_config: Any, modalities: Sequence[str] | None) -> Any:
  """The train examples of a procedural (shapes) dataset config, generated on demand (shapes.GeneratedTrainSource)."""
  generator_config = getattr(builder.builder_config, "shapes", None)
  if generator_config is None or source_config.split != "train":
    raise ValueError(f"generated=True needs the train split of a procedural dataset (omniref/shapes, "
                     f"omniref/shapes_tiny); {source_config.name}:{source_config.split} is stored data: set "
                     "generated=False to read it as it is.")
  from tfds_omniref.omniref import shapes  # pylint: disable=g-import-not-at-top  (only for synthetic data)
  return shapes.GeneratedTrainSource(generator_config, modalities, config_name=builder.builder_config.name,
                                     category_maps=bool(source_config.get("category_maps")))


def make_train_iterator(config: Any, local_batch: int) -> Any:
  """The training stream of this stage: one source, or text and visual sources mixed at `config.mix_ratio`."""
  common = dict(resolution=config.input.resolution, batch_size=local_batch, max_text_len=config.input.max_text_len,
                seed=config.seed, prompt_types=tuple(config.input.prompt_types),
                regenerate_prompts=config.input.regenerate_prompts, process_index=jax.process_index(),
                process_count=jax.process_count(), worker_count=config.input.worker_count,
                vocab_path=text_encoder_vocab(config))
  if config.train_data == "mixed":
    dataset = pipeline.make_mixed_dataset(open_training_source(config.dataset.text_source),
                                          open_training_source(config.dataset.visual_source),
                                          ratio=tuple(config.mix_ratio),
                                          mix_unit=config.get("mix_unit", "example"), **common)
  elif config.train_data in ("text", "visual"):
    dataset = pipeline.make_dataset(open_training_source(config.dataset[f"{config.train_data}_source"]), **common)
  else:
    raise ValueError(f"config.train_data={config.train_data!r} must be 'text', 'visual' or 'mixed'.")
  return iter(dataset)


def batch_has_visual_prompt(batch: Mapping[str, Any]) -> bool:
  """Whether any example of the global batch has a visual prompt (every process gets the same answer)."""
  has_visual = bool(np.asarray(batch["has_visual"]).any())
  if jax.process_count() > 1:  # the step is one SPMD program: every process must take the same one
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    has_visual = bool(np.asarray(multihost_utils.process_allgather(np.asarray(has_visual))).any())
  return has_visual


def text_encoder_vocab(config: Any) -> str | None:
  """vocab.txt of the text encoder's checkpoint (None: the pipeline's default, MiniLM's uncased vocabulary)."""
  path = text_encoder_checkpoint(config)
  if path and os.path.isfile(os.path.join(path, "vocab.txt")):
    return os.path.join(path, "vocab.txt")
  return None


def dummy_inputs(config: Any) -> dict[str, jax.Array]:
  """Model inputs of batch 1 at the configured resolution (to build the parameters)."""
  size, length = config.input.resolution, config.input.max_text_len
  return {"image": jnp.zeros((1, size, size, 3), jnp.uint8), "text_ids": jnp.zeros((1, length), jnp.int32),
          "text_attention_mask": jnp.ones((1, length), jnp.int32),
          "ref_image": jnp.zeros((1, size, size, 3), jnp.uint8), "ref_prompt": jnp.zeros((1, size, size)),
          "has_text": jnp.ones((1,), bool), "has_visual": jnp.ones((1,), bool)}


@dataclasses.dataclass(frozen=True)
class TrainedStage:
  """A trained stage loaded for tools that evaluate or probe it (`load_trained_stage`)."""

  config: Any  # the stage's config
  mesh: jax.sharding.Mesh
  rules: Any  # logical-axis rules
  model: omnisegnet.OmniSegNet
  params: Any  # laid out as the trainer lays them out
  shardings: Any  # of params
  checkpoint_dir: str
  step: int  # of the checkpoint loaded


def load_trained_stage(config: Any, workdir: str, stage: str | None = None) -> TrainedStage:
  """The newest checkpoint of WORKDIR/<stage>/checkpoints (stage: the config's by default) with its model, mesh
  and shardings; parameters the checkpoint lacks are freshly initialised (and listed)."""
  stage = stage or config.stage
  if stage != config.stage:
    config = stage_config(config, stage)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.make_rules(config.sharding.rules)
  checkpoint_dir = os.path.join(workdir, stage, "checkpoints")
  model = omnisegnet.OmniSegNet(model_config(config))
  init = lambda rng: model.init(rng, **dummy_inputs(config))["params"]  # noqa: E731
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract_boxed = jax.eval_shape(init, jax.random.PRNGKey(config.seed))
  shardings = sharding.state_shardings(abstract_boxed, mesh, rules)
  shapes_tree = sharding.plain(abstract_boxed)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes_tree, shardings)
  fresh = jax.jit(lambda rng: nn.unbox(init(rng)), out_shardings=shardings)(jax.random.PRNGKey(config.seed))
  params = checkpointing.load_params_from(checkpoint_dir, abstract, fresh)
  step = int(os.path.basename(checkpointing.latest_step_directory(checkpoint_dir)))
  return TrainedStage(config, mesh, rules, model, params, shardings, checkpoint_dir, step)


def _format_duration(seconds: float) -> str:
  seconds = max(0, int(seconds))
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class StepTimer:
  """The progress line's steps/s (over the steps since the last line) and its ETA for the rest of the stage.

  The ETA divides the steps left by a smoothed rate: an exponential moving average of the seconds per step, so
  one slow interval (a checkpoint write, the machine busy for a moment) moves it a little, not tenfold. The
  first interval holds the step's compile and is left out of the average (its line says 'ETA --'), and so is
  the time an evaluation takes (`restart` after it): before, the line after each evaluation of `demo_long` read
  '0.27 steps/s  ETA 2h02m' in a stage that had 7 minutes left.
  """

  def __init__(self, step: int, total_steps: int, *, smoothing: float = 0.3, clock=time.perf_counter):
    self.total_steps, self.smoothing, self.clock = total_steps, smoothing, clock
    self.seconds_per_step: float | None = None  # the smoothed figure; None until an interval without a compile
    self._compiling = True
    self.restart(step)

  def restart(self, step: int) -> None:
    """Starts the next interval at `step` now, leaving out whatever happened since the last `tick`."""
    self._step, self._time = step, self.clock()

  def tick(self, step: int) -> tuple[float, float | None]:
    """Closes the interval at `step`: (steps/s over it, seconds left in the stage or None while unknown)."""
    now, steps = self.clock(), step - self._step
    seconds = max(now - self._time, 1e-9) / max(steps, 1)
    if steps > 0 and self._compiling:
      self._compiling = False
    elif steps > 0:
      previous = self.seconds_per_step
      self.seconds_per_step = seconds if previous is None else previous + self.smoothing * (seconds - previous)
    self.restart(step)
    eta = None if self.seconds_per_step is None else (self.total_steps - step) * self.seconds_per_step
    return 1.0 / seconds, eta


# ===============================================================================================================
# Evaluation
# ===============================================================================================================


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
    self.local_batch = sharding.check_batch_size(config.eval.batch_size, mesh)
    self.sources = {split: pipeline.from_tfds(config.dataset.test_name, split, config.dataset.data_dir)
                    for split in config.dataset.test_splits}
    self._baseline = None

  def _batches(self, split: str):
    dataset = pipeline.make_dataset(
        self.sources[split], resolution=self.config.input.resolution, batch_size=self.local_batch,
        max_text_len=self.config.input.max_text_len, seed=self.config.seed, shuffle=False, num_epochs=1,
        prompt_types=None, process_index=jax.process_index(), process_count=jax.process_count(),
        pad_to_full_batches=True, vocab_path=text_encoder_vocab(self.config))
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
    draw_predictions([sample for _, sample in previews],
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


def draw_predictions(samples: Sequence[Mapping[str, Any]], texts: Sequence[Any], path: str, title: str) -> None:
  """Draws samples of `Evaluator.predict` to a PNG: ground truth and prompts as `visualize.render_preview` draws
  them, the predicted mask in green. `texts` are the samples' text prompts (from their source records)."""
  from omniris_jax.data import visualize  # pylint: disable=g-import-not-at-top  (matplotlib, only when drawing)
  examples = []
  for sample, text in zip(samples, texts, strict=True):
    prompt = sample["ref_prompt"].astype(np.uint8)
    examples.append({"image": sample["image"], "text": text, "text_mask": sample["text_mask"],
                     "visual_mask": sample["visual_mask"], "mask": sample["gt_mask"],
                     "ref_image": sample["ref_image"], "ref_mask": prompt, "ref_box": prompt,
                     "ref_scribble": prompt, "modality": int(sample["modality"]),
                     "setting": int(sample["setting"]), "prompt_type": int(sample["prompt_type"]),
                     "no_target": sample["gt_nt"]})
  visualize.render_preview(examples, path, predictions=[sample["pred_mask"] for sample in samples], title=title)


def write_results(stage_dir: str, table: str, results: Mapping[str, Any], baseline: Any, step: int,
                  config: Any) -> None:
  """WORKDIR/<stage>/results.md and results.json."""
  with open(os.path.join(stage_dir, "results.md"), "w") as file:
    file.write(f"# {config.stage}: results at step {step}\n\nDataset {config.dataset.test_name}, "
               f"{config.input.resolution}x{config.input.resolution}. cIoU, gIoU, N_acc in percent "
               "(metrics.py).\n\n" + table + "\n")
  with open(os.path.join(stage_dir, "results.json"), "w") as file:
    json.dump({"stage": config.stage, "step": step, "model": results, "baseline": baseline}, file, indent=1)


# ===============================================================================================================
# One stage
# ===============================================================================================================


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
  """Trains one stage (resuming if its checkpoints exist), evaluates it, and returns the final results."""
  stage_dir = os.path.join(workdir, config.stage)
  is_chief = jax.process_index() == 0
  log = print if is_chief else (lambda *args, **kwargs: None)
  os.makedirs(stage_dir, exist_ok=True)
  results_path = os.path.join(stage_dir, "results.json")

  # ----------------------------------------------------------------------------------------------------------
  # Mesh
  # ----------------------------------------------------------------------------------------------------------
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.make_rules(config.sharding.rules)
  local_batch = sharding.check_batch_size(config.input.batch_size, mesh)
  log(f"\n=== Stage {config.stage!r}: {config.total_steps} steps, batch {config.input.batch_size} "
      f"({local_batch} per process), mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} "
      "device(s) ===", flush=True)

  # ----------------------------------------------------------------------------------------------------------
  # Input pipeline
  # ----------------------------------------------------------------------------------------------------------
  train_iter = make_train_iterator(config, local_batch)

  # ----------------------------------------------------------------------------------------------------------
  # Model and optimizer
  # ----------------------------------------------------------------------------------------------------------
  model = omnisegnet.OmniSegNet(model_config(config))
  tx, learning_rate_fn = optim.make_optimizer(config.optimizer, config.total_steps)
  prompts = tuple(config.prompts)

  # ----------------------------------------------------------------------------------------------------------
  # Shard and transfer: shapes and shardings first, then the state is created sharded
  # ----------------------------------------------------------------------------------------------------------
  def init_params(rng):
    return model.init(rng, **dummy_inputs(config))["params"]

  def init_boxed_state(rng):
    params = init_params(rng)
    return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  init_rng = jax.random.PRNGKey(config.seed)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract_boxed = jax.eval_shape(init_boxed_state, init_rng)
  state_shardings = sharding.state_shardings(abstract_boxed, mesh, rules)
  shapes = sharding.plain(abstract_boxed)
  abstract_state = checkpointing.abstract_state(state_shardings, shapes)
  log("Parameters: " + ", ".join(f"{k} {v:,}" for k, v in omnisegnet.parameter_counts(shapes.params).items())
      + f"\nSharding: {sharding.describe(state_shardings, shapes)}", flush=True)

  # ----------------------------------------------------------------------------------------------------------
  # Update step
  # ----------------------------------------------------------------------------------------------------------
  batch_sharding = sharding.batch_sharding(mesh)

  def jit_train_step(step_prompts):
    return jax.jit(
        functools.partial(steps.train_step, model=model, tx=tx, loss_config=config.loss, seed=config.seed,
                          prompts=step_prompts,
                          frozen=optim.frozen_mask(shapes.params, tuple(config.optimizer.schedule))),
        in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None), donate_argnums=0)

  train_fn = jit_train_step(prompts)
  # A batch without a visual prompt (every text batch of `mix_unit='batch'`) gets the same loss and gradients
  # from a step that skips the reference image's backbone pass and the visual decode, in ~60% of the time
  # (benchmarks/RESULTS.md); it is compiled at its first such batch.
  text_train_fn = jit_train_step(("text",)) if set(prompts) == {"text", "visual"} else None
  eval_fn = jax.jit(functools.partial(steps.eval_step, model=model),
                    in_shardings=(state_shardings.params, batch_sharding))

  # ----------------------------------------------------------------------------------------------------------
  # Load checkpoint: resume > init_from (parameters) > scratch
  # ----------------------------------------------------------------------------------------------------------
  manager = checkpointing.make_manager(os.path.join(stage_dir, "checkpoints"),
                                       max_to_keep=config.keep_checkpoints,
                                       save_interval_steps=config.checkpoint_every,
                                       async_save=config.async_checkpointing)
  # Outside the mesh context: every sharding is explicit here (and the HF importer unboxes abstract values).
  state = checkpointing.restore_latest(manager, abstract_state, train_iter, log=log)
  if state is not None:
    state = state.replace(opt_state=optim.with_total_steps(state.opt_state, config.total_steps))
  else:
    params = jax.jit(lambda rng: nn.unbox(init_params(rng)), out_shardings=state_shardings.params)(init_rng)
    if config.init_from:
      init_dir = config.init_from if os.path.isabs(config.init_from) else os.path.join(
          workdir, config.init_from, "checkpoints")
      params = checkpointing.load_params_from(init_dir, abstract_state.params, params, log=log)
    elif text_encoder_checkpoint(config):
      path = text_encoder_checkpoint(config)
      params = jax.device_put(omnisegnet.load_pretrained_text_encoder(params, path), state_shardings.params)
      log(f"Text encoder initialised from {path}.")
    opt_state = jax.jit(tx.init, out_shardings=state_shardings.opt_state)(params)
    state = steps.TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), state_shardings.step),
                             params=params, opt_state=opt_state)
  start_step = int(jax.device_get(state.step))
  last_checkpoint = (os.path.join(manager.directory, str(manager.latest_step()))
                     if manager.latest_step() is not None else "none (the stage's initial state)")

  if start_step >= config.total_steps and os.path.exists(results_path):
    log(f"Stage {config.stage!r} already finished (step {start_step}); its results are in {stage_dir}.")
    manager.close()
    with open(results_path) as file:
      return json.load(file)["model"]

  # ----------------------------------------------------------------------------------------------------------
  # Evals
  # ----------------------------------------------------------------------------------------------------------
  evaluator = Evaluator(config, mesh, eval_fn, stage_dir, workdir)
  writer = summaries.SummaryWriter(os.path.join(stage_dir, "tensorboard"), enabled=is_chief)

  def evaluate(step: int) -> dict[str, Any]:
    start = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      results = evaluator.run(state.params, step)
    table = evaluator.report(results, step)
    log(f"\n[{config.stage}] evaluation at step {step} ({time.perf_counter() - start:.0f} s):\n{table}\n",
        flush=True)
    writer.scalars(step, {f"eval/{split}/{name}": value for split, result in results.items()
                          for name, value in result["overall"].items()
                          if name in ("cIoU", "gIoU", "N_acc", "T_acc") and not math.isnan(value)})
    writer.flush()
    return results

  # ----------------------------------------------------------------------------------------------------------
  # Train loop
  # ----------------------------------------------------------------------------------------------------------
  log(f"Training from step {start_step}.", flush=True)
  pending = []  # (step, metrics on device, batch record indices) since the last host sync
  timer, loop_start = StepTimer(start_step, config.total_steps), time.perf_counter()

  def check_pending() -> dict[str, float] | None:
    """Fetches the pending metrics; stops the run at the first non-finite step. Returns the last step's."""
    last = None
    for step, step_metrics, indices in pending:
      values = jax.device_get(step_metrics)
      if int(values["nonfinite"]):
        manager.wait_until_finished()
        raise NonFiniteError(
            f"Stage {config.stage!r}: non-finite loss or gradient at step {step} (loss={float(values['loss'])}, "
            f"grad_norm={float(values['grad_norm'])}); the batch's record indices (`index`, in their source) "
            f"were {indices.tolist()}. The update was not applied. Last good checkpoint: {last_checkpoint}.")
      last = {key: float(value) for key, value in values.items()}
    pending.clear()
    return last

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step = start_step
    while step < config.total_steps:
      batch = next(train_iter)
      step_fn = train_fn if text_train_fn is None or batch_has_visual_prompt(batch) else text_train_fn
      state, step_metrics = step_fn(state, sharding.global_batch(batch, mesh))
      step += 1
      pending.append((step, step_metrics, np.asarray(batch["index"])))
      if step % config.log_every == 0 or step == config.total_steps or step == start_step + 1:
        values = check_pending()
        # On the host: the schedule's numbers stay out of the compiled step (optim.scale_by_stage_schedule).
        values["learning_rate"] = float(learning_rate_fn(step - 1))
        writer.scalars(step, {f"train/{key}": value for key, value in values.items() if key != "nonfinite"})
        rate, eta = timer.tick(step)
        log(f"[{config.stage}] step {step}/{config.total_steps}  loss {values['loss']:.4f}  "
            + "".join(f"  {k} {values[k]:.3g}" for k in PROGRESS_KEYS if k in values)
            + f"  {rate:.2f} steps/s  ETA {'--' if eta is None else _format_duration(eta)}", flush=True)
      if step % config.checkpoint_every == 0 or step == config.total_steps:
        check_pending()
        if checkpointing.save(manager, state, train_iter, force=step == config.total_steps):
          last_checkpoint = os.path.join(manager.directory, str(step))
      if manager.reached_preemption(step):
        check_pending()
        checkpointing.save(manager, state, train_iter, force=True)
        manager.wait_until_finished()
        log(f"Preempted at step {step}: saved {os.path.join(manager.directory, str(step))}; exiting.")
        raise SystemExit(0)
      if config.eval_every and step % config.eval_every == 0 and step != config.total_steps:
        evaluate(step)
        timer.restart(step)  # the evaluation's time is not training time
  manager.wait_until_finished()
  log(f"[{config.stage}] trained {config.total_steps - start_step} steps in "
      f"{_format_duration(time.perf_counter() - loop_start)}.", flush=True)

  final_step = int(jax.device_get(state.step))
  results = evaluate(final_step)
  if is_chief:
    write_results(stage_dir, evaluator.report(results, final_step), results, evaluator.baseline(), final_step,
                  config)
    summaries.plot_learning_curves({config.stage: writer.csv_path},
                                   os.path.join(stage_dir, "learning_curves.png"))
    log(f"Wrote {os.path.join(stage_dir, 'results.md')} and results.json.", flush=True)
  writer.close()
  manager.close()
  return results


# The fields a stage file sets for itself; every other field of a stage run by `run_stages` comes from the config
# given on the command line, so one override (`--config.input.batch_size=8`) applies to every stage.
STAGE_FIELDS = ("stage", "init_from", "train_data", "mix_ratio", "prompts", "total_steps", "run_before")
# ... and the `optimizer` fields it sets for itself: what is frozen, and the peak learning rate.
STAGE_OPTIMIZER_FIELDS = ("schedule", "learning_rate")


def stage_config(config: Any, name: str) -> Any:
  """`config.stage_configs[name]` with every shared field (all but STAGE_FIELDS and STAGE_OPTIMIZER_FIELDS)
  taken from `config`."""
  stage = config.stage_configs[name]
  merged = config.copy_and_resolve_references()
  with merged.unlocked():
    del merged["stage_configs"]
    for field in STAGE_FIELDS:
      merged[field] = stage[field]
    for field in STAGE_OPTIMIZER_FIELDS:
      merged.optimizer[field] = stage.optimizer[field]
  return merged


def run_stages(config: Any, workdir: str) -> dict[str, Any]:
  """Runs `config.run_before` stages (from `config.stage_configs`) in order, then `config`'s own stage.

  The earlier stages take every shared field from `config` (see `stage_config`)."""
  results = {}
  for name in config.get("run_before", ()):
    results[name] = train_and_evaluate(stage_config(config, name), workdir)
  results[config.stage] = train_and_evaluate(config, workdir)
  if jax.process_index() == 0 and len(results) > 1:
    csvs = {name: os.path.join(workdir, name, "tensorboard", "metrics.csv") for name in results}
    summaries.plot_learning_curves(csvs, os.path.join(workdir, "learning_curves.png"), summaries.DEFAULT_TAGS)
    print(f"Wrote {os.path.join(workdir, 'learning_curves.png')} (the key scalars of all stages; each stage's own "
          "learning_curves.png has all of its scalars).", flush=True)
  return results
