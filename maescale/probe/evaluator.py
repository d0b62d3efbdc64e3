"""kNN evaluation inside the training loop (the ``eval:`` config section).

The loop calls ``evaluator.maybe_run(step, model)`` after every step (and once at step 0, before
the first one). When an evaluation is due (every ``eval.every_steps`` steps, at the last step, and
at step 0 with ``eval.at_start``) every process extracts features of its share of a fixed labelled
subset with the current encoder (``engine.module``), the features are all-gathered, and a
weighted kNN (:mod:`maescale.probe.knn`) classifies the validation images against the memory bank.
Rank 0 logs ``eval/knn_top1`` and ``eval/knn_top5`` (of ``eval.features``) plus both feature
kinds to TensorBoard and the log, and keeps the history in ``output_dir/eval/knn.json``.

It must not change the training trajectory, and does not:

* the Python, NumPy, torch CPU and CUDA generator states are captured before and restored after
  (the trainer's mask generator is never touched);
* every module's train/eval mode is recorded, the model is put in eval mode and each module's
  mode is restored afterwards;
* the evaluation data comes from its own reader over its own shards (:mod:`maescale.probe.data`,
  deterministic centre crops), so the training stream's position and its workers are untouched;
* features are computed under ``torch.no_grad()`` through ``forward_features``, not through the
  engine, so no gradient, optimizer or engine counter moves.

A run with evaluation on ends with bitwise the same parameters as one with it off (tested on
CPU), and a stop signal that arrives during an evaluation is handled at the end of that step, as
any other: the loop's stop check comes after the evaluation.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from maescale.checkpoint import capture_rng, restore_rng
from maescale.config import Config
from maescale.faults import fault_point
from maescale.probe.data import CenterCropTransform, make_splits
from maescale.probe.features import FEATURE_KINDS, extract_features
from maescale.probe.knn import knn_accuracy
from maescale.rundir import write_json_atomic

log = logging.getLogger(__name__)

EVAL_DIR = "eval"
HISTORY = "knn.json"


def history_path(run_dir: str | Path) -> Path:
    """``output_dir/eval/knn.json``: the in-loop kNN results of a run, one entry per evaluation."""
    return Path(run_dir) / EVAL_DIR / HISTORY


def read_history(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's kNN history (see :func:`history_path`), or None if it has none."""
    path = history_path(run_dir)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} cannot be read as JSON: {exc}") from None


def comparison_line(history: dict[str, Any]) -> str | None:
    """``kNN top-1 on N held-out images: trained X, at init Y`` from a history with an entry at
    step 0 and a later one (the newest), else None."""
    entries = history.get("history", [])
    init = next((h for h in entries if h["step"] == 0), None)
    last = entries[-1] if entries else None
    if init is None or last is None or last["step"] == 0:
        return None
    return (f"kNN top-1 on {last['val_samples']} held-out images: trained {last['top1']:.2f}, "
            f"at init {init['top1']:.2f} (step {last['step']} vs step 0; {history.get('features', 'cls')} features, "
            f"k={history.get('k')}, memory bank of {last['train_samples']})")


