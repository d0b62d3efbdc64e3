"""Shared fixtures and the suite's process setup. Tests run on CPU; torch uses few threads so two test workers fit 2 cores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Under `make test` the suite runs on two pytest-xdist workers (one per core): each worker, and the
# training processes it starts, then uses one torch thread (two would oversubscribe the cores and
# every OpenMP barrier would stall).
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
os.environ.setdefault("OMP_NUM_THREADS", "1" if XDIST_WORKER else "2")
if XDIST_WORKER:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The real-SLURM tests share one small cluster: one xdist worker runs them all, in order
    (their modules' ``xdist_group("slurm")`` with ``--dist loadgroup``); the other worker takes the
    rest meanwhile. They start first, then the other slow tests, so that the short ones fill the end
    of the run on both workers."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("slurm") else 1 if item.get_closest_marker("slow") else 2)


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
