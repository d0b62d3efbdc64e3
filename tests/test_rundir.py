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


# ---- the run lock ------------------------------------------------------------------------------

import logging  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from maescale.rundir import RunLock, RunLocked, describe_owner, lock_status  # noqa: E402

FAST = dict(stale_s=0.6, heartbeat_s=0.1, poll_s=0.05)


def test_lock_is_taken_held_and_released(tmp_path):
    run = RunDir(tmp_path / "run")
    lock = RunLock(run, "job-a", wait_s=1, version="9.9", **FAST)
    assert lock.acquire() < 0.5
    owner = lock.owner()
    assert owner["job"] == "job-a" and owner["host"] == socket.gethostname() and owner["pid"] == os.getpid()
    assert owner["maescale_version"] == "9.9" and owner["token"] == lock.token
    beat0 = json.loads(lock.heartbeat_path.read_text())["beat"]
    time.sleep(0.35)
    assert json.loads(lock.heartbeat_path.read_text())["beat"] > beat0  # the heartbeat moves
    assert lock_status(run, fresh_s=5)["job"] == "job-a"
    lock.release()
    assert not lock.path.exists() and not lock.heartbeat_path.exists() and lock_status(run, 5) is None
    assert [p.name for p in run.path.iterdir()] == []  # no temporaries left


def test_second_job_waits_then_is_refused_naming_the_holder(tmp_path):
    run = RunDir(tmp_path)
    holder = RunLock(run, "slurm:111", **FAST)
    holder.acquire()
    try:
        t0 = time.monotonic()
        with pytest.raises(RunLocked) as info:
            RunLock(run, "slurm:222", wait_s=1.0, **FAST).acquire()
        waited = time.monotonic() - t0
        assert 1.0 <= waited < 3.0
        msg = str(info.value)
        assert "slurm:111" in msg and socket.gethostname() in msg and "lock.takeover=true" in msg
        assert "lock.wait_s=1" in msg
    finally:
        holder.release()


def test_waiting_job_gets_the_lock_when_the_holder_releases_it(tmp_path):
    run = RunDir(tmp_path)
    holder = RunLock(run, "old", **FAST)
    holder.acquire()
    threading.Timer(0.5, holder.release).start()
    newcomer = RunLock(run, "new", wait_s=5, **FAST)
    waited = newcomer.acquire()
    assert 0.4 <= waited < 3 and newcomer.owner()["job"] == "new"
    newcomer.release()


def test_stale_heartbeat_is_taken_over_with_a_warning(tmp_path, caplog):
    run = RunDir(tmp_path)
    ghost = RunLock(run, "ghost", **FAST)
    ghost.acquire()
    ghost._stop.set()  # the heartbeat stops: a job on another host that died without releasing
    ghost._thread.join()
    record = ghost.owner() | {"host": "another-host"}
    ghost.path.write_text(json.dumps(record))
    newcomer = RunLock(run, "new", wait_s=10, **FAST)
    with caplog.at_level(logging.WARNING):
        waited = newcomer.acquire(logging.getLogger("test"))
    assert FAST["stale_s"] <= waited < 5
    assert "taking over" in caplog.text and "heartbeat has not moved" in caplog.text and "ghost" in caplog.text
    assert newcomer.owner()["job"] == "new"
    time.sleep(0.3)
    assert newcomer.lost is False
    newcomer.release()


def test_dead_owner_on_this_host_is_taken_over_at_once(tmp_path, caplog):
    run = RunDir(tmp_path)
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = {"job": "gone", "host": socket.gethostname(), "pid": int(dead.stdout), "token": "t0", "started": "x"}
    run.path.mkdir(exist_ok=True)
    (run.path / "lock").write_text(json.dumps(record))
    newcomer = RunLock(run, "new", wait_s=10, stale_s=60, heartbeat_s=10, poll_s=0.05)
    with caplog.at_level(logging.WARNING):
        assert newcomer.acquire(logging.getLogger("test")) < 2  # no need to wait for a stale heartbeat
    assert "is gone" in caplog.text
    newcomer.release()


def test_requeue_of_the_same_job_takes_its_lock_back_and_takeover_flag(tmp_path):
    run = RunDir(tmp_path)
    first = RunLock(run, "slurm:777", **FAST)
    first.acquire()
    again = RunLock(run, "slurm:777", wait_s=10, stale_s=60, heartbeat_s=10, poll_s=0.05)
    assert again.acquire() < 2  # a requeued job does not wait for its own old lock
    time.sleep(0.3)
    assert first.lost  # the old holder notices at its next beat
    forced = RunLock(run, "other", wait_s=10, stale_s=60, heartbeat_s=10, poll_s=0.05, takeover=True)
    assert forced.acquire() < 2 and forced.owner()["job"] == "other"
    first.release()  # no longer its lock: releasing must not remove the new owner's
    assert forced.owner()["job"] == "other"
    again.release()
    forced.release()


def test_racing_jobs_get_the_lock_one_at_a_time(tmp_path):
    run = RunDir(tmp_path)
    holders: list[str] = []
    errors: list[Exception] = []

    def job(name):
        lock = RunLock(run, name, wait_s=20, **FAST)
        try:
            lock.acquire()
            holders.append(name)
            assert len(holders) - len(done) == 1  # nobody else holds it now
            time.sleep(0.05)
            done.append(name)
            lock.release()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    done: list[str] = []
    threads = [threading.Thread(target=job, args=(f"j{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and sorted(holders) == [f"j{i}" for i in range(6)]


def test_describe_owner():
    text = describe_owner({"job": "slurm:5", "host": "n1", "pid": 7, "started": "then", "maescale_version": "0.1.0"})
    assert text == "job slurm:5 (host n1, pid 7, since then, maescale 0.1.0)"
