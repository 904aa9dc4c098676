"""Fields shared by every stage config; each stage file starts from `base_config(variant)` and sets its stage.

The paper's regime (Sec. 5, "Training Regimes"), one file per stage, each initialising from the one before:
  configs/alignment.py  stage 1, vision-language alignment on text data
  configs/visual.py     stage 2, visual instruction tuning, text encoder frozen
  configs/joint.py      stage 3, joint omni training, text : visual = 7 : 2

Variants (`--config=configs/joint.py:demo`):
  ''          the paper's recipe on real data (Swin-B, BERT-base, 480x480, batch 64, lr 1e-5)
  'demo'      small Swin + the real pretrained MiniLM text encoder on the synthetic `shapes` data, for a 2-core
              CPU; `joint.py:demo` runs all three stages from one command
  'demo_long' the demo model on a longer schedule, joint stage at peak lr 3e-4 (1 h 36 min - 2 h 50 min, 2 cores)
One field can be overridden from the command line, e.g. `--config.input.batch_size=16`.
"""

from __future__ import annotations

import ml_collections

VARIANTS = ("", "demo", "demo_long")
STAGES = ("alignment", "visual", "joint")
# Steps per stage (alignment, visual, joint) for each variant.
# demo: 13-14 minutes from a fresh clone on a 2-core VM at the speed of 2026-12-05 (about twice that on the
# slowest days seen), compiles and evaluations included (RESULTS.md, 'A cheaper demo step'); stage 1 is the
# longest because the scene parsing that visual prompts are matched by is learned there, and stage 3 has 900
# steps because omni N_acc needs them (64 after 800, 77-80 after 900).
# demo_long: 1 h 36 min on a quick day of a 2-core CPU, about 2 h 50 min on a slow one (RESULTS.md, 'demo_long
# with pixels that read the words').
_STEPS = {"": (40_000, 40_000, 40_000), "demo": (1400, 200, 900), "demo_long": (4000, 2000, 12_000)}


