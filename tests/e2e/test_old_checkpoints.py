"""A checkpoint written before the ZeRO-1 gradient path and the weight-decay rule changed (2026-12-07)
still resumes: its optimizer state keeps its two-group layout (cls/mask tokens exempt from decay),
the run's config records that rule, and training goes on from exactly the saved state.

The fixture (tests/fixtures/old_layout_zero1, see its README) was written by the code of that time:
2 processes, ZeRO-1, bf16, tiny preset, crashed after step 5 with step 4 as its newest checkpoint;
``ref_final_weights.pt`` holds that code's weights of the same run uninterrupted (8 steps)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from maescale.config import load_config
from maescale.rundir import RunDir
from tests.helpers import TINY, base_overrides, final_weights, run_train, write_shards

pytestmark = pytest.mark.slow

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "old_layout_zero1"


def test_old_layout_checkpoint_resumes_with_its_rule_and_state(tmp_path):
    shards = write_shards(tmp_path / "shards")  # the fixture's data: write_shards' defaults
    out = tmp_path / "run"
    ckpts = RunDir(out).checkpoints
    ckpts.mkdir(parents=True)
    shutil.copytree(FIXTURE / "step_00000004", ckpts / "step_00000004")
    RunDir(out).set_latest(ckpts / "step_00000004")
    saved = final_weights(out)  # the fixture's weights at step 4
    overrides = base_overrides(shards, out, 8, **{"train.precision": "bf16", "checkpoint.every_steps": 4,
                                                  "checkpoint.keep_last": 3})
    run_train(TINY, overrides, nproc=2)
    log = (out / "logs" / "train.log").read_text()
    assert "resumed from" in log and "at step 4" in log
    assert "written with optim.weight_decay_tokens=false; keeping it" in log
    assert load_config(out / "config.yaml").optim.weight_decay_tokens is False  # the run records its rule
    state = json.loads((RunDir(out).checkpoint(8) / "trainer_state.json").read_text())
    groups = {g["name"]: g["params"] for g in state["param_groups"]}
    assert set(groups) == {"decay", "no_decay"}  # the old layout, kept
    assert {"cls_token", "mask_token"} <= set(groups["no_decay"])
    # Training went on from the saved state: the result is the old code's uninterrupted run, as the
    # old code computed it (same partitions, same reduction over two ranks, same update).
    reference = torch.load(FIXTURE / "ref_final_weights.pt", weights_only=True)
    final = final_weights(out)
    assert final.keys() == reference.keys()
    assert any(not torch.equal(final[k], saved[k]) for k in final)  # it trained
    diff = {k: (final[k] - reference[k]).abs().max().item() for k in final}
    assert all(torch.equal(final[k], reference[k]) for k in final), {k: v for k, v in diff.items() if v}
