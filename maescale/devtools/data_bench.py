"""Loader benchmark (``tools/bench_data.py``): images/s per worker process, side by side, on the
same photo-like JPEGs:

* ``imagefolder``: torchvision ``ImageFolder`` + ``RandomResizedCrop(224, scale=(0.2, 1),
  bicubic)`` + ``RandomHorizontalFlip`` + ``ToTensor`` (the usual MAE recipe's loader);
* ``maescale``: :func:`maescale.data.build_train_loader` on shards of the same images (uint8 out,
  fast decode);
* ``maescale_plain``: the same with ``data.fast_decode: false`` (full decode, PIL crop + resize);
* ``raw_tar_read``: reading the shards' bytes only (the ceiling of any decoder).

:func:`run_gpu_decode_benchmark` (``--gpu-decode``) measures instead the sizing guide: the CPU cost
per image in the worker with ``data.gpu_decode: true`` (header, box, bytes) against a full decode,
as images/s per core and worker cores per GPU. The device side is ``tools/bench_decode.py``
(:mod:`maescale.devtools.decode_bench`).

Each loader runs in ``workers`` DataLoader worker processes with batches of ``batch_size``; the
first batch (worker start, shuffle-buffer fill) is not timed, and the best of ``repeats`` runs is
kept (other work on the machine only ever slows a run down). Images/s are divided by the number
of worker processes ("per core"). As a cross-check that other load cannot skew, ImageFolder and
maescale also run in this process (``workers=0``, torch on one thread) timed by CPU time:
``cpu_time_speedup``.
"""

from __future__ import annotations

import datetime
import logging
import os
import platform
import shutil
import tempfile
import time
from multiprocessing import get_context
from typing import Any, Callable

import torch

from maescale.rundir import write_json_atomic

logger = logging.getLogger(__name__)

IMAGE_SETS = (("500x375", 500, 375), ("2000x1500", 2000, 1500))


def _write_image(args: tuple[str, int, int, int]) -> int:
    from maescale.data.demo import photo_like_jpeg

    path, seed, width, height = args
    data = photo_like_jpeg(seed, width, height, quality=90)
    with open(path, "wb") as fh:
        fh.write(data)
    return len(data)


def generate_images(root: str, count: int, width: int, height: int, *, classes: int = 4, seed: int = 0,
                    processes: int = 1) -> int:
    """``count`` photo-like JPEGs in ImageFolder layout below ``root``; returns total bytes."""
    jobs = []
    for i in range(count):
        folder = os.path.join(root, f"class{i % classes}")
        os.makedirs(folder, exist_ok=True)
        jobs.append((os.path.join(folder, f"img{i:06d}.jpg"), seed * 1_000_003 + i, width, height))
    if processes > 1:
        with get_context("fork").Pool(processes) as pool:
            sizes = pool.map(_write_image, jobs, chunksize=4)
    else:
        sizes = [_write_image(j) for j in jobs]
    return sum(sizes)


# With workers=0 everything runs in this process: then CPU seconds (time.process_time) measure
# the cost per image independently of other load on the machine.
CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}


def _time_batches(loader_iter, batches: int, clock: str = "wall") -> tuple[float, int]:
    """Seconds and images for batches 2..batches (the first one warms up)."""
    now = CLOCK[clock]
    next(loader_iter)
    n = 0
    t0 = now()
    for _ in range(batches - 1):
        b = next(loader_iter)
        n += (b[0] if isinstance(b, (list, tuple)) else b).shape[0]
    return now() - t0, n


