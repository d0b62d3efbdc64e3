"""The stall watchdog: a rank that stops making progress ends the job in minutes, with evidence.

A rank that hangs (an NFS stall, a deadlocked data worker, a GPU that stops answering, a peer
stuck in a collective) would otherwise be noticed only by the collective timeout
(``deepspeed.timeout_minutes``, 30 by default), and the job would die without saying where.
Every rank records its progress (step and phase) with two attribute writes per phase; a daemon
thread compares it with the clock. When no progress happens for ``train.stall_timeout_s`` (longer
budgets for the phases that are slow by nature: the first steps (compilation), checkpoint
saves, evaluation, a rollback), the thread

1. dumps every Python thread's stack of this rank (``faulthandler``) into
   ``RUN/stalls/<attempt>/rank_<R>.txt``, and on GPUs the NCCL flight recorder's trace of the
   last collectives into ``nccl_rank_<R>.pkl`` beside it (the collective timeout's own dump would
   never fire: the watchdog ends the job first);
2. reads every rank's last published progress (``RUN/attempts/<attempt>/progress/rank_<R>.json``,
   rewritten by each watchdog thread every few seconds, off the training thread) and names the
   rank(s) furthest behind and their hosts in one log line and in ``stall_rank_<R>.json``;
3. raises a flag that every other rank's watchdog sees within ``poll_s`` (a key in the process
   group's store, and a file beside the stacks): they dump their stacks too, whatever phase they
   wait in (a rank blocked in a checkpoint's barrier has a long budget of its own);
4. waits ``grace_s`` for them and exits with :data:`maescale.exitcodes.STALLED`, which the job's
   supervisor retries (:mod:`maescale.launch.supervisor`); srun or torchrun then end the rest.

A rank whose main thread holds the GIL while it hangs starves this thread; a C-level
``faulthandler.dump_traceback_later`` armed a little beyond the thread's own deadline (re-armed by
the thread while it runs) still dumps the stacks and ends the process in that case.
Detection bound: ``stall_timeout_s`` + ``poll_s`` + ``grace_s`` after the last progress.

Besides, each new step writes its number in place into ``progress/rank_<R>.step`` (one
``pwrite`` of a few bytes, no rename, no fsync): after a crash the supervisor reads at which step
every rank was, to tell a failure that repeats at the same step from a new one.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from maescale import compat
from maescale.exitcodes import STALLED
from maescale.rundir import write_json_atomic

log = logging.getLogger("maescale.watchdog")

# Phases of a step, in order: who is furthest behind is decided by (step, phase).
PHASES = ("start", "data", "forward", "backward", "step", "log", "eval", "save", "rollback", "end")
# Phases slow by nature get a budget of their own (seconds; the user's timeout if larger).
SLOW_PHASE_BUDGET_S = {"start": 3600.0, "eval": 1800.0, "save": 900.0, "rollback": 900.0}
WARMUP_STEPS = 3  # the first steps compile, autotune, fill caches: budget of "start"
AUTO_MIN_S = 300.0  # train.stall_timeout_s: null -> max(AUTO_MIN_S, AUTO_STEPS x the median step time)
AUTO_STEPS = 20


def resolve_timeout(configured: float | None, step_times: list[float]) -> float:
    """The stall timeout: the configured value, or at least :data:`AUTO_MIN_S` and
    :data:`AUTO_STEPS` times the median measured step time."""
    if configured is not None:
        return float(configured)
    median = sorted(step_times)[len(step_times) // 2] if step_times else 0.0
    return max(AUTO_MIN_S, AUTO_STEPS * median)


class StallWatchdog:
    """The watchdog of one rank (see the module docstring). ``progress`` is the only call on the
    training thread's path, and costs two attribute writes and a clock read."""

    def __init__(self, run_path: str | os.PathLike, attempt: str, rank: int, world_size: int,
                 timeout_s: float | None, *, poll_s: float = 1.0, grace_s: float = 5.0,
                 publish_s: float = 5.0, exit_process: bool = True):
        self.dir = Path(run_path) / "stalls" / attempt
        self.progress_dir = Path(run_path) / "attempts" / attempt / "progress"
        self.rank, self.world = rank, world_size
        self.configured = timeout_s
        self.timeout_s = resolve_timeout(timeout_s, [])
        self.poll_s, self.grace_s, self.publish_s = poll_s, grace_s, publish_s
        self.exit_process = exit_process
        self.host = socket.gethostname()
        self.step, self.phase = 0, "start"
        self.steps_done = 0  # steps completed by this process (the first ones are warm-up)
        self._last = time.monotonic()
        self._step_times: list[float] = []
        self._step_started: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._step_fd: int | None = None
        self.fired: dict[str, Any] | None = None
        self.dumped_for: int | None = None  # the rank whose stall made this one dump its stacks
        self._store: Any = None
        self._flag_key = f"maescale/stall/{attempt}"

    # ------------------------------------------------------------------ the training thread
    def progress(self, step: int, phase: str) -> None:
        """Record that this rank reached ``phase`` of ``step``."""
        now = time.monotonic()
        if phase == "data":  # a new step starts: time the previous one
            if self._step_started is not None and self.steps_done >= WARMUP_STEPS:
                self._step_times.append(now - self._step_started)
                if len(self._step_times) > 200:
                    del self._step_times[:100]
            self._step_started = now
            self.steps_done += 1
            if self._step_fd is not None:
                try:
                    os.pwrite(self._step_fd, b"%12d\n" % step, 0)
                except OSError:
                    pass
        self.step, self.phase, self._last = step, phase, now

    def budget(self) -> float:
        """How long the current phase may go without progress."""
        if self.configured is None and self._step_times:
            self.timeout_s = resolve_timeout(None, self._step_times)
        slow = SLOW_PHASE_BUDGET_S.get(self.phase)
        if slow is None and self.steps_done <= WARMUP_STEPS:
            slow = SLOW_PHASE_BUDGET_S["start"]
        return max(self.timeout_s, slow) if slow is not None else self.timeout_s

    # ------------------------------------------------------------------ the watchdog thread
    def start(self) -> "StallWatchdog":
        self._store = compat.default_store() if self.world > 1 else None
        self.progress_dir.mkdir(parents=True, exist_ok=True)
        self._step_fd = os.open(self.progress_dir / f"rank_{self.rank}.step", os.O_WRONLY | os.O_CREAT, 0o644)
        # Opened now: a process hung with the GIL held could not open a file any more.
        self._fallback_file = open(self.progress_dir.parent / f"rank_{self.rank}.stacks_if_starved.txt", "w")
        self._thread = threading.Thread(target=self._watch, name="maescale-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        faulthandler.cancel_dump_traceback_later()
        f = getattr(self, "_fallback_file", None)
        if f is not None:
            f.close()
            path = Path(f.name)
            if path.exists() and path.stat().st_size == 0:
                path.unlink(missing_ok=True)
        if self._step_fd is not None:
            os.close(self._step_fd)
            self._step_fd = None

    def _watch(self) -> None:
        last_publish = 0.0
        while not self._stop.wait(self.poll_s):
            idle = time.monotonic() - self._last
            budget = self.budget()
            # The C-level fallback, should this thread ever be starved of the GIL.
            faulthandler.dump_traceback_later(budget - idle + self.poll_s + 2 * self.grace_s + 30, exit=True,
                                              file=self._fallback_file)
            if time.monotonic() - last_publish >= self.publish_s:
                self._publish()
                last_publish = time.monotonic()
            if self.dumped_for is None and (peer := self._peer_fired()) is not None:
                self._dump(f"dumped because rank {peer} stalled; this rank's last progress: step {self.step + 1}, "
                           f"phase {self.phase!r}, {idle:.0f} s ago")
                self.dumped_for = peer
                self._publish()
            if idle > budget:
                faulthandler.cancel_dump_traceback_later()
                self._fire(idle, budget)
                return

    def _publish(self) -> None:
        try:
            write_json_atomic(self.progress_dir / f"rank_{self.rank}.json",
                              {"rank": self.rank, "host": self.host, "pid": os.getpid(), "step": self.step,
                               "phase": self.phase, "idle_s": round(time.monotonic() - self._last, 1),
                               "time": time.time()})
        except OSError:  # a flaky file system: the next publish tries again
            pass

    def _peer_fired(self) -> int | None:
        """The rank that raised the stall flag, if one did."""
        if self._store is not None:
            try:
                if self._store.check([self._flag_key]):
                    return int(self._store.get(self._flag_key))
            except Exception:  # noqa: BLE001 - the store is gone (rank 0's process died): use the file
                self._store = None
        try:
            return int((self.dir / "FIRED").read_text().strip() or -1)
        except (OSError, ValueError):
            return None

    def _raise_flag(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._store is not None:
            try:
                self._store.set(self._flag_key, str(self.rank))
            except Exception:  # noqa: BLE001 - the file below still tells
                pass
        try:
            (self.dir / "FIRED").write_text(str(self.rank))
        except OSError:
            pass

    def _dump(self, header: str) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        stacks = self.dir / f"rank_{self.rank}.txt"
        with open(stacks, "w") as f:
            f.write(f"rank {self.rank} on {self.host} (pid {os.getpid()}): {header}\n\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        return stacks

    def _fire(self, idle: float, budget: float) -> None:
        self._publish()
        if self._peer_fired() is None:
            self._raise_flag()
        stacks = self._dump(f"no progress for {idle:.0f} s (budget {budget:.0f} s) in step {self.step + 1}, "
                            f"phase {self.phase!r}")
        trace = compat.dump_nccl_flight_recorder()
        if trace:
            (self.dir / f"nccl_rank_{self.rank}.pkl").write_bytes(trace)
        time.sleep(min(self.grace_s, 2.0))  # the others publish their last progress too
        stalled, others = self.analyse()
        report = {"rank": self.rank, "host": self.host, "step": self.step, "phase": self.phase, "idle_s": idle,
                  "budget_s": budget, "stalled": stalled, "ranks": others, "stacks": str(stacks),
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.fired = report
        try:
            write_json_atomic(self.dir / f"stall_rank_{self.rank}.json", report, indent=1)
        except OSError:
            pass
        names = ", ".join(f"rank {r['rank']} (host {r['host']}, step {r['step'] + 1}, phase {r['phase']!r})"
                          for r in stalled) or "none identified (every rank at the same place: a hung collective?)"
        log.error("stall: rank %d (host %s) made no progress for %.0f s (budget %.0f s) in step %d, phase %r; "
                  "furthest behind: %s; stacks in %s; exiting with code %d for a restart",
                  self.rank, self.host, idle, budget, self.step + 1, self.phase, names, self.dir, STALLED)
        for h in logging.getLogger("maescale").handlers:
            h.flush()
        if self.exit_process:
            time.sleep(max(0.0, self.grace_s - 2.0))
            os._exit(STALLED)

    def analyse(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(the ranks furthest behind, every rank's last published progress)."""
        return furthest_behind(self.progress_dir)


def read_progress(progress_dir: Path) -> list[dict[str, Any]]:
    """Every rank's last published progress in ``progress_dir``."""
    found = []
    for path in sorted(Path(progress_dir).glob("rank_*.json")):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return found


def read_steps(progress_dir: Path) -> dict[int, int]:
    """The step every rank was at (its ``rank_<R>.step`` record), by rank."""
    steps = {}
    for path in Path(progress_dir).glob("rank_*.step"):
        try:
            steps[int(path.name[5:-5])] = int(path.read_text().strip())
        except (OSError, ValueError):
            continue
    return steps


def furthest_behind(progress_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The ranks whose (step, phase) is the earliest, unless every rank is at the same place
    (then nobody is named: a hung collective or a stall of the whole job)."""
    ranks = read_progress(progress_dir)
    if not ranks:
        return [], []

    def place(r: dict[str, Any]) -> tuple[int, int]:
        phase = r.get("phase")
        return int(r.get("step", 0)), PHASES.index(phase) if phase in PHASES else 0

    first = min(place(r) for r in ranks)
    behind = [r for r in ranks if place(r) == first]
    return ([] if len(behind) == len(ranks) and len(ranks) > 1 else behind), ranks


class _Allow:
    """``with watchdog.phase(step, "save"):`` runs a slow phase under its own budget."""

    def __init__(self, dog: StallWatchdog | None, step: int, phase: str):
        self.dog, self.step, self.phase = dog, step, phase

    def __enter__(self) -> None:
        if self.dog is not None:
            self.dog.progress(self.step, self.phase)

    def __exit__(self, *exc: Any) -> None:
        if self.dog is not None:
            self.dog.progress(self.step, "log")


def phase(dog: StallWatchdog | None, step: int, name: str) -> _Allow:
    """Context manager: ``name`` (one of :data:`PHASES`) for the duration of the block."""
    return _Allow(dog, step, name)


def prune_attempts(run_path: str | os.PathLike, keep: int = 20) -> None:
    """Keep the ``keep`` newest attempt folders (``RUN/attempts/*``: progress, exit records)."""
    import shutil

    root = Path(run_path) / "attempts"
    if not root.is_dir():
        return
    for old in sorted(root.iterdir(), key=lambda p: p.stat().st_mtime)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def iter_reports(run_path: str | os.PathLike, attempt: str) -> Iterator[dict[str, Any]]:
    """The stall reports every rank wrote for ``attempt`` (for the supervisor)."""
    for path in sorted((Path(run_path) / "stalls" / attempt).glob("stall_rank_*.json")):
        try:
            yield json.loads(path.read_text())
        except (OSError, ValueError):
            continue
