"""Where shards come from: pattern expansion, epoch sizes, and opening local files or ``pipe:`` URLs.

``data.train_shards`` may be

* a brace pattern: ``/data/in1k/train-{000000..001023}.tar`` (every expanded file must exist);
* a shell glob: ``demo_data/shards/shard-*.tar`` (sorted; must match at least one file);
* a ``pipe:`` command run by the shell whose stdout is the tar stream, e.g.
  ``pipe:aws s3 cp s3://bucket/train-{000000..001023}.tar -`` or ``pipe:curl -s URL``
  (braces are expanded; globs are not, the command is opaque);
* ``http(s)://``, ``gs://``... URLs, opened with :func:`webdataset.gopen.gopen`;
* a list of any of these, or several joined with ``::`` (webdataset's separator).

Relative local paths are taken relative to the current directory.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
from typing import IO, Any, Iterable

from braceexpand import braceexpand

from maescale.data.errors import DataError

logger = logging.getLogger(__name__)

_GLOB_CHARS = re.compile(r"[*?\[]")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_local(url: str) -> bool:
    """True for plain paths and ``file:`` URLs (which can be stat-ed and seeked)."""
    return not url.startswith("pipe:") and (url.startswith("file:") or not _URL.match(url))


def local_path(url: str) -> str:
    if url.startswith("file://"):
        return url[len("file://"):]
    if url.startswith("file:"):
        return url[len("file:"):]
    return url


def expand_shards(spec: str | Iterable[str], key: str = "data.train_shards") -> list[str]:
    """Expand ``spec`` (see the module docstring) into the ordered list of shard URLs.

    Raises :class:`DataError` naming the pattern when a local pattern matches no file or names a
    file that does not exist.
    """
    if isinstance(spec, str):
        items = [spec]
    else:
        items = list(spec)
    patterns: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise DataError(f"{key}: expected shard patterns (strings), got {item!r}", key=key)
        patterns.extend(p.strip() for p in item.split("::") if p.strip())
    if not patterns:
        raise DataError(f"{key} is empty: set it to the training shards, e.g. "
                        f"'/data/in1k/train-{{000000..001023}}.tar' or 'demo_data/shards/shard-*.tar' "
                        f"(make demo data with tools/make_demo_data.py)", key=key)
    urls: list[str] = []
    for pattern in patterns:
        try:
            expanded = list(braceexpand(pattern))
        except Exception as exc:  # malformed braces
            raise DataError(f"{key}: cannot expand braces in '{pattern}': {exc}", key=key) from None
        if not is_local(pattern):
            urls.extend(expanded)
            continue
        found: list[str] = []
        missing: list[str] = []
        for item in expanded:
            path = local_path(item)
            if _GLOB_CHARS.search(path):
                matches = sorted(m for m in glob.glob(path) if os.path.isfile(m))
                if not matches:
                    missing.append(item)
                found.extend(matches)
            elif os.path.isdir(path):
                matches = sorted(m for m in glob.glob(os.path.join(glob.escape(path), "*.tar")))
                if not matches:
                    missing.append(item)
                found.extend(matches)
            elif os.path.isfile(path):
                found.append(path)
            else:
                missing.append(item)
        if not found:
            raise DataError(f"{key}: the pattern '{pattern}' matches no files "
                            f"(current directory: {os.getcwd()})", key=key)
        if missing:
            shown = ", ".join(f"'{m}'" for m in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise DataError(f"{key}: {len(missing)} of {len(expanded)} shards of the pattern '{pattern}' "
                            f"do not exist: {shown}", key=key)
        urls.extend(found)
    return urls


# --------------------------------------------------------------------------------------------
# Epoch sizes
# --------------------------------------------------------------------------------------------


def _parse_sizes(data: Any, where: str) -> dict[str, int]:
    """Per-shard counts from a sizes file: ours (``{"shards": {name: n}, "total": N}``) or the
    flat ``{name: n}`` used by open_clip and others."""
    if isinstance(data, dict) and isinstance(data.get("shards"), dict):
        data = data["shards"]
    if not isinstance(data, dict):
        raise DataError(f"sizes file '{where}' does not hold a mapping of shard name to sample count",
                        key="data.sizes_file")
    out: dict[str, int] = {}
    for name, count in data.items():
        if name in ("total", "__kind__", "format", "classes"):
            continue
        try:
            out[str(name)] = int(count)
        except (TypeError, ValueError):
            raise DataError(f"sizes file '{where}': count for '{name}' is {count!r}, not an integer",
                            key="data.sizes_file") from None
    return out


def read_sizes_file(url: str) -> dict[str, int]:
    """Read a sizes file (a local path or any URL :func:`open_url` opens)."""
    try:
        with open_url(url) as stream:
            data = json.loads(stream.read().decode("utf-8"))
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read the sizes file '{url}' (data.sizes_file): {exc}",
                        key="data.sizes_file") from None
    return _parse_sizes(data, url)


def shard_sizes(urls: list[str], sizes_file: str | None) -> list[int] | None:
    """Sample count of every shard from the sizes file(s), or None where that is not possible.

    With ``sizes_file`` set, that one file must name every shard (by base name); it is an error if
    it cannot be read or misses a shard. Without it, ``sizes.json`` beside each local shard is
    used when it exists and names every shard; otherwise None (the caller decides whether
    ``data.num_samples`` makes up for it).
    """
    if sizes_file:
        table = read_sizes_file(sizes_file)
        counts = []
        for url in urls:
            name = shard_name(url)
            if name not in table and url not in table:
                raise DataError(f"the sizes file '{sizes_file}' (data.sizes_file) has no entry for the shard "
                                f"'{name}' (from '{url}')", key="data.sizes_file")
            counts.append(table.get(url, table.get(name)))
        return counts
    if not all(is_local(u) for u in urls):
        return None
    tables: dict[str, dict[str, int] | None] = {}
    counts = []
    for url in urls:
        path = local_path(url)
        folder = os.path.dirname(os.path.abspath(path))
        if folder not in tables:
            candidate = os.path.join(folder, "sizes.json")
            tables[folder] = read_sizes_file(candidate) if os.path.isfile(candidate) else None
        table = tables[folder]
        name = os.path.basename(path)
        if table is None or name not in table:
            return None
        counts.append(table[name])
    return counts


def shard_name(url: str) -> str:
    """The file name a shard has in a sizes file: the base name of the path, or for ``pipe:``
    commands of the first word that looks like a tar file (``pipe:aws s3 cp s3://b/x-0001.tar -``)."""
    if url.startswith("pipe:"):
        for word in url[len("pipe:"):].split():
            if ".tar" in word:
                return os.path.basename(word.rstrip("/"))
        return url
    return os.path.basename(local_path(url).rstrip("/"))


def default_sizes_file(urls: list[str]) -> str | None:
    """Where the default sizes file of the first shard would be (for error messages)."""
    for url in urls:
        if is_local(url):
            return os.path.join(os.path.dirname(os.path.abspath(local_path(url))), "sizes.json")
    return None


# --------------------------------------------------------------------------------------------
# Opening shards
# --------------------------------------------------------------------------------------------


class PipeReader(io.RawIOBase):
    """The stdout of a ``pipe:CMD`` URL: :func:`webdataset.gopen.gopen`'s ``Pipe`` (``sh -c CMD``,
    exit status 141 accepted), plus what it lacks for reading shards:

    * the exit status is checked when the data ends: ``Pipe`` only polls after each read, so the
      end of the data of a command that failed usually comes before its status, and a failed
      ``aws s3 cp`` would pass as a short or empty shard (``Pipe.close`` would raise later, outside
      the reading);
    * closing before the end kills the command and ignores its status: ``Pipe.close`` waits for
      the command to finish (up to 2 hours for one that stalls) and raises when it dies of the
      closed pipe (status -13 when the shell execs it, 1 for tools that catch EPIPE);
    * errors name the command and say "exited with status N".

    The command's stderr is not captured (gopen passes it through to this process's stderr).
    """

    def __init__(self, url: str, bufsize: int = 1 << 20):
        from webdataset.gopen import gopen

        self._pipe = None  # close() may run on a half-built object
        super().__init__()
        self.cmd = url[len("pipe:"):]
        self._pipe = gopen(url, "rb", bufsize=bufsize)
        self._eof = False

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None:
            size = -1
        # From Pipe's stream, not Pipe.read: that one also raises as soon as a poll finds a failed
        # status, so how many complete samples came before the error would depend on timing.
        data = self._pipe.stream.read(size)
        if size < 0 or (size > 0 and not data):
            self._eof = True
            try:
                self._pipe.wait_for_child()  # waits for the exit; raises on a status not 0 or 141
            except OSError:
                raise OSError(f"command '{self.cmd}' exited with status {self._pipe.status} (its own message, "
                              f"if any, went to this process's stderr); check that it works in a shell") from None
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if self.closed:
            return
        pipe = self._pipe
        try:
            if pipe is None:
                return
            pipe.stream.close()  # a command still writing gets SIGPIPE
            if not self._eof and pipe.proc.poll() is None:
                pipe.proc.kill()  # closed early: the rest is not wanted, nor how the command ends
            pipe.proc.wait()
        finally:
            super().close()


def open_url(url: str) -> IO[bytes]:
    """Open a shard or sizes file for reading with :func:`webdataset.gopen.gopen`: a local path,
    ``file:``, ``pipe:CMD`` (see :class:`PipeReader`) or another URL it opens (``http(s)://``
    through curl, ``gs://``, ...)."""
    from webdataset.gopen import gopen

    if url.startswith("pipe:"):
        return PipeReader(url)  # type: ignore[return-value]
    if is_local(url):
        # absolute: gopen reads a relative path with a colon ("a:b.tar") as a URL scheme
        return gopen(os.path.abspath(local_path(url)), "rb")
    return gopen(url, "rb")
