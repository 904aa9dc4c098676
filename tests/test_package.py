"""The product never imports PyTorch or TensorFlow (PyTorch is for parity tests only; TFDS reads without TF)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PRODUCT_MODULES = (
    "omniris_jax",
    "omniris_jax.metrics",
    "omniris_jax.models.omnisegnet",
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
