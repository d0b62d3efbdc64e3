"""The real training loop, benchmarked: ``maescale.train.main`` on a config, with variants.

Each variant (micro-batch x data source x extra overrides) runs the loop exactly as
``tools/train.py`` does (DeepSpeed engine, lean step, data feed, logging), in this one process
one after another, into a throw-away run directory, without the final checkpoint. With
``log_every = steps`` and ``max_steps = 2 * steps + profile_steps``, the first log window absorbs
start-up and compilation, the second is the steady state that is reported (images/s, MFU,
step time, data-wait share, peak memory), and the last ``profile_steps`` steps run under the
profiler (kernel launches and aten ops per step, GPU idle share; :mod:`maescale.profiling`).

Data sources: ``synthetic`` (``data.synthetic``: no input pipeline), ``shards`` (JPEG shards
decoded by the CPU workers), ``gpu_decode`` (the same shards, decoded on the device).
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from maescale import compat

log = logging.getLogger(__name__)

DATA_SOURCES = ("synthetic", "shards", "gpu_decode")


@dataclass
class LoopResult:
    """The steady-state figures of one variant (``status`` ok | error)."""

    micro_batch: int
    data: str
    overrides: list[str]  # what this variant adds to the common overrides
    status: str = "ok"
    reason: str | None = None
    images_per_s: float | None = None  # per GPU
    step_ms: float | None = None
    mfu: float | None = None
    tflops: float | None = None
    data_wait_fraction: float | None = None
    peak_mem_gib: float | None = None
    seconds: float | None = None  # wall time of the whole variant, start-up included
    profile: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_jpeg_shards(folder: str, count: int = 3072, width: int = 500, height: int = 375) -> str:
    """Photo-like JPEG shards (with sizes.json) in ``folder``; returns their glob."""
    from maescale.data.shards import make_shards
    from maescale.devtools.data_bench import generate_images

    images = os.path.join(folder, "images")
    generate_images(images, count, width, height, processes=os.cpu_count() or 1)
    make_shards(images, os.path.join(folder, "shards"), maxcount=256, overwrite=True)
    shutil.rmtree(images)
    return os.path.join(folder, "shards", "shard-*.tar")


def bench_variant(config: str, micro_batch: int, data: str, overrides: list[str], steps: int = 15,
                  profile_steps: int = 3, shards: str | None = None, workers: int | None = None,
                  workdir: str | None = None, extra: list[str] = ()) -> LoopResult:
    """Run the loop for one variant (``overrides`` common to all, ``extra`` this variant's own);
    failures end up in ``status``/``reason``."""
    from maescale.config import load_config
    from maescale.train import main

    res = LoopResult(micro_batch, data, list(extra))
    t0 = time.perf_counter()
    out = tempfile.mkdtemp(prefix="loop-bench-", dir=workdir)
    try:
        if data not in DATA_SOURCES:
            raise ValueError(f"data must be one of {DATA_SOURCES}, got {data!r}")
        if data != "synthetic" and not shards:
            raise ValueError(f"data={data} needs shards (--shards or --make-shards)")
        ov = [f"output_dir={out}", "resume=false", f"train.micro_batch_size={micro_batch}", "train.grad_accum_steps=1",
              f"train.max_steps={2 * steps + profile_steps}", f"train.log_every={steps}", "train.image_every=0",
              f"train.profile_at={2 * steps}", f"train.profile_steps={profile_steps}", "train.progress_bar=off",
              "checkpoint.every_steps=0", "checkpoint.every_minutes=0", "checkpoint.final=false",
              "optim.warmup_epochs=0", "optim.warmup_steps=5"]
        if data == "synthetic":
            ov += ["data.synthetic=true"]
        else:
            ov += [f"data.train_shards={shards}", "data.num_samples=null", "data.sizes_file=null",
                   f"data.gpu_decode={'true' if data == 'gpu_decode' else 'false'}"]
            if workers is not None:
                ov += [f"data.num_workers={workers}"]
        cfg = load_config(config, ov + list(overrides) + list(extra))
        result = main(cfg)
        steady = [p for p in (result.perf or []) if int(p["step"]) == 2 * steps]
        if not steady:
            raise RuntimeError(f"no log line at step {2 * steps}")
        p = steady[0]
        res.images_per_s, res.step_ms = p["perf/images_per_s_per_gpu"], 1e3 * p["perf/step_time_s"]
        res.mfu, res.tflops = p.get("perf/mfu"), p.get("perf/tflops_per_gpu")
        res.data_wait_fraction = p["perf/data_wait_fraction"]
        res.peak_mem_gib = p.get("memory/max_allocated_gb")
        res.profile = result.profile
    except Exception as exc:  # a variant failing must not lose the others' numbers
        log.exception("loop variant mb=%d data=%s %s failed", micro_batch, data, overrides)
        res.status, res.reason = "error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    finally:
        shutil.rmtree(out, ignore_errors=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        compat.compiler_reset()
        res.seconds = time.perf_counter() - t0
    return res


def format_results(results: list[LoopResult]) -> str:
    """Text table of :func:`bench_variant` results."""
    def f(x, spec):
        return "-" if x is None else format(x, spec)

    lines = [f"{'mb':>4} {'data':<11} {'overrides':<34}{'img/s':>8}{'ms/step':>9}{'MFU%':>6}{'wait%':>6}"
             f"{'peak GiB':>9}{'launch/st':>10}{'aten/st':>8}{'idle%':>6}{'s':>6}"]
    for r in results:
        head = f"{r.micro_batch:>4} {r.data:<11} {' '.join(r.overrides)[:33]:<34}"
        if r.status != "ok":
            lines.append(head + f"{r.status}: {r.reason}")
            continue
        prof = r.profile or {}
        idle = prof.get("device_idle_fraction")
        lines.append(head + f"{f(r.images_per_s, '.1f'):>8}{f(r.step_ms, '.1f'):>9}"
                     f"{f(None if r.mfu is None else 100 * r.mfu, '.1f'):>6}"
                     f"{f(None if r.data_wait_fraction is None else 100 * r.data_wait_fraction, '.0f'):>6}"
                     f"{f(r.peak_mem_gib, '.1f'):>9}{f(prof.get('kernel_launches'), '.0f'):>10}"
                     f"{f(prof.get('aten_ops'), '.0f'):>8}{f(None if idle is None else 100 * idle, '.0f'):>6}"
                     f"{f(r.seconds, '.0f'):>6}")
    return "\n".join(lines)
