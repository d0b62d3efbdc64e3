"""Shard patterns, sizes files, opening local/pipe: shards, and the tar reader."""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
import time

import pytest
import webdataset as wds

from maescale.data import DataError
from maescale.data.sources import expand_shards, open_url, shard_name, shard_sizes
from maescale.data.tario import TarFormatError, iter_samples, split_name
from tests.data.conftest import write_shards


def test_brace_glob_list_and_separator(shard_dir):
    paths = write_shards(shard_dir, [2, 2, 2, 2])
    assert expand_shards(f"{shard_dir}/shard-{{000000..000003}}.tar") == paths
    assert expand_shards(f"{shard_dir}/shard-*.tar") == paths
    assert expand_shards([paths[2], f"{shard_dir}/shard-00000[01].tar"]) == [paths[2], paths[0], paths[1]]
    assert expand_shards(f"{paths[3]}::{paths[0]}") == [paths[3], paths[0]]
    assert expand_shards(str(shard_dir)) == paths  # a folder: its *.tar
    pipes = expand_shards("pipe:aws s3 cp s3://bucket/train-{000000..000002}.tar -")
    assert pipes == [f"pipe:aws s3 cp s3://bucket/train-00000{i}.tar -" for i in range(3)]
    assert [shard_name(u) for u in pipes] == [f"train-00000{i}.tar" for i in range(3)]


def test_patterns_matching_nothing_name_the_pattern(shard_dir, tmp_path):
    write_shards(shard_dir, [2, 2])
    with pytest.raises(DataError, match=r"'.*/nope-\*\.tar' matches no files") as info:
        expand_shards(str(tmp_path / "nope-*.tar"))
    assert info.value.key == "data.train_shards"
    with pytest.raises(DataError, match=r"1 of 3 shards of the pattern .* do not exist: '.*shard-000002.tar'"):
        expand_shards(f"{shard_dir}/shard-{{000000..000002}}.tar")
    with pytest.raises(DataError, match="data.train_shards is empty"):
        expand_shards("")
    with pytest.raises(DataError, match="matches no files"):
        expand_shards([f"{shard_dir}/shard-*.tar", str(tmp_path / "other-*.tar")])


def test_sizes_files(shard_dir, tmp_path):
    paths = write_shards(shard_dir, [3, 5])
    assert shard_sizes(paths, None) == [3, 5]
    flat = tmp_path / "flat.json"  # open_clip's flat format
    flat.write_text(json.dumps({"shard-000000.tar": 30, "shard-000001.tar": 50}))
    assert shard_sizes(paths, str(flat)) == [30, 50]
    flat.write_text(json.dumps({"shard-000000.tar": 30}))
    with pytest.raises(DataError, match="no entry for the shard 'shard-000001.tar'") as info:
        shard_sizes(paths, str(flat))
    assert info.value.key == "data.sizes_file"
    with pytest.raises(DataError, match="cannot read the sizes file"):
        shard_sizes(paths, str(tmp_path / "missing.json"))
    os.remove(shard_dir / "sizes.json")
    assert shard_sizes(paths, None) is None
    pipes = [f"pipe:cat {p}" for p in paths]
    assert shard_sizes(pipes, None) is None
    flat.write_text(json.dumps({"shard-000000.tar": 30, "shard-000001.tar": 50}))
    assert shard_sizes(pipes, f"pipe:cat {flat}") == [30, 50]  # the sizes file through a pipe too


def test_pipe_stream_reads_and_reports_failure(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc" * 1000)
    with open_url(f"pipe:cat {f}") as s:
        assert s.read() == b"abc" * 1000
    with pytest.raises(OSError, match="exited with status"):
        with open_url(f"pipe:cat {tmp_path}/missing.bin") as s:
            s.read()
    with open_url("pipe:yes") as s:  # closing early kills an endless command
        assert len(s.read(10)) == 10


# --------------------------------------------------------------------------------------------
# Tar reader
# --------------------------------------------------------------------------------------------


def _samples(path, **kw):
    with open(path, "rb") as fh:
        return list(iter_samples(fh, seekable=True, **kw))


def test_reader_agrees_with_webdataset(shard_dir):
    (path,) = write_shards(shard_dir, [7])
    ours = _samples(path)
    theirs = list(wds.WebDataset(path, shardshuffle=False))
    assert [s["__key__"] for _, s in ours] == [s["__key__"] for s in theirs]
    assert all(a["png"] == b["png"] and a["cls"] == b["cls"] for (_, a), b in zip(ours, theirs))
    assert [i for i, _ in ours] == list(range(7))


def test_start_stop_skip_without_reading(shard_dir):
    (path,) = write_shards(shard_dir, [9])
    full = _samples(path)
    part = _samples(path, start=3, stop=6)
    assert [i for i, _ in part] == [3, 4, 5]
    assert [s for _, s in part] == [s for _, s in full[3:6]]
    with open(path, "rb") as raw:  # non-seekable stream: skipping reads and discards
        stream = io.BufferedReader(io.BytesIO(raw.read()))
    assert [i for i, _ in iter_samples(stream, seekable=False, start=7)] == [7, 8]


def test_long_names_pax_and_gnu_and_odd_members(tmp_path):
    long_key = "d" * 50 + "/" + "k" * 120
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        path = tmp_path / f"t{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            for name, data in [(f"{long_key}.jpg", b"J"), (f"{long_key}.cls", b"1"), ("README", b"x"),
                               (".DS_Store", b"y"), ("other.seg.png", b"P")]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            d = tarfile.TarInfo("somedir")
            d.type = tarfile.DIRTYPE
            tar.addfile(d)
        stats = {}
        got = [s for _, s in _samples(path, stats=stats)]
        assert got == [{"__key__": long_key, "jpg": b"J", "cls": b"1"}, {"__key__": "other", "seg.png": b"P"}]
        assert stats["odd_members"] == 2


