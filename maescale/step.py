"""One optimizer step of the loop: the micro-batches' forward and backward, the gradient
communication, and the update guarded against non-finite values.

:func:`build_step` picks one of two ways to run it; the loop only sees :class:`TrainStep`'s
``forward_backward`` / ``step`` / ``read``:

* :class:`FlatZeroStep` (ZeRO-1, ``deepspeed.lean_step`` on, the default): maescale runs the step
  itself around DeepSpeed's partitioned optimizer state. Gradients accumulate in flat buffers and
  are reduce-scattered in buckets during backward; each rank's fp32 partition is updated by the
  fused AdamW; the new partitions are all-gathered back and awaited layer by layer in the next
  forward (:mod:`maescale.gradsync`). DeepSpeed keeps the optimizer state, the checkpoint format
  and universal conversion.
* :class:`DeepSpeedStep`: ``engine.backward`` / ``engine.step`` (ZeRO-2, ZeRO-3, clipping). With
  the lean step (ZeRO-2 without clipping) DeepSpeed's per-parameter overflow scan and host-side
  norm are off and the guard below replaces them.

The guard (both lean paths): at the accumulation boundary one multi-tensor norm of this rank's
gradient partition, accumulated in fp32, summed over the data-parallel ranks on the device, gives
the global grad norm (logged at log steps) and the finiteness flag, which goes to the fused
AdamW as ``found_inf``: a step with a non-finite loss or gradient anywhere leaves weights and Adam
state untouched on every rank, without a host synchronisation. Every rank reaches the same
collectives whatever its gradients hold; a condition that must stop the job (a rank without
gradients) is carried in the same all-reduce and raised on every rank at the next log step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from maescale import compat
from maescale.faults import maybe_poison_grads

log = logging.getLogger(__name__)


class StepError(RuntimeError):
    """The step cannot go on (the same on every rank: read from an all-reduced flag)."""


@dataclass
class StepHealth:
    """Non-finite steps as read at a log step (one host sync): totals since the start of this
    process, the streak ending at the last step, and the longest streak since the last read."""

    skipped_total: int
    streak: int
    worst_streak: int
    new: int  # skipped since the previous read


class TrainStep:
    """The optimizer step of the loop. Per step: ``forward_backward`` once per micro-batch
    (``last=True`` on the last), then ``step``. Counters of skipped steps live on the device and
    are read by :meth:`read` at log steps."""

    lean = True
    recorder: Any = None  # a maescale.commlog.CommRecorder while the loop profiles (marks backward)

    def __init__(self, engine: Any, grad_accum_steps: int, device: torch.device):
        self.engine, self.accum, self.device = engine, grad_accum_steps, device
        self.model = engine.module
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self._sq_norm: torch.Tensor | None = None
        self._counts = torch.zeros(3, device=device)  # total, streak, worst streak since the last read
        self._missing = torch.zeros((), device=device)  # ranks that held no gradients (lean DeepSpeed path)
        self._read_total = 0

    def forward_backward(self, imgs: torch.Tensor, noise: torch.Tensor, last: bool) -> tuple[torch.Tensor, ...]:
        """Forward and backward of one micro-batch; returns ``(loss, pred, mask)``."""
        raise NotImplementedError

    def step(self, step: int) -> None:
        """The update at the accumulation boundary (``step``: the 1-based step it completes)."""
        raise NotImplementedError

    def wait_params(self) -> None:
        """Make the model's weights current (before a checkpoint, evaluation, pictures)."""

    def reset_health(self) -> None:
        """Forget the non-finite counters (after a rollback, which undid those steps)."""
        self._counts.zero_()
        self._read_total = 0

    def _backward(self, backward: Any, loss: torch.Tensor, last: bool) -> None:
        if last and self.recorder is not None:
            self.recorder.backward_start()
            backward(loss)
            self.recorder.backward_end()
        else:
            backward(loss)

    def close(self) -> None:
        """Finish what is in flight."""
        self.wait_params()

    def _count(self, skipped: torch.Tensor) -> None:
        total, streak, worst = self._counts.unbind()
        streak = (streak + skipped) * skipped  # back to 0 on an applied step
        self._counts = torch.stack([total + skipped, streak, torch.maximum(worst, streak)])

    def _guard(self, grads: list[torch.Tensor], group: Any, step: int) -> torch.Tensor:
        """The global squared norm of ``grads`` (this rank's partitions; fp32 accumulation) summed
        over ``group``, and the found-inf flag from it. Every rank enters the all-reduce."""
        grads = maybe_poison_grads(grads, step, self.rank)  # fault injection for tests; a no-op otherwise
        missing = torch.zeros((), device=self.device) if grads else torch.ones((), device=self.device)
        sq = torch.stack(compat.fp32_norms(grads)).square().sum() if grads else torch.zeros((), device=self.device)
        both = torch.stack([sq, missing])
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(both, group=group)  # on the device stream: no host sync
        sq, missing = both.unbind()
        self._sq_norm = sq
        self._missing = torch.maximum(self._missing, missing)
        # A NaN/inf anywhere makes the sum non-finite; so does a rank without gradients.
        return ((~torch.isfinite(sq)) | (missing > 0)).float()

    def grad_norm(self) -> float | None:
        """The global grad norm of the last optimizer step (a host sync: call at log steps)."""
        return None if self._sq_norm is None else float(self._sq_norm.sqrt())

    def read(self) -> StepHealth:
        """The non-finite counters (a host sync: call at log steps); resets the worst streak.
        Raises :class:`StepError` on every rank if any rank held no gradients at a boundary."""
        if float(self._missing):
            raise StepError("a data-parallel rank held no gradients at the accumulation boundary (DeepSpeed's ZeRO "
                            "optimizer did not reduce them): the update was skipped on every rank and the job stops. "
                            "Set deepspeed.lean_step=false to use DeepSpeed's own step, and report this")
        total, streak, worst = (int(x) for x in self._counts.tolist())
        self._counts[2] = self._counts[1]
        health = StepHealth(total, streak, worst, total - self._read_total)
        self._read_total = total
        return health


