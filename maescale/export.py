"""Export the encoder of an MAE as a timm ``VisionTransformer`` checkpoint (for ViTDet too).

``export_encoder(SOURCE, OUTPUT)`` reads

* a run directory (``output_dir``: its ``latest`` checkpoint, or ``step=N``),
* one checkpoint directory (``output_dir/checkpoints/step_XXXXXXXX``), any ZeRO stage: the
  weights are consolidated to fp32 with DeepSpeed's own ``zero_to_fp32``
  (:func:`maescale.checkpoint.consolidated_state_dict`); the preset and image size come from
  the checkpoint's ``config.yaml``,
* or a ``{"model": state_dict}`` file with the original MAE names (a public MAE checkpoint, full
  with decoder or encoder-only, or a file this module wrote: ``.pth`` or ``.safetensors``). Its
  preset is inferred from the tensor shapes (embed dim, depth, MLP width, patch size; said so in
  :attr:`ExportResult.notes`) unless ``model=NAME`` is given,

and writes the encoder only, with timm ``VisionTransformer`` names (``cls_token``, ``pos_embed``,
``patch_embed.proj.*``, ``blocks.N.*``, ``norm.*``; no decoder, no ``mask_token``):

* ``.pth``: ``{"model": state_dict, "maescale": metadata}``; timm's loader reads ``"model"``
  and ignores the rest, detectron2's ``DetectionCheckpointer`` likewise;
* ``.safetensors``: the flat state dict, metadata as JSON under the header key ``"maescale"``;
* always a sidecar ``OUTPUT.json``: the metadata plus the verification results.

The metadata names the maescale version, the source (path, run, step), the preset, the image and
patch size (and those of pretraining if resampled), the normalisation mean/std, and the timm
model name and keyword arguments to build it with::

    timm.create_model(meta["timm"]["model_name"], num_classes=0, checkpoint_path=OUTPUT,
                      **meta["timm"]["kwargs"])

Resampling for detection: ``img_size`` resamples ``pos_embed`` bicubically to another grid
(the cls position is kept as is); ``patch_size`` resamples the patch projection with timm's
``resample_patch_embed`` (FlexiViT's pseudo-inverse resize: on an image resized by
``new/old``, each patch's embedding is what the old kernel gave on the old patch), e.g. ViT-H/14
-> /16 for ViTDet, whose ViT-H backbone is patch 16 with ``pretrain_img_size=224``. The image
size stays the same when only the patch size changes, so /16 at 224 gives the 14x14 grid (197
positions) that ViTDet's ViT-H expects.

Verification (on by default) loads the written file with
``timm.create_model(name, num_classes=0, checkpoint_path=FILE, **kwargs)`` (timm loads strictly:
every key, every shape) and compares ``forward_features`` (all tokens after the final norm) on a
fixed batch of two N(0, 1) images against maescale's encoder in float32:

* exactness: against maescale's encoder holding exactly the exported weights (after resampling;
  rounded to bf16 for a bf16 export), error ``max|timm - maescale| / max|maescale|`` at most
  :data:`FP32_RTOL` = 1e-5;
* bf16 exports also against the float32 weights: the same relative error at most
  :data:`BF16_RTOL` = 5e-2 (bf16 keeps 8 significant bits; MAE-initialised ViT-Tiny ... ViT-B
  measure ~3e-3, a briefly trained tiny model 8e-3);
* resampled exports (``img_size``/``patch_size`` changed), the semantic check: two smooth images
  (4x4 Gaussian noise upsampled bicubically to the original size) go through the original
  encoder at the original size, and, resized bicubically to the export size, through the timm
  model. Both patch-token grids are average-pooled to the smaller grid; the mean cosine
  similarity of corresponding patch tokens and the smallest cosine similarity of the cls tokens
  must both reach :data:`MIN_COSINE` = 0.95 (``min_cosine`` to change it). Correct resampling
  of MAE-initialised ViT-Tiny/4 ... ViT-B/16 scores 0.976-0.999 (32 -> 128 px, 224 -> 448 px,
  /14 -> /16); a transposed position grid scores 0.88-0.96, a naively interpolated patch kernel
  0.68-0.97, so the check catches gross mistakes, not subtle ones.

A failed check raises :class:`ExportError`. Files are written to a temporary name beside the
output, verified there and only then renamed into place (sidecar first, weights last); on any
error nothing new is left behind and an existing output (``force=True``) is untouched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from maescale import __version__
from maescale.checkpoint import (MANIFEST, TRAINER_STATE, CheckpointError, consolidated_state_dict,
                                 validate_checkpoint)
from maescale.config import IMAGENET_MEAN, IMAGENET_STD
from maescale.models import DECODER_KEYS, PRESETS, MaskedAutoencoderViT, timm_encoder_kwargs
from maescale.rundir import CHECKPOINTS, CONFIG, LATEST, PARTIAL, RunDir, atomic_output, step_of, write_json_atomic

log = logging.getLogger(__name__)

FP32_RTOL = 1e-5  # float32 export: max |timm - maescale| / max |maescale| over the features
BF16_RTOL = 5e-2  # bfloat16 export vs the float32 weights (same measure)
MIN_COSINE = 0.95  # resampled export: patch-token (mean) and cls (min) cosine similarity
META_KEY = "maescale"  # top-level key (.pth) / header key (.safetensors) holding the metadata
FORMAT_TAG = "maescale-encoder/1"
FORMATS = ("torch", "safetensors")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
VERIFY_BATCH = 2


class ExportError(RuntimeError):
    """An export cannot be done (bad input, bad output path, failed verification)."""


# --------------------------------------------------------------------------------------------
# Reading a source: run directory, checkpoint directory or weights file
# --------------------------------------------------------------------------------------------


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


def _load_checkpoint_dir(ckpt: Path, run_dir: Path | None, model: str | None) -> Source:
    from maescale.config import DataConfig, ModelConfig

    try:
        validate_checkpoint(ckpt)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    step = None
    try:
        step = int(json.loads((ckpt / TRAINER_STATE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        step = step_of(ckpt)
    try:
        state = consolidated_state_dict(ckpt)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - DeepSpeed/torch raise many kinds on bad files
        raise ExportError(f"cannot read the weights of checkpoint {ckpt} (corrupt?): {type(exc).__name__}: {exc}") \
            from None
    state = _clean_state(state, ckpt)
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


def _clean_state(state: Any, where: Path) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict) or not state:
        raise ExportError(f"{where}: expected a state dict of tensors, got {type(state).__name__}")
    out = {}
    for k, v in state.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise ExportError(f"{where}: expected a state dict of tensors, but '{k}' holds {type(v).__name__}")
        k = k[len("module."):] if k.startswith("module.") else k
        out[k] = v.float() if v.is_floating_point() else v
    return out


def _load_weights_file(path: Path, model: str | None) -> Source:
    meta: Any = None
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                state: Any = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}") from None
        if META_KEY in header:
            try:
                meta = json.loads(header[META_KEY])
            except json.JSONDecodeError:
                meta = None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise ExportError(f"{path} holds Python objects besides tensors, which are not loaded (weights_only=True); "
                              "a DeepSpeed file? Pass its checkpoint directory instead") from None
        except Exception as exc:  # noqa: BLE001 - truncated zip, not a torch file ...
            raise ExportError(f"{path} is not a readable torch checkpoint (truncated or corrupt?): "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
        if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
            state, meta = obj["model"], obj.get(META_KEY)
        elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            state = obj
        else:
            keys = list(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
            hint = "; a DeepSpeed file? Pass its checkpoint directory instead" if "module" in keys else ""
            raise ExportError(f"{path}: expected {{'model': state_dict}} (MAE names), found {keys}{hint}")
    state = _clean_state(state, path)
    src_kwargs: dict[str, Any] = {"path": path, "kind": "file"}
    if isinstance(meta, dict) and meta.get("format") == FORMAT_TAG:  # a file this module wrote
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
    problems = [f"{k}: weights {tuple(src.state[k].shape)} vs model {tuple(v.shape)}"
                for k, v in own.items() if k in src.state and src.state[k].shape != v.shape]
    problems += [f"{k} missing" for k in own if k not in src.state]
    problems += [f"unexpected {k}" for k in src.state if k not in own]
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


# --------------------------------------------------------------------------------------------
# Converting: encoder only, resampled
# --------------------------------------------------------------------------------------------


def encoder_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's tensors (timm ``VisionTransformer`` names): no decoder, no mask token."""
    return {k: v for k, v in state.items() if not k.startswith(DECODER_KEYS)}


