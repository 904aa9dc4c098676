"""notebooks/quickstart.ipynb runs top to bottom (nbclient, this interpreter's python3 kernel) on the tiny model."""

from __future__ import annotations

import os
import pathlib
import re
import shutil

import nbclient
import nbformat

import tiny_config  # tests/ is on sys.path under pytest (rootdir conftest)

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


def test_the_quickstart_notebook_runs_and_draws_its_overlays(tiny_workdir, tmp_path):
  workdir = tmp_path / "workdir"
  shutil.copytree(tiny_workdir, workdir)  # the notebook writes its overlays into WORKDIR: keep the fixture's clean
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  parameters = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
  assert len(parameters) == 1, "the notebook needs exactly one cell tagged 'parameters'"
  # Already trained, so the notebook loads it; the tiny config would train it otherwise.
  parameters[0].source = f"WORKDIR = {str(workdir)!r}\nTRAIN_STEPS = 2\nCONFIG = 'tests/tiny_config.py:alignment'\n"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_COMPILATION_CACHE_DIR=tiny_config.TINY_CACHE_DIR, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", MPLBACKEND="module://matplotlib_inline.backend_inline")
  client = nbclient.NotebookClient(notebook, timeout=300, startup_timeout=120, kernel_name="python3",
                                   resources={"metadata": {"path": str(REPO)}})
  client.execute(env=env)  # a failing cell raises CellExecutionError with its traceback

  written = sorted(path.name for path in (workdir / "quickstart").glob("*.png"))
  assert written == [f"photo_{k}.png" for k in range(2)] + [f"shapes_{k}.png" for k in range(4)]
  outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
  assert not [output for output in outputs if output.output_type == "error"]
  assert sum("image/png" in output.get("data", {}) for output in outputs) == 3  # inputs, shapes, photo
  printed = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
  assert "holds the trained stages ['alignment']" in printed
  assert re.search(r"a second prompt about the same photo: \d+ ms; compiled programs: \d+ \(0 new\)", printed)
