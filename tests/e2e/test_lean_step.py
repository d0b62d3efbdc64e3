"""The lean ZeRO-1/2 step (deepspeed.lean_step): DeepSpeed's own overflow scan and grad norm off,
the guarantees kept by maescale's device-side guard (maescale.step; ZeRO-1 runs maescale's own
gradient path, ZeRO-2 DeepSpeed's)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import TINY, assert_same_weights, base_overrides, final_weights, run_train, tb_scalars

pytestmark = pytest.mark.slow


def _tensors(obj, prefix=""):
    """Every tensor in a nested checkpoint structure, by path."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")


def _optimizer_state(ckpt: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(ckpt.glob("*optim_states.pt")):
        state = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        out.update({f"{f.name}{k}": v for k, v in _tensors(state)})
    return out


@pytest.mark.parametrize("stage,nan_on", [(1, "nan"), (2, "nan:1")])
def test_nonfinite_step_is_skipped_on_every_rank_leaving_weights_and_adam_state(shards, tmp_path, stage, nan_on):
    """A NaN batch at step 5 (on both ranks, or on rank 1 only): the update is skipped everywhere,
    weights and Adam state of step 5 are bitwise those of step 4, the skip is counted and logged."""
    out = tmp_path / "run"
    extra = {"deepspeed.zero_stage": stage, "train.precision": "bf16", "checkpoint.every_steps": 1,
             "checkpoint.keep_last": 20}
    run_train(TINY, base_overrides(shards, out, 7, **extra), nproc=2, env={"MAESCALE_FAULTS": f"train.batch@5={nan_on}"})
    log = (out / "logs" / "train.log").read_text()
    assert f"ZeRO-{stage} (lean step)" in log
    assert "step 5: non-finite loss/gradients, update skipped (1 in a row, 1 in total)" in log
    assert dict(tb_scalars(out)["train/nonfinite_steps"]) == {5: 1.0}
    c4, c5, c6 = (out / "checkpoints" / f"step_{s:08d}" for s in (4, 5, 6))
    assert_same_weights(final_weights_of(c4), final_weights_of(c5))
    s4, s5, s6 = _optimizer_state(c4), _optimizer_state(c5), _optimizer_state(c6)
    assert s4.keys() == s5.keys() and s4
    changed = [k for k in s4 if not torch.equal(s4[k], s5[k])]
    assert changed == [], changed  # Adam moments and step counts untouched by the skipped step
    assert any(not torch.equal(s5[k], s6[k]) for k in s5)  # the next step trains again
    assert all(torch.isfinite(v).all() for v in final_weights(out).values())


def final_weights_of(ckpt: Path) -> dict[str, torch.Tensor]:
    from maescale.checkpoint import consolidated_state_dict

    return consolidated_state_dict(ckpt)


@pytest.mark.parametrize("stage,accum", [(1, 1), (2, 1), (1, 2)])
def test_lean_step_trains_exactly_as_deepspeeds_checks(shards, tmp_path, stage, accum):
    """Same run with DeepSpeed's own step and checks and with the lean step (ZeRO-1: maescale's
    own gradient path; also with gradient accumulation): bitwise the same weights, and the same
    grad norm logged (computed another way, accumulated in fp32 like DeepSpeed's)."""
    extra = {"deepspeed.zero_stage": stage, "train.precision": "bf16", "train.grad_accum_steps": accum,
             "train.micro_batch_size": 8 // accum}
    runs = {}
    for lean in (False, True):
        out = tmp_path / f"lean{lean}"
        run_train(TINY, base_overrides(shards, out, 8, **extra, **{"deepspeed.lean_step": lean}), nproc=2)
        runs[lean] = out
    assert "(lean step)" in (runs[True] / "logs" / "train.log").read_text()
    assert "(lean step)" not in (runs[False] / "logs" / "train.log").read_text()
    assert_same_weights(final_weights(runs[False]), final_weights(runs[True]))
    norms = {lean: [v for _, v in tb_scalars(out)["train/grad_norm"]] for lean, out in runs.items()}
    assert len(norms[True]) == len(norms[False]) == 8
    for a, b in zip(norms[False], norms[True]):
        assert b == pytest.approx(a, rel=1e-3)


def test_consecutive_nonfinite_steps_stop_at_the_next_log_step(shards, tmp_path):
    """With log_every=4 the streak is read every 4 steps: 3 NaN steps (5-7) stop the run at step 8."""
    out = tmp_path / "run"
    faults = ",".join(f"train.batch@{s}=nan" for s in range(5, 12))
    # train.rollback=false: the stop path (with rollback on, the run would go back to step 4 instead)
    overrides = base_overrides(shards, out, 20, **{"train.max_nonfinite_steps": 3, "train.log_every": 4,
                                                   "train.rollback": "false"})
    from tests.e2e.test_faults import _train

    proc = _train(overrides, env={"MAESCALE_FAULTS": faults})
    assert proc.returncode == 2
    assert "4 consecutive steps had non-finite loss or gradients (train.max_nonfinite_steps=3)" in proc.stderr
    assert "step 8: non-finite loss/gradients, update skipped (4 in a row, 4 in total)" in proc.stderr
    assert (out / "checkpoints" / "latest").read_text() == "step_00000004"


@pytest.mark.parametrize("stage", [1, 2])
def test_a_nan_in_one_ranks_partition_after_the_reduction_skips_the_step_everywhere(shards, tmp_path, stage):
    """Rank 1's partition of the reduced gradients turns NaN at step 5 (after the reduction, so no
    other rank's gradients see it): only the guard's all-reduce of the norm tells rank 0, and every
    rank must skip. Without that all-reduce rank 0 would update its partition and the step-5
    checkpoint would differ from step 4's."""
    out = tmp_path / "run"
    extra = {"deepspeed.zero_stage": stage, "train.precision": "bf16", "checkpoint.every_steps": 1,
             "checkpoint.keep_last": 20}
    run_train(TINY, base_overrides(shards, out, 6, **extra), nproc=2, env={"MAESCALE_FAULTS": "train.grads@5=nan:1"})
    log = (out / "logs" / "train.log").read_text()
    assert "step 5: non-finite loss/gradients, update skipped (1 in a row, 1 in total)" in log
    c4, c5 = (out / "checkpoints" / f"step_{s:08d}" for s in (4, 5))
    assert_same_weights(final_weights_of(c4), final_weights_of(c5))
    s4, s5 = _optimizer_state(c4), _optimizer_state(c5)
    assert [k for k in s4 if not torch.equal(s4[k], s5[k])] == []
