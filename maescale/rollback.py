"""Rollbacks and skipped data: going back to the last good checkpoint, and never reading the bad
stretch of data again.

A rollback (``train.rollback``; decided by every rank together, :mod:`maescale.control`) reloads
the newest checkpoint written before the trouble began (weights, optimizer state, RNG states;
not the data position) and goes on with the data the run had reached: the micro-batches read
in between, the window that led to the spike, are skipped. The run directory records it:

* ``RUN/rollbacks.json``: every rollback (why, when detected, onset, the checkpoint it went back
  to, the window skipped), written by rank 0;
* the window as a skip ``{"after_step": S, "batches": N}``: after optimizer step S, N micro-batches
  per rank are read and dropped. A resume from a checkpoint at or before S (an older one, or S
  itself after a crash) skips them again, so the run never trains on them; checkpoints written
  after the rollback already hold a data position past the window. ``train.skip_batches`` adds
  skips by hand in the same form.

Checkpoints written after the onset (the diverging stretch) are removed when the run rolls back,
so that ``latest`` can never lead a restart back into it.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maescale.distributed import broadcast_object
from maescale.rundir import RunDir, write_json_atomic

log = logging.getLogger("maescale.train")

ROLLBACKS = "rollbacks.json"


@dataclass(frozen=True)
class Skip:
    """After optimizer step ``after_step``, drop ``batches`` micro-batches per rank."""

    after_step: int
    batches: int
    source: str  # "config" or "rollback N"

    def as_dict(self) -> dict[str, Any]:
        return {"after_step": self.after_step, "batches": self.batches, "source": self.source}


class Rollbacks:
    """``RUN/rollbacks.json``: the record of every rollback of the run (all ranks read it; rank 0 writes)."""

    def __init__(self, run: RunDir, rank: int, group: Any = None):
        self.run, self.rank, self.group = run, rank, group
        self.path = run.path / ROLLBACKS
        self.entries: list[dict[str, Any]] = self._read()

    def _read(self) -> list[dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return []
        return list(data.get("rollbacks", [])) if isinstance(data, dict) else []

    @property
    def count(self) -> int:
        return len(self.entries)

    def active_skips(self) -> list[Skip]:
        """The windows of rollbacks that a later one has not covered."""
        return [Skip(e["to_step"], e["batches"], f"rollback {i + 1}") for i, e in enumerate(self.entries)
                if not e.get("superseded_by") and e.get("batches", 0) > 0]

    def good_checkpoint(self, onset: int) -> Path | None:
        """The newest checkpoint written before step ``onset`` (the same on every rank: rank 0 looks)."""
        found = None
        if self.rank == 0:
            found = next((str(p) for s, p in self.run.list_checkpoints()
                          if s < onset and (p / "MANIFEST.json").is_file()), None)
        found = broadcast_object(found, self.group)
        return Path(found) if found else None

    def record(self, reason: str, *, detected_at: int, onset: int, to_step: int, batches: int,
               checkpoints: Any) -> dict[str, Any]:
        """Append a rollback; earlier windows at or after ``to_step`` are covered by this one
        (its window counts everything read since the checkpoint). Removes the checkpoints after
        ``to_step`` and points ``latest`` at it (rank 0). Returns the entry."""
        number = len(self.entries) + 1
        for e in self.entries:
            if not e.get("superseded_by") and e["to_step"] >= to_step:
                e["superseded_by"] = number
        entry = {"rollback": number, "reason": reason, "detected_at_step": detected_at, "onset_step": onset,
                 "to_step": to_step, "batches": batches, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.entries.append(entry)
        if self.rank == 0:
            for s, p in self.run.list_checkpoints():
                if s > to_step:
                    shutil.rmtree(p, ignore_errors=True)
                    log.warning("removed checkpoint %s (after the rollback's target, step %d)", p, to_step)
            self.run.set_latest(self.run.checkpoint(to_step))
            write_json_atomic(self.path, {"rollbacks": self.entries}, indent=1)
        broadcast_object(None, self.group)  # every rank leaves with the directory in its new state
        return entry


class DataSkips:
    """The skips a run applies from its resume step on (``train.skip_batches`` and the windows of
    earlier rollbacks), and the record checkpoints carry."""

    def __init__(self, pending: list[Skip], recorded: list[Skip]):
        self.pending = sorted(pending, key=lambda s: s.after_step)
        self._recorded = recorded

    @classmethod
    def at_resume(cls, cfg: Any, rollbacks: Rollbacks, step: int) -> "DataSkips":
        """Skips at or after ``step`` (a resume from ``step`` has not applied them yet)."""
        windows = [(e["to_step"], e["detected_at_step"]) for e in rollbacks.entries]
        # A configured skip inside a rollback's window was read as part of that window: its skip covers it.
        configured = [Skip(a, n, "config") for a, n in cfg.train.skip_batches
                      if not any(lo <= a < hi for lo, hi in windows)]
        every = configured + rollbacks.active_skips()
        return cls([s for s in every if s.after_step >= step], every)

    def apply(self, step: int, feed: Any, trainer: Any) -> None:
        """Before the step after ``step``: read and drop the batches of the skips due now."""
        while self.pending and self.pending[0].after_step <= step:
            skip = self.pending.pop(0)
            if skip.after_step < step:
                continue  # cannot happen for a run that resumed before it; kept for safety
            log.warning("skipping %d micro-batches per rank after step %d (%s)", skip.batches, step, skip.source)
            for _ in range(skip.batches):
                trainer.next_batch()

    def rolled_back(self, entry: dict[str, Any]) -> None:
        """A rollback to ``entry["to_step"]``: the feed is already past its window; pending skips
        after it are inside the window."""
        self.pending = [s for s in self.pending if s.after_step < entry["to_step"]]
        self._recorded = [s for s in self._recorded if s.after_step < entry["to_step"]] + \
            [Skip(entry["to_step"], entry["batches"], f"rollback {entry['rollback']}")]

    def recorded(self) -> list[dict[str, Any]]:
        """Every skip of the run so far (``trainer_state.json`` keeps them)."""
        return [s.as_dict() for s in sorted(self._recorded, key=lambda s: s.after_step)]

