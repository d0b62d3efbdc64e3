"""Checkpoint files: save atomically, validate, load, keep the last K.

Layout (the run directory's part is :mod:`maescale.rundir`)::

    output_dir/checkpoints/
        latest                      text file: the tag of the newest complete checkpoint
        step_00001000/              one checkpoint (DeepSpeed files + maescale's own)
            mp_rank_00_model_states.pt, *zero_pp_rank_*_optim_states.pt   (DeepSpeed, ZeRO-sharded)
            trainer_state.json      step, epoch, world size, schedule facts (rank 0)
            rank_00000.json ...     per rank: RNG states (python, numpy, torch, cuda), data position
            config.yaml             the resolved config of the run
            MANIFEST.json           every file with its size and CRC32, written last
        step_00001000.partial/      a checkpoint being written (never read)

Protocol: every rank writes into ``<tag>.partial``; after a barrier rank 0 checks every file,
writes the manifest, renames the directory to ``<tag>`` (atomic on POSIX) and only then
replaces ``latest`` (:func:`maescale.rundir.write_text_atomic`). A crash at any point leaves
``latest`` on the previous complete checkpoint. Trainer state is JSON, never pickle.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maescale import __version__
from maescale.distributed import agree_max, barrier
from maescale.faults import fault_point
from maescale.rundir import PARTIAL, RunDir, fsync_dir, publish, tag_for_step, write_json_atomic, write_text_atomic

log = logging.getLogger("maescale.checkpoint")

MANIFEST = "MANIFEST.json"
TRAINER_STATE = "trainer_state.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit this run."""


# --------------------------------------------------------------------------------------------
# RNG state as JSON
# --------------------------------------------------------------------------------------------


