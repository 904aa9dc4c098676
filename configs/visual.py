"""Stage 2, visual instruction tuning (paper Sec. 5): visual prompts, text encoder frozen.

Starts from stage 1's parameters (`init_from='alignment'`); the text encoder (BERT) gets no updates and holds no
optimiser state, while the text projection after it still trains. The paper trains on OmniRef's visual train
split; the demo on the visual and omni examples of the synthetic shapes train split. (The paper reports that this
stage alone degrades text referring, which stage 3 restores.)

  python -m omniris_jax.main --config=configs/visual.py:demo --workdir=workdir/demo     # after alignment.py:demo
  python -m omniris_jax.main --config=configs/visual.py --workdir=gs://bucket/omniris   # paper recipe
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # config files are loaded by path, not as a package
import common  # noqa: E402  pylint: disable=g-import-not-at-top


def get_config(arg: str = ""):
  """`arg` is the variant after the colon: '' (paper recipe), 'release', 'demo' or 'demo_long'."""
  c = common.base_config(arg)
  c.stage = "visual"  # Writes WORKDIR/visual/.
  c.init_from = "alignment"  # Parameters from WORKDIR/alignment/checkpoints (newest).
  c.train_data = "visual"  # dataset.visual_source only.
  c.prompts = ("text", "visual")  # Omni examples carry text too.
  c.optimizer.schedule = (("text_encoder/.*", None),  # Frozen: BERT keeps its stage-1 weights.
                          (".*", "default"))
  return common.for_variant(c, arg)
