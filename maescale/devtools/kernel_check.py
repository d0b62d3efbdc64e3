"""Per-call-site kernel checks of the GPU check (``bench/gpu_check.sh`` steps ``sdpa`` and ``fp8-shapes``).

:func:`sdpa_check`: for each attention call site of a preset (the encoder on the visible tokens,
the decoder on all tokens; ViT-H/14 at 224 px, mask 0.75: head dim 80 on 65 tokens, head dim 32 on
257), which SDPA backend ``F.scaled_dot_product_attention`` picks (the aten op the profiler sees)
and the forward + backward time of every backend forced in turn (flash, efficient, cuDNN, math),
on q/k/v laid out as the model lays them out (views of the packed qkv output).

:func:`fp8_shapes`: for each linear-layer shape of a preset at the loop's token counts
(micro-batch x tokens rows), the forward + backward time of a pointwise producer + the linear
layer, compiled, in bf16 and with each torchao float8 recipe: the per-shape measurement that
:data:`maescale.models.fp8.FP8_MIN_FEATURES` is to be set from.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from maescale import compat
from maescale.models.fp8 import FP8_DIM_MULTIPLE, planned_linears
from maescale.models.presets import PRESETS

log = logging.getLogger(__name__)

SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
# aten op of each backend, as the profiler names it (the CPU flash kernel has its own op)
_SDPA_OPS = {"_scaled_dot_product_flash_attention": "flash", "_scaled_dot_product_efficient_attention": "efficient",
             "_scaled_dot_product_cudnn_attention": "cudnn", "_scaled_dot_product_attention_math": "math",
             "_scaled_dot_product_flash_attention_for_cpu": "flash(cpu)"}


def attention_sites(preset: str, img_size: int = 224, mask_ratio: float = 0.75) -> list[dict[str, int | str]]:
    """The attention call sites of a preset: heads, head dim and tokens of the encoder (visible
    patches + cls) and of the decoder (all patches + cls)."""
    arch = PRESETS[preset]
    patches = (img_size // arch.patch_size) ** 2
    visible = int(patches * (1 - mask_ratio))
    return [{"site": "encoder", "heads": arch.num_heads, "head_dim": arch.embed_dim // arch.num_heads,
             "tokens": visible + 1},
            {"site": "decoder", "heads": arch.decoder_num_heads,
             "head_dim": arch.decoder_embed_dim // arch.decoder_num_heads, "tokens": patches + 1}]


def _timer(device: torch.device) -> Callable[[Callable[[], Any], int, int], float]:
    """Median milliseconds per call of ``fn`` over ``repeats`` windows of ``window`` calls (one sync per window)."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run(fn: Callable[[], Any], repeats: int, window: int) -> float:
        for _ in range(2):
            fn()
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            for _ in range(window):
                fn()
            sync()
            times.append((time.perf_counter() - t0) / window)
        return 1e3 * statistics.median(times)

    return run


def _packed_qkv(b: int, n: int, h: int, d: int, device: torch.device, dtype: torch.dtype):
    qkv = torch.randn(b, n, 3, h, d, device=device, dtype=dtype, requires_grad=True)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # as MAEAttention: views of the packed tensor
    return qkv, q, k, v


