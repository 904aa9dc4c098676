"""Stage 1, vision-language alignment (paper Sec. 5 "Training Regimes"): referring segmentation from text only.

The paper trains on gRefCOCO's text expressions; the demo on the text examples of the synthetic shapes train split.
Only the text prompt encoder runs (`prompts=('text',)`), so the reference-image pass costs nothing here.

  python -m omniris_jax.main --config=configs/alignment.py:demo --workdir=workdir/demo     # synthetic, CPU
  python -m omniris_jax.main --config=configs/alignment.py --workdir=gs://bucket/omniris   # paper recipe
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # config files are loaded by path, not as a package
import common  # noqa: E402  pylint: disable=g-import-not-at-top


def get_config(arg: str = ""):
  """`arg` is the variant after the colon: '' (paper recipe), 'release', 'demo' or 'demo_long'."""
  c = common.base_config(arg)
  c.stage = "alignment"  # Writes WORKDIR/alignment/.
  c.init_from = None  # The first stage starts from scratch (+ the pretrained text encoder).
  c.train_data = "text"  # dataset.text_source only.
  c.prompts = ("text",)  # Text prompts only: the visual prompt encoder is not run.
  return common.for_variant(c, arg)
