"""The communication benchmark: the real loop on W ranks of this machine (torchrun, gloo), with the
collective recorder of ``train.profile_at`` (:mod:`maescale.commlog`), tabulated per step.

What it measures is what a step asks the network for, as the code issues it: the operations, the
elements and bytes handed to each, how many calls, and how much of the gradient traffic is issued
while backward still runs. Those carry over to NCCL on a cluster unchanged (the same code issues
the same calls). What does not carry over is time: gloo on a few CPU cores measures CPU
contention, not links, so no timing is reported. ``maescale.scaling`` turns the volumes into time
with a stated network model (``bench/SCALING.md``).

``python tools/bench_comm.py --presets mae_vit_tiny_patch4,mae_vit_base_patch16 --world 2,4
--json bench/comm.json`` writes the schema ``maescale.scaling.load_comm`` reads.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
KINDS = ("reduce_scatter", "all_gather", "all_reduce", "reduce", "broadcast")


def run_once(preset: str, world: int, zero: int, micro_batch: int, bucket: str, steps: int = 2,
             warmup: int = 2, timeout: float = 1800, img_size: int | None = None) -> dict[str, Any]:
    """One real training on ``world`` gloo ranks, profiled for ``steps`` steps after ``warmup``;
    returns the run's entry (schema of ``bench/comm.json``)."""
    from maescale.distributed import free_port
    from maescale.models import create_model

    img = img_size or (32 if preset == "mae_vit_tiny_patch4" else 224)
    params = sum(p.numel() for p in create_model(preset, img_size=img, device="meta").parameters())
    with tempfile.TemporaryDirectory(prefix="maescale-comm-") as tmp:
        out = Path(tmp) / "run"
        overrides = {"output_dir": out, "model.name": preset, "model.img_size": img, "data.synthetic": "true",
                     "data.num_samples": 4096, "train.micro_batch_size": micro_batch,
                     "train.max_steps": warmup + steps + 1, "train.log_every": 1, "train.precision": "bf16",
                     "train.device": "cpu", "train.profile_at": warmup, "train.profile_steps": steps,
                     "deepspeed.zero_stage": zero, "deepspeed.bucket_elements": bucket,
                     "checkpoint.every_steps": 0, "checkpoint.final": "false", "train.image_every": 0,
                     "optim.warmup_steps": 1}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
               str(free_port()), str(REPO / "tools" / "train.py"), str(REPO / "configs" / "tiny.yaml"),
               *(f"{k}={v}" for k, v in overrides.items())]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{preset} on {world} ranks failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        ranks = []
        for r in range(world):
            ranks.append(json.loads((out / "profile" / f"comm_rank_{r}.json").read_text()))
        seconds = time.monotonic() - t0
    from maescale.optim import auto_bucket_elements

    elements = auto_bucket_elements(params) if bucket == "auto" else int(bucket)
    return summarize_run(preset, world, zero, micro_batch, elements, params, ranks, seconds)


def summarize_run(preset: str, world: int, zero: int, micro_batch: int, bucket: int, params: int,
                  ranks: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Per rank per step volumes (averaged over ranks; the ranks' figures are checked equal) and
    the order in which rank 0 issued the data-parallel collectives of its first profiled step."""
    from maescale.commlog import CommCall, summarize_calls

    per_rank = []
    for data in ranks:
        calls = [CommCall(**c) for c in data["calls"]]
        per_rank.append(summarize_calls(calls, data["steps"]))
    dp = _mean([s.get("dp", {}) for s in per_rank])
    control = _mean([s.get("control", {}) for s in per_rank])
    first = min(c["step"] for c in ranks[0]["calls"])
    order = [{"kind": c["kind"], "elements": c["elements"], "in_backward": c["in_backward"],
              "async": c["async_op"]}
             for c in ranks[0]["calls"] if c["step"] == first and c["group"] == "dp"]
    groups = None
    if zero == 1:
        groups = sum(1 for c in order if c["kind"] == "reduce_scatter")
    return {"preset": preset, "world_size": world, "zero_stage": zero, "params": params,
            "micro_batch_size": micro_batch, "bucket_elements": bucket, "groups": groups,
            "per_step": dp, "control": control, "issue_order": order, "seconds": round(seconds, 1)}


def _mean(rows: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    kinds = sorted({k for r in rows for k in r})
    out: dict[str, dict[str, float]] = {}
    for k in kinds:
        present = [r[k] for r in rows if k in r]
        out[k] = {f: round(sum(p[f] for p in present) / len(rows), 4) for f in present[0]}
        spread = max(p["elements"] for p in present) - min(p["elements"] for p in present)
        if spread > 0.01 * max(1.0, out[k]["elements"]):
            out[k]["elements_spread_across_ranks"] = spread
    return out


def environment() -> dict[str, Any]:
    import deepspeed
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "platform": platform.platform(), "cpu_count": os.cpu_count()}


def format_table(runs: list[dict[str, Any]]) -> str:
    """One line per run and kind (data-parallel group), then the control group."""
    head = (f"{'preset':<22}{'W':>3}{'ZeRO':>5}{'groups':>7}  {'kind':<15}{'calls/step':>11}{'elements/P':>11}"
            f"{'MiB/step':>10}{'in backward':>12}{'blocking':>9}")
    lines = [head]
    for r in runs:
        for group, rows in (("dp", r["per_step"]), ("control", r["control"])):
            for kind, row in sorted(rows.items()):
                name = kind if group == "dp" else f"control {kind}"
                lines.append(f"{r['preset']:<22}{r['world_size']:>3}{r['zero_stage']:>5}{str(r['groups'] or '-'):>7}  "
                             f"{name:<15}{row['calls']:>11.1f}{row['elements'] / r['params']:>11.3f}"
                             f"{row['bytes'] / 2**20:>10.2f}{100 * row['issued_in_backward']:>11.0f}%"
                             f"{row['blocking_calls']:>9.1f}")
    return "\n".join(lines)
