"""Reading a source to export or probe: a run directory, one checkpoint directory (any ZeRO
stage, consolidated through :mod:`maescale.checkpoint`) or a weights file, as a :class:`Source`
(float32 MAE-named weights plus the model they belong to: preset, image and patch size, channels,
normalisation), checked to fit that model exactly."""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from maescale.checkpoint import (MANIFEST, TRAINER_STATE, CheckpointError, consolidated_state_dict,
                                 read_trainer_state, validate_checkpoint)
from maescale.config import IMAGENET_MEAN, IMAGENET_STD
from maescale.export.convert import shape_problems
from maescale.export.errors import ExportError
from maescale.export.files import FORMAT_TAG, clean_state, read_weights_file
from maescale.models import DECODER_KEYS, PRESETS, MaskedAutoencoderViT
from maescale.rundir import CHECKPOINTS, CONFIG, LATEST, PARTIAL, RunDir, step_of

log = logging.getLogger("maescale.export")


@dataclass
class Source:
    """Weights (MAE names, float32) and what is known about the model they belong to."""

    path: Path  # the checkpoint directory or file that was read
    kind: str  # "checkpoint" (a run's checkpoint directory) or "file"
    state: dict[str, torch.Tensor]
    model_name: str
    img_size: int
    patch_size: int
    in_chans: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    norm_pix_loss: bool = True
    mask_ratio: float = 0.75
    run_dir: Path | None = None
    step: int | None = None
    model_inferred: bool = False
    notes: list[str] = field(default_factory=list)  # what was inferred or assumed

    @property
    def has_decoder(self) -> bool:
        return any(k.startswith(DECODER_KEYS) for k in self.state)

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size


def find_checkpoint(path: Path, step: int | None = None) -> tuple[Path, Path | None]:
    """``(checkpoint directory, run directory or None)`` for a run dir (``latest`` or ``step``),
    its ``checkpoints/`` folder, or a checkpoint directory itself."""
    if (path / CHECKPOINTS).is_dir() or (path / LATEST).is_file():
        run = RunDir(path if (path / CHECKPOINTS).is_dir() else path.parent)
        available = run.list_checkpoints()
        if step is not None:
            ckpt = run.checkpoint(step)
            if not ckpt.is_dir():
                have = ", ".join(str(s) for s, _ in sorted(available)) or "none"
                raise ExportError(f"{run.checkpoints} has no checkpoint of step {step} (steps there: {have})")
            return ckpt, run.path
        latest = run.latest()
        if latest is not None and latest.is_dir():
            return latest, run.path
        if available:
            log.warning("%s: no valid 'latest' pointer; using the newest checkpoint %s", run.checkpoints,
                        available[0][1].name)
            return available[0][1], run.path
        raise ExportError(f"{path} holds no checkpoint: {run.checkpoints} has no 'latest' and no step_* directories")
    if path.name.endswith(PARTIAL):
        raise ExportError(f"{path} is an incomplete checkpoint (an interrupted save); use a complete one")
    tag_step = step_of(path)
    if tag_step is not None or (path / MANIFEST).is_file() or (path / TRAINER_STATE).is_file():
        if step is not None and tag_step is not None and tag_step != step:
            raise ExportError(f"step={step} contradicts the checkpoint directory {path}; pass the run directory "
                              "to choose a step")
        run_dir = path.parent.parent if path.parent.name == CHECKPOINTS else None
        return path, run_dir
    raise ExportError(f"{path} holds no checkpoint: expected a run directory (with checkpoints/), a checkpoint "
                      "directory (checkpoints/step_XXXXXXXX) or a .pth/.safetensors weights file")


def load_source(path: str | os.PathLike, step: int | None = None, model: str | None = None) -> Source:
    """Read the weights and model facts of a run directory, checkpoint directory or file."""
    p = Path(path)
    if model is not None and model not in PRESETS:
        raise ExportError(f"unknown model preset '{model}'; known: {', '.join(PRESETS)}")
    if not p.exists():
        raise ExportError(f"{p}: no such file or directory")
    if p.is_dir():
        ckpt, run_dir = find_checkpoint(p, step)
        try:
            return _load_checkpoint_dir(ckpt, run_dir, model)
        except ExportError as exc:
            others = [s for s, c in RunDir(ckpt.parent.parent).list_checkpoints() if c != ckpt]
            if step is None and others and ckpt.resolve() != p.resolve():  # chosen through 'latest'
                raise ExportError(f"{exc} (--step N exports another checkpoint of the run; steps there: "
                                  f"{', '.join(str(s) for s in sorted(others))})") from None
            raise
    if step is not None:
        raise ExportError(f"step={step} selects a checkpoint of a run directory, but {p} is a file")
    return _load_weights_file(p, model)


