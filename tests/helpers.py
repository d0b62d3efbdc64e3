"""Helpers for end-to-end tests: real tar shards, real training processes, weights from checkpoints."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from maescale.distributed import free_port
from maescale.devtools.soak import clean_env, logged_step  # noqa: F401 (re-exported for the tests)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def base_overrides(shards: str, out: Path, steps: int, **extra) -> list[str]:
    """Overrides of configs/tiny.yaml for a short run on ``shards`` into ``out``."""
    values = {"output_dir": str(out), "data.train_shards": shards, "data.num_samples": 96, "train.max_steps": steps,
              "train.log_every": 1, "checkpoint.every_steps": 4, "checkpoint.keep_last": 3}
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def write_shards(out: Path, num_images: int = 96, per_shard: int = 24, size: int = 40, seed: int = 0) -> str:
    """Smooth procedural PNG images in webdataset shards; returns a brace pattern for them."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    n_shards = (num_images + per_shard - 1) // per_shard
    for s in range(n_shards):
        with wds.TarWriter(str(out / f"shard-{s:06d}.tar")) as sink:
            for i in range(s * per_shard, min(num_images, (s + 1) * per_shard)):
                fx, fy, ph = rng.uniform(0.5, 3, 3)
                chans = [np.sin(2 * np.pi * (fx * xx + c * 0.3) + ph) * np.cos(2 * np.pi * fy * yy) for c in range(3)]
                arr = ((np.stack(chans, -1) * 0.5 + 0.5) * 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="PNG")
                sink.write({"__key__": f"img{i:06d}", "png": buf.getvalue(), "cls": str(i % 5)})
    return str(out / f"shard-{{000000..{n_shards - 1:06d}}}.tar")


def train_cmd(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(REPO / "tools/train.py")]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), str(REPO / "tools/train.py")]


def run_train(config: str | Path, overrides: list[str], nproc: int = 1, env: dict[str, str] | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a training to completion; raise with its output if it fails."""
    proc = subprocess.run([*train_cmd(nproc), str(config), *overrides], cwd=REPO, env=clean_env(env),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def start_train(config: str | Path, overrides: list[str], nproc: int = 1, env: dict[str, str] | None = None,
                log_path: Path | None = None) -> subprocess.Popen:
    """Start a training in its own process group (so a signal reaches every rank, as under srun)."""
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    return subprocess.Popen([*train_cmd(nproc), str(config), *overrides], cwd=REPO, env=clean_env(env),
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(predicate, timeout: float = 120, what: str = "condition", proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    os.killpg(proc.pid, sig)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from maescale.checkpoint import consolidated_state_dict
    from maescale.rundir import RunDir

    latest = RunDir(run_dir).latest()
    assert latest is not None, f"no latest checkpoint in {run_dir}"
    return consolidated_state_dict(latest)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"


def tb_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tb_images(run_dir: Path) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    return {tag: [e.step for e in acc.Images(tag)] for tag in acc.Tags()["images"]}
