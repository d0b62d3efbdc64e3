"""Training-step benchmark of one MAE preset: forward + backward + optimizer step (the "bare step").

Each variant (attention kernel x ``torch.compile`` mode x activation checkpointing) gets a
freshly built model on the device and a fixed random batch (no data loading: this measures the
model). After ``warmup`` steps (which absorb compilation), ``repeats`` windows of ``window``
steps are timed, each window run back to back and synchronised once at its end, as a training
loop runs (a sync per step would expose the host's launch time that a real loop hides under the
previous step); the median step time is reported, with images/s, achieved model and hardware
TFLOP/s (analytic FLOPs of :mod:`maescale.flops`), MFU/HFU against the device's peak, the peak
allocated memory (CUDA only) and, from one profiled window, kernel launches and ``aten`` ops per
step and the GPU's idle share (:mod:`maescale.profiling`).

Precision: ``bf16`` is DeepSpeed's bf16 mode on one device, with its flat buffers: bf16 weights
(views of one buffer per weight-decay group) and activations, one fp32 master tensor per group
with the AdamW state; per step the gradients are flattened into one buffer, cast to fp32, stepped
by the fused AdamW and copied back (16 bytes/param + an fp32 gradient copy). ``autocast`` keeps
fp32 weights and runs the forward under bf16 autocast (plain PyTorch, what most MAE code does).
``fp32`` is plain fp32 (the CPU default: CPU bf16 speed says little about GPUs). ``peer`` is the
hand-tuned single-GPU loop a user would write, the baseline of issue #20's goal: ``autocast`` with
timm's own ``Attention`` in every block (timm-style MAE), fused AdamW, ``zero_grad(set_to_none)``;
run it with ``compile=full`` (``torch.compile`` of the model). No ZeRO and no communication here:
one device, the single-GPU ceiling the real loop is measured against.

FP8 (``Variant.fp8``): the encoder's linear layers as torchao float8 layers
(:mod:`maescale.models.fp8`); MFU still counts the model's FLOPs against the bf16 peak.

Compile modes (:meth:`maescale.models.mae.MaskedAutoencoderViT.compile_model`): ``blocks`` (each
transformer block), ``full`` (the whole forward with the loss), ``graphs`` (each block with CUDA
graphs, ``mode="reduce-overhead"``: a block's kernels replay as one graph launch).

:func:`host_overhead` compares, on any machine, the host-side cost of the bare step with the
DeepSpeed engine's step as the training loop runs it (default configuration and lean step).
"""

from __future__ import annotations

import gc
import itertools
import logging
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from maescale import compat

from maescale.flops import mae_flops_per_image, mfu, peak_flops, train_flops_per_image
from maescale.models import PRESETS, create_model
from maescale.models.mae import AttentionUnavailableError

log = logging.getLogger(__name__)

PRECISIONS = ("bf16", "autocast", "fp32", "peer")
FP8_OPTIONS = ("off", "tensorwise", "rowwise")
_FP8_LABEL = {"off": "", "tensorwise": "+fp8t", "rowwise": "+fp8r"}

__all__ = ["Variant", "BenchResult", "variants_from", "unavailable_reason", "bench_variant", "run_bench",
           "format_results", "environment", "PRECISIONS"]


COMPILE_OPTIONS = ("off", "blocks", "full", "graphs", "full_regions")
_COMPILE_LABEL = {"off": "", "blocks": "+compile", "full": "+compile-full", "graphs": "+cudagraphs",
                  "full_regions": "+compile-full-regions"}


@dataclass(frozen=True)
class Variant:
    attn_impl: str = "sdpa"
    compile: str = "off"  # one of COMPILE_OPTIONS
    act_ckpt_every: int = 0
    fp8: str = "off"  # one of FP8_OPTIONS: the encoder's linears in float8 (maescale.models.fp8)

    def __post_init__(self) -> None:
        if self.compile is True or self.compile is False:  # older callers: on/off
            object.__setattr__(self, "compile", "blocks" if self.compile else "off")
        if self.compile not in COMPILE_OPTIONS:
            raise ValueError(f"compile must be one of {COMPILE_OPTIONS}, got {self.compile!r}")
        if self.fp8 not in FP8_OPTIONS:
            raise ValueError(f"fp8 must be one of {FP8_OPTIONS}, got {self.fp8!r}")

    @property
    def label(self) -> str:
        ckpt = f"+ckpt{self.act_ckpt_every}" if self.act_ckpt_every else ""
        return f"{self.attn_impl}{_COMPILE_LABEL[self.compile]}{ckpt}{_FP8_LABEL[self.fp8]}"

    @property
    def compiled(self) -> bool:
        return self.compile != "off"


