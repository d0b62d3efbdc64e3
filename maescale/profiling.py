"""What a few training steps cost on the host and on the device, counted with ``torch.profiler``.

Used by the loop (``train.profile_at``: profile ``train.profile_steps`` steps of the real run and
log a summary) and by the benchmarks (bare step vs engine step). Counts per step:

* ``kernel_launches``: CUDA runtime/driver launch calls (``cudaLaunchKernel``, ``cuLaunchKernel``,
  ``cudaGraphLaunch``, ...); a replayed CUDA graph counts once;
* ``aten_ops``: every ``aten::`` operator call the profiler records, nested ones included (an
  ``aten::linear`` and the ``aten::addmm`` under it count twice): a measure of host-side work that
  is the same on a CPU and a GPU machine;
* ``host_ms``: wall-clock time per step as the host saw it (the device synchronised at the end);
* ``device_busy_ms``: the union of the intervals in which a GPU kernel ran, and
  ``device_idle_fraction`` = 1 - busy / wall: the share of the step the GPU waited for the host;
* ``comm`` (the loop's profile only): every collective of the profiled steps, per step by group
  and kind (:mod:`maescale.commlog`); rank 0 logs every rank's and ``RUN/profile/comm.json`` holds
  them, with each rank's calls in ``RUN/profile/comm_rank_<R>.json``.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import torch

_LAUNCH_NAMES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchCooperativeKernel", "cudaGraphLaunch",
                 "cuGraphLaunch", "cudaLaunchKernelExC", "cuLaunchKernelEx")


@dataclass
class StepProfile:
    """Per-step averages over ``steps`` profiled steps."""

    steps: int
    host_ms: float
    aten_ops: float
    kernel_launches: float | None  # None on a CPU
    device_busy_ms: float | None
    device_idle_fraction: float | None
    comm: dict[str, Any] | None = None  # this rank's collectives per step (maescale.commlog.summarize_calls)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        text = f"{self.aten_ops:.0f} aten ops/step, host {self.host_ms:.1f} ms/step"
        if self.kernel_launches is not None:
            text += (f", {self.kernel_launches:.0f} kernel launches/step, GPU busy {self.device_busy_ms:.1f} ms/step "
                     f"(idle {100 * (self.device_idle_fraction or 0):.0f}%)")
        return text


def _busy_us(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of ``(start, end)`` intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def _is_launch(name: str) -> bool:
    return name.startswith(_LAUNCH_NAMES)


def summarize(prof: Any, steps: int, wall_s: float) -> StepProfile:
    """A :class:`StepProfile` of a finished ``torch.profiler.profile`` that covered ``steps`` steps
    in ``wall_s`` seconds."""
    events = prof.events()
    aten = sum(1 for e in events if e.name.startswith("aten::"))
    cuda = any(getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA for e in events)
    launches = busy = idle = None
    if cuda:
        launches = sum(1 for e in events if _is_launch(e.name)) / steps
        kernels = [(e.time_range.start, e.time_range.end) for e in events
                   if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start]
        busy = _busy_us(kernels) / 1e3 / steps
        idle = max(0.0, 1.0 - busy / (1e3 * wall_s / steps))
    return StepProfile(steps, 1e3 * wall_s / steps, aten / steps, launches, busy, idle)


class StepProfiler:
    """Profiles steps ``start + 1 .. start + steps`` of a loop (``start`` None: never).

    Call :meth:`before_step` with the number of steps done before each step and :meth:`after_step`
    after it; the latter returns the :class:`StepProfile` once the window has ended. With
    ``run_path`` (the training loop) the window also records every collective
    (:class:`maescale.commlog.CommRecorder`, handed to the step as ``recorder``).
    """

    def __init__(self, device: torch.device, start: int | None, steps: int, run_path: Any = None, rank: int = 0,
                 group: Any = None):
        self.device, self.start, self.steps = device, start, steps
        self.run_path, self.rank, self.group = run_path, rank, group
        self._prof: Any = None
        self._comm: Any = None
        self._t0 = 0.0

    def before_step(self, done: int, stepper: Any = None) -> None:
        if self._comm is not None:
            self._comm.step = done + 1
        if self.start is None or done != self.start or self._prof is not None:
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self._sync()
        if self.run_path is not None:
            from maescale.commlog import CommRecorder

            self._comm = CommRecorder(self.group).__enter__()
            self._comm.step = done + 1
            if stepper is not None:
                stepper.recorder = self._comm
                self._comm.attach(stepper.model)
        self._prof = profile(activities=activities)
        self._prof.start()
        self._t0 = time.perf_counter()

    def after_step(self, done: int, stepper: Any = None, settle: Any = None) -> StepProfile | None:
        """``settle``: waits for the asynchronous collectives still in flight, which must finish
        before the profiler stops (a gloo work recorded by the profiler and finished after it
        stopped was seen to crash the process)."""
        if self._prof is None or done != self.start + self.steps:
            return None
        if settle is not None:
            settle()
        self._sync()
        wall = time.perf_counter() - self._t0
        self._prof.stop()
        result = summarize(self._prof, self.steps, wall)
        self._prof = None
        if self._comm is not None:
            self._comm.__exit__(None, None, None)
            if stepper is not None:
                stepper.recorder = None
            result.comm = self._report_comm(self._comm)
            self._comm = None
        return result

    def _report_comm(self, recorder: Any) -> dict[str, Any]:
        """This rank's collectives per step; every rank's logged by rank 0 and written under
        ``RUN/profile`` (one blocking exchange on the control group, at the end of the window)."""
        import logging

        from maescale.commlog import calls_as_dicts, format_summary, summarize_calls
        from maescale.rundir import RunDir, write_json_atomic

        calls = recorder.finish()
        mine = summarize_calls(calls, self.steps)
        out = RunDir(self.run_path).path / "profile"
        write_json_atomic(out / f"comm_rank_{self.rank}.json", {"rank": self.rank, "steps": self.steps,
                                                                "calls": calls_as_dicts(calls)})
        import torch.distributed as dist

        every = [mine]
        if dist.is_initialized() and dist.get_world_size() > 1:
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, mine, group=self.group)
        if self.rank == 0:
            log = logging.getLogger("maescale.train")
            log.info("collectives per step (steps %d-%d):", self.start + 1, self.start + self.steps)
            for r, summary in enumerate(every):
                for line in format_summary(r, summary):
                    log.info("  %s", line)
            write_json_atomic(out / "comm.json", {"steps": [self.start + 1, self.start + self.steps],
                                                  "ranks": every}, indent=1)
        return mine

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@contextmanager
def profiled(device: torch.device, steps: int) -> Iterator[Callable[[], StepProfile]]:
    """``with profiled(device, n) as result: <n steps>``; then ``result()`` is their
    :class:`StepProfile` (the device is synchronised before and after)."""
    profiler = StepProfiler(device, 0, steps)
    out: list[StepProfile] = []
    profiler.before_step(0)
    yield lambda: out[0]
    result = profiler.after_step(steps)
    assert result is not None
    out.append(result)
