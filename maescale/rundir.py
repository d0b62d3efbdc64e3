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
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
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
    """A hidden temporary name beside ``path``, unique to this process. ``keep_suffix``: end it
    with ``path``'s suffix too, for writers that pick the format by extension (torch, PNG)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}" + (path.suffix if keep_suffix else ""))


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
