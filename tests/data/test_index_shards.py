"""tools/index_shards.py (:mod:`maescale.data.index`): sample counts of shards written by other
tools, the sizes.json the loader reads, and errors that name the damaged shard."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from maescale.data import DataError, build_train_loader
from maescale.data.index import count_shards, index_shards
from maescale.data.sources import shard_sizes
from maescale.data.tario import count_samples, iter_samples
from tests.data.conftest import data_cfg, id_of, id_png, write_shards
from tests.data.tables import write_tarfile_shard

REPO = Path(__file__).resolve().parents[2]


def loaded_ids(pattern: str, batches: int, **kw) -> list[int]:
    loader = build_train_loader(data_cfg(pattern, **kw), img_size=8, micro_batch_size=4, rank=0, world_size=1,
                                seed=0)
    it = iter(loader)
    ids = [id_of(img) for _ in range(batches) for img in next(it)]
    loader.close()
    return ids


def test_counts_of_tarfile_and_webdataset_shards_make_an_exact_epoch(tmp_path):
    folder = tmp_path / "mixed"
    write_tarfile_shard(folder / "a-0.tar", list(range(0, 13)))
    write_tarfile_shard(folder / "a-1.tar", list(range(13, 20)))
    for n, ids in enumerate([range(20, 29), range(29, 40)]):  # as webdataset.TarWriter writes them
        with wds.TarWriter(str(folder / f"c-{n:06d}.tar")) as sink:
            for i in ids:
                sink.write({"__key__": f"s{i:05d}", "png": id_png(i), "cls": b"0"})
    pattern = str(folder / "*.tar")
    with pytest.raises(DataError, match="cannot tell how many samples an epoch has"):
        build_train_loader(data_cfg(pattern), img_size=8, micro_batch_size=4, rank=0, world_size=1, seed=0)
    written = index_shards(pattern, workers=2)
    sizes = json.loads((folder / "sizes.json").read_text())
    assert list(written) == [str(folder / "sizes.json")]
    assert sizes == {"format": "maescale-shards/1", "total": 40,
                     "shards": {"a-0.tar": 13, "a-1.tar": 7, "c-000000.tar": 9, "c-000001.tar": 11}}
    for p in folder.glob("*.tar"):  # the loader's own numbering agrees
        assert len(list(iter_samples(open(p, "rb"), seekable=True))) == sizes["shards"][p.name]
    assert shard_sizes(sorted(str(p) for p in folder.glob("*.tar")), None) == [13, 7, 9, 11]
    ids = loaded_ids(pattern, 10)  # one epoch of 40 samples: each exactly once, no data.num_samples
    assert sorted(ids) == list(range(40))


def test_counting_groups_members_as_the_reader_does(tmp_path):
    """A repeated extension starts a new sample, members without an extension and non-files belong
    to none, wherever the reader starts (a resumed worker skips samples without reading them)."""
    path = tmp_path / "odd.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("x/k1.jpg", b"1"), ("x/k1.cls", b"0"), ("x/k1.jpg", b"2"), ("x/README", b"r"),
                           ("x/k2.seg.png", b"3"), ("x/k2.PNG", b"4"), ("x/k3.json", b"{}"), ("x/k3.json", b"{}")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("x/k4.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "x/k1.jpg"
        tar.addfile(link)
    stats: dict[str, int] = {}
    assert count_samples(open(path, "rb"), seekable=True, stats=stats) == 5 and stats["odd_members"] == 1
    assert count_samples(open(path, "rb"), seekable=False) == 5
    full = [(i, s["__key__"]) for i, s in iter_samples(open(path, "rb"), seekable=True)]
    assert full == [(0, "x/k1"), (1, "x/k1"), (2, "x/k2"), (3, "x/k3"), (4, "x/k3")]
    for start in range(6):  # skipping numbers samples as reading does
        assert [(i, s["__key__"]) for i, s in iter_samples(open(path, "rb"), seekable=True, start=start)] == full[start:]


def test_damaged_shards_are_errors_naming_them_and_nothing_is_written(tmp_path):
    paths = write_shards(tmp_path / "s", [6, 6, 6], sizes_json=False)
    with tarfile.open(paths[1]) as tar:
        cut = tar.getmembers()[5].offset_data + 10
    os.truncate(paths[1], cut)  # truncated inside a member
    with tarfile.open(paths[2]) as tar:
        header = tar.getmembers()[3].offset
    raw = bytearray(Path(paths[2]).read_bytes())
    raw[header + 148:header + 156] = b"garbage!"  # a later header's checksum field
    Path(paths[2]).write_bytes(bytes(raw))
    with pytest.raises(DataError) as err:
        index_shards(str(tmp_path / "s" / "shard-*.tar"), workers=2)
    msg = str(err.value)
    assert msg.startswith("2 of 3 shards could not be read, no sizes file written")
    assert f"{paths[1]}: TarFormatError: truncated tar" in msg and f"{paths[2]}: TarFormatError: corrupt tar header" in msg
    assert "shard-000000.tar" not in msg and not (tmp_path / "s" / "sizes.json").exists()
    res = subprocess.run([sys.executable, str(REPO / "tools" / "index_shards.py"), str(tmp_path / "s" / "shard-*.tar")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "index_shards: error: 2 of 3 shards" in res.stderr and paths[1] in res.stderr


def test_cli_output_file_for_pipe_shards_folders_and_overwrite(tmp_path):
    a = write_shards(tmp_path / "a", [5, 4], sizes_json=False)
    b = write_shards(tmp_path / "b", [3], sizes_json=False, prefix="other")
    tool = [sys.executable, str(REPO / "tools" / "index_shards.py")]
    res = subprocess.run([*tool, str(tmp_path / "a" / "shard-{000000..000001}.tar"), b[0]], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "a" / "sizes.json").read_text())["shards"] == {"shard-000000.tar": 5,
                                                                                 "shard-000001.tar": 4}
    assert json.loads((tmp_path / "b" / "sizes.json").read_text())["shards"] == {"other-000000.tar": 3}
    pipes = f"pipe:cat {tmp_path}/a/shard-{{000000..000001}}.tar"
    with pytest.raises(DataError, match="not a local file: a sizes file cannot go beside it; write one with --output"):
        index_shards(pipes)
    out = tmp_path / "remote-sizes.json"
    assert index_shards(pipes, output=str(out))[str(out)].total == 9
    counts = loaded_ids(pipes, 2, sizes_file=str(out), num_workers=0)  # the loader takes it as data.sizes_file
    assert len(counts) == 8
    (tmp_path / "a" / "sizes.json").write_text(json.dumps({"shards": {"shard-000000.tar": 1}}))
    with pytest.raises(FileExistsError, match="exists with other counts; pass overwrite"):
        index_shards(a)
    res = subprocess.run([*tool, *a, "--overwrite", "--workers", "1"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "9 samples in 2 shards" in res.stdout
    assert [c.samples for c in count_shards(a, workers=1)] == [c.samples for c in count_shards(a, workers=2)] == [5, 4]
