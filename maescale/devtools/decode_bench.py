"""Device-side decode benchmark (``tools/bench_decode.py``): what ``data.gpu_decode: true`` costs on
the device and how its images compare with the CPU path's, on generated photo-like JPEGs.

For each image set (default 500x375 and 2000x1500, JPEG q90 4:2:0, written to shards) and one
batch of ``batch_size`` samples taken from the real loader (``num_workers: 0``):

* **device time per batch** (median of ``repeats``; CUDA events on a synchronised device, wall
  clock on the CPU): nvjpeg's batched decode (:func:`~maescale.data.gpu_decode.decode_jpegs`), the
  batched crop + resize + flip (:func:`~maescale.data.gpu_decode.crop_resize_batch`), the
  normalisation, the whole ``normalize_batch`` call, and, for comparison, the per-image crop and
  resize the code did before; plus the host CPU time of the whole call in the calling thread;
* **kernel launches per batch** (``torch.profiler``): CUDA launch calls and kernels of the decode
  (nvjpeg's own) and of our crop/resize/normalise, and of the per-image loop. On the CPU the
  profiler sees no kernels: it counts the compute ops a GPU would launch as kernels (a proxy);
* **agreement with the CPU path** for the same boxes and flips (mean, 99.9th percentile and max
  of the absolute difference in grey levels): against the default fast path and the plain
  (reference) path, on the 4:2:0 JPEGs and on the same images re-encoded 4:4:4 (no chroma
  subsampling, so no chroma upsampling to differ); and of the decoders alone (full image, no
  resize): the device's decode against libjpeg-turbo's, and against libjpeg-turbo's
  with nvjpeg's default chroma upsampling emulated (:func:`box_chroma_decode`);
* **worker CPU per image** (CPU time, one process): producing batches with ``gpu_decode`` (header,
  box, bytes) and with the CPU decode (fast and plain paths);
* **feed overlap** (:func:`feed_overlap`): a stand-in training step (matmuls on the training
  stream that read the images) alone, the feed alone, and both together with the feed preparing
  the next batch on its side stream; the checksums of the images the step saw must equal those
  of a synchronous run (a stream-ordering bug would show there).

Each measurement is independent: one that fails is reported under ``errors`` in the results and
the others still run.
"""

from __future__ import annotations

import datetime
import io
import logging
import os
import shutil
import statistics
import tempfile
import time
import traceback
from typing import Any, Callable

import numpy as np
import torch

logger = logging.getLogger(__name__)

DEFAULT_SETS = ((500, 375), (2000, 1500))
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# ---- helpers -------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_device(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> dict[str, Any]:
    """Milliseconds of ``fn`` on ``device``: CUDA events around it on the current stream after a
    device synchronisation (the device time of what it queued, host waits included), wall clock
    on the CPU. Median and min of ``repeats`` after ``warmup`` calls; also the host CPU time of the
    calling thread per call."""
    for _ in range(warmup):
        fn()
    sync(device)
    runs, host = [], []
    for _ in range(repeats):
        sync(device)
        c0 = time.thread_time()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            host.append(1e3 * (time.thread_time() - c0))
            end.synchronize()
            runs.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            runs.append(1e3 * (time.perf_counter() - t0))
            host.append(1e3 * (time.thread_time() - c0))
    return {"median_ms": round(statistics.median(runs), 3), "min_ms": round(min(runs), 3),
            "host_cpu_ms": round(statistics.median(host), 3), "repeats": repeats}


