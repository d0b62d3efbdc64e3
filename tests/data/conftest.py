"""Fixtures of the data tests: real tar shards written with webdataset.TarWriter into tmp_path."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from maescale.config import DataConfig
from maescale.data.demo import photo_like_jpeg


def id_png(i: int, size: int = 12) -> bytes:
    """A solid-colour PNG whose colour encodes ``i`` (red = i % 256, green = i // 256)."""
    arr = np.zeros((size, size + 3, 3), np.uint8)
    arr[..., 0], arr[..., 1], arr[..., 2] = i % 256, i // 256, 77
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def id_of(img) -> int:
    """Inverse of :func:`id_png` on a decoded (3, H, W) uint8 tensor."""
    return int(img[0, 0, 0]) + 256 * int(img[1, 0, 0])


def write_shards(folder: Path, sizes: list[int], *, bad: dict[int, bytes] | None = None, sizes_json: bool = True,
                 prefix: str = "shard") -> list[str]:
    """Shards of id-coded PNG samples (ids 0..sum(sizes)-1, keys ``s{id:05d}``); ``bad`` replaces
    some samples' image bytes. Returns the shard paths."""
    folder.mkdir(parents=True, exist_ok=True)
    bad = bad or {}
    paths, table, i = [], {}, 0
    for n, count in enumerate(sizes):
        path = folder / f"{prefix}-{n:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for _ in range(count):
                sink.write({"__key__": f"s{i:05d}", "png": bad.get(i, id_png(i)), "cls": str(i % 3).encode()})
                i += 1
        paths.append(str(path))
        table[path.name] = count
    if sizes_json:
        (folder / "sizes.json").write_text(json.dumps({"total": sum(sizes), "shards": table}))
    return paths


def data_cfg(shards, **kw) -> DataConfig:
    values = dict(train_shards=shards, num_workers=0, shuffle_buffer=16, pin_memory=False, prefetch_factor=2)
    values.update(kw)
    return DataConfig(**values)


@pytest.fixture()
def shard_dir(tmp_path: Path) -> Path:
    return tmp_path / "shards"


# ---- photo-like JPEG shards (data.gpu_decode tests, the e2e resume test) ----------------------

SIZES = [(64, 48), (300, 200), (500, 375), (1200, 900)]


def jpeg_of(i: int, size: tuple[int, int], mode: str = "RGB", quality: int = 90) -> bytes:
    data = photo_like_jpeg(i, *size, quality=quality)
    if mode == "RGB":
        return data
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert(mode).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_jpeg_shards(folder: Path, count: int = 48, per_shard: int = 12, sizes=SIZES,
                      special: dict[int, tuple[str, bytes]] | None = None) -> str:
    """Shards of photo-like JPEGs of the given sizes (cycled); ``special`` replaces sample i by
    (extension, bytes). Returns a glob pattern; sizes.json is written beside."""
    folder.mkdir(parents=True, exist_ok=True)
    special = special or {}
    table = {}
    for s in range((count + per_shard - 1) // per_shard):
        path = folder / f"shard-{s:06d}.tar"
        n = 0
        with wds.TarWriter(str(path)) as sink:
            for i in range(s * per_shard, min(count, (s + 1) * per_shard)):
                ext, data = special.get(i, ("jpg", jpeg_of(i, sizes[i % len(sizes)])))
                sink.write({"__key__": f"s{i:05d}", ext: data, "cls": b"0"})
                n += 1
        table[path.name] = n
    (folder / "sizes.json").write_text(json.dumps({"total": count, "shards": table}))
    return str(folder / "shard-*.tar")
