"""Shared fixtures. Tests run on CPU; torch uses few threads so two test workers fit 2 cores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: with two, every op's OpenMP barrier stalls whenever another
    process holds a core (on a shared 2-core machine that made CPU timing-heavy tests 5x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