class Evaluator:
    """The in-loop kNN evaluation; a no-op while ``eval.every_steps`` is 0."""

    def __init__(self, cfg: Config, *, rank: int, world: int, device: torch.device, group: object, tb: Any,
                 run_dir: str | Path, total_steps: int):
        e = cfg.eval
        self.cfg, self.rank, self.world, self.device, self.group, self.tb = cfg, rank, world, device, group, tb
        self.total_steps = total_steps
        self.enabled = e.every_steps > 0
        self.path = history_path(run_dir)
        self.history: list[dict[str, Any]] = []
        if not self.enabled:
            return
        self.train_split, self.val_split = make_splits(
            e.train_shards, e.val_shards or None, train_key="eval.train_shards", val_key="eval.val_shards",
            val_fraction=e.val_fraction, split_seed=e.split_seed, max_train_samples=e.max_train_samples,
            max_val_samples=e.max_val_samples)
        self.transform = CenterCropTransform(cfg.model.img_size, cfg.data.interpolation, cfg.data.max_image_pixels)
        if rank == 0:
            try:
                old = read_history(run_dir)
            except ValueError as exc:  # a damaged history must not stop the training
                log.warning("%s; starting a new kNN history", exc)
                old = None
            self.history = list(old.get("history", [])) if old else []

    def due(self, step: int) -> bool:
        """Whether the evaluation runs after ``step`` (step 0: before the first step)."""
        e = self.cfg.eval
        if not self.enabled:
            return False
        if step == 0:
            return e.at_start
        return step % e.every_steps == 0 or step == self.total_steps

    def maybe_run(self, step: int, model: torch.nn.Module) -> dict[str, float] | None:
        """Evaluate ``model`` (``engine.module``) if due at ``step``; every process must call
        this at the same steps. Returns the logged metrics (on every rank), or None."""
        if not self.due(step):
            return None
        t0 = time.perf_counter()
        rng = capture_rng()
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            results = self._evaluate(step, model)
        finally:
            for m, mode in modes:
                m.train(mode)
            restore_rng(rng)
        seconds = time.perf_counter() - t0
        primary = results[self.cfg.eval.features]
        metrics = {"eval/knn_top1": primary.top1, "eval/knn_top5": primary.top5, "eval/seconds": seconds}
        for kind in FEATURE_KINDS:
            metrics[f"eval/knn_{kind}_top1"] = results[kind].top1
            metrics[f"eval/knn_{kind}_top5"] = results[kind].top5
        self.tb.scalars(step, metrics)
        if self.rank == 0:
            self._record(step, results, seconds)
        return metrics

    def _evaluate(self, step: int, model: torch.nn.Module) -> dict[str, Any]:
        e, d = self.cfg.eval, self.cfg.data
        common = dict(device=self.device, mean=d.mean, std=d.std, batch_size=e.batch_size, rank=self.rank,
                      world=self.world, group=self.group)
        bank = extract_features(model, self.train_split, self.transform, **common)
        fault_point("eval.features", step)  # tests: widen the window for a signal during evaluation
        queries = extract_features(model, self.val_split, self.transform, **common)
        self._sizes = (len(bank), len(queries))
        num_classes = int(max(bank.labels.max(), queries.labels.max())) + 1
        return {kind: knn_accuracy(bank.feats[kind], bank.labels, queries.feats[kind], queries.labels, num_classes,
                                   k=e.k, temperature=e.temperature) for kind in FEATURE_KINDS}

    def _record(self, step: int, results: dict[str, Any], seconds: float) -> None:
        e = self.cfg.eval
        n_bank, n_val = self._sizes
        primary = results[e.features]
        other = [k for k in FEATURE_KINDS if k != e.features][0]
        log.info("eval at step %d: kNN top-1 %.4f top-5 %.4f (%s; %s %.4f / %.4f) on %d images against %d, %.1f s",
                 step, primary.top1, primary.top5, e.features, other, results[other].top1, results[other].top5,
                 n_val, n_bank, seconds)
        entry = {"step": step, "top1": primary.top1, "top5": primary.top5, "val_samples": n_val,
                 "train_samples": n_bank, "seconds": seconds,
                 **{kind: {"top1": results[kind].top1, "top5": results[kind].top5} for kind in FEATURE_KINDS}}
        # Entries from beyond the checkpoint a run resumed from are superseded by the new ones.
        self.history = [h for h in self.history if h["step"] < step] + [entry]
        write_json_atomic(self.path, {"features": e.features, "k": e.k, "temperature": e.temperature,
                                      "train": self.train_split.describe(), "val": self.val_split.describe(),
                                      "transform": self.transform.describe(), "history": self.history}, indent=2)
        if step == self.total_steps:
            line = comparison_line({"features": e.features, "k": e.k, "history": self.history})
            if line:
                log.info("%s", line)


def build_evaluator(cfg: Config, *, rank: int, world: int, device: torch.device, group: object, tb: Any,
                    run_dir: str | Path, total_steps: int) -> Evaluator:
    """The loop's evaluator (disabled unless ``eval.every_steps`` > 0); checks the shard patterns
    now, so a typo fails at start-up rather than at the first evaluation."""
    return Evaluator(cfg, rank=rank, world=world, device=device, group=group, tb=tb, run_dir=run_dir,
                     total_steps=total_steps)
