"""Weights in and out of checkpoints: public ViT/MAE weights as a starting point
(``model.init_from``), and one checkpoint directory consolidated into a full float32 state dict
(export, tests, soak).

``model.init_from`` takes a ``.pth`` (``{"model": state_dict}``, as the MAE release stores both its
encoder-only and its full files, or a flat state dict) or a ``.safetensors`` file with timm
``VisionTransformer`` / MAE names, of the preset's width and depth:

* the timm pooling/classifier tensors (``head``, ``fc_norm``, ``attn_pool``, ...) are dropped (one
  log line names them); a file that pools with ``fc_norm`` has no final ``norm``, which then
  starts at its initialisation;
* position tables: the MAE's own are fixed 2-D sin-cos buffers. A sin-cos table in the file (the
  MAE release) is that table, computed for the model's grid. A learned table (a supervised timm
  ViT) is kept, resampled bicubically when the grid differs (cls position as is), and then stays
  fixed like MAE's: the file's blocks learned to read it, so replacing it would start the encoder
  from a function the file never computed, and training it would leave the MAE recipe;
* another patch size is refused unless ``model.init_resample_patch`` (timm's
  ``resample_patch_embed``, as the export); the decoder of a file then starts fresh, since its
  pixel predictions are for the other patch size;
* a decoder in the file loads with it; without one the decoder keeps its initialisation
  (:func:`only_encoder_loaded` says so);
* anything else that does not fit (width, depth, MLP width, channels, layer scale, register
  tokens, ...) is an error naming the key and the fix.

The number of attention heads cannot be read from the weights (``qkv`` is ``3D x D`` for any
head count): the preset's is used.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TypedDict

import torch

from maescale.checkpoint.manager import CheckpointError
from maescale.models import DECODER_KEYS, PRESETS

log = logging.getLogger("maescale.checkpoint")

INIT_DEEPSPEED_HINT = ("a DeepSpeed file? model.init_from takes a weights file: resume a run with "
                       "resume=CHECKPOINT_DIR, or export its encoder with tools/export_encoder.py")


class PretrainedLoad(TypedDict):
    """What :func:`load_pretrained_into` did: the model's keys left at their initialisation
    (``missing``) and the file's keys not loaded (``unexpected``)."""

    missing: list[str]
    unexpected: list[str]


def only_encoder_loaded(result: PretrainedLoad) -> bool:
    """True when the load filled the encoder but not the decoder (an encoder-only file, or a
    resampled patch size): the decoder is freshly initialised."""
    return any(k.startswith(DECODER_KEYS) for k in result["missing"])


def _depth(state: dict[str, torch.Tensor], prefix: str) -> int:
    pat = re.compile(rf"{re.escape(prefix)}\.(\d+)\.")
    return 1 + max((int(m.group(1)) for k in state if (m := pat.match(k))), default=-1)


def _blocks(n: int) -> str:
    return f"{n} block{'' if n == 1 else 's'}"


def _fix(width: int, depth: int, hidden: int | None) -> str:
    """The ``model.name`` advice for a file of this encoder layout."""
    layout = f"width {width}, depth {depth}" + (f", MLP width {hidden}" if hidden is not None else "")
    names = [n for n, a in PRESETS.items() if a.embed_dim == width and a.depth == depth
             and (hidden is None or int(width * a.mlp_ratio) == hidden)]
    if names:
        return f"set model.name to a preset of the file's layout ({layout}): {', '.join(names)}"
    return f"no model.name preset has the file's layout ({layout}); known: {', '.join(PRESETS)}"


