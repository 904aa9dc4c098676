"""A trained stage's text referring results on the shapes data, broken down by the wording of the prompt.

The split's cIoU says how well the model refers; this says which prompts it fails on. Every text prompt of the
synthetic `shapes` data is worded by one of the generator's templates (`shapes.expression_template`: "the red
circle", "the leftmost square", "the star and the blue circle", ...). The script loads the newest checkpoint of
WORKDIR/<stage>/checkpoints, predicts every example of the split, and prints, per template, the split's metrics
over its prompts (the same definitions as Table 1, metrics.py), the cIoU over its targeted prompts alone, and
the prompts with the lowest IoU, with their example index (`--draw` draws them with the predictions).

  python benchmarks/text_groups.py --config=configs/joint.py:demo_long --workdir=workdir/demo_long \
      [--stage=joint] [--split=text_test] [--worst=10] [--draw=worst.png]

Omni prompts carry text too: `--split=omni_test` groups them by the wording of their text prompt. Give the
config the run trained with: parameters its checkpoint lacks would be freshly initialised (they are listed).
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile

from absl import app
from absl import flags
import jax
from flax import linen as nn
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from omniris_jax import checkpointing, metrics, sharding, steps, train  # noqa: E402
from omniris_jax.models import omnisegnet  # noqa: E402
from tfds_omniref.omniref import shapes  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/joint.py:demo_long", "The config the run trained with.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir.", required=True)
_STAGE = flags.DEFINE_string("stage", None, "The stage whose newest checkpoint to evaluate (default: the config's).")
_SPLIT = flags.DEFINE_string("split", "text_test", "The test split to break down (text_test or omni_test).")
_WORST = flags.DEFINE_integer("worst", 10, "How many of the lowest-IoU targeted prompts to list.")
_DRAW = flags.DEFINE_string("draw", None, "Also draw those prompts' examples with the predictions to this PNG.")


def load_params(config, checkpoint_dir: str, mesh, rules):
  """The newest parameters in `checkpoint_dir`, laid out as the trainer lays them out."""
  model = omnisegnet.OmniSegNet(train.model_config(config))
  init = lambda rng: model.init(rng, **train.dummy_inputs(config))["params"]  # noqa: E731
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract_boxed = jax.eval_shape(init, jax.random.PRNGKey(config.seed))
  shardings = sharding.state_shardings(abstract_boxed, mesh, rules)
  shapes_tree = sharding.plain(abstract_boxed)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes_tree, shardings)
  fresh = jax.jit(lambda rng: nn.unbox(init(rng)), out_shardings=shardings)(jax.random.PRNGKey(config.seed))
  params = checkpointing.load_params_from(checkpoint_dir, abstract, fresh)
  return model, params, shardings


def breakdown(samples, texts) -> list[tuple[str, dict, dict]]:
  """(template, metrics over its prompts, metrics over its targeted prompts) per template, in TEMPLATES order."""
  groups: dict[str, list] = {}
  for sample, text in zip(samples, texts):
    score = metrics.score_sample(sample["pred_mask"], sample["pred_nt"], sample["gt_mask"], sample["gt_nt"])
    groups.setdefault(shapes.expression_template(text), []).append(score)
  rows = []
  for template in shapes.TEMPLATES:
    if template in groups:
      scores = groups[template]
      rows.append((template, metrics.summarize(scores), metrics.summarize([s for s in scores if s.targeted])))
  return rows


def main(argv):
  del argv
  config = _CONFIG.value
  stage = _STAGE.value or config.stage
  if stage != config.stage:
    config = train.stage_config(config, stage)
  if not config.dataset.test_name.startswith("omniref/shapes"):
    raise app.UsageError(f"{config.dataset.test_name=}: the wording templates exist only for the synthetic "
                         "shapes data (omniref/shapes).")
  checkpoint_dir = os.path.join(_WORKDIR.value, stage, "checkpoints")
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.make_rules(config.sharding.rules)
  model, params, shardings = load_params(config, checkpoint_dir, mesh, rules)
  eval_fn = jax.jit(functools.partial(steps.eval_step, model=model),
                    in_shardings=(shardings, sharding.batch_sharding(mesh)))
  with tempfile.TemporaryDirectory() as scratch:  # Evaluator writes nothing unless asked to run(); keep it away
    evaluator = train.Evaluator(config, mesh, eval_fn, scratch, _WORKDIR.value)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      samples = evaluator.predict(params, _SPLIT.value)
  records = evaluator.sources[_SPLIT.value]
  texts = [records[int(sample["index"])]["text"] for sample in samples]
  texts = [text.decode() if isinstance(text, bytes) else str(text) for text in texts]

  step = os.path.basename(checkpointing.latest_step_directory(checkpoint_dir))
  overall = metrics.summarize(metrics.score_sample(s["pred_mask"], s["pred_nt"], s["gt_mask"], s["gt_nt"])
                              for s in samples)
  print(f"\n{_SPLIT.value} of {config.dataset.test_name}, stage {stage!r} at step {step} ({_WORKDIR.value}): "
        f"cIoU {overall['cIoU']:.2f}, gIoU {overall['gIoU']:.2f}, N_acc {overall['N_acc']:.2f}, "
        f"T_acc {overall['T_acc']:.2f} over {len(samples)} prompts\n")
  cell = lambda value: "-" if value != value else f"{value:.2f}"  # noqa: E731  (NaN: no such prompts)
  print("| template | prompts (no target) | cIoU | gIoU | N_acc | T_acc | cIoU of the targeted |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  for template, group, targeted in breakdown(samples, texts):
    print(f"| {template} | {group['num_samples']} ({group['num_no_target']}) | {cell(group['cIoU'])} | "
          f"{cell(group['gIoU'])} | {cell(group['N_acc'])} | {cell(group['T_acc'])} | {cell(targeted['cIoU'])} |")

  scored = [(metrics.score_sample(s["pred_mask"], s["pred_nt"], s["gt_mask"], s["gt_nt"]), text, s)
            for s, text in zip(samples, texts) if not s["gt_nt"]]
  scored.sort(key=lambda triple: triple[0].iou)
  worst = scored[:_WORST.value]
  print(f"\nThe {len(worst)} targeted prompts with the lowest IoU (the index is the example's in {_SPLIT.value}):")
  for score, text, sample in worst:
    said = "said no target" if score.outcome == "FP" else f"IoU {score.iou:.2f}"
    print(f"  {said:>15}  {int(sample['index']):>5}  {text!r}")
  if _DRAW.value and worst:
    train.draw_predictions([sample for _, _, sample in worst], [text for _, text, _ in worst], _DRAW.value,
                           title=f"{_SPLIT.value}, stage {stage!r} at step {step}: the lowest-IoU prompts, "
                                 "predictions in green")
    print(f"Wrote {_DRAW.value}.")


if __name__ == "__main__":
  app.run(main)
