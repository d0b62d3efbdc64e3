"""Rollback on a NaN streak (train.rollback): the run goes back to the last good checkpoint, skips
the data window that led there and finishes; its weights equal those of a run that skipped the
same window from the start, and a later resume from before the window skips it too."""

from __future__ import annotations

import json
import shutil

import pytest

from maescale.rundir import RunDir
from tests.helpers import TINY, assert_same_weights, base_overrides, final_weights, run_train, tb_scalars

pytestmark = pytest.mark.slow

# The 10th and 11th micro-batch this rank draws are poisoned (keyed by the data stream, not the
# step: once the run has moved past them, they are gone).
POISON = {"MAESCALE_FAULTS": "data.batch@10=nan,data.batch@11=nan"}
EXTRA = {"train.max_nonfinite_steps": 2, "checkpoint.every_steps": 4, "checkpoint.keep_last": 5}


def test_nan_streak_rolls_back_skips_the_window_and_matches_a_run_that_skipped_it(shards, tmp_path):
    out = tmp_path / "run"
    proc = run_train(TINY, base_overrides(shards, out, 16, **EXTRA), env=POISON)
    log = (out / "logs" / "train.log").read_text()
    assert "rollback 1/3: 2 consecutive steps with non-finite loss or gradients" in log
    assert "Back to the checkpoint of step 8" in log
    record = json.loads((out / "rollbacks.json").read_text())["rollbacks"]
    assert len(record) == 1 and record[0]["to_step"] == 8 and record[0]["onset_step"] == 10
    window = record[0]["batches"]
    assert window >= 3  # batches 9-11 at least: everything read since the checkpoint
    assert dict(tb_scalars(out)["train/rollbacks"])[16] == 1.0
    assert RunDir(out).latest_step() == 16
    assert "finished 16 steps" in proc.stdout

    # The same data with that window skipped from the start (train.skip_batches): no NaN is ever
    # met, and the weights are bitwise the same.
    ref = tmp_path / "ref"
    run_train(TINY, base_overrides(shards, ref, 16, **EXTRA, **{"train.skip_batches": f"[[8,{window}]]"}),
              env=POISON)
    assert "non-finite" not in (ref / "logs" / "train.log").read_text()
    assert_same_weights(final_weights(ref), final_weights(out))

    # A resume from the checkpoint before the window (say the job died right after the rollback)
    # skips the window again, from the run directory's record.
    again = tmp_path / "again"
    shutil.copytree(out, again)
    for step, path in RunDir(again).list_checkpoints():
        if step > 8:
            shutil.rmtree(path)
    RunDir(again).set_latest(RunDir(again).checkpoint(8))
    run_train(TINY, base_overrides(shards, again, 16, **EXTRA), env=POISON)
    resumed_log = (again / "logs" / "train.log").read_text()
    assert f"skipping {window} micro-batches per rank after step 8 (rollback 1)" in resumed_log
    assert_same_weights(final_weights(ref), final_weights(again))


def test_rollback_off_or_exhausted_stops_with_the_reason(shards, tmp_path):
    out = tmp_path / "run"
    from tests.e2e.test_faults import _train

    # poisoned by step number: every pass over steps 9-12 meets NaNs again
    faults = {"MAESCALE_FAULTS": ",".join(f"train.batch@{s}=nan" for s in range(9, 13))}
    proc = _train(base_overrides(shards, out, 16, **EXTRA, **{"train.max_rollbacks": 1}), env=faults)
    assert proc.returncode == 2
    assert "rollback 1/1" in proc.stderr
    assert "not rolling back (train.max_rollbacks=1 rollbacks done already)" in proc.stderr
    assert len(json.loads((out / "rollbacks.json").read_text())["rollbacks"]) == 1
