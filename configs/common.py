"""Fields shared by every stage config; each stage file (`joint.py`, ...) starts from `base_config(variant)`.

Variants (`--config=configs/joint.py:demo`):
  ''      the paper's recipe on real data (Swin-B, BERT-base, 480x480, batch 64)
  'demo'  tiny Swin + the real pretrained MiniLM text encoder on the synthetic `shapes` data, for a 2-core CPU
One field can be overridden from the command line, e.g. `--config.input.batch_size=16`.
"""

from __future__ import annotations

import ml_collections

VARIANTS = ("", "demo")


def base_config(variant: str = "") -> ml_collections.ConfigDict:
  """The config shared by all stages for `variant` ('' = paper, 'demo')."""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown config variant {variant!r}; choose one of {VARIANTS} (e.g. configs/joint.py:demo).")
  demo = variant == "demo"
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.seed = 0  # Seeds parameter init, the data order and every random choice in the pipeline.

  c.dataset = ml_collections.ConfigDict()
  # TFDS name 'builder/config'. 'omniref/shapes' is the embedded synthetic set (built on first use, no download);
  # real datasets ('omniref/released', 'omniref/rebuilt', ...) are built once with launch/build_datasets.sh.
  c.dataset.name = "omniref/shapes" if demo else "omniref/released"
  c.dataset.data_dir = ml_collections.config_dict.placeholder(str)  # None: TFDS's default, ~/tensorflow_datasets.
  c.dataset.train_split = "train"
  c.dataset.test_splits = ("text_test", "visual_test", "omni_test")  # The paper's Table 1 columns.

  c.input = ml_collections.ConfigDict()
  c.input.resolution = 128 if demo else 480  # Square side images and masks are resized to (paper: 480).
  c.input.max_text_len = 20  # BERT tokens including [CLS]/[SEP] (paper: 20).
  c.input.batch_size = 16 if demo else 64  # Global batch.
  c.input.prompt_types = ("mask", "box", "scribble")  # Spatial prompts drawn at random in training.
  c.input.regenerate_prompts = True  # Fresh boxes/scribbles from the reference mask at every draw (training).
  c.input.worker_count = 0 if demo else 8  # grain worker processes per host.

  c.model = ml_collections.ConfigDict()
  c.model.preset = "demo" if demo else "paper"  # OmniSegNetConfig preset (models/omnisegnet.py).
  return c