def _read_config(ckpt: Path, run_dir: Path | None) -> tuple[dict[str, Any], Path] | None:
    import yaml

    for candidate in (ckpt / CONFIG, RunDir(run_dir).config if run_dir else None):
        if candidate is not None and candidate.is_file():
            try:
                raw = yaml.safe_load(candidate.read_text()) or {}
            except yaml.YAMLError as exc:
                raise ExportError(f"{candidate} is not valid YAML: {exc}") from None
            if not isinstance(raw, dict):
                raise ExportError(f"{candidate} does not hold a config mapping")
            return raw, candidate
    return None


def _checkpoint_step(ckpt: Path) -> int | None:
    """The step its trainer state records, else the one its name says."""
    try:
        return int(read_trainer_state(ckpt)["step"])
    except (CheckpointError, ValueError, KeyError, TypeError):
        return step_of(ckpt)


def _load_checkpoint_dir(ckpt: Path, run_dir: Path | None, model: str | None) -> Source:
    from maescale.config import DataConfig, ModelConfig

    try:
        validate_checkpoint(ckpt)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    step = _checkpoint_step(ckpt)
    try:
        state = consolidated_state_dict(ckpt)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - DeepSpeed/torch raise many kinds on bad files
        raise ExportError(f"cannot read the weights of checkpoint {ckpt} (corrupt?): {type(exc).__name__}: {exc}") \
            from None
    state = clean_state(state, ckpt)
    found = _read_config(ckpt, run_dir)
    src_kwargs: dict[str, Any] = {"path": ckpt, "kind": "checkpoint", "run_dir": run_dir, "step": step}
    if found is None:
        src = _describe_by_shapes(state, model, src_kwargs, where=f"checkpoint {ckpt} (it has no config.yaml)")
    else:
        raw, cfg_path = found
        m, d = raw.get("model") or {}, raw.get("data") or {}
        mdef, ddef = ModelConfig(), DataConfig()
        name = m.get("name", mdef.name)
        if model is not None and model != name:
            raise ExportError(f"model={model} contradicts {cfg_path} (model.name={name}); leave --model out for "
                              "checkpoints of a run")
        if name not in PRESETS:
            raise ExportError(f"{cfg_path}: model.name={name!r} is not a known preset ({', '.join(PRESETS)})")
        src = Source(state=state, model_name=name, img_size=int(m.get("img_size", mdef.img_size)),
                     patch_size=PRESETS[name].patch_size, in_chans=int(m.get("in_chans", mdef.in_chans)),
                     mean=tuple(d.get("mean", ddef.mean)), std=tuple(d.get("std", ddef.std)),
                     norm_pix_loss=bool(m.get("norm_pix_loss", mdef.norm_pix_loss)),
                     mask_ratio=float(m.get("mask_ratio", mdef.mask_ratio)), **src_kwargs)
        _check_fits(src, f"the model its config names ({cfg_path}: model.name={name}, "
                         f"model.img_size={src.img_size}, model.in_chans={src.in_chans})")
    return src


def _load_weights_file(path: Path, model: str | None) -> Source:
    state, meta = read_weights_file(path)
    src_kwargs: dict[str, Any] = {"path": path, "kind": "file"}
    if isinstance(meta, dict) and meta.get("format") == FORMAT_TAG:  # a file the export wrote
        src_kwargs.update(mean=tuple(meta.get("mean", IMAGENET_MEAN)), std=tuple(meta.get("std", IMAGENET_STD)))
        if model is None and meta.get("model") in PRESETS:
            model = meta["model"]
            src = _describe_by_shapes(state, model, src_kwargs, where=str(path))
            src.notes.append(f"model {model} from the file's maescale metadata")
            return src
    src = _describe_by_shapes(state, model, src_kwargs, where=str(path))
    if not isinstance(meta, dict):
        src.notes.append(f"normalisation mean/std not recorded in {path.name}; assuming ImageNet's")
    return src


