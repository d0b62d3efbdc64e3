"""Decode one image sample into a uint8 RandomResizedCrop + flip, doing as little work as possible.

The law of the transform is torchvision's ``RandomResizedCrop(size, scale, ratio, bicubic)`` +
``RandomHorizontalFlip(p)``: :func:`crop_box` is ``RandomResizedCrop.get_params`` (10 tries of a
uniform area fraction and log-uniform aspect ratio, central-crop fallback) driven by a given
``random.Random``. The box is always drawn from the *original* image size (read from the header),
so the fast and the plain path draw identical boxes from identical RNG states.

Plain path (``fast=False``): decode fully, convert to RGB, ``crop(box).resize(size, BICUBIC)``:
pixel-identical to torchvision's ``F.resized_crop`` on a PIL image.

Fast path (``fast=True``, the default):

1. ``Image.open`` reads only the header; the box is drawn from its size.
2. JPEG: ``draft()`` asks libjpeg for a DCT-domain downscale by 1/2, 1/4 or 1/8 -- the largest
   factor for which the crop box is still at least the output size in both directions, so the
   result is never upsampled where the plain path would have downsampled. The box is then
   mapped to the reduced image to the nearest reduced pixel (an offset below half an output
   pixel). DCT scaling saves the inverse DCT and colour conversion, not the entropy decoding,
   so:
2b. JPEG rows below the crop box are not decoded at all (libjpeg works top to bottom; see
   :func:`_load_rows`). The rows that are decoded are bit-identical to a full decode. A
   consequence: a JPEG truncated below the crop box decodes on the fast path and is a bad
   sample on the plain path.
3. One resize from the crop box (a view, no copy) straight to the output size, with torch's
   antialiased uint8 kernels: the same filter as PIL's (within one grey level of it), 4-8x faster
   than PIL's resize, and the result is already CHW uint8.
4. No colour conversion at full size unless needed: RGB and grayscale go straight to the resize
   (grayscale as one channel, expanded at the output size); rarer modes (palette, alpha, CMYK,
   16-bit) are converted at full size with the same rules as the plain path.
5. The flip is done on the small output.

Both paths reject images with more than ``max_pixels`` pixels before decoding anything
(decompression bombs), and raise :class:`BadSample` on anything undecodable.
"""

from __future__ import annotations

import io
import math
import random
import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile

from maescale.data.imageops import prepare_mode, to_rgb, to_rgb_array  # noqa: F401  (to_rgb re-exported)

# Keys under which a sample's image may be stored, in order of preference.
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "pbm", "bmp", "tif", "tiff", "gif",
              "jpe", "jfif", "img", "image")
PIL_FORMATS = ("JPEG", "PNG", "WEBP", "PPM", "BMP", "TIFF", "GIF", "MPO")
RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is a bad sample, not a grey image


class BadSample(Exception):
    """This sample cannot be turned into an image (the reason is the message)."""


def set_max_image_pixels(limit: int) -> None:
    """PIL's own decompression-bomb guard (it raises above twice this); we check ``limit``
    ourselves before decoding."""
    Image.MAX_IMAGE_PIXELS = int(limit)


