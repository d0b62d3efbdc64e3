"""Converting MAE weights for another use: the encoder alone (timm ``VisionTransformer`` names),
resampled to another image or patch size, and the timm model that holds it. A leaf module
(torch, timm and the model presets only), shared by the export and by ``model.init_from``."""

from __future__ import annotations

import math
from typing import Any

import torch

from maescale.models import DECODER_KEYS, PRESETS, timm_encoder_kwargs
from maescale.models.mae import sincos_2d

# What a timm ViT holds after its encoder's final norm (pooling and classifier: ``fc_norm``,
# ``attn_pool``, ``head``, distillation head, pre-logits; ``head_drop`` has no tensors): not part
# of an MAE encoder, so ``model.init_from`` drops them.
HEAD_PREFIXES = ("head.", "head_dist.", "fc_norm.", "attn_pool.", "pre_logits.")
SINCOS_ATOL = 1e-2  # a position table this close to the 2-D sin-cos one is that table (bf16 files: ~4e-3)


def encoder_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's tensors (timm ``VisionTransformer`` names): no decoder, no mask token."""
    return {k: v for k, v in state.items() if not k.startswith(DECODER_KEYS)}


def split_head(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``(state without the timm pooling/classifier tensors, the names of those dropped)``."""
    dropped = sorted(k for k in state if k.startswith(HEAD_PREFIXES))
    return {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}, dropped


def pos_grid(pos: torch.Tensor) -> int | None:
    """The side of a (1, 1 + g*g, D) position table (one cls position, a square grid), else None."""
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[1] < 2:
        return None
    g = math.isqrt(pos.shape[1] - 1)
    return g if g * g == pos.shape[1] - 1 else None


def is_sincos(pos: torch.Tensor) -> bool:
    """Whether a (1, 1 + g*g, D) table is MAE's fixed 2-D sin-cos table (cls position zero), as
    the MAE release stores it, rather than a learned one (a timm supervised ViT)."""
    g, dim = pos_grid(pos), pos.shape[-1]
    if g is None or dim % 4:
        return False
    return bool((pos[0].float().cpu() - sincos_2d(dim, g)).abs().max() <= SINCOS_ATOL)


def resample_pos_grid(pos: torch.Tensor, old_grid: int, new_grid: int) -> torch.Tensor:
    """A (1, 1 + old_grid**2, D) position table resampled bicubically (antialiased) to
    ``new_grid`` x ``new_grid`` with timm's ``resample_abs_pos_embed``; the cls position is kept."""
    from timm.layers import resample_abs_pos_embed

    if old_grid == new_grid:
        return pos
    return resample_abs_pos_embed(pos.float(), [new_grid, new_grid], [old_grid, old_grid], num_prefix_tokens=1,
                                  interpolation="bicubic", antialias=True)


def resample_patch_kernel(weight: torch.Tensor, patch_size: int) -> torch.Tensor:
    """A (D, C, p, p) patch projection resampled to ``patch_size`` with timm's
    ``resample_patch_embed`` (FlexiViT's pseudo-inverse resize)."""
    from timm.layers import resample_patch_embed

    if weight.shape[-1] == patch_size:
        return weight
    return resample_patch_embed(weight.float(), [patch_size, patch_size], interpolation="bicubic", antialias=True)


def resample_encoder(enc: dict[str, torch.Tensor], *, src_img: int, src_patch: int, img_size: int,
                     patch_size: int) -> dict[str, torch.Tensor]:
    """Encoder weights for ``img_size``/``patch_size``: the patch kernel through timm's
    ``resample_patch_embed`` (pseudo-inverse resize), the position grid bicubically through
    ``resample_abs_pos_embed`` with the cls position kept."""
    out = dict(enc)
    if patch_size != src_patch:
        out["patch_embed.proj.weight"] = resample_patch_kernel(enc["patch_embed.proj.weight"], patch_size)
    old, new = src_img // src_patch, img_size // patch_size
    if old != new:
        out["pos_embed"] = resample_pos_grid(enc["pos_embed"], old, new)
    return out


def shape_problems(state: dict[str, torch.Tensor], own: dict[str, Any], label: str = "weights") -> list[str]:
    """What keeps ``state`` from loading strictly into a module whose state dict is ``own``:
    ``"KEY: <label> (shape) vs model (shape)"``, ``"KEY missing"``, ``"unexpected KEY"``."""
    problems = [f"{k}: {label} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                for k, v in own.items() if k in state and state[k].shape != v.shape]
    problems += [f"{k} missing" for k in own if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in own]
    return problems


def timm_spec(model_name: str, img_size: int, patch_size: int, in_chans: int) -> tuple[str, dict[str, Any]]:
    """timm model name and kwargs for the exported encoder (patch size overridden if resampled)."""
    name, kwargs = timm_encoder_kwargs(model_name, img_size, in_chans)
    if patch_size != PRESETS[model_name].patch_size:
        kwargs["patch_size"] = patch_size
    return name, kwargs
