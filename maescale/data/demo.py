"""Procedural images: a small demo data set (``tools/make_demo_data.py``) and photo-like JPEGs for
the loader benchmark and tests. Only numpy and PIL; deterministic given a seed.

Demo images are of six kinds (the ``cls`` label): smooth colour fields, linear gradients,
stripes, gaussian blobs, textured shapes on a background, and concentric rings -- structure
with edges, textures and smooth regions that an MAE can learn to inpaint.
"""

from __future__ import annotations

import io
import json
import logging
import os
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from maescale.data.shards import Record, ShardSummary, write_records

logger = logging.getLogger(__name__)

DEMO_KINDS = ("field", "gradient", "stripes", "blobs", "shapes", "rings")


def _colors(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, 3)).astype(np.float32)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    return x, y


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    small = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)).astype(np.float32)


def demo_image(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """One (size, size, 3) uint8 image of the given kind."""
    x, y = _grid(size)
    if kind == "field":
        img = _smooth_field(rng, size, int(rng.integers(2, 5)))
    elif kind == "gradient":
        a, b = _colors(rng, 2)
        angle = rng.uniform(0, 2 * np.pi)
        t = (np.cos(angle) * (x - 0.5) + np.sin(angle) * (y - 0.5)) / 1.42 + 0.5
        img = a * (1 - t[..., None]) + b * t[..., None]
    elif kind == "stripes":
        a, b = _colors(rng, 2)
        angle = rng.uniform(0, np.pi)
        freq = rng.uniform(3, 12)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (np.cos(angle) * x + np.sin(angle) * y) + rng.uniform(0, 6.3))
        if rng.random() < 0.5:
            t = (t > 0.5).astype(np.float32)
        img = a * (1 - t[..., None]) + b * t[..., None]
    elif kind == "blobs":
        img = np.broadcast_to(_colors(rng, 1)[0], (size, size, 3)).copy()
        for _ in range(int(rng.integers(3, 8))):
            cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
            w = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None]
            img = img * (1 - w) + _colors(rng, 1)[0] * w
    elif kind == "shapes":
        base = Image.fromarray(_smooth_field(rng, size, 3).astype(np.uint8))
        draw = ImageDraw.Draw(base)
        for _ in range(int(rng.integers(2, 6))):
            x0, y0 = rng.uniform(-0.1, 0.8, 2) * size
            w, h = rng.uniform(0.15, 0.5, 2) * size
            color = tuple(int(c) for c in _colors(rng, 1)[0])
            shape = rng.integers(0, 3)
            if shape == 0:
                draw.ellipse([x0, y0, x0 + w, y0 + h], fill=color)
            elif shape == 1:
                draw.rectangle([x0, y0, x0 + w, y0 + h], fill=color)
            else:
                draw.polygon([(x0, y0 + h), (x0 + w / 2, y0), (x0 + w, y0 + h)], fill=color)
        img = np.asarray(base).astype(np.float32)
        img += rng.normal(0, 6, (size, size, 1)).astype(np.float32)  # texture
    elif kind == "rings":
        a, b = _colors(rng, 2)
        cx, cy = rng.uniform(0.2, 0.8, 2)
        freq = rng.uniform(4, 14)
        t = 0.5 + 0.5 * np.cos(2 * np.pi * freq * np.sqrt((x - cx) ** 2 + (y - cy) ** 2))
        img = a * (1 - t[..., None]) + b * t[..., None]
    else:
        raise ValueError(f"unknown demo image kind {kind!r}; known: {', '.join(DEMO_KINDS)}")
    img = img + rng.normal(0, 3, img.shape).astype(np.float32)  # sensor-like noise
    return np.clip(img, 0, 255).astype(np.uint8)


def demo_records(num_images: int, size: int, seed: int = 0, quality: int = 90, start: int = 0) -> Iterator[Record]:
    """The demo samples ``start .. start + num_images - 1`` as shard records (JPEG + cls + json);
    image i depends only on (seed, i)."""
    for i in range(start, start + num_images):
        rng = np.random.default_rng([seed, i])
        label = i % len(DEMO_KINDS)
        kind = DEMO_KINDS[label]
        buf = io.BytesIO()
        Image.fromarray(demo_image(rng, kind, size)).save(buf, "JPEG", quality=quality)
        meta = {"kind": kind, "label": label, "index": i, "seed": seed, "width": size, "height": size}
        yield Record(f"{kind}_{i:05d}", {"jpg": buf.getvalue(), "cls": str(label).encode(),
                                         "json": json.dumps(meta).encode()})