def variants_from(attn: list[str], compile_opts: list[str], ckpt: list[int], grid: str = "product",
                  fp8: list[str] = ("off",)) -> list[Variant]:
    """``product``: every combination. ``axes``: the first of each list as the baseline, then one
    axis changed at a time (``len(attn) + len(compile) + len(ckpt) + len(fp8) - 3`` variants)."""
    if grid == "product":
        return [Variant(a, c, k, f) for a, c, k, f in itertools.product(attn, compile_opts, ckpt, fp8)]
    if grid != "axes":
        raise ValueError(f"grid must be 'product' or 'axes', got {grid!r}")
    base = Variant(attn[0], compile_opts[0], ckpt[0], fp8[0])
    out = [base]
    out += [Variant(a, base.compile, base.act_ckpt_every, base.fp8) for a in attn[1:]]
    out += [Variant(base.attn_impl, c, base.act_ckpt_every, base.fp8) for c in compile_opts[1:]]
    out += [Variant(base.attn_impl, base.compile, k, base.fp8) for k in ckpt[1:]]
    out += [Variant(base.attn_impl, base.compile, base.act_ckpt_every, f) for f in fp8[1:]]
    return out


@dataclass
class BenchResult:
    preset: str
    img_size: int
    mask_ratio: float
    micro_batch: int
    attn_impl: str
    compile: str
    act_ckpt_every: int
    precision: str
    device: str
    fp8: str = "off"
    status: str = "ok"  # ok | skipped | oom | error
    reason: str | None = None
    step_ms: float | None = None  # median
    step_ms_min: float | None = None
    step_ms_max: float | None = None
    first_step_s: float | None = None  # includes compilation
    images_per_s: float | None = None
    model_gflops_per_image: float | None = None
    hardware_gflops_per_image: float | None = None
    model_tflops: float | None = None  # achieved, per device
    hardware_tflops: float | None = None
    mfu: float | None = None
    hfu: float | None = None
    peak_mem_gib: float | None = None
    loss: float | None = None
    repeats: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return Variant(self.attn_impl, self.compile, self.act_ckpt_every, self.fp8).label

    def as_dict(self) -> dict:
        return asdict(self) | {"variant": self.label}


