"""A small streaming tar reader that groups members into WebDataset samples.

Why not :mod:`tarfile`: we need to skip samples without reading their bytes (seek on local files,
discard on pipes), to know where every sample starts in the shard so that a resumed worker can
start mid-shard, and to turn every malformation (bad checksum, truncation, absurd sizes, odd
names) into a counted, recoverable event rather than an exception deep in a worker. Formats read:
ustar/POSIX (with the 155-byte prefix), PAX extended headers (``path``, ``size``) and GNU long
names; anything else (directories, links, devices) is ignored.

Grouping follows WebDataset: consecutive members ``KEY.EXT`` with the same ``KEY`` (everything up
to the first dot of the base name) form one sample ``{"__key__": KEY, EXT: bytes, ...}``; EXT is
lower-cased. Members without an extension (``README``, ``.DS_Store``) are not part of any sample
and are counted as ``odd_members``.
"""

from __future__ import annotations

import re
from typing import IO, Iterator

BLOCK = 512
MAX_MEMBER_BYTES = 1 << 30  # larger members are skipped and make their sample bad

_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")  # WebDataset's base_plus_ext


class TarFormatError(OSError):
    """The tar stream is corrupt or truncated."""


def split_name(name: str) -> tuple[str, str] | None:
    """``"dir/abc.seg.png"`` -> ``("dir/abc", "seg.png")``; None for names without an extension."""
    m = _KEY_EXT.match(name)
    if m is None or not m.group(2):
        return None
    return m.group(1), m.group(2).lower()


def _read_exact(stream: IO[bytes], n: int) -> bytes:
    data = stream.read(n)
    if data is None:
        data = b""
    if len(data) == n:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            raise TarFormatError(f"truncated tar: expected {n} bytes, got {got}")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _skip(stream: IO[bytes], n: int, seekable: bool) -> None:
    if n <= 0:
        return
    if seekable:
        stream.seek(n, 1)
        return
    while n > 0:
        chunk = stream.read(min(n, 1 << 20))
        if not chunk:
            raise TarFormatError("truncated tar while skipping member data")
        n -= len(chunk)


def _octal(field: bytes, what: str) -> int:
    if field and field[0] & 0x80:  # GNU base-256
        value = int.from_bytes(field, "big", signed=False) & ~(0x80 << (8 * (len(field) - 1)))
        return value
    text = field.split(b"\0", 1)[0].strip(b" \0")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise TarFormatError(f"corrupt tar header: {what} field {field!r}") from None


def _name(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _parse_pax(data: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarFormatError("corrupt PAX header") from None
        if length <= 0:
            raise TarFormatError("corrupt PAX header")
        record = data[space + 1: pos + length - 1]
        key, _, value = record.partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


class MemberReader:
    """Iterate over the members of a tar stream: ``for name, size in reader: data = reader.read()``
    or ``reader.skip()``; whatever the caller does not read is skipped when it advances."""

    def __init__(self, stream: IO[bytes], *, seekable: bool = False):
        self.stream = stream
        self.seekable = seekable
        self._pending = 0  # unread data bytes (+ padding) of the current member
        self._size = 0

    def __iter__(self) -> Iterator[tuple[str, int]]:
        long_name: str | None = None
        pax: dict[str, str] = {}
        while True:
            _skip(self.stream, self._pending, self.seekable)
            self._pending = 0
            header = self.stream.read(BLOCK)
            if not header:
                return  # EOF without end marker: accepted (concatenated/short writers)
            if len(header) < BLOCK:
                header += _read_exact(self.stream, BLOCK - len(header))
            if header == b"\0" * BLOCK:
                return
            stored = _octal(header[148:156], "checksum")
            if stored != sum(header) - sum(header[148:156]) + 256:  # the field counts as 8 spaces
                signed = sum((b - 256 if b > 127 else b) for i, b in enumerate(header) if not 148 <= i < 156) + 256
                if stored != signed:  # some old writers sum signed bytes
                    raise TarFormatError("corrupt tar header (bad checksum)")
            size = _octal(header[124:136], "size")
            kind = header[156:157]
            name = _name(header[0:100])
            if header[257:262] == b"ustar":
                prefix = _name(header[345:500])
                if prefix:
                    name = prefix + "/" + name
            if pax:
                name = pax.get("path", name)
                if "size" in pax:
                    try:
                        size = int(pax["size"])
                    except ValueError:
                        raise TarFormatError("corrupt PAX size") from None
            if long_name is not None:
                name = long_name
            padded = (size + BLOCK - 1) // BLOCK * BLOCK
            if kind in (b"x", b"L", b"g", b"K"):
                if size > (1 << 20):
                    raise TarFormatError("corrupt tar: extended header larger than 1 MiB")
                data = _read_exact(self.stream, padded)[:size]
                if kind == b"x":
                    pax = _parse_pax(data)
                elif kind == b"L":
                    long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                continue  # 'g' (global PAX) and 'K' (long link name) are irrelevant here
            pax = {}
            long_name = None
            self._pending = padded
            self._size = size
            if kind not in (b"0", b"\0", b"7"):
                yield "", -1  # directory, link, device...: not a file
                continue
            yield name, size

    def read(self) -> bytes:
        """The data of the current member (consumes it)."""
        data = _read_exact(self.stream, self._pending)
        self._pending = 0
        return data[: self._size]


def iter_samples(
    stream: IO[bytes],
    *,
    seekable: bool = False,
    start: int = 0,
    stop: int | None = None,
    stats: dict[str, int] | None = None,
    max_member_bytes: int = MAX_MEMBER_BYTES,
) -> Iterator[tuple[int, dict]]:
    """Yield ``(index, sample)`` for the samples ``start <= index < stop`` of a tar stream.

    The members of samples before ``start`` are skipped without reading their data. A sample
    holding a member over ``max_member_bytes`` gets ``sample["__bad__"]`` set to the reason (its
    data is not read). Raises :class:`TarFormatError` on a corrupt or truncated stream; samples
    yielded before that are complete.
    """
    if stats is None:
        stats = {}
    reader = MemberReader(stream, seekable=seekable)
    index = -1
    current: dict | None = None
    for name, size in reader:
        if size < 0:
            continue
        parts = split_name(name)
        if parts is None:
            stats["odd_members"] = stats.get("odd_members", 0) + 1
            continue
        key, ext = parts
        if current is None or key != current["__key__"] or ext in current:
            if current is not None and index >= start:
                yield index, current
            index += 1
            if stop is not None and index >= stop:
                return
            current = {"__key__": key}
        if index < start:
            continue  # the reader skips the data when it advances
        if size > max_member_bytes:
            current["__bad__"] = f"member '{name}' is {size} bytes, more than {max_member_bytes}"
            continue
        current[ext] = reader.read()
    if current is not None and index >= start and (stop is None or index < stop):
        yield index, current
