"""How long the universal conversion of a checkpoint takes (a resume on another GPU count runs it,
:func:`maescale.checkpoint.resume.prepare_universal`), timed on a real checkpoint of a given preset.

The checkpoint is made by the real loop (``tools/train.py``: one optimizer step on synthetic data,
ZeRO-1, bf16, then the final checkpoint), then converted with 1..N workers, each timed from a
fresh start. A ViT-H checkpoint is ~10.5 GB and its universal form ~8 GB more: this is a
benchmark to run by hand (``tools/bench_universal.py``), not a test.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def make_checkpoint(workdir: Path, preset: str, world: int = 1, img_size: int = 224) -> Path:
    """One optimizer step of ``preset`` through the real loop, saved; returns the checkpoint directory."""
    out = workdir / "run"
    overrides = {"output_dir": out, "model.name": preset, "model.img_size": img_size, "data.synthetic": "true",
                 "data.num_samples": 64, "train.micro_batch_size": 1, "train.max_steps": 1, "train.log_every": 1,
                 "train.precision": "bf16", "train.device": "cpu", "train.image_every": 0,
                 "checkpoint.every_steps": 0, "checkpoint.final": "true", "optim.warmup_steps": 0,
                 "deepspeed.zero_stage": 1}
    launcher = [sys.executable] if world == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                    str(world)]
    cmd = [*launcher, str(REPO / "tools" / "train.py"), str(REPO / "configs" / "tiny.yaml"),
           *(f"{k}={v}" for k, v in overrides.items())]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"making the {preset} checkpoint failed:\n{proc.stderr[-4000:]}")
    from maescale.rundir import RunDir

    latest = RunDir(out).latest()
    assert latest is not None
    return latest


def dir_gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9


def time_conversion(checkpoint: Path, workers: int) -> dict[str, Any]:
    """Convert ``checkpoint`` from scratch with ``workers`` workers; seconds and sizes."""
    from maescale.checkpoint.resume import UNIVERSAL_DIR, prepare_universal

    shutil.rmtree(checkpoint / UNIVERSAL_DIR, ignore_errors=True)
    t0 = time.monotonic()
    out = prepare_universal(checkpoint, rank=0, workers=workers)
    seconds = time.monotonic() - t0
    return {"workers": workers, "seconds": round(seconds, 1), "universal_gb": round(dir_gb(out), 2)}


def environment() -> dict[str, Any]:
    import deepspeed
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "disk": shutil.disk_usage("/").total // 10**9}


def run(preset: str, workdir: Path, workers: list[int], world: int = 1) -> dict[str, Any]:
    t0 = time.monotonic()
    ckpt = make_checkpoint(workdir, preset, world)
    made = time.monotonic() - t0
    from maescale.checkpoint import read_trainer_state

    trainer = read_trainer_state(ckpt)
    results = [time_conversion(ckpt, w) for w in workers]
    return {"preset": preset, "checkpoint_world_size": trainer["world_size"], "checkpoint_gb": round(dir_gb(ckpt) -
            sum(r["universal_gb"] for r in results[-1:]), 2), "make_seconds": round(made, 1), "conversions": results}


def dump(result: dict[str, Any], path: str) -> None:
    from datetime import datetime, timezone

    from maescale.rundir import write_json_atomic

    write_json_atomic(path, {"script": "tools/bench_universal.py", "argv": sys.argv[1:],
                             "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             "device": "cpu", "versions": environment(), **result}, indent=1)
    print(json.dumps(result, indent=1))
