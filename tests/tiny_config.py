"""The one tiny trainer config of the tests: `--config=tests/tiny_config.py:<stage>` (alignment, visual, joint).

The demo configs with the smallest model (OmniSegNetConfig.tiny_test, its BERT given the real 30522-word vocabulary
so the pipeline's MiniLM token ids are in range), 64x64 shapes_tiny data in TINY_DATA_DIR, batch 4, on one
device, a few steps, checkpoints every 2 steps. Every test that runs the trainer uses exactly these shapes, so the
persistent compilation cache (TINY_CACHE_DIR) lets later runs skip the compile.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "configs"))
import alignment  # noqa: E402  pylint: disable=g-import-not-at-top
import joint  # noqa: E402  pylint: disable=g-import-not-at-top
import visual  # noqa: E402  pylint: disable=g-import-not-at-top

TINY_DATA_DIR = os.environ.get("OMNIRIS_TEST_DATA_DIR", "/tmp/omniris_jax_test_data")
TINY_CACHE_DIR = os.environ.get("OMNIRIS_TEST_JAX_CACHE", "/tmp/omniris_jax_test_jax_cache")
_STAGES = {"alignment": alignment, "visual": visual, "joint": joint}


def get_config(arg: str = "alignment"):
  """The demo config of stage `arg`, shrunk to the tiny model and data."""
  c = _STAGES[arg].get_config("demo")
  with c.unlocked():
    c.dataset.name = "omniref/shapes_tiny"
    c.dataset.data_dir = TINY_DATA_DIR
    c.input.resolution = 64
    c.input.batch_size = 4
    c.input.max_text_len = 8
    c.input.worker_count = 0
    c.eval.batch_size = 8
    c.eval.preview_per_split = 1
    c.model.preset = "tiny_test"
    c.model.text_encoder_checkpoint = None
    c.model.overrides = {"bert": {"vocab_size": 30522}, "conv_stem": True, "num_categories": 8,
                         "category_matching": True}
    c.optimizer.warmup_steps = 1
    c.total_steps = 6
    c.log_every = 2
    c.checkpoint_every = 2
    c.keep_checkpoints = 5
    c.mesh.data = 1
    c.mesh.num_devices = 1
    c.run_before = ()
  return c
