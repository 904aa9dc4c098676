"""The `demo` and `demo_long` variants of every stage config: the shapes project on a 2-core CPU.

`configs/common.py` applies `apply(c, variant)` after a stage file has set its stage, so every change the demos
make to the paper's recipe is here, in one block. The model is `omniris_jax/models/proj/shapes/`: a small Swin
and the real pretrained all-MiniLM-L6-v2 text encoder (frozen) at 64x64, with the shapes additions on; the data
is the embedded synthetic `omniref/shapes` (built on first use, no download), its training scenes generated on
demand. The recipe's measurements are in benchmarks/RESULTS.md ("Demo recipe", "demo_long", "A cheaper demo
step").
"""

from __future__ import annotations

from omniris_jax.models.proj.shapes import losses as shapes_losses

VARIANTS = ("demo", "demo_long")
# Optimiser steps per stage.
STEPS = {"demo": {"alignment": 1400, "visual": 200, "joint": 900},
         "demo_long": {"alignment": 4000, "visual": 2000, "joint": 12_000}}


def apply(c, variant: str):
  """Turns the stage config `c` (paper recipe, `c.stage` set) into `variant` of it, in place; returns `c`."""
  long = variant == "demo_long"
  c.mix_unit = "batch"  # Whole text or visual batches: a text batch skips the visual path.
  c.total_steps = STEPS[variant][c.stage]

  c.dataset.name = "omniref/shapes"
  # Text-guided training data: the text examples of shapes; visual-guided: its visual and omni examples.
  c.dataset.text_source.name = c.dataset.get_ref("name")
  c.dataset.text_source.split = c.dataset.get_ref("train_split")
  c.dataset.text_source.modalities = ("text",)
  c.dataset.visual_source.modalities = ("visual", "omni")
  for source in (c.dataset.text_source, c.dataset.visual_source):
    source.generated = True  # A new scene for every training example: no scene is seen twice.
    source.category_maps = True  # Each example carries its scene's category map (loss.category_weight).

  c.input.resolution = 64
  c.input.batch_size = 8
  c.input.worker_count = 0

  c.model.name = "proj.shapes.omnisegnet"
  c.model.preset = "demo"
  c.model.text_encoder_checkpoint = "minilm"  # The shipped all-MiniLM-L6-v2.
  c.model.overrides = {
      "conv_stem": True, "prompt_kernel": True, "pixel_fusion": True, "nt_evidence": True,
      "num_categories": 8, "category_matching": True,  # The 8 shape categories of the generated category maps.
      "prototype_queries": True, "queries_in_prompt_box": True,
      "prompt_encoder": {"mask_values_outside_prompt": True},  # The release's option.
      # One block per scale (the paper has three); demo_long reads every scale twice.
      "mask_decoder": {"num_blocks": 6 if long else 3},
      "mask_positions": long, "pixel_word_attention": long, "fusion_low_level": long, "colour_head": long,
  }
  if not long:  # No dropout or drop-path: cheaper steps (the text encoder is frozen, the scenes always new).
    c.model.overrides.swin = {"drop_path_rate": 0.0}
    c.model.overrides.bert = {"dropout_rate": 0.0}

  c.loss = shapes_losses.default_loss_config()
  c.loss.dice_weight = 1.0
  c.loss.category_weight = 1.0
  c.loss.category_background_weight = 0.1
  if long:
    c.loss.colour_weight = 1.0
    c.loss.colour_background_weight = 0.1
  c.loss.nt_loss = "balanced"
  c.loss.nt_weight = 0.5
  c.loss.region_target = "any"
  c.loss.region_weight = 0.5

  c.optimizer.learning_rate = 3e-4 if long and c.stage == "joint" else 1e-3
  c.optimizer.warmup_steps = 20
  c.optimizer.grad_clip_norm = 1.0  # The first losses are large (grad norm ~1e4).
  c.optimizer.schedule = (("text_encoder/.*", None), (".*", "default"))  # MiniLM stays frozen in every stage.

  c.log_every = 10
  c.eval_every = 2000 if long else 0  # demo_long draws test-split learning curves.
  c.checkpoint_every = 500
  c.eval.batch_size = 32
  return c