# Ops that only make views or allocate: no kernel on a GPU.
_NO_KERNEL = {"aten::empty", "aten::empty_strided", "aten::view", "aten::reshape", "aten::_reshape_alias",
              "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::transpose", "aten::t",
              "aten::permute", "aten::expand", "aten::as_strided", "aten::unfold", "aten::unbind", "aten::detach",
              "aten::alias", "aten::resolve_conj", "aten::resolve_neg", "aten::resize_", "aten::lift_fresh",
              "aten::result_type", "aten::is_nonzero", "aten::set_", "aten::_unsafe_view", "aten::split",
              "aten::view_as", "aten::contiguous", "aten::to", "aten::_to_copy", "aten::pin_memory",
              "aten::_pin_memory", "detach", "aten::item", "aten::_local_scalar_dense", "aten::numpy_T",
              "aten::chunk", "aten::narrow", "aten::flatten", "aten::_nested_tensor_from_mask", "aten::dim",
              "aten::size", "aten::stride", "aten::is_pinned", "aten::record_stream", "aten::lift"}


def _cpu_kernel_ops(events) -> int:
    """Compute ops not called by another compute op: what a GPU would launch as (about) one
    kernel each (``cat`` is one batched kernel on CUDA, however many ``copy_`` it makes on the CPU;
    ``to`` is the ``copy_`` under it)."""
    def compute(e) -> bool:
        return e.name.startswith("aten::") and e.name not in _NO_KERNEL

    count = 0
    for e in events:
        if not compute(e):
            continue
        parent = e.cpu_parent
        while parent is not None and not compute(parent):
            parent = parent.cpu_parent
        count += parent is None
    return count


def count_launches(fn: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Kernel launches of one call of ``fn`` (``torch.profiler``). CUDA: ``launch_calls`` (runtime
    and driver launch API calls), ``kernels`` and ``memcpy`` (device activity), and the most
    frequent kernel names. CPU: ``kernel_ops``, the compute ops that would each be a kernel."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm: first-call allocations and lazy initialisation are not part of the count
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    events = prof.events()
    if device.type != "cuda":
        return {"kernel_ops": _cpu_kernel_ops(events), "note": "CPU: compute ops that would be GPU kernels"}
    launches = [e for e in events if "LaunchKernel" in e.name or "LaunchCooperativeKernel" in e.name]
    device_events = [e for e in events if getattr(e, "device_type", None) is not None
                     and str(e.device_type).endswith("CUDA")]
    memcpy = [e for e in device_events if "memcpy" in e.name.lower() or "memset" in e.name.lower()]
    kernels = [e for e in device_events if e not in memcpy]
    names: dict[str, int] = {}
    for e in kernels:
        names[e.name[:80]] = names.get(e.name[:80], 0) + 1
    top = sorted(names.items(), key=lambda kv: -kv[1])[:8]
    return {"launch_calls": len(launches), "kernels": len(kernels), "memcpy": len(memcpy), "top_kernels": top}


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Absolute difference of two uint8 image tensors of one shape, in grey levels: mean,
    99th and 99.9th percentiles, max, and the largest per-image mean."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    d = (a.cpu().to(torch.int16) - b.cpu().to(torch.int16)).abs().float()
    flat = d.flatten()
    q = torch.quantile(flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:2_000_000]],
                       torch.tensor([0.99, 0.999]))
    per_image = d.reshape(d.shape[0], -1).mean(1) if d.dim() == 4 else d.mean().reshape(1)
    return {"mean": round(float(flat.mean()), 4), "p99": float(q[0]), "p99_9": float(q[1]),
            "max": float(flat.max()), "worst_image_mean": round(float(per_image.max()), 4)}


def jpeg_sampling(data: bytes) -> str:
    """The chroma subsampling of a JPEG: '4:4:4', '4:2:2', '4:2:0' or 'other' (grayscale too)."""
    from PIL import Image, JpegImagePlugin

    img = Image.open(io.BytesIO(data))
    if img.mode != "RGB":
        return "other"
    return {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}.get(JpegImagePlugin.get_sampling(img), "other")