def environment(device: torch.device) -> dict:
    """Versions and hardware, for the JSON record."""
    env = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
           "device": str(device), "cpu_threads": torch.get_num_threads()}
    try:
        import timm

        env["timm"] = timm.__version__
    except ImportError:  # pragma: no cover
        pass
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
        env["gpu_total_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    else:
        env["device_name"] = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
            if names:
                env["device_name"] = names[0]
        except OSError:  # pragma: no cover
            pass
    try:
        import flash_attn

        env["flash_attn"] = flash_attn.__version__
    except ImportError:
        env["flash_attn"] = None
    return env


def unavailable_reason(v: Variant, device: torch.device, precision: str, fp8_emulate: bool = False) -> str | None:
    """Why variant ``v`` cannot run here (None when it can): checked up front to skip cleanly."""
    if v.fp8 != "off":
        from maescale.models.fp8 import FP8UnavailableError, check_fp8_support

        try:
            check_fp8_support(v.fp8, device, fp8_emulate)
        except FP8UnavailableError as exc:
            return str(exc)
    if v.attn_impl in ("flash", "cudnn", "flash_attn"):
        if device.type != "cuda":
            return f"attn_impl={v.attn_impl} needs a CUDA GPU (device is {device.type})"
        if precision == "fp32":
            return f"attn_impl={v.attn_impl} needs bf16/fp16 (precision is fp32)"
    if v.attn_impl == "flash_attn":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            return "flash_attn package not installed (pip install flash-attn --no-build-isolation)"
    if v.compiled and device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch.compile on CUDA needs triton"
    if v.compile == "graphs" and device.type != "cuda":
        return "CUDA graphs need a CUDA GPU"
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Step:
    """One training step in the chosen precision (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, precision: str, device: torch.device, lr: float = 1e-4,
                 flat: bool = True):
        from maescale.optim import param_groups

        self.model, self.precision, self.device = model, precision, device
        groups = param_groups(model, 0.05)
        self.per_param = precision == "bf16" and not flat
        if self.per_param:
            # The earlier bare step (kept for comparison): an fp32 master per parameter, a cast
            # and a copy per parameter and step.
            model.to(torch.bfloat16)
            self.params = [p for g in groups for p in g["params"]]
            for g in groups:
                g["params"] = [p.detach().float().clone().requires_grad_(True) for p in g["params"]]
            self.master = [p for g in groups for p in g["params"]]
        elif precision == "bf16":
            model.to(torch.bfloat16)
            # Flat buffers, as DeepSpeed's ZeRO optimizer keeps them: the optimizer side of the step
            # is a few kernels per group instead of several per parameter.
            self.flat: list[tuple[list[torch.nn.Parameter], torch.Tensor, torch.Tensor]] = []
            for g in groups:
                params = g["params"]
                flat16 = torch.cat([p.detach().reshape(-1) for p in params])
                offset = 0
                for p in params:
                    p.data = flat16[offset:offset + p.numel()].view_as(p)
                    offset += p.numel()
                master = flat16.float().requires_grad_(True)
                self.flat.append((params, flat16, master))
                g["params"] = [master]
        self.opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=True)
        self.input_dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def __call__(self, imgs: torch.Tensor) -> torch.Tensor:
        if self.precision in ("autocast", "peer"):
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                loss = self.model(imgs)[0]
        else:
            loss = self.model(imgs)[0]
        loss.backward()
        if self.per_param:
            for m, p in zip(self.master, self.params):
                m.grad = p.grad.float()
                p.grad = None
            self.opt.step()
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.master)
            for m in self.master:
                m.grad = None
        elif self.precision == "bf16":
            for params, _, master in self.flat:
                master.grad = torch.cat([p.grad.reshape(-1) for p in params]).float()
                for p in params:
                    p.grad = None
            self.opt.step()
            with torch.no_grad():
                for _, flat16, master in self.flat:
                    flat16.copy_(master)
                    master.grad = None
        else:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return loss.detach()


def _use_timm_attention(model: torch.nn.Module) -> None:
    """The peer's model: timm's own ``Attention`` in every block (same parameters; timm's
    ``qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)`` layout and fused SDPA)."""
    from timm.layers import Attention

    for blk in [*model.blocks, *model.decoder_blocks]:
        blk.attn.__class__ = Attention
        blk.attn.fused_attn = True


class _Runner:
    """One variant at one micro-batch: built, warmed up, then timed step by step; any failure
    (out of memory, unavailable kernel, error) ends up in ``res.status`` instead of raising."""

    def __init__(self, preset: str, v: Variant, micro_batch: int, img_size: int, mask_ratio: float,
                 precision: str, device: torch.device, peak_tflops: float | None, seed: int = 0,
                 fp8_emulate: bool = False, fp8_min_features: int | None = None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.v, self.device, self.micro_batch = v, device, micro_batch
        self.fp8_emulate, self.fp8_min_features = fp8_emulate, fp8_min_features
        self.res = BenchResult(preset, img_size, mask_ratio, micro_batch, v.attn_impl, v.compile, v.act_ckpt_every,
                               precision, str(device), fp8=v.fp8)
        self.times: list[float] = []
        self.step = self.imgs = self.loss = None
        self.track_peak = True  # off when several runners share the device (interleaved)
        reason = unavailable_reason(v, device, precision, fp8_emulate)
        if reason:
            self.res.status, self.res.reason = "skipped", reason
            return
        arch = PRESETS[preset]
        self.model_f, self.hw_f = train_flops_per_image(arch, img_size, mask_ratio, v.act_ckpt_every)
        self.res.model_gflops_per_image, self.res.hardware_gflops_per_image = self.model_f / 1e9, self.hw_f / 1e9
        dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        self.peak = peak_flops(dev_name, peak_tflops, "fp32" if precision == "fp32" else "bf16")
        self.res.extra["loadavg_before"] = os.getloadavg()[0]  # other work on the machine skews CPU timings
        self._guard(self._build, preset, img_size, mask_ratio, precision, seed)

    @property
    def ok(self) -> bool:
        return self.res.status == "ok"

    def _guard(self, fn, *args) -> None:
        if not self.ok:
            return
        try:
            fn(*args)
        except torch.OutOfMemoryError as exc:
            self.res.status, self.res.reason = "oom", str(exc).splitlines()[0][:200]
        except AttentionUnavailableError as exc:
            self.res.status, self.res.reason = "skipped", str(exc)
        except Exception as exc:  # a variant failing must not lose the others' numbers
            log.exception("variant %s at micro-batch %d failed", self.v.label, self.micro_batch)
            msg = str(exc).splitlines()[0][:300] if str(exc) else ""
            self.res.status, self.res.reason = "error", f"{type(exc).__name__}: {msg}"
        if not self.ok:
            self.close()

    def _build(self, preset: str, img_size: int, mask_ratio: float, precision: str, seed: int) -> None:
        torch.manual_seed(seed)
        model = create_model(preset, img_size=img_size, mask_ratio=mask_ratio, attn_impl=self.v.attn_impl,
                             act_ckpt_every=self.v.act_ckpt_every, device=self.device)
        model.train()
        if precision == "peer":
            _use_timm_attention(model)
        if self.v.fp8 != "off":
            from maescale.models.fp8 import convert_to_fp8

            self.res.extra["fp8_layers"] = len(convert_to_fp8(model, self.v.fp8, self.fp8_emulate,
                                                              self.fp8_min_features, self.device))
        self.step = _Step(model, precision, self.device)
        if self.v.compiled:
            model.compile_model(self.v.compile)
        self.imgs = torch.randn(self.micro_batch, model.in_chans, img_size, img_size, device=self.device,
                                dtype=self.step.input_dtype)

    def _run(self, timed: bool, steps: int = 1) -> None:
        _sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.loss = self.step(self.imgs)
        _sync(self.device)
        if timed:
            self.times.append((time.perf_counter() - t0) / steps)

    def warmup(self, n: int) -> None:
        def go():
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            t0 = time.perf_counter()
            self._run(False)
            self.res.first_step_s = time.perf_counter() - t0
            for _ in range(max(0, n - 1)):
                self._run(False)
        self._guard(go)

    def timed_step(self, window: int = 1) -> None:
        """One timed window of ``window`` back-to-back steps."""
        self._guard(self._run, True, window)

    def profile(self, window: int) -> None:
        """Kernel launches, aten ops and GPU idle share per step, from one profiled window."""
        from maescale.profiling import profiled

        def go():
            with profiled(self.device, window) as result:
                for _ in range(window):
                    self.loss = self.step(self.imgs)
            self.res.extra["profile"] = result().as_dict()
        self._guard(go)

    def finish(self) -> BenchResult:
        res = self.res
        if self.ok and self.times:
            med = statistics.median(self.times)
            res.extra["loadavg_after"] = os.getloadavg()[0]
            res.step_ms, res.step_ms_min, res.step_ms_max = med * 1e3, min(self.times) * 1e3, max(self.times) * 1e3
            res.repeats = len(self.times)
            res.images_per_s = self.micro_batch / med
            res.model_tflops = self.model_f * res.images_per_s / 1e12
            res.hardware_tflops = self.hw_f * res.images_per_s / 1e12
            res.mfu = mfu(self.model_f, res.images_per_s, self.peak)
            res.hfu = mfu(self.hw_f, res.images_per_s, self.peak)
            res.loss = float(self.loss)
            if not math.isfinite(res.loss):
                res.status, res.reason = "error", f"non-finite loss {res.loss}"
            if self.device.type == "cuda" and self.track_peak:
                res.peak_mem_gib = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.close()
        return res

    def close(self) -> None:
        self.step = self.imgs = self.loss = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def bench_variant(preset: str, v: Variant, micro_batch: int, img_size: int = 224, mask_ratio: float = 0.75,
                  precision: str = "bf16", device: torch.device | str = "cuda", warmup: int = 3, repeats: int = 10,
                  peak_tflops: float | None = None, seed: int = 0, window: int = 1,
                  profile: bool = False, fp8_emulate: bool = False, fp8_min_features: int | None = None) -> BenchResult:
    """Time one variant at one micro-batch (see the module docstring): ``repeats`` windows of
    ``window`` back-to-back steps; ``profile``: one more window under the profiler."""
    r = _Runner(preset, v, micro_batch, img_size, mask_ratio, precision, torch.device(device), peak_tflops, seed,
                fp8_emulate, fp8_min_features)
    r.warmup(warmup)
    for _ in range(repeats):
        if not r.ok:
            break
        r.timed_step(window)
    if profile and r.ok:
        r.profile(window)
    res = r.finish()
    if v.compiled:
        compat.compiler_reset()
    return res


def run_bench(preset: str, micro_batches: list[int], variants: list[Variant], img_size: int = 224,
              mask_ratio: float = 0.75, precision: str | None = None, device: str | None = None, warmup: int = 3,
              repeats: int = 10, peak_tflops: float | None = None, interleave: bool = False, window: int = 1,
              profile: bool = False, fp8_emulate: bool = False,
              fp8_min_features: int | None = None) -> tuple[list[BenchResult], dict]:
    """All ``variants`` at all ``micro_batches``; returns the results and the environment.

    ``interleave``: build every variant of a micro-batch at once and time their steps in turn
    (round robin), so that load from other processes falls on all variants alike and their
    ratios stay meaningful on a shared machine. Needs memory for all variants together: for
    CPU runs of small presets, not for ViT-H on one GPU.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = precision or ("bf16" if dev.type == "cuda" else "fp32")
    if any(v.compiled for v in variants):
        # every variant recompiles the same block code; do not fall back to eager for that
        compat.raise_recompile_limit(64)
    env = environment(dev) | {"interleave": interleave, "window": window}
    results = []
    for mb in micro_batches:
        if not interleave:
            for v in variants:
                log.info("%s mb=%d %s ...", preset, mb, v.label)
                r = bench_variant(preset, v, mb, img_size, mask_ratio, precision, dev, warmup, repeats, peak_tflops,
                                  window=window, profile=profile, fp8_emulate=fp8_emulate,
                                  fp8_min_features=fp8_min_features)
                log.info("  %s", _line(r, None))
                results.append(r)
            continue
        runners = []
        for v in variants:
            log.info("%s mb=%d %s: build and warm up ...", preset, mb, v.label)
            r = _Runner(preset, v, mb, img_size, mask_ratio, precision, dev, peak_tflops,
                        fp8_emulate=fp8_emulate, fp8_min_features=fp8_min_features)
            r.track_peak = False  # the device's peak would be that of all variants together
            r.warmup(warmup)
            runners.append(r)
        for i in range(repeats):
            for r in runners:
                if r.ok:
                    r.timed_step(window)
            log.info("%s mb=%d: round %d/%d", preset, mb, i + 1, repeats)
        for r in runners:
            if profile and r.ok:
                r.profile(window)
            results.append(r.finish())
            log.info("  %s: %s", results[-1].label, _line(results[-1], None))
        compat.compiler_reset()
    return results, env


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _line(r: BenchResult, base: BenchResult | None) -> str:
    if r.status != "ok":
        return f"{r.status}: {r.reason}"
    rel = r.images_per_s / base.images_per_s if base is not None and base.status == "ok" else None
    return (f"{_fmt(r.step_ms, '.1f')} ms  {_fmt(r.images_per_s, '.1f')} img/s  x{_fmt(rel, '.2f')}  "
            f"{_fmt(r.model_tflops, '.3f')} TFLOP/s  MFU {_fmt(None if r.mfu is None else 100 * r.mfu, '.1f')}%  "
            f"peak {_fmt(r.peak_mem_gib, '.2f')} GiB")


