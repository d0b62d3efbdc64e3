"""FLOP accounting against torch's flop counter on real steps; peak table; MFU; the benchmark CLI."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from maescale.flops import mae_flops_per_image, mfu, num_ckpt_blocks, param_count, peak_flops, train_flops_per_image
from maescale.models import PRESETS, create_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


_MODELS: dict = {}


def counted(name: str, img_size: int, mask_ratio: float, batch: int, act_ckpt_every: int = 0) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs per image that FlopCounterMode sees on a real step."""
    if (name, img_size) not in _MODELS:  # build each model once; mask ratio and checkpointing are switches
        torch.manual_seed(0)
        _MODELS[name, img_size] = create_model(name, img_size=img_size, attn_impl="math")
    model = _MODELS[name, img_size]
    model.act_ckpt_every = act_ckpt_every
    model.zero_grad(set_to_none=True)
    imgs = torch.randn(batch, 3, img_size, img_size)
    with FlopCounterMode(display=False) as fc:
        loss, _, _ = model(imgs, mask_ratio=mask_ratio)
        fwd = fc.get_total_flops()
        loss.backward()
    return fwd / batch, fc.get_total_flops() / batch


@pytest.mark.parametrize("mask_ratio", [0.5, 0.75, 0.9])
def test_tiny_matches_flop_counter(mask_ratio):
    arch = PRESETS["mae_vit_tiny_patch4"]
    fwd, train = counted("mae_vit_tiny_patch4", 32, mask_ratio, batch=4)
    f = mae_flops_per_image(arch, 32, mask_ratio)
    assert f.forward == pytest.approx(fwd, rel=0.02)
    assert f.train == pytest.approx(train, rel=0.02)


@pytest.mark.parametrize("mask_ratio", [0.5, 0.75, 0.9])
def test_base_matches_flop_counter(mask_ratio):
    # the real ViT-B/16 MAE, at 112 px (49 patches) to keep the CPU step short
    arch = PRESETS["mae_vit_base_patch16"]
    fwd, train = counted("mae_vit_base_patch16", 112, mask_ratio, batch=1)
    f = mae_flops_per_image(arch, 112, mask_ratio)
    assert f.forward == pytest.approx(fwd, rel=0.02)
    assert train_flops_per_image(arch, 112, mask_ratio)[0] == pytest.approx(train, rel=0.02)


@pytest.mark.parametrize("name,img,k", [("mae_vit_tiny_patch4", 32, 1), ("mae_vit_tiny_patch4", 32, 2),
                                         ("mae_vit_base_patch16", 112, 3)])
def test_checkpoint_recompute_is_hardware_flops(name, img, k):
    arch = PRESETS[name]
    _, train = counted(name, img, 0.75, batch=2, act_ckpt_every=k)
    model_f, hw_f = train_flops_per_image(arch, img, 0.75, k)
    assert hw_f > model_f
    assert hw_f == pytest.approx(train, rel=0.02)
    # whole-block recompute (reentrant checkpointing) is an upper bound
    assert train_flops_per_image(arch, img, 0.75, k, early_stop=False)[1] > hw_f


def test_vit_huge_near_issue_figure():
    arch = PRESETS["mae_vit_huge_patch14"]
    f = mae_flops_per_image(arch, 224, 0.75)
    assert (f.encoder_tokens, f.decoder_tokens) == (65, 257)
    assert 3 * f.forward == pytest.approx(291e9, rel=0.01)
    model_f, hw_f = train_flops_per_image(arch, 224, 0.75)
    assert model_f == pytest.approx(291e9, rel=0.01) and hw_f == model_f
    assert f.forward == pytest.approx(f.encoder + f.decoder) == pytest.approx(f.linear + f.attention)
    assert f.encoder / f.forward > 0.8


