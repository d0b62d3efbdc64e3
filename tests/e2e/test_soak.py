"""The preemption soak at a small size: 4 kills of every kind, bitwise-equal final weights."""

from __future__ import annotations

import pytest

from maescale.devtools.soak import KINDS, run_soak

pytestmark = pytest.mark.slow


def test_soak_survives_every_kind_of_kill(shards, tmp_path):
    report = run_soak(tmp_path, shards, num_samples=96, steps=20, kills=4, nproc=2, seed=1)
    assert sorted(k.kind for k in report.kills) == sorted(KINDS)
    assert report.identical, report.table()
    assert report.leftover_bytes == 0
    sigterm = [k for k in report.kills if k.kind == "sigterm"][0]
    # saved on the signal; the workers exit 3, which torchrun reports as 1
    assert sigterm.exit_code == 1 and sigterm.resumed_from >= sigterm.at_step
    killed = [k for k in report.kills if k.kind in ("sigkill", "sigkill_save")]
    assert all(k.exit_code != 0 for k in killed)
    # a SIGKILL loses at most the steps since the last periodic checkpoint (every 4 steps)
    assert all(k.at_step - k.resumed_from <= 4 for k in report.kills if k.kind == "sigkill")