def format_results(results: list[BenchResult], env: dict | None = None) -> str:
    """Text table; ``vs 1st`` is images/s relative to the first variant at the same micro-batch."""
    head = (f"{'preset':<22}{'px':>4}{'mb':>5} {'variant':<26}{'ms/step':>9}{'img/s':>9}{'vs 1st':>7}"
            f"{'model TF/s':>11}{'hw TF/s':>9}{'MFU%':>6}{'HFU%':>6}{'peak GiB':>9}{'1st s':>7}"
            f"{'launch/st':>10}{'aten/st':>8}{'idle%':>6}")
    lines = []
    if env:
        loads = [r.extra[k] for r in results for k in ("loadavg_before", "loadavg_after") if k in r.extra]
        load = f", 1-min load {min(loads):.1f}-{max(loads):.1f}" if loads and env.get("device") == "cpu" else ""
        lines.append(f"device: {env.get('device_name')} ({env.get('device')}, {env.get('cpu_threads')} threads), "
                     f"torch {env.get('torch')}, precision {results[0].precision if results else '?'}{load}")
    lines.append(head)
    first: dict[tuple, BenchResult] = {}
    for r in results:
        base = first.setdefault((r.preset, r.img_size, r.micro_batch), r)
        if r.status != "ok":
            lines.append(f"{r.preset:<22}{r.img_size:>4}{r.micro_batch:>5} {r.label:<26}  {r.status}: {r.reason}")
            continue
        rel = r.images_per_s / base.images_per_s if base.status == "ok" else None
        lines.append(
            f"{r.preset:<22}{r.img_size:>4}{r.micro_batch:>5} {r.label:<26}{r.step_ms:>9.1f}{r.images_per_s:>9.1f}"
            f"{_fmt(rel, '.2f'):>7}{r.model_tflops:>11.3f}{r.hardware_tflops:>9.3f}"
            f"{_fmt(None if r.mfu is None else 100 * r.mfu, '.1f'):>6}{_fmt(None if r.hfu is None else 100 * r.hfu, '.1f'):>6}"
            f"{_fmt(r.peak_mem_gib, '.2f'):>9}{_fmt(r.first_step_s, '.1f'):>7}" + _profile_cols(r))
    return "\n".join(lines)


