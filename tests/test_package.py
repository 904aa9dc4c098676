"""What the package is made of: no PyTorch or TensorFlow at import (PyTorch is for parity tests only; TFDS reads
without TF), a core model that holds only the paper and the release, and a trainer apart from the synthetic data."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

PRODUCT_MODULES = (
    "omniris_jax",
    "omniris_jax.metrics",
    "omniris_jax.models.omnisegnet",
    "omniris_jax.models.proj.shapes.omnisegnet",
    "omniris_jax.train",
    "omniris_jax.kernels.deform_attn_pallas",
    "omniris_jax.data.pipeline",
    "omniris_jax.data.prepare",
    "omniris_jax.data.visualize",
    "tfds_omniref",
)


@pytest.mark.parametrize("module", PRODUCT_MODULES)
def test_importing_does_not_pull_in_torch_or_tensorflow(module):
  child = (f"import sys, importlib; importlib.import_module({module!r}); "
           "print(sorted(m for m in ('torch', 'tensorflow') if m in sys.modules))")
  result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().splitlines()[-1] == "[]", f"{module} imports {result.stdout.strip()}"


REPO = pathlib.Path(__file__).resolve().parents[1]
# The synthetic demo's additions (models/proj/shapes/); the core model and its loss must not know them.
SHAPES_SWITCHES = ("conv_stem", "prototype_queries", "queries_in_prompt_box", "prompt_kernel", "pixel_fusion",
                   "pixel_word_attention", "fusion_low_level", "nt_evidence", "mask_positions", "num_categories",
                   "category_matching", "colour_head", "category_weight", "colour_weight", "category_map")


def test_no_core_model_file_names_a_shapes_switch():
  core = sorted((REPO / "omniris_jax" / "models").glob("*.py")) + [REPO / "omniris_jax" / "losses.py"]
  assert len(core) > 8
  found = {f"{path.relative_to(REPO)}: {switch}" for path in core for switch in SHAPES_SWITCHES
           if re.search(rf"\b{switch}\b", path.read_text())}
  assert not found, sorted(found)
  project = (REPO / "omniris_jax" / "models" / "proj" / "shapes" / "omnisegnet.py").read_text()
  assert all(re.search(rf"\b{switch}\b", project) for switch in SHAPES_SWITCHES[:12])  # the check can see them


def test_the_trainer_does_not_import_the_synthetic_generator():
  child = ("import sys, omniris_jax.train, omniris_jax.evaluators.referring, omniris_jax.data.sources; "
           "print('tfds_omniref.omniref.shapes' in sys.modules)")
  result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300, cwd=REPO)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().splitlines()[-1] == "False"
  source = (REPO / "omniris_jax" / "train.py").read_text()
  assert "shapes" not in re.findall(r"^\s*(?:from|import) .*$", source, re.M).__str__()
