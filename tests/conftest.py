"""Fixtures shared by the tests of the trained-model tools (predictor, CLI, export, browser demo, notebook)."""

from __future__ import annotations

import pytest

from test_train import run_main  # noqa: E402  (tests/ is on sys.path under pytest's rootdir conftest)


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory):
  """A workdir with the tiny model trained for two steps (stage 'alignment'), as `make demo` leaves one."""
  workdir = tmp_path_factory.mktemp("tiny_workdir")
  run_main(workdir, "--config.total_steps=2", "--config.checkpoint_every=2")
  return workdir