def resample_encoder(enc: dict[str, torch.Tensor], *, src_img: int, src_patch: int, img_size: int,
                     patch_size: int) -> dict[str, torch.Tensor]:
    """Encoder weights for ``img_size``/``patch_size``: the patch kernel through timm's
    ``resample_patch_embed`` (pseudo-inverse resize), the position grid bicubically through
    ``resample_abs_pos_embed`` with the cls position kept."""
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    out = dict(enc)
    if patch_size != src_patch:
        out["patch_embed.proj.weight"] = resample_patch_embed(enc["patch_embed.proj.weight"].float(),
                                                              [patch_size, patch_size], interpolation="bicubic",
                                                              antialias=True)
    old, new = src_img // src_patch, img_size // patch_size
    if old != new:
        out["pos_embed"] = resample_abs_pos_embed(enc["pos_embed"].float(), [new, new], [old, old],
                                                  num_prefix_tokens=1, interpolation="bicubic", antialias=True)
    return out


# --------------------------------------------------------------------------------------------
# Writing and reading export files
# --------------------------------------------------------------------------------------------


def sidecar_path(output: str | os.PathLike) -> Path:
    """``FILE.json`` beside ``FILE``."""
    output = Path(output)
    return output.with_name(output.name + ".json")


def pick_format(output: Path, fmt: str | None) -> str:
    """``torch`` or ``safetensors``: by extension unless given; they must agree, since timm
    (``load_checkpoint``) chooses its reader by the ``.safetensors`` extension."""
    is_st = output.suffix == ".safetensors"
    if fmt is None:
        return "safetensors" if is_st else "torch"
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if (fmt == "safetensors") != is_st:
        raise ExportError(f"format={fmt} but the output is named '{output.name}': timm reads a file as safetensors "
                          "exactly when its name ends in .safetensors; rename the output or drop --format")
    return fmt


