"""Fields shared by every stage config; each stage file starts from `base_config(variant)`, sets its stage, and
ends with `for_variant(c, variant)`.

The paper's regime (Sec. 5, "Training Regimes"), one file per stage, each initialising from the one before:
  configs/alignment.py  stage 1, vision-language alignment on text data
  configs/visual.py     stage 2, visual instruction tuning, text encoder frozen
  configs/joint.py      stage 3, joint omni training, text : visual = 7 : 2

Variants (`--config=configs/joint.py:demo`):
  ''          the paper's recipe on real data (Swin-B, BERT-base, 480x480, batch 64, lr 1e-5)
  'demo'      the synthetic `shapes` demo on a 2-core CPU (configs/proj/shapes/demo.py); `joint.py:demo` runs
              all three stages from one command
  'demo_long' the same on a longer schedule
  'release'   the paper's data and stages with the training recipe of the authors' PyTorch release (`_release`)
One field can be overridden from the command line, e.g. `--config.input.batch_size=16`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections

VARIANTS = ("", "demo", "demo_long", "release")
STAGES = ("alignment", "visual", "joint")
PAPER_STEPS = 40_000  # Optimiser steps of each stage in the paper's recipe.


def base_config(variant: str = "") -> ml_collections.ConfigDict:
  """The paper's config shared by all stages; `variant` is only checked here (`for_variant` applies it)."""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown config variant {variant!r}; choose one of {VARIANTS} (e.g. configs/joint.py:demo).")
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.seed = 0  # Seeds parameter init, dropout (fold_in(seed, step)), the data order and every random choice.
  c.stage = ""  # Set by the stage file: the sub-directory of the workdir this stage writes to.
  c.init_from = ml_collections.config_dict.placeholder(str)  # A stage name (WORKDIR/<name>/checkpoints), an
  # absolute checkpoint directory or an absolute workdir (e.g. a converted release checkpoint) whose newest
  # parameters start this stage; None: scratch.
  c.train_data = "text"  # 'text' (dataset.text_source), 'visual' (dataset.visual_source) or 'mixed' (both).
  c.mix_ratio = (7, 2)  # Text : visual examples when train_data='mixed' (paper Table 5's best).
  # What the ratio interleaves: 'example' (every batch mixes both, the paper's batch sample ratio) or 'batch'
  # (whole batches from one source; a text-source batch takes a step that skips the visual prompt's path).
  c.mix_unit = "example"
  c.prompts = ("text", "visual")  # The prompt encoders the train step runs (stage 1 skips the visual one).
  c.run_before = ()  # Stage names run first, from `stage_configs` (one command for several stages).
  c.total_steps = PAPER_STEPS  # Optimiser steps of this stage.

  c.dataset = ml_collections.ConfigDict()
  # TFDS name 'builder/config'. 'omniref/shapes' is the embedded synthetic set (built on first use, no download);
  # real datasets ('omniref/released', 'ris/grefcoco', ...) are built once with `python -m tfds_omniref.build`.
  c.dataset.name = "omniref/released"
  c.dataset.data_dir = ml_collections.config_dict.placeholder(str)  # None: TFDS's default, ~/tensorflow_datasets.
  c.dataset.train_split = "train"  # The split `python -m omniris_jax.main` previews and summarises.
  c.dataset.test_name = c.dataset.get_ref("name")  # The dataset whose test splits every evaluation reads.
  c.dataset.test_splits = ("text_test", "visual_test", "omni_test")  # The paper's Table 1 columns.
  # Text-guided training data (stages 1 and 3): gRefCOCO in the paper.
  c.dataset.text_source = ml_collections.ConfigDict()
  c.dataset.text_source.name = "ris/grefcoco"  # TFDS name.
  c.dataset.text_source.split = "train"  # Split to read.
  c.dataset.text_source.data_dir = c.dataset.get_ref("data_dir")  # Where it is built.
  c.dataset.text_source.modalities = ()  # Keep only these modalities; () keeps all.
  # Procedural data only (shapes): draw a new scene for every training example instead of reading the split.
  c.dataset.text_source.generated = False
  # With `generated`: also give each example the category map of its target scene.
  c.dataset.text_source.category_maps = False
  # Visual-guided training data (stages 2 and 3): OmniRef's visual train split.
  c.dataset.visual_source = ml_collections.ConfigDict()
  c.dataset.visual_source.name = c.dataset.get_ref("name")  # TFDS name.
  c.dataset.visual_source.split = c.dataset.get_ref("train_split")  # Split to read.
  c.dataset.visual_source.data_dir = c.dataset.get_ref("data_dir")  # Where it is built.
  c.dataset.visual_source.modalities = ()  # Keep only these; () keeps all.
  c.dataset.visual_source.generated = False  # As for text_source.
  c.dataset.visual_source.category_maps = False  # As for text_source.

  c.input = ml_collections.ConfigDict()
  c.input.resolution = 480  # Square side images and masks are resized to (paper: 480).
  c.input.max_text_len = 20  # BERT tokens including [CLS]/[SEP] (paper: 20).
  c.input.keep_sep = True  # A longer text is cut keeping [SEP] last; False cuts the ids (drops [SEP]).
  c.input.batch_size = 64  # Global batch (split over processes and data x fsdp devices).
  c.input.prompt_types = ("mask", "box", "scribble")  # Spatial prompts drawn at random in training.
  c.input.regenerate_prompts = True  # Fresh boxes/scribbles from the reference mask at every draw (training).
  c.input.worker_count = 8  # grain worker processes per host (0: in the training process).

  c.model = ml_collections.ConfigDict()
  c.model.name = "omnisegnet"  # The model module under omniris_jax/models/ (models/factory.py).
  c.model.preset = "paper"  # The model Config's preset: 'paper', 'demo' or 'tiny_test'.
  # Field overrides of the preset: a part's fields as a dict ({'swin': {'embed_dim': 48}}) or a top-level field
  # ('omni_fusion': 'joint').
  c.model.overrides = ml_collections.ConfigDict()
  # HF-format BERT folder the text encoder starts from when a stage starts from scratch: the paper uses
  # BERT-base (give its folder); 'minilm' = the all-MiniLM-L6-v2 that ships in a package; None = random init.
  c.model.text_encoder_checkpoint = ml_collections.config_dict.placeholder(str)

  c.loss = _loss_config()

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 1e-5  # Peak learning rate (paper: 1e-5).
  c.optimizer.warmup_steps = 1000  # Linear warmup from 0, then the `lr_schedule`:
  c.optimizer.lr_schedule = "poly"  # 'poly' (detectron2 'WarmupPolyLR') or 'multistep' ('WarmupMultiStepLR').
  c.optimizer.power = 0.9  # 'poly': decay exponent (detectron2's default) ...
  c.optimizer.end_learning_rate = 0.0  # ... down to this at the stage's last step.
  c.optimizer.boundaries = ()  # 'multistep': from each of these absolute steps on, the rate is multiplied ...
  c.optimizer.factor = 0.1  # ... by this.
  c.optimizer.b1 = 0.9  # Adam beta1.
  c.optimizer.b2 = 0.999  # Adam beta2.
  c.optimizer.eps = 1e-8  # Adam epsilon.
  c.optimizer.weight_decay = 0.05  # Decoupled weight decay (paper), except on `no_decay` paths.
  c.optimizer.no_decay = (  # Path regexes (re.search) that get no weight decay.
      r"(^|/)bias$", r"(^|/)scale$", r"(^|/)embedding$", r"relative_position_bias_table$",
      r"(^|/)(level_embed|query_embed|query_pos|query_features|query_positions|reference_points)$")
  c.optimizer.grad_clip_norm = ml_collections.config_dict.placeholder(float)  # Global-norm clip; None: off.
  # (path regex, None = frozen | 'default' = trained), first full match wins (big_vision's config.schedule).
  c.optimizer.schedule = ((".*", "default"),)

  c.log_every = 100  # Steps between progress lines / scalars (and the NaN guard's host sync).
  c.eval_every = 0  # Steps between evaluations on the test splits (0: only at the end of the stage).
  c.checkpoint_every = 2000  # Steps between checkpoints (and always at the end).
  c.keep_checkpoints = 2  # Checkpoints kept per stage (the newest).
  c.async_checkpointing = True  # Write checkpoints in the background while training continues.

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 64  # Global evaluation batch (padded to full batches).
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


