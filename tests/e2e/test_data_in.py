"""End to end, data in: shards made from Parquet, a ``save_to_disk`` folder and a path list, and
shards written by other tools (plain ``tarfile``, ``webdataset.TarWriter``) indexed with
tools/index_shards.py, train with the real engine and resume exactly -- a run stopped by a signal
and resumed ends with the same weights, bit for bit, as an uninterrupted run -- with the epoch
length from the sizes files alone (``data.num_samples`` unset)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import webdataset as wds

from tests.data.conftest import id_png
from tests.data.tables import (image_table, write_image_files, write_parquet, write_save_to_disk,
                               write_tarfile_shard)
from tests.e2e.test_train import _interrupt_and_resume
from tests.helpers import REPO, TINY, assert_same_weights, base_overrides, final_weights, run_train

pytestmark = pytest.mark.slow

SIZE = 36  # id-coded PNGs of 36x39: RandomResizedCrop to the tiny preset's 32 px
EXTRA = {"data.num_samples": "null", "data.num_workers": 2, "data.shuffle_buffer": 16}


def _check_ref_and_resumed(tmp_path, shards: str, samples: int) -> None:
    ref = tmp_path / "ref"
    run_train(TINY, base_overrides(shards, ref, 16, **EXTRA))
    log = (ref / "logs" / "train.log").read_text()
    assert f"{samples} samples/epoch" in log and "split by sample ranges" in log  # exact, from the sizes files
    out = tmp_path / "resumed"
    stopped = _interrupt_and_resume(shards, out, base_overrides(shards, out, 16, **EXTRA), nproc=1)
    assert stopped < 16
    assert_same_weights(final_weights(ref), final_weights(out))


def _make_shards(*args: str) -> None:
    res = subprocess.run([sys.executable, str(REPO / "tools" / "make_shards.py"), *args, "--maxcount", "10"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_parquet_save_to_disk_and_list_inputs_train_and_resume_exactly(tmp_path):
    pytest.importorskip("pyarrow")
    src = tmp_path / "src"
    write_parquet(src / "pq" / "train.parquet", image_table(list(range(0, 24)), [i % 4 for i in range(24)],
                                                            label_names=list("abcd"), size=SIZE))
    write_save_to_disk(src / "saved", image_table(list(range(24, 48)), [i % 4 for i in range(24, 48)],
                                                  label_names=list("abcd"), size=SIZE), num_shards=2)
    names = write_image_files(src / "imgs", list(range(48, 72)), size=SIZE)
    (src / "imgs" / "list.txt").write_text("\n".join(names) + "\n")
    for name, given in (("pq", src / "pq"), ("hf", src / "saved"), ("list", src / "imgs" / "list.txt")):
        _make_shards("--input", str(given), "--output", str(tmp_path / "shards" / name))
    shards = "[" + ",".join(str(tmp_path / "shards" / n / "shard-*.tar") for n in ("pq", "hf", "list")) + "]"
    _check_ref_and_resumed(tmp_path, shards, 72)


def test_indexed_shards_of_other_writers_resume_exactly_without_num_samples(tmp_path):
    folder = tmp_path / "foreign"
    write_tarfile_shard(folder / "part-0.tar", list(range(0, 17)), size=SIZE)
    write_tarfile_shard(folder / "part-1.tar", list(range(17, 40)), size=SIZE)
    for n, ids in enumerate([range(40, 61), range(61, 72)]):
        with wds.TarWriter(str(folder / f"part-{n + 2}.tar")) as sink:
            for i in ids:
                sink.write({"__key__": f"{i:07d}", "png": id_png(i, SIZE), "cls": b"1"})
    res = subprocess.run([sys.executable, str(REPO / "tools" / "index_shards.py"), str(folder / "part-{0..3}.tar")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "72 samples in 4 shards" in res.stdout
    _check_ref_and_resumed(tmp_path, str(folder / "part-{0..3}.tar"), 72)
