"""The run directory: its layout, checkpoint tags and ``latest``, and the one atomic-write helper.

A run directory (``output_dir``) holds everything of one run::

    output_dir/
        config.yaml                 the config that runs (written after the resume plan)
        logs/train.log              rank 0's log
        tensorboard/                event files
        slurm/                      submitit's scripts and per-task logs, requeues.json
        checkpoints/latest          names the newest complete checkpoint
        checkpoints/step_00001000/  one checkpoint (see :mod:`maescale.checkpoint`)
        checkpoints/step_00001000.partial/   a checkpoint being written (never read)
        reconstruction.png          written at the end

This module is torch-free on purpose: the login-node side of the launcher, the shard writer and
the config loader use it without importing torch. Every file maescale publishes goes through
:func:`atomic_output` (or its text/JSON/bytes shorthands) or :func:`publish`: written under a
temporary name beside the target, flushed to disk, then renamed over it, so a reader (or a
crash) never sees half a file. ``os.replace`` of our own outputs appears nowhere else.

:class:`RunLock` makes sure one job at a time writes a run directory (``RUN/lock`` and
``RUN/lock.heartbeat``); readers (export, visualize, probe) never take it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

CHECKPOINTS = "checkpoints"
LATEST = "latest"
CONFIG = "config.yaml"
LOGS = "logs"
TRAIN_LOG = "train.log"
TENSORBOARD = "tensorboard"
SLURM = "slurm"
RECONSTRUCTION = "reconstruction.png"
PARTIAL = ".partial"

TAG_RE = re.compile(r"^step_(\d{8,})$")


def tag_for_step(step: int) -> str:
    """``step_00001000`` for step 1000: the name of a checkpoint directory."""
    return f"step_{step:08d}"


def step_of(tag: str | os.PathLike) -> int | None:
    """The step a checkpoint tag (or directory) names; None if it is not a checkpoint name."""
    m = TAG_RE.match(Path(tag).name)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------


def temp_path(path: str | os.PathLike, keep_suffix: bool = False) -> Path:
    """A hidden temporary name beside ``path``, unique to this process and call. ``keep_suffix``: end
    it with ``path``'s suffix too, for writers that pick the format by extension (torch, PNG)."""
    path = Path(path)
    unique = f"{os.getpid()}-{os.urandom(3).hex()}"  # threads of one process write too (the lock's heartbeat)
    return path.with_name(f".{path.name}.tmp{unique}" + (path.suffix if keep_suffix else ""))


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory entry (a rename) to disk; best effort where the filesystem refuses."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(tmp: str | os.PathLike, path: str | os.PathLike, fsync: bool = True) -> None:
    """Move a finished file or directory ``tmp`` to ``path`` in one rename (replacing a file
    there), with its data and the directory entry flushed to disk first and after."""
    tmp, path = Path(tmp), Path(path)
    if fsync and tmp.is_file():
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if fsync:
        fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, keep_suffix: bool = False) -> Iterator[Path]:
    """``with atomic_output(p) as tmp: write(tmp)``: ``p`` appears complete when the block ends
    without an exception, and not at all (the temporary removed) when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path, keep_suffix)
    try:
        yield tmp
        publish(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_output`)."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = None) -> None:
    """Write ``obj`` as JSON (a trailing newline when indented) to ``path`` atomically."""
    text = json.dumps(obj, indent=indent)
    write_text_atomic(path, text + "\n" if indent is not None else text)


# --------------------------------------------------------------------------------------------
# The layout
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunDir:
    """Paths and checkpoint bookkeeping of one run directory (nothing is created on construction)."""

    path: Path

    def __init__(self, path: str | os.PathLike):
        object.__setattr__(self, "path", Path(path))

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def logs(self) -> Path:
        return self.path / LOGS

    @property
    def train_log(self) -> Path:
        return self.path / LOGS / TRAIN_LOG

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def slurm(self) -> Path:
        return self.path / SLURM

    @property
    def reconstruction(self) -> Path:
        return self.path / RECONSTRUCTION

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def checkpoint(self, step: int) -> Path:
        """The directory of checkpoint ``step`` (which may not exist)."""
        return self.checkpoints / tag_for_step(step)

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        """``(step, directory)`` of every finished-looking checkpoint, newest first."""
        if not self.checkpoints.is_dir():
            return []
        found = [(step_of(p), p) for p in self.checkpoints.iterdir() if p.is_dir()]
        return sorted(((s, p) for s, p in found if s is not None), reverse=True)

    def partials(self) -> list[Path]:
        """Leftovers of checkpoint writes that never finished."""
        return sorted(self.checkpoints.glob("*" + PARTIAL)) if self.checkpoints.is_dir() else []

    def latest(self) -> Path | None:
        """The checkpoint directory ``latest`` names (None without a ``latest``; it may be gone)."""
        try:
            tag = (self.checkpoints / LATEST).read_text().strip()
        except OSError:
            return None
        return self.checkpoints / tag if tag else None

    def latest_step(self) -> int | None:
        """The step of the checkpoint ``latest`` names (None without one)."""
        latest = self.latest()
        return step_of(latest) if latest is not None else None

    def set_latest(self, checkpoint: Path) -> None:
        """Point ``latest`` at ``checkpoint`` (atomically)."""
        write_text_atomic(self.checkpoints / LATEST, checkpoint.name)

    def has_checkpoints(self) -> bool:
        """Whether a training run already wrote checkpoints here (``latest`` or any ``step_N``)."""
        return (self.checkpoints / LATEST).is_file() or bool(self.list_checkpoints())


# --------------------------------------------------------------------------------------------
# The run lock: one job writes a run directory at a time
# --------------------------------------------------------------------------------------------

LOCK = "lock"
HEARTBEAT = "lock.heartbeat"


class RunLocked(RuntimeError):
    """The run directory is held by another job (the message names it and how to take over)."""


class RunLockLost(RuntimeError):
    """This job's lock was taken over by another job: it must stop writing at once."""


