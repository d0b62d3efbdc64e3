"""Measured per-GPU training rates, read from the committed benchmark JSON under ``bench/``.

``tools/bench_loop.py`` (:mod:`maescale.devtools.loop_bench`) writes ``{"kind": "loop", "date",
"config", "args": {"overrides": [...]}, "env": {"device_name": ...}, "results": [...]}``: the real
training loop on one GPU, one result per micro-batch, data source and variant, each with its
images/s per GPU. A result's config is the named file **as committed when it was measured** (the
last commit touching ``configs/`` before its date, read with ``git show``) plus the file's common
overrides and the result's own, because the files change: ``configs/vit_huge.yaml`` gained
``model.compile: graphs`` minutes after its eager runs were measured, and reading today's file
would credit those eager rates to the CUDA-graphed loop. A result that carries its resolved config
(``"resolved": {...}``, a ``Config.to_dict()``) is read as it is. A result whose config cannot be
reconstructed (no git history here, a file that no longer validates) is left out, and said so.

A measurement applies to a planned config when everything that sets the per-GPU speed agrees
(:func:`rate_key`): preset, image size, channels, mask ratio, attention, checkpointing, compile
mode, micro-batch, precision, ZeRO stage and the lean step; and the data source fits (CPU decode
plans use the synthetic-data rate, the model and engine alone, since the plan checks the decode
capacity separately; ``data.gpu_decode`` plans need a ``gpu_decode`` measurement). Nothing is
interpolated: a micro-batch that was not measured is "not measured".
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from maescale.config import (Config, ConfigError, apply_overrides, config_from_dict, deep_merge, lean_step_applies,
                             set_dotted)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Measurement:
    """One measured rate: images/s per GPU of the real loop, and where it comes from."""

    rate: float
    micro_batch: int
    data: str  # synthetic | shards | gpu_decode
    device: str
    date: str
    file: str  # relative to the repository root
    variant: str  # the result's own overrides, "" for the config as it was
    peak_mem_gib: float | None = None

    def describe(self) -> str:
        variant = f", {self.variant}" if self.variant else ""
        return (f"{self.rate:,.0f} img/s per GPU, measured on {self.device} {self.date[:10]} "
                f"({self.file}: micro-batch {self.micro_batch}{variant}, {self.data} data)")


def rate_key(cfg: Config) -> tuple:
    """What sets the per-GPU speed of a config's training step."""
    m, t = cfg.model, cfg.train
    compile_mode = "blocks" if m.compile is True else (m.compile or "off")
    return (m.name, m.img_size, m.in_chans, round(m.mask_ratio, 6), m.attn_impl, m.act_ckpt_every, compile_mode,
            t.micro_batch_size, t.precision, cfg.deepspeed.zero_stage, lean_step_applies(cfg))


def data_sources(cfg: Config) -> tuple[str, ...]:
    """Measured data sources whose rate stands for ``cfg``'s, most fitting first."""
    if cfg.data.synthetic:
        return ("synthetic",)
    if cfg.data.gpu_decode:
        return ("gpu_decode",)
    return ("synthetic", "shards")


# --------------------------------------------------------------------------------------------
# The config a measurement ran
# --------------------------------------------------------------------------------------------