def sdpa_check(preset: str, micro_batches: list[int], img_size: int = 224, mask_ratio: float = 0.75,
               device: str | None = None, repeats: int = 5, window: int = 10) -> dict[str, Any]:
    """Backend picked and time per backend at each attention call site (see the module docstring)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    forced = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
              "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    timer = _timer(dev)
    rows = []
    for mb in micro_batches:
        for site in attention_sites(preset, img_size, mask_ratio):
            qkv, q, k, v = _packed_qkv(mb, int(site["tokens"]), int(site["heads"]), int(site["head_dim"]), dev, dtype)
            grad = torch.randn(mb, int(site["heads"]), int(site["tokens"]), int(site["head_dim"]), device=dev,
                               dtype=dtype)

            def step(backend: Any = None) -> None:
                if backend is None:
                    out = F.scaled_dot_product_attention(q, k, v)
                else:
                    with sdpa_kernel(backend):
                        out = F.scaled_dot_product_attention(q, k, v)
                out.backward(grad, retain_graph=False, inputs=[qkv])
                qkv.grad = None

            row: dict[str, Any] = {**site, "micro_batch": mb, "dtype": str(dtype).replace("torch.", ""),
                                   "ms": {}, "errors": {}}
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
            with profile(activities=acts) as prof:
                step()
            ops = sorted({e.name.removeprefix("aten::") for e in prof.events()
                          if e.name.removeprefix("aten::") in _SDPA_OPS})
            row["default_ops"] = ops
            row["default"] = "+".join(_SDPA_OPS[o] for o in ops) or "unknown"
            row["ms"]["default"] = timer(step, repeats, window)
            for name, backend in forced.items():
                try:
                    row["ms"][name] = timer(lambda b=backend: step(b), repeats, window)
                except RuntimeError as exc:  # this backend cannot run these inputs here
                    row["errors"][name] = str(exc).splitlines()[0][:200]
            fastest = min(row["ms"], key=lambda k: row["ms"][k] if k != "default" else float("inf"))
            row["fastest"] = fastest
            log.info("sdpa %s mb=%d: default %s %.3f ms, %s", site["site"], mb, row["default"], row["ms"]["default"],
                     ", ".join(f"{k} {v:.3f}" for k, v in row["ms"].items() if k != "default"))
            rows.append(row)
    return {"preset": preset, "img_size": img_size, "mask_ratio": mask_ratio, "device": str(dev), "rows": rows}


def linear_shapes(preset: str, img_size: int = 224, mask_ratio: float = 0.75) -> list[dict[str, Any]]:
    """Distinct (site, in, out, tokens per image) of a preset's linear layers, with their layer count."""
    sites = {s["site"]: int(s["tokens"]) for s in attention_sites(preset, img_size, mask_ratio)}
    seen: dict[tuple[str, int, int], dict[str, Any]] = {}
    for name, i, o in planned_linears(PRESETS[preset]):
        site = "encoder" if name.startswith("blocks.") else "decoder"
        # decoder_embed projects the encoder's (visible) tokens; the rest of the decoder sees all of them
        tokens = sites["encoder"] if site == "encoder" or name == "decoder_embed" else sites["decoder"]
        key = (site, i, o)
        if key not in seen:
            seen[key] = {"site": site, "example": name, "in": i, "out": o, "tokens": tokens, "layers": 0}
        seen[key]["layers"] += 1
    return list(seen.values())


def fp8_shapes(preset: str, micro_batches: list[int], img_size: int = 224, mask_ratio: float = 0.75,
               recipes: tuple[str, ...] = ("tensorwise", "rowwise"), device: str | None = None, emulate: bool = False,
               compile: bool = True, repeats: int = 3, window: int = 10) -> dict[str, Any]:
    """bf16 against float8 time per linear shape (see the module docstring). One compiled module per
    shape and recipe, its row count marked dynamic so the micro-batches share one compilation."""
    from maescale.models.fp8 import _torchao, float8_config

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    _, convert, _ = _torchao()
    timer = _timer(dev)
    rows = []
    for shape in linear_shapes(preset, img_size, mask_ratio):
        i, o = shape["in"], shape["out"]
        fits = i % FP8_DIM_MULTIPLE == 0 and o % FP8_DIM_MULTIPLE == 0
        for variant in ("bf16", *recipes):
            if variant != "bf16" and not fits:
                continue
            torch.manual_seed(0)
            mod = torch.nn.Sequential(torch.nn.GELU(), torch.nn.Linear(i, o, device=dev, dtype=dtype))
            if variant != "bf16":
                convert(mod, config=float8_config(variant, emulate))
            fn = torch.compile(mod) if compile else mod
            for mb in micro_batches:
                m = mb * shape["tokens"]
                row = {**shape, "micro_batch": mb, "rows": m, "variant": variant, "dtype": str(dtype)}
                try:
                    x = torch.randn(m, i, device=dev, dtype=dtype, requires_grad=True)
                    if compile:
                        compat.mark_dynamic(x, 0)
                    g = torch.randn(m, o, device=dev, dtype=dtype)

                    def step(fn=fn, x=x, g=g) -> None:
                        fn(x).backward(g)
                        x.grad = None

                    row["ms"] = timer(step, repeats, window)
                    row["tflops"] = 3 * 2 * m * i * o / (row["ms"] / 1e3) / 1e12  # forward + 2 backward GEMMs
                except Exception as exc:  # noqa: BLE001 - a shape failing must not lose the others
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                rows.append(row)
            for p in mod.parameters():
                p.grad = None
        compat.compiler_reset()
    by_key = {(r["in"], r["out"], r["site"], r["micro_batch"]): r for r in rows if r["variant"] == "bf16" and "ms" in r}
    for r in rows:
        base = by_key.get((r["in"], r["out"], r["site"], r["micro_batch"]))
        if r["variant"] != "bf16" and base and "ms" in r:
            r["speedup_vs_bf16"] = base["ms"] / r["ms"]
    return {"preset": preset, "img_size": img_size, "mask_ratio": mask_ratio, "device": str(dev),
            "compiled": compile, "emulated": emulate, "rows": rows}


