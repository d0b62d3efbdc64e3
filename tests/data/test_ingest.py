"""tools/make_shards.py's other inputs (:mod:`maescale.data.ingest`): Parquet files, ``save_to_disk``
folders read with pyarrow alone, path lists; the manifest; the errors that name the fix."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maescale.data import build_train_loader
from maescale.data.ingest import InputError, convert, detect_format
from maescale.data.tario import iter_samples
from tests.data.conftest import data_cfg
from tests.data.tables import (image_table, write_dataset_dict, write_image_files, write_parquet,
                               write_save_to_disk)

pytest.importorskip("pyarrow")  # the `test` extra installs it

REPO = Path(__file__).resolve().parents[2]
NAMES = ["cat", "dog", "eel"]


def read_out(out: Path) -> list[dict]:
    """Every sample of the shards in ``out`` (sizes.json order): id from the pixels, label, json."""
    sizes = json.loads((out / "sizes.json").read_text())
    got = []
    for name, count in sizes["shards"].items():
        with open(out / name, "rb") as fh:
            samples = [s for _, s in iter_samples(fh, seekable=True)]
        assert len(samples) == count, name
        for s in samples:
            ext = next(e for e in ("png", "jpg") if e in s)
            arr = np.asarray(Image.open(io.BytesIO(s[ext])))
            got.append({"id": int(arr[0, 0, 0]) + 256 * int(arr[0, 0, 1]), "cls": s.get("cls"),
                        "json": json.loads(s["json"]), "shard": name})
    return got


def test_parquet_file_folder_and_glob(tmp_path):
    a = write_parquet(tmp_path / "pq" / "train-00000-of-00002.parquet",
                      image_table(list(range(12)), [i % 3 for i in range(12)], label_names=NAMES))
    write_parquet(tmp_path / "pq" / "train-00001-of-00002.parquet",
                  image_table(list(range(12, 24)), [i % 3 for i in range(12, 24)], label_names=NAMES))
    assert detect_format(str(a)) == detect_format(str(tmp_path / "pq")) == "parquet"
    one = convert(a, tmp_path / "one", maxcount=5)
    assert one.total == 12 and len(one.shards) == 3 and one.classes == NAMES
    assert sorted(s["id"] for s in read_out(tmp_path / "one")) == list(range(12))
    for spec in (tmp_path / "pq", str(tmp_path / "pq" / "train-*.parquet")):
        out = tmp_path / f"all{len(str(spec))}"
        convert(spec, out, maxcount=7)
        samples = read_out(out)
        assert sorted(s["id"] for s in samples) == list(range(24))  # every row once
        for s in samples:
            assert s["cls"] == str(s["id"] % 3).encode()  # the ClassLabel index, as .cls
            assert s["json"]["label"] == s["id"] % 3 and s["json"]["class"] == NAMES[s["id"] % 3]
            assert s["json"]["path"] == f"img_{s['id']:05d}.png"
            assert s["json"]["source"].startswith("train-0000") and (s["json"]["width"], s["json"]["height"]) == (15, 12)
    # the loader reads the result with no data.num_samples: sizes.json from the shards' folder
    loader = build_train_loader(data_cfg(str(out / "shard-*.tar")), img_size=8, micro_batch_size=4, rank=0,
                                world_size=1, seed=0)
    assert loader.samples_per_epoch == 24


def test_plain_binary_column_string_labels_and_explicit_columns(tmp_path):
    import pyarrow as pa

    t = image_table(list(range(9)), ["b", "a", "c"] * 3, column="jpg", struct=False)
    t = t.append_column("thumb", pa.array([b"x"] * 9, type=pa.binary()))  # a second binary column
    write_parquet(tmp_path / "t.parquet", t)
    s = convert(tmp_path / "t.parquet", tmp_path / "out")  # "jpg" is the one image-like name
    assert s.classes == ["a", "b", "c"]
    samples = read_out(tmp_path / "out")
    assert {(x["id"], x["cls"]) for x in samples} == {(i, str("abc".index("bac"[i % 3])).encode()) for i in range(9)}
    assert all(x["json"]["class"] == "bac"[x["id"] % 3] for x in samples)
    s = convert(tmp_path / "t.parquet", tmp_path / "nolabel", image_column="jpg", label_column="none")
    assert s.classes == [] and all(x["cls"] is None for x in read_out(tmp_path / "nolabel"))


def test_column_errors_name_the_columns_and_the_option(tmp_path):
    import pyarrow as pa

    ambiguous = pa.table({"a": pa.array([b"1"], pa.binary()), "b": pa.array([b"2"], pa.binary()),
                          "n": pa.array([1], pa.int64())})
    write_parquet(tmp_path / "amb.parquet", ambiguous)
    with pytest.raises(InputError, match=r"several columns could hold the images \('a', 'b'\); choose one with "
                                         r"--image-column.*'n' \(int64\)"):
        convert(tmp_path / "amb.parquet", tmp_path / "o1")
    with pytest.raises(InputError, match=r"no column 'image' \(--image-column\); its columns: 'a' \(binary\)"):
        convert(tmp_path / "amb.parquet", tmp_path / "o2", image_column="image")
    with pytest.raises(InputError, match=r"the column 'n' is int64; an image column is a struct"):
        convert(tmp_path / "amb.parquet", tmp_path / "o3", image_column="n")
    with pytest.raises(InputError, match=r"no column 'lbl' \(--label-column\)"):
        convert(tmp_path / "amb.parquet", tmp_path / "o4", image_column="a", label_column="lbl")
    write_parquet(tmp_path / "none.parquet", pa.table({"n": pa.array([1], pa.int64())}))
    with pytest.raises(InputError, match=r"no column holds images .*'n' \(int64\).*--image-column"):
        convert(tmp_path / "none.parquet", tmp_path / "o5")
    assert not (tmp_path / "o1" / "sizes.json").exists()


def test_save_to_disk_folder_read_with_pyarrow_alone(tmp_path):
    ids = list(range(30))
    table = image_table(ids, [i % 3 for i in ids], label_names=NAMES, paths={7: "orig/seven.png"})
    folder = write_save_to_disk(tmp_path / "saved", table, num_shards=3, batch_rows=4)
    assert detect_format(str(folder)) == "hf"
    s = convert(folder, tmp_path / "out", maxcount=8, workers=2)
    assert s.total == 30 and s.classes == NAMES
    samples = read_out(tmp_path / "out")
    assert sorted(x["id"] for x in samples) == ids
    assert all(x["cls"] == str(x["id"] % 3).encode() for x in samples)
    seven = next(x for x in samples if x["id"] == 7)
    assert seven["json"]["path"] == "orig/seven.png" and seven["json"]["source"] == "data-00000-of-00003.arrow"
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["source"]["files"] == [f"data-0000{k}-of-00003.arrow" for k in range(3)]
    assert "datasets" not in sys.modules  # read without the datasets package


def test_dataset_dict_splits(tmp_path):
    folder = write_dataset_dict(tmp_path / "dd", {"train": image_table(list(range(6)), [0] * 6, label_names=NAMES),
                                                  "test": image_table(list(range(50, 53)), [-1] * 3,
                                                                      label_names=NAMES)})
    assert convert(folder, tmp_path / "train").total == 6  # train by default
    convert(folder, tmp_path / "test", split="test")
    samples = read_out(tmp_path / "test")
    assert sorted(x["id"] for x in samples) == [50, 51, 52]
    assert all(x["cls"] is None for x in samples)  # -1: datasets' "no label"
    with pytest.raises(InputError, match=r"has no split 'val' \(--split\); its splits: \['train', 'test'\]"):
        convert(folder, tmp_path / "val", split="val")


def test_path_lists_txt_and_csv(tmp_path):
    names = write_image_files(tmp_path / "imgs", list(range(8)))
    (tmp_path / "imgs" / "list.txt").write_text("# my images\n" + "\n".join(names + ["gone.png"]) + "\n")
    s = convert(tmp_path / "imgs" / "list.txt", tmp_path / "a")
    assert s.total == 8 and s.skipped == 1
    assert sorted(x["id"] for x in read_out(tmp_path / "a")) == list(range(8))
    assert s.unreadable == [{"item": "gone.png", "reason": f"missing file: {tmp_path / 'imgs' / 'gone.png'}"}]
    rows = "\n".join(f'"{n}",{"odd" if i % 2 else "even"}' for i, n in enumerate(names))
    (tmp_path / "list.csv").write_text("filename,kind\n" + rows + "\n")
    s = convert(tmp_path / "list.csv", tmp_path / "b", root=str(tmp_path / "imgs"), label_column="kind")
    assert s.classes == ["even", "odd"]
    assert all(x["cls"] == str(x["id"] % 2).encode() for x in read_out(tmp_path / "b"))
    (tmp_path / "nohead.csv").write_text(f"{names[0]},0\n")
    with pytest.raises(InputError, match="needs a header row"):
        convert(tmp_path / "nohead.csv", tmp_path / "c")
    assert detect_format(str(tmp_path / "imgs")) == "folder"  # a folder of images stays a folder input
    with pytest.raises(InputError, match=r"--label-column: not for an image folder"):
        convert(tmp_path / "imgs", tmp_path / "d", label_column="kind")


def test_manifest_counts_sizes_checksums_and_unreadable(tmp_path):
    table = image_table(list(range(16)), [i % 3 for i in range(16)], label_names=NAMES,
                        bad={2: b"not an image", 5: None, 9: b"\x89PNG\r\n\x1a\n" + b"\0" * 40},
                        paths={5: "missing/five.png"})
    write_parquet(tmp_path / "t.parquet", table)
    s = convert(tmp_path / "t.parquet", tmp_path / "out", maxcount=5, shuffle=False)
    out = tmp_path / "out"
    m = json.loads((out / "manifest.json").read_text())
    sizes = json.loads((out / "sizes.json").read_text())
    assert m["checksum"] == "sha256" and m["format"] == "maescale-manifest/1"
    assert m["total_samples"] == sizes["total"] == 13 == s.total
    assert [(x["name"], x["samples"]) for x in m["shards"]] == list(sizes["shards"].items())
    assert [x["samples"] for x in m["shards"]] == [5, 5, 3]
    for x in m["shards"]:
        data = (out / x["name"]).read_bytes()
        assert x["bytes"] == len(data) and x["sha256"] == hashlib.sha256(data).hexdigest()
    assert m["total_bytes"] == sum(x["bytes"] for x in m["shards"])
    assert m["unreadable_count"] == 3 and sizes["skipped"] == 3
    reasons = {u["item"]: u["reason"] for u in m["unreadable"]}
    assert reasons["t.parquet row 2 (img_00002.png)"].startswith("undecodable bytes: UnidentifiedImageError")
    assert reasons["t.parquet row 5 (missing/five.png)"] == f"missing file: {tmp_path / 'missing' / 'five.png'}"
    assert reasons["t.parquet row 9 (img_00009.png)"].startswith("undecodable bytes:")
    assert m["source"]["image_column"] == "image" and m["source"]["label_column"] == "label"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", *sizes["shards"], "sizes.json"]


def test_all_unreadable_is_an_error_and_publishes_nothing(tmp_path):
    write_parquet(tmp_path / "t.parquet", image_table([0, 1], bad={0: b"x", 1: b"y"}))
    with pytest.raises(ValueError, match=r"none of the 2 images could be read, e\.g\. t\.parquet row"):
        convert(tmp_path / "t.parquet", tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_tables_sorted_by_class_are_mixed_and_output_is_reproducible(tmp_path):
    ids = list(range(40))
    write_parquet(tmp_path / "sorted.parquet", image_table(ids, [i // 20 for i in ids], label_names=["a", "b"]),
                  row_group_size=10)
    convert(tmp_path / "sorted.parquet", tmp_path / "mixed", maxcount=10, shuffle_buffer=16)
    per_shard: dict[str, set] = {}
    for x in read_out(tmp_path / "mixed"):
        per_shard.setdefault(x["shard"], set()).add(x["cls"])
    assert all(len(c) == 2 for c in per_shard.values())  # every shard holds both classes
    convert(tmp_path / "sorted.parquet", tmp_path / "kept", maxcount=10, shuffle=False)
    assert [x["id"] for x in read_out(tmp_path / "kept")] == ids
    cli = [sys.executable, str(REPO / "tools" / "make_shards.py"), "--input", str(tmp_path / "sorted.parquet"),
           "--maxcount", "10", "--shuffle-buffer", "16"]
    res = subprocess.run([*cli, "--output", str(tmp_path / "cli"), "--workers", "2"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "40 samples in 4 shards, 0 files skipped" in res.stdout
    digest = lambda d: {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in d.iterdir()}  # noqa: E731
    assert digest(tmp_path / "cli") == digest(tmp_path / "mixed")  # the same bytes, worker-count independent


def test_missing_pyarrow_names_the_extra(tmp_path):
    write_parquet(tmp_path / "t.parquet", image_table([0]))
    write_save_to_disk(tmp_path / "saved", image_table([0, 1]))
    code = ("import runpy, sys; sys.modules['pyarrow'] = None; sys.argv = sys.argv[1:]; "  # as if not installed
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    for src, extra in ((tmp_path / "t.parquet", "parquet"), (tmp_path / "saved", "hf")):
        res = subprocess.run([sys.executable, "-c", code, str(REPO / "tools" / "make_shards.py"), "--input", str(src),
                              "--output", str(tmp_path / f"out_{extra}")], capture_output=True, text=True,
                             timeout=120, cwd=REPO)
        assert res.returncode == 2, res.stderr
        assert f"needs pyarrow, which is not installed: pip install 'maescale[{extra}]'" in res.stderr


def test_shard_tools_start_without_torch():
    code = ("import sys; import maescale.data.ingest, maescale.data.index, maescale.data.shards; "
            "print(sorted(m for m in ('torch', 'pyarrow') if m in sys.modules))")  # pyarrow: only when a table is read
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