def _git(repo: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


@lru_cache(maxsize=64)
def _committed_yaml(repo: str, config: str, date: str) -> dict[str, Any] | None:
    """The raw config ``config`` (repository-relative, ``base:`` chain followed) as committed at the
    last commit touching ``configs/`` before ``date``; None without git history."""
    path = PurePosixPath(config)
    commit = (_git(Path(repo), "log", "-1", f"--before={date}", "--format=%H", "--", str(path.parent)) or "").strip()
    if not commit:
        return None

    def read(p: PurePosixPath, seen: tuple[str, ...]) -> dict[str, Any] | None:
        if str(p) in seen:
            return None
        text = _git(Path(repo), "show", f"{commit}:{p}")
        if text is None:
            return None
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            return None
        bases = data.pop("base", None)
        if bases is None:
            return data
        merged: dict[str, Any] = {}
        for base in [bases] if isinstance(bases, str) else list(bases):
            part = read(PurePosixPath(os.path.normpath(str(p.parent / base))), (*seen, str(p)))
            if part is None:
                return None
            merged = deep_merge(merged, part)
        return deep_merge(merged, data)

    return read(path, ())


def measured_config(record: dict[str, Any], result: dict[str, Any], repo: Path) -> Config | None:
    """The config ``result`` of the loop benchmark ``record`` ran (see the module docstring)."""
    if isinstance(result.get("resolved"), dict):
        raw: dict[str, Any] | None = json.loads(json.dumps(result["resolved"]))
    else:
        config = str(record.get("config", ""))
        if not config or os.path.isabs(config) or not record.get("date"):
            return None
        raw = _committed_yaml(str(repo), config, str(record["date"]))
        if raw is None:
            return None
        raw = json.loads(json.dumps(raw))  # a private copy of the cached mapping
        set_dotted(raw, "train.max_steps", 1)  # the loop benchmark's own length, not the recipe's
        set_dotted(raw, "train.epochs", None)
        try:
            apply_overrides(raw, [*record.get("args", {}).get("overrides", []), *result.get("overrides", [])])
        except (ConfigError, KeyError, TypeError, ValueError):
            return None
    try:
        set_dotted(raw, "train.micro_batch_size", int(result["micro_batch"]))
        return config_from_dict(raw)
    except (ConfigError, KeyError, TypeError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# Finding the rates
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    key: tuple
    measurement: Measurement


@lru_cache(maxsize=8)
def _entries(bench_dir: str, repo: str, stamp: tuple) -> tuple[tuple[_Entry, ...], tuple[str, ...]]:
    entries: list[_Entry] = []
    unresolved: list[str] = []
    for path in sorted(Path(bench_dir).rglob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if not isinstance(record, dict) or record.get("kind") != "loop":
            continue
        rel = os.path.relpath(path, repo)
        device = str(record.get("env", {}).get("device_name") or record.get("env", {}).get("device") or "?")
        for result in record.get("results", []):
            if result.get("status") != "ok" or not result.get("images_per_s"):
                continue
            cfg = measured_config(record, result, Path(repo))
            if cfg is None:
                unresolved.append(f"{rel} (micro-batch {result.get('micro_batch')})")
                continue
            m = Measurement(rate=float(result["images_per_s"]), micro_batch=int(result["micro_batch"]),
                            data=str(result.get("data", "synthetic")), device=device, date=str(record.get("date", "?")),
                            file=rel, variant=" ".join(result.get("overrides", [])),
                            peak_mem_gib=result.get("peak_mem_gib"))
            entries.append(_Entry(rate_key(cfg), m))
    return tuple(entries), tuple(unresolved)


def default_bench_dir() -> Path:
    """``bench/`` of the checkout this maescale is imported from."""
    return Path(__file__).resolve().parents[2] / "bench"


def find_rates(cfg: Config, bench_dir: str | os.PathLike | None = None) -> tuple[list[Measurement], list[str]]:
    """(the measurements that apply to ``cfg``, notes on what could not be used)."""
    bench = Path(bench_dir) if bench_dir is not None else default_bench_dir()
    if not bench.is_dir():
        return [], [f"no benchmark directory {bench}"]
    repo = bench.resolve().parent
    stamp = tuple((str(p), p.stat().st_mtime) for p in sorted(bench.rglob("*.json")))
    entries, unresolved = _entries(str(bench.resolve()), str(repo), stamp)
    key = rate_key(cfg)
    found: list[Measurement] = []
    for source in data_sources(cfg):
        found = [e.measurement for e in entries if e.key == key and e.measurement.data == source]
        if found:
            break
    notes = []
    if unresolved:
        notes.append(f"{len(unresolved)} benchmark result(s) not used: the config they ran cannot be reconstructed "
                     f"here (no git history of configs/?): {', '.join(unresolved[:3])}{' ...' if len(unresolved) > 3 else ''}")
    return sorted(found, key=lambda m: m.rate), notes
