"""Write WebDataset shards: the shard writer, the check of each image, and the image-folder input
(``tools/make_shards.py`` is the CLI; :mod:`maescale.data.ingest` reads the other inputs --
Parquet, ``save_to_disk`` folders, path lists -- into the same :class:`Item` stream).

Output, all inside ``output_dir`` and nowhere else::

    shard-000000.tar, shard-000001.tar, ...   each sample: KEY.jpg (or .png, ...), KEY.cls, KEY.json
    sizes.json                                 {"total": N, "shards": {"shard-000000.tar": n, ...}, ...}
    manifest.json                              per shard: samples, bytes, sha256; totals; unreadable images

* Input: ImageNet-style class folders (``DIR/n01440764/xxx.JPEG``; the class is the first folder
  below ``DIR``, labels are the sorted class names' indices) or a flat folder (no ``cls``).
* Keys are ``{index:09d}_{name}`` with ``name`` reduced to ``[A-Za-z0-9_-]`` (at most 64 chars):
  unique, free of dots and slashes, so hostile file names can neither break WebDataset's
  KEY.EXT grouping nor make ``tar -x`` write outside its target directory.
* Image bytes are copied as they are (the format is sniffed from the content, not the name);
  ``resize=N`` re-encodes images whose shorter side exceeds N to that size (JPEG, quality 95).
  Images that cannot be read (missing file, undecodable bytes, unsupported format) are skipped,
  counted and listed with the reason in ``manifest.json``; if none can be read it is an error.
  The check is the header for JPEG (as the loader's fast path reads it), ``verify()`` for others.
* Files are shuffled (seeded) before sharding by default, so that each shard mixes classes.
* Each shard is written under a temporary hidden name and renamed when complete, and so are
  ``sizes.json`` and ``manifest.json``: a crash never leaves a truncated ``shard-*.tar``.
* Tar members have fixed owner, mode and time, and the manifest holds no time: the same input
  gives byte-identical output, whatever the number of worker processes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import sys
import tarfile
import time
from dataclasses import dataclass, field
from multiprocessing import get_context
from collections import deque
from typing import Any, Callable, Iterable, Iterator

from PIL import Image

from maescale.data.imageops import to_rgb
from maescale.rundir import publish, temp_path, write_json_atomic

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".ppm", ".pgm", ".pbm",
                    ".tif", ".tiff", ".gif"}
FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "PPM": "ppm",
              "TIFF": "tif", "GIF": "gif"}
MTIME = 946684800  # 2000-01-01: fixed, so that shards are reproducible
_PREFIX = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")


def safe_name(text: str, limit: int = 64) -> str:
    """``text`` reduced to ``[A-Za-z0-9_-]`` (runs of anything else become ``_``)."""
    out = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_-")
    return out[-limit:] if out else "x"


@dataclass
class Record:
    """One sample to write: its name (for the key), members ``{ext: bytes}``."""

    name: str
    members: dict[str, bytes]


@dataclass
class Item:
    """One image to shard, before it is checked: its bytes, or a file to read them from."""

    name: str  # the key is made from it (sanitised)
    where: str  # the image named in messages and in the manifest's unreadable list
    data: bytes | None = None
    path: str | None = None  # read (in a worker process) when ``data`` is None
    label: int | None = None  # written as KEY.cls
    meta: dict[str, Any] = field(default_factory=dict)  # KEY.json fields (width and height follow)


MANIFEST_FORMAT = "maescale-manifest/1"


@dataclass
class ShardSummary:
    """What a shard set holds: ``sizes.json`` (:meth:`to_json`, read by the loader) and
    ``manifest.json`` (:meth:`manifest`)."""

    shards: dict[str, int] = field(default_factory=dict)
    total: int = 0
    skipped: int = 0
    classes: list[str] = field(default_factory=list)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # shard name -> {"bytes", "sha256"}
    unreadable: list[dict[str, str]] = field(default_factory=list)  # {"item", "reason"}
    source: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": "maescale-shards/1", "total": self.total, "shards": self.shards}
        if self.classes:
            out["classes"] = self.classes
        if self.skipped:
            out["skipped"] = self.skipped
        return out

    def manifest(self) -> dict[str, Any]:
        """Per shard: samples, bytes, SHA-256 of the whole tar file; totals; every image that
        was skipped, with the reason."""
        shards = [{"name": name, "samples": n, **self.files.get(name, {})} for name, n in self.shards.items()]
        return {
            "format": MANIFEST_FORMAT,
            "checksum": "sha256",
            "source": self.source,
            "num_shards": len(shards),
            "total_samples": self.total,
            "total_bytes": sum(s.get("bytes", 0) for s in shards),
            "shards": shards,
            "classes": self.classes,
            "unreadable_count": len(self.unreadable),
            "unreadable": self.unreadable,
        }


def _file_digest(path: str) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


class ShardWriter:
    """Sequentially writes samples into numbered shards, atomically; ``close()`` writes sizes.json
    and manifest.json."""

    def __init__(self, output_dir: str | os.PathLike, *, prefix: str = "shard", maxcount: int = 1000,
                 maxsize: int = 1 << 30, overwrite: bool = False):
        if not _PREFIX.match(prefix):
            raise ValueError(f"shard prefix {prefix!r} must be letters, digits, '_' or '-'")
        if maxcount < 1 or maxsize < 1:
            raise ValueError("maxcount and maxsize must be positive")
        self.output_dir = os.path.abspath(os.fspath(output_dir))
        self.prefix = prefix
        self.maxcount = maxcount
        self.maxsize = maxsize
        os.makedirs(self.output_dir, exist_ok=True)
        self._pattern = re.compile(rf"^{re.escape(prefix)}-(\d{{6}})\.tar$")
        existing = [f for f in os.listdir(self.output_dir) if self._pattern.match(f)]
        if existing and not overwrite:
            raise FileExistsError(f"{self.output_dir} already holds shards ({existing[0]}, ...); "
                                  f"choose an empty folder or overwrite")
        self.summary = ShardSummary()
        self._tar: tarfile.TarFile | None = None
        self._tmp = ""
        self._count = 0
        self._size = 0
        self._index = 0  # next sample index (for keys)
        self._last_log = time.monotonic()

    def _path(self, name: str) -> str:
        path = os.path.join(self.output_dir, name)
        assert os.path.dirname(path) == self.output_dir  # never outside the output folder
        return path

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.summary.shards):06d}.tar"
        self._name = name
        self._tmp = str(temp_path(self._path(name)))
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.PAX_FORMAT)
        self._count = 0
        self._size = 0

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        size, digest = _file_digest(self._tmp)
        publish(self._tmp, self._path(self._name))
        self.summary.shards[self._name] = self._count
        self.summary.files[self._name] = {"bytes": size, "sha256": digest}
        logger.debug("wrote %s: %d samples, %.1f MB", self._name, self._count, self._size / 1e6)
        self._tar = None

    def write(self, record: Record) -> str:
        """Add one sample; returns its key."""
        size = sum(512 + (len(v) + 511) // 512 * 512 for v in record.members.values())
        if self._tar is not None and (self._count >= self.maxcount or
                                      (self._count > 0 and self._size + size > self.maxsize)):
            self._finish()
        if self._tar is None:
            self._open()
        key = f"{self._index:09d}_{safe_name(record.name)}"
        self._index += 1
        for ext, data in record.members.items():
            if not re.match(r"^[a-z0-9]+(\.[a-z0-9]+)*$", ext):
                raise ValueError(f"bad member extension {ext!r}")
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = MTIME
            info.mode = 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            assert self._tar is not None
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self._size += size
        self.summary.total += 1
        return key

    def skip(self, where: str, reason: str) -> None:
        """Count an image that could not be read (listed in manifest.json)."""
        self.summary.skipped += 1
        self.summary.unreadable.append({"item": where, "reason": reason})

    def close(self) -> ShardSummary:
        """Finish the last shard, remove stale shards of an earlier run, write manifest.json and
        sizes.json."""
        self._finish()
        for f in os.listdir(self.output_dir):
            m = self._pattern.match(f)
            if m and f not in self.summary.shards:
                os.remove(self._path(f))
        write_json_atomic(self._path("manifest.json"), self.summary.manifest(), indent=1)
        write_json_atomic(self._path("sizes.json"), self.summary.to_json(), indent=1)
        return self.summary

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            os.remove(self._tmp)
            self._tar = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# --------------------------------------------------------------------------------------------
# Checking images and writing them
# --------------------------------------------------------------------------------------------


def check_image(item: Item, resize: int | None) -> tuple[str, dict[str, bytes] | None, str]:
    """``(name, members, "")`` for a readable image, ``(name, None, reason)`` otherwise.

    The reason starts with its kind: ``missing file``, ``unreadable file``, ``no image bytes``,
    ``undecodable bytes`` or ``unsupported format``.
    """
    data = item.data
    if data is None:
        if item.path is None:
            return item.name, None, "no image bytes (empty value and no path)"
        try:
            with open(item.path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return item.name, None, f"missing file: {item.path}"
        except OSError as exc:
            return item.name, None, f"unreadable file: {item.path}: {type(exc).__name__}: {exc}"
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            width, height = img.size
            if fmt not in FORMAT_EXT:
                return item.name, None, f"unsupported format {fmt}"
            ext = FORMAT_EXT[fmt]
            if resize and min(width, height) > resize:
                scale = resize / min(width, height)
                size = (max(1, round(width * scale)), max(1, round(height * scale)))
                img.draft("RGB", size)
                small = to_rgb(img).resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
                buf = io.BytesIO()
                small.save(buf, "JPEG", quality=95)
                data, ext = buf.getvalue(), "jpg"
                width, height = size
            elif fmt != "JPEG":
                img.verify()  # cheap structural check (PNG: chunk CRCs)
    except Exception as exc:
        detail = re.sub(r" <[^<>]* at 0x[0-9a-fA-F]+>", "", str(exc))  # PIL names the BytesIO object
        return item.name, None, f"undecodable bytes: {type(exc).__name__}: {detail}"
    meta = {**item.meta, "width": width, "height": height}
    members = {ext: data}
    if item.label is not None:
        members["cls"] = str(item.label).encode()
    members["json"] = json.dumps(meta, ensure_ascii=True).encode()
    return item.name, members, ""


def _check_chunk(args: tuple[list[Item], int | None]) -> list[tuple[str, str, dict[str, bytes] | None, str]]:
    items, resize = args
    return [(item.where, *check_image(item, resize)) for item in items]


def _ordered_map(fn: Callable, chunks: Iterable, workers: int) -> Iterator:
    """``map(fn, chunks)`` over ``workers`` processes, in order, with at most a few chunks per
    worker in flight: the input may be a stream of image bytes larger than memory."""
    if workers <= 1:
        yield from map(fn, chunks)
        return
    pool = get_context("spawn" if sys.platform == "darwin" else "fork").Pool(workers)
    try:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(fn, (chunk,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
    finally:
        pool.terminate()


def _chunks(items: Iterable[Item], resize: int | None, size: int = 8) -> Iterator[tuple[list[Item], int | None]]:
    chunk: list[Item] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk, resize
            chunk = []
    if chunk:
        yield chunk, resize


def write_items(items: Iterable[Item], output_dir: str | os.PathLike, *, total: int | None = None,
                classes: list[str] | None = None, source: dict[str, Any] | None = None, maxcount: int = 1000,
                maxsize: int = 1 << 30, workers: int = 1, resize: int | None = None, prefix: str = "shard",
                overwrite: bool = False) -> ShardSummary:
    """Check each item (``workers`` processes; the output does not depend on their number) and
    write the readable ones, in order, as shards + sizes.json + manifest.json.

    Raises ``ValueError`` when none of the items could be read (nothing is published then).
    """
    progress = _Progress(total, "make_shards")
    with ShardWriter(output_dir, prefix=prefix, maxcount=maxcount, maxsize=maxsize, overwrite=overwrite) as writer:
        writer.summary.classes = list(classes or [])
        writer.summary.source = dict(source or {})
        try:
            for results in _ordered_map(_check_chunk, _chunks(items, resize), workers):
                for where, name, members, reason in results:
                    if members is None:
                        writer.skip(where, reason)
                        logger.warning("skipping %s: %s", where, reason)
                    else:
                        writer.write(Record(name, members))
                    progress.update()
        finally:
            progress.close()
        if writer.summary.total == 0:
            seen = writer.summary.skipped
            if not seen:
                raise ValueError("the input holds no images")
            shown = "; ".join(f"{u['item']}: {u['reason']}" for u in writer.summary.unreadable[:3])
            raise ValueError(f"none of the {seen} images could be read, e.g. {shown}")
    summary = writer.summary
    logger.info("wrote %d samples into %d shards in %s (%d images skipped, listed in manifest.json)", summary.total,
                len(summary.shards), writer.output_dir, summary.skipped)
    return summary


# --------------------------------------------------------------------------------------------
# From an image folder
# --------------------------------------------------------------------------------------------


def find_images(input_dir: str | os.PathLike) -> list[tuple[str, str | None]]:
    """``(relative path, class folder or None)`` of every image file below ``input_dir``, sorted;
    hidden files and folders are ignored, symlinked folders are not followed."""
    root = os.path.abspath(os.fspath(input_dir))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"input folder '{input_dir}' does not exist")
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if f.startswith(".") or os.path.splitext(f)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            rel = os.path.relpath(os.path.join(folder, f), root)
            parts = rel.split(os.sep)
            out.append((rel, parts[0] if len(parts) > 1 else None))
    return out


class _Progress:
    """tqdm when stdout is a terminal, a log line every ``every`` seconds otherwise."""

    def __init__(self, total: int | None, desc: str, every: float = 10.0):
        self.total, self.desc, self.every = total, desc, every
        self.done = 0
        self.bar = None
        self._t0 = self._last = time.monotonic()
        if sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="img")

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.every or self.done == self.total:
            rate = self.done / max(now - self._t0, 1e-9)
            logger.info("%s: %d/%s images (%.0f/s)", self.desc, self.done, self.total or "?", rate)
            self._last = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def make_shards(input_dir: str | os.PathLike, output_dir: str | os.PathLike, *, maxcount: int = 1000,
                maxsize: int = 1 << 30, workers: int = 1, resize: int | None = None, shuffle: bool = True,
                seed: int = 0, prefix: str = "shard", overwrite: bool = False) -> ShardSummary:
    """Shard every image below the folder ``input_dir`` into ``output_dir`` (see the module
    docstring; :func:`maescale.data.ingest.convert` takes the other inputs)."""
    root = os.path.abspath(os.fspath(input_dir))
    files = find_images(root)
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) below '{input_dir}'")
    classes = sorted({c for _, c in files if c is not None})
    label = {c: i for i, c in enumerate(classes)}
    if shuffle:
        random.Random(seed).shuffle(files)
    items = (Item(os.path.splitext(rel)[0], rel, path=os.path.join(root, rel), label=label.get(cls),
                  meta={"path": rel, "class": cls, "label": label.get(cls)}) for rel, cls in files)
    logger.info("sharding %d images (%d classes) from %s into %s", len(files), len(classes), root,
                os.path.abspath(os.fspath(output_dir)))
    source = {"format": "folder", "input": root, "images": len(files), "shuffle": shuffle, "seed": seed,
              "resize": resize}
    return write_items(items, output_dir, total=len(files), classes=classes, source=source, maxcount=maxcount,
                       maxsize=maxsize, workers=workers, resize=resize, prefix=prefix, overwrite=overwrite)


def write_records(records: Iterable[Record], output_dir: str | os.PathLike, *, maxcount: int = 1000,
                  maxsize: int = 1 << 30, prefix: str = "shard", overwrite: bool = False,
                  classes: list[str] | None = None) -> ShardSummary:
    """Write in-memory samples (e.g. generated images) as shards + sizes.json + manifest.json."""
    with ShardWriter(output_dir, prefix=prefix, maxcount=maxcount, maxsize=maxsize, overwrite=overwrite) as writer:
        writer.summary.classes = list(classes or [])
        writer.summary.source = {"format": "records"}
        for record in records:
            writer.write(record)
    return writer.summary