def for_variant(c: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """The stage config `c` (paper recipe, stage fields set) turned into `variant`."""
  if not variant:
    return c
  if variant == "release":
    return _release(c)
  path = Path(__file__).resolve().parent / "proj" / "shapes" / "demo.py"
  spec = importlib.util.spec_from_file_location("omniris_configs_proj_shapes_demo", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.apply(c, variant)


def _release(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The stage config `c` with the training recipe of the authors' PyTorch release (As-Time-Goes-By/OmniSegNet).

  Each line below sets one part of the release's recipe and names the release file it comes from. As in the
  paper: lr 1e-5, batch 64, AdamW's betas and eps (torch defaults), the stages, their data and length (40,000
  steps; the release trains 50 epochs).
  """
  c.model.preset = "release"  # The released model (OmniSegNetConfig.release; OmniSegNet_model/).
  # 1e-5 for every group: configs/referring_swin_base.yaml BASE_LR; train_net.py build_optimizer reads neither
  # train.sh's --lr/--wd/--warmup* nor BACKBONE_MULTIPLIER.
  c.optimizer.learning_rate = 1e-5
  c.optimizer.lr_schedule = "multistep"  # detectron2's default WarmupMultiStepLR, stepped every iteration ...
  c.optimizer.boundaries = (26_320, 33_840)  # ... x0.1 from these steps on (referring_swin_base.yaml STEPS, GAMMA);
  c.optimizer.factor = 0.1
  c.optimizer.warmup_steps = 0  # its warmup is a no-op (Base-COCO-InstanceSegmentation.yaml WARMUP_FACTOR 1.0).
  # Global-norm clip over the optimised gradients: train.sh --clip_grads --clip_value 0.01, applied by utils.py
  # NativeScalerWithGradNormCount2 (setup() in train_net.py disables SOLVER.CLIP_GRADIENTS).
  c.optimizer.grad_clip_norm = 0.01
  # BERT layers 0-9 train; its embeddings and layers 10-11 never do (build_optimizer optimises only
  # text_encoder.encoder.layer[i], i < 10). The stage's own rules come first: stage 2 still freezes all of BERT.
  c.optimizer.schedule = (*(rule for rule in c.optimizer.schedule if rule[0] != ".*"),
                          (r"text_encoder/layer_[0-9]/.*", "default"), ("text_encoder/.*", None), (".*", "default"))
  # Weight decay 0.05 (Base-COCO-InstanceSegmentation.yaml) except, as build_optimizer decides: parameters of
  # nn.LayerNorm/GroupNorm modules (not BERT's, whose layers are one decayed group; not the prompt downscaler's
  # LayerNorm2d, a plain nn.Module), nn.Embedding tables (the decoder's queries and level_embed, the prompt
  # queries vis_prompts / vis_prompts_pos) and relative_position_bias_table. Biases and plain parameters
  # (pixel_encoder/level_embed, the decoder's prompt_gate = lang_weight) decay.
  c.optimizer.no_decay = (
      r"^(?!text_encoder/|prompt_encoder/prompt_downscaler/).*norm[^/]*/(scale|bias)$", r"(^|/)embedding$",
      r"relative_position_bias_table$", r"^mask_decoder/(query_features|query_positions|level_embed)$",
      r"^prompt_encoder/(query_embed|query_pos)$")
  # One visual prompt type per run (train.sh --condition mask); box or scribble:
  # --config.input.prompt_types="('box',)" or "('scribble',)".
  c.input.prompt_types = ("mask",)
  c.input.keep_sep = False  # Long texts cut after 20 ids, [SEP] dropped (datasets/dataloader_*.py).
  c.input.batch_size = 64  # train.sh: --batch-size 8 on each of 8 GPUs.
  return c
