"""tools/convergence.py on a CPU: the real loop, bf16 twice and both FP8 recipes (emulated) on the
same generated JPEG shards; JSON curves and gaps, PNG picture."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from PIL import Image

from maescale.devtools.convergence import compare, smoothed
from tests.helpers import REPO, clean_env

pytestmark = pytest.mark.slow


def test_convergence_tool_writes_curves_gaps_and_picture(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "tools/convergence.py"), "configs/tiny.yaml", "--steps", "10",
                           "--micro-batch", "8", "--make-shards", str(tmp_path / "shards"), "--num-images", "48",
                           "--image-size", "64x48", "--smooth", "4", "--out", str(out), "--fp8-overrides",
                           "model.fp8_emulate=true model.fp8_min_features=16", "train.precision=bf16",
                           "data.num_workers=1"],
                          cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    doc = json.loads((out / "convergence.json").read_text())
    curves = {c["variant"]: c for c in doc["curves"]}
    assert list(curves) == ["bf16", "bf16 (repeat)", "tensorwise", "rowwise"]
    for c in curves.values():
        assert c["status"] == "ok" and c["steps"] == list(range(1, 11))
        assert all(math.isfinite(v) for v in c["loss"])
    gaps = doc["gaps"]
    # same seed, data order and masks: the bf16 run repeats exactly on a CPU ...
    assert curves["bf16 (repeat)"]["loss"] == curves["bf16"]["loss"] and gaps["bf16 (repeat)"]["max_abs_gap"] == 0
    # ... and the FP8 runs differ from it only by the float8 rounding
    for r in ("tensorwise", "rowwise"):
        assert 0 < gaps[r]["max_abs_gap"] < 0.05 * curves["bf16"]["loss"][0], gaps[r]
        assert "model.fp8=" + r in curves[r]["overrides"]
    assert doc["env"]["torch"] and doc["date"]
    png = Image.open(out / "convergence.png").convert("RGB")
    assert png.size == (960, 560)
    colours = {png.getpixel((x, y)) for x in range(0, 960, 2) for y in range(0, 560, 2)}
    assert (214, 39, 40) in colours and (31, 119, 180) in colours  # tensorwise red, rowwise blue
    assert "rowwise" in proc.stdout and "max rel gap" in proc.stdout


def test_gap_arithmetic():
    assert smoothed([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    curves = [{"variant": "bf16", "status": "ok", "steps": [1, 2, 3], "loss": [2.0, 2.0, 1.0]},
              {"variant": "tensorwise", "status": "ok", "steps": [1, 2, 3], "loss": [2.0, 2.5, 1.0]}]
    g = compare(curves, smooth=1)["tensorwise"]
    assert g["max_abs_gap"] == 0.5 and g["max_abs_gap_step"] == 2 and g["max_rel_gap_smoothed"] == 0.25
    assert g["final_rel_gap"] == 0.0
