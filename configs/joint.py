"""Stage 3, joint omni training (paper Sec. 5 "Training Regimes"): text and visual data mixed at 7:2.

  python -m omniris_jax.main --config=configs/joint.py:demo --workdir=workdir/demo   # synthetic, CPU
  python -m omniris_jax.main --config=configs/joint.py --workdir=gs://bucket/omniris  # paper recipe, real data
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # config files are loaded by path, not as a package
import common  # noqa: E402  pylint: disable=g-import-not-at-top


def get_config(arg: str = ""):
  """`arg` is the variant after the colon: '' (paper recipe) or 'demo'."""
  c = common.base_config(arg)
  c.stage = "joint"
  c.mix_ratio = (7, 2)  # Text-guided : visual-guided examples per batch (paper Table 5's best).
  return c