def job_identity() -> str:
    """What identifies this job across its ranks and requeues: the SLURM job id (a requeued job
    keeps it), submitit's local job id, else this host and the launcher's process id. The SLURM
    restart count and step id are recorded beside it (:func:`slurm_position`)."""
    env = os.environ
    if env.get("SLURM_JOB_ID"):
        array = env.get("SLURM_ARRAY_JOB_ID")
        return f"slurm:{array}_{env['SLURM_ARRAY_TASK_ID']}" if array else f"slurm:{env['SLURM_JOB_ID']}"
    if env.get("SUBMITIT_LOCAL_JOB_ID"):
        return f"local:{socket.gethostname()}:{env['SUBMITIT_LOCAL_JOB_ID']}"
    launcher = env.get("TORCHELASTIC_RUN_ID") and os.getppid()  # torchrun: the agent is the job
    return f"pid:{socket.gethostname()}:{launcher or os.getpid()}"


def slurm_position() -> tuple[int | None, str | None]:
    """(``SLURM_RESTART_COUNT``, ``SLURM_STEP_ID``) of this process: a requeue raises the first, every
    ``srun`` of an allocation gets its own second (None outside SLURM)."""
    env = os.environ
    if not env.get("SLURM_JOB_ID"):
        return None, None
    return int(env.get("SLURM_RESTART_COUNT") or 0), env.get("SLURM_STEP_ID")


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux), to tell a live owner from a reused pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start is None or _process_start(pid) in (None, start)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class _Unreadable:
    """A lock file that exists but holds no owner record (empty after a crash before its data
    reached the disk, truncated, ``touch``ed, another program's): its identity is its bytes."""

    def __init__(self, raw: bytes, problem: str):
        self.raw, self.problem = raw, problem


