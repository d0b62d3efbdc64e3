"""The tar reader (:mod:`maescale.data.tario`, on :mod:`tarfile`) on real shards: written by tarfile,
webdataset's TarWriter and GNU tar; read from files (random access) and ``pipe:`` commands (stream)."""

from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
import tarfile
import tracemalloc
from pathlib import Path

import pytest
import webdataset as wds

from maescale.data.sources import is_local, open_url
from maescale.data.tario import TarFormatError, iter_samples

LONG_KEY = "d" * 60 + "/" + "k" * 110  # base name > 100 chars: no ustar prefix split can hold it
SAMPLES = [
    ("s000", {"jpg": os.urandom(700), "cls": b"0"}),
    (LONG_KEY, {"jpg": os.urandom(512), "cls": b"1", "seg.png": os.urandom(1500)}),
    ("sub/s002", {"jpg": b"", "cls": b"2"}),  # an empty member
    ("s003", {"jpg": os.urandom(10_000), "json": b'{"a": 1}'}),
]
EXPECTED = [{"__key__": key, **members} for key, members in SAMPLES]


def _members():
    for key, members in SAMPLES:
        for ext, data in members.items():
            yield f"{key}.{ext}", data


def _write_tarfile(path: Path, fmt: int) -> None:
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in _members():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _write_tarwriter(path: Path) -> None:
    with wds.TarWriter(str(path)) as sink:
        for key, members in SAMPLES:
            sink.write({"__key__": key, **members})


def _write_gnu_tar(path: Path, fmt: str) -> None:
    src = path.parent / f"src-{fmt}"
    names = []
    for name, data in _members():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
        names.append(name)
    subprocess.run(["tar", f"--format={fmt}", "-cf", str(path), "-C", str(src), *names], check=True)


WRITERS = {
    "tarfile-pax": (lambda p: _write_tarfile(p, tarfile.PAX_FORMAT), b" path=" + LONG_KEY.encode()),
    "tarfile-gnu": (lambda p: _write_tarfile(p, tarfile.GNU_FORMAT), b"././@LongLink"),
    "wds-TarWriter": (_write_tarwriter, LONG_KEY.encode()),
    "gnu-tar-gnu": (lambda p: _write_gnu_tar(p, "gnu"), b"././@LongLink"),
    "gnu-tar-pax": (lambda p: _write_gnu_tar(p, "pax"), b" path=" + LONG_KEY.encode()),
}


def _read(url: str, **kw) -> list[tuple[int, dict]]:
    with open_url(url) as stream:
        return list(iter_samples(stream, seekable=is_local(url), **kw))


@pytest.mark.parametrize("via", ["file", "pipe"])
@pytest.mark.parametrize("writer", list(WRITERS))
def test_reads_shards_of_every_writer(tmp_path, writer, via):
    if writer.startswith("gnu-tar") and shutil.which("tar") is None:
        pytest.skip("GNU tar is not installed")
    path = tmp_path / "shard.tar"
    write, marker = WRITERS[writer]
    write(path)
    assert marker in path.read_bytes()  # the long name really went through PAX or GNU long-name headers
    url = str(path) if via == "file" else f"pipe:cat {path}"
    got = _read(url)
    assert [i for i, _ in got] == list(range(len(SAMPLES)))
    assert [s for _, s in got] == EXPECTED


