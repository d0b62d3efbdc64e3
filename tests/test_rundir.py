"""The run directory: layout, tags, ``latest`` and atomic writes (maescale.rundir, torch-free)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from maescale.rundir import (RunDir, atomic_output, publish, step_of, tag_for_step, temp_path, write_bytes_atomic,
                             write_json_atomic, write_text_atomic)
from tests.helpers import REPO


def test_layout_and_tags(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.config == tmp_path / "run" / "config.yaml"
    assert run.train_log == tmp_path / "run" / "logs" / "train.log"
    assert (run.tensorboard.name, run.slurm.name, run.checkpoints.name) == ("tensorboard", "slurm", "checkpoints")
    assert tag_for_step(1000) == "step_00001000" and run.checkpoint(7).name == "step_00000007"
    assert step_of("step_00001000") == 1000 and step_of(run.checkpoint(123456789)) == 123456789
    assert step_of("step_12") is None and step_of("step_00001000.partial") is None and step_of("latest") is None
    assert not (tmp_path / "run").exists()  # nothing is created by looking


def test_checkpoints_latest_and_partials(tmp_path):
    run = RunDir(tmp_path)
    assert run.list_checkpoints() == [] and run.latest() is None and not run.has_checkpoints()
    for step in (5, 20, 10):
        run.checkpoint(step).mkdir(parents=True)
    (run.checkpoints / "step_00000030.partial").mkdir()
    (run.checkpoints / "notes.txt").write_text("x")
    assert [s for s, _ in run.list_checkpoints()] == [20, 10, 5]
    assert run.partials() == [run.checkpoints / "step_00000030.partial"]
    assert run.has_checkpoints() and run.latest() is None
    run.set_latest(run.checkpoint(10))
    assert (run.checkpoints / "latest").read_text() == "step_00000010"
    assert run.latest() == run.checkpoint(10) and run.latest_step() == 10
    (run.checkpoints / "latest").write_text("garbage\n")
    assert run.latest_step() is None
    only_latest = RunDir(tmp_path / "other")
    only_latest.checkpoints.mkdir(parents=True)
    (only_latest.checkpoints / "latest").write_text("step_00000003")
    assert only_latest.has_checkpoints()  # a run that wrote checkpoints, even if they were removed since


def test_atomic_writes(tmp_path):
    write_text_atomic(tmp_path / "a" / "t.txt", "héllo")
    assert (tmp_path / "a" / "t.txt").read_text(encoding="utf-8") == "héllo"
    write_json_atomic(tmp_path / "j.json", {"x": [1, 2]}, indent=1)
    assert json.loads((tmp_path / "j.json").read_text()) == {"x": [1, 2]}
    assert (tmp_path / "j.json").read_text().endswith("}\n")
    write_bytes_atomic(tmp_path / "b", b"\x00\x01")
    write_bytes_atomic(tmp_path / "b", b"\x02")  # replaces
    assert (tmp_path / "b").read_bytes() == b"\x02"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "j.json"]  # no temporaries left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.pth"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(target, keep_suffix=True) as tmp:
            assert tmp.suffix == ".pth" and tmp.name.startswith(".out.pth.tmp")
            tmp.write_text("half")
            raise RuntimeError("verification failed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pth"]


def test_publish_moves_directories(tmp_path):
    tmp = temp_path(tmp_path / "step_00000001")
    tmp.mkdir()
    (tmp / "f").write_text("x")
    publish(tmp, tmp_path / "step_00000001")
    assert (tmp_path / "step_00000001" / "f").read_text() == "x" and not tmp.exists()


def test_readers_never_see_half_a_file(tmp_path):
    """A reader polling a file while it is rewritten sees only whole versions."""
    path = tmp_path / "state.json"
    write_json_atomic(path, {"n": 0, "pad": "x" * 100_000})
    code = (f"import json,sys; sys.path.insert(0, {str(REPO)!r})\n"
            "from maescale.rundir import write_json_atomic\n"
            f"for n in range(1, 200): write_json_atomic({str(path)!r}, {{'n': n, 'pad': 'x' * 100_000}})\n")
    writer = subprocess.Popen([sys.executable, "-c", code])
    seen = set()
    while writer.poll() is None:
        seen.add(json.loads(path.read_text())["n"])  # never a JSONDecodeError
    assert writer.wait() == 0 and json.loads(path.read_text())["n"] == 199
    assert len(seen) >= 2
    assert not [p for p in os.listdir(tmp_path) if p != "state.json"]