def format_sdpa(doc: dict[str, Any]) -> list[str]:
    """Report lines of :func:`sdpa_check`."""
    out = []
    for r in doc.get("rows", []):
        times = ", ".join(f"{k} {v:.3f}" for k, v in r["ms"].items() if k != "default")
        out.append(f"sdpa {r['site']} mb {r['micro_batch']} (hd {r['head_dim']}, {r['tokens']} tokens): picks "
                   f"{r['default']} {r['ms']['default']:.3f} ms; {times} ms"
                   + (f"; cannot: {', '.join(r['errors'])}" if r["errors"] else ""))
    return out


def format_fp8_shapes(doc: dict[str, Any]) -> list[str]:
    """Report lines of :func:`fp8_shapes`: one per shape and micro-batch, speed-up per recipe."""
    groups: dict[tuple, dict[str, Any]] = {}
    for r in doc.get("rows", []):
        g = groups.setdefault((r["site"], r["in"], r["out"], r["micro_batch"]), {"row": r, "v": {}})
        g["v"][r["variant"]] = r
    out = []
    for (site, i, o, mb), g in groups.items():
        base = g["v"].get("bf16", {})
        parts = [f"bf16 {base['ms']:.3f} ms" if "ms" in base else f"bf16 {base.get('error', '-')}"]
        for name, r in g["v"].items():
            if name != "bf16":
                parts.append(f"{name} x{r['speedup_vs_bf16']:.2f}" if "speedup_vs_bf16" in r
                             else f"{name} {r.get('error', '-')}")
        out.append(f"fp8 shape {site} {i}x{o} mb {mb} ({g['row']['rows']} rows, {g['row']['layers']} layers): "
                   + ", ".join(parts))
    return out


def block_kernels(preset: str, micro_batch: int, img_size: int = 224, mask_ratio: float = 0.75,
                  device: str | None = None) -> dict[str, Any]:
    """The kernels inductor generates for one compiled encoder block (forward and backward), by
    name: which of layer norm, residual adds, bias + GELU it fuses (names list the fused aten ops),
    and what stays an extern call (GEMMs, attention)."""
    import re

    from maescale.compat import run_and_get_code

    from maescale.models import create_model

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    site = attention_sites(preset, img_size, mask_ratio)[0]
    model = create_model(preset, img_size=img_size, device="meta")
    blk = model.blocks[0].to_empty(device=dev).to(dtype)
    for p in blk.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(micro_batch, int(site["tokens"]), PRESETS[preset].embed_dim, device=dev, dtype=dtype,
                    requires_grad=True)
    compiled = torch.compile(blk)

    def run() -> None:
        compiled(x).float().square().sum().backward()

    _, codes = run_and_get_code(run)
    out: dict[str, Any] = {"preset": preset, "micro_batch": micro_batch, "device": str(dev)}
    for name, code in zip(("forward", "backward"), codes):
        out[name] = {"kernels": re.findall(r"^(cpp_fused_\w+|triton_\w+) = ", code, re.M),
                     "extern": re.findall(r"(extern_kernels\.\w+|torch\.ops\.aten\.\w+\.\w+)\(", code)}
    compat.compiler_reset()
    return out


def format_block_kernels(doc: dict[str, Any]) -> list[str]:
    """Report lines of :func:`block_kernels`."""
    out = []
    for name in ("forward", "backward"):
        if name in doc:
            k = doc[name]
            out.append(f"compiled encoder block {name}: {len(k['kernels'])} generated kernels "
                       f"({', '.join(k['kernels'])}); extern: {', '.join(k['extern'])}")
    return out
