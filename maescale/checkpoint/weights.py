"""Weights in and out of checkpoints: a public MAE checkpoint as a starting point
(``model.init_from``), and one checkpoint directory consolidated into a full float32 state dict
(export, tests, soak)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from maescale.checkpoint.manager import CheckpointError


def load_pretrained_into(model: torch.nn.Module, path: str | os.PathLike) -> dict[str, list[str]]:
    """Initialise ``model`` from a public MAE checkpoint (``{"model": state_dict}``, MAE names).

    Full checkpoints load strictly; encoder-only ones (no decoder/mask token) fill the encoder and
    leave the decoder at its initialisation. Returns the missing/unexpected key lists.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model.init_from={str(path)!r}: file not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise CheckpointError(f"model.init_from={str(path)!r} is not a readable torch checkpoint: {exc}") from None
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"model.init_from={str(path)!r}: expected {{'model': state_dict}}")
    own = model.state_dict()
    shape_errors = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                    for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if shape_errors:
        raise CheckpointError(f"model.init_from={str(path)!r} does not fit model.name's architecture: "
                              + "; ".join(shape_errors[:5]))
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(("decoder_", "mask_token"))]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"model.init_from={str(path)!r}: missing encoder keys {missing[:5]}, "
                              f"unexpected keys {list(result.unexpected_keys)[:5]}")
    return {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)}


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