def base_config(variant: str = "") -> ml_collections.ConfigDict:
  """The config shared by all stages for `variant` ('' = paper, 'demo', 'demo_long')."""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown config variant {variant!r}; choose one of {VARIANTS} (e.g. configs/joint.py:demo).")
  demo = variant.startswith("demo")
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.seed = 0  # Seeds parameter init, dropout (fold_in(seed, step)), the data order and every random choice.
  c.stage = ""  # Set by the stage file: the sub-directory of the workdir this stage writes to.
  c.init_from = ml_collections.config_dict.placeholder(str)  # A stage name (WORKDIR/<name>/checkpoints) or an
  # absolute checkpoint directory whose newest parameters start this stage; None: scratch.
  c.train_data = "text"  # 'text' (dataset.text_source), 'visual' (dataset.visual_source) or 'mixed' (both).
  c.mix_ratio = (7, 2)  # Text : visual examples when train_data='mixed' (paper Table 5's best).
  # What the ratio interleaves: 'example' (every batch mixes both, the paper's batch sample ratio) or 'batch'
  # (whole batches from one source; a text batch skips the visual path, so the demos' joint steps are ~35%
  # cheaper on the 2-core CPU, benchmarks/RESULTS.md, 'A cheaper demo step').
  c.mix_unit = "batch" if demo else "example"
  c.prompts = ("text", "visual")  # The prompt encoders the train step runs (stage 1 skips the visual one).
  c.run_before = ()  # Stage names run first, from `stage_configs` (the demo's one-command sequence).

  c.dataset = ml_collections.ConfigDict()
  # TFDS name 'builder/config'. 'omniref/shapes' is the embedded synthetic set (built on first use, no download);
  # real datasets ('omniref/released', 'ris/grefcoco', ...) are built once with `python -m tfds_omniref.build`.
  c.dataset.name = "omniref/shapes" if demo else "omniref/released"
  c.dataset.data_dir = ml_collections.config_dict.placeholder(str)  # None: TFDS's default, ~/tensorflow_datasets.
  c.dataset.train_split = "train"  # The split `python -m omniris_jax.main` previews and summarises.
  c.dataset.test_name = c.dataset.get_ref("name")  # The dataset whose test splits every evaluation reads.
  c.dataset.test_splits = ("text_test", "visual_test", "omni_test")  # The paper's Table 1 columns.
  # Text-guided training data (stages 1 and 3): gRefCOCO in the paper, the text examples of shapes in the demo.
  c.dataset.text_source = ml_collections.ConfigDict()
  c.dataset.text_source.name = c.dataset.get_ref("name") if demo else "ris/grefcoco"  # TFDS name.
  c.dataset.text_source.split = c.dataset.get_ref("train_split") if demo else "train"  # Split to read.
  c.dataset.text_source.data_dir = c.dataset.get_ref("data_dir")  # Where it is built.
  c.dataset.text_source.modalities = ("text",) if demo else ()  # Keep only these modalities; () keeps all.
  # Procedural data only (shapes): draw a new scene for every training example instead of cycling the stored
  # train split, which the demo model memorises within a few epochs (benchmarks/RESULTS.md, 'Demo recipe').
  c.dataset.text_source.generated = demo
  # With `generated`: also give each example the category map of its target scene (loss.category_weight).
  c.dataset.text_source.category_maps = demo
  # Visual-guided training data (stages 2 and 3): OmniRef's visual train split; in the demo the visual and omni
  # examples of shapes (omni examples also carry text, so stage 2 already sees some).
  c.dataset.visual_source = ml_collections.ConfigDict()
  c.dataset.visual_source.name = c.dataset.get_ref("name")  # TFDS name.
  c.dataset.visual_source.split = c.dataset.get_ref("train_split")  # Split to read.
  c.dataset.visual_source.data_dir = c.dataset.get_ref("data_dir")  # Where it is built.
  c.dataset.visual_source.modalities = ("visual", "omni") if demo else ()  # Keep only these; () keeps all.
  c.dataset.visual_source.generated = demo  # As for text_source.
  c.dataset.visual_source.category_maps = demo  # As for text_source.

  c.input = ml_collections.ConfigDict()
  c.input.resolution = 64 if demo else 480  # Square side images and masks are resized to (paper: 480).
  c.input.max_text_len = 20  # BERT tokens including [CLS]/[SEP] (paper: 20).
  c.input.batch_size = 8 if demo else 64  # Global batch (split over processes and data x fsdp devices).
  c.input.prompt_types = ("mask", "box", "scribble")  # Spatial prompts drawn at random in training.
  c.input.regenerate_prompts = True  # Fresh boxes/scribbles from the reference mask at every draw (training).
  c.input.worker_count = 0 if demo else 8  # grain worker processes per host (0: in the training process).

  c.model = ml_collections.ConfigDict()
  c.model.preset = "demo" if demo else "paper"  # OmniSegNetConfig preset (models/omnisegnet.py).
  # Per-part field overrides of the preset, e.g. {'swin': {'embed_dim': 48}, 'omni_fusion': 'joint'}.
  c.model.overrides = ml_collections.ConfigDict()
  if demo:  # The best of the recipe search on shapes (benchmarks/RESULTS.md, 'Demo recipe').
    # Overlapping 3x3 convolutions embed the patches (ours): shapes a few patches wide are told apart better
    # than by Swin's one linear map of each 4x4 patch (46% vs 34% of object pixels after 600 steps, RESULTS.md).
    c.model.overrides.swin = {"conv_stem": True}
    # demo: no dropout anywhere. The frozen MiniLM's dropout (0.1) only added noise to fixed features and the
    # small Swin's drop-path (0.1) regularised a model that sees fresh generated scenes every step; together
    # their random masks cost ~12% of a stage-1 step (RESULTS.md, 'A cheaper demo step'). demo_long keeps both:
    # its numbers were measured with them.
    if variant == "demo":
      c.model.overrides.swin["drop_path_rate"] = 0.0
      c.model.overrides.bert = {"dropout_rate": 0.0}
    # One block per scale in the demo (3x cheaper than the paper's 9). demo_long reads every scale twice (+31% per
    # stage-1 step), meant to let the queries compare what they found; it ended level with 3 blocks and did not fix
    # "the topmost circle" (RESULTS.md, 'demo_long with whole-batch mixing and six decoder blocks'), but it is the
    # recipe whose numbers are measured. The prompt's direct paths to the pixels (ours).
    c.model.overrides.mask_decoder = {"num_blocks": 6 if variant == "demo_long" else 3,
                                      "prompt_kernel": True, "pixel_fusion": True,
                                      "nt_evidence": True,
                                      # demo_long: positions in the mask features, for "the X on the right".
                                      "mask_positions": variant == "demo_long",
                                      # demo_long: pixels read the words one by one, for conjunctions
                                      # ("the small diamond and the circle"), 46% of the text prompts: text
                                      # cIoU 65.34 -> 67.28 at no measurable cost (RESULTS.md, 'demo_long with
                                      # pixels that read the words').
                                      "pixel_word_attention": variant == "demo_long",
                                      # demo_long: the fusion pixels also read the backbone's stride-4
                                      # features, which keep more of the shapes' colours than the mask
                                      # features: text cIoU 67.28 -> 68.36 (RESULTS.md, 'demo_long: the
                                      # colours the model cannot tell apart').
                                      "fusion_low_level": variant == "demo_long"}
    # Scene parsing of the 8 shape categories from the generated category maps, and visual prompts matched by
    # category (ours; the visual path matched nothing without them, benchmarks/RESULTS.md).
    c.model.overrides.num_categories = 8
    # demo_long: a head that reads the image's own colours back from the mask features (self-supervised,
    # loss.colour_weight), so the mask features keep the colour words' referents apart ("the red circle" vs
    # "the orange circle"): text cIoU 68.36 -> 72.81, no colour confused (RESULTS.md, 'demo_long with a colour
    # head on the mask features').
    c.model.overrides.colour_head = variant == "demo_long"
    c.model.overrides.category_matching = True
    # Zero the reference's values outside the prompt (the release's option): the visual path learned nothing
    # without it within the demo's steps.
    c.model.overrides.prompt_encoder = {"mask_values_outside_prompt": True, "prototype_queries": True,
                                        "queries_in_prompt_box": True}
  # HF-format BERT folder the text encoder starts from when a stage starts from scratch; 'minilm' = the shipped
  # all-MiniLM-L6-v2 (demo); the paper uses BERT-base (give its folder); None = random init.
  c.model.text_encoder_checkpoint = "minilm" if demo else ml_collections.config_dict.placeholder(str)

  c.loss = _loss_config()
  if demo:  # Small referents (~5% of the image) and an imbalanced no-target label need these on shapes.
    c.loss.dice_weight = 1.0  # Overlap term on examples with a referent: CE alone let an unsure model paint nothing.
    c.loss.category_weight = 1.0  # Scene parsing of the generated category maps ...
    c.loss.category_background_weight = 0.1  # ... weighted towards the objects.
    if variant == "demo_long":  # The colour head's self-supervised term, weighted towards the objects too.
      c.loss.colour_weight = 1.0
      c.loss.colour_background_weight = 0.1
    c.loss.nt_loss = "balanced"  # Each no-target class weighs half of the batch's loss.
    c.loss.nt_weight = 0.5
    c.loss.region_target = "any"
    c.loss.region_weight = 0.5

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 1e-3 if demo else 1e-5  # Peak learning rate (paper: 1e-5).
  c.optimizer.warmup_steps = 20 if demo else 1000  # Linear warmup from 0.
  c.optimizer.power = 0.9  # Polynomial decay exponent (detectron2 'WarmupPolyLR' default) ...
  c.optimizer.end_learning_rate = 0.0  # ... down to this at the stage's last step.
  c.optimizer.b1 = 0.9  # Adam beta1.
  c.optimizer.b2 = 0.999  # Adam beta2.
  c.optimizer.eps = 1e-8  # Adam epsilon.
  c.optimizer.weight_decay = 0.05  # Decoupled weight decay (paper), except on `no_decay` paths.
  c.optimizer.no_decay = (  # Path regexes (re.search) that get no weight decay.
      r"(^|/)bias$", r"(^|/)scale$", r"(^|/)embedding$", r"relative_position_bias_table$",
      r"(^|/)(level_embed|query_embed|query_pos|query_features|query_positions|reference_points)$")
  # Global-norm clip; None: off (the release clips at 0.01). The demo's first losses are large (grad norm ~1e4).
  c.optimizer.grad_clip_norm = 1.0 if demo else ml_collections.config_dict.placeholder(float)
  # (path regex, None = frozen | 'default' = trained), first full match wins (big_vision's config.schedule).
  # The demo keeps the pretrained MiniLM frozen in every stage (it trained no better unfrozen, and faster frozen).
  c.optimizer.schedule = (("text_encoder/.*", None), (".*", "default")) if demo else ((".*", "default"),)

  c.total_steps = 120_000  # Optimiser steps of this stage (set by the stage file).
  c.log_every = 10 if demo else 100  # Steps between progress lines / scalars (and the NaN guard's host sync).
  # Steps between evaluations on the test splits (0: only at the end of the stage); demo_long draws test curves.
  c.eval_every = 2000 if variant == "demo_long" else 0
  # Steps between checkpoints (and always at the end). A save of the demo's 32 M state values costs ~1.4 s of
  # training on 2 cores; a killed demo loses at most 500 steps (1.5-3 minutes, by the day's speed).
  c.checkpoint_every = 500 if demo else 2000
  c.keep_checkpoints = 2  # Checkpoints kept per stage (the newest).
  c.async_checkpointing = True  # Write checkpoints in the background while training continues.

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 32 if demo else 64  # Global evaluation batch (padded to full batches).
  c.eval.preview_per_split = 3  # Examples per test split drawn with predictions in evals/step_<N>.png.

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # Data-parallel axis; -1 = every device not used by the others.
  c.mesh.fsdp = 1  # Batch + parameter sharding (ZeRO-3) axis.
  c.mesh.model = 1  # Tensor-parallel axis ('mlp' and 'heads' sides of projections).
  c.mesh.num_devices = 0  # 0: every device; n: the first n (tests, debugging on part of a machine).

  c.sharding = ml_collections.ConfigDict()
  c.sharding.rules = (  # Logical axis -> mesh axes (models/layers.py names); see omniris_jax/sharding.py.
      ("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "model"), ("heads", "model"),
      ("conv_out", "model"), ("conv_in", None), ("vocab", None), ("table", None), ("length", None),
      ("height", None), ("width", None))
  return c


def _loss_config() -> ml_collections.ConfigDict:
  """The loss terms' weights (omniris_jax/losses.py documents each term)."""
  from omniris_jax import losses  # pylint: disable=g-import-not-at-top
  return losses.default_loss_config()


def stage_steps(variant: str, stage: str) -> int:
  """The number of optimiser steps of `stage` in `variant`."""
  return _STEPS[variant][STAGES.index(stage)]
