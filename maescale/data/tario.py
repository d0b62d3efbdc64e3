"""Group the members of a tar shard into WebDataset samples, on top of :mod:`tarfile`.

:mod:`tarfile` parses the headers (ustar with its name prefix, PAX extended headers, GNU long
names, base-256 numbers, checksums). What is ours:

* the grouping into samples, numbered from 0 in each shard, so that a resumed worker starts at
  sample ``start`` of a shard. The data of skipped samples is not read: on local files the
  archive is opened in random-access mode (``r:``), where :meth:`tarfile.TarFile.next` seeks
  past the data of a member that was not extracted; on pipes it is opened in stream mode
  (``r|``), which reads and discards it;
* every malformation is a counted, recoverable event: a corrupt or truncated archive raises
  :class:`TarFormatError` (an :class:`OSError`, which the pipeline retries and then skips),
  members without an extension are counted as ``odd_members``, members over
  ``max_member_bytes`` make their sample bad.

Grouping follows WebDataset: consecutive members ``KEY.EXT`` with the same ``KEY`` (everything up
to the first dot of the base name) form one sample ``{"__key__": KEY, EXT: bytes, ...}``; EXT is
lower-cased, and an EXT that repeats within a KEY starts a new sample. Members that are not
regular files (directories, links, devices) are ignored. Reading, skipping to a resume position
and counting (:func:`count_samples`, for ``tools/index_shards.py``) share this one grouping.
"""

from __future__ import annotations

import re
import tarfile
from typing import IO, Iterator

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


class _TarInfo(tarfile.TarInfo):
    """A TarInfo whose header errors are :class:`TarFormatError`.

    Why: :meth:`tarfile.TarFile.next` raises on a bad header only at the start of the archive;
    after the first member it takes a bad checksum, an invalid number field or a header cut short
    for the end of the archive, and a damaged shard would pass as a short one.
    """

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:  # a zero block: the end-of-archive marker
            raise
        except tarfile.EmptyHeaderError:
            # The data ends at a block boundary: accepted as the end (writers that leave out the
            # end marker). Re-raised as a zero block so that an empty file is an empty archive.
            raise tarfile.EOFHeaderError("end of data") from None
        except tarfile.TruncatedHeaderError:
            raise TarFormatError(f"truncated tar: the header at byte {tar.offset} is cut short") from None
        except tarfile.HeaderError as exc:  # bad checksum, invalid number, bad PAX/GNU header
            raise TarFormatError(f"corrupt tar header at byte {tar.offset}: {exc}") from None


def _next(tar: tarfile.TarFile) -> tarfile.TarInfo | None:
    try:
        info = tar.next()
    except tarfile.TarError as exc:  # ReadError "unexpected end of data": data cut short
        raise TarFormatError(f"truncated tar: {exc} after byte {tar.offset}") from None
    # TarFile keeps every TarInfo it read in .members (~1 kB each); we never look back, so drop
    # them to keep a worker's memory flat on long shards.
    tar.members.clear()
    return info


def _read(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    try:
        fh = tar.extractfile(info)
        return fh.read() if fh is not None else b""
    except tarfile.TarError as exc:
        raise TarFormatError(f"truncated tar: {exc} in member '{info.name}' at byte {info.offset}") from None


def _open(stream: IO[bytes], seekable: bool) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=stream, mode="r:" if seekable else "r|", tarinfo=_TarInfo,
                            encoding="utf-8", errors="surrogateescape")
    except tarfile.TarError as exc:
        raise TarFormatError(f"not a readable tar: {exc}") from None


def _grouped(tar: tarfile.TarFile, stats: dict[str, int]) -> Iterator[tuple[int, str, str, tarfile.TarInfo]]:
    """``(sample index, key, ext, member)`` of every member that belongs to a sample, in order.

    The one place members are grouped into samples, so that reading, skipping (resume) and
    counting (:func:`count_samples`) number samples alike: a new sample starts where the key
    changes or an extension repeats within the key.
    """
    index = -1
    key_now: str | None = None
    exts: set[str] = set()
    while (info := _next(tar)) is not None:
        if not info.isreg():
            continue
        parts = split_name(info.name)
        if parts is None:
            stats["odd_members"] = stats.get("odd_members", 0) + 1
            continue
        key, ext = parts
        if key != key_now or ext in exts:
            index += 1
            key_now, exts = key, set()
        exts.add(ext)
        yield index, key, ext, info


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

    ``seekable``: ``stream`` supports ``seek``/``tell`` (a local file); the members of samples
    before ``start`` are then skipped by seeking, otherwise by reading and discarding their data.
    A sample holding a member over ``max_member_bytes`` gets ``sample["__bad__"]`` set to the
    reason (its data is not read). Members without an extension are counted in
    ``stats["odd_members"]``. Raises :class:`TarFormatError` on a corrupt or truncated stream;
    samples yielded before that are complete.
    """
    if stats is None:
        stats = {}
    tar = _open(stream, seekable)
    try:
        current: dict | None = None
        current_index = -1
        for index, key, ext, info in _grouped(tar, stats):
            if index != current_index:
                if current is not None:
                    yield current_index, current
                    current = None
                current_index = index
                if stop is not None and index >= stop:
                    return
                if index >= start:
                    current = {"__key__": key}
            if current is None:
                continue  # not extracted: the next member seeks past (r:) or discards (r|) the data
            if info.size > max_member_bytes:
                current["__bad__"] = f"member '{info.name}' is {info.size} bytes, more than {max_member_bytes}"
                continue
            current[ext] = _read(tar, info)
        if current is not None:
            yield current_index, current
    finally:
        tar.close()  # does not close ``stream`` (the caller's)


def count_samples(stream: IO[bytes], *, seekable: bool = False, stats: dict[str, int] | None = None) -> int:
    """The number of samples of a tar stream, numbered as :func:`iter_samples` numbers them,
    without reading member data (seeking past it when ``seekable``). Raises
    :class:`TarFormatError` on a corrupt or truncated stream."""
    if stats is None:
        stats = {}
    tar = _open(stream, seekable)
    try:
        count = 0
        for index, _, _, _ in _grouped(tar, stats):
            count = index + 1
        return count
    finally:
        tar.close()
