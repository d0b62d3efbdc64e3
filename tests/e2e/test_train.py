"""End to end: real DeepSpeed engine (gloo, CPU), real tar shards, real signals and kills."""

from __future__ import annotations

import signal
import subprocess
import sys

import psutil
import pytest

from tests.helpers import (REPO, TINY, assert_same_weights, base_overrides, clean_env, final_weights, logged_step,
                           run_train, start_train, tb_images, tb_scalars, wait_for)

pytestmark = pytest.mark.slow

@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_process_zero_bf16_trains(shards, tmp_path, stage):
    out = tmp_path / f"zero{stage}"
    run_train(TINY, base_overrides(shards, out, 30, **{"deepspeed.zero_stage": stage, "train.precision": "bf16",
                                                        "train.image_every": 10}), nproc=2)
    scalars = tb_scalars(out)
    losses = [v for _, v in scalars["train/loss"]]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses
    for tag in ("train/lr", "train/grad_norm", "perf/images_per_s", "perf/images_per_s_per_gpu",
                "perf/data_wait_fraction", "perf/step_time_s", "data/samples_ok"):
        assert tag in scalars, tag
    assert scalars["train/lr"][4][1] > scalars["train/lr"][0][1]  # warming up
    assert tb_images(out)["reconstruction"][:3] == [10, 20, 30]
    assert (out / "reconstruction.png").stat().st_size > 0
    ckpt = out / "checkpoints" / "step_00000030"
    assert (out / "checkpoints" / "latest").read_text() == "step_00000030"
    assert len(list(ckpt.glob("*zero_pp_rank_*optim_states.pt"))) == 2  # sharded as ZeRO shards it
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["step_00000024", "step_00000028", "step_00000030"]  # keep_last=3


def _interrupt_and_resume(shards, out, overrides, nproc, sig=signal.SIGTERM):
    """Start, signal the training processes mid-run, check the stop, resume to the end."""
    proc = start_train(TINY, overrides, nproc=nproc, env={"MAESCALE_FAULTS": "train.after_step=sleep:0.05"},
                       log_path=out.parent / (out.name + ".log"))
    wait_for(lambda: logged_step(out) >= 6, what="step 6", proc=proc, timeout=180)
    # Signal the training processes themselves, as SLURM does before preemption.
    parent = psutil.Process(proc.pid)
    workers = parent.children() if nproc > 1 else [parent]
    for w in workers:
        w.send_signal(sig)
    # Stopped on a signal with a checkpoint written: tools/train.py exits 3 ("resumable");
    # torchrun reports any non-zero worker exit as its own exit code 1.
    assert proc.wait(timeout=300) == (3 if nproc == 1 else 1)
    stopped_at = logged_step(out)
    assert 6 <= stopped_at < int(dict(o.split("=", 1) for o in overrides)["train.max_steps"])
    latest = (out / "checkpoints" / "latest").read_text()
    assert latest == f"step_{stopped_at:08d}"  # saved on the signal, at the step it stopped
    run_train(TINY, overrides, nproc=nproc)
    log = (out / "logs" / "train.log").read_text()
    assert f"resumed from {out / 'checkpoints' / latest} at step {stopped_at}" in log
    return stopped_at


def test_exact_resume_single_process_with_grad_accum(shards, tmp_path):
    extra = {"train.grad_accum_steps": 2, "data.num_workers": 2}
    ref = tmp_path / "ref"
    run_train(TINY, base_overrides(shards, ref, 24, **extra))
    out = tmp_path / "resumed"
    _interrupt_and_resume(shards, out, base_overrides(shards, out, 24, **extra), nproc=1)
    assert_same_weights(final_weights(ref), final_weights(out))


def test_exact_resume_two_processes_zero2_bf16(shards, tmp_path):
    extra = {"deepspeed.zero_stage": 2, "train.precision": "bf16"}
    ref = tmp_path / "ref"
    run_train(TINY, base_overrides(shards, ref, 20, **extra), nproc=2)
    out = tmp_path / "resumed"
    _interrupt_and_resume(shards, out, base_overrides(shards, out, 20, **extra), nproc=2, sig=signal.SIGUSR1)
    assert_same_weights(final_weights(ref), final_weights(out))


