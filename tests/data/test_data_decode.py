"""Decoding: image modes, the crop law, fast path vs plain path vs torchvision, bad images."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from maescale.data.decode import BadSample, Decoder, crop_box, image_bytes
from maescale.data.demo import photo_like, photo_like_jpeg


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def decode(data: bytes, size: int = 16, fast: bool = True) -> torch.Tensor:
    dec = Decoder(size, fast=fast, hflip_prob=0.0)
    h, w = Image.open(io.BytesIO(data)).size[::-1]
    return dec.decode_box(data, (0, 0, h, w))


# --------------------------------------------------------------------------------------------
# Modes
# --------------------------------------------------------------------------------------------

def _modes():
    rgb = (200, 30, 90)
    gray = Image.new("L", (20, 16), 120)
    pal = Image.new("RGB", (20, 16), rgb).convert("P", palette=Image.Palette.ADAPTIVE)
    pal_t = pal.copy()
    pal_t.info["transparency"] = pal.getpixel((0, 0))
    i16 = Image.fromarray(np.full((16, 20), 40000, np.uint16))
    return [
        ("L-png", encode(gray, "PNG"), (120, 120, 120)),
        ("L-jpeg", encode(gray, "JPEG", quality=95), (120, 120, 120)),
        ("P-png", encode(pal, "PNG"), rgb),
        ("P-transparent", encode(pal_t, "PNG"), (255, 255, 255)),  # transparent: over white
        ("RGBA", encode(Image.new("RGBA", (20, 16), (*rgb, 255)), "PNG"), rgb),
        ("RGBA-half", encode(Image.new("RGBA", (20, 16), (0, 0, 0, 128)), "PNG"), (127, 127, 127)),
        ("LA", encode(Image.new("LA", (20, 16), (60, 255)), "PNG"), (60, 60, 60)),
        ("CMYK-jpeg", encode(Image.new("RGB", (20, 16), rgb).convert("CMYK"), "JPEG", quality=95), rgb),
        ("I;16-png", encode(i16, "PNG"), (156, 156, 156)),  # 40000 >> 8
        ("1-bmp", encode(Image.new("1", (20, 16), 1), "BMP"), (255, 255, 255)),
        ("RGB-webp", encode(Image.new("RGB", (20, 16), rgb), "WEBP", lossless=True), rgb),
        ("RGB-gif", encode(Image.new("RGB", (20, 16), rgb), "GIF"), rgb),
        ("RGB-tiff", encode(Image.new("RGB", (20, 16), rgb), "TIFF"), rgb),
    ]


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("name,data,expected", _modes(), ids=[m[0] for m in _modes()])
def test_every_mode_becomes_rgb(name, data, expected, fast):
    out = decode(data, fast=fast)
    assert out.dtype == torch.uint8 and out.shape == (3, 16, 16)
    tol = 6 if "jpeg" in name.lower() else 2
    center = out[:, 8, 8].tolist()
    assert all(abs(a - b) <= tol for a, b in zip(center, expected)), (name, center, expected)


def test_image_under_any_usual_key():
    png = encode(Image.new("RGB", (4, 4)), "PNG")
    for key in ("jpg", "jpeg", "png", "webp", "seg.png", "JPEG".lower()):
        assert image_bytes({"__key__": "k", "cls": b"1", key: png}) == png
    with pytest.raises(BadSample, match="no image"):
        image_bytes({"__key__": "k", "cls": b"1", "json": b"{}"})


# --------------------------------------------------------------------------------------------
# The crop law
# --------------------------------------------------------------------------------------------


def _ks(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return float(np.max(np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b))))


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (120, 900), (64, 64)])
def test_crop_box_has_torchvision_law(size):
    width, height = size
    n = 4000
    rng = random.Random(0)
    ours = np.array([crop_box(rng, width, height) for _ in range(n)], dtype=float)
    torch.manual_seed(0)
    img = Image.new("L", (width, height))
    ref = np.array([T.RandomResizedCrop.get_params(img, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(n)], dtype=float)
    for x, y in ((ours, ref),):
        feats = lambda b: [b[:, 2] * b[:, 3] / (width * height), np.log(b[:, 3] / b[:, 2]),  # noqa: E731
                           (b[:, 1] + b[:, 3] / 2) / width, (b[:, 0] + b[:, 2] / 2) / height]
        for fo, fr in zip(feats(x), feats(y)):
            assert _ks(fo, fr) < 0.05  # same distribution (critical value at n=4000 is ~0.03 for 1%)
    assert (ours[:, 0] >= 0).all() and (ours[:, 0] + ours[:, 2] <= height).all()
    assert (ours[:, 1] >= 0).all() and (ours[:, 1] + ours[:, 3] <= width).all()


def test_fast_and_plain_paths_draw_the_same_box_and_flip():
    data = photo_like_jpeg(1, 640, 480)
    for seed in range(20):
        a, b = Decoder(32, fast=True), Decoder(32, fast=False)
        ra, rb = random.Random(seed), random.Random(seed)
        assert a.draw(ra, 640, 480) == b.draw(rb, 640, 480)


def test_plain_path_is_torchvision_resized_crop_exactly():
    data = photo_like_jpeg(2, 300, 220)
    img = Image.open(io.BytesIO(data)).convert("RGB")
    dec = Decoder(64, fast=False)
    for box in [(0, 0, 220, 300), (10, 20, 100, 150), (50, 3, 31, 40)]:
        ours = dec.decode_box(data, box)
        ref = TF.pil_to_tensor(TF.resized_crop(img, *box, [64, 64], T.InterpolationMode.BICUBIC))
        assert torch.equal(ours, ref)


@pytest.mark.parametrize("width,height,size", [(500, 375, 224), (2000, 1500, 224), (640, 480, 64), (97, 61, 32)])
def test_fast_path_matches_plain_path_for_the_same_box(width, height, size):
    img = photo_like(np.random.default_rng(width), width, height)
    data = encode(img, "JPEG", quality=90)
    dec = Decoder(size)
    rng = random.Random(0)
    errors, scales = [], set()
    for _ in range(6 if width >= 2000 else 12):
        box, _ = dec.draw(rng, width, height)
        fast = dec.decode_box(data, box, fast=True).float()
        plain = dec.decode_box(data, box, fast=False).float()
        mse = torch.mean((fast - plain) ** 2).item()
        errors.append(10 * math.log10(255 ** 2 / max(mse, 1e-9)))
        scales.add(min(box[2], box[3]) // size)
    # DCT-domain downscaling is not bit-exact, but close: PSNR of photo-like content > 28 dB
    assert min(errors) > 28, errors
    if width >= 2000:
        assert max(scales) >= 2  # the draft path was exercised


def test_fast_path_is_exact_where_no_draft_applies():
    img = photo_like(np.random.default_rng(5), 200, 150)
    data = encode(img, "PNG")
    dec = Decoder(64)
    rng = random.Random(1)
    for _ in range(5):
        box, _ = dec.draw(rng, 200, 150)
        diff = (dec.decode_box(data, box, fast=True).int() - dec.decode_box(data, box, fast=False).int()).abs()
        # torch's antialiased kernel vs PIL's: the same filter, rounding differences only
        assert diff.max() <= 3 and diff.float().mean() < 0.5


def test_flip_is_applied_with_its_probability():
    arr = np.zeros((10, 10, 3), np.uint8)
    arr[:, :5] = 255
    data = encode(Image.fromarray(arr), "PNG")
    flips = 0
    dec = Decoder(10, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    for seed in range(200):
        out = dec(data, random.Random(seed))
        flips += int(out[0, 5, 0]) < 128
    assert 70 < flips < 130


# --------------------------------------------------------------------------------------------
# Bad images
# --------------------------------------------------------------------------------------------


def test_bad_images_raise_badsample(tmp_path):
    good = photo_like_jpeg(3, 64, 48)
    png = encode(Image.new("RGB", (64, 48), (1, 2, 3)), "PNG")
    cases = {
        "empty": b"",
        "random": bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8)),
        "truncated-jpeg": good[: len(good) // 3],
        "truncated-png": png[: len(png) // 2],
        "text": b"hello world",
    }
    dec = Decoder(16)
    for name, data in cases.items():
        for fast in (True, False):
            dec.fast = fast
            with pytest.raises(BadSample):
                dec(data, random.Random(0))


def test_decompression_bomb_is_a_bad_sample_before_decoding():
    data = encode(Image.new("L", (4000, 3000)), "PNG")  # 12 Mpx of zeros: a few kB
    with pytest.raises(BadSample, match="decompression bomb"):
        Decoder(16, max_pixels=10_000_000)(data, random.Random(0))
    with pytest.raises(BadSample, match="decompression bomb"):
        Decoder(16, max_pixels=1_000_000)(data, random.Random(0))  # PIL's own 2x limit: error at open
    assert Decoder(16, max_pixels=20_000_000)(data, random.Random(0)).shape == (3, 16, 16)


def test_tiny_images_are_upsampled():
    for w, h in [(1, 1), (3, 2), (2, 7)]:
        data = encode(Image.new("RGB", (w, h), (9, 99, 199)), "PNG")
        for fast in (True, False):
            out = Decoder(8, fast=fast)(data, random.Random(0))
            assert out.shape == (3, 8, 8) and out[:, 4, 4].tolist() == [9, 99, 199]


def test_partial_jpeg_decode_is_exact():
    data = photo_like_jpeg(7, 800, 600)
    progressive = io.BytesIO()
    Image.open(io.BytesIO(data)).save(progressive, "JPEG", quality=90, progressive=True)
    for blob in (data, progressive.getvalue()):
        for box in [(0, 0, 100, 120), (50, 200, 300, 300), (10, 10, 500, 700), (100, 300, 450, 480)]:
            a, b = Decoder(64), Decoder(64)
            b.partial_decode = False
            assert torch.equal(a.decode_box(blob, box), b.decode_box(blob, box))


def test_fast_path_needs_only_the_bytes_down_to_the_crop():
    data = photo_like_jpeg(8, 640, 480)
    cut = data[: int(len(data) * 0.7)]
    box = (0, 0, 120, 160)  # top rows only
    assert Decoder(32).decode_box(cut, box).shape == (3, 32, 32)
    with pytest.raises(Exception):
        Decoder(32, fast=False).decode_box(cut, box)  # the plain path decodes everything
    with pytest.raises(BadSample, match="truncated"):
        Decoder(32, scale=(1.0, 1.0), ratio=(1.0, 1.0))(cut, random.Random(0))  # a crop down to the bottom