def load_pretrained_into(model: torch.nn.Module, path: str | os.PathLike, *,
                         resample_patch: bool = False) -> PretrainedLoad:
    """Initialise ``model`` (a :class:`~maescale.models.MaskedAutoencoderViT`) from a public ViT
    or MAE weights file (see the module docstring). ``resample_patch``: resample a patch
    embedding of another patch size (``model.init_resample_patch``). Raises
    :class:`CheckpointError` naming the key and the fix when the file does not fit; the model
    is changed only once everything fits."""
    # Imported here: maescale.export reads checkpoints through this package.
    from maescale.export.convert import resample_patch_kernel, shape_problems, split_head
    from maescale.export.errors import ExportError
    from maescale.export.files import read_weights_file

    path = Path(path)
    where = f"model.init_from={str(path)!r}"
    if not path.is_file():
        raise CheckpointError(f"{where}: file not found")
    try:
        state, _ = read_weights_file(path, deepspeed_hint=INIT_DEEPSPEED_HINT)
    except ExportError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    own = model.state_dict()
    width, depth = own["cls_token"].shape[-1], _depth(own, "blocks")
    misfit = (f"{where} does not fit model.name's architecture ({_blocks(depth)} of width {width}, "
              f"patch {model.patch_size})")

    state, dropped = split_head(state)
    fix = _check_layout(state, own, where, misfit)

    # ---- patch embedding: channels must match; another patch size only when asked to resample
    kernel = state["patch_embed.proj.weight"]
    if kernel.ndim != 4 or kernel.shape[-1] != kernel.shape[-2]:
        raise CheckpointError(f"{where}: patch_embed.proj.weight {tuple(kernel.shape)} is not a square patch kernel")
    f_patch, f_chans = int(kernel.shape[-1]), int(kernel.shape[1])
    if f_chans != model.in_chans:
        raise CheckpointError(f"{where}: patch_embed.proj.weight takes {f_chans} input channels, the model "
                              f"{model.in_chans}; set model.in_chans={f_chans}")
    notes: list[str] = []
    unexpected = list(dropped)
    if f_patch != model.patch_size:
        if not resample_patch:
            raise CheckpointError(
                f"{misfit}: patch_embed.proj.weight {tuple(kernel.shape)} has patch size {f_patch}, the model "
                f"{model.patch_size}; set model.init_resample_patch=true to resample it (FlexiViT's pseudo-inverse "
                f"resize, as tools/export_encoder.py --patch-size), or choose a model.name with patch {f_patch}")
        state["patch_embed.proj.weight"] = resample_patch_kernel(kernel, model.patch_size)
        notes.append(f"patch embedding resampled from patch {f_patch} to {model.patch_size} "
                     "(model.init_resample_patch)")
        # The decoder predicts pixels of the file's patch size: none of it is reused.
        decoder = [k for k in state if k.startswith(DECODER_KEYS)]
        if decoder:
            unexpected += decoder
            state = {k: v for k, v in state.items() if not k.startswith(DECODER_KEYS)}
            notes.append(f"the file's decoder is not loaded: it predicts {f_patch}x{f_patch} patches, the model "
                         f"{model.patch_size}x{model.patch_size}; the decoder starts at its initialisation")

    notes += _fit_position_tables(state, own, where)

    # ---- everything else must fit exactly; the decoder loads whole or not at all
    with_decoder = any(k.startswith(DECODER_KEYS) for k in state)
    allowed_missing = set() if with_decoder else {k for k in own if k.startswith(DECODER_KEYS)}
    if any(k.startswith("fc_norm.") for k in dropped):  # timm global_pool='avg': fc_norm replaces norm
        fresh_norm = {k for k in own if k.startswith("norm.") and k not in state}
        allowed_missing |= fresh_norm
        if fresh_norm:
            notes.append("the file pools with fc_norm and has no final norm: the encoder's norm starts at its "
                         "initialisation")
    problems = [p for p in shape_problems(state, own, label="file")
                if not (p.endswith(" missing") and p[: -len(" missing")] in allowed_missing)]
    if problems:
        more = f" (and {len(problems) - 6} more)" if len(problems) > 6 else ""
        if all(p.removeprefix("unexpected ").startswith(DECODER_KEYS) for p in problems):
            fix = ("its decoder differs from the preset's: start from its encoder alone (tools/export_encoder.py "
                   "writes one)")
        raise CheckpointError(f"{misfit}: {'; '.join(problems[:6])}{more}; {fix}")

    result = model.load_state_dict(state, strict=False)
    loaded = "encoder and decoder" if with_decoder else "encoder (the decoder starts at its initialisation)"
    log.info("%s: loaded the %s%s", where, loaded,
             f"; dropped {len(dropped)} tensors that are not part of an MAE: {', '.join(dropped)}" if dropped else "")
    for note in notes:
        log.info("%s: %s", where, note)
    return {"missing": list(result.missing_keys), "unexpected": unexpected}