def _profile_cols(r: BenchResult) -> str:
    p = r.extra.get("profile") or {}
    idle = p.get("device_idle_fraction")
    return (f"{_fmt(p.get('kernel_launches'), '.0f'):>10}{_fmt(p.get('aten_ops'), '.0f'):>8}"
            f"{_fmt(None if idle is None else 100 * idle, '.0f'):>6}")


def flops_summary(preset: str, img_size: int, mask_ratio: float) -> str:
    """One line of the analytic FLOPs of the preset (printed above the table)."""
    f = mae_flops_per_image(PRESETS[preset], img_size, mask_ratio)
    return (f"{preset} @ {img_size}px mask {mask_ratio}: forward {f.forward / 1e9:.3f} GFLOPs/image "
            f"(encoder {f.encoder / 1e9:.3f} on {f.encoder_tokens} tokens, decoder {f.decoder / 1e9:.3f} on "
            f"{f.decoder_tokens}), training step {f.train / 1e9:.3f} GFLOPs/image")


# --------------------------------------------------------------------------------------------
# Host overhead: the bare step against the DeepSpeed engine's step
# --------------------------------------------------------------------------------------------

# bare: the flat-buffer bare step (the reference); bare-per-param: an fp32 master per parameter;
# deepspeed: DeepSpeed's own ZeRO-1 step (deepspeed.lean_step=false); deepspeed-lean: DeepSpeed's
# ZeRO-1 engine step with the lean guard (the loop's step before 2026-12-07, kept for comparison);
# loop: the step the loop runs now (maescale.step.FlatZeroStep).
HOST_VARIANTS = ("bare", "bare-per-param", "deepspeed", "deepspeed-lean", "loop")