def save_encoder(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any], fmt: str) -> None:
    """Write ``tensors`` and ``meta`` in ``fmt`` (no atomicity here: see :func:`export_encoder`)."""
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata={"format": "pt", META_KEY: json.dumps(meta)})
    else:
        torch.save({"model": tensors, META_KEY: meta}, path)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # safetensors creates files 0600; give both formats the usual mode


def read_export(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, metadata)`` of a file written by :func:`export_encoder`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        return state, json.loads(header.get(META_KEY, "{}"))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj["model"], obj.get(META_KEY, {})


def timm_spec(model_name: str, img_size: int, patch_size: int, in_chans: int) -> tuple[str, dict[str, Any]]:
    """timm model name and kwargs for the exported encoder (patch size overridden if resampled)."""
    name, kwargs = timm_encoder_kwargs(model_name, img_size, in_chans)
    if patch_size != PRESETS[model_name].patch_size:
        kwargs["patch_size"] = patch_size
    return name, kwargs


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------


def max_rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |a - ref| / max |ref|``: the largest deviation relative to the largest feature."""
    return float((a.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))


def smooth_images(n: int, chans: int, size: int, seed: int = 0, coarse: int = 4) -> torch.Tensor:
    """Smooth test images: ``coarse`` x ``coarse`` N(0, 1) noise upsampled bicubically."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.randn(n, chans, coarse, coarse, generator=g), size=(size, size), mode="bicubic",
                         align_corners=False)


def _patch_grid(tokens: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 1 + g*g, D) tokens -> (N, size*size, D) patch tokens, average-pooled to ``size``."""
    n, length, dim = tokens.shape
    g = math.isqrt(length - 1)
    grid = tokens[:, 1:].reshape(n, g, g, dim).permute(0, 3, 1, 2)
    return F.adaptive_avg_pool2d(grid, size).flatten(2).transpose(1, 2)


def resample_similarity(original: torch.Tensor, resampled: torch.Tensor) -> dict[str, float]:
    """Cosine similarities between the tokens of the original encoder (original image) and the
    resampled one (the image resized): patch tokens on the common (smaller) grid, and cls."""
    g = min(math.isqrt(original.shape[1] - 1), math.isqrt(resampled.shape[1] - 1))
    tok = F.cosine_similarity(_patch_grid(original, g), _patch_grid(resampled, g), dim=-1)
    cls = F.cosine_similarity(original[:, 0], resampled[:, 0], dim=-1)
    return {"patch_token_cosine_mean": float(tok.mean()), "cls_cosine_min": float(cls.min())}


@contextlib.contextmanager
def _exact_matmul(device: torch.device) -> Iterator[None]:
    """No TF32 on CUDA while verifying (TF32 alone would exceed the float32 tolerance)."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@torch.no_grad()