def _shard_with_odd_members(path: Path) -> None:
    """9 samples of 1-3 members, with members without an extension and a directory in between."""
    rng = random.Random(0)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(9):
            if i in (2, 6):
                info = tarfile.TarInfo(f"README{i}")
                info.size = 3
                tar.addfile(info, io.BytesIO(b"odd"))
                d = tarfile.TarInfo(f"dir{i}")
                d.type = tarfile.DIRTYPE
                tar.addfile(d)
            for ext in ["jpg", "cls", "txt"][: 1 + i % 3]:
                data = rng.randbytes(rng.choice([0, 1, 511, 512, 513, 3000]))
                info = tarfile.TarInfo(f"x{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_start_stop_equal_slicing_the_whole_shard(tmp_path):
    path = tmp_path / "shard.tar"
    _shard_with_odd_members(path)
    stats: dict[str, int] = {}
    full = _read(str(path), stats=stats)
    assert [i for i, _ in full] == list(range(9)) and stats["odd_members"] == 2
    for start in range(11):
        for stop in [None, *range(start, 12)]:
            assert _read(str(path), start=start, stop=stop) == full[start:stop], (start, stop)
    for start, stop in [(0, None), (3, 6), (5, 5), (8, None), (4, 12)]:  # stream mode through a pipe
        assert _read(f"pipe:cat {path}", start=start, stop=stop) == full[start:stop], (start, stop)


class _CountingFile(io.RawIOBase):
    """A local file that counts the bytes read from it."""

    def __init__(self, path: Path):
        super().__init__()
        self.raw = open(path, "rb", buffering=0)
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = self.raw.readinto(buf)
        self.bytes_read += n or 0
        return n

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.raw.seek(pos, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def close(self) -> None:
        self.raw.close()
        super().close()


def _big_member_shard(path: Path, n: int = 24, size: int = 256 << 10) -> None:
    with wds.TarWriter(str(path)) as sink:
        for i in range(n):
            sink.write({"__key__": f"b{i:03d}", "bin": os.urandom(size), "cls": b"1"})


def test_skipping_on_a_file_does_not_read_the_skipped_data(tmp_path):
    path = tmp_path / "big.tar"
    _big_member_shard(path)
    skipped = 20 * (256 << 10)
    for seekable in (True, False):
        counter = _CountingFile(path)
        with io.BufferedReader(counter) as stream:
            got = list(iter_samples(stream, seekable=seekable, start=20))
        assert [i for i, _ in got] == [20, 21, 22, 23]
        taken = sum(len(s["bin"]) + len(s["cls"]) for _, s in got)
        if seekable:  # headers and buffer fills only: ~8 kB per skipped member
            assert counter.bytes_read - taken < skipped / 10, counter.bytes_read
        else:  # the control: a stream has to read what it skips
            assert counter.bytes_read - taken >= skipped


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io")
def test_open_url_of_a_local_shard_skips_without_reading(tmp_path):
    """The production path (open_url + is_local), measured by the kernel's count of bytes read."""
    path = tmp_path / "big.tar"
    _big_member_shard(path)

    def rchar() -> int:
        with open("/proc/self/io") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("rchar:"))

    before = rchar()
    got = _read(str(path), start=20)
    read = rchar() - before
    taken = sum(len(s["bin"]) + len(s["cls"]) for _, s in got)
    assert len(got) == 4 and read - taken < 20 * (256 << 10) / 10, read


def test_a_corrupt_header_after_the_first_is_an_error_not_the_end(tmp_path):
    """Why tario's _TarInfo exists: plain tarfile takes a bad header after the first member for the
    end of the archive, so a damaged shard would read as a short one."""
    path = tmp_path / "shard.tar"
    _write_tarfile(path, tarfile.GNU_FORMAT)
    with tarfile.open(path) as tar:
        third_sample = tar.getmembers()[5].offset
    data = bytearray(path.read_bytes())
    data[third_sample: third_sample + 4] = b"XXXX"
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:  # the library alone: silently short
        assert len(tar.getmembers()) == 5
    for seekable in (True, False):
        got = []
        with pytest.raises(TarFormatError, match="corrupt tar header at byte .*checksum"):
            for i, _ in iter_samples(io.BytesIO(bytes(data)), seekable=seekable):
                got.append(i)
        assert got == [0]  # sample 1 is not known to be complete when the error comes
    cut = third_sample + 300  # inside a header: truncated, not the end
    with pytest.raises(TarFormatError, match="truncated"):
        list(iter_samples(io.BytesIO(bytes(data[:cut])), seekable=True))


def test_damaged_shards_raise_only_tar_format_errors():
    """Random damage to headers and random truncation: the result is samples or TarFormatError
    (an OSError the pipeline retries then skips), never another exception."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in _members():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    good = buf.getvalue()
    rng = random.Random(1)
    outcomes = set()
    for _ in range(150):
        data = bytearray(good)
        if rng.random() < 0.7:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(0, 4096)] = rng.randrange(256)
        else:
            del data[rng.randrange(len(data)):]
        for seekable in (True, False):
            try:
                list(iter_samples(io.BytesIO(bytes(data)), seekable=seekable))
                outcomes.add("ok")
            except TarFormatError:
                outcomes.add("error")
    assert outcomes == {"ok", "error"}


def test_memory_stays_flat_on_long_shards():
    """TarFile keeps every TarInfo it reads (~0.5 kB each); the reader drops them as it goes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(2000):
            for ext in ("jpg", "cls"):
                info = tarfile.TarInfo(f"s{i:06d}.{ext}")
                info.size = 3
                tar.addfile(info, io.BytesIO(b"abc"))
    data = buf.getvalue()
    for seekable in (True, False):
        tracemalloc.start()
        try:
            n = sum(1 for _ in iter_samples(io.BytesIO(data), seekable=seekable))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert n == 2000
        assert peak < 300_000, peak  # keeping the 4000 TarInfos would take ~2 MB
