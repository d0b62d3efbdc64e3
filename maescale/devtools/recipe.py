"""maescale against the MAE release, row by row: every hyper-parameter and augmentation of the
release's pre-training, with the value maescale uses read from maescale's own code and configs.

``RELEASE`` holds the release's values as facts (facebookresearch/mae: ``main_pretrain.py``'s
argument defaults and optimizer set-up, ``models_mae.py``, ``util/lr_sched.py``, ``util/pos_embed.py``;
the paper, He et al. 2021, arXiv:2111.06377, Appendix A.1, for the ViT-H recipe). :func:`rows`
computes maescale's side from ``configs/`` and the package, so the README's table (a generated
block, ``tools/report.py``) and ``tests/test_recipe.py`` check every row against the code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Row:
    """One line of the comparison."""

    what: str
    release: Any
    maescale: Any
    where: str  # where maescale's value lives

    @property
    def same(self) -> bool:
        a, b = self.release, self.maescale
        if isinstance(a, float) and isinstance(b, float):
            return math.isclose(a, b, rel_tol=1e-9)
        return a == b


# The release's values (facts, see the module docstring).
RELEASE: dict[str, Any] = {
    "optimizer": "AdamW",
    "betas": (0.9, 0.95),
    "weight decay": 0.05,
    "weight-decay exemptions": "1-D tensors and biases (cls_token, mask_token decayed)",
    "position embeddings": "fixed 2-D sin-cos, not trained",
    "base lr": 1.5e-4,
    "lr scaling": "blr x effective batch / 256",
    "schedule": "per-iteration linear warmup, then half-cycle cosine to min_lr",
    "min lr": 0.0,
    "warmup epochs": 40,
    "global batch (ViT-H)": 4096,
    "epochs (ViT-H)": 1600,
    "mask ratio": 0.75,
    "norm_pix_loss": True,
    "loss": "MSE on masked patches only",
    "crop": "RandomResizedCrop scale (0.2, 1.0), ratio (3/4, 4/3), bicubic",
    "horizontal flip": 0.5,
    "normalisation": "ImageNet mean/std",
    "decoder": "512 wide, 8 blocks, 16 heads",
    "ViT-H": "patch 14, width 1280, depth 32, 16 heads",
    "gradient clipping": "none",
}


def rows() -> list[Row]:
    """Every row, maescale's value read from the code and configs."""
    from maescale.config import IMAGENET_MEAN, IMAGENET_STD, load_config
    from maescale.models import PRESETS, create_model
    from maescale.optim import decays, lr_at, peak_lr

    base = load_config(REPO / "configs" / "base.yaml")
    huge = load_config(REPO / "configs" / "vit_huge.yaml")
    h, d = PRESETS["mae_vit_huge_patch14"], base.data
    model = create_model("mae_vit_tiny_patch4", img_size=32, device="meta")
    named = dict(model.named_parameters())
    exempt_ok = all(decays(n, p) == (p.ndim > 1 and not n.endswith(".bias")) for n, p in named.items())
    tokens = decays("cls_token", named["cls_token"]) and decays("mask_token", named["mask_token"])
    buffers = dict(model.named_buffers())
    cos = lr_at(55, 1.0, 0.0, 10, 100)  # halfway through the cosine part
    schedule_ok = lr_at(5, 1.0, 0.0, 10, 100) == 0.5 and math.isclose(cos, 0.5) and lr_at(100, 1.0, 0.0, 10, 100) == 0
    adamw = _optimizer_name(base)
    world = huge.slurm.nodes * huge.slurm.gpus_per_node
    value: dict[str, tuple[Any, str]] = {
        "optimizer": (adamw, "maescale/optim.py: build_optimizer"),
        "betas": (tuple(base.optim.betas), "optim.betas"),
        "weight decay": (base.optim.weight_decay, "optim.weight_decay"),
        "weight-decay exemptions": (RELEASE["weight-decay exemptions"] if exempt_ok and tokens else "differs",
                                    "maescale/optim.py: decays (optim.weight_decay_tokens)"),
        "position embeddings": (RELEASE["position embeddings"] if "pos_embed" in buffers and "pos_embed" not in named
                                else "differs", "maescale/models/mae.py: sincos_2d buffers"),
        "base lr": (base.optim.blr, "optim.blr"),
        "lr scaling": (RELEASE["lr scaling"] if math.isclose(peak_lr(huge, world), huge.optim.blr * 4096 / 256)
                       else "differs", "maescale/optim.py: peak_lr"),
        "schedule": (RELEASE["schedule"] if schedule_ok else "differs", "maescale/optim.py: lr_at"),
        "min lr": (base.optim.min_lr, "optim.min_lr"),
        "warmup epochs": (int(base.optim.warmup_epochs), "optim.warmup_epochs"),
        "global batch (ViT-H)": (huge.train.micro_batch_size * huge.train.grad_accum_steps * world,
                                 "configs/vit_huge.yaml: micro-batch x accumulation x nodes x GPUs"),
        "epochs (ViT-H)": (int(huge.train.epochs or 0), "configs/vit_huge.yaml: train.epochs"),
        "mask ratio": (base.model.mask_ratio, "model.mask_ratio"),
        "norm_pix_loss": (base.model.norm_pix_loss, "model.norm_pix_loss"),
        "loss": (RELEASE["loss"], "maescale/models/mae.py: forward_loss"),
        "crop": (f"RandomResizedCrop scale {tuple(d.crop_scale)}, ratio "
                 f"{'(3/4, 4/3)' if _close(d.crop_ratio, (3 / 4, 4 / 3)) else tuple(d.crop_ratio)}, {d.interpolation}",
                 "data.crop_scale, data.crop_ratio, data.interpolation"),
        "horizontal flip": (d.hflip_prob, "data.hflip_prob"),
        "normalisation": ("ImageNet mean/std" if tuple(d.mean) == IMAGENET_MEAN and tuple(d.std) == IMAGENET_STD
                          else f"{d.mean}/{d.std}", "data.mean, data.std"),
        "decoder": (f"{h.decoder_embed_dim} wide, {h.decoder_depth} blocks, {h.decoder_num_heads} heads",
                    "maescale/models/presets.py"),
        "ViT-H": (f"patch {h.patch_size}, width {h.embed_dim}, depth {h.depth}, {h.num_heads} heads",
                  "maescale/models/presets.py"),
        "gradient clipping": ("none" if base.optim.grad_clip == 0 else f"max norm {base.optim.grad_clip}",
                              "optim.grad_clip"),
    }
    return [Row(k, RELEASE[k], *value[k]) for k in RELEASE]


def _close(a: Any, b: Any) -> bool:
    return all(math.isclose(x, y, rel_tol=1e-6) for x, y in zip(a, b))


def _optimizer_name(cfg: Any) -> str:
    import torch

    from maescale.optim import build_optimizer
    from maescale.models import create_model

    opt = build_optimizer(create_model("mae_vit_tiny_patch4", img_size=32), cfg, lr=1e-3)
    return "AdamW" if isinstance(opt, torch.optim.AdamW) else type(opt).__name__


def fmt(value: Any) -> str:
    """A cell."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return "(" + ", ".join(fmt(v) for v in value) + ")"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def markdown(compute: Callable[[], list[Row]] = rows) -> str:
    """The README table."""
    lines = ["| | MAE release | maescale | set by |", "|---|---|---|---|"]
    for r in compute():
        mark = "" if r.same else " **(differs)**"
        lines.append(f"| {r.what} | {fmt(r.release)} | {fmt(r.maescale)}{mark} | `{r.where}` |")
    return "\n".join(lines)