class FlatZeroStep(TrainStep):
    """ZeRO-1: maescale's gradient path around DeepSpeed's partitioned optimizer (module docstring)."""

    def __init__(self, engine: Any, grad_accum_steps: int, device: torch.device, group_names: list[str],
                 await_per_layer: bool = True):
        from maescale.gradsync import FlatGradSync

        super().__init__(engine, grad_accum_steps, device)
        self.zero = engine.optimizer
        self.client = compat.client_optimizer(self.zero)
        compat.set_found_inf(self.client, torch.zeros((), device=device))
        self.sync = FlatGradSync(self.zero, group_names)
        self.group = self.sync.buckets[0].group.process_group
        self.world = self.sync.world
        for b in self.sync.buckets:  # fp32 gradient of each master partition, reused every step
            b.group.master.grad = torch.zeros_like(b.group.master)
        # The next forward waits per layer for the gathered parameters (not under a whole-model
        # torch.compile, which cannot trace a wait: there the step waits before the forward).
        self.per_layer = await_per_layer
        if await_per_layer:
            self.model.param_waiter = self.sync.await_module
        self._linked = False
        self._micro = 0

    def forward_backward(self, imgs: torch.Tensor, noise: torch.Tensor, last: bool) -> tuple[torch.Tensor, ...]:
        if not self.per_layer:
            self.sync.wait_params()
        self.sync.start_micro_batch(last)
        loss, pred, mask = self.model(imgs, noise=noise)
        self._backward(lambda x: (x / self.accum if self.accum > 1 else x).backward(), loss, last)
        if last:
            self.sync.finish_backward()
        self._micro += 1
        return loss, pred, mask

    def step(self, step: int) -> None:
        shards = self.sync.reduced()
        grads = []
        for b, shard in zip(self.sync.buckets, shards):
            g = b.group.master.grad
            g.copy_(shard)
            if self.world > 1:
                g.mul_(1.0 / self.world)  # the sum over ranks -> their mean
            grads.append(g)
        skipped = self._guard(grads, self.group, step)
        compat.set_found_inf(self.client, skipped)
        self.client.step()
        if not self._linked:
            compat.link_optimizer_state(self.zero)
            self._linked = True
        with torch.no_grad():
            for b in self.sync.buckets:
                b.group.partitions[self.sync.rank].copy_(b.group.master)
        self.sync.gather_params()
        self._count(skipped)
        e = self.engine  # DeepSpeed's own counters, which its checkpoints record
        e.global_steps += 1
        e.global_samples += e.train_batch_size()
        e.micro_steps += self._micro
        self._micro = 0

    def wait_params(self) -> None:
        self.sync.wait_params()

    def close(self) -> None:
        self.sync.close()
        self.model.param_waiter = None


class DeepSpeedStep(TrainStep):
    """``engine.backward`` + ``engine.step``; with ``lean`` (ZeRO-2 without clipping) the guard of
    the module docstring replaces DeepSpeed's overflow check and host-side norm."""

    def __init__(self, engine: Any, grad_accum_steps: int, device: torch.device, lean: bool):
        super().__init__(engine, grad_accum_steps, device)
        self.lean = lean
        self.zero = engine.optimizer
        if lean:
            self.client = compat.client_optimizer(self.zero)
            compat.set_found_inf(self.client, torch.zeros((), device=device))
            self.group = compat.zero_dp_group(self.zero)
        self._flag = torch.zeros((), device=device)

    def forward_backward(self, imgs: torch.Tensor, noise: torch.Tensor, last: bool) -> tuple[torch.Tensor, ...]:
        loss, pred, mask = self.engine(imgs, noise=noise)
        self._backward(self.engine.backward, loss, last)
        if not last:
            self.engine.step()  # DeepSpeed counts micro-steps in step(); it updates only at the boundary
        return loss, pred, mask

    def step(self, step: int) -> None:
        if self.lean:
            skipped = self._guard(compat.zero_reduced_gradients(self.zero), self.group, step)
            compat.set_found_inf(self.client, skipped)
        self.engine.step()
        if not self.lean:
            skipped = self._flag.fill_(float(not self.engine.was_step_applied())).clone()
        self._count(skipped)

    def grad_norm(self) -> float | None:
        if self.lean:
            return super().grad_norm()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else None


def build_step(cfg: Any, engine: Any, device: torch.device, group_names: list[str]) -> TrainStep:
    """The :class:`TrainStep` for this config (see the module docstring)."""
    from maescale.config import lean_step_applies

    lean = lean_step_applies(cfg)
    accum = cfg.train.grad_accum_steps
    if lean and cfg.deepspeed.zero_stage == 1:
        # a whole-model compile cannot trace the per-layer waits: there the step waits before the forward
        per_layer = cfg.model.compile not in ("full", "full_regions")
        return FlatZeroStep(engine, accum, device, group_names, await_per_layer=per_layer)
    return DeepSpeedStep(engine, accum, device, lean)