def _check_layout(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], where: str, misfit: str) -> str:
    """Raise unless ``state`` is a ViT encoder of the model's width and depth with no tensors the
    model lacks; returns the ``model.name`` advice for later shape errors."""
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if key not in state:
            raise CheckpointError(f"{where} is not a ViT encoder with a class token: it has no '{key}' "
                                  f"(keys: {', '.join(list(state)[:5])} ...)")
    width, depth = own["cls_token"].shape[-1], _depth(own, "blocks")
    f_width, f_depth = state["cls_token"].shape[-1], _depth(state, "blocks")
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    fix = _fix(f_width, f_depth, int(fc1.shape[0]) if fc1 is not None and fc1.ndim == 2 else None)
    if f_width != width:
        raise CheckpointError(f"{misfit}: cls_token width {f_width} vs model {width}; {fix}")
    if f_depth > depth:
        extra = f"blocks.{depth}.attn.qkv.weight"
        extra = extra if extra in state else next(k for k in state if k.startswith(f"blocks.{depth}."))
        raise CheckpointError(f"{misfit}: {extra} is present, the file has {_blocks(f_depth)}; {fix}")
    if f_depth < depth:
        raise CheckpointError(f"{misfit}: blocks.{f_depth}.* missing, the file has {_blocks(f_depth)}; {fix}")
    unknown = [k for k in state if k not in own and not k.startswith(DECODER_KEYS)]
    if unknown:
        more = f" (and {len(unknown) - 6} more)" if len(unknown) > 6 else ""
        raise CheckpointError(f"{where} has tensors maescale's ViT does not: {', '.join(unknown[:6])}{more}: "
                              "a ViT of another layout (layer scale, register tokens, ...?) cannot be loaded")
    return fix


def _fit_position_tables(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], where: str) -> list[str]:
    """Fit the file's position tables to the model's grid in place (see the module docstring):
    MAE's sin-cos table is recomputed for the grid, a learned one is kept (resampled bicubically
    when the grid differs). Returns what was done, for the log."""
    from maescale.export.convert import is_sincos, pos_grid, resample_pos_grid
    from maescale.models.mae import sincos_2d

    notes = []
    for key in ("pos_embed", "decoder_pos_embed"):
        if key not in state:
            continue
        table, target = state[key], own[key]
        f_grid, grid = pos_grid(table), pos_grid(target)
        if f_grid is None:
            raise CheckpointError(f"{where}: {key} {tuple(table.shape)} is not one cls position plus a square grid "
                                  "(ViTs without a class position or with register tokens are not supported)")
        if table.shape[-1] != target.shape[-1]:
            continue  # a width mismatch: reported with the other shapes
        if is_sincos(table):
            if f_grid != grid:
                state[key] = sincos_2d(table.shape[-1], grid)[None]
                notes.append(f"{key}: the file's is MAE's fixed 2-D sin-cos table ({f_grid}x{f_grid}); "
                             f"the same table for {grid}x{grid} is used")
            continue
        resampled = ""
        if f_grid != grid:
            state[key] = resample_pos_grid(table, f_grid, grid)
            resampled = f", resampled bicubically from {f_grid}x{f_grid} to {grid}x{grid}"
        notes.append(f"{key}: the file's is a learned table; kept as the model's fixed position table{resampled} "
                     "(not trained further, as MAE's own)")
    return notes


def consolidated_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Full float32 model state dict (parameters and buffers) from one checkpoint directory.

    ZeRO-sharded checkpoints (any stage, and bf16 runs, whose fp32 master weights live in the
    optimizer shards) are consolidated with DeepSpeed's own ``zero_to_fp32`` utility; plain
    fp32 stage-0 checkpoints hold the full model in ``mp_rank_00_model_states.pt``.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory")
    if list(path.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    else:
        model_file = path / "mp_rank_00_model_states.pt"
        if not model_file.is_file():
            raise CheckpointError(f"{path} holds no DeepSpeed model states ({model_file.name} missing)")
        # DeepSpeed stores its config objects beside the weights, so this file needs full unpickling.
        state = torch.load(model_file, map_location="cpu", weights_only=False)["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
