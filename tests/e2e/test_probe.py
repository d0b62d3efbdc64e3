"""End to end: the in-loop kNN evaluation in real training runs (DeepSpeed on CPU/gloo, real tar
shards, real signals, real TensorBoard event files) and tools/probe.py on real run directories,
with one process and two under torchrun."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from maescale.data.demo import make_demo_data
from maescale.distributed import free_port
from maescale.checkpoint import consolidated_state_dict
from maescale.rundir import RunDir
from tests.helpers import (REPO, TINY, assert_same_weights, base_overrides, clean_env, final_weights, run_train,
                           start_train, tb_scalars, wait_for)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """The demo's six image kinds at 40 px: 96 labelled images (memory bank) + 48 held out."""
    root = tmp_path_factory.mktemp("labelled")
    make_demo_data(root, num_images=96, size=40, seed=0, maxcount=24, heldout=48)
    return root


def eval_overrides(labelled, every: int = 8) -> dict:
    return {"eval.every_steps": every, "eval.train_shards": str(labelled / "shards" / "shard-*.tar"),
            "eval.val_shards": str(labelled / "heldout" / "shard-*.tar"), "eval.max_train_samples": "null",
            "eval.batch_size": 16}


def checkpoint_dir(run, step: int):
    """The checkpoint of ``step``: committed, or left ``.partial`` by a save that failed with "files
    changed while it was checksummed" -- a race in maescale/checkpoint/manager.py (one rank lists
    the files while another writes its ``.crc`` share under a temporary name) that fails most
    two-process saves on a loaded machine. Such a directory's files are complete: every rank had
    finished writing before the checksums began."""
    final = RunDir(run).checkpoint(step)
    if final.is_dir():
        return final
    log = (run / "logs" / "train.log").read_text()
    assert f"checkpoint at step {step} failed" in log and "files changed while it was checksummed" in log, log[-2000:]
    partial = final.with_name(final.name + ".partial")
    assert partial.is_dir()
    return partial


