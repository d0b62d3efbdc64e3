"""The stall watchdog (maescale.watchdog): a rank without progress dumps its stacks, names the
rank furthest behind, and (in a job) exits for a restart; a rank that makes progress never fires."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

from maescale.exitcodes import STALLED
from maescale.watchdog import StallWatchdog, furthest_behind, read_steps, resolve_timeout


def test_timeout_is_honoured_or_derived_from_the_step_time():
    assert resolve_timeout(7.5, [100.0]) == 7.5  # a value the user sets is honoured
    assert resolve_timeout(None, []) == 300.0
    assert resolve_timeout(None, [0.05] * 10) == 300.0
    assert resolve_timeout(None, [30.0] * 10) == 600.0  # 20 x the median step


def test_progress_keeps_it_quiet_and_a_stall_fires_with_stacks(tmp_path):
    dog = StallWatchdog(tmp_path, "att", rank=0, world_size=1, timeout_s=0.6, poll_s=0.1, grace_s=0.2,
                        exit_process=False)
    dog.steps_done = 10  # past the warm-up budget
    dog.start()
    try:
        for step in range(12):
            dog.progress(step, "data")
            time.sleep(0.1)
            dog.progress(step, "step")
        assert dog.fired is None  # steady progress: nothing
        t0 = time.monotonic()
        dog.progress(12, "forward")
        while dog.fired is None and time.monotonic() - t0 < 10:
            time.sleep(0.05)
        took = time.monotonic() - t0
    finally:
        dog.stop()
    assert dog.fired is not None and 0.6 <= took < 0.6 + 0.1 + 0.2 + 2.5
    assert dog.fired["step"] == 12 and dog.fired["phase"] == "forward"
    stacks = (tmp_path / "stalls" / "att" / "rank_0.txt").read_text()
    assert "no progress for" in stacks and "test_progress_keeps_it_quiet_and_a_stall_fires" in stacks
    report = json.loads((tmp_path / "stalls" / "att" / "stall_rank_0.json").read_text())
    assert report["rank"] == 0 and report["stalled"][0]["rank"] == 0
    assert read_steps(tmp_path / "attempts" / "att" / "progress") == {0: 11}  # written as each step starts


def test_slow_phases_get_their_own_budget(tmp_path):
    dog = StallWatchdog(tmp_path, "att", rank=0, world_size=1, timeout_s=0.3, poll_s=0.05, grace_s=0.1,
                        exit_process=False)
    dog.steps_done = 10
    dog.progress(3, "save")  # a checkpoint save may take minutes
    assert dog.budget() >= 600
    dog.progress(4, "backward")
    assert dog.budget() == 0.3
    fresh = StallWatchdog(tmp_path, "att2", rank=0, world_size=1, timeout_s=0.3, exit_process=False)
    fresh.progress(0, "forward")  # the first steps compile
    assert fresh.budget() >= 600


def test_the_rank_furthest_behind_is_named(tmp_path):
    progress = tmp_path / "progress"
    progress.mkdir()
    for rank, step, phase in ((0, 12, "backward"), (1, 12, "backward"), (2, 11, "log"), (3, 12, "backward")):
        (progress / f"rank_{rank}.json").write_text(json.dumps({"rank": rank, "host": f"node{rank // 2}",
                                                                "step": step, "phase": phase}))
    behind, everyone = furthest_behind(progress)
    assert [r["rank"] for r in behind] == [2] and behind[0]["host"] == "node1" and len(everyone) == 4
    for rank in (2,):  # all at the same place: nobody is singled out (a hung collective)
        (progress / f"rank_{rank}.json").write_text(json.dumps({"rank": rank, "host": "node1", "step": 12,
                                                                "phase": "backward"}))
    assert furthest_behind(progress)[0] == []


def test_a_stalled_process_exits_with_the_stalled_code(tmp_path):
    """In a job the watchdog ends the process (exit code 4), whatever the main thread is doing."""
    script = textwrap.dedent(f"""
        import time
        from maescale.watchdog import StallWatchdog
        dog = StallWatchdog({str(tmp_path)!r}, "att", rank=3, world_size=4, timeout_s=0.5, poll_s=0.1, grace_s=0.3)
        dog.steps_done = 10
        dog.start()
        dog.progress(7, "data")
        time.sleep(60)  # hung in a call that releases the GIL (I/O, a collective)
    """)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == STALLED, proc.stderr
    assert time.monotonic() - t0 < 20
    assert (tmp_path / "stalls" / "att" / "rank_3.txt").exists()
    assert "time.sleep(60)" in (tmp_path / "stalls" / "att" / "rank_3.txt").read_text() or \
        "<string>" in (tmp_path / "stalls" / "att" / "rank_3.txt").read_text()


def test_every_live_rank_dumps_when_one_stalls(tmp_path):
    """A rank waiting in a phase with a long budget (a checkpoint's barrier) still writes its stacks
    when another rank's watchdog fires: the flag reaches it within a poll."""
    stalled = StallWatchdog(tmp_path, "att", rank=1, world_size=2, timeout_s=0.5, poll_s=0.05, grace_s=0.2,
                            exit_process=False)
    waiting = StallWatchdog(tmp_path, "att", rank=0, world_size=2, timeout_s=0.5, poll_s=0.05, grace_s=0.2,
                            exit_process=False)
    for dog in (stalled, waiting):
        dog.steps_done = 10
        dog.start()
    try:
        stalled.progress(19, "step")
        waiting.progress(20, "save")  # budget: many minutes
        deadline = time.monotonic() + 10
        while (stalled.fired is None or waiting.dumped_for is None) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stalled.stop()
        waiting.stop()
    assert stalled.fired is not None and waiting.fired is None and waiting.dumped_for == 1
    text = (tmp_path / "stalls" / "att" / "rank_0.txt").read_text()
    assert "dumped because rank 1 stalled" in text and "step 21, phase 'save'" in text
    assert [r["rank"] for r in stalled.fired["stalled"]] == [1]
