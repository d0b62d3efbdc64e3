"""The offline probe (``tools/probe.py``): kNN and linear-probe accuracy of an encoder on
labelled shards.

``probe_encoder(SOURCE, train, val, options)`` reads the encoder with
:func:`maescale.export.load_source` (a run directory, a checkpoint directory of any ZeRO stage, an
exported encoder ``.pth``/``.safetensors`` or a public MAE ``.pth``), extracts ``cls`` and
``avgpool`` features (:mod:`maescale.probe.features`) of both splits once with the centre-crop
transform and the source's normalisation (bf16 autocast on GPU, float32 on CPU), and runs

* weighted kNN (:mod:`maescale.probe.knn`; every process, it is cheap), and
* the MAE paper's linear probe (:mod:`maescale.probe.linear`; rank 0, on the cached features),

on both feature kinds. Under ``torchrun``/``srun`` every process extracts its share and the
features are all-gathered, so the numbers do not depend on the number of processes. Rank 0
returns the report: a dict written as JSON (fractions in [0, 1]) and a table (percent).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from maescale import __version__
from maescale.distributed import detect_env, init_distributed, select_device
from maescale.export import Source, load_source, model_from_source
from maescale.probe.data import CenterCropTransform, Split, class_names
from maescale.probe.features import FEATURE_KINDS, Features, extract_features
from maescale.probe.knn import DEFAULT_K, DEFAULT_TEMPERATURE, knn_accuracy
from maescale.probe.linear import LinearProbeConfig, train_linear_probe
from maescale.rundir import tag_for_step, write_json_atomic

log = logging.getLogger(__name__)

FORMAT_TAG = "maescale-probe/1"
METHODS = ("knn", "linear")
FEATURE_DOC = {
    "cls": "class token after the encoder's final LayerNorm (MAE linear probe, global_pool=False)",
    "avgpool": "patch tokens averaged before the final norm, then LayerNorm without affine (MAE global_pool=True)",
}


@dataclass
class ProbeOptions:
    """What :func:`probe_encoder` runs and how."""

    methods: tuple[str, ...] = METHODS
    k: int = DEFAULT_K
    temperature: float = DEFAULT_TEMPERATURE
    linear: LinearProbeConfig = field(default_factory=LinearProbeConfig)
    batch_size: int = 128  # images per forward pass, per process
    workers: int = 4  # decoding threads per process
    per_class: bool = False
    progress: bool = True

    def check(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {', '.join(METHODS)}, got {list(self.methods)}")
        if self.k < 1 or self.temperature <= 0:
            raise ValueError(f"kNN needs k >= 1 and temperature > 0, got k={self.k}, temperature={self.temperature}")
        if self.batch_size < 1 or self.workers < 0:
            raise ValueError(f"need batch size >= 1 and workers >= 0, got {self.batch_size}, {self.workers}")
        if "linear" in self.methods:
            self.linear.check()


@dataclass
class Processes:
    """This process's place in the probe job."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    group: object = None  # CPU (gloo) group for small agreements


def join_processes(device: str = "auto") -> Processes:
    """One process, or one of several under ``torchrun``/``srun`` (a process group is set up
    then, NCCL on GPUs, gloo on CPUs, as for training)."""
    env = detect_env()
    if env.world_size > 1:
        ctx = init_distributed(device)
        return Processes(ctx.env.rank, ctx.env.world_size, ctx.device, ctx.control_group)
    return Processes(0, 1, select_device(env, device), None)


def default_output(report: dict[str, Any], source: str | os.PathLike) -> Path:
    """``RUN/eval/probe_step_XXXXXXXX.json`` for a run's checkpoint, else ``NAME.probe.json``
    in the current directory."""
    src = report["source"]
    if src.get("run_dir") and src.get("step") is not None:
        return Path(src["run_dir"]) / "eval" / f"probe_{tag_for_step(src['step'])}.json"
    return Path(Path(source).name.split(".")[0] + ".probe.json")


