"""model.fp8: the layer rule, config validation, start-up checks, and the converted model
(torchao float8 training, emulated on this CPU)."""

from __future__ import annotations

import sys

import pytest
import torch

from maescale.config import ConfigError, config_from_dict
from maescale.models import PRESETS, build_model, create_model
from maescale.models.fp8 import (FP8_MIN_FEATURES, FP8UnavailableError, check_fp8_support, convert_to_fp8,
                                 fp8_layer_rule, fp8_plan, hardware_problem, module_filter)


ENCODER_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def _cfg(**model):
    return config_from_dict({"model": model, "train": {"max_steps": 1}})


# ---------------------------------------------------------------- the rule
def test_rule_picks_the_encoder_block_linears_of_vit_huge():
    arch = PRESETS["mae_vit_huge_patch14"]
    plan = fp8_plan(arch)
    converted = [p.name for p in plan if p.fp8]
    assert converted == [f"blocks.{i}.{s}" for i in range(32) for s in ENCODER_LINEARS]
    kept = {p.name: p.reason for p in plan if not p.fp8}
    assert sorted(kept) == sorted(["decoder_embed", "decoder_pred"] + [f"decoder_blocks.{i}.{s}" for i in range(8)
                                                                        for s in ENCODER_LINEARS])
    assert all("not an encoder block linear" in r for r in kept.values())
    # the same rule on the real module tree (meta device: free), as torchao's module_filter_fn sees it
    model = create_model("mae_vit_huge_patch14", device="meta")
    keep = module_filter()
    assert [n for n, m in model.named_modules() if keep(m, n)] == converted
    shapes = {(p.in_features, p.out_features) for p in plan if p.fp8}
    assert shapes == {(1280, 3840), (1280, 1280), (1280, 5120), (5120, 1280)}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_plan_from_the_preset_matches_the_model(name):
    """Config validation decides from the preset alone; it must agree with the built model."""
    model = create_model(name, device="meta")
    linears = [(n, m.in_features, m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)]
    plan = fp8_plan(PRESETS[name], min_features=16)
    assert sorted((p.name, p.in_features, p.out_features) for p in plan) == sorted(linears)
    keep = module_filter(16)
    assert sorted(n for n, m in model.named_modules() if keep(m, n)) == sorted(p.name for p in plan if p.fp8)


def test_rule_reasons():
    assert fp8_layer_rule("blocks.3.mlp.fc1", 1280, 5120, FP8_MIN_FEATURES) == "fp8"
    assert "multiple of 16" in fp8_layer_rule("blocks.3.mlp.fc1", 1280, 5100, 16)
    assert "below model.fp8_min_features=1024" in fp8_layer_rule("blocks.0.attn.proj", 768, 768, 1024)
    assert "not an encoder" in fp8_layer_rule("decoder_pred", 512, 588, 16)  # 588 = 14*14*3 outputs
    assert "not an encoder" in fp8_layer_rule("decoder_blocks.0.mlp.fc1", 512, 2048, 16)
    # ViT-B (width 768) stays bf16 at the default minimum; ViT-L (1024) is converted
    assert not any(p.fp8 for p in fp8_plan(PRESETS["mae_vit_base_patch16"]))
    assert sum(p.fp8 for p in fp8_plan(PRESETS["mae_vit_large_patch16"])) == 24 * 4


# ---------------------------------------------------------------- config validation
def test_config_accepts_recipes_and_off():
    assert _cfg(fp8="tensorwise", name="mae_vit_large_patch16").model.fp8 == "tensorwise"
    assert _cfg(fp8="rowwise", name="mae_vit_huge_patch14").model.fp8 == "rowwise"
    assert _cfg(fp8=False).model.fp8 is False  # YAML's bare `off`
    assert _cfg(fp8="off").model.fp8 == "off"
    tiny = _cfg(name="mae_vit_tiny_patch4", fp8="tensorwise", fp8_emulate=True, fp8_min_features=16)
    assert tiny.model.fp8_emulate and tiny.model.fp8_min_features == 16


@pytest.mark.parametrize("model,key,match", [
    ({"fp8": True}, "model.fp8", "name the recipe"),
    ({"fp8": "e4m3"}, "model.fp8", "expected"),
    ({"fp8_emulate": True}, "model.fp8_emulate", "model.fp8=off does not run"),
    ({"fp8": "tensorwise", "fp8_min_features": 8, "name": "mae_vit_huge_patch14"}, "model.fp8_min_features", ">= 16"),
    ({"fp8": "tensorwise", "name": "mae_vit_base_patch16"}, "model.fp8",
     "768x768.*at least model.fp8_min_features=1024"),
    ({"fp8": "rowwise", "name": "mae_vit_tiny_patch4"}, "model.fp8", "no linear layer of mae_vit_tiny_patch4"),
])
def test_config_errors_name_the_key(model, key, match):
    with pytest.raises(ConfigError, match=match) as err:
        _cfg(**model)
    assert err.value.key == key


