"""Fixtures for rollout tests."""

from __future__ import annotations

import pytest
import torch

from tests.rollout.tiny import tiny_model


@pytest.fixture
def model():
    return tiny_model(0)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and intra-op threads spin badly on a busy 2-core box."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