def crop_box(
    rng: random.Random,
    width: int,
    height: int,
    scale: Sequence[float] = (0.2, 1.0),
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params``: returns ``(top, left, h, w)``."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def image_bytes(sample: dict) -> bytes:
    """The encoded image of a WebDataset sample (first of :data:`IMAGE_KEYS`, then any key whose
    last extension part is one of them)."""
    for key in IMAGE_KEYS:
        if key in sample:
            return sample[key]
    for key, value in sample.items():
        if not key.startswith("__") and key.rsplit(".", 1)[-1] in IMAGE_KEYS:
            return value
    keys = ", ".join(k for k in sample if not k.startswith("__")) or "none"
    raise BadSample(f"no image in sample (keys: {keys})")


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise BadSample("empty image (0 bytes)")
    Image.MAX_IMAGE_PIXELS = max_pixels  # PIL's guard errors above 2x this; ours (below) above 1x
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
    except Image.DecompressionBombError as exc:
        raise BadSample(f"decompression bomb: {exc}") from None
    except Exception as exc:
        raise BadSample(f"cannot open image: {type(exc).__name__}: {exc}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise BadSample(f"image has size {w}x{h}")
    if w * h > max_pixels:
        raise BadSample(f"decompression bomb: {w}x{h} = {w * h} pixels is more than data.max_image_pixels="
                        f"{max_pixels}")
    return img


def _draft_scale(box_w: int, box_h: int, out: int) -> int:
    for s in (8, 4, 2):
        if box_w >= out * s and box_h >= out * s:
            return s
    return 1


_TORCH_MODE = {"bicubic": "bicubic", "bilinear": "bilinear"}


def _resize_chw(arr: np.ndarray, box: tuple[int, int, int, int], size: int, mode: str) -> torch.Tensor:
    """Crop ``arr`` (H, W, C) uint8 to the integer ``box`` (left, top, right, bottom) and resize
    to (C, size, size) uint8 with torch's antialiased uint8 kernels, which match PIL's
    ``resize`` to within one grey level (torchvision documents the same)."""
    left, top, right, bottom = box
    with warnings.catch_warnings():  # PIL's arrays are read-only; we never write to them
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(arr)
    t = t.permute(2, 0, 1)[None, :, top:bottom, left:right]
    if t.shape[-2:] == (size, size):
        return t[0].contiguous()
    return F.interpolate(t, size=(size, size), mode=mode, antialias=True)[0]


class Decoder:
    """Sample bytes -> uint8 (3, H, W) RandomResizedCrop + flip, fast or plain path."""

    def __init__(
        self,
        size: int,
        scale: Sequence[float] = (0.2, 1.0),
        ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
        interpolation: str = "bicubic",
        hflip_prob: float = 0.5,
        fast: bool = True,
        max_pixels: int = 178_956_970,
    ):
        self.size = int(size)
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.interpolation = interpolation
        self.resample = RESAMPLE[interpolation]
        self.hflip_prob = float(hflip_prob)
        self.fast = fast
        self.max_pixels = int(max_pixels)
        self.partial_decode = True  # fast path: stop decoding JPEGs below the crop box

    def draw(self, rng: random.Random, width: int, height: int) -> tuple[tuple[int, int, int, int], bool]:
        """The random parameters of one sample: the crop box ``(top, left, h, w)`` and the flip."""
        box = crop_box(rng, width, height, self.scale, self.ratio)
        flip = rng.random() < self.hflip_prob
        return box, flip

    def __call__(self, data: bytes, rng: random.Random) -> torch.Tensor:
        """Decode and augment one image; returns (3, size, size) uint8."""
        img = _open(data, self.max_pixels)
        box, flip = self.draw(rng, *img.size)
        return self.render(img, data, box, flip)

    def open(self, data: bytes) -> Image.Image:
        """The lazily opened image (header read, nothing decoded); :class:`BadSample` on a bad
        header or a decompression bomb."""
        return _open(data, self.max_pixels)

    def render(self, img: Image.Image, data: bytes, box: tuple[int, int, int, int], flip: bool) -> torch.Tensor:
        """Decode the opened ``img`` (bytes ``data``) with the drawn ``box`` and ``flip``."""
        try:
            out = self._fast(img, box, data) if self.fast else self._plain(img, box)
        except BadSample:
            raise
        except Exception as exc:  # truncated data, broken streams, odd modes
            raise BadSample(f"cannot decode image: {type(exc).__name__}: {exc}") from None
        return out.flip(-1) if flip else out

    def decode_box(self, data: bytes, box: tuple[int, int, int, int], fast: bool | None = None) -> torch.Tensor:
        """Decode with a given box ``(top, left, h, w)`` and no flip (to compare the paths)."""
        img = _open(data, self.max_pixels)
        return self._fast(img, box, data) if (self.fast if fast is None else fast) else self._plain(img, box)

    def _plain(self, img: Image.Image, box: tuple[int, int, int, int]) -> torch.Tensor:
        """Reference: exactly torchvision's ``F.resized_crop`` on the RGB PIL image."""
        top, left, h, w = box
        rgb = to_rgb(img)
        out = rgb.crop((left, top, left + w, top + h)).resize((self.size, self.size), self.resample)
        return torch.from_numpy(np.array(out)).permute(2, 0, 1).contiguous()

    def _fast(self, img: Image.Image, box: tuple[int, int, int, int], data: bytes | None = None) -> torch.Tensor:
        top, left, h, w = box
        s = 1
        jpeg = img.format == "JPEG"
        if jpeg:
            want = _draft_scale(w, h, self.size)
            if want > 1:
                width, height = img.size
                # PIL picks the largest power of two <= W // request: ask for exactly 1/want
                if img.draft(None, (max(1, width // want), max(1, height // want))) is not None:
                    for cand in (8, 4, 2, 1):  # PIL sizes the result ceil(W / s)
                        if -(-width // cand) == img.size[0] and -(-height // cand) == img.size[1]:
                            s = cand
                            break
        W, H = img.size
        if s == 1:
            ibox = (left, top, left + w, top + h)
        else:  # the box in the reduced image, to the nearest reduced pixel (< 1/2 output pixel)
            x0, y0 = min(round(left / s), W - 1), min(round(top / s), H - 1)
            x1 = min(max(round((left + w) / s), x0 + 1), W)
            y1 = min(max(round((top + h) / s), y0 + 1), H)
            ibox = (x0, y0, x1, y1)
        if jpeg and data is not None and self.partial_decode:
            img = _load_rows(img, ibox[3], data, s)
        else:
            img.load()
        if img.mode == "RGB":
            arr = np.asarray(img)
        elif img.mode == "L":
            arr = np.asarray(img)[:, :, None]
        else:  # rare modes: to RGB at full size, same rules as the plain path
            arr = to_rgb_array(prepare_mode(img))
        out = _resize_chw(arr, ibox, self.size, _TORCH_MODE[self.interpolation])
        if out.shape[0] == 1:
            out = out.expand(3, -1, -1).contiguous()
        return out


def _load_rows(img: Image.Image, rows: int, data: bytes, scale: int) -> Image.Image:
    """Decode only the first ``rows`` rows of a JPEG: libjpeg decodes top to bottom, so the rows
    below the crop box cost nothing. PIL's decoder, told the image has ``rows`` rows (the same kind
    of tile edit ``draft()`` makes), stops there and then reports a broken stream for the rows it
    was not asked for; the rows it wrote are exactly those of a full decode. A genuine fatal error
    would leave the last row unwritten (zero); then, or if PIL's internals differ from what we
    expect, the image is decoded again in full, so the result is never worse than a plain load."""
    width, height = img.size
    if rows >= height - 8 or len(img.tile) != 1:
        img.load()
        return img
    try:
        tile = img.tile[0]
        img.tile = [tile._replace(extents=(0, 0, width, rows))]
        img._size = (width, rows)
    except Exception:  # another PIL: no partial decode
        return _reload(data, scale)
    try:
        img.load()
    except OSError as exc:
        if "broken data stream" not in str(exc) or getattr(img, "_im", None) is None:
            raise  # truncated before our rows, or another error: a bad sample
        if not np.asarray(img)[rows - 1].any():
            return _reload(data, scale)
    return img


def _reload(data: bytes, scale: int) -> Image.Image:
    img = Image.open(io.BytesIO(data), formats=("JPEG",))
    if scale > 1:
        img.draft(None, (max(1, img.size[0] // scale), max(1, img.size[1] // scale)))
    img.load()
    return img