def bench_imagefolder(root: str, count: int, *, img_size: int, batch_size: int, workers: int,
                      clock: str = "wall") -> float:
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    tf = T.Compose([
        T.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
    ])
    ds = ImageFolder(root, transform=tf)
    kwargs: dict[str, Any] = dict(prefetch_factor=2) if workers > 0 else {}
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, **kwargs)
    it = iter(loader)
    seconds, n = _time_batches(it, count // batch_size, clock)
    del it
    return n / seconds / max(workers, 1)


def bench_maescale(shards: str, count: int, *, img_size: int, batch_size: int, workers: int, fast: bool = True,
                   clock: str = "wall") -> float:
    from maescale.config import DataConfig
    from maescale.data import build_train_loader

    cfg = DataConfig(train_shards=shards, num_workers=workers, prefetch_factor=2, shuffle_buffer=64,
                     pin_memory=False, fast_decode=fast)
    loader = build_train_loader(cfg, img_size=img_size, micro_batch_size=batch_size, rank=0, world_size=1, seed=0)
    it = iter(loader)
    seconds, n = _time_batches(it, count // batch_size, clock)
    loader.close()
    return n / seconds / max(workers, 1)


def bench_raw(shards: str) -> tuple[float, float]:
    """(images/s, MB/s) of reading every sample's bytes from the shards, in this process."""
    from maescale.data.sources import expand_shards
    from maescale.data.tario import iter_samples

    t0 = time.perf_counter()
    n = nbytes = 0
    for url in expand_shards(shards):
        with open(url, "rb", buffering=1 << 20) as fh:
            for _, sample in iter_samples(fh, seekable=True):
                n += 1
                nbytes += sum(len(v) for k, v in sample.items() if not k.startswith("__"))
    seconds = time.perf_counter() - t0
    return n / seconds, nbytes / seconds / 1e6


def machine_info() -> dict[str, Any]:
    import PIL
    import torchvision
    from PIL import features

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "pillow": PIL.__version__,
            "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
            "libjpeg_version": features.version("jpg")}


def _image_set(base: str, name: str, width: int, height: int, count: int, batch_size: int) -> tuple[int, str, str, int]:
    """Generate one benchmark image set as a folder and as shards: (count, folder, shard glob, bytes)."""
    from maescale.data.shards import make_shards

    count = max(batch_size * 2, count // batch_size * batch_size)
    folder = os.path.join(base, name, "folder")
    shard_dir = os.path.join(base, name, "shards")
    t0 = time.perf_counter()
    total = generate_images(folder, count, width, height, processes=os.cpu_count() or 1)
    make_shards(folder, shard_dir, maxcount=256, overwrite=True)
    logger.info("%s: generated %d images (%.0f kB mean) in %.1fs", name, count, total / count / 1e3,
                time.perf_counter() - t0)
    return count, folder, os.path.join(shard_dir, "shard-*.tar"), total


def run_benchmark(*, num_images: int = 1024, num_large: int | None = None, workers: int = 1, batch_size: int = 32,
                  img_size: int = 224, repeats: int = 3, workdir: str | None = None, keep: bool = False) -> dict[str, Any]:
    """Generate the image sets, run every loader on them, return the results (see module doc)."""

    num_large = num_large if num_large is not None else max(batch_size * 3, num_images // 4)
    base = workdir or tempfile.mkdtemp(prefix="maescale-bench-")
    results: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_info(),
        "settings": {"workers": workers, "batch_size": batch_size, "img_size": img_size, "repeats": repeats,
                     "jpeg_quality": 90, "crop": "RandomResizedCrop(scale 0.2-1, ratio 3/4-4/3, bicubic) + hflip"},
        "sets": {},
        "load_average_before": [round(x, 2) for x in os.getloadavg()],  # other work on the machine
    }
    try:
        for name, width, height in IMAGE_SETS:
            count, folder, shards, total = _image_set(base, name, width, height,
                                                      num_images if width < 1000 else num_large, batch_size)
            best, runs_log = _best_of(name, {
                "imagefolder": lambda: bench_imagefolder(folder, count, img_size=img_size, batch_size=batch_size,
                                                         workers=workers),
                "maescale": lambda: bench_maescale(shards, count, img_size=img_size, batch_size=batch_size,
                                                   workers=workers),
                "maescale_plain": lambda: bench_maescale(shards, count, img_size=img_size, batch_size=batch_size,
                                                         workers=workers, fast=False),
                "raw_tar_read": lambda: bench_raw(shards)[0],
            }, repeats, max, "images/s", 1)
            # contention-free cost: in this process, CPU time, torch on one thread
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                cpu = {
                    "imagefolder": bench_imagefolder(folder, count, img_size=img_size, batch_size=batch_size,
                                                     workers=0, clock="cpu"),
                    "maescale": bench_maescale(shards, count, img_size=img_size, batch_size=batch_size, workers=0,
                                               clock="cpu"),
                }
            finally:
                torch.set_num_threads(threads)
            logger.info("%s CPU-time images/s: %s", name, cpu)
            entry = {"images": count, "width": width, "height": height, "mean_jpeg_kb": round(total / count / 1e3, 1)}
            entry.update({k: round(v, 1) for k, v in best.items()})
            entry["speedup_vs_imagefolder"] = round(best["maescale"] / best["imagefolder"], 2)
            entry["cpu_time_images_per_s"] = {k: round(v, 1) for k, v in cpu.items()}
            entry["cpu_time_speedup"] = round(cpu["maescale"] / cpu["imagefolder"], 2)
            entry["runs"] = runs_log  # every run, images/s per worker process (the table shows the best)
            entry["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
            results["sets"][name] = entry
    finally:
        if not keep and workdir is None:
            shutil.rmtree(base, ignore_errors=True)
    small, large = results["sets"]["500x375"], results["sets"]["2000x1500"]
    results["targets"] = {
        "large_3x": {"target": 3.0, "measured": large["speedup_vs_imagefolder"],
                     "met": large["speedup_vs_imagefolder"] >= 3.0},
        "small_1.2x": {"target": 1.2, "measured": small["speedup_vs_imagefolder"],
                       "met": small["speedup_vs_imagefolder"] >= 1.2},
    }
    return results


def bench_gpu_decode_worker(shards: str, count: int, *, img_size: int, batch_size: int,
                            gpu_decode: bool, fast: bool = True, device_decode: bool = False) -> tuple[float, float]:
    """``data.gpu_decode`` on the worker side: CPU seconds per image (in this process, one torch
    thread) of producing batches -- header + box + bytes with ``gpu_decode``, a full decode without
    it -- and, with ``gpu_decode`` and ``device_decode``, of then decoding those batches with
    :func:`decode_on_device` on this CPU (a CPU stand-in for the device; its batched matmuls suit a
    GPU, not a CPU). Returns (worker ms, decode ms; 0 when not measured)."""
    from maescale.config import DataConfig
    from maescale.data import build_train_loader
    from maescale.data.gpu_decode import decode_on_device

    cfg = DataConfig(train_shards=shards, num_workers=0, prefetch_factor=2, shuffle_buffer=64,
                     pin_memory=False, fast_decode=fast, gpu_decode=gpu_decode)
    loader = build_train_loader(cfg, img_size=img_size, micro_batch_size=batch_size, rank=0, world_size=1, seed=0)
    it = iter(loader)
    next(it)
    worker = decode = 0.0
    n = 0
    for _ in range(count // batch_size - 1):
        t0 = time.process_time()
        b = next(it)
        t1 = time.process_time()
        worker += t1 - t0
        if gpu_decode and device_decode:
            decode_on_device(b)
            decode += time.process_time() - t1
        n += len(b)
    loader.close()
    return 1e3 * worker / n, 1e3 * decode / n


def _process_cpu_s(proc) -> float:
    """CPU seconds of a process: nanosecond run time from /proc/PID/schedstat on Linux (psutil's
    user + system time has a 10 ms tick), else psutil's."""
    try:
        with open(f"/proc/{proc.pid}/schedstat") as fh:
            return int(fh.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return sum(proc.cpu_times()[:2])


def bench_worker_process_cpu(shards: str, count: int, *, img_size: int, batch_size: int, gpu_decode: bool,
                             fast: bool = True) -> float:
    """CPU milliseconds per image of one DataLoader worker process: what a worker core really
    spends, including packing each batch into shared memory (page faults) and pickling, which the
    in-process measurement of :func:`bench_gpu_decode_worker` leaves out. The worker's whole CPU
    time (it starts at 0 when forked) is divided by the images it produced: those consumed plus
    the ``prefetch_factor`` batches it makes ahead before it idles (waited for)."""
    import psutil

    from maescale.config import DataConfig
    from maescale.data import build_train_loader

    prefetch = 2
    cfg = DataConfig(train_shards=shards, num_workers=1, prefetch_factor=prefetch, shuffle_buffer=64,
                     pin_memory=False, fast_decode=fast, gpu_decode=gpu_decode)
    loader = build_train_loader(cfg, img_size=img_size, micro_batch_size=batch_size, rank=0, world_size=1, seed=0)
    before = {c.pid for c in psutil.Process().children()}
    it = iter(loader)
    consumed = 1
    next(it)
    started = [c for c in psutil.Process().children() if c.pid not in before]
    if len(started) != 1:
        raise RuntimeError(f"expected one new DataLoader worker process, found {len(started)}")
    worker = started[0]
    for _ in range(max(1, count // batch_size - 1)):
        next(it)
        consumed += 1
    last, deadline = -1.0, time.monotonic() + 30
    while time.monotonic() < deadline:  # until the worker has filled its prefetch slots and idles
        time.sleep(0.2)
        cpu = _process_cpu_s(worker)
        if cpu - last < 1e-4:
            break
        last = cpu
    loader.close()
    return 1e3 * last / ((consumed + prefetch) * batch_size)


# Images/s per GPU that the sizing guide plans for: ViT-H/14 at micro-batch 128 on an H200 trains
# at ~1,700 img/s/GPU with synthetic data (the measurement); change it for other models.
TARGET_IMAGES_PER_S_PER_GPU = 1700


def run_gpu_decode_benchmark(*, num_images: int = 512, num_large: int | None = None, batch_size: int = 32,
                             img_size: int = 224, repeats: int = 3, workdir: str | None = None,
                             keep: bool = False, target: float = TARGET_IMAGES_PER_S_PER_GPU) -> dict[str, Any]:
    """The sizing guide: worker CPU milliseconds per image and images/s per core for the CPU decode
    (fast and plain paths) and for ``data.gpu_decode``'s worker share (header, box, bytes), best
    of ``repeats``, on the same image sets as :func:`run_benchmark`; and the worker cores per GPU
    each needs at ``target`` images/s per GPU. The device side is measured by
    ``tools/bench_decode.py`` on a GPU."""

    num_large = num_large if num_large is not None else max(batch_size * 3, num_images // 4)
    base = workdir or tempfile.mkdtemp(prefix="maescale-bench-gpu-")
    results: dict[str, Any] = {
        "date": datetime.date.today().isoformat(), "machine": machine_info(),
        "settings": {"batch_size": batch_size, "img_size": img_size, "repeats": repeats, "jpeg_quality": 90,
                     "clock": "CPU time in one process, one torch thread", "target_images_per_s_per_gpu": target},
        "note": "worker side only; the device side (nvjpeg + batched resize) is measured by tools/bench_decode.py",
        "sets": {}, "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, width, height in IMAGE_SETS:
            count, folder, shards, total = _image_set(base, name, width, height,
                                                      num_images if width < 1000 else num_large, batch_size)
            best, runs_log = _best_of(name, {
                "full_decode_fast": lambda: bench_gpu_decode_worker(shards, count, img_size=img_size,
                                                                    batch_size=batch_size, gpu_decode=False)[0],
                "full_decode_plain": lambda: bench_gpu_decode_worker(shards, count, img_size=img_size,
                                                                     batch_size=batch_size, gpu_decode=False,
                                                                     fast=False)[0],
                "gpu_decode": lambda: bench_gpu_decode_worker(shards, count, img_size=img_size,
                                                              batch_size=batch_size, gpu_decode=True)[0],
            }, repeats, min, "ms/image in the worker", 4)
            process = {}
            for key, gpu, fast in (("full_decode_fast", False, True), ("gpu_decode", True, True)):
                process[key] = min(bench_worker_process_cpu(shards, count, img_size=img_size, batch_size=batch_size,
                                                            gpu_decode=gpu, fast=fast) for _ in range(repeats))
                logger.info("%s %s: worker process %.3f ms/image", name, key, process[key])
            per_core = {k: 1e3 / v for k, v in best.items()}
            entry = {"images": count, "width": width, "height": height,
                     "mean_jpeg_kb": round(total / count / 1e3, 1),
                     "worker_ms_per_image": {k: round(v, 3) for k, v in best.items()},
                     "images_per_s_per_core": {k: round(v, 1) for k, v in per_core.items()},
                     "worker_cores_per_gpu": {k: round(target / v, 2) for k, v in per_core.items()},
                     "worker_process_ms_per_image": {k: round(v, 3) for k, v in process.items()},
                     "worker_cpu_freed": round(1 - best["gpu_decode"] / best["full_decode_fast"], 3),
                     "runs": runs_log, "load_average_after": [round(x, 2) for x in os.getloadavg()]}
            results["sets"][name] = entry
    finally:
        torch.set_num_threads(threads)
        if not keep and workdir is None:
            shutil.rmtree(base, ignore_errors=True)
    return results


def _best_of(label: str, runs: dict[str, Callable[[], float]], repeats: int, pick: Callable[[float, float], float],
             unit: str, digits: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Every runner ``repeats`` times in turn (so load from other work falls on all alike): the best
    value of each (``pick``: max for a rate, min for a cost) and all of them, logged."""
    best: dict[str, float] = {}
    runs_log: dict[str, list[float]] = {}
    for r in range(repeats):
        for key, fn in runs.items():
            value = fn()
            logger.info("%s %s (run %d): %.*f %s", label, key, r + 1, digits, value, unit)
            best[key] = pick(best[key], value) if key in best else value
            runs_log.setdefault(key, []).append(round(value, digits))
    return best, runs_log


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} ms"


def format_gpu_decode_table(results: dict[str, Any]) -> str:
    """A Markdown table: worker CPU ms per image, images/s per core and worker cores per GPU at the
    target rate, for the CPU decode and ``data.gpu_decode``."""
    target = results["settings"].get("target_images_per_s_per_gpu", TARGET_IMAGES_PER_S_PER_GPU)
    rows = [f"| images | path | worker CPU per image | images/s per core | worker cores per GPU at {target} img/s "
            "| DataLoader worker process CPU per image |", "|---|---|---:|---:|---:|---:|"]
    labels = (("full_decode_fast", "CPU decode (fast_decode, default)"),
              ("full_decode_plain", "CPU decode (fast_decode off)"), ("gpu_decode", "gpu_decode (worker share)"))
    for name, e in results["sets"].items():
        for key, label in labels:
            rows.append(f"| {name} JPEG q90 (~{e['mean_jpeg_kb']:.0f} kB) | {label} | "
                        f"{e['worker_ms_per_image'][key]:.3f} ms | {e['images_per_s_per_core'][key]:.0f} | "
                        f"{e['worker_cores_per_gpu'][key]:.1f} | "
                        f"{_ms(e.get('worker_process_ms_per_image', {}).get(key))} |")
    return "\n".join(rows)


def format_table(results: dict[str, Any]) -> str:
    """A Markdown table of images/s per worker process."""
    rows = ["| images | ImageFolder+RRC+ToTensor | maescale | maescale (fast_decode off) | raw tar read | speedup "
            "| speedup, CPU time |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for name, e in results["sets"].items():
        rows.append(f"| {e['images']} x {name} JPEG q90 (~{e['mean_jpeg_kb']:.0f} kB) | {e['imagefolder']:.1f} | "
                    f"{e['maescale']:.1f} | {e['maescale_plain']:.1f} | {e['raw_tar_read']:.0f} | "
                    f"{e['speedup_vs_imagefolder']:.2f}x | {e['cpu_time_speedup']:.2f}x |")
    return "\n".join(rows)


def write_json(results: dict[str, Any], path: str) -> None:
    write_json_atomic(path, results, indent=2)