def verify_export(path: Path, meta: dict[str, Any], src: Source, converted: dict[str, torch.Tensor],
                  dtype: torch.dtype, device: str | torch.device = "cpu", min_cosine: float = MIN_COSINE) -> dict:
    """Load ``path`` into timm (strictly) and compare its features with maescale's; see the
    module docstring for the checks and tolerances. Returns the measurements; raises
    :class:`ExportError` if a check fails."""
    import timm

    dev = torch.device(device)
    name, kwargs = meta["timm"]["model_name"], meta["timm"]["kwargs"]
    try:
        tm = timm.create_model(name, num_classes=0, checkpoint_path=str(path), **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"verification failed: timm.create_model({name!r}, num_classes=0, checkpoint_path=..., "
                          f"**{kwargs}) could not load the export: {exc}") from None
    tm = tm.to(dev).eval()
    img, patch = meta["img_size"], meta["patch_size"]
    resampled = (img, patch) != (src.img_size, src.patch_size)
    report: dict[str, Any] = {"timm_model": name, "timm_strict_load": True, "batch": VERIFY_BATCH}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(VERIFY_BATCH, src.in_chans, img, img, generator=g).to(dev)
    with _exact_matmul(dev):
        got = tm.forward_features(x)
        as_written = {k: v.to(dtype).float() for k, v in converted.items()}
        ref = model_from_source(src, state=as_written, img_size=img, patch_size=patch, device=dev).forward_features(x)
        err = max_rel_err(got, ref)
        report.update(features_max_rel_err=err, tolerance=FP32_RTOL,
                      reference="maescale forward_features (float32) with the exported weights")
        if not err <= FP32_RTOL:
            raise ExportError(f"verification failed: timm's features differ from maescale's by {err:.3g} (max abs "
                              f"error relative to the largest feature), more than {FP32_RTOL:g}")
        if dtype != torch.float32:
            full = model_from_source(src, state=converted, img_size=img, patch_size=patch, device=dev).forward_features(x)
            drift = max_rel_err(got, full)
            report.update(dtype_drift_max_rel_err=drift, dtype_tolerance=BF16_RTOL)
            if not drift <= BF16_RTOL:
                raise ExportError(f"verification failed: the {meta['dtype']} export's features differ from the "
                                  f"float32 weights' by {drift:.3g}, more than {BF16_RTOL:g}")
        if resampled:
            x0 = smooth_images(VERIFY_BATCH, src.in_chans, src.img_size).to(dev)
            x1 = F.interpolate(x0, size=(img, img), mode="bicubic", align_corners=False)
            original = model_from_source(src, device=dev).forward_features(x0)
            sim = resample_similarity(original, tm.forward_features(x1))
            report["resample_check"] = {**sim, "threshold": min_cosine,
                                        "images": f"{VERIFY_BATCH} smooth images at {src.img_size}px, resized "
                                                  f"bicubically to {img}px for the export"}
            worst = min(sim.values())
            if not worst >= min_cosine:
                raise ExportError(
                    f"verification failed: resampled features are not close to the original's on the upsampled "
                    f"image (patch-token cosine {sim['patch_token_cosine_mean']:.4f}, cls cosine "
                    f"{sim['cls_cosine_min']:.4f}; threshold {min_cosine}). Check --img-size/--patch-size, or "
                    "lower --min-cosine if this model is known to need it")
    return report


# --------------------------------------------------------------------------------------------
# The export
# --------------------------------------------------------------------------------------------


@dataclass
class ExportResult:
    output: Path
    sidecar: Path
    metadata: dict[str, Any]
    verification: dict[str, Any] | None
    notes: list[str]