def test_sigkill_during_checkpoint_write_keeps_previous(shards, tmp_path):
    ref = tmp_path / "ref"
    run_train(TINY, base_overrides(shards, ref, 16))
    out = tmp_path / "killed"
    overrides = base_overrides(shards, out, 16)
    proc = start_train(TINY, overrides, env={"MAESCALE_FAULTS": "checkpoint.before_commit@8=sleep:120"})
    partial = out / "checkpoints" / "step_00000008.partial"
    wait_for(lambda: (partial / "rank_00000.json").exists(), what="checkpoint 8 half written", proc=proc)
    proc.kill()  # SIGKILL: no handler, no clean-up
    proc.wait()
    assert (out / "checkpoints" / "latest").read_text() == "step_00000004"
    assert partial.exists() and not (out / "checkpoints" / "step_00000008").exists()
    run_train(TINY, overrides)
    log = (out / "logs" / "train.log").read_text()
    assert "removed incomplete checkpoint" in log and "at step 4" in log
    assert not partial.exists()
    assert_same_weights(final_weights(ref), final_weights(out))


def test_corrupt_latest_falls_back_to_previous(shards, tmp_path):
    out = tmp_path / "run"
    run_train(TINY, base_overrides(shards, out, 8))
    model_file = out / "checkpoints" / "step_00000008" / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[:100])  # truncated
    run_train(TINY, base_overrides(shards, out, 12))
    log = (out / "logs" / "train.log").read_text()
    assert "skipping checkpoint" in log and "mp_rank_00_model_states.pt is 100 bytes" in log
    assert "at step 4" in log
    assert (out / "checkpoints" / "latest").read_text() == "step_00000012"


def test_resume_false_refuses_existing_run(shards, tmp_path):
    out = tmp_path / "run"
    run_train(TINY, base_overrides(shards, out, 4))
    proc = subprocess.run([sys.executable, str(REPO / "tools/train.py"), str(TINY),
                           *base_overrides(shards, out, 8), "--no-resume"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "resume=false but" in proc.stderr


def test_time_based_checkpoints(shards, tmp_path):
    out = tmp_path / "run"
    run_train(TINY, base_overrides(shards, out, 12, **{"checkpoint.every_steps": 0, "checkpoint.every_minutes": 0.004,
                                                        "checkpoint.keep_last": 20}),
              env={"MAESCALE_FAULTS": "train.after_step=sleep:0.12"})
    log = (out / "logs" / "train.log").read_text()
    saved = [line for line in log.splitlines() if "maescale.checkpoint: checkpoint " in line]
    # 0.24 s between saves, 0.12 s+ per step: a save every 2-3 steps, none tied to a step count
    assert len(saved) >= 4, saved
    steps = sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert steps[-1] == 12 and len(steps) == len(saved)


def test_synthetic_data_runs_the_same_loop_and_resumes_exactly(tmp_path):
    """data.synthetic: no files; a run that crashes after its step-4 checkpoint and is started again
    ends bitwise equal to an uninterrupted one."""
    extra = {"data.synthetic": "true", "data.train_shards": "''", "data.num_samples": "null"}
    ref, out = tmp_path / "ref", tmp_path / "resumed"
    run_train(TINY, base_overrides("unused", ref, 8, **extra))
    crashed = subprocess.run([sys.executable, str(REPO / "tools/train.py"), str(TINY),
                              *base_overrides("unused", out, 8, **extra)], cwd=REPO, capture_output=True, text=True,
                             env=clean_env({"MAESCALE_FAULTS": "train.after_step@6=exit"}), timeout=300)
    assert crashed.returncode != 0 and (out / "checkpoints" / "latest").read_text() == "step_00000004"
    run_train(TINY, base_overrides("unused", out, 8, **extra))
    assert "resumed from" in (out / "logs" / "train.log").read_text()
    assert_same_weights(final_weights(ref), final_weights(out))
    assert "data/samples_ok" not in tb_scalars(ref)  # no input pipeline ran


def test_recipe_config_takes_a_max_steps_override(shards, tmp_path):
    """The README's smoke test of a recipe that sets train.epochs: train.max_steps=N replaces it
    (shrunk to the tiny model so that it runs on a CPU)."""
    out = tmp_path / "run"
    overrides = ["train.max_steps=3", f"output_dir={out}", "model.name=mae_vit_tiny_patch4", "model.img_size=32",
                 f"data.train_shards={shards}", "data.num_samples=96", "data.num_workers=0", "train.device=cpu",
                 "train.precision=fp32", "train.micro_batch_size=4", "optim.warmup_epochs=0", "model.compile=false"]
    proc = subprocess.run([sys.executable, str(REPO / "tools/train.py"), str(REPO / "configs/vit_huge.yaml"),
                           *overrides], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dropping train.epochs=1600" in proc.stderr
    assert (out / "checkpoints" / "latest").read_text() == "step_00000003"
