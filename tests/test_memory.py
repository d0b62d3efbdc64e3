"""Memory accounting: ZeRO split arithmetic, measured activation bytes, largest micro-batch."""

from __future__ import annotations

import pytest
import torch

from maescale.devtools.memory import (GIB, ActivationProfile, activation_profile, live_peak_bytes, max_micro_batch,
                             memory_rows, model_state_bytes, saved_tensor_bytes)
from maescale.models import create_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("stage,expected", [
    (0, (2000, 2000, 12000)), (1, (2000, 2000, 3000)), (2, (2000, 500, 3000)), (3, (500, 500, 3000)),
])
def test_zero_split(stage, expected):
    s = model_state_bytes(1000, stage, world_size=4)
    assert (s.params, s.grads, s.optimizer) == expected
    assert s.total == sum(expected)


def test_zero_split_vit_huge_numbers():
    n = 656_613_964  # ViT-H/14 MAE, trainable
    assert model_state_bytes(n, 0, 128).total == 16 * n
    assert model_state_bytes(n, 1, 8).total == pytest.approx(n * (4 + 12 / 8))
    assert model_state_bytes(n, 2, 8).total == pytest.approx(n * (2 + 14 / 8))
    assert model_state_bytes(n, 3, 8).total == pytest.approx(n * 2)
    assert model_state_bytes(n, 3, 1).total == 16 * n
    with pytest.raises(ValueError):
        model_state_bytes(n, 4, 8)


def test_checkpointing_cuts_saved_bytes_base():
    # the real ViT-B/16 MAE at 224 px, one image, bf16
    torch.manual_seed(0)
    model = create_model("mae_vit_base_patch16").to(torch.bfloat16)
    imgs = torch.randn(1, 3, 224, 224, dtype=torch.bfloat16)
    off = saved_tensor_bytes(model, imgs)
    model.act_ckpt_every = 1
    on = saved_tensor_bytes(model, imgs)
    assert on.total <= 0.2 * off.total
    assert off.by_region["encoder"] > 0 and off.by_region["decoder"] > 0
    assert len(off.by_block) == 12 + 8 and off.max_block > 0
    # with every block checkpointed, what is kept of the blocks is their inputs: N tokens x D x 2 bytes
    assert on.by_region["encoder"] == pytest.approx(12 * 50 * 768 * 2, rel=0.05)
    assert on.by_region["decoder"] == pytest.approx(8 * 197 * 512 * 2, rel=0.05)


def test_saved_bytes_linear_in_batch_and_peak_above_saved():
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch4", img_size=32)
    s2 = saved_tensor_bytes(model, torch.randn(2, 3, 32, 32)).total
    s4 = saved_tensor_bytes(model, torch.randn(4, 3, 32, 32)).total
    assert s4 == pytest.approx(2 * s2, rel=1e-3)  # linear; a few scalars (the loss, mask sum) fixed
    peak = live_peak_bytes(model, torch.randn(4, 3, 32, 32))
    assert peak >= s4
    assert all(p.grad is None for p in model.parameters())


def test_activation_profile_and_fit():
    prof = activation_profile("mae_vit_tiny_patch4", img_size=32, act_ckpt_every=0, batches=(2, 4))
    assert prof.dtype == "bfloat16" and prof.saved_per_image > 0 and prof.peak_per_image >= prof.saved_per_image * 0.9
    assert prof.activation_bytes(10) == pytest.approx(prof.peak_fixed + 10 * prof.peak_per_image)


def test_max_micro_batch_arithmetic():
    prof = ActivationProfile("x", 224, 0.75, 0, "bfloat16", (1, 2), saved_per_image=1.0, saved_fixed=0.0,
                             peak_per_image=100 * 2**20, peak_fixed=0.0, saved_by_region_per_image={})
    n = 1_000_000_000 // 16  # 1 GB of model states at stage 0
    # 80 GiB - 8 GiB reserve - 1e9 bytes states = 72 GiB - 0.93 GiB, / 100 MiB
    expected = int((72 * GIB - 1e9) // (100 * 2**20))
    assert max_micro_batch(n, prof, 80 * GIB, 8 * GIB, zero_stage=0, world_size=8) == expected
    assert max_micro_batch(n, prof, 80 * GIB, 8 * GIB, zero_stage=3, world_size=8) > expected
    assert max_micro_batch(n, prof, 1 * GIB, 8 * GIB) == 0


def test_memory_rows_tiny():
    rows = memory_rows(["mae_vit_tiny_patch4"], img_size=32, ckpt_options=(0, 1), batches=(2, 4))
    assert [r["act_ckpt_every"] for r in rows] == [0, 1]
    assert rows[1]["saved_mib_per_image"] < rows[0]["saved_mib_per_image"]
    assert rows[0]["max_micro_batch"][3] >= rows[0]["max_micro_batch"][0] > 0


def test_bench_model_memory_cli(repo_root, tmp_path, capsys):
    import json
    import sys

    sys.path.insert(0, str(repo_root / "tools"))
    try:
        import bench_model
    finally:
        sys.path.pop(0)
    out = tmp_path / "mem.json"
    assert bench_model.main(["--memory", "--presets", "mae_vit_tiny_patch4", "--img-size", "32",
                             "--measure-batches", "2,4", "--json", str(out)]) == 0
    assert "max mb z1" in capsys.readouterr().out
    rows = json.loads(out.read_text())["runs"][0]["rows"]
    assert len(rows) == 2 and len(rows[0]["max_micro_batch"]) == 4