def _describe_by_shapes(state: dict[str, torch.Tensor], model: str | None, src_kwargs: dict[str, Any],
                        where: str) -> Source:
    """Source for weights whose preset is given (``model``) or inferred from tensor shapes; the
    patch size, image size and channels always come from the shapes."""
    for key in ("patch_embed.proj.weight", "pos_embed"):
        if key not in state:
            raise ExportError(f"{where} is not an MAE/ViT state dict: it has no '{key}' "
                              f"(keys: {', '.join(list(state)[:5])} ...)")
    w, pos = state["patch_embed.proj.weight"], state["pos_embed"]
    if w.ndim != 4 or w.shape[-1] != w.shape[-2] or pos.ndim != 3:
        raise ExportError(f"{where}: unexpected shapes patch_embed.proj.weight {tuple(w.shape)}, "
                          f"pos_embed {tuple(pos.shape)}")
    patch, in_chans = int(w.shape[-1]), int(w.shape[1])
    grid = math.isqrt(pos.shape[1] - 1)
    if grid * grid != pos.shape[1] - 1:
        raise ExportError(f"{where}: pos_embed {tuple(pos.shape)} is not a square grid plus a cls position")
    inferred = model is None
    if model is None:
        model = infer_preset(state, where)
    src = Source(state=state, model_name=model, img_size=grid * patch, patch_size=patch, in_chans=in_chans,
                 model_inferred=inferred, **src_kwargs)
    if inferred:
        a = PRESETS[model]
        src.notes.append(f"model preset {model} inferred from the weights' shapes (embed dim {a.embed_dim}, depth "
                         f"{a.depth}, patch size {patch}, image size {src.img_size}); pass --model to choose another")
    _check_fits(src, f"model {model} with patch size {patch} and image size {src.img_size}")
    return src


def infer_preset(state: dict[str, torch.Tensor], where: str = "weights") -> str:
    """The preset whose encoder (and decoder, if present) has these shapes."""
    dim = int(state["pos_embed"].shape[-1])
    depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    hidden = int(state["blocks.0.mlp.fc1.weight"].shape[0]) if "blocks.0.mlp.fc1.weight" in state else None
    patch = int(state["patch_embed.proj.weight"].shape[-1])
    found = [n for n, a in PRESETS.items()
             if a.embed_dim == dim and a.depth == depth and (hidden is None or int(dim * a.mlp_ratio) == hidden)]
    if "decoder_embed.weight" in state:
        ddepth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"decoder_blocks\.(\d+)\.", k))), default=-1)
        found = [n for n in found if PRESETS[n].decoder_embed_dim == state["decoder_embed.weight"].shape[0]
                 and PRESETS[n].decoder_depth == ddepth]
    same_patch = [n for n in found if PRESETS[n].patch_size == patch]
    found = same_patch or found
    facts = f"embed dim {dim}, depth {depth}, MLP width {hidden}, patch size {patch}"
    if not found:
        raise ExportError(f"{where}: no model preset has these shapes ({facts}); known: {', '.join(PRESETS)}. "
                          "Pass --model NAME for a preset with this embed dim and depth")
    if len(found) > 1:
        raise ExportError(f"{where}: several presets fit the shapes ({facts}): {', '.join(found)}; pass --model NAME")
    return found[0]


def _meta_model(name: str, img_size: int, patch_size: int, in_chans: int, **kwargs: Any) -> MaskedAutoencoderViT:
    arch = {**PRESETS[name].as_kwargs(), "patch_size": patch_size}
    return MaskedAutoencoderViT(img_size=img_size, in_chans=in_chans, device="meta", **arch, **kwargs)


def _check_fits(src: Source, what: str) -> None:
    """Raise unless the encoder (and the decoder, where present) has exactly ``what``'s shapes."""
    if src.img_size % src.patch_size:
        raise ExportError(f"{src.path}: image size {src.img_size} is not a multiple of patch size {src.patch_size}")
    own = _meta_model(src.model_name, src.img_size, src.patch_size, src.in_chans).state_dict()
    if not src.has_decoder:
        own = {k: v for k, v in own.items() if not k.startswith(DECODER_KEYS)}
    problems = shape_problems(src.state, own)
    if problems:
        more = f" (and {len(problems) - 6} more)" if len(problems) > 6 else ""
        raise ExportError(f"the weights of {src.path} do not match {what}: {'; '.join(problems[:6])}{more}")


def model_from_source(src: Source, *, state: dict[str, torch.Tensor] | None = None, img_size: int | None = None,
                      patch_size: int | None = None, with_decoder: bool = False,
                      device: str | torch.device = "cpu") -> MaskedAutoencoderViT:
    """An eval-mode :class:`MaskedAutoencoderViT` on ``device`` holding ``state`` (default: the
    source's weights) at the given geometry; without the decoder its decoder stays unmaterialised
    (on the meta device: :meth:`forward_features` works, :meth:`forward` does not)."""
    state = src.state if state is None else state
    model = _meta_model(src.model_name, img_size or src.img_size, patch_size or src.patch_size, src.in_chans,
                        norm_pix_loss=src.norm_pix_loss, mask_ratio=src.mask_ratio)
    wanted = {k: v.to(device) for k, v in state.items() if with_decoder or not k.startswith(DECODER_KEYS)}
    result = model.load_state_dict(wanted, strict=False, assign=True)
    missing = [k for k in result.missing_keys if with_decoder or not k.startswith(DECODER_KEYS)]
    if missing or result.unexpected_keys:
        raise ExportError(f"{src.path}: missing {missing[:5]}, unexpected {list(result.unexpected_keys)[:5]}")
    return model.eval()
