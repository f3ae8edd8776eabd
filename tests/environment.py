"""What a test needs from the machine (the local Slurm cluster, the two-node namespace cluster): without
it a test skips on a laptop, but under ``CI=true`` a missing or broken setup fails the run instead of
quietly turning into skips."""

from __future__ import annotations

import os

import pytest


def ci() -> bool:
    return os.environ.get("CI") == "true"


def require(ok: bool, reason: str) -> None:
    """Skip when ``ok`` is false — fail instead under CI=true."""
    if not ok:
        if ci():
            pytest.fail(f"{reason} (CI=true: a missing or broken setup fails)")
        pytest.skip(reason)