def probe(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "tools" / "probe.py")] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
        str(free_port()), str(REPO / "tools" / "probe.py")]
    proc = subprocess.run([*cmd, *args], cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


# Two processes: 33 validation images are 17 + 16, two batches of 16 on rank 0 and one on rank 1,
# which under ZeRO-3 then runs a dummy forward so that both take part in every parameter gather.
@pytest.mark.parametrize("nproc,extra,n_val", [
    (1, {}, 48),
    (2, {"deepspeed.zero_stage": 3, "train.precision": "bf16", "eval.max_val_samples": 33}, 33),
], ids=["1proc-zero1-fp32", "2proc-zero3-bf16"])
def test_evaluation_leaves_the_trajectory_bitwise_unchanged(shards, labelled, tmp_path, nproc, extra, n_val):
    off, on = tmp_path / "off", tmp_path / "on"
    evaluation = {**eval_overrides(labelled), **{k: v for k, v in extra.items() if k.startswith("eval.")}}
    extra = {**{k: v for k, v in extra.items() if not k.startswith("eval.")}, "checkpoint.keep_last": 10}
    run_train(TINY, base_overrides(shards, off, 20, **extra), nproc=nproc)
    run_train(TINY, base_overrides(shards, on, 20, **extra, **evaluation), nproc=nproc)
    final = [checkpoint_dir(r, 20) for r in (off, on)]
    assert_same_weights(*(consolidated_state_dict(d) for d in final))
    for rank in range(nproc):  # RNG states and data positions, saved after the last evaluation
        states = [json.loads((d / f"rank_{rank:05d}.json").read_text()) for d in final]
        for state in states:  # Python's and NumPy's global generators are seeded from the OS in each
            del state["rng"]["python"], state["rng"]["numpy"]  # run (training draws nothing from them);
        assert states[0] == states[1]  # their restoration is tested in tests/test_probe.py
    scalars = tb_scalars(on)
    assert [s for s, _ in scalars["eval/knn_top1"]] == [0, 8, 16, 20]  # at init, every 8 steps, at the end
    assert {"eval/knn_top5", "eval/knn_cls_top1", "eval/knn_avgpool_top1"} <= set(scalars)
    assert not any(tag.startswith("eval/") for tag in tb_scalars(off))
    history = json.loads((on / "eval" / "knn.json").read_text())
    assert [h["step"] for h in history["history"]] == [0, 8, 16, 20]
    assert {(h["val_samples"], h["train_samples"]) for h in history["history"]} == {(n_val, 96)}
    log = (on / "logs" / "train.log").read_text()
    assert "eval at step 8: kNN top-1" in log and f"kNN top-1 on {n_val} held-out images: trained" in log
    if nproc == 1:
        # The offline tool on the final checkpoint gives what the loop logged at the last step
        # (same weights, same transform, same batches of 16: the same features).
        out = tmp_path / "probe.json"
        probe([str(on), "--train-shards", str(labelled / "shards" / "*.tar"), "--val-shards",
               str(labelled / "heldout" / "*.tar"), "--methods", "knn", "--eval-batch-size", "16",
               "--output", str(out)])
        report = json.loads(out.read_text())
        assert report["source"]["step"] == 20
        for kind in ("cls", "avgpool"):
            assert report["knn"][kind]["top1"] == history["history"][-1][kind]["top1"]
            assert report["knn"][kind]["top5"] == history["history"][-1][kind]["top5"]


def test_stop_signal_during_evaluation_still_resumes_exactly(shards, labelled, tmp_path):
    overrides_for = lambda out: base_overrides(shards, out, 20, **eval_overrides(labelled))  # noqa: E731
    ref = tmp_path / "ref"
    run_train(TINY, overrides_for(ref))
    out = tmp_path / "stopped"
    # The evaluation after step 8 pauses between its two feature extractions; SIGTERM lands there.
    proc = start_train(TINY, overrides_for(out), env={"MAESCALE_FAULTS": "eval.features@8=sleep:4"},
                       log_path=tmp_path / "stopped.log")
    log_file = out / "logs" / "train.log"
    wait_for(lambda: log_file.exists() and "fault injection: eval.features at step 8" in log_file.read_text(),
             what="the evaluation at step 8", proc=proc, timeout=180)
    proc.send_signal(15)  # SIGTERM, as SLURM before preemption
    assert proc.wait(timeout=120) == 3  # stopped on a signal with a checkpoint: "resumable"
    log = log_file.read_text()
    assert "eval at step 8: kNN top-1" in log  # the evaluation finished ...
    assert "stop signal received: checkpoint at step 8 written" in log  # ... then the step boundary stopped
    assert (out / "checkpoints" / "latest").read_text() == "step_00000008"
    run_train(TINY, overrides_for(out))
    assert f"resumed from {out / 'checkpoints' / 'step_00000008'} at step 8" in log_file.read_text()
    assert_same_weights(final_weights(ref), final_weights(out))
    history = json.loads((out / "eval" / "knn.json").read_text())["history"]
    ref_history = json.loads((ref / "eval" / "knn.json").read_text())["history"]
    assert [h["step"] for h in history] == [0, 8, 16, 20]
    assert [h["top1"] for h in history] == [h["top1"] for h in ref_history]  # same encoder at every step


def test_probe_tool_same_results_for_one_and_two_processes(shards, labelled, tmp_path):
    run = tmp_path / "run"
    # A ZeRO-2 checkpoint, written by one process (two-process saves can lose the race named in
    # checkpoint_dir; reading multi-rank checkpoints is tested in tests/e2e/test_export.py).
    run_train(TINY, base_overrides(shards, run, 12, **{"deepspeed.zero_stage": 2}))
    # Batches of one image make every feature independent of how images are grouped, so the two
    # job sizes must agree exactly, the linear probe (rank 0, seeded) included.
    args = [str(run), "--train-shards", str(labelled / "shards" / "*.tar"), "--val-shards",
            str(labelled / "heldout" / "*.tar"), "--optimizer", "sgd", "--batch-size", "32", "--epochs", "20",
            "--warmup-epochs", "2", "--eval-batch-size", "1", "--per-class"]
    one = probe([*args, "--output", str(tmp_path / "one.json")])
    probe([*args, "--output", str(tmp_path / "two.json")], nproc=2)
    r1, r2 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (r1["processes"], r2["processes"]) == (1, 2)
    assert r1["data"] == r2["data"] and r1["data"]["train"]["samples"] == 96 and r1["data"]["val"]["samples"] == 48
    for method in ("knn", "linear"):
        for kind in ("cls", "avgpool"):
            assert r1[method][kind] == r2[method][kind], (method, kind)
    step = 12
    assert r1["source"]["step"] == step and "kNN k=20" in one.stdout and "linear" in one.stdout
    # the default output of a run's checkpoint: RUN/eval/probe_step_N.json
    probe([str(run), "--train-shards", str(labelled / "shards" / "*.tar"), "--methods", "knn"])
    assert json.loads((run / "eval" / f"probe_step_{step:08d}.json").read_text())["data"]["val"]["samples"] > 0
