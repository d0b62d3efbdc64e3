"""Fixtures of the end-to-end tests."""

from __future__ import annotations

import pytest

from tests.helpers import write_shards


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> str:
    """96 smooth 40x40 PNG images in 4 real tar shards (brace pattern)."""
    return write_shards(tmp_path_factory.mktemp("shards"), num_images=96, per_shard=24, size=40)
