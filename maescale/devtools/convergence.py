"""Does FP8 train like bf16? Loss curves of the real loop, bf16 against each FP8 recipe.

:func:`run_convergence` runs ``maescale.train.main`` once per variant on the same config, seed and
shards (so the same initial weights, data order and masks: the loop is deterministic given the seed,
as its bitwise-resume tests show) with ``train.log_every=1``, and keeps the loss of every step. The
bf16 baseline runs twice by default: the gap between its two runs is the run-to-run noise floor
(zero on a CPU; on a GPU non-deterministic kernels, e.g. atomics in attention backward, make it
non-zero), the yardstick for the FP8 gaps.

:func:`compare` reports per FP8 recipe the largest gap to bf16: per step (absolute) and of the
curves smoothed over ``smooth`` steps (relative to bf16), and the gap of the mean loss over the
last tenth of the steps. :func:`draw_curves` draws the curves as a PNG with PIL (no plotting
library is a dependency).
"""

from __future__ import annotations

import gc
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from maescale import compat

log = logging.getLogger(__name__)

BASELINE = "bf16"
COLOURS = {"bf16": (40, 40, 40), "bf16 (repeat)": (150, 150, 150), "tensorwise": (214, 39, 40),
           "rowwise": (31, 119, 180)}


def run_variant(config: str, name: str, steps: int, micro_batch: int, shards: str, overrides: Sequence[str],
                workdir: str | None = None) -> dict[str, Any]:
    """One training run of ``steps`` steps; returns its per-step losses (or the error)."""
    from maescale.config import load_config
    from maescale.train import main

    out = tempfile.mkdtemp(prefix="convergence-", dir=workdir)
    t0 = time.perf_counter()
    res: dict[str, Any] = {"variant": name, "overrides": list(overrides), "status": "ok"}
    try:
        ov = [f"output_dir={out}", "resume=false", f"train.micro_batch_size={micro_batch}", "train.grad_accum_steps=1",
              f"train.max_steps={steps}", "train.epochs=null", "train.log_every=1", "train.image_every=0",
              "train.progress_bar=off", "checkpoint.every_steps=0", "checkpoint.every_minutes=0",
              "checkpoint.final=false", f"data.train_shards={shards}", "data.num_samples=null",
              "data.sizes_file=null", "data.synthetic=false", f"optim.warmup_steps={max(1, steps // 10)}"]
        cfg = load_config(config, ov + list(overrides))
        result = main(cfg)
        history = sorted(result.perf or [], key=lambda p: p["step"])
        res["steps"] = [int(p["step"]) for p in history]
        res["loss"] = [float(p["train/loss"]) for p in history]
        rates = [p.get("perf/images_per_s_per_gpu") for p in history[len(history) // 2:]]
        rates = [r for r in rates if r]
        res["images_per_s"] = sorted(rates)[len(rates) // 2] if rates else None
        res["model"], res["precision"] = cfg.model.name, cfg.train.precision
        if res["steps"] != list(range(1, steps + 1)):
            raise RuntimeError(f"expected a loss for each of the {steps} steps, got {len(res['steps'])}")
    except Exception as exc:  # a variant failing must not lose the others' curves
        log.exception("convergence variant %s failed", name)
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        res["status"], res["reason"] = "error", f"{type(exc).__name__}: {first}"
    finally:
        shutil.rmtree(out, ignore_errors=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        compat.compiler_reset()
        res["seconds"] = time.perf_counter() - t0
    return res


def run_convergence(config: str, steps: int, micro_batch: int, shards: str,
                    recipes: Sequence[str] = ("tensorwise", "rowwise"), overrides: Sequence[str] = (),
                    fp8_overrides: Sequence[str] = (), baseline_twice: bool = True, smooth: int = 20,
                    workdir: str | None = None) -> dict[str, Any]:
    """bf16 (twice with ``baseline_twice``) and each FP8 recipe, then :func:`compare`."""
    plan = [(BASELINE, ["model.fp8=off"])]
    if baseline_twice:
        plan.append((f"{BASELINE} (repeat)", ["model.fp8=off"]))
    plan += [(r, [f"model.fp8={r}", *fp8_overrides]) for r in recipes]
    curves = []
    for name, extra in plan:
        log.info("convergence: %s (%d steps) ...", name, steps)
        curves.append(run_variant(config, name, steps, micro_batch, shards, [*overrides, *extra], workdir))
    return {"config": config, "steps": steps, "micro_batch": micro_batch, "smooth": smooth, "curves": curves,
            "gaps": compare(curves, smooth)}


def smoothed(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average (the first ``window - 1`` points average what there is)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def compare(curves: Sequence[dict[str, Any]], smooth: int = 20) -> dict[str, dict[str, Any]]:
    """Largest gaps of every curve to the bf16 baseline (see the module docstring)."""
    base = next((c for c in curves if c["variant"] == BASELINE and c["status"] == "ok"), None)
    if base is None:
        return {}
    b = base["loss"]
    bs = smoothed(b, smooth)
    tail = max(1, len(b) // 10)
    out = {}
    for c in curves:
        if c is base or c["status"] != "ok" or len(c["loss"]) != len(b):
            continue
        x = c["loss"]
        xs = smoothed(x, smooth)
        raw = [abs(u - v) for u, v in zip(x, b)]
        rel = [abs(u - v) / abs(v) if v else math.inf for u, v in zip(xs, bs)]
        worst = max(range(len(rel)), key=rel.__getitem__)
        out[c["variant"]] = {
            "max_abs_gap": max(raw), "max_abs_gap_step": c["steps"][max(range(len(raw)), key=raw.__getitem__)],
            "max_rel_gap_smoothed": rel[worst], "max_rel_gap_smoothed_step": c["steps"][worst],
            "final_mean_loss": sum(x[-tail:]) / tail, "baseline_final_mean_loss": sum(b[-tail:]) / tail,
            "final_rel_gap": (sum(x[-tail:]) - sum(b[-tail:])) / abs(sum(b[-tail:])),
        }
    return out


def format_convergence(doc: dict[str, Any]) -> str:
    """A short table of the curves and their gaps."""
    lines = [f"{'variant':<16}{'status':<8}{'first loss':>11}{'last loss':>10}{'img/s':>9}{'s':>6}"
             f"{'max |gap|':>10}{'max rel gap (smoothed)':>24}{'final rel gap':>14}"]
    gaps = doc.get("gaps", {})
    for c in doc["curves"]:
        if c["status"] != "ok":
            lines.append(f"{c['variant']:<16}{c['status']:<8}{c.get('reason')}")
            continue
        g = gaps.get(c["variant"])
        head = (f"{c['variant']:<16}{'ok':<8}{c['loss'][0]:>11.4f}{c['loss'][-1]:>10.4f}"
                f"{c['images_per_s'] or 0:>9.1f}{c['seconds']:>6.0f}")
        if not g:
            lines.append(head + f"{'(baseline)':>11}")
            continue
        rel = f"{100 * g['max_rel_gap_smoothed']:.2f}% @ {g['max_rel_gap_smoothed_step']}"
        lines.append(head + f"{g['max_abs_gap']:>10.4f}{rel:>24}{100 * g['final_rel_gap']:>13.2f}%")
    return "\n".join(lines)


def draw_curves(doc: dict[str, Any], path: str | Path, width: int = 960, height: int = 560) -> None:
    """The loss curves (thin: per step; thick: smoothed) as a PNG, written atomically."""
    from PIL import Image, ImageDraw, ImageFont

    from maescale.rundir import atomic_output

    curves = [c for c in doc["curves"] if c["status"] == "ok"]
    if not curves:
        raise ValueError("no successful curve to draw")
    smooth = int(doc.get("smooth", 20))
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 70, width - 20, 40, height - 50
    ys = [v for c in curves for v in c["loss"]]
    lo, hi = min(ys), max(ys)
    hi = hi if hi > lo else lo + 1.0
    n = max(len(c["loss"]) for c in curves)

    def px(i: int, v: float) -> tuple[float, float]:
        return (left + (right - left) * i / max(1, n - 1), bottom - (bottom - top) * (v - lo) / (hi - lo))

    d.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    for k in range(6):  # y ticks
        v = lo + (hi - lo) * k / 5
        y = px(0, v)[1]
        d.line([left - 4, y, left, y], fill=(0, 0, 0))
        d.line([left + 1, y, right - 1, y], fill=(235, 235, 235))
        d.text((5, y - 6), f"{v:.4f}", fill=(0, 0, 0), font=font)
    for k in range(6):  # x ticks (steps)
        i = round((n - 1) * k / 5)
        x = px(i, lo)[0]
        d.line([x, bottom, x, bottom + 4], fill=(0, 0, 0))
        d.text((x - 10, bottom + 8), str(i + 1), fill=(0, 0, 0), font=font)
    d.text(((left + right) // 2 - 15, height - 20), "step", fill=(0, 0, 0), font=font)
    model = curves[0].get("model", "")
    d.text((left, 12), f"training loss, {model}, micro-batch {doc.get('micro_batch')}, {doc.get('steps')} steps "
           f"(thick: mean of {smooth} steps)", fill=(0, 0, 0), font=font)
    for idx, c in enumerate(curves):
        colour = COLOURS.get(c["variant"], (44, 160, 44))
        faint = tuple(int(255 - (255 - ch) * 0.35) for ch in colour)
        d.line([px(i, v) for i, v in enumerate(c["loss"])], fill=faint, width=1)
        d.line([px(i, v) for i, v in enumerate(smoothed(c["loss"], smooth))], fill=colour, width=3)
        g = doc.get("gaps", {}).get(c["variant"])
        label = c["variant"] + (f": max gap {100 * g['max_rel_gap_smoothed']:.2f}% (smoothed)" if g else "")
        ly = top + 10 + 16 * idx
        d.line([right - 330, ly + 6, right - 305, ly + 6], fill=colour, width=3)
        d.text((right - 298, ly), label, fill=(0, 0, 0), font=font)
    with atomic_output(path, keep_suffix=True) as tmp:
        img.save(tmp, format="PNG")
