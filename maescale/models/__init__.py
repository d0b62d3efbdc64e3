"""MAE model family: :class:`MaskedAutoencoderViT` and named presets.

The model itself (torch, timm) is imported on first use: config validation and the login-node
tools (``tools/submit.py``, ``tools/plan.py``) only need the presets, and torch costs them seconds.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from maescale.models.presets import PRESETS, MAEArch

if TYPE_CHECKING:
    from maescale.models.mae import DECODER_KEYS, MaskedAutoencoderViT

log = logging.getLogger(__name__)

_LAZY = {"MaskedAutoencoderViT": "maescale.models.mae", "DECODER_KEYS": "maescale.models.mae"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'maescale.models' has no attribute {name!r}")


__all__ = ["MaskedAutoencoderViT", "PRESETS", "MAEArch", "DECODER_KEYS", "create_model", "build_model", "timm_encoder_kwargs"]


def create_model(name: str, **kwargs: Any) -> MaskedAutoencoderViT:
    """Build a preset by name; ``kwargs`` (img_size, in_chans, mask_ratio, ...) pass through."""
    from maescale.models.mae import MaskedAutoencoderViT

    if name not in PRESETS:
        raise KeyError(f"unknown model preset '{name}'; known: {', '.join(PRESETS)}")
    return MaskedAutoencoderViT(**PRESETS[name].as_kwargs(), **kwargs)


def build_model(model_cfg: Any, device: Any = None) -> MaskedAutoencoderViT:
    """Build the model that a :class:`maescale.config.ModelConfig` describes; with ``model.fp8`` its
    encoder's linear layers become torchao float8 layers (same parameter names; :mod:`.fp8`)."""
    from maescale.models.fp8 import convert_to_fp8, fp8_recipe

    model = create_model(
        model_cfg.name,
        img_size=model_cfg.img_size,
        in_chans=model_cfg.in_chans,
        mask_ratio=model_cfg.mask_ratio,
        norm_pix_loss=model_cfg.norm_pix_loss,
        attn_impl=model_cfg.attn_impl,
        act_ckpt_every=model_cfg.act_ckpt_every,
        device=device,
    )
    recipe = fp8_recipe(getattr(model_cfg, "fp8", "off"))
    if recipe is not None:
        emulate = getattr(model_cfg, "fp8_emulate", False)
        model.fp8_layers = convert_to_fp8(model, recipe, emulate=emulate,
                                          min_features=getattr(model_cfg, "fp8_min_features", None), device=device)
        if not getattr(model_cfg, "compile", False) and not emulate:
            log.warning("model.fp8=%s without model.compile: each float8 cast (amax, scale, cast) runs as kernels of "
                        "its own; model.compile=graphs or blocks fuses them into the neighbouring ops", recipe)
    return model


def timm_encoder_kwargs(name: str, img_size: int, in_chans: int = 3) -> tuple[str, dict[str, Any]]:
    """The timm model name and keyword arguments whose ``VisionTransformer`` has exactly the
    encoder of preset ``name`` (pass both to ``timm.create_model`` with ``num_classes=0``).

    Presets without a registered timm twin use ``vit_base_patch16_224`` with every architecture
    argument overridden, which timm's ViT constructors accept.
    """
    arch = PRESETS[name]
    base = arch.timm_name or "vit_base_patch16_224"
    kwargs: dict[str, Any] = {"img_size": img_size, "in_chans": in_chans}
    if arch.timm_name is None:
        kwargs.update(patch_size=arch.patch_size, embed_dim=arch.embed_dim, depth=arch.depth,
                      num_heads=arch.num_heads, mlp_ratio=arch.mlp_ratio)
    return base, kwargs