def _read_lock(path: Path) -> dict[str, Any] | _Unreadable | None:
    """The owner record at ``path``; :class:`_Unreadable` if the file holds none; None if there
    is no file (released, or being replaced by a takeover right now). Raises ``OSError`` when
    the file system fails to answer."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return _Unreadable(raw, "empty" if not raw else f"not an owner record ({len(raw)} bytes)")
    return data if isinstance(data, dict) and "token" in data else _Unreadable(raw, "not an owner record")


# errno values of a file system that has no hard links (os.link refused rather than failed)
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV, errno.EMLINK}


class RunLock:
    """The lock of one run directory, held by one job (taken and heartbeaten by its rank 0).

    The lock is ``RUN/lock``, an owner record (job, SLURM restart count and step, host, pid,
    start time, maescale version, a random token) that appears by an atomic ``link`` of a
    finished, fsynced file: the primitive that works where ``flock`` does not (NFS, Lustre); on a
    file system without hard links, an exclusive create (``O_EXCL``) instead. While the job runs,
    a daemon thread of rank 0 rewrites ``RUN/lock.heartbeat`` (token and a counter) every
    ``heartbeat_s``; staleness is judged by a waiter on its own clock (the counter did not move
    for ``stale_s``), so clock skew between hosts does not matter. A job that finds the lock held
    waits up to ``wait_s`` (the old job may be saving on its way out) and takes it over when the
    owner is gone: its heartbeat stopped, or its pid is dead on this host, or the owner is this
    very job before a requeue (the same SLURM job id, a lower restart count), or ``takeover`` was
    asked for. A lock file without a readable record is judged the same way by its bytes (stale
    when they do not change for ``stale_s``). A takeover renames the old record away first (one
    renamer wins), then creates the lock as usual.

    The holder checks at every beat that the lock is still its own: only ``lost_after``
    consecutive reads showing ANOTHER owner's record make :attr:`lost` true (a failed read, or no
    file during a takeover's rename, is logged and beaten through). A checkpoint commit calls
    :meth:`check_held` first (the fence): a job that lost the lock publishes nothing.
    """

    def __init__(self, run: RunDir, job: str | None = None, *, wait_s: float = 300, stale_s: float = 60,
                 heartbeat_s: float = 10, takeover: bool = False, poll_s: float = 1.0, version: str = "",
                 lost_after: int = 3, restart: int | None = None, step: str | None = None):
        self.run, self.job = run, job or job_identity()
        position = slurm_position() if job is None else (None, None)
        self.restart = restart if restart is not None else position[0]
        self.slurm_step = step if step is not None else position[1]
        self.wait_s, self.stale_s, self.heartbeat_s = wait_s, stale_s, heartbeat_s
        self.takeover, self.poll_s, self.version = takeover, poll_s, version
        self.lost_after = lost_after
        self.token = ""
        self.lost = False
        self.took_over = False  # this job took the lock from a holder that may still be alive (see clean_partials)
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    @property
    def path(self) -> Path:
        return self.run.path / LOCK

    @property
    def heartbeat_path(self) -> Path:
        return self.run.path / HEARTBEAT

    def owner(self) -> dict[str, Any] | None:
        """The current owner record (None when the lock is free, being replaced, or unreadable)."""
        try:
            found = _read_lock(self.path)
        except OSError:
            return None
        return found if isinstance(found, dict) else None

    # ---------------------------------------------------------------- taking it
    def acquire(self, log: Any = None) -> float:
        """Take the lock (waiting, taking over a stale one); returns the seconds waited.
        Raises :class:`RunLocked` naming the holder when it stays held for ``wait_s``."""
        self.run.path.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        seen: Any = object()  # what was last observed of the holder, and since when
        seen_since = t0
        told = False
        while True:
            if self._create():
                self._start_heartbeat()
                return time.monotonic() - t0
            try:
                found = _read_lock(self.path)
            except OSError as exc:
                found = _Unreadable(b"", f"unreadable ({exc})")
            if found is None:
                observed: Any = None  # released, or a takeover is renaming it: try again soon
            elif isinstance(found, _Unreadable):
                observed = ("unreadable", found.raw)
            else:
                beat = _read_json(self.heartbeat_path) or {}
                observed = (found.get("token"), beat.get("beat") if beat.get("token") == found.get("token") else None)
            if observed != seen:
                seen, seen_since = observed, time.monotonic()
            if found is not None:
                reason = self._stale_reason(found, time.monotonic() - seen_since)
                if reason is not None:
                    if log is not None:
                        log.warning("taking over the run directory %s from %s: %s", self.run.path,
                                    self._describe(found), reason)
                    self._break(found)
                    # A dead process, or this job before its requeue, writes nothing more; a holder
                    # judged by a silent heartbeat or taken over by request may still be alive.
                    self.took_over = not reason.startswith(("its process", "it is this job"))
                    continue
            waited = time.monotonic() - t0
            if waited >= self.wait_s:
                holder = "a lock that is being replaced" if found is None else self._describe(found)
                raise RunLocked(
                    f"run directory {self.run.path} is held by {holder}; waited {waited:.0f} s "
                    f"(lock.wait_s={self.wait_s:g}). Wait for that job to finish (or scancel it); if it is gone, "
                    f"start with lock.takeover=true")
            if not told and log is not None and found is not None:
                log.warning("run directory %s is held by %s: waiting up to %g s for it to be released (lock.wait_s)",
                            self.run.path, self._describe(found), self.wait_s)
                told = True
            time.sleep(min(self.poll_s, 0.2) if found is None else self.poll_s)

    def _describe(self, found: dict[str, Any] | _Unreadable) -> str:
        if isinstance(found, _Unreadable):
            return f"a lock file {self.path} with no readable owner record ({found.problem})"
        return describe_owner(found)

    def _stale_reason(self, owner: dict[str, Any] | _Unreadable, unchanged_s: float) -> str | None:
        if self.takeover:
            return "lock.takeover=true"
        if isinstance(owner, _Unreadable):
            if unchanged_s >= self.stale_s:
                return f"it has not changed for {unchanged_s:.0f} s (lock.stale_s={self.stale_s:g})"
            return None
        if owner.get("job") == self.job:
            theirs, mine = owner.get("restart"), self.restart
            if theirs is None or mine is None:
                return "it is this job's own lock (requeued or restarted)"
            if theirs < mine:
                return f"it is this job's own lock from before its requeue (restart {theirs} -> {mine})"
            if theirs == mine and owner.get("step") == self.slurm_step:
                return "it is this job step's own lock"
            # another srun step of the same allocation: alive or not is decided below
        if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int) and \
                not _pid_alive(owner["pid"], owner.get("pid_start")):
            return f"its process {owner['pid']} on this host is gone"
        if unchanged_s >= self.stale_s:
            return f"its heartbeat has not moved for {unchanged_s:.0f} s (lock.stale_s={self.stale_s:g})"
        return None

    def _record(self, token: str) -> bytes:
        return json.dumps({"job": self.job, "restart": self.restart, "step": self.slurm_step,
                           "host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "maescale_version": self.version,
                           "token": token, "heartbeat_s": self.heartbeat_s}).encode()

    def _create(self) -> bool:
        import uuid

        token = uuid.uuid4().hex
        data = self._record(token)
        tmp = temp_path(self.path)
        with open(tmp, "wb") as f:  # the record reaches the disk before it can become the lock
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)  # atomic, and fails if the lock exists (NFS-safe, unlike O_EXCL on old NFS)
            won = True
        except FileExistsError:
            won = False
        except OSError as exc:
            if exc.errno in _NO_LINKS:  # no hard links here: an exclusive create instead
                won = self._create_exclusive(data)
            else:  # NFS may lose the reply of a link that succeeded: its count tells
                won = tmp.stat().st_nlink == 2
        finally:
            tmp.unlink(missing_ok=True)
        if won:
            self.token = token
            fsync_dir(self.run.path)
        return won

    def _create_exclusive(self, data: bytes) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _break(self, owner: dict[str, Any] | _Unreadable) -> None:
        """Move a stale owner's record away (only one of several racing takers succeeds)."""
        tag = owner.get("token", "x") if isinstance(owner, dict) else "unreadable"
        aside = self.run.path / f".{LOCK}.stale-{tag}-{os.getpid()}-{os.urandom(2).hex()}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = _read_lock(aside)
        except OSError:
            moved = None
        same = (isinstance(owner, dict) and isinstance(moved, dict) and moved.get("token") == owner.get("token")) or \
            (isinstance(owner, _Unreadable) and isinstance(moved, _Unreadable) and moved.raw == owner.raw)
        if not same:  # it changed under us: put the new owner back
            try:
                os.link(aside, self.path)
            except OSError:
                pass
        aside.unlink(missing_ok=True)

    # ---------------------------------------------------------------- holding it
    def _start_heartbeat(self) -> None:
        self._beat(0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat_loop, name="maescale-run-lock", daemon=True)
        self._thread.start()

    def _beat(self, n: int) -> None:
        write_json_atomic(self.heartbeat_path, {"token": self.token, "beat": n, "time": time.time()})

    def _beat_loop(self) -> None:
        import logging

        log = logging.getLogger("maescale.rundir")
        n, strikes, troubled = 0, 0, False
        assert self._stop is not None
        while not self._stop.wait(self.heartbeat_s):
            try:
                found = _read_lock(self.path)
            except OSError as exc:
                found = exc
            if isinstance(found, dict) and found.get("token") != self.token:
                strikes += 1
                if strikes >= self.lost_after:
                    log.error("the run directory's lock now belongs to %s: this job stops without writing",
                              describe_owner(found))
                    self.lost = True
                    return
                continue
            strikes = 0
            if not isinstance(found, dict):  # a failed read, or a takeover's rename in flight
                if not troubled:
                    log.warning("could not read the run directory's lock %s (%s); still beating", self.path,
                                found if isinstance(found, OSError) else "no owner record")
                    troubled = True
            else:
                troubled = False
            n += 1
            try:
                self._beat(n)
            except OSError:  # a full or flaky filesystem: the next beat tries again
                pass

    def check_held(self, tries: int = 3, pause_s: float = 0.2) -> None:
        """The fence of a checkpoint commit: raise :class:`RunLockLost` if another job owns the
        lock (or this holder saw it lost), ``OSError`` if that cannot be told (the save fails and
        is retried)."""
        if self.lost:
            raise RunLockLost(f"the lock of {self.run.path} was taken over by another job")
        problem = "no lock file"
        for i in range(tries):
            try:
                found = _read_lock(self.path)
            except OSError as exc:
                found, problem = None, str(exc)
            if isinstance(found, dict):
                if found.get("token") == self.token:
                    return
                raise RunLockLost(f"the lock of {self.run.path} now belongs to {describe_owner(found)}; this job "
                                  "publishes nothing more")
            if isinstance(found, _Unreadable):
                problem = found.problem
            time.sleep(pause_s * (i + 1))
        raise OSError(f"cannot confirm that this job still holds {self.path} ({problem}); not publishing")

    def release(self) -> None:
        """Stop the heartbeat and free the lock (only if it is still this job's)."""
        if self._stop is not None:
            self._stop.set()
            if self._thread is not None:
                self._thread.join(timeout=5)
        owner = self.owner()
        if self.token and owner is not None and owner.get("token") == self.token:
            self.heartbeat_path.unlink(missing_ok=True)
            self.path.unlink(missing_ok=True)
        self.token = ""


def describe_owner(owner: dict[str, Any]) -> str:
    """``job slurm:123 (host node01, pid 4242, since ...)`` for messages."""
    where = ""
    if owner.get("restart") is not None or owner.get("step") is not None:
        where = f", restart {owner.get('restart')}, step {owner.get('step')}"
    return (f"job {owner.get('job', '?')} (host {owner.get('host', '?')}, pid {owner.get('pid', '?')}{where}, "
            f"since {owner.get('started', '?')}, maescale {owner.get('maescale_version', '?')})")


def lock_status(run: RunDir, fresh_s: float) -> dict[str, Any] | None:
    """The owner record of a held lock whose heartbeat is younger than ``fresh_s`` by this host's
    clock (for a quick check on the login node, which cannot watch the heartbeat move); None if free
    or apparently stale."""
    owner = _read_json(run.path / LOCK)
    if owner is None:
        return None
    beat = _read_json(run.path / HEARTBEAT) or {}
    if beat.get("token") != owner.get("token"):
        return owner  # just taken: its first beat is on its way
    age = time.time() - float(beat.get("time", 0))
    return owner | {"heartbeat_age_s": age} if age < fresh_s else None