# ---------------------------------------------------------------- start-up checks
def test_hardware_rule():
    assert "needs a CUDA GPU" in hardware_problem("cpu", None)
    assert "compute capability 8.0" in hardware_problem("cuda", (8, 0))  # A100: no FP8 tensor cores
    assert hardware_problem("cuda", (8, 9)) is None and hardware_problem("cuda", (9, 0)) is None
    assert hardware_problem("cuda", (10, 0)) is None


def test_cpu_without_emulation_fails_at_start_up_naming_the_switch():
    with pytest.raises(FP8UnavailableError, match="model.fp8=tensorwise: .*model.fp8_emulate=true"):
        check_fp8_support("tensorwise", "cpu", emulate=False)
    check_fp8_support("rowwise", "cpu", emulate=True)  # emulation runs here


def test_missing_torchao_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # what an environment without torchao sees
    with pytest.raises(FP8UnavailableError, match=r"maescale\[fp8\]"):
        check_fp8_support("tensorwise", "cpu", emulate=True)


# ---------------------------------------------------------------- the converted model
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_converted_model_keeps_its_state_dict_and_trains(recipe):
    from torchao.float8.float8_linear import Float8Linear

    torch.manual_seed(0)
    ref = create_model("mae_vit_mini_patch8", img_size=32)
    model = create_model("mae_vit_mini_patch8", img_size=32)
    model.load_state_dict(ref.state_dict())
    done = convert_to_fp8(model, recipe, emulate=True, min_features=16, device="cpu")
    assert done == [f"blocks.{i}.{s}" for i in range(4) for s in ENCODER_LINEARS]
    assert {n for n, m in model.named_modules() if isinstance(m, Float8Linear)} == set(done)
    sd, sd_ref = model.state_dict(), ref.state_dict()
    assert list(sd) == list(sd_ref)  # checkpoints, resume, export and probe see the same names
    assert all(type(v) is torch.Tensor and v.dtype == sd_ref[k].dtype and torch.equal(v, sd_ref[k])
               for k, v in sd.items())

    imgs, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 16)
    loss, pred, _ = model(imgs, noise=noise)
    loss_ref, pred_ref, _ = ref(imgs, noise=noise)
    loss.backward()
    loss_ref.backward()
    # float8 rounding (3 mantissa bits of e4m3) changes the numbers a little, not the function
    rel = float((pred - pred_ref).detach().norm() / pred_ref.detach().norm())
    assert 0 < rel < 0.1, rel
    g, g_ref = model.blocks[0].mlp.fc1.weight.grad, ref.blocks[0].mlp.fc1.weight.grad
    assert 0 < float((g - g_ref).norm() / g_ref.norm()) < 0.2
    # the decoder runs in high precision: its output layer's input differs only through the encoder
    assert type(model.decoder_pred) is torch.nn.Linear


def test_build_model_converts_from_the_config():
    from torchao.float8.float8_linear import Float8Linear

    cfg = _cfg(name="mae_vit_tiny_patch4", img_size=32, fp8="rowwise", fp8_emulate=True, fp8_min_features=16)
    model = build_model(cfg.model, device=torch.device("cpu"))
    assert model.fp8_layers == [f"blocks.{i}.{s}" for i in range(2) for s in ENCODER_LINEARS]
    assert isinstance(model.blocks[1].attn.qkv, Float8Linear)
    plain = build_model(_cfg(name="mae_vit_tiny_patch4", img_size=32).model)
    assert not any(isinstance(m, Float8Linear) for m in plain.modules())
    assert list(plain.state_dict()) == list(model.state_dict())


def test_conversion_leaves_the_random_stream_alone():
    """The start-up probe must not shift what the run draws next (masks, data): an FP8 run and a bf16
    run of the same seed see the same random numbers after building the model."""
    plain = _cfg(name="mae_vit_tiny_patch4", img_size=32)
    fp8 = _cfg(name="mae_vit_tiny_patch4", img_size=32, fp8="tensorwise", fp8_emulate=True, fp8_min_features=16)
    torch.manual_seed(0)
    build_model(plain.model)
    after_plain = torch.rand(4)
    torch.manual_seed(0)
    build_model(fp8.model)
    assert torch.equal(torch.rand(4), after_plain)


@pytest.mark.slow
def test_float8_block_compiles_and_matches_eager():
    """The loop compiles the blocks (model.compile): an FP8 block traces through torch.compile and
    gives the eager block's output and gradients."""
    import copy

    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch4", img_size=32)
    convert_to_fp8(model, "tensorwise", emulate=True, min_features=16, device="cpu")
    eager = model.blocks[0]
    compiled = copy.deepcopy(eager)
    compiled.compile()
    x = torch.randn(4, 17, 64)
    outs, grads = [], []
    for blk in (eager, compiled):
        xi = x.clone().requires_grad_(True)
        y = blk(xi)
        y.square().mean().backward()
        outs.append(y.detach())
        grads.append((xi.grad, blk.mlp.fc1.weight.grad))
    assert torch.allclose(outs[0], outs[1], atol=1e-5, rtol=1e-4)
    for a, b in zip(grads[0], grads[1]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-3)
