"""TensorBoard scalars and images, step timing, throughput and MFU; rank 0 writes.

Also :func:`reconstruction_grid`, the picture people judge an MAE by: per sample a row of
original | masked | reconstruction | reconstruction with the visible patches pasted back.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Mapping, Sequence

import torch

from maescale.rundir import TENSORBOARD, atomic_output

log = logging.getLogger(__name__)
_progress = logging.getLogger("maescale.train")  # the step lines belong to the loop's log


class TensorBoardLogger:
    """A ``SummaryWriter`` on rank 0 (other ranks get a no-op), under ``output_dir/tensorboard``."""

    def __init__(self, output_dir: str | Path, enabled: bool):
        self.writer = None
        self.log_dir = Path(output_dir) / TENSORBOARD
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def scalars(self, step: int, values: Mapping[str, float | None]) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(name, value, step)

    def image(self, step: int, tag: str, chw: torch.Tensor) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, chw.clamp(0, 1), step, dataformats="CHW")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class StepTimer:
    """Accumulates data-wait and total step time between log points."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.data_wait = 0.0
        self.steps = 0
        self.images = 0

    def add_data_wait(self, seconds: float) -> None:
        self.data_wait += seconds

    def add_step(self, images: int) -> None:
        self.steps += 1
        self.images += images

    def summary(self, world_size: int, flops_per_image: float | None, peak_flops: float | None) -> dict[str, float | None]:
        """Rates since the last reset; ``images`` counts this rank's images."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        per_gpu = self.images / elapsed
        out: dict[str, float | None] = {
            "perf/step_time_s": elapsed / max(self.steps, 1),
            "perf/images_per_s": per_gpu * world_size,
            "perf/images_per_s_per_gpu": per_gpu,
            "perf/data_wait_fraction": self.data_wait / elapsed,
            "perf/tflops_per_gpu": None,
            "perf/mfu": None,
        }
        if flops_per_image:
            achieved = flops_per_image * per_gpu
            out["perf/tflops_per_gpu"] = achieved / 1e12
            if peak_flops:
                out["perf/mfu"] = achieved / peak_flops
        return out


class FinishLine:
    """When the run will end: the steady-state rate of whole steps by the wall clock (saves,
    evaluation and data waits included, since the remaining steps pay for them too), measured
    from the first report of this process on (the first steps compile and fill caches)."""

    def __init__(self, total_steps: int):
        self.total_steps = total_steps
        self._mark: tuple[int, float] | None = None  # (step, time) the steady-state window starts at

    def restart(self) -> None:
        """Forget the rate (after a rollback: the steps are counted again from there)."""
        self._mark = None

    def update(self, step: int) -> tuple[float, float] | None:
        """(seconds left, projected end as a Unix time) at ``step``, or None before a rate exists."""
        now = time.time()
        if self._mark is None or step <= self._mark[0]:
            self._mark = (step, now)
            return None
        rate = (step - self._mark[0]) / (now - self._mark[1])  # steps per second
        left = max(0, self.total_steps - step) / rate
        return left, now + left


def format_duration(seconds: float) -> str:
    """``2d 03h``, ``3h 05m``, ``4m 10s``, ``12s``."""
    s = int(round(seconds))
    if s >= 86400:
        return f"{s // 86400}d {s % 86400 // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s}s"


class ProgressLog:
    """What rank 0 reports every ``train.log_every`` steps: one log line, the TensorBoard scalars
    (loss, lr, grad norm, throughput, MFU, memory, data counters, time left) and the progress bar's text."""

    def __init__(self, tb: TensorBoardLogger, total_steps: int, world_size: int, model_flops: float,
                 hw_flops: float, peak: float | None, device: torch.device, bar=None, start_step: int = 0):
        self.tb, self.total_steps, self.world_size = tb, total_steps, world_size
        self.model_flops, self.hw_flops, self.peak = model_flops, hw_flops, peak
        self.device, self.bar = device, bar
        self.timer = StepTimer()
        self.finish = FinishLine(total_steps)
        self.history: list[dict[str, float | None]] = []  # the figures of every report, with its step

    def resumed(self, step: int) -> None:
        """The log line of a resume: how much of the run is done, and what is left."""
        left = self.total_steps - step
        _progress.info("resumed at step %d of %d: %.1f%% done, %d steps left", step, self.total_steps,
                       100 * step / max(self.total_steps, 1), left)

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (evaluation) out of the throughput of the current interval."""
        self.timer.start += seconds

    def rolled_back(self, step: int) -> None:
        """The run went back to ``step``: the interval and the finish line start afresh."""
        self.timer.reset()
        self.finish.restart()

    def report(self, step: int, loss: float, lr: float, grad_norm: float | None, epoch: int,
               data_stats: Mapping[str, int], extra: Mapping[str, float] | None = None) -> None:
        """Log the interval since the last report and start a new one."""
        perf = self.timer.summary(self.world_size, self.model_flops, self.peak)
        values: dict[str, float | None] = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                                           "train/epoch": float(epoch), **perf, **(extra or {})}
        if self.hw_flops != self.model_flops and perf["perf/tflops_per_gpu"] is not None:
            values["perf/hardware_tflops_per_gpu"] = perf["perf/tflops_per_gpu"] * self.hw_flops / self.model_flops
        for key, count in data_stats.items():
            values[f"data/{key}"] = float(count)
        if self.device.type == "cuda":
            values["memory/max_allocated_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        eta = self.finish.update(step)
        if eta is not None:
            values["time/remaining_h"] = eta[0] / 3600
            values["time/projected_end_unix"] = eta[1]
        self.tb.scalars(step, values)
        self.history.append({"step": float(step), **values})
        mfu = perf["perf/mfu"]
        line = (f"step {step}/{self.total_steps} loss {loss:.4f} lr {lr:.3g} grad_norm "
                f"{'n/a' if grad_norm is None else f'{grad_norm:.3f}'} img/s {perf['perf/images_per_s']:.1f} "
                f"({perf['perf/images_per_s_per_gpu']:.1f}/gpu) data_wait {100 * perf['perf/data_wait_fraction']:.0f}% "
                f"step {perf['perf/step_time_s'] * 1000:.0f}ms" + (f" mfu {100 * mfu:.1f}%" if mfu is not None else ""))
        if "memory/max_allocated_gb" in values:
            line += f" mem {values['memory/max_allocated_gb']:.1f}GB"
        left = ""
        if eta is not None:
            left = f"left {format_duration(eta[0])}"
            line += f" {left}, ends {time.strftime('%Y-%m-%d %H:%M', time.localtime(eta[1]))}"
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2g}" + (f" {left}" if left else ""))
        _progress.info(line)
        self.timer.reset()


def _denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * s + m).clamp(0, 1)


@torch.no_grad()
def reconstruction_grid(model, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor,
                        mean: Sequence[float], std: Sequence[float], max_rows: int = 8) -> torch.Tensor:
    """A (3, rows*H, 4*W) image in [0, 1]: original | masked | reconstruction | visible+recon.

    ``imgs`` are the normalised model inputs; ``pred`` the model's per-patch prediction (in
    normalised-patch space when ``norm_pix_loss``; :meth:`reconstruct` undoes that with each
    patch's own statistics, as the MAE paper's figures do).
    """
    n = min(max_rows, imgs.shape[0])
    imgs, pred, mask = imgs[:n].float(), pred[:n].float(), mask[:n].float()
    recon = model.reconstruct(imgs, pred)
    p = model.patch_size
    pix_mask = mask.repeat_interleave(p * p * imgs.shape[1], dim=1).view(n, -1, p * p * imgs.shape[1])
    pix_mask = model.unpatchify(pix_mask)  # 1 where masked
    masked = imgs * (1 - pix_mask)
    pasted = imgs * (1 - pix_mask) + recon * pix_mask
    cols = [_denormalize(t, mean, std) for t in (imgs, masked, recon, pasted)]
    cols[1] = cols[1] * (1 - pix_mask) + 0.5 * pix_mask  # masked patches shown grey
    rows = torch.cat(cols, dim=3)  # (n, 3, H, 4W)
    return torch.cat(list(rows), dim=1).cpu()  # (3, nH, 4W)


def save_png(chw: torch.Tensor, path: str | Path) -> Path:
    """Write a CHW float image in [0, 1] as PNG (atomically)."""
    from PIL import Image

    arr = (chw.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    path = Path(path)
    with atomic_output(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
    return path
