"""What all ranks must decide together at step boundaries: stop, save, roll back.

Each rank knows things the others do not: it got a stop signal, its clock says a time-based
save is due, its lock heartbeat saw a takeover (rank 0), its log-step loss. :class:`Control`
collects them after every step and the ranks agree on them with ONE asynchronous all-reduce on
the CPU control group: the sum of this step's values is started now and read after the next
step, when it has long arrived. So no step pays for a blocking round trip over all ranks (on 128
ranks a ring of ~254 TCP hops) and no rank waits for the slowest there; the price is that a
decision takes effect one step late (a stop signal checkpoints at the step after it arrived:
well within the seconds SLURM gives). Every rank reads the same sums at the same step, so every
rank takes the same decision.

To add a condition on which the ranks must act together: add a value to :meth:`Control.after_step`'s
``local`` list and read its sum in :class:`Decision`.
"""

from __future__ import annotations

import logging
import math
import signal
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

log = logging.getLogger("maescale.train")


class StopSignals:
    """Turns SIGTERM / SIGUSR1 (and ``extra``) into a flag the loop polls, so the loop can save
    and stop cleanly; nothing is saved inside a signal handler."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, enabled: bool, extra: Sequence[int] = ()):
        self.received: int | None = None
        self.history: list[int] = []  # all of them: the launcher requeues only on its own signal
        self._previous: dict[int, Any] = {}
        if enabled:
            for sig in (*self.SIGNALS, *extra):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        self.history.append(signum)

    @property
    def requested(self) -> bool:
        return self.received is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Agreement:
    """One value vector summed over the ranks of ``group`` per call, read one call later."""

    def __init__(self, group: Any, world_size: int):
        self.group, self.world = group, world_size
        self._pending: tuple[Any, Any] | None = None  # (work, tensor)

    def exchange(self, values: list[float]) -> list[float] | None:
        """Start summing ``values`` over the ranks; return the sums started by the previous call
        (None on the first call). A single process gets its own values back at once."""
        if self.world == 1:
            return list(values)
        import torch
        import torch.distributed as dist

        previous = self.result()
        t = torch.tensor(values, dtype=torch.float64)
        self._pending = (dist.all_reduce(t, group=self.group, async_op=True), t)
        return previous

    def result(self) -> list[float] | None:
        """Wait for the sums in flight (if any) and return them."""
        if self._pending is None:
            return None
        work, t = self._pending
        if work is not None:
            work.wait()
        self._pending = None
        return t.tolist()

    def settle(self) -> None:
        """Let the sums in flight arrive now (kept for :meth:`result`): the profiler must not stop
        while an asynchronous collective it recorded is still running (torch's profiler and gloo's
        asynchronous work crash together otherwise)."""
        if self._pending is not None and self._pending[0] is not None:
            self._pending[0].wait()
            self._pending = (None, self._pending[1])


@dataclass
class Decision:
    """What the ranks agreed on at one step (identical on every rank)."""

    step: int  # the step whose values were agreed on
    stop: bool = False  # some rank got a stop signal
    save_time: bool = False  # some rank's clock says a time-based save is due
    lock_lost: bool = False  # rank 0's lock was taken over
    rollback: str | None = None  # why the run must roll back (None: it must not)
    rollback_onset: int | None = None  # the first step of the trouble (the rollback goes before it)
    loss: float | None = None  # the mean over ranks of the log-step loss, when one was sent


@dataclass
class SpikeDetector:
    """A loss spike: the ranks' mean loss at ``patience`` consecutive log steps above ``factor`` x
    the median of the last ``window`` log-step losses (armed once ``window`` of them exist)."""

    factor: float
    window: int
    patience: int
    history: deque = field(default_factory=deque)
    streak: list[int] = field(default_factory=list)  # log steps of the current run of high losses

    def update(self, step: int, loss: float) -> str | None:
        """Feed one agreed log-step loss; returns the reason when the spike persists."""
        if not math.isfinite(loss):
            return None  # non-finite steps are counted and acted on by the non-finite guard
        if len(self.history) >= self.window:
            median = statistics.median(self.history)
            if loss > self.factor * median:
                self.streak.append(step)
                if len(self.streak) >= self.patience:
                    return (f"loss spike: {loss:.4g} at step {step}, above {self.factor:g} x the median {median:.4g} "
                            f"of the last {self.window} log steps for {len(self.streak)} log steps in a row "
                            f"(since step {self.streak[0]})")
                return None  # a high loss does not enter the baseline
        self.streak = []
        self.history.append(loss)
        if len(self.history) > self.window:
            self.history.popleft()
        return None

    def onset(self) -> int | None:
        """The first log step of the current spike (the rollback goes to a checkpoint before it)."""
        return self.streak[0] if self.streak else None

    def reset(self) -> None:
        self.streak = []


class Control:
    """Collects each rank's facts after a step and turns the agreed sums into a :class:`Decision`."""

    def __init__(self, cfg: Any, group: Any, world_size: int, signals: StopSignals, lock: Any):
        self.cfg, self.signals, self.lock = cfg, signals, lock
        self.agreement = Agreement(group, world_size)
        self.world = world_size
        self.last_save = time.monotonic()
        t = cfg.train
        self.spikes = SpikeDetector(t.spike_factor, t.spike_window, t.spike_patience) if t.rollback else None
        self._diverged_at: int | None = None  # the step a non-finite streak began, when it is too long
        self._sent_step: int | None = None

    def saved(self) -> None:
        """A checkpoint was just written: the time-based save clock restarts."""
        self.last_save = time.monotonic()

    def diverged(self, streak_start: int) -> None:
        """This rank read a non-finite streak of ``train.max_nonfinite_steps`` (the same on every rank)."""
        self._diverged_at = streak_start

    def after_step(self, step: int, log_loss: float | None) -> Decision | None:
        """Send this step's facts; returns the decision on the previous step's (None at the first)."""
        every = self.cfg.checkpoint.every_minutes
        time_due = every > 0 and time.monotonic() - self.last_save >= 60 * every
        local = [float(self.signals.requested), float(time_due), float(getattr(self.lock, "lost", False)),
                 0.0 if log_loss is None else log_loss, 0.0 if log_loss is None else 1.0,
                 -1.0 if self._diverged_at is None else float(self._diverged_at)]
        sums = self.agreement.exchange(local)
        sent, self._sent_step = self._sent_step, step
        if self.world == 1:
            sent = step
        if sums is None or sent is None:
            return None
        return self._decide(sent, sums)

    def finish(self) -> Decision | None:
        """The decision on the last values sent (at the end of the loop: nothing may stay in flight)."""
        sums = self.agreement.result()
        return None if sums is None or self._sent_step is None else self._decide(self._sent_step, sums)

    def _decide(self, step: int, sums: list[float]) -> Decision:
        stop, time_due, lost, loss_sum, loss_count, diverged = sums
        d = Decision(step, stop=stop > 0, save_time=time_due > 0, lock_lost=lost > 0)
        if loss_count > 0:
            d.loss = loss_sum / loss_count
        if diverged > -self.world:  # some rank sent a streak start (all ranks read the same counters)
            d.rollback = f"{self.cfg.train.max_nonfinite_steps} consecutive steps with non-finite loss or gradients"
            d.rollback_onset = self._diverged_at if self._diverged_at is not None else step
        elif self.spikes is not None and d.loss is not None:
            d.rollback = self.spikes.update(step, d.loss)
            onset = self.spikes.onset()
            if d.rollback is not None and onset is not None:
                # the spike's first log step ends an interval of log_every steps: the trouble may
                # have begun anywhere in it
                d.rollback_onset = onset - self.cfg.train.log_every + 1
        return d

    def rolled_back(self) -> None:
        """The run went back to a checkpoint: forget the streak and spike that led there."""
        self._diverged_at = None
        if self.spikes is not None:
            self.spikes.reset()