def test_corrupt_and_truncated_tars_raise_after_complete_samples(shard_dir):
    (path,) = write_shards(shard_dir, [6])
    data = open(path, "rb").read()
    with tarfile.open(path) as tar:
        cut = tar.getmembers()[6].offset_data + 10  # inside the 4th sample
    got = []
    with pytest.raises(TarFormatError, match="truncated"):
        for i, s in iter_samples(io.BytesIO(data[:cut]), seekable=True):
            got.append(i)
    assert got == [0, 1, 2]
    bad = bytearray(data)
    bad[0:5] = b"XXXXX"  # breaks the first header's checksum
    with pytest.raises(TarFormatError, match="checksum"):
        list(iter_samples(io.BytesIO(bytes(bad))))
    with pytest.raises(TarFormatError):
        list(iter_samples(io.BytesIO(os.urandom(4096))))
    assert list(iter_samples(io.BytesIO(b""))) == []  # empty file: no samples
    assert list(iter_samples(io.BytesIO(b"\0" * 1024))) == []


def test_oversized_members_mark_the_sample_bad(shard_dir):
    (path,) = write_shards(shard_dir, [3])
    with open(path, "rb") as fh:
        got = [s for _, s in iter_samples(fh, seekable=True, max_member_bytes=10)]
    assert len(got) == 3 and all("__bad__" in s and "png" not in s for s in got)


def test_split_name():
    assert split_name("a/b/c.d.e") == ("a/b/c", "d.e")
    assert split_name("x.JPG") == ("x", "jpg")
    assert split_name("README") is None and split_name(".hidden") is None and split_name("a/.x.jpg") is None


# --------------------------------------------------------------------------------------------
# pipe: streams (webdataset.gopen's Pipe under maescale's PipeReader)
# --------------------------------------------------------------------------------------------

# A command that catches EPIPE (as Python, the AWS CLI and many others do) and exits with 1
EPIPE_CMD = f"{sys.executable} -c \"import sys; w = sys.stdout.buffer.write; [w(b'x' * 4096) for _ in iter(int, 1)]\""


def test_pipe_closed_early_is_clean(shard_dir):
    for cmd in ["yes", EPIPE_CMD, "echo hi; exec sleep 60"]:
        t0 = time.monotonic()
        s = open_url(f"pipe:{cmd}")
        assert len(s.read(2)) == 2
        s.close()  # neither an error nor a wait for the command to end
        assert time.monotonic() - t0 < 20, cmd
    (path,) = write_shards(shard_dir, [6])
    s = open_url(f"pipe:cat {path}")
    assert [i for i, _ in iter_samples(s, start=1, stop=3)] == [1, 2]
    s.close()


def test_gopen_alone_reports_an_early_close_as_a_failure():
    """Why PipeReader exists: webdataset's Pipe raises when a command dies of the closed pipe
    without status 141 (if this starts failing, gopen handles it now and PipeReader can shrink)."""
    from webdataset.gopen import gopen

    pipe = gopen(f"pipe:{EPIPE_CMD}", "rb")
    assert len(pipe.read(2)) == 2
    with pytest.raises(OSError, match="exit"):
        pipe.close()
    assert pipe.status not in (0, 141)


def test_failing_pipe_command_raises_naming_it(shard_dir):
    for _ in range(10):  # at the end of the data, every time: not only if the exit status is in by then
        s = open_url("pipe:cat /nonexistent/shard-000009.tar")
        with pytest.raises(OSError, match=r"command 'cat /nonexistent/shard-000009.tar' exited with status 1"):
            list(iter_samples(s))
        s.close()
    (path,) = write_shards(shard_dir, [6])
    with tarfile.open(path) as tar:
        cut = tar.getmembers()[6].offset  # a header boundary: the data alone reads as a shorter shard
    s = open_url(f"pipe:head -c {cut} {path}; exit 3")
    got = []
    with pytest.raises(OSError, match=r"command 'head -c \d+ .*shard-000000.tar; exit 3' exited with status 3"):
        for i, _ in iter_samples(s):
            got.append(i)
    s.close()
    assert got == [0, 1]  # sample 2 is not known to be complete when the error comes
    with open_url(f"pipe:head -c {cut} {path}") as s:  # the same bytes from a command that succeeded
        assert [i for i, _ in iter_samples(s)] == [0, 1, 2]
