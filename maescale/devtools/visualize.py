"""Reconstruction pictures of a trained MAE on chosen images.

``visualize(SOURCE, IMAGES, OUTPUT)`` loads the whole MAE (encoder and decoder) of a run
directory, checkpoint directory or full MAE ``{"model": ...}`` file (as
:func:`maescale.export.load_source` reads them), takes the first ``num`` images of a folder of
image files (sorted by path, recursively) or of webdataset shards (a ``.tar``, a folder of them,
a brace pattern or glob), center-crops each to a square, resizes it (bicubic, antialiased) to the
model's image size, normalises with the run's ``data.mean``/``data.std`` and writes a PNG of
``num`` rows of ``img_size`` pixels, 4 columns:

    original | masked (grey = hidden) | reconstruction | reconstruction with visible patches pasted

(:func:`maescale.metrics.reconstruction_grid`; with ``norm_pix_loss`` the prediction is
un-normalised with each patch's own mean/std, as in the MAE paper's figures). The masks come from
``torch.rand`` on a generator seeded with ``seed``, passed to the model as ``noise``: the same
seed gives the same picture.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from maescale.export import ExportError, Source, load_source, model_from_source
from maescale.metrics import reconstruction_grid, save_png

log = logging.getLogger(__name__)


class VisualizeError(RuntimeError):
    """Bad model, images or output for :func:`visualize`."""


def center_crop_resize(img: Image.Image, size: int, chans: int = 3) -> torch.Tensor:
    """(chans, size, size) uint8: the largest centered square, resized bicubically."""
    from maescale.data.decode import to_rgb

    img = to_rgb(img) if chans == 3 else img.convert("L")
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC, reducing_gap=None)
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _image_files(folder: Path) -> list[Path]:
    from maescale.data.shards import find_images

    return [folder / rel for rel, _ in find_images(folder)]


def _open_image(data: bytes | Path, where: str) -> Image.Image:
    import io

    try:
        img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        img.load()
        return img
    except Exception as exc:  # noqa: BLE001
        raise VisualizeError(f"cannot read image {where}: {exc}") from None


def _shard_images(spec: str, num: int) -> list[tuple[str, Image.Image]]:
    from maescale.data import DataError, expand_shards
    from maescale.data.decode import BadSample, image_bytes
    from maescale.data.sources import open_url
    from maescale.data.tario import iter_samples

    try:
        urls = expand_shards(spec, key="--images")
    except DataError as exc:
        raise VisualizeError(str(exc)) from None
    out: list[tuple[str, Image.Image]] = []
    for url in urls:
        try:
            with open_url(url) as stream:
                for _, sample in iter_samples(stream):
                    try:
                        data = image_bytes(sample)
                    except BadSample as exc:
                        log.warning("%s: skipping sample %s: %s", url, sample.get("__key__"), exc)
                        continue
                    out.append((f"{url}:{sample['__key__']}", _open_image(data, f"{sample['__key__']} in {url}")))
                    if len(out) == num:
                        return out
        except OSError as exc:
            raise VisualizeError(f"cannot read shard {url}: {exc}") from None
    return out


def load_images(spec: str | os.PathLike, size: int, num: int, chans: int = 3) -> tuple[torch.Tensor, list[str]]:
    """The first ``num`` images of ``spec`` as uint8 (n, chans, size, size), and their names."""
    path = Path(spec)
    found: list[tuple[str, Image.Image]]
    if path.is_dir() and (files := _image_files(path)):
        found = [(str(f), _open_image(f, str(f))) for f in files[:num]]
    elif path.is_file() and path.suffix.lower() != ".tar":
        found = [(str(path), _open_image(path, str(path)))]
    else:
        found = _shard_images(str(spec), num)
    if not found:
        raise VisualizeError(f"--images {spec}: no images there (a folder of image files, or webdataset shards)")
    if len(found) < num:
        log.warning("--images %s: only %d images (asked for %d)", spec, len(found), num)
    batch = torch.stack([center_crop_resize(img, size, chans) for _, img in found])
    return batch, [name for name, _ in found]


def normalize(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (n, c, h, w) -> float32 ``(x / 255 - mean) / std``."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (batch.float() / 255.0 - m) / s


@dataclass
class VisualizeResult:
    output: Path
    height: int
    width: int
    images: list[str]
    mask_ratio: float
    seed: int | None
    loss: float
    source: Source


@torch.no_grad()
def visualize(source: str | os.PathLike, images: str | os.PathLike, output: str | os.PathLike, *, num: int = 8,
              seed: int | None = 0, mask_ratio: float | None = None, step: int | None = None,
              model: str | None = None, norm_pix_loss: bool | None = None, device: str = "cpu") -> VisualizeResult:
    """Write the reconstruction grid of ``source`` on ``images`` to ``output`` (PNG)."""
    if num < 1:
        raise VisualizeError(f"--num must be at least 1, got {num}")
    try:
        src = load_source(source, step, model)
    except ExportError as exc:
        raise VisualizeError(str(exc)) from None
    if not src.has_decoder:
        raise VisualizeError(f"{src.path} holds an encoder only (no decoder weights); reconstructions need a full "
                             "MAE checkpoint (a run's checkpoint, or a public MAE file with decoder_* keys)")
    if norm_pix_loss is not None:
        src.norm_pix_loss = norm_pix_loss
    ratio = src.mask_ratio if mask_ratio is None else mask_ratio
    num_patches = src.grid_size**2
    if not (0.0 < ratio < 1.0) or int(num_patches * (1 - ratio)) < 1:
        raise VisualizeError(f"--mask-ratio must be in (0, 1) and keep at least one of the {num_patches} patches "
                             f"visible, got {ratio}")
    for note in src.notes:
        log.info("%s", note)
    mae = model_from_source(src, with_decoder=True, device=device)
    batch, names = load_images(images, src.img_size, num, src.in_chans)
    imgs = normalize(batch, src.mean, src.std).to(device)
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    noise = torch.rand(imgs.shape[0], num_patches, generator=gen).to(device)
    loss, pred, mask = mae(imgs, mask_ratio=ratio, noise=noise)
    grid = reconstruction_grid(mae, imgs, pred, mask, src.mean, src.std, max_rows=imgs.shape[0])

    out = Path(output)
    if out.is_dir():
        raise VisualizeError(f"--output {out} is a directory; give a file name such as {out / 'reconstruction.png'}")
    save_png(grid, out)
    _, h, w = grid.shape
    log.info("wrote %s (%dx%d): %d images, mask ratio %.2f, seed %s", out, w, h, len(names), ratio, seed)
    return VisualizeResult(output=out, height=h, width=w, images=names, mask_ratio=ratio, seed=seed,
                           loss=float(loss), source=src)


__all__ = ["VisualizeError", "VisualizeResult", "visualize", "load_images", "center_crop_resize", "normalize"]