def build_metadata(src: Source, img_size: int, patch_size: int, dtype: str) -> dict[str, Any]:
    arch = PRESETS[src.model_name]
    name, kwargs = timm_spec(src.model_name, img_size, patch_size, src.in_chans)
    return {
        "format": FORMAT_TAG,
        "maescale_version": __version__,
        "source": {"path": str(src.path.resolve()), "kind": src.kind,
                   "run_dir": str(src.run_dir.resolve()) if src.run_dir else None, "step": src.step},
        "model": src.model_name,
        "model_inferred": src.model_inferred,
        "img_size": img_size,
        "patch_size": patch_size,
        "in_chans": src.in_chans,
        "embed_dim": arch.embed_dim,
        "depth": arch.depth,
        "num_heads": arch.num_heads,
        "pretrain_img_size": src.img_size,
        "pretrain_patch_size": src.patch_size,
        "resampled": {"pos_embed": img_size // patch_size != src.grid_size, "patch_embed": patch_size != src.patch_size},
        "mean": [float(v) for v in src.mean],
        "std": [float(v) for v in src.std],
        "dtype": dtype,
        "timm": {"model_name": name, "kwargs": kwargs},
    }


def export_encoder(source: str | os.PathLike, output: str | os.PathLike, *, step: int | None = None,
                   fmt: str | None = None, dtype: str = "float32", img_size: int | None = None,
                   patch_size: int | None = None, verify: bool = True, force: bool = False,
                   model: str | None = None, device: str = "cpu", min_cosine: float = MIN_COSINE) -> ExportResult:
    """Export the encoder of ``source`` to ``output`` (see the module docstring)."""
    out = Path(output)
    fmt = pick_format(out, fmt)
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if out.is_dir():
        raise ExportError(f"output {out} is a directory; give a file name such as {out / 'encoder.pth'}")
    if out.exists() and not force:
        raise ExportError(f"output {out} exists; pass --force to replace it")
    for name, value in (("img_size", img_size), ("patch_size", patch_size)):
        if value is not None and value < 1:
            raise ExportError(f"{name} must be a positive integer, got {value}")

    src = load_source(source, step, model)
    patch = patch_size or src.patch_size
    img = img_size or src.img_size
    if img % patch:
        hint = " (pass --img-size with a multiple of it)" if img_size is None else ""
        raise ExportError(f"image size {img} is not a multiple of patch size {patch}{hint}")
    log.info("read %s%s: %s, %dpx, patch %d", src.path, f" (step {src.step})" if src.step is not None else "",
             src.model_name, src.img_size, src.patch_size)
    for note in src.notes:
        log.info("%s", note)

    converted = resample_encoder(encoder_state(src.state), src_img=src.img_size, src_patch=src.patch_size,
                                 img_size=img, patch_size=patch)
    meta = build_metadata(src, img, patch, dtype)
    # Clone: consolidated weights may be views into one flat buffer, which torch.save would
    # write whole (decoder included) and safetensors refuses.
    tensors = {k: v.detach().to(DTYPES[dtype]).contiguous().clone() for k, v in converted.items()}

    side = sidecar_path(out)
    wrote_side = False
    try:
        # Both files appear only once the weights are written and verified, the weights last.
        with atomic_output(out, keep_suffix=True) as tmp:  # timm picks its reader by the suffix
            save_encoder(tmp, tensors, meta, fmt)
            report = None
            if verify:
                log.info("verifying: loading %s into timm and comparing features on %s", tmp.name, device)
                report = verify_export(tmp, meta, src, converted, DTYPES[dtype], device=device, min_cosine=min_cosine)
            write_json_atomic(side, {**meta, "file": out.name, "file_format": fmt, "notes": src.notes,
                                     "verification": report}, indent=2)
            wrote_side = True
    except BaseException:
        if wrote_side:
            side.unlink(missing_ok=True)
        raise
    log.info("wrote %s (%s, %s, %d tensors)%s", out, fmt, dtype, len(tensors), "; verified" if verify else "")
    return ExportResult(output=out, sidecar=side, metadata=meta, verification=report, notes=list(src.notes))


__all__ = ["ExportError", "ExportResult", "Source", "export_encoder", "load_source", "find_checkpoint",
           "infer_preset", "model_from_source", "encoder_state", "resample_encoder", "read_export", "sidecar_path",
           "verify_export", "resample_similarity", "smooth_images", "FP32_RTOL", "BF16_RTOL", "MIN_COSINE"]
