"""The main job on the embedded synthetic data: builds it, summarises it, previews it, draws batches."""

from __future__ import annotations

import os

import jax
import pytest
from flax import linen as nn

from omniris_jax import main
from omniris_jax import train
from omniris_jax.data import prepare
from omniris_jax.models import factory

from configs import joint  # noqa: E402  (configs/ is importable from the repo root, where pytest runs)


def _tiny_demo_config():
  config = joint.get_config("demo")
  config.dataset.name = "omniref/shapes_tiny"
  config.input.resolution = 64
  config.input.batch_size = 2
  return config


def test_main_job_prepares_the_synthetic_data(tmp_path, capsys):
  config = _tiny_demo_config()
  config.dataset.data_dir = str(tmp_path / "data")
  main.prepare_data(config, str(tmp_path / "work"))
  out = capsys.readouterr().out
  assert "| train | 18 |" in out and "| omni_test | 9 |" in out
  assert "text_ids             int32    (2, 20)" in out
  assert os.path.getsize(tmp_path / "work" / "preview.png") > 10_000


def test_real_dataset_that_is_not_built_fails_with_how_to_build_it(tmp_path, monkeypatch):
  # Pretend 'shapes_tiny' were a real (downloaded) dataset: it must not be built implicitly.
  monkeypatch.setattr(prepare, "SYNTHETIC_CONFIGS", ())
  with pytest.raises(FileNotFoundError, match=r"'omniref/shapes_tiny' is not built in .*python -m tfds_omniref.build"):
    prepare.ensure_built("omniref/shapes_tiny", str(tmp_path))
  assert not any(tmp_path.iterdir())  # nothing written


def test_unknown_dataset_and_variant_are_named():
  with pytest.raises(ValueError, match="Unknown dataset 'omniref/nope'"):
    prepare.ensure_built("omniref/nope", None)
  with pytest.raises(ValueError, match="Unknown config variant 'dmeo'"):
    joint.get_config("dmeo")


def test_each_stage_of_a_demo_keeps_its_own_learning_rate_and_freezing_but_shares_the_rest():
  config = joint.get_config("demo_long")
  config.input.batch_size = 6  # a command-line override reaches every stage
  alignment, visual = (train.stage_config(config, name) for name in config.run_before)
  assert (alignment.optimizer.learning_rate, visual.optimizer.learning_rate, config.optimizer.learning_rate) == (
      1e-3, 1e-3, 3e-4)
  assert visual.optimizer.schedule[0] == ("text_encoder/.*", None) and config.optimizer.schedule[-1][0] == ".*"
  assert alignment.input.batch_size == visual.input.batch_size == 6
  assert (alignment.stage, visual.stage) == ("alignment", "visual")


def _random_draws_in_a_training_forward(variant: str) -> int:
  """random_bits draws (dropout, drop-path masks) traced by a training-mode forward of `variant`'s model."""
  config = joint.get_config(variant)
  model = factory.make_model(config)
  inputs = factory.dummy_inputs(config)
  params = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **inputs))["params"])
  forward = lambda p: model.apply({"params": p}, **inputs, deterministic=False,  # noqa: E731
                                  rngs={"dropout": jax.random.PRNGKey(1)})
  return str(jax.make_jaxpr(forward)(params)).count("random_bits")


def test_the_demo_step_draws_no_dropout_masks_and_its_joint_stage_mixes_whole_batches():
  # The demo's time goes into its steps: no random masks in any stage ...
  assert _random_draws_in_a_training_forward("demo") == 0
  assert _random_draws_in_a_training_forward("demo_long") > 0  # (the count sees them where they are on)
  # ... and stage 3 interleaves whole text and visual batches, so a text batch takes the text-only step.
  config = joint.get_config("demo")
  assert config.mix_unit == "batch" and tuple(config.mix_ratio) == (7, 2)


def test_compilation_cache_is_turned_on_and_capped(tmp_path):
  # A fresh interpreter: JAX reads its cache settings once, when the first program is compiled.
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  cache = tmp_path / "cache"
  script = f"""
import jax, jax.numpy as jnp
from omniris_jax import main
main.configure_compilation_cache({str(cache)!r}, max_mb=3)
assert jax.config.jax_compilation_cache_dir == {str(cache)!r}, jax.config.jax_compilation_cache_dir
assert jax.config.jax_compilation_cache_max_size == 3 * 2**20, jax.config.jax_compilation_cache_max_size
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.jit(lambda x: jnp.tanh(x @ x))(jnp.ones((8, 8))).block_until_ready()
"""
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  subprocess.run([sys.executable, "-c", script], check=True, env=env,
                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert [p for p in cache.iterdir() if p.name.endswith("-cache")], "nothing was written to the cache"
