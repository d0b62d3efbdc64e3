"""bench/gpu_check.sh, run end to end on a CPU with the tiny preset: the one GPU run a session
gets must not be the first time the script runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, clean_env

pytestmark = pytest.mark.slow

# The default steps and issue #20's goal and FP8 steps in one run (one script start, one env step):
# tiny preset, emulated FP8, nothing compiled.
STEPS = ("env bare-autocast bare-bf16 loop-synthetic loop-data decode "
         "sdpa peer loop-fp8 bare-fp8 fp8-shapes convergence")


def test_gpu_check_script_runs_every_step_and_reports(tmp_path):
    out = tmp_path / "out"
    env = clean_env({"OUT": str(out), "PY": sys.executable, "PRESET": "mae_vit_tiny_patch4",
                     "CONFIG": "configs/tiny.yaml", "IMG": "32", "MB": "8", "MB_DATA": "8", "WORKERS": "1",
                     "NUM_IMAGES": "128", "COMPILE": "0", "PEER_COMPILE": "off", "BUDGET_S": "900", "DEVICE": "cpu",
                     "DECODE_ARGS": "--sets 100x80 --batch-size 8 --repeats 2 --agree-images 4 --feed-steps 3",
                     "FP8_EMULATE": "1", "FP8_MIN_FEATURES": "16", "FP8_LOOP": "tensorwise,rowwise",
                     "CONV_CONFIG": "configs/tiny.yaml", "CONV_STEPS": "6", "CONV_MB": "8", "CONV_IMAGES": "32",
                     "CONV_IMAGE_SIZE": "64x48", "CONV_ARGS": "train.precision=bf16", "STEPS": STEPS})
    proc = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert (out / "gpu_check.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    rows = report["rows"]
    failed = [r for r in rows if r["kind"] == "failed" and "cudnn" not in r["variant"]]
    assert failed == [], proc.stdout[-3000:]
    assert {r["kind"] for r in rows} >= {"autocast", "bare", "peer", "loop-synthetic", "loop-shards", "loop-gpu_decode"}
    assert {(r["kind"], r.get("fp8")) for r in rows} >= {("peer", "off"), ("bare", "tensorwise"), ("bare", "rowwise"),
                                                     ("loop-synthetic", "off"), ("loop-synthetic", "tensorwise"),
                                                     ("loop-synthetic", "rowwise")}
    # The default run's ratios, and the goal's: the loop against the peer, FP8 against bf16.
    got = report["ratios"]["8"]
    for key in ("loop_vs_bare", "gpu_decode_vs_cpu_decode", "best_loop_vs_peer", "bf16_loop_vs_peer",
                "fp8_loop_vs_bf16_loop", "loop_vs_bare[tensorwise]", "loop_vs_bare[rowwise]", "best_loop_mfu"):
        assert key in got, got
    assert abs(got["best_loop_vs_peer"] - max(r["images_per_s"] for r in rows if r["kind"] == "loop-synthetic")
               / next(r["images_per_s"] for r in rows if r["kind"] == "peer")) < 1e-9
    sites = {(r["site"], r["head_dim"], r["tokens"]) for r in report["sdpa"]["rows"]}
    assert sites == {("encoder", 32, 17), ("decoder", 16, 65)}  # tiny: 64 patches, 16 visible
    assert all(r["default"] == "flash(cpu)" and "math" in r["ms"] for r in report["sdpa"]["rows"])
    shapes = report["fp8_shapes"]["rows"]
    assert {r["variant"] for r in shapes} == {"bf16", "tensorwise", "rowwise"}
    assert all("ms" in r for r in shapes) and any("speedup_vs_bf16" in r for r in shapes)
    for text in ("sdpa encoder mb 8 (hd 32, 17 tokens): picks flash(cpu)", "fp8 shape encoder 64x192 mb 8",
                 "micro-batch 8: ", "decode 100x80: batch", "images_same_as_sync': True"):
        assert text in proc.stdout, proc.stdout[-3000:]
    assert "SKIPPED" not in proc.stdout
    conv = json.loads((out / "convergence.json").read_text())
    assert [c["variant"] for c in conv["curves"] if c["status"] == "ok"] == ["bf16", "bf16 (repeat)", "tensorwise",
                                                                              "rowwise"]
    assert (out / "convergence.png").is_file()
    assert (out / "logs.tar.gz").is_file() and not (out / "shards").exists() and not (out / "conv_shards").exists()
    assert proc.returncode in (0, 1)  # 1: the CPU loop below 0.9x the bare step, which only a GPU run judges