def probe_encoder(source: str | os.PathLike, train: Split, val: Split, options: ProbeOptions | None = None, *,
                  step: int | None = None, model: str | None = None, procs: Processes | None = None) -> dict[str, Any]:
    """Probe the encoder of ``source`` (see the module docstring); returns the report on every
    process (linear-probe numbers on rank 0 only). Raises :class:`maescale.export.ExportError`
    for an unreadable or mismatched source, :class:`maescale.data.DataError` for bad shards
    (no labels, an empty split), ``ValueError`` for bad options."""
    options = options or ProbeOptions()
    options.check()
    procs = procs or Processes()
    t0 = time.perf_counter()
    src = load_source(source, step, model)
    for note in src.notes:
        log.info("%s", note)
    encoder = model_from_source(src, device=procs.device)
    transform = CenterCropTransform(src.img_size)
    on_gpu = procs.device.type == "cuda"
    common = dict(device=procs.device, mean=src.mean, std=src.std, batch_size=options.batch_size, rank=procs.rank,
                  world=procs.world, group=procs.group, workers=options.workers,
                  autocast_dtype=torch.bfloat16 if on_gpu else None, progress=options.progress)
    log.info("probing %s (%s, %d px) on %s: train %s; val %s", src.path, src.model_name, src.img_size, procs.device,
             train.describe(), val.describe())
    train_f = extract_features(encoder, train, transform, **common)
    val_f = extract_features(encoder, val, transform, **common)
    t_feat = time.perf_counter() - t0
    num_classes = int(max(train_f.labels.max(), val_f.labels.max())) + 1
    names = class_names(train)
    report = _report_head(src, train_f, val_f, num_classes, names, transform, procs, on_gpu)
    report["seconds"] = {"load_and_features": t_feat}
    if "knn" in options.methods:
        t = time.perf_counter()
        report["knn"] = {"k": options.k, "temperature": options.temperature, **{
            kind: knn_accuracy(train_f.feats[kind], train_f.labels, val_f.feats[kind], val_f.labels, num_classes,
                               options.k, options.temperature).to_json(names, options.per_class)
            for kind in FEATURE_KINDS}}
        report["seconds"]["knn"] = time.perf_counter() - t
    if "linear" in options.methods and procs.rank == 0:  # on cached features: one process is plenty
        t = time.perf_counter()
        report["linear"] = {"config": asdict(options.linear)}
        for kind in FEATURE_KINDS:
            result = train_linear_probe(train_f.feats[kind], train_f.labels, val_f.feats[kind], val_f.labels,
                                        num_classes, options.linear)
            scores = result.to_json(names, options.per_class)
            report["linear"][kind] = {k: v for k, v in scores.items() if k != "config"}
        report["seconds"]["linear"] = time.perf_counter() - t
    return report


def _report_head(src: Source, train_f: Features, val_f: Features, num_classes: int, names: list[str] | None,
                 transform: CenterCropTransform, procs: Processes, on_gpu: bool) -> dict[str, Any]:
    def split_info(f: Features) -> dict[str, Any]:
        return {"description": f.split.describe(), "shards": list(f.split.urls), "samples": len(f),
                "undecodable_skipped": f.bad}

    return {
        "format": FORMAT_TAG,
        "maescale_version": __version__,
        "source": {"path": str(src.path.resolve()), "kind": src.kind,
                   "run_dir": str(src.run_dir.resolve()) if src.run_dir else None, "step": src.step,
                   "model": src.model_name, "img_size": src.img_size, "patch_size": src.patch_size,
                   "mean": list(src.mean), "std": list(src.std), "notes": list(src.notes)},
        "data": {"train": split_info(train_f), "val": split_info(val_f), "classes": num_classes,
                 "class_names": names, "transform": transform.describe()},
        "features": FEATURE_DOC,
        "precision": "bfloat16 autocast" if on_gpu else "float32",
        "processes": procs.world,
        "device": str(procs.device),
    }


def write_report(report: dict[str, Any], output: str | os.PathLike) -> Path:
    """Write the report as JSON, atomically."""
    path = Path(output)
    write_json_atomic(path, report, indent=2)
    return path


def format_table(report: dict[str, Any]) -> str:
    """The report as a small table (accuracies in percent)."""
    src, data = report["source"], report["data"]
    where = src["path"] + (f" (step {src['step']})" if src.get("step") is not None else "")
    k5 = "top-5" if data["classes"] >= 5 else f"top-{data['classes']}"
    lines = [f"probe of {where}: {src['model']}, {src['img_size']} px, {report['precision']}, "
             f"{report['processes']} process(es)",
             f"  {data['train']['samples']} train / {data['val']['samples']} val images, {data['classes']} classes",
             f"  {'method':<10}{'features':<10}{'top-1':>8}{k5:>8}"]
    for method, label in (("knn", f"kNN k={report.get('knn', {}).get('k')}"), ("linear", "linear")):
        if method not in report:
            continue
        for kind in FEATURE_KINDS:
            r = report[method][kind]
            lines.append(f"  {label if kind == FEATURE_KINDS[0] else '':<10}{kind:<10}{100 * r['top1']:>8.2f}"
                         f"{100 * r['top5']:>8.2f}")
    return "\n".join(lines)


def format_history(history: dict[str, Any]) -> str:
    """The in-loop kNN history of a run (``output_dir/eval/knn.json``) as a table."""
    lines = [f"in-loop kNN ({history.get('features', 'cls')} features, k={history.get('k')}, "
             f"T={history.get('temperature')}): val {history.get('val')}; memory bank {history.get('train')}",
             f"  {'step':>8}{'top-1':>8}{'top-5':>8}{'cls':>8}{'avgpool':>9}"]
    for h in history.get("history", []):
        lines.append(f"  {h['step']:>8}{100 * h['top1']:>8.2f}{100 * h['top5']:>8.2f}{100 * h['cls']['top1']:>8.2f}"
                     f"{100 * h['avgpool']['top1']:>9.2f}")
    return "\n".join(lines)


__all__ = ["METHODS", "ProbeOptions", "Processes", "default_output", "format_history", "format_table",
           "join_processes", "probe_encoder", "write_report"]

