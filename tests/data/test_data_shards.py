"""The shard writer, the demo data set and the data tools."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from maescale.data import build_train_loader
from maescale.data.demo import make_demo_data
from maescale.data.shards import Record, ShardWriter, find_images, make_shards
from tests.data.conftest import data_cfg

REPO = Path(__file__).resolve().parents[2]
HOSTILE = ["...png", "...jpg.jpg", "-rf --no-preserve-root.jpg", "a\nb\\c;$(touch pwned).jpg", "ünï cødé 🙂.png",
           "x" * 200 + ".jpg", "dots.in.the.name.JPEG", "..\\..\\evil.jpg", "--.png"]


def make_folder(root: Path, per_class: int = 5, classes=("n01", "n02", "-weird class.."), size=(40, 30)) -> int:
    rng = np.random.default_rng(0)
    n = 0
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            fmt, ext = ("PNG", "png") if i % 2 else ("JPEG", "jpg")
            Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(root / c / f"img{i}.{ext}", fmt)
            n += 1
    return n


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def test_round_trip_readable_by_webdataset_and_tarfile(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    n = make_folder(src)
    (src / "n01" / "notes.txt").write_text("not an image")
    summary = make_shards(src, out, maxcount=4)
    assert summary.total == n == 15 and summary.classes == ["-weird class..", "n01", "n02"]
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes["total"] == 15 and sum(sizes["shards"].values()) == 15
    assert sorted(os.listdir(out)) == sorted([*sizes["shards"], "sizes.json", "manifest.json"])  # nothing else, no temp files
    labels = {}
    for name, count in sizes["shards"].items():
        with tarfile.open(out / name) as tar:
            members = tar.getnames()
        assert len(members) == 3 * count  # image, cls, json per sample
        assert all(re.fullmatch(r"\d{9}_[A-Za-z0-9_-]+\.(jpg|png|cls|json)", m) for m in members)
    for sample in wds.WebDataset(str(out / "shard-{000000..000003}.tar"), shardshuffle=False).decode("pil"):
        img = sample.get("jpg") or sample.get("png")
        meta = sample["json"]
        assert img.size == (40, 30) and (meta["width"], meta["height"]) == (40, 30)
        assert meta["class"] == summary.classes[sample["cls"]]
        labels[meta["path"]] = sample["cls"]
    assert len(labels) == 15
    # and the maescale loader reads them, sizes from sizes.json
    loader = build_train_loader(data_cfg(str(out / "shard-*.tar")), img_size=8, micro_batch_size=5, rank=0,
                                world_size=1, seed=0)
    assert loader.samples_per_epoch == 15


def test_hostile_file_names_stay_contained(tmp_path):
    src, out, extract = tmp_path / "in", tmp_path / "out", tmp_path / "extract"
    (src / "x..weird").mkdir(parents=True)
    (src / "-class").mkdir()
    img = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(img, "PNG")
    for i, name in enumerate(HOSTILE):
        (src / ("x..weird" if i % 2 else "-class") / name.replace("/", "_")).write_bytes(img.getvalue())
    (src / "-class" / "link.png").symlink_to("/etc/hostname")  # not an image: skipped
    before = files_under(tmp_path)
    summary = make_shards(src, out, maxcount=3)
    # hidden names ("...png", "..\\..") are ignored like hidden folders; the symlink is not an image
    assert summary.skipped == 1 and summary.total == len(find_images(src)) - 1 == len(HOSTILE) - 3
    assert files_under(tmp_path) - before == {"out", *(str(Path("out") / f) for f in os.listdir(out))}  # only out/
    extract.mkdir()
    for shard in sorted(out.glob("shard-*.tar")):
        subprocess.run(["tar", "-C", str(extract), "-xf", str(shard)], check=True)
    for f in extract.rglob("*"):
        assert f.parent == extract and re.fullmatch(r"\d{9}_[A-Za-z0-9_-]+\.(png|cls|json)", f.name)
    paths = sorted(json.loads(p.read_text())["path"] for p in extract.glob("*.json"))
    assert any("\n" in p for p in paths)  # the original names survive, inside the JSON only


def test_parallel_workers_give_identical_shards_and_cli(tmp_path):
    src = tmp_path / "in"
    make_folder(src, per_class=6)
    (src / "n01" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    make_shards(src, tmp_path / "one", maxcount=5)
    res = subprocess.run([sys.executable, str(REPO / "tools" / "make_shards.py"), "--input", str(src), "--output",
                          str(tmp_path / "two"), "--maxcount", "5", "--workers", "2"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "18 samples in 4 shards, 1 files skipped" in res.stdout
    digest = lambda d: {f: hashlib.sha256((d / f).read_bytes()).hexdigest() for f in os.listdir(d)}  # noqa: E731
    assert digest(tmp_path / "one") == digest(tmp_path / "two")  # reproducible, worker-count independent
    res = subprocess.run([sys.executable, str(REPO / "tools" / "make_shards.py"), "--input", str(src), "--output",
                          str(tmp_path / "two")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "already holds shards" in res.stderr


def test_overwrite_resize_maxsize_and_flat_folder(tmp_path):
    src, out = tmp_path / "flat", tmp_path / "out"
    src.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (300, 200, 3), dtype=np.uint8)).save(src / f"{i}.png")
    assert all(c is None for _, c in find_images(src))
    s1 = make_shards(src, out, maxcount=1)
    assert len(s1.shards) == 6
    with pytest.raises(FileExistsError):
        make_shards(src, out)
    s2 = make_shards(src, out, resize=50, maxsize=25_000, overwrite=True)
    assert sorted(os.listdir(out)) == sorted([*s2.shards, "sizes.json", "manifest.json"])  # stale shards removed
    assert 1 < len(s2.shards) < 6
    for sample in wds.WebDataset(str(out / "shard-*.tar").replace("*", "{000000..%06d}" % (len(s2.shards) - 1)),
                                 shardshuffle=False).decode("pil"):
        assert min(sample["jpg"].size) == 50 and "cls" not in sample
        assert (sample["json"]["width"], sample["json"]["height"]) == (50, 75)


def test_writer_is_atomic_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with ShardWriter(out, maxcount=2) as w:
            for i in range(5):
                w.write(Record(f"r{i}", {"png": b"x", "cls": b"0"}))
            raise RuntimeError("crash while writing the third shard")
    assert sorted(os.listdir(out)) == ["shard-000000.tar", "shard-000001.tar"]  # complete ones only


# --------------------------------------------------------------------------------------------
# Demo data and the tools
# --------------------------------------------------------------------------------------------


def test_demo_data_is_deterministic_fast_and_loadable(tmp_path):
    t0 = time.perf_counter()
    s = make_demo_data(tmp_path / "a", num_images=256, size=64, seed=3)
    assert time.perf_counter() - t0 < 10
    make_demo_data(tmp_path / "b", num_images=256, size=64, seed=3)
    make_demo_data(tmp_path / "c", num_images=256, size=64, seed=4)
    shards = tmp_path / "a" / "shards"
    assert s.total == 256 and len(s.shards) == 2
    a, b, c = ((tmp_path / d / "shards" / "shard-000000.tar").read_bytes() for d in "abc")
    assert a == b and a != c
    kinds = {s["json"]["kind"] for s in wds.WebDataset(str(shards / "shard-000000.tar"), shardshuffle=False).decode()}
    assert len(kinds) == 6
    loader = build_train_loader(data_cfg(str(shards / "shard-*.tar"), shuffle_buffer=64), img_size=32,
                                micro_batch_size=8, rank=0, world_size=1, seed=0)
    it = iter(loader)
    batch = next(it)
    loader.close()
    assert batch.shape == (8, 3, 32, 32) and batch.float().std() > 20  # real structure, not blank


def test_make_demo_data_cli_and_tiny_config(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "tools" / "make_demo_data.py"), "--output", "demo_data",
                          "--num-images", "64"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "demo_data" / "shards" / "sizes.json").exists()
    from maescale.config import load_config

    cfg = load_config(REPO / "configs" / "tiny.yaml")
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the tiny config's pattern is relative: demo_data/shards/shard-*.tar
    try:
        loader = build_train_loader(cfg.data, img_size=cfg.model.img_size, micro_batch_size=cfg.train.micro_batch_size,
                                    rank=0, world_size=1, seed=cfg.train.seed)
        it = iter(loader)
        assert next(it).shape == (8, 3, 32, 32)
        loader.close()
    finally:
        os.chdir(cwd)


@pytest.mark.slow
def test_bench_data_cli_smoke(tmp_path):
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, str(REPO / "tools" / "bench_data.py"), "--num-images", "8", "--num-large", "8",
                          "--batch-size", "4", "--repeats", "1", "--workers", "0", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "| images | ImageFolder" in res.stdout
    data = json.loads(out.read_text())
    for name in ("500x375", "2000x1500"):
        e = data["sets"][name]
        assert e["imagefolder"] > 0 and e["maescale"] > 0 and e["raw_tar_read"] > 0
    assert set(data["targets"]) == {"large_3x", "small_1.2x"}