def _tensor_b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _b64_tensor(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def capture_rng(mask_gen: torch.Generator | None = None) -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states (and the trainer's mask generator),
    JSON-serialisable."""
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": _tensor_b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = _tensor_b64(torch.cuda.get_rng_state())
    if mask_gen is not None:
        state["mask"] = _tensor_b64(mask_gen.get_state())
    return state


def restore_rng(state: dict[str, Any], mask_gen: torch.Generator | None = None) -> None:
    """Inverse of :func:`capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_b64_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_b64_tensor(state["cuda"]))
    if mask_gen is not None and "mask" in state:
        mask_gen.set_state(_b64_tensor(state["mask"]))


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def file_crc32(path: Path, chunk: int = 1 << 22) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def validate_checkpoint(path: Path, check_crc: bool = True, shard: tuple[int, int] = (0, 1)) -> None:
    """Raise :class:`CheckpointError` naming the problem if ``path`` is not a complete checkpoint.

    Sizes of all files are always checked; CRC32s of every ``shard[1]``-th file starting at
    ``shard[0]`` (so ranks split the reading of a large checkpoint).
    """
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST} (incomplete write?)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is unreadable ({exc})") from None
    for i, (name, meta) in enumerate(sorted(files.items())):
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path}: file {name} is missing")
        size = f.stat().st_size
        if size != meta["size"]:
            raise CheckpointError(f"checkpoint {path}: file {name} is {size} bytes, manifest says {meta['size']} (truncated?)")
        if check_crc and i % shard[1] == shard[0] and file_crc32(f) != meta["crc32"]:
            raise CheckpointError(f"checkpoint {path}: file {name} fails its CRC32 check (corrupt)")


# --------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedState:
    """What a resumed run gets back besides the engine's weights and optimizer state."""

    path: Path
    step: int
    trainer: dict[str, Any]  # trainer_state.json
    rank_state: dict[str, Any]  # this rank's rank_XXXXX.json (None entries when world changed)


class CheckpointManager:
    """Saves and restores checkpoints of one run directory for one process of the job."""

    def __init__(self, output_dir: str | os.PathLike, rank: int, world_size: int, keep_last: int,
                 control_group: object = None, config_yaml: str | None = None, fence: Any = None):
        self.run = RunDir(output_dir)
        self.root = self.run.checkpoints
        self.rank, self.world_size, self.keep_last = rank, world_size, keep_last
        self.group = control_group
        self.config_yaml = config_yaml
        # The run lock (rank 0's): a commit checks that this job still holds it, so a job that lost
        # the run directory to another never publishes a checkpoint or moves 'latest'.
        self.fence = fence
        self.param_groups: list[dict[str, Any]] | None = None  # the optimizer's group layout, recorded

    # ---------------------------------------------------------------- save
    def save(self, engine, step: int, trainer_state: dict[str, Any], rank_state: dict[str, Any]) -> Path:
        """Write checkpoint ``step`` (all ranks call this). Returns its final path.

        Raises ``OSError``/:class:`CheckpointError` on every rank if any rank failed to write;
        ``latest`` then still names the previous checkpoint.
        """
        tag = tag_for_step(step)
        final = self.root / tag
        partial = self.root / (tag + PARTIAL)
        t0 = time.monotonic()
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if partial.exists():
                shutil.rmtree(partial)
        barrier(self.group)
        self._together(f"write checkpoint {tag}", self._write, engine, partial, step, trainer_state, rank_state)
        fault_point("checkpoint.before_commit", step)
        # Every rank checksums a share of the files (a ViT-H checkpoint is ~10 GB: rank 0 alone
        # would re-read all of it while the job waits), then rank 0 writes the manifest.
        self._together(f"checksum checkpoint {tag}", self._checksum_share, partial)
        self._together(f"commit checkpoint {tag}", self._commit if self.rank == 0 else _nothing, partial, final)
        if self.rank == 0:
            self._prune()
            log.info("checkpoint %s written in %.1fs (%.1f MB)", final, time.monotonic() - t0, dir_bytes(final) / 1e6)
        return final

    def save_training(self, engine, step: int, cfg: Any, total_steps: int, epoch: int, data_state: dict[str, Any],
                      mask_gen: torch.Generator, stream_pos: int | None = None,
                      data_skips: list[dict[str, Any]] | None = None) -> Path:
        """:meth:`save` with maescale's training state: the facts a resume (or a resize) checks in
        ``trainer_state.json`` (with the optimizer's parameter-group layout, which a resume must
        rebuild exactly, the stream position and the skipped data windows), and this rank's RNG
        states and data position."""
        trainer = {"epoch": epoch, "total_steps": total_steps, "model": cfg.model.name,
                   "maescale_version": __version__, "zero_stage": cfg.deepspeed.zero_stage,
                   "micro_batch_size": cfg.train.micro_batch_size, "grad_accum_steps": cfg.train.grad_accum_steps,
                   "weight_decay_tokens": cfg.optim.weight_decay_tokens,
                   "stream_pos": stream_pos if stream_pos is not None else step * cfg.train.grad_accum_steps,
                   "data_skips": data_skips or []}
        if self.param_groups is not None:
            trainer["param_groups"] = self.param_groups
        return self.save(engine, step, trainer, {"rng": capture_rng(mask_gen), "data": data_state})

    def _together(self, what: str, fn, *args: Any) -> None:
        """Run ``fn`` on this rank, then agree with every rank on whether all succeeded: a failure
        anywhere raises everywhere (the failing rank re-raises its own error; a lost lock is a
        :class:`~maescale.rundir.RunLockLost` on every rank)."""
        from maescale.rundir import RunLockLost

        error: BaseException | None = None
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - every rank must reach the agreement below
            error = exc
        code = agree_max([2 if isinstance(error, RunLockLost) else 1 if error else 0], self.group)[0]
        if code:
            if error is not None:
                raise error
            if code == 2:
                raise RunLockLost(f"the run directory's lock was taken over while writing a checkpoint ({what}); "
                                  "nothing was published; this job stops")
            raise CheckpointError(f"another rank failed to {what}; 'latest' is unchanged")

    def _write(self, engine, partial: Path, step: int, trainer_state: dict[str, Any], rank_state: dict[str, Any]) -> None:
        fault_point("checkpoint.before_write", step)
        engine.save_checkpoint(str(self.root), tag=partial.name, save_latest=False, client_state=_universal_info())
        write_json_atomic(partial / f"rank_{self.rank:05d}.json", rank_state)
        if self.rank == 0:
            write_json_atomic(partial / TRAINER_STATE, {**trainer_state, "format": FORMAT_VERSION,
                                                        "step": step, "world_size": self.world_size})
            if self.config_yaml is not None:
                write_text_atomic(partial / "config.yaml", self.config_yaml)

    def _checksum_share(self, partial: Path) -> None:
        names = _checkpoint_files(partial)
        mine = {n: {"size": (partial / n).stat().st_size, "crc32": file_crc32(partial / n)}
                for i, n in enumerate(names) if i % self.world_size == self.rank}
        write_json_atomic(partial / f".crc_{self.rank:05d}.json", mine)

    def _commit(self, partial: Path, final: Path) -> None:
        files: dict[str, Any] = {}
        for r in range(self.world_size):
            share = partial / f".crc_{r:05d}.json"
            files.update(json.loads(share.read_text()))
            share.unlink()
        on_disk = set(_checkpoint_files(partial))
        if on_disk != set(files):
            raise CheckpointError(f"checkpoint {partial}: files changed while it was checksummed: "
                                  f"{sorted(on_disk ^ set(files))[:5]}")
        expected = {f"rank_{r:05d}.json" for r in range(self.world_size)} | {TRAINER_STATE}
        missing = expected - set(files)
        if missing:
            raise CheckpointError(f"checkpoint {partial} lacks {sorted(missing)} after every rank reported success")
        write_json_atomic(partial / MANIFEST, {"format": FORMAT_VERSION, "files": files})
        fsync_dir(partial)
        if self.fence is not None:
            self.fence.check_held()  # raises RunLockLost: another job owns the directory now
        if final.exists():  # an older save of the same step that lost its 'latest' race
            shutil.rmtree(final)
        publish(partial, final)
        self.run.set_latest(final)

    def _prune(self) -> None:
        latest = self.run.latest()
        for _, path in self.run.list_checkpoints()[self.keep_last:]:
            if latest is not None and path.resolve() == latest.resolve():
                continue
            shutil.rmtree(path, ignore_errors=True)

    def clean_partials(self, quiet_s: float = 0.0) -> int:
        """Remove leftovers of interrupted saves (rank 0); returns the bytes freed. A partial whose
        files changed in the last ``quiet_s`` seconds may still be written by a job that lost the
        lock while saving (a takeover): it is left alone (its commit is fenced off) and removed at a
        later start."""
        freed = 0
        if self.rank == 0:
            now = time.time()
            for p in self.run.partials():
                newest = max((f.stat().st_mtime for f in p.rglob("*") if f.is_file()), default=p.stat().st_mtime)
                if quiet_s and now - newest < quiet_s:
                    log.warning("leaving %s alone: written %.0f s ago, maybe by the job this one took over from", p,
                                now - newest)
                    continue
                freed += dir_bytes(p)
                shutil.rmtree(p, ignore_errors=True)
                log.warning("removed incomplete checkpoint %s (an interrupted save)", p)
        barrier(self.group)
        return freed

    # ---------------------------------------------------------------- load
    def candidates(self, explicit: str | None = None) -> list[Path]:
        """Checkpoints to try, best first: ``explicit`` if given, else ``latest`` then older ones."""
        if explicit is not None:
            path = Path(explicit)
            if path.is_file() and path.name == "latest":
                path = path.parent / path.read_text().strip()
            if not path.is_dir():
                raise CheckpointError(f"resume={explicit!r}: no checkpoint directory there")
            return [path]
        found = [p for _, p in self.run.list_checkpoints()]
        latest = self.run.latest()
        if latest is not None and latest in found:
            found.remove(latest)
            found.insert(0, latest)
        elif latest is not None:
            log.warning("'latest' names %s, which does not exist; trying older checkpoints", latest)
        return found

    def find_valid(self, explicit: str | None = None) -> Path | None:
        """The first candidate that passes validation on every rank (a bad one is reported)."""
        for path in self.candidates(explicit):
            problem = None
            try:
                validate_checkpoint(path, shard=(self.rank, self.world_size))
            except CheckpointError as exc:
                problem = str(exc)
            bad = agree_max([1 if problem else 0], self.group)[0]
            if not bad:
                return path
            if problem:
                log.warning("skipping checkpoint: %s", problem)
            elif self.rank == 0:
                log.warning("skipping checkpoint %s: another rank found it invalid", path)
            if explicit is not None:
                raise CheckpointError(f"resume={explicit!r} is not a valid checkpoint: {problem or 'see other ranks'}")
        return None

    def roll_back_to(self, engine, path: Path, mask_gen: torch.Generator) -> LoadedState:
        """Load checkpoint ``path`` into the running ``engine`` (weights, optimizer state) and this
        rank's RNG states, but not the data position: a rollback goes on with the data after the
        bad window. Every rank validates and loads; a failure anywhere raises everywhere."""
        self._together(f"validate {path}", validate_checkpoint, path, True, (self.rank, self.world_size))
        box: list[LoadedState] = []
        self._together(f"load {path}", lambda: box.append(self.load(engine, path)))
        restore_rng(box[0].rank_state["rng"], mask_gen)
        return box[0]

    def load(self, engine, path: Path, universal: Path | None = None) -> LoadedState:
        """Restore engine weights + optimizer from ``path``; return the trainer/rank state.

        ``universal``: the DeepSpeed universal form of ``path`` (see :func:`prepare_universal`),
        loaded instead when the job's size differs from the one that wrote the checkpoint; the
        engine must then have been built with ``checkpoint.load_universal``. The per-rank
        states of a resized job are all of the old ranks' (``rank_state["old_ranks"]``), for
        the caller to map.
        """
        trainer = read_trainer_state(path)
        saved_world = int(trainer["world_size"])
        if saved_world != self.world_size and universal is None and not is_world_size_independent(path):
            raise CheckpointError(
                f"checkpoint {path} was written by {saved_world} processes, this job has {self.world_size}, "
                "and no universal form was prepared")
        src = universal or path
        load_path, _ = engine.load_checkpoint(str(src.parent), tag=src.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {src}")
        if saved_world == self.world_size:
            rank_state = json.loads((path / f"rank_{self.rank:05d}.json").read_text())
        else:
            rank_state = {"old_ranks": [json.loads((path / f"rank_{r:05d}.json").read_text())
                                        for r in range(saved_world)]}
        return LoadedState(path=path, step=int(trainer["step"]), trainer=trainer, rank_state=rank_state)


def read_trainer_state(path: Path) -> dict[str, Any]:
    """``trainer_state.json`` of a checkpoint directory."""
    try:
        return json.loads((Path(path) / TRAINER_STATE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path}: cannot read {TRAINER_STATE} ({exc})") from None


def is_world_size_independent(path: Path) -> bool:
    """True when a checkpoint holds full (unsharded) optimizer state: ZeRO-0 in fp32."""
    return not list(Path(path).glob("*optim_states.pt"))


def _universal_info() -> dict[str, Any]:
    # Marks the checkpoint as convertible by DeepSpeed's ds_to_universal (resume on another size).
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    return {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}


def _nothing(*_: Any) -> None:
    return None


def _checkpoint_files(partial: Path) -> list[str]:
    """The files of a checkpoint being written, sorted: hidden names are our own bookkeeping (the
    ranks' CRC shares, temporaries of atomic writes in flight on other ranks) and never part of it,
    so every rank lists the same files whatever the others are writing."""
    return sorted(str(f.relative_to(partial)) for f in partial.rglob("*")
                  if f.is_file() and not any(part.startswith(".") for part in f.relative_to(partial).parts))


def dir_bytes(path: Path) -> int:
    """Bytes in the files under ``path`` (a checkpoint's size on disk)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
