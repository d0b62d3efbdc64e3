"""What the ranks decide together after a step (maescale.control) and the finish line of the log
(maescale.metrics): pure logic, no process group."""

from __future__ import annotations

import logging
import time

import pytest

from maescale.config import load_config
from maescale.control import Control, SpikeDetector, StopSignals
from maescale.metrics import FinishLine, ProgressLog, TensorBoardLogger, format_duration


def test_spike_detector_needs_a_baseline_and_patience():
    d = SpikeDetector(factor=3.0, window=5, patience=2)
    for step, loss in enumerate([1.0, 0.9, 0.95, 0.9, 0.85], start=1):
        assert d.update(step * 10, loss) is None
    assert d.update(60, 5.0) is None and d.onset() == 60  # one high log step is not yet a spike
    assert d.update(70, 0.8) is None and d.onset() is None  # back to normal: the streak ends
    assert d.update(80, 4.0) is None
    reason = d.update(90, 4.5)
    assert reason is not None and "since step 80" in reason and d.onset() == 80
    assert d.update(100, float("nan")) is None  # non-finite losses are the guard's business


def test_control_of_one_process_decides_at_once(tmp_path):
    cfg = load_config("configs/tiny.yaml", ["train.max_nonfinite_steps=2", "checkpoint.every_minutes=0"])
    lock = type("Lock", (), {"lost": False})()
    ctl = Control(cfg, None, 1, StopSignals(enabled=False), lock)
    d = ctl.after_step(5, 1.25)
    assert d is not None and d.step == 5 and not d.stop and d.loss == pytest.approx(1.25) and d.rollback is None
    ctl.signals.received = 15  # as the SIGTERM handler would
    assert ctl.after_step(6, None).stop
    ctl.diverged(7)
    d = ctl.after_step(8, None)
    assert d.rollback and "2 consecutive steps" in d.rollback and d.rollback_onset == 7
    ctl.rolled_back()
    assert ctl.after_step(9, None).rollback is None
    lock.lost = True
    assert ctl.after_step(10, None).lock_lost


def test_finish_line_projects_from_the_steady_rate(monkeypatch):
    clock = {"t": 1000.0}
    monkeypatch.setattr(time, "time", lambda: clock["t"])
    f = FinishLine(total_steps=1000)
    assert f.update(100) is None  # the first report only marks the start
    clock["t"] += 50.0  # 100 steps in 50 s: 2 steps/s, saves and evaluation included
    left, end = f.update(200)
    assert left == pytest.approx(400.0) and end == pytest.approx(clock["t"] + 400.0)
    f.restart()
    assert f.update(150) is None
    assert format_duration(400) == "6m 40s" and format_duration(2 * 86400 + 3 * 3600) == "2d 03h"
    assert format_duration(3 * 3600 + 5 * 60) == "3h 05m" and format_duration(12) == "12s"


def test_log_line_and_tensorboard_carry_the_time_left(tmp_path, caplog):
    import torch

    log = ProgressLog(TensorBoardLogger(tmp_path, enabled=False), total_steps=100, world_size=1, model_flops=1.0,
                      hw_flops=1.0, peak=None, device=torch.device("cpu"))
    with caplog.at_level(logging.INFO, logger="maescale.train"):
        log.resumed(25)
        for step in (30, 40):
            log.timer.add_step(8)
            log.report(step, 1.0, 1e-3, None, 0, {})
            time.sleep(0.05)
    assert "resumed at step 25 of 100: 25.0% done, 75 steps left" in caplog.text
    assert "step 40/100" in caplog.text and " left " in caplog.text and ", ends " in caplog.text
    assert log.history[-1]["time/remaining_h"] > 0 and "time/remaining_h" not in log.history[0]
