"""Preemption soak: kill a real multi-process training many times and prove nothing is lost.

A driver trains a tiny MAE on CPU (``nproc`` processes under torchrun, ZeRO-2, bf16) to step
``steps`` while killing it ``kills`` times at random moments and restarting it on the same run
directory, then checks that the final parameters equal those of an uninterrupted run bit for bit.
Kinds of kill, drawn at random (all four appear when ``kills >= 4``):

* ``sigterm``       SIGTERM to the training processes mid-run (SLURM preemption): save, exit 0
* ``sigkill``       SIGKILL to the whole job mid-run (node failure): no handler runs
* ``sigkill_save``  SIGKILL while a checkpoint is half written (after every rank wrote its
                    files, before the manifest/rename/``latest``)
* ``sigkill_start`` SIGKILL during start-up (model/data/engine construction or resume)

Saves are slowed (``checkpoint.before_commit=sleep``) and steps paced (``train.after_step=sleep``)
through fault injection so kills land where intended; neither changes the arithmetic.
The report counts kills survived, steps recomputed (work lost between the last checkpoint and
each kill) and bytes of checkpoint left behind (stray ``.partial`` directories at the end).
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from maescale.checkpoint import consolidated_state_dict, dir_bytes
from maescale.distributed import free_port
from maescale.rundir import RunDir

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
KINDS = ("sigterm", "sigkill", "sigkill_save", "sigkill_start")


@dataclass
class Kill:
    kind: str
    at_step: int  # last step logged before the kill
    resumed_from: int  # checkpoint step the next start resumed from
    exit_code: int | None


@dataclass
class SoakReport:
    steps: int
    nproc: int
    kills: list[Kill] = field(default_factory=list)
    steps_recomputed: int = 0
    leftover_bytes: int = 0
    checkpoint_bytes: int = 0
    identical: bool = False
    seconds: float = 0.0

    def table(self) -> str:
        lines = [f"{'kill':>4}  {'kind':<14}{'at step':>8}{'resumed':>9}{'exit':>6}"]
        for i, k in enumerate(self.kills, 1):
            lines.append(f"{i:>4}  {k.kind:<14}{k.at_step:>8}{k.resumed_from:>9}{str(k.exit_code):>6}")
        lines.append(f"kills survived: {len(self.kills)}, steps recomputed: {self.steps_recomputed}, "
                     f"bytes left behind: {self.leftover_bytes}, final weights identical: {self.identical}, "
                     f"{self.seconds:.0f}s")
        return "\n".join(lines)


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a fresh training job: no inherited rank/rendezvous/SLURM
    variables or fault rules, one OpenMP thread, unbuffered output; then ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_", "MAESCALE_FAULTS"))}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def _cmd(nproc: int, config: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), str(REPO / "tools" / "train.py"), str(config), *overrides]


def logged_step(run_dir: Path) -> int:
    """Highest step number in the run's log so far (0 if none)."""
    path = RunDir(run_dir).train_log
    if not path.exists():
        return 0
    steps = [int(line.split(" maescale.train: step ")[1].split("/")[0]) for line in path.read_text().splitlines()
             if " maescale.train: step " in line]
    return max(steps, default=0)


def _children(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _kill_tree(proc: subprocess.Popen) -> int:
    """SIGKILL a job and every process it started; returns the job's exit code."""
    import psutil

    children = _children(proc.pid)
    if proc.poll() is None:
        proc.kill()
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=30)
    return proc.wait(timeout=60)


def _wait(pred, proc: subprocess.Popen, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def run_soak(workdir: str | os.PathLike, shards: str, num_samples: int, steps: int = 40, kills: int = 8,
             nproc: int = 2, seed: int = 0, config: str | os.PathLike | None = None) -> SoakReport:
    """Run the soak in ``workdir`` (reference run + killed run); returns the report."""
    rng = random.Random(seed)
    workdir = Path(workdir)
    config = Path(config or REPO / "configs" / "tiny.yaml")
    t0 = time.monotonic()

    def overrides(out: Path) -> list[str]:
        return [f"output_dir={out}", f"data.train_shards={shards}", f"data.num_samples={num_samples}",
                f"train.max_steps={steps}", "train.log_every=1", "checkpoint.every_steps=4",
                "checkpoint.keep_last=2", "deepspeed.zero_stage=2", "train.precision=bf16", "data.num_workers=0"]

    ref = workdir / "reference"
    subprocess.run(_cmd(nproc, config, overrides(ref)), env=clean_env(), cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    report = SoakReport(steps=steps, nproc=nproc)
    out = workdir / "soaked"
    plan = list(KINDS) * (kills // len(KINDS)) + rng.sample(KINDS, kills % len(KINDS))
    rng.shuffle(plan)
    faults = "train.after_step=sleep:0.05,checkpoint.before_commit=sleep:0.4"
    for kind in plan:
        if (RunDir(out).latest_step() or 0) >= steps:
            break
        proc = subprocess.Popen(_cmd(nproc, config, overrides(out)), env=clean_env({"MAESCALE_FAULTS": faults}),
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        start_step = logged_step(out)
        if kind == "sigkill_start":
            time.sleep(rng.uniform(0.5, 4.0))
        elif kind == "sigkill_save":
            _wait(lambda: any((p / "rank_00000.json").exists() for p in RunDir(out).partials()), proc, 300)
        else:
            target = min(steps - 1, start_step + rng.randint(2, 8))
            _wait(lambda: logged_step(out) >= target, proc, 300)
        at_step = logged_step(out)
        if proc.poll() is None:
            if kind == "sigterm":  # to the training processes, as SLURM signals its tasks
                for child in _children(proc.pid):
                    child.send_signal(signal.SIGTERM)
            else:  # the whole job: torchrun starts its workers in sessions of their own
                _kill_tree(proc)
        code = proc.wait(timeout=300)
        _kill_tree(proc)  # nothing of this attempt may outlive it
        latest = RunDir(out).latest_step() or 0
        report.steps_recomputed += max(0, at_step - latest)
        report.kills.append(Kill(kind, at_step, latest, code))
        log.info("soak: %s at step %d -> latest checkpoint %d (exit %s)", kind, at_step, latest, code)
    subprocess.run(_cmd(nproc, config, overrides(out)), env=clean_env(), cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = RunDir(out)
    report.leftover_bytes = sum(dir_bytes(p) for p in run.partials())
    report.checkpoint_bytes = sum(dir_bytes(p) for _, p in run.list_checkpoints())
    a = consolidated_state_dict(RunDir(ref).latest())
    b = consolidated_state_dict(run.latest())
    report.identical = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report.seconds = time.monotonic() - t0
    return report


def report_json(report: SoakReport) -> str:
    return json.dumps(asdict(report), indent=2)
