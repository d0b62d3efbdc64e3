"""Verifying an export: the written file loaded strictly into timm's ``VisionTransformer`` must
compute maescale's encoder features (see :mod:`maescale.export` for the checks and tolerances)."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from maescale.export.errors import ExportError
from maescale.export.load import Source, model_from_source

FP32_RTOL = 1e-5  # float32 export: max |timm - maescale| / max |maescale| over the features
BF16_RTOL = 5e-2  # bfloat16 export vs the float32 weights (same measure)
MIN_COSINE = 0.95  # resampled export: patch-token (mean) and cls (min) cosine similarity
VERIFY_BATCH = 2


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
