"""Sample counts of existing shards (written by any WebDataset tool: img2dataset, webdataset's
``TarWriter``, plain ``tar``) and the sizes file the loader reads (``tools/index_shards.py``).

With per-shard counts the loader cuts each epoch into exact sample ranges (every sample once per
epoch, an exact mid-epoch resume, no ``data.num_samples`` to type by hand); see
:mod:`maescale.data.plan`. The counts are made the way the loader numbers samples
(:func:`maescale.data.tario.count_samples`: one grouping of tar members into samples), in one
pass over the shards in a process pool, reading headers only (local shards seek past the data).

Output: ``sizes.json`` beside the shards (one per folder, naming that folder's shards) or one
file at ``output`` (for ``data.sizes_file``; needed for ``pipe:`` and remote shards), in the
format :class:`maescale.data.shards.ShardSummary` writes and
:func:`maescale.data.sources.read_sizes_file` reads::

    {"format": "maescale-shards/1", "total": N, "shards": {"shard-000000.tar": n, ...}}

A shard that cannot be read (corrupt or truncated tar, missing, a failing command) is an error
naming it, and nothing is written: a sizes file never holds a guess.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Iterable

from maescale.data.errors import DataError
from maescale.data.shards import ShardSummary
from maescale.data.sources import expand_shards, is_local, local_path, open_url, read_sizes_file, shard_name
from maescale.data.tario import count_samples
from maescale.rundir import write_json_atomic

logger = logging.getLogger(__name__)


@dataclass
class ShardCount:
    """The count of one shard, or why it could not be made."""

    url: str
    samples: int = 0
    odd_members: int = 0
    error: str = ""


def count_shard(url: str) -> ShardCount:
    """Count the samples of one shard (any URL :func:`maescale.data.sources.open_url` opens)."""
    stats: dict[str, int] = {}
    try:
        # local files without webdataset.gopen: importing webdataset imports torch (seconds per process)
        with (open(local_path(url), "rb") if is_local(url) else open_url(url)) as stream:
            n = count_samples(stream, seekable=is_local(url), stats=stats)
    except Exception as exc:  # reported per shard, naming it
        return ShardCount(url, error=f"{type(exc).__name__}: {exc}")
    return ShardCount(url, n, stats.get("odd_members", 0))


def count_shards(urls: list[str], workers: int = 0) -> list[ShardCount]:
    """Counts of ``urls`` in their order, ``workers`` processes at a time (0: one per CPU, at
    most one per shard; 1: in this process)."""
    if workers <= 0:
        workers = min(len(urls), os.cpu_count() or 1)
    if workers <= 1 or len(urls) <= 1:
        return [count_shard(u) for u in urls]
    # fork (as make_shards): a forkserver or spawn context would leave its helper processes
    # (the server, the resource tracker) running in the caller after the pool is gone
    with get_context("spawn" if sys.platform == "darwin" else "fork").Pool(workers) as pool:
        return pool.map(count_shard, urls, chunksize=max(1, len(urls) // (workers * 8)))


def _targets(counts: list[ShardCount], output: str | None) -> dict[str, dict[str, int]]:
    """Sizes files to write: ``{path: {shard name: count}}``."""
    files: dict[str, dict[str, int]] = {}
    owner: dict[tuple[str, str], str] = {}
    for c in counts:
        if output is not None:
            path = os.path.abspath(output)
        elif is_local(c.url):
            path = os.path.join(os.path.dirname(os.path.abspath(local_path(c.url))), "sizes.json")
        else:
            raise DataError(f"the shard '{c.url}' is not a local file: a sizes file cannot go beside it; "
                            f"write one with --output FILE and set data.sizes_file to it")
        name = shard_name(c.url)
        if (path, name) in owner and owner[(path, name)] != c.url:
            raise DataError(f"two shards share the name '{name}' ('{owner[(path, name)]}' and '{c.url}'), which a "
                            f"sizes file keys by; index them into separate files")
        owner[(path, name)] = c.url
        files.setdefault(path, {})[name] = c.samples
    return files


def index_shards(spec: str | Iterable[str], *, output: str | None = None, workers: int = 0,
                 overwrite: bool = False) -> dict[str, ShardSummary]:
    """Count every shard of ``spec`` (patterns as ``data.train_shards`` takes them) and write the
    sizes file(s); returns ``{path written: summary}``.

    Raises :class:`DataError` naming every shard that could not be read (nothing is written
    then), and :class:`FileExistsError` for an existing sizes file with other counts unless
    ``overwrite``.
    """
    urls = expand_shards(spec, key="shards")
    logger.info("counting the samples of %d shards", len(urls))
    counts = count_shards(urls, workers)
    bad = [c for c in counts if c.error]
    if bad:
        shown = "; ".join(f"{c.url}: {c.error}" for c in bad[:10]) + (" ..." if len(bad) > 10 else "")
        raise DataError(f"{len(bad)} of {len(urls)} shards could not be read, no sizes file written (remove or "
                        f"re-download them, or leave them out of the pattern): {shown}")
    for c in counts:
        if c.samples == 0:
            logger.warning("shard %s holds no samples", c.url)
        if c.odd_members:
            logger.warning("shard %s: %d members without an extension belong to no sample", c.url, c.odd_members)
    files = _targets(counts, output)
    written: dict[str, ShardSummary] = {}
    for path, table in files.items():
        summary = ShardSummary(shards=table, total=sum(table.values()))
        if os.path.exists(path) and not overwrite:
            try:
                old = read_sizes_file(path)
            except DataError:
                old = None
            if old != table:
                raise FileExistsError(f"'{path}' exists with other counts; pass overwrite (--overwrite) to "
                                      f"replace it")
        write_json_atomic(path, summary.to_json(), indent=1)
        written[path] = summary
        logger.info("wrote %s: %d samples in %d shards", path, summary.total, len(table))
    return written