def test_breakdown_fields_and_ckpt_counts():
    f = mae_flops_per_image(PRESETS["mae_vit_base_patch16"], 224, 0.75)
    assert f.num_patches == 196 and f.encoder_tokens == 50
    assert f.backward == pytest.approx(2 * f.forward - f.patch_embed)
    assert num_ckpt_blocks(12, 0) == 0 and num_ckpt_blocks(12, 1) == 12 and num_ckpt_blocks(12, 5) == 3
    with pytest.raises(ValueError):
        mae_flops_per_image(PRESETS["mae_vit_base_patch16"], 100, 0.75)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_param_count_matches_model(name):
    model = create_model(name, device="meta")
    assert param_count(PRESETS[name]) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("device_name,tflops", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.4), ("NVIDIA H200 NVL", 835.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100-PCIE-40GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA GH200 480GB", 989.4),
    ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.1),
])
def test_peak_table(device_name, tflops):
    assert peak_flops(device_name) == pytest.approx(tflops * 1e12)


def test_peak_unknown_override_and_dtype():
    assert peak_flops(None) is None
    assert peak_flops("cpu") is None
    assert peak_flops("Tesla T4") is None
    assert peak_flops(None, override_tflops=123.0) == pytest.approx(123e12)
    assert peak_flops("NVIDIA H100 80GB HBM3", override_tflops=500) == pytest.approx(500e12)
    assert peak_flops("NVIDIA H100 80GB HBM3", dtype="fp32") == pytest.approx(66.9e12)
    assert peak_flops("NVIDIA A100-SXM4-40GB", dtype="torch.bfloat16") == pytest.approx(312e12)
    with pytest.raises(ValueError):
        peak_flops("NVIDIA H100", override_tflops=-1)


def test_mfu_known_case():
    # ViT-H: 291 GFLOPs/image at 1360 images/s on one H100 SXM is 40% MFU
    assert mfu(291e9, 1360.0, 989.4e12) == pytest.approx(291e9 * 1360 / 989.4e12)
    assert mfu(291e9, 1360.0, 989.4e12) == pytest.approx(0.4, abs=0.001)
    assert mfu(1e12, 100.0, 200e12) == pytest.approx(0.5)
    assert mfu(1e12, 100.0, None) is None


# ---------------------------------------------------------------- tools/bench_model.py
def test_bench_model_cli_tiny_cpu(repo_root, tmp_path, capsys):
    sys.path.insert(0, str(repo_root / "tools"))
    try:
        import bench_model
    finally:
        sys.path.pop(0)
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        rc = bench_model.main(["--preset", "mae_vit_tiny_patch4", "--micro-batch", "4", "--attn", "sdpa,flash_attn",
                               "--warmup", "1", "--repeats", "2", "--device", "cpu", "--threads", "1",
                               "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    text = capsys.readouterr().out
    assert "img/s" in text and "sdpa" in text
    doc = json.loads(out.read_text())
    res = {r["variant"]: r for r in doc["runs"][0]["results"]}
    ok = res["sdpa"]
    assert ok["status"] == "ok" and ok["images_per_s"] > 0 and ok["mfu"] is None  # no CPU peak
    assert ok["model_gflops_per_image"] == pytest.approx(
        train_flops_per_image(PRESETS["mae_vit_tiny_patch4"], 32, 0.75)[0] / 1e9)
    assert res["flash_attn"]["status"] == "skipped" and res["flash_attn"]["reason"]


def test_variants_and_interleaved_run():
    from maescale.devtools.bench import Variant, run_bench, variants_from

    assert len(variants_from(["sdpa", "math"], [False, True], [0, 1], "product")) == 8
    axes = variants_from(["sdpa", "math", "flash"], [False, True], [0, 1], "axes")
    assert axes == [Variant("sdpa", False, 0), Variant("math", False, 0), Variant("flash", False, 0),
                    Variant("sdpa", True, 0), Variant("sdpa", False, 1)]
    results, env = run_bench("mae_vit_tiny_patch4", [2], [Variant("sdpa"), Variant("math", False, 1)], img_size=32,
                             device="cpu", warmup=1, repeats=2, interleave=True)
    assert env["interleave"] and [r.status for r in results] == ["ok", "ok"]
    assert all(r.repeats == 2 and r.images_per_s > 0 for r in results)
    assert results[1].hardware_gflops_per_image > results[1].model_gflops_per_image
