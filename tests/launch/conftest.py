"""Launcher tests: NeMo-Run writes experiments under NEMORUN_HOME, read once when nemo_run is
imported, so point it at a private directory before any test module imports nemo_run."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

NEMORUN_HOME = tempfile.mkdtemp(prefix="dm-nemorun-")
os.environ["NEMORUN_HOME"] = NEMORUN_HOME

PROFILE_VARS = ("SLURM_ACCOUNT", "SLURM_PARTITION", "DELTA_IMAGE", "DELTA_DATA", "DELTA_CKPT")


@pytest.fixture
def nemorun_home() -> str:
    import nemo_run.config

    assert nemo_run.config.get_nemorun_home() == NEMORUN_HOME, "nemo_run was imported before conftest"
    return NEMORUN_HOME


@pytest.fixture
def clean_profile_env(monkeypatch):
    """Profiles expand ${VAR:-default}: tests see the defaults, whatever the caller's environment."""
    for var in PROFILE_VARS:
        monkeypatch.delenv(var, raising=False)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(NEMORUN_HOME, ignore_errors=True)


@pytest.fixture(autouse=True)
def stdin_devnull(monkeypatch):
    """NeMo-Run shells out through invoke, which reads stdin; pytest's captured stdin refuses reads."""
    with open(os.devnull) as devnull:
        monkeypatch.setattr("sys.stdin", devnull)
        yield
