"""Optimizer groups, the lr schedule and the DeepSpeed JSON built from the config."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from maescale.config import load_config
from maescale.models import PRESETS, create_model
from maescale.optim import (deepspeed_config, group_layout, is_decoder, layer_of, legacy_layout, lr_at, make_schedule,
                            param_group_names, param_groups, peak_lr)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_weight_decay_groups_follow_the_release_for_every_preset(preset):
    """The MAE release's pre-training builds its AdamW groups with timm's add_weight_decay(model,
    0.05) and no skip list: only 1-D tensors and biases go without decay, so cls_token and
    mask_token (1 x 1 x D) are decayed; the fixed sin-cos tables are buffers, in no group."""
    m = create_model(preset, device="meta")
    named = dict(m.named_parameters())
    for layout in ({}, {"bucket_elements": 1_000_000}):
        groups = param_groups(m, 0.05, **layout)
        placed = [n for g in groups for n in _names(m, g)]
        assert sorted(placed) == sorted(named)  # every trainable tensor exactly once
        for g in groups:
            for n in _names(m, g):
                release_decays = named[n].ndim > 1 and not n.endswith(".bias")
                assert g["decay"] is release_decays, (preset, n)
                assert g["weight_decay"] == (0.05 if release_decays else 0.0)
        by_name = {n: g for g in groups for n in _names(m, g)}
        assert by_name["cls_token"]["decay"] and by_name["mask_token"]["decay"]
    assert "pos_embed" not in named and "decoder_pos_embed" not in named


def test_tokens_exempt_rule_and_the_legacy_layout():
    m = create_model("mae_vit_tiny_patch4", img_size=32)
    groups = param_group_names(m, 0.05, decay_tokens=False)
    assert set(groups) == {"decay", "no_decay"}
    assert {"cls_token", "mask_token"} <= set(groups["no_decay"])
    # checkpoints without a recorded layout were written with exactly these two groups, in this order
    legacy = legacy_layout(m)
    assert [g["name"] for g in legacy] == ["decay", "no_decay"]
    assert legacy[0]["params"] == groups["decay"] and legacy[1]["params"] == groups["no_decay"]
    rebuilt = param_groups(m, 0.05, layout=legacy)
    assert [_names(m, g) for g in rebuilt] == [legacy[0]["params"], legacy[1]["params"]]
    assert rebuilt[1]["weight_decay"] == 0.0 and rebuilt[0]["weight_decay"] == 0.05


def test_buckets_run_in_backward_order_and_never_split_a_layer_or_mix_encoder_and_decoder():
    m = create_model("mae_vit_base_patch16", device="meta")
    bucket = 15_000_000  # about two ViT-B blocks
    groups = param_groups(m, 0.05, bucket_elements=bucket)
    names = [g["name"] for g in groups]
    assert names[0].startswith("decoder.decay") and names[-1] == "encoder.no_decay"
    assert names.index("decoder.no_decay") < names.index(next(n for n in names if n.startswith("encoder.")))
    layer_group: dict[str, int] = {}
    for i, g in enumerate(groups):
        params = _names(m, g)
        assert all(is_decoder(n) == (g["part"] == "decoder") for n in params)
        if g["decay"]:
            assert sum(p.numel() for p in g["params"]) >= bucket or g is groups[-2] or \
                groups[i + 1]["part"] != g["part"] or not groups[i + 1]["decay"]
            for n in params:
                assert layer_group.setdefault(layer_of(n), i) == i  # a layer lives in one bucket
    # backward order: within the encoder, higher blocks come in earlier buckets
    enc = [g for g in groups if g["part"] == "encoder" and g["decay"]]
    first_block = [min(int(n.split(".")[1]) for n in _names(m, g) if n.startswith("blocks.")) for g in enc
                   if any(n.startswith("blocks.") for n in _names(m, g))]
    assert first_block == sorted(first_block, reverse=True)
    assert "patch_embed.proj.weight" in _names(m, enc[-1]) and "cls_token" in _names(m, enc[-1])
    # a recorded layout rebuilds the same groups
    recorded = group_layout(m, groups)
    assert [_names(m, g) for g in param_groups(m, 0.05, layout=recorded)] == [g["params"] for g in recorded]


def test_a_layout_that_does_not_fit_the_model_is_refused():
    m = create_model("mae_vit_tiny_patch4", img_size=32)
    layout = legacy_layout(m)
    with pytest.raises(ValueError, match="does not have"):
        param_groups(m, 0.05, layout=[{**layout[0], "params": layout[0]["params"] + ["blocks.9.x"]}, layout[1]])
    with pytest.raises(ValueError, match="leave out"):
        param_groups(m, 0.05, layout=[layout[0]])


def _names(model, group) -> list[str]:
    ids = {id(p): n for n, p in model.named_parameters()}
    return [ids[id(p)] for p in group["params"]]


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
    """The host-overhead benchmark (a count, not a timing; figures in bench/host_overhead_cpu.json):
    the lean engine step drops DeepSpeed's per-parameter checks, the flat-buffer bare step runs
    fewer ops than one with a master copy per parameter, and the step the loop runs
    (maescale.step.FlatZeroStep) is within 10% of the flat bare step."""
    from maescale.devtools.bench import host_overhead
    from maescale.distributed import shutdown

    try:
        rows = {r["variant"]: r for r in host_overhead("mae_vit_tiny_patch4", 4, warmup=1, steps=2, device="cpu")}
    finally:
        shutdown()
    assert set(rows) == {"bare", "bare-per-param", "deepspeed", "deepspeed-lean", "loop"}
    assert rows["deepspeed-lean"]["aten_ops_per_step"] < 0.6 * rows["deepspeed"]["aten_ops_per_step"]
    assert rows["bare"]["aten_ops_per_step"] < rows["bare-per-param"]["aten_ops_per_step"]
    assert rows["loop"]["aten_ops_per_step"] <= 1.10 * rows["bare"]["aten_ops_per_step"]