def make_demo_data(output: str | os.PathLike, num_images: int = 512, size: int = 96, seed: int = 0,
                   maxcount: int = 128, heldout: int = 128) -> ShardSummary:
    """Write the demo set as ``OUTPUT/shards/shard-*.tar`` + ``OUTPUT/shards/sizes.json``
    and, with ``heldout`` > 0, ``heldout`` further images of the same kinds (indices after the
    training images: never seen in training) as ``OUTPUT/heldout/`` for the kNN evaluation
    (replacing an earlier demo set there). Returns the summary of the training shards."""
    if num_images < 1 or size < 8:
        raise ValueError("need at least one image of at least 8x8 pixels")
    if heldout < 0:
        raise ValueError(f"heldout must be >= 0, got {heldout}")
    out = os.path.join(os.fspath(output), "shards")
    summary = write_records(demo_records(num_images, size, seed), out, maxcount=maxcount, overwrite=True,
                            classes=list(DEMO_KINDS))
    logger.info("demo data: %d images of %dx%d in %d shards at %s", summary.total, size, size,
                len(summary.shards), out)
    if heldout:
        held_dir = os.path.join(os.fspath(output), "heldout")
        held = write_records(demo_records(heldout, size, seed, start=num_images), held_dir, maxcount=maxcount,
                             overwrite=True, classes=list(DEMO_KINDS))
        logger.info("held-out demo data: %d images in %d shards at %s", held.total, len(held.shards), held_dir)
    return summary


# --------------------------------------------------------------------------------------------
# Photo-like JPEGs (benchmark, tests)
# --------------------------------------------------------------------------------------------

_GRAIN: dict[int, np.ndarray] = {}


def _grain(seed: int = 1234) -> np.ndarray:
    if seed not in _GRAIN:
        rng = np.random.default_rng(seed)
        _GRAIN[seed] = np.clip(rng.normal(0, 7, (1600, 2100, 3)), -40, 40).astype(np.int16)
    return _GRAIN[seed]


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """An RGB image with the statistics JPEG cares about in photos: smooth colour regions, sharp
    and soft edges, textures at several scales and sensor grain (JPEG q90 of 500x375 is ~70 kB)."""
    sw, sh = max(8, width // 4), max(8, height // 4)
    cells = rng.integers(0, 256, (int(rng.integers(3, 8)), int(rng.integers(3, 8)), 3), dtype=np.uint8)
    small = np.asarray(Image.fromarray(cells).resize((sw, sh), Image.Resampling.BICUBIC)).astype(np.float32)
    for cell, amp in ((16, 18.0), (4, 12.0)):  # textures at coarse scales, in the small image
        n = rng.standard_normal((max(2, sh // cell), max(2, sw // cell))).astype(np.float32)
        small += amp * np.asarray(Image.fromarray(n, "F").resize((sw, sh), Image.Resampling.BILINEAR))[..., None]
    small *= np.linspace(0.8, 1.15, sh, dtype=np.float32)[:, None, None]  # lighting
    base = Image.fromarray(np.clip(small, 0, 255).astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(base)
    for _ in range(int(rng.integers(20, 40))):  # sharp-edged objects
        x0, y0 = int(rng.integers(-width // 4, width)), int(rng.integers(-height // 4, height))
        w, h = int(rng.integers(width // 30 + 1, width // 3 + 2)), int(rng.integers(height // 30 + 1, height // 3 + 2))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=color)
        else:
            pts = [(x0 + int(rng.integers(0, w)), y0 + int(rng.integers(0, h))) for _ in range(int(rng.integers(3, 7)))]
            draw.polygon(pts, fill=color)
    if rng.random() < 0.5:
        base = base.filter(ImageFilter.BoxBlur(1))  # some images softer than others
    arr = np.asarray(base).astype(np.int16)
    grain = _grain()
    gy = int(rng.integers(0, max(1, grain.shape[0] - height)))
    gx = int(rng.integers(0, max(1, grain.shape[1] - width)))
    g = grain[gy:gy + height, gx:gx + width]
    if g.shape[:2] != (height, width):
        g = np.resize(g, (height, width, 3))
    arr = arr + g
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def photo_like_jpeg(seed: int, width: int, height: int, quality: int = 90) -> bytes:
    """:func:`photo_like` encoded as JPEG; depends only on its arguments."""
    img = photo_like(np.random.default_rng(seed), width, height)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()