def box_chroma_decode(data: bytes) -> torch.Tensor | None:
    """A 4:2:0 YCbCr JPEG decoded by libjpeg-turbo as a decoder does that upsamples chroma by
    replication (each chroma sample covers its 2x2 pixels: libjpeg's ``do_fancy_upsampling =
    FALSE``, nvJPEG's default) instead of libjpeg-turbo's default triangle ("fancy") filter:
    uint8 ``(3, H, W)``, or None for other subsamplings. Used to tell how much of the device's
    difference from the CPU path is chroma upsampling.

    How, with PIL only: a full decode in YCbCr gives the exact luma; a decode at 1/2 scale gives
    the chroma planes at their native resolution (libjpeg scales the chroma IDCT up instead of
    upsampling, see libjpeg-turbo's jdmaster.c); the chroma is replicated 2x2 and converted with
    JFIF's equations (within 1 grey level of libjpeg's fixed-point tables)."""
    from PIL import Image

    if jpeg_sampling(data) != "4:2:0":
        return None
    full = Image.open(io.BytesIO(data))
    width, height = full.size
    full.draft("YCbCr", (width, height))
    ycc = np.asarray(full).astype(np.float64)
    half = Image.open(io.BytesIO(data))
    half.draft("YCbCr", (width // 2, height // 2))
    chroma = np.asarray(half)[..., 1:].astype(np.float64)
    if half.size != ((width + 1) // 2, (height + 1) // 2):
        return None  # PIL chose another scale: cannot emulate
    up = chroma.repeat(2, axis=0).repeat(2, axis=1)[:height, :width]
    y, cb, cr = ycc[..., 0], up[..., 0] - 128.0, up[..., 1] - 128.0
    rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=0)
    return torch.from_numpy(np.clip(np.round(rgb), 0, 255).astype(np.uint8))


def reencode_444(data: bytes, quality: int = 90) -> bytes:
    """The JPEG decoded and encoded again without chroma subsampling."""
    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buf, "JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def cpu_path_images(datas: list[bytes], boxes: list, flips: list, img_size: int, fast: bool,
                    interpolation: str = "bicubic") -> torch.Tensor:
    """The CPU path's images (``maescale.data.decode.Decoder``) for given boxes and flips."""
    from maescale.data.decode import Decoder

    dec = Decoder(img_size, interpolation=interpolation, fast=fast)
    out = []
    for data, box, flip in zip(datas, boxes, flips):
        img = dec.decode_box(data, tuple(box))
        out.append(img.flip(-1) if flip else img)
    return torch.stack(out)


def encoded_batch_of(datas: list[bytes], boxes: list, flips: list, img_size: int, interpolation: str = "bicubic"):
    """An :class:`~maescale.data.gpu_decode.EncodedBatch` of given JPEGs, boxes and flips (the
    worker's packing, without the loader)."""
    from PIL import Image

    from maescale.data.gpu_decode import Encoded, EncodedBatchBuilder

    builder = EncodedBatchBuilder(len(datas), img_size, interpolation)
    for data, box, flip in zip(datas, boxes, flips):
        w, h = Image.open(io.BytesIO(data)).size
        builder.add(Encoded(data, tuple(box), bool(flip), (h, w)))
    return builder.build([f"#{i}" for i in range(len(datas))])


# ---- measurements ----------------------------------------------------------------------------------


def _loader_batch(shards: str, batch_size: int, img_size: int, gpu_decode: bool, fast: bool = True):
    from maescale.config import DataConfig
    from maescale.data import build_train_loader

    cfg = DataConfig(train_shards=shards, num_workers=0, shuffle_buffer=64, pin_memory=False,
                     fast_decode=fast, gpu_decode=gpu_decode)
    loader = build_train_loader(cfg, img_size=img_size, micro_batch_size=batch_size, rank=0, world_size=1, seed=0)
    it = iter(loader)
    batch = next(it)
    loader.close()
    return batch


def worker_cost(shards: str, count: int, img_size: int, batch_size: int = 32) -> dict[str, Any]:
    """Worker CPU ms per image and images/s per core (CPU time in this process, one torch thread,
    first batch not timed): ``gpu_decode`` (header, box, bytes), the fast and the plain CPU decode."""
    from maescale.devtools.data_bench import bench_gpu_decode_worker

    batch_size = max(1, min(batch_size, count // 2))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    try:
        for key, gpu, fast in (("gpu_decode", True, True), ("cpu_decode_fast", False, True),
                               ("cpu_decode_plain", False, False)):
            ms, _ = bench_gpu_decode_worker(shards, count, img_size=img_size, batch_size=batch_size,
                                            gpu_decode=gpu, fast=fast)
            out[key] = {"ms_per_image": round(ms, 4), "images_per_s_per_core": round(1e3 / ms, 1)}
    finally:
        torch.set_num_threads(threads)
    return out


def device_times(batch, device: torch.device, img_size: int, repeats: int) -> dict[str, Any]:
    """Milliseconds per batch of each device phase (see the module doc)."""
    from maescale.data.gpu_decode import crop_resize, crop_resize_batch, decode_jpegs
    from maescale.data.pipeline import normalize_batch

    moved = batch.to(device)
    images, reasons = decode_jpegs(moved, device)
    if any(img is None for img in images):
        raise RuntimeError(f"decode failed on {device}: {[r for r in reasons if r][:3]}")
    boxes, flips, pos = moved.boxes.tolist(), moved.flips.tolist(), moved.jpeg_pos.tolist()
    jb, jf = [boxes[p] for p in pos], [flips[p] for p in pos]
    u8 = crop_resize_batch(images, jb, jf, img_size)
    mean = torch.tensor(MEAN, device=device)
    std = torch.tensor(STD, device=device)
    phases = {
        "decode": lambda: decode_jpegs(moved, device),
        "crop_resize": lambda: crop_resize_batch(images, jb, jf, img_size),
        "normalize": lambda: normalize_batch(u8, mean, std),
        "total": lambda: normalize_batch(moved, mean, std),
        "per_image_crop_resize_before": lambda: [crop_resize(img, b, img_size, "bicubic", f)
                                                 for img, b, f in zip(images, jb, jf)],
    }
    return {k: time_device(fn, device, repeats) for k, fn in phases.items()}


def launches(batch, device: torch.device, img_size: int) -> dict[str, Any]:
    """Kernel launches per batch: the decode (nvjpeg), our crop/resize + normalisation, and the
    per-image loop of before."""
    from maescale.data.gpu_decode import crop_resize, crop_resize_batch, decode_jpegs
    from maescale.data.pipeline import normalize_batch

    moved = batch.to(device)
    images, _ = decode_jpegs(moved, device)
    boxes, flips, pos = moved.boxes.tolist(), moved.flips.tolist(), moved.jpeg_pos.tolist()
    jb, jf = [boxes[p] for p in pos], [flips[p] for p in pos]
    mean = torch.tensor(MEAN, device=device)
    std = torch.tensor(STD, device=device)
    return {
        "decode_nvjpeg": count_launches(lambda: decode_jpegs(moved, device), device),
        "crop_resize_normalize": count_launches(
            lambda: normalize_batch(crop_resize_batch(images, jb, jf, img_size), mean, std), device),
        "per_image_crop_resize_before": count_launches(
            lambda: [crop_resize(img, b, img_size, "bicubic", f) for img, b, f in zip(images, jb, jf)], device),
    }


def image_agreement(batch, device: torch.device, img_size: int, max_images: int = 32) -> dict[str, Any]:
    """The device path's images against the CPU path's for the same boxes and flips (the first
    ``max_images`` samples), for the 4:2:0 JPEGs and re-encoded 4:4:4; and the decoders alone on
    full images: the device's against libjpeg-turbo's, and against libjpeg-turbo's with
    replicated chroma (:func:`box_chroma_decode`)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from maescale.data.gpu_decode import decode_jpegs, decode_on_device

    k = min(max_images, batch.num_jpegs)
    pos = batch.jpeg_pos.tolist()[:k]
    datas = [bytes(c.numpy().tobytes()) for c in batch.jpeg_bytes()[:k]]
    all_boxes, all_flips = batch.boxes.tolist(), batch.flips.tolist()
    boxes, flips = [all_boxes[p] for p in pos], [all_flips[p] for p in pos]
    out: dict[str, Any] = {"images": k, "sampling": sorted({jpeg_sampling(d) for d in datas})}
    for tag, ds in (("420", datas), ("444", [reencode_444(d) for d in datas])):
        dev = decode_on_device(encoded_batch_of(ds, boxes, flips, img_size).to(device), img_size, device=device).cpu()
        out[f"{tag}_vs_cpu_fast"] = agreement(dev, cpu_path_images(ds, boxes, flips, img_size, fast=True))
        out[f"{tag}_vs_cpu_plain"] = agreement(dev, cpu_path_images(ds, boxes, flips, img_size, fast=False))
    sub = datas[:min(8, k)]
    whole = encoded_batch_of(sub, [(0, 0, 1, 1)] * len(sub), [False] * len(sub), img_size)
    decoded, _ = decode_jpegs(whole.to(device), device)
    mine, libjpeg, boxed = [], [], []
    for data, img in zip(sub, decoded):
        ref = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        mine.append(img.cpu().reshape(-1))
        libjpeg.append(ref.reshape(-1))
        emu = box_chroma_decode(data)
        boxed.append((emu if emu is not None else ref).reshape(-1))
    a = torch.cat(mine)[None]
    out["decoder_vs_libjpeg_fancy_chroma"] = agreement(a, torch.cat(libjpeg)[None])
    out["decoder_vs_libjpeg_replicated_chroma"] = agreement(a, torch.cat(boxed)[None])
    return out


def feed_overlap(shards: str, device: torch.device, img_size: int, batch_size: int, steps: int = 12,
                 step_ms: float = 60.0, workers: int = 4) -> dict[str, Any]:
    """Does the feed hide its device work under a training step? A stand-in step (bf16 matmuls on
    the training stream, sized to ``step_ms``, that also read every image) is timed alone
    (synthetic images), the feed alone (``prefetch=0``), and both with ``prefetch=1``; and the
    per-batch checksums the step saw with prefetching must equal those of the synchronous feed."""
    from maescale.config import DataConfig
    from maescale.data import build_train_loader
    from maescale.data.feed import DeviceFeed

    cfg = DataConfig(train_shards=shards, num_workers=workers, shuffle_buffer=64, gpu_decode=True,
                     pin_memory=device.type == "cuda", prefetch_factor=4, resampled=True)

    def feed(prefetch: int) -> DeviceFeed:
        loader = build_train_loader(cfg, img_size=img_size, micro_batch_size=batch_size, rank=0, world_size=1,
                                    seed=0)
        return DeviceFeed(loader, device, MEAN, STD, prefetch=prefetch)

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = 4096 if device.type == "cuda" else 256
    a = torch.randn(n, n, device=device, dtype=dtype)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(5):
        a = (a @ a).clamp_(-1, 1)
    sync(device)
    per_mm = (time.perf_counter() - t0) / 5
    mms = max(1, int(step_ms / 1e3 / max(per_mm, 1e-6)))

    def step(x: torch.Tensor) -> torch.Tensor:
        y = a
        for _ in range(mms):
            y = (y @ a).clamp_(-1, 1)
        return x.double().sum() + y.float().mean().double() * 0

    def loop(source: Callable[[], torch.Tensor], with_step: bool) -> tuple[float, list[float]]:
        sums = []
        x = source()  # warm up (workers start, first decode)
        (step(x) if with_step else x.double().sum()).item()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            x = source()
            sums.append(step(x) if with_step else x.double().sum())
        sync(device)
        return 1e3 * (time.perf_counter() - t0) / steps, [float(s) for s in sums]

    synthetic = torch.randn(batch_size, 3, img_size, img_size, device=device)
    step_alone, _ = loop(lambda: synthetic, True)
    f0 = feed(0)
    try:
        feed_alone, sums_sync = loop(lambda: next(f0), False)
    finally:
        f0.close()
    f0 = feed(0)
    try:
        serial, _ = loop(lambda: next(f0), True)
    finally:
        f0.close()
    f1 = feed(1)
    try:
        overlapped, sums_prefetch = loop(lambda: next(f1), True)
    finally:
        f1.close()
    hidden = (step_alone + feed_alone - overlapped) / max(min(step_alone, feed_alone), 1e-9)
    return {"step_alone_ms": round(step_alone, 2), "feed_alone_ms": round(feed_alone, 2),
            "step_with_sync_feed_ms": round(serial, 2), "step_with_prefetch_feed_ms": round(overlapped, 2),
            "fraction_of_feed_hidden": round(min(max(hidden, 0.0), 1.0), 3),
            "images_same_as_sync": sums_prefetch == sums_sync,
            "batches": steps, "matmuls_per_step": mms}


# ---- the whole benchmark ---------------------------------------------------------------------------


def _measure(errors: dict[str, str], key: str, fn: Callable[[], Any]) -> Any:
    """Run one measurement; on failure log it, record the error under ``key`` and go on."""
    t0 = time.perf_counter()
    try:
        value = fn()
        logger.info("%s: done in %.1fs", key, time.perf_counter() - t0)
        return value
    except Exception as exc:
        logger.warning("%s failed: %s", key, exc)
        errors[key] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"
        return None


def run_decode_benchmark(*, device: str = "cuda", sets: tuple[tuple[int, int], ...] = DEFAULT_SETS,
                         batch_size: int = 128, img_size: int = 224, repeats: int = 10, agree_images: int = 32,
                         feed_check: bool = True, feed_steps: int = 12, workdir: str | None = None,
                         keep: bool = False) -> dict[str, Any]:
    """Generate the image sets and run every measurement of the module doc on ``device``."""
    from maescale.devtools.data_bench import _image_set, machine_info

    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    info = machine_info()
    if dev.type == "cuda":
        info.update(device=torch.cuda.get_device_name(dev), cuda=torch.version.cuda)
    else:
        info.update(device="cpu (standing in for the GPU: libjpeg-turbo decode, CPU matmuls)")
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": info,
        "settings": {"device": str(dev), "batch_size": batch_size, "img_size": img_size, "repeats": repeats,
                     "jpeg": "photo-like, quality 90, 4:2:0 (PIL default)", "agree_images": agree_images},
        "sets": {}, "errors": {},
    }
    errors = results["errors"]
    base = workdir or tempfile.mkdtemp(prefix="maescale-bench-decode-")
    started = time.perf_counter()
    try:
        for n, (width, height) in enumerate(sets):
            name = f"{width}x{height}"
            made = _measure(errors, f"{name}/generate",
                            lambda: _image_set(base, name, width, height, max(batch_size, 64), min(batch_size, 32)))
            if made is None:
                continue
            count, _, shards, total = made
            entry: dict[str, Any] = {"images": count, "mean_jpeg_kb": round(total / count / 1e3, 1)}
            results["sets"][name] = entry
            entry["worker"] = _measure(errors, f"{name}/worker", lambda: worker_cost(shards, count, img_size))
            batch = _measure(errors, f"{name}/batch",
                             lambda: _loader_batch(shards, batch_size, img_size, gpu_decode=True))
            if batch is None:
                continue
            if dev.type == "cuda":
                batch = batch.pin_memory()
            entry["device_ms"] = _measure(errors, f"{name}/device_ms",
                                          lambda: device_times(batch, dev, img_size, repeats))
            entry["launches"] = _measure(errors, f"{name}/launches", lambda: launches(batch, dev, img_size))
            entry["agreement"] = _measure(errors, f"{name}/agreement",
                                          lambda: image_agreement(batch, dev, img_size, agree_images))
            if feed_check and n == 0:
                workers = max(1, min(4, (os.cpu_count() or 2) - 1))
                results["feed_overlap"] = _measure(
                    errors, f"{name}/feed_overlap",
                    lambda: feed_overlap(shards, dev, img_size, batch_size, steps=feed_steps, workers=workers))
    finally:
        if not keep and workdir is None:
            shutil.rmtree(base, ignore_errors=True)
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results


def _get(d: Any, *keys: str, fmt: str = "{:.2f}") -> str:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return "-"
        d = d[k]
    return fmt.format(d) if isinstance(d, (int, float)) else str(d)


def format_decode_tables(results: dict[str, Any]) -> str:
    """Markdown tables: device time and launches per batch, image agreement, worker CPU."""
    b = results["settings"]["batch_size"]
    rows = [f"Device time per batch of {b} (median ms; host = CPU ms of the calling thread) and launches:", "",
            "| images | decode | crop+resize+flip | normalise | whole call | host | per-image resize (before) "
            "| launches: decode / ours / before |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, e in results["sets"].items():
        t, lc = e.get("device_ms"), e.get("launches")
        key = "launch_calls" if isinstance(lc, dict) and "launch_calls" in lc.get("crop_resize_normalize", {}) \
            else "kernel_ops"
        counts = " / ".join(_get(lc, part, key, fmt="{}") for part in
                            ("decode_nvjpeg", "crop_resize_normalize", "per_image_crop_resize_before"))
        rows.append(f"| {name} | {_get(t, 'decode', 'median_ms')} | {_get(t, 'crop_resize', 'median_ms')} | "
                    f"{_get(t, 'normalize', 'median_ms')} | {_get(t, 'total', 'median_ms')} | "
                    f"{_get(t, 'total', 'host_cpu_ms')} | {_get(t, 'per_image_crop_resize_before', 'median_ms')} | "
                    f"{counts} ({key}) |")
    rows += ["", "Agreement with the CPU path, grey levels (mean / p99.9 / max):", "",
             "| images | 4:2:0 vs fast path | 4:2:0 vs plain path | 4:4:4 vs fast | 4:4:4 vs plain "
             "| decoder vs libjpeg | decoder vs replicated chroma |", "|---|---|---|---|---|---|---|"]
    for name, e in results["sets"].items():
        a = e.get("agreement")
        cells = []
        for k in ("420_vs_cpu_fast", "420_vs_cpu_plain", "444_vs_cpu_fast", "444_vs_cpu_plain",
                  "decoder_vs_libjpeg_fancy_chroma", "decoder_vs_libjpeg_replicated_chroma"):
            cells.append(f"{_get(a, k, 'mean')} / {_get(a, k, 'p99_9', fmt='{:.0f}')} / {_get(a, k, 'max', fmt='{:.0f}')}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    rows += ["", "Worker CPU per image (ms, and images/s per core):", "",
             "| images | gpu_decode | CPU decode (fast) | CPU decode (plain) |", "|---|---:|---:|---:|"]
    for name, e in results["sets"].items():
        w = e.get("worker")
        cells = [f"{_get(w, k, 'ms_per_image', fmt='{:.3f}')} ({_get(w, k, 'images_per_s_per_core', fmt='{:.0f}')}/s)"
                 for k in ("gpu_decode", "cpu_decode_fast", "cpu_decode_plain")]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    f = results.get("feed_overlap")
    if f:
        rows += ["", f"Feed overlap ({f['batches']} batches): step alone {f['step_alone_ms']} ms, feed alone "
                 f"{f['feed_alone_ms']} ms, step + synchronous feed {f['step_with_sync_feed_ms']} ms, step + "
                 f"prefetching feed {f['step_with_prefetch_feed_ms']} ms: {100 * f['fraction_of_feed_hidden']:.0f}% "
                 f"of the feed hidden; images identical to the synchronous feed: {f['images_same_as_sync']}"]
    if results["errors"]:
        rows += ["", "Errors: " + ", ".join(sorted(results["errors"]))]
    return "\n".join(rows)
