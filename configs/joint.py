"""Stage 3, joint omni training (paper Sec. 5 "Training Regimes"): text and visual data mixed at 7:2.

Starts from stage 2's parameters (`init_from='visual'`). The demo variants run the whole regime from one command:
stage 1 (alignment.py) -> stage 2 (visual.py) -> stage 3, each in WORKDIR/<stage>/, each starting from the
previous one; re-running the same command resumes where it stopped.

  python -m omniris_jax.main --config=configs/joint.py:demo --workdir=workdir/demo            # 3 stages, CPU
  python -m omniris_jax.main --config=configs/joint.py:demo_long --workdir=workdir/demo_long  # ~2 h, CPU
  python -m omniris_jax.main --config=configs/joint.py --workdir=gs://bucket/omniris          # paper, stage 3
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # config files are loaded by path, not as a package
import alignment  # noqa: E402  pylint: disable=g-import-not-at-top
import common  # noqa: E402  pylint: disable=g-import-not-at-top
import visual  # noqa: E402  pylint: disable=g-import-not-at-top


def get_config(arg: str = ""):
  """`arg` is the variant after the colon: '' (paper recipe) or 'release' (this stage only), 'demo' or 'demo_long'
  (all three)."""
  c = common.base_config(arg)
  c.stage = "joint"  # Writes WORKDIR/joint/.
  c.init_from = "visual"  # Parameters from WORKDIR/visual/checkpoints (newest).
  c.train_data = "mixed"  # dataset.text_source and dataset.visual_source interleaved ...
  c.mix_ratio = (7, 2)  # ... 7 text-guided : 2 visual-guided examples (paper Table 5's best).
  c.prompts = ("text", "visual")  # Both prompt encoders.
  if arg in ("demo", "demo_long"):  # The demos run the whole regime from one command.
    c.run_before = ("alignment", "visual")
    c.stage_configs = {"alignment": alignment.get_config(arg), "visual": visual.get_config(arg)}
  return common.for_variant(c, arg)
