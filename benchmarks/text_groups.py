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

`--colours` also asks, for every single-target "the <colour> <category>" prompt of text_test, for each shape of
that category by its own colour ("the red star", "the orange star", ... on the same image), and tabulates how
often a prompt also paints a sibling of another colour: which colour words the model tells apart.
"""

from __future__ import annotations

import colorsys
import functools
import os
import sys
import tempfile

from absl import app
from absl import flags
import jax
import numpy as np
from flax import linen as nn
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from omniris_jax import metrics, sharding, steps, train  # noqa: E402
from omniris_jax.data import visualize  # noqa: E402
from omniris_jax.evaluators import referring  # noqa: E402
from tfds_omniref.omniref import omniref_dataset_builder, shapes  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/joint.py:demo_long", "The config the run trained with.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir.", required=True)
_STAGE = flags.DEFINE_string("stage", None, "The stage whose newest checkpoint to evaluate (default: the config's).")
_SPLIT = flags.DEFINE_string("split", "text_test", "The test split to break down (text_test or omni_test).")
_WORST = flags.DEFINE_integer("worst", 10, "How many of the lowest-IoU targeted prompts to list.")
_DRAW = flags.DEFINE_string("draw", None, "Also draw those prompts' examples with the predictions to this PNG.")
_COLOURS = flags.DEFINE_boolean("colours", False, "Also tabulate which colour words the model confuses (text_test).")


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


def _nearest(mask, size: int):
  """A (S, S) bool mask resampled to (size, size) by the nearest pixel centre (as the pipeline's masks)."""
  rows = ((np.arange(size) + 0.5) * mask.shape[0] / size).astype(int)
  cols = ((np.arange(size) + 0.5) * mask.shape[1] / size).astype(int)
  return mask[rows][:, cols]


def colour_confusion(evaluator, params, test_name: str):
  """{(named colour, sibling colour): [prompts that painted the sibling, prompts]} over text_test's single-target
  colour prompts, each asked once per shape of its category by that shape's colour (see the module docstring)."""
  generator = omniref_dataset_builder.shapes_generator(test_name)
  source = evaluator.sources["text_test"]
  records, asked = [], []
  for index in range(len(source)):
    example, scene = shapes.generate_example_and_scene(generator, "text_test", index)
    if example["no_target"] or shapes.expression_template(example["text"]) != "colour":
      continue
    name = example["text"].split()[-1]
    siblings = scene.instances_of(shapes.CATEGORY_NAMES.index(name))
    for target in siblings:
      record = dict(source[index])
      record["text"] = f"the {scene.objects[target].colour} {name}".encode()
      records.append(record)
      asked.append((scene, target, siblings))
  evaluator.sources["colour_prompts"] = records
  samples = evaluator.predict(params, "colour_prompts")
  table: dict[tuple[str, str], list[int]] = {}
  for sample in samples:
    scene, target, siblings = asked[int(sample["index"])]
    predicted = np.asarray(sample["pred_mask"]).astype(bool).reshape(sample["pred_mask"].shape[:2])
    for other in siblings:
      if other == target:
        continue
      mask = _nearest(scene.instance_masks[other], predicted.shape[0])
      painted = not sample["pred_nt"] and (predicted & mask).sum() > 0.5 * mask.sum()
      counts = table.setdefault((scene.objects[target].colour, scene.objects[other].colour), [0, 0])
      counts[0] += int(painted)
      counts[1] += 1
  return table


def print_colour_confusion(table) -> None:
  hue = lambda name: colorsys.rgb_to_hsv(*(v / 255 for v in shapes.COLOURS[name]))[0]  # noqa: E731
  colours = sorted(shapes.COLOURS, key=hue)  # red, orange, yellow, green, cyan, blue, purple
  print("\nColour words told apart: row = the colour named (\"the orange star\"), column = the colour of another shape"
        "\nof that category in the image; a cell is how many of those prompts painted that shape too / how many "
        "there were.\n")
  print("| named \\ also painted | " + " | ".join(colours) + " |")
  print("|---|" + "---:|" * len(colours))
  for named in colours:
    cells = [(f"{table[(named, other)][0]}/{table[(named, other)][1]}" if (named, other) in table else "-")
             for other in colours]
    print(f"| {named} | " + " | ".join(cells) + " |")
  painted = sum(v[0] for v in table.values())
  pairs = sum(v[1] for v in table.values())
  print(f"\nA sibling of another colour painted in {painted} of {pairs} (prompt, sibling) pairs.")


def main(argv):
  del argv
  if not _CONFIG.value.dataset.test_name.startswith("omniref/shapes"):
    raise app.UsageError(f"{_CONFIG.value.dataset.test_name=}: the wording templates exist only for the synthetic "
                         "shapes data (omniref/shapes).")
  trained = train.load_trained_stage(_CONFIG.value, _WORKDIR.value, _STAGE.value)
  config, mesh, rules, model, params, shardings = (trained.config, trained.mesh, trained.rules, trained.model,
                                                   trained.params, trained.shardings)
  stage, step = config.stage, trained.step
  eval_fn = jax.jit(functools.partial(steps.eval_step, model=model),
                    in_shardings=(shardings, sharding.batch_sharding(mesh)))
  with tempfile.TemporaryDirectory() as scratch:  # Evaluator writes nothing unless asked to run(); keep it away
    evaluator = referring.Evaluator(config, mesh, eval_fn, scratch, _WORKDIR.value)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      samples = evaluator.predict(params, _SPLIT.value)
  records = evaluator.sources[_SPLIT.value]
  texts = [records[int(sample["index"])]["text"] for sample in samples]
  texts = [text.decode() if isinstance(text, bytes) else str(text) for text in texts]

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
  if worst:
    print(f"\nThe {len(worst)} targeted prompts with the lowest IoU (the index is the example's in {_SPLIT.value}):")
  for score, text, sample in worst:
    said = "said no target" if score.outcome == "FP" else f"IoU {score.iou:.2f}"
    print(f"  {said:>15}  {int(sample['index']):>5}  {text!r}")
  if _DRAW.value and worst:
    visualize.draw_predictions([sample for _, _, sample in worst], [text for _, text, _ in worst], _DRAW.value,
                           title=f"{_SPLIT.value}, stage {stage!r} at step {step}: the lowest-IoU prompts, "
                                 "predictions in green")
    print(f"Wrote {_DRAW.value}.")
  if _COLOURS.value:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      print_colour_confusion(colour_confusion(evaluator, params, config.dataset.test_name))


if __name__ == "__main__":
  app.run(main)
