"""End to end: model.fp8 (torchao float8, emulated on this CPU) through the real loop: DeepSpeed
ZeRO-1 bf16 trains, a crash after a checkpoint resumes bitwise, the export loads into timm."""

from __future__ import annotations

import subprocess
import sys

import pytest
import timm
import torch

from maescale.export import FP32_RTOL, read_export
from maescale.models import create_model
from tests.helpers import (REPO, TINY, assert_same_weights, base_overrides, clean_env, final_weights, run_train,
                           train_cmd)

pytestmark = pytest.mark.slow

FP8 = {"model.fp8": "tensorwise", "model.fp8_emulate": "true", "model.fp8_min_features": 16,
       "train.precision": "bf16", "train.image_every": 0}


def test_fp8_trains_resumes_bitwise_and_exports_to_timm(shards, tmp_path):
    ref = tmp_path / "ref"
    run_train(TINY, base_overrides(shards, ref, 8, **FP8))
    log = (ref / "logs" / "train.log").read_text()
    assert "model.fp8=tensorwise (emulated): 8 linear layers in float8" in log

    # A crash (no clean-up) after the step-4 checkpoint, then the same command again.
    out = tmp_path / "crashed"
    overrides = base_overrides(shards, out, 8, **FP8)
    proc = subprocess.run([*train_cmd(1), str(TINY), *overrides], cwd=REPO, capture_output=True, text=True,
                          env=clean_env({"MAESCALE_FAULTS": "train.after_step@6=exit"}), timeout=300)
    assert proc.returncode == 1 and (out / "checkpoints" / "latest").read_text() == "step_00000004"
    run_train(TINY, overrides)
    assert "at step 4" in (out / "logs" / "train.log").read_text()
    weights = final_weights(ref)
    assert_same_weights(weights, final_weights(out))

    # The export is the fp32 encoder with timm names; timm loads it and computes the same features.
    enc = tmp_path / "encoder.pth"
    proc = subprocess.run([sys.executable, str(REPO / "tools/export_encoder.py"),
                           str(ref), "--output", str(enc)], cwd=REPO, env=clean_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state, meta = read_export(enc)
    assert all(v.dtype == torch.float32 for v in state.values())
    model = create_model("mae_vit_tiny_patch4", img_size=32)
    model.load_state_dict(weights)
    model.eval()
    tm = timm.create_model(meta["timm"]["model_name"], num_classes=0, checkpoint_path=str(enc),
                           **meta["timm"]["kwargs"]).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = tm.forward_features(x), model.forward_features(x)
    assert float((got - want).abs().max() / want.abs().max()) <= FP32_RTOL


def test_fp8_rowwise_trains(shards, tmp_path):
    out = tmp_path / "rowwise"
    run_train(TINY, base_overrides(shards, out, 4, **(FP8 | {"model.fp8": "rowwise"})))
    assert "model.fp8=rowwise (emulated): 8 linear layers in float8" in (out / "logs" / "train.log").read_text()
    w = final_weights(out)
    assert all(torch.isfinite(v).all() for v in w.values())
