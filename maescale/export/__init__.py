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

The package, one step per module: :mod:`.load` (sources to :class:`Source`), :mod:`.convert`
(encoder only, resampling; shared with ``model.init_from``), :mod:`.verify` (against timm),
:mod:`.files` (reading and writing weights files); :func:`export_encoder` here runs them in turn.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maescale import __version__
from maescale.export.convert import encoder_state, resample_encoder, timm_spec
from maescale.export.errors import ExportError
from maescale.export.files import (DTYPES, FORMAT_TAG, FORMATS, META_KEY, pick_format, read_export, save_encoder,
                                   sidecar_path)
from maescale.export.load import Source, find_checkpoint, infer_preset, load_source, model_from_source
from maescale.export.verify import (BF16_RTOL, FP32_RTOL, MIN_COSINE, VERIFY_BATCH, max_rel_err, resample_similarity,
                                    smooth_images, verify_export)
from maescale.models import PRESETS
from maescale.rundir import atomic_output, write_json_atomic

log = logging.getLogger(__name__)


@dataclass
class ExportResult:
    """What :func:`export_encoder` wrote: the weights file, its sidecar, the metadata, the
    verification measurements (None without verification) and the notes on the source."""

    output: Path
    sidecar: Path
    metadata: dict[str, Any]
    verification: dict[str, Any] | None
    notes: list[str]


def build_metadata(src: Source, img_size: int, patch_size: int, dtype: str) -> dict[str, Any]:
    """The metadata of an export of ``src`` at ``img_size``/``patch_size`` in ``dtype`` (see the
    module docstring)."""
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
           "verify_export", "resample_similarity", "smooth_images", "FP32_RTOL", "BF16_RTOL", "MIN_COSINE",
           "DTYPES", "FORMATS", "FORMAT_TAG", "META_KEY", "VERIFY_BATCH", "build_metadata", "max_rel_err",
           "pick_format", "save_encoder", "timm_spec"]