def host_overhead(preset: str, micro_batch: int, img_size: int | None = None, precision: str = "bf16",
                  warmup: int = 2, steps: int = 5, device: str | None = None) -> list[dict]:
    """Aten ops and host milliseconds per optimizer step of the bare step (:class:`_Step`), of
    DeepSpeed's ZeRO-1 engine step (with its own checks, and with the lean guard) and of the step
    the loop runs (:class:`maescale.step.FlatZeroStep`); see :data:`HOST_VARIANTS`. One process; on
    a CPU the host time is the whole step, on a GPU the device is synchronised at the end of each
    window. Counting ops is the point: it shows host overhead on machines without a GPU."""
    from maescale.config import config_from_dict
    from maescale.distributed import init_distributed
    from maescale.optim import build_engine
    from maescale.profiling import profiled
    from maescale.step import DeepSpeedStep, build_step

    dev_req = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ctx = init_distributed(dev_req)
    dev = ctx.device
    img = img_size or (32 if preset == "mae_vit_tiny_patch4" else 224)
    rows: list[dict] = []
    for variant in HOST_VARIANTS:
        torch.manual_seed(0)
        model = create_model(preset, img_size=img, device=dev)
        imgs = torch.randn(micro_batch, model.in_chans, img, img, device=dev)
        if variant.startswith("bare"):
            step = _Step(model, precision, dev, flat=variant == "bare")
            x = imgs.to(step.input_dtype)
            run = lambda: step(x)  # noqa: E731
            engine = None
        else:
            cfg = config_from_dict({"model": {"name": preset, "img_size": img},
                                    "train": {"micro_batch_size": micro_batch, "max_steps": 1, "precision": precision},
                                    "deepspeed": {"zero_stage": 1, "lean_step": variant != "deepspeed"}})
            built = build_engine(cfg, model, 1, dev)
            engine = built.engine
            if variant == "loop":
                stepper = build_step(cfg, engine, dev, [g["name"] for g in built.groups])
            else:  # DeepSpeed's engine step, with its own checks or with the lean guard
                stepper = DeepSpeedStep(engine, 1, dev, lean=variant == "deepspeed-lean")
            gen = torch.Generator(device=dev).manual_seed(0)

            def run(stepper=stepper, gen=gen):
                noise = torch.rand(micro_batch, stepper.model.grid_size ** 2, device=dev, generator=gen)
                loss = stepper.forward_backward(imgs, noise, last=True)[0]
                stepper.step(1)
                return loss
        for _ in range(warmup):
            run()
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            run()
        _sync(dev)
        host_ms = 1e3 * (time.perf_counter() - t0) / steps
        with profiled(dev, steps) as result:
            for _ in range(steps):
                run()
        prof = result()
        rows.append({"preset": preset, "micro_batch": micro_batch, "precision": precision, "variant": variant,
                     "device": str(dev), "host_ms_per_step": host_ms, "aten_ops_per_step": prof.aten_ops,
                     "kernel_launches_per_step": prof.kernel_launches})
        if engine is not None:
            stepper.close()
            engine.destroy()
        del model, run
        gc.collect()
    bare = rows[0]  # the flat-buffer bare step, the reference of the GPU benchmarks
    for r in rows:
        r["aten_ops_vs_bare"] = r["aten_ops_per_step"] / bare["aten_ops_per_step"]
        r["host_ms_vs_bare"] = r["host_ms_per_step"] / bare["host_ms_per_step"]
    return rows


def format_host_overhead(rows: list[dict]) -> str:
    """Text table of :func:`host_overhead` rows."""
    out = [f"{'preset':<22}{'mb':>4} {'variant':<16}{'aten ops/step':>14}{'vs bare':>8}{'host ms/step':>13}{'vs bare':>8}"]
    for r in rows:
        out.append(f"{r['preset']:<22}{r['micro_batch']:>4} {r['variant']:<16}{r['aten_ops_per_step']:>14.0f}"
                   f"{r['aten_ops_vs_bare']:>8.2f}{r['host_ms_per_step']:>13.1f}{r['host_ms_vs_bare']:>8.2f}")
    return "\n".join(out)
