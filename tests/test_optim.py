"""Optimizer groups, the lr schedule and the DeepSpeed JSON built from the config."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from maescale.config import load_config
from maescale.optim import deepspeed_config, lr_at, make_schedule, param_group_names, peak_lr
from maescale.models import create_model

REPO = Path(__file__).resolve().parents[1]


def test_weight_decay_groups():
    m = create_model("mae_vit_tiny_patch4", img_size=32)
    groups = param_group_names(m, 0.05)
    decay, no_decay = set(groups["decay"]), set(groups["no_decay"])
    assert not decay & no_decay
    assert decay | no_decay == {n for n, p in m.named_parameters() if p.requires_grad}
    for name in decay:
        assert name.endswith(".weight") and "norm" not in name
    for name in ("cls_token", "mask_token", "blocks.0.attn.qkv.bias", "blocks.0.norm1.weight",
                 "norm.weight", "decoder_norm.bias", "patch_embed.proj.bias", "decoder_pred.bias"):
        assert name in no_decay
    for name in ("blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight", "patch_embed.proj.weight",
                 "decoder_embed.weight", "decoder_pred.weight"):
        assert name in decay
    # position embeddings are fixed buffers: in no group at all, never trained or decayed
    assert "pos_embed" not in decay | no_decay and "decoder_pos_embed" not in decay | no_decay


def test_schedule_values():
    peak, low, warm, total = 1e-3, 1e-5, 10, 110
    assert lr_at(0, peak, low, warm, total) == 0.0
    assert lr_at(5, peak, low, warm, total) == pytest.approx(peak / 2)
    assert lr_at(10, peak, low, warm, total) == pytest.approx(peak)  # warmup end
    assert lr_at(60, peak, low, warm, total) == pytest.approx((peak + low) / 2)  # mid-cosine
    assert lr_at(35, peak, low, warm, total) == pytest.approx(low + (peak - low) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, peak, low, warm, total) == pytest.approx(low)  # end
    steps = [lr_at(s, peak, low, warm, total) for s in range(total + 1)]
    assert all(a <= b for a, b in zip(steps[:warm], steps[1:warm + 1]))
    assert all(a >= b for a, b in zip(steps[warm:], steps[warm + 1:]))


def test_lr_scaling_and_warmup_in_epochs():
    cfg = load_config(REPO / "configs/base.yaml", ["train.micro_batch_size=64", "train.grad_accum_steps=2"])
    assert peak_lr(cfg, world_size=16) == pytest.approx(1.5e-4 * 64 * 2 * 16 / 256)
    sched = make_schedule(cfg, world_size=16, total_steps=100_000, steps_per_epoch=625.5)
    assert sched.warmup_steps == round(40 * 625.5)
    cfg2 = load_config(REPO / "configs/base.yaml", ["optim.lr=0.01", "optim.warmup_steps=7"])
    s2 = make_schedule(cfg2, world_size=1, total_steps=50, steps_per_epoch=None)
    assert s2.peak_lr == 0.01 and s2.warmup_steps == 7
    with pytest.raises(ValueError, match="warmup_epochs needs the epoch length"):
        make_schedule(cfg, world_size=1, total_steps=10, steps_per_epoch=None)


def test_deepspeed_json_from_config():
    cfg = load_config(REPO / "configs/base.yaml", [
        "deepspeed.zero_stage=2", "train.micro_batch_size=32", "train.grad_accum_steps=4", "optim.grad_clip=1.0",
        "deepspeed.extra={zero_optimization: {reduce_bucket_size: 1000}, flops_profiler: {enabled: true}}"])
    ds = deepspeed_config(cfg, world_size=8)
    assert ds["train_micro_batch_size_per_gpu"] == 32 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 32 * 4 * 8
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"] is True
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000  # extra wins, merged recursively
    assert ds["zero_optimization"]["overlap_comm"] is True
    assert ds["flops_profiler"] == {"enabled": True}
    fp32 = deepspeed_config(load_config(REPO / "configs/tiny.yaml"), world_size=1)
    assert fp32["bf16"]["enabled"] is False and fp32["zero_optimization"]["stage"] == 1


@pytest.mark.parametrize("overrides,lean", [
    ([], True),                                                   # ZeRO-1, no clipping: auto -> lean
    (["deepspeed.zero_stage=2"], True),
    (["deepspeed.zero_stage=3"], False),                          # ZeRO-3 keeps DeepSpeed's checks
    (["optim.grad_clip=1.0"], False),                             # clipping needs the norm first
    (["deepspeed.lean_step=false"], False),
])
def test_lean_step_switches_in_the_deepspeed_json(overrides, lean):
    from maescale.optim import lean_step_enabled

    cfg = load_config(REPO / "configs/tiny.yaml", overrides + ["train.precision=bf16"])
    ds = deepspeed_config(cfg, 2)
    assert lean_step_enabled(cfg) is lean
    assert ds["zero_optimization"].get("compute_grad_norm", True) is (not lean)
    assert ds["bf16"].get("check_grad_overflow", True) is (not lean)


@pytest.mark.parametrize("overrides,key,fragment", [
    (["deepspeed.lean_step=true", "deepspeed.zero_stage=3"], "deepspeed.lean_step", "ZeRO-1/2 optimizer only"),
    (["deepspeed.lean_step=true", "optim.grad_clip=1.0"], "deepspeed.lean_step", "set optim.grad_clip=0"),
    (["deepspeed.extra={zero_optimization: {compute_grad_norm: false}}", "optim.grad_clip=0.5"],
     "deepspeed.extra.zero_optimization.compute_grad_norm", "clipping needs the norm"),
    (["deepspeed.extra={zero_optimization: {compute_grad_norm: false}}", "deepspeed.zero_stage=3"],
     "deepspeed.extra.zero_optimization.compute_grad_norm", "ZeRO stage 1 or 2 only"),
    (["deepspeed.extra={bf16: {check_grad_overflow: false}}", "deepspeed.lean_step=false"],
     "deepspeed.extra.bf16.check_grad_overflow", "non-finite steps through unchecked"),
])
def test_lean_switches_refused_where_deepspeed_cannot_honour_them(overrides, key, fragment):
    from maescale.config import ConfigError

    with pytest.raises(ConfigError) as info:
        load_config(REPO / "configs/tiny.yaml", overrides)
    assert info.value.key == key and fragment in str(info.value)


def test_host_overhead_counts_ops_of_each_step(one_torch_thread):
    """The host-overhead benchmark (a count, not a timing): the lean engine step drops DeepSpeed's
    per-parameter checks (measured 4,485 -> 2,248 aten ops/step, tiny preset, micro-batch 8), and the
    flat-buffer bare step runs fewer ops than one with a master copy per parameter."""
    from maescale.devtools.bench import host_overhead
    from maescale.distributed import shutdown

    try:
        rows = {r["variant"]: r for r in host_overhead("mae_vit_tiny_patch4", 4, warmup=1, steps=2, device="cpu")}
    finally:
        shutdown()
    assert set(rows) == {"bare", "bare-per-param", "deepspeed", "deepspeed-lean"}
    assert rows["deepspeed-lean"]["aten_ops_per_step"] < 0.6 * rows["deepspeed"]["aten_ops_per_step"]
    assert rows["bare"]["aten_ops_per_step"] < rows["bare-per-param"]["aten_ops_per_step"]
