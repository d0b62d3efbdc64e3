"""``model.init_from`` (maescale.checkpoint.load_pretrained_into) with public weights: files written
by timm's own ``VisionTransformer`` (with and without a classifier head, other pooling, another
image or patch size; .pth and .safetensors) and files of the MAE release's layout (a model with
models_mae.py's names: encoder-only and full). What loads computes what the file computed; what
does not fit is refused naming the key and the fix."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed

from maescale.checkpoint import CheckpointError, load_pretrained_into, only_encoder_loaded
from maescale.config import ConfigError, load_config
from maescale.models import DECODER_KEYS, PRESETS, MaskedAutoencoderViT, create_model
from maescale.models.mae import sincos_2d

REPO = Path(__file__).resolve().parents[1]
TINY, MINI = "mae_vit_tiny_patch4", "mae_vit_mini_patch8"


def timm_vit(preset: str = TINY, *, img_size: int = 32, seed: int = 0, **kwargs) -> torch.nn.Module:
    """timm's own VisionTransformer with the preset's encoder dims (``kwargs`` override them),
    randomly initialised by timm (its position table is a learned one: truncated normal)."""
    a = PRESETS[preset]
    dims = dict(patch_size=a.patch_size, embed_dim=a.embed_dim, depth=a.depth, num_heads=a.num_heads,
                mlp_ratio=a.mlp_ratio, num_classes=10)
    torch.manual_seed(seed)
    return timm.create_model("vit_base_patch16_224", pretrained=False, img_size=img_size,
                             **{**dims, **kwargs}).eval()


def save(state: dict[str, torch.Tensor], path: Path) -> Path:
    """A flat state dict as timm users save one: torch.save or safetensors by the suffix."""
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def release_model(preset: str = TINY, img_size: int = 32, seed: int = 0) -> torch.nn.Module:
    """An MAE with the release's models_mae.py names (maescale keeps them), weights perturbed
    away from any initialisation so that a load is visible."""
    torch.manual_seed(seed)
    model = create_model(preset, img_size=img_size).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def features_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def dropped_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "not part of an MAE" in r.getMessage()]


# --------------------------------------------------------------------------------------------
# timm's VisionTransformer: heads and poolers dropped, the encoder computes what timm's did
# --------------------------------------------------------------------------------------------

HEADS = {
    "classifier head": (dict(), ["head.weight", "head.bias"]),
    "no head": (dict(num_classes=0), []),
    "avg pool (fc_norm)": (dict(global_pool="avg"), ["fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"]),
    "attention pool": (dict(global_pool="map"), None),  # attn_pool.* and head.*
}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("variant", list(HEADS))
def test_timm_vit_loads_with_heads_dropped(tmp_path, caplog, variant, suffix):
    kwargs, dropped = HEADS[variant]
    vit = timm_vit(**kwargs)
    path = save(vit.state_dict(), tmp_path / f"timm_vit{suffix}")
    model = create_model(TINY, img_size=32).eval()
    decoder_before = model.decoder_pred.weight.clone()
    with caplog.at_level(logging.INFO, logger="maescale"):
        result = load_pretrained_into(model, path)

    if dropped is None:
        dropped = [k for k in vit.state_dict() if k.startswith(("attn_pool.", "head."))]
        assert len(dropped) > 2
    assert result["unexpected"] == sorted(dropped)
    assert only_encoder_loaded(result)
    assert torch.equal(model.decoder_pred.weight, decoder_before)  # the decoder is fresh
    lines = dropped_lines(caplog)
    if dropped:
        assert len(lines) == 1 and lines[0].endswith(", ".join(sorted(dropped))), lines
    else:
        assert lines == []

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if variant.startswith("avg pool"):
            # timm puts this model's last norm into fc_norm (after pooling): every block loads, the
            # encoder's own final norm starts at its initialisation, and the log says so.
            assert {"norm.weight", "norm.bias"} <= set(result["missing"])
            assert torch.equal(model.norm.weight, torch.ones(64)) and torch.equal(model.norm.bias, torch.zeros(64))
            assert any("has no final norm" in r.getMessage() for r in caplog.records)
            tokens = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(2, -1, -1),
                                model.patch_embed(x) + model.pos_embed[:, 1:]], dim=1)
            # timm's forward_features ends without a norm here (norm is Identity): the blocks are timm's
            assert features_err(model._run_blocks(model.blocks, tokens), vit.forward_features(x)) < 1e-5
        else:
            assert features_err(model.forward_features(x), vit.forward_features(x)) < 1e-5
            assert [k for k in result["missing"] if not k.startswith(DECODER_KEYS)] == []


# --------------------------------------------------------------------------------------------
# Position tables: learned ones are kept (resampled to the grid) and stay fixed; sin-cos ones
# are MAE's table, recomputed exactly for the model's grid
# --------------------------------------------------------------------------------------------


def test_learned_pos_embed_is_kept_resampled_and_stays_fixed(tmp_path, caplog):
    vit = timm_vit(img_size=64)  # a 16x16 grid of learned positions; the model has 8x8
    file_pos = vit.pos_embed.detach().clone()
    path = save(vit.state_dict(), tmp_path / "timm_64px.safetensors")
    model = create_model(TINY, img_size=32)
    with caplog.at_level(logging.INFO, logger="maescale"):
        load_pretrained_into(model, path)

    expected = resample_abs_pos_embed(file_pos, [8, 8], [16, 16], num_prefix_tokens=1, interpolation="bicubic",
                                      antialias=True)
    assert torch.allclose(model.pos_embed, expected, atol=1e-6)  # resampled, not replaced
    assert torch.equal(model.pos_embed[:, 0], file_pos[:, 0])  # the cls position as is
    assert not torch.allclose(model.pos_embed[0], sincos_2d(64, 8), atol=0.1)
    assert any("learned table; kept as the model's fixed position table, resampled bicubically from 16x16 to 8x8"
               in r.getMessage() for r in caplog.records)

    # Fixed: a buffer, not a parameter, so a training step leaves it as loaded.
    assert "pos_embed" not in dict(model.named_parameters())
    before = model.pos_embed.clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    loss, _, _ = model(torch.randn(2, 3, 32, 32))
    loss.backward()
    opt.step()
    assert torch.equal(model.pos_embed, before)
    assert not torch.equal(model.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)  # the step did step


def test_learned_pos_embed_at_the_same_grid_is_kept_exactly(tmp_path):
    vit = timm_vit(img_size=32)
    path = save(vit.state_dict(), tmp_path / "timm.pth")
    model = create_model(TINY, img_size=32)
    load_pretrained_into(model, path)
    assert torch.equal(model.pos_embed, vit.pos_embed.detach())


def test_release_sincos_tables_at_another_grid_are_recomputed_exactly(tmp_path, caplog):
    src = release_model(img_size=64)  # the release stores its sin-cos tables in the state dict
    path = tmp_path / "mae_full_64px.pth"
    torch.save({"model": src.state_dict()}, path)
    model = create_model(TINY, img_size=32)
    with caplog.at_level(logging.INFO, logger="maescale"):
        result = load_pretrained_into(model, path)
    assert result == {"missing": [], "unexpected": []}
    assert not only_encoder_loaded(result)
    assert torch.equal(model.pos_embed[0], sincos_2d(64, 8))  # exact, not a bicubic approximation
    assert torch.equal(model.decoder_pos_embed[0], sincos_2d(32, 8))
    own = model.state_dict()
    for k, v in src.state_dict().items():
        if not k.endswith("pos_embed"):
            assert torch.equal(own[k], v), k
    assert any("pos_embed: the file's is MAE's fixed 2-D sin-cos table (16x16)" in r.getMessage()
               for r in caplog.records)


# --------------------------------------------------------------------------------------------
# The MAE release's files: {"model": state_dict}, encoder-only and full
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_release_full_file_loads_encoder_and_decoder(tmp_path, suffix):
    src = release_model(seed=4)
    path = tmp_path / f"mae_visualize{suffix}"
    if suffix == ".pth":
        torch.save({"model": src.state_dict()}, path)
    else:
        save(src.state_dict(), path)
    model = create_model(TINY, img_size=32).eval()
    result = load_pretrained_into(model, path)
    assert result == {"missing": [], "unexpected": []}
    assert not only_encoder_loaded(result)
    noise = torch.rand(2, 64, generator=torch.Generator().manual_seed(0))
    imgs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(imgs, noise=noise)[1], src(imgs, noise=noise)[1])  # same reconstruction


def test_release_encoder_only_file_leaves_the_decoder_fresh(tmp_path, caplog):
    src = release_model(seed=5)
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": src.encoder_state_dict()}, path)  # as mae_pretrain_vit_*.pth: no decoder
    torch.manual_seed(9)
    model = create_model(TINY, img_size=32).eval()
    fresh = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(DECODER_KEYS)}
    with caplog.at_level(logging.INFO, logger="maescale"):
        result = load_pretrained_into(model, path)
    assert only_encoder_loaded(result)
    assert sorted(result["missing"]) == sorted(fresh)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in fresh.items())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), src.forward_features(x))
    assert any("loaded the encoder (the decoder starts at its initialisation)" in r.getMessage()
               for r in caplog.records)


# --------------------------------------------------------------------------------------------
# Another patch size: refused unless model.init_resample_patch; resampled as the export does
# --------------------------------------------------------------------------------------------


def resize_patches(x: torch.Tensor, old: int, new: int) -> torch.Tensor:
    """Each ``old`` x ``old`` patch of ``x`` resized on its own to ``new`` x ``new`` (bicubic,
    antialiased): the operator FlexiViT's pseudo-inverse resize inverts exactly when upsampling."""
    g = x.shape[-1] // old
    patches = rearrange(x, "n c (h p) (w q) -> (n h w) c p q", p=old, q=old)
    resized = F.interpolate(patches, size=(new, new), mode="bicubic", antialias=True, align_corners=False)
    return rearrange(resized, "(n h w) c p q -> n c (h p) (w q)", h=g, w=g)


def test_patch_size_is_resampled_when_asked(tmp_path, caplog):
    vit = timm_vit(MINI, patch_size=4, img_size=32)  # mini's layout at patch 4; the mini preset is patch 8
    path = save(vit.state_dict(), tmp_path / "timm_p4.pth")
    with pytest.raises(CheckpointError, match=r"patch size 4, the model 8; set model.init_resample_patch=true"):
        load_pretrained_into(create_model(MINI, img_size=64), path)

    model = create_model(MINI, img_size=64).eval()  # the same 8x8 grid
    with caplog.at_level(logging.INFO, logger="maescale"):
        result = load_pretrained_into(model, path, resample_patch=True)
    assert only_encoder_loaded(result)
    expected = resample_patch_embed(vit.patch_embed.proj.weight.detach(), [8, 8], interpolation="bicubic",
                                    antialias=True)
    assert torch.allclose(model.patch_embed.proj.weight, expected, atol=1e-6)
    assert torch.equal(model.pos_embed, vit.pos_embed.detach())  # same grid: kept as is
    # The resampled kernel on patches upsampled from 4 to 8 px gives the file's embedding of the
    # original patches, so the whole encoder computes what timm's did.
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert features_err(model.forward_features(resize_patches(x, 4, 8)), vit.forward_features(x)) < 1e-4
    assert any("patch embedding resampled from patch 4 to 8 (model.init_resample_patch)" in r.getMessage()
               for r in caplog.records)


def test_patch_resample_of_a_full_release_file_leaves_its_decoder(tmp_path, caplog):
    """Its decoder predicts pixels of the other patch size: the encoder loads, the decoder starts fresh."""
    torch.manual_seed(0)
    src = MaskedAutoencoderViT(img_size=32, **{**PRESETS[MINI].as_kwargs(), "patch_size": 4})  # mini at patch 4
    path = tmp_path / "mae_full_p4.pth"
    torch.save({"model": src.state_dict()}, path)
    model = create_model(MINI, img_size=64)
    fresh = model.decoder_pred.weight.clone()
    with caplog.at_level(logging.INFO, logger="maescale"):
        result = load_pretrained_into(model, path, resample_patch=True)
    assert only_encoder_loaded(result)
    assert set(result["unexpected"]) == {k for k in src.state_dict() if k.startswith(DECODER_KEYS)}
    assert torch.equal(model.decoder_pred.weight, fresh)
    assert torch.equal(model.blocks[3].mlp.fc2.weight, src.blocks[3].mlp.fc2.weight)
    assert any("the file's decoder is not loaded: it predicts 4x4 patches" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------------------
# What does not fit: an error naming the key and the fix
# --------------------------------------------------------------------------------------------

MISFITS = {
    "wider": (dict(embed_dim=128), r"cls_token width 128 vs model 64; no model.name preset has the file's layout"),
    "deeper": (dict(depth=3), r"blocks\.2\.attn\.qkv\.weight is present, the file has 3 blocks; .*model\.name"),
    "shallower": (dict(depth=1), r"blocks\.1\.\* missing, the file has 1 block; .*model\.name"),
    "other MLP width": (dict(mlp_ratio=2.0), r"blocks\.0\.mlp\.fc1\.weight: file \(128, 64\) vs model \(256, 64\)"),
    "layer scale": (dict(init_values=0.1), r"has tensors maescale's ViT does not: blocks\.0\.ls1\.gamma"),
    "register tokens": (dict(reg_tokens=2), r"has tensors maescale's ViT does not: reg_token"),
    "no class token": (dict(class_token=False, global_pool="avg"), r"has no 'cls_token'"),
    "channels": (dict(in_chans=1), r"takes 1 input channels, the model 3; set model.in_chans=1"),
}


@pytest.mark.parametrize("case", list(MISFITS))
def test_misfits_are_refused_naming_key_and_fix(tmp_path, case):
    kwargs, message = MISFITS[case]
    path = save(timm_vit(**kwargs).state_dict(), tmp_path / "timm.safetensors")
    model = create_model(TINY, img_size=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=message):
        load_pretrained_into(model, path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # untouched


def test_a_file_of_another_preset_names_the_preset_that_fits(tmp_path):
    path = save(timm_vit(MINI).state_dict(), tmp_path / "mini.pth")
    with pytest.raises(CheckpointError, match=r"does not fit model.name's architecture \(2 blocks of width 64, "
                                              r"patch 4\): cls_token width 128 vs model 64; set model.name to a "
                                              r"preset of the file's layout \(width 128, depth 4, MLP width 512\): "
                                              r"mae_vit_mini_patch8"):
        load_pretrained_into(create_model(TINY, img_size=32), path)


# --------------------------------------------------------------------------------------------
# The config key
# --------------------------------------------------------------------------------------------


def test_init_resample_patch_needs_init_from(tmp_path):
    tiny = REPO / "configs" / "tiny.yaml"
    with pytest.raises(ConfigError, match="model.init_resample_patch"):
        load_config(tiny, ["model.init_resample_patch=true"])
    cfg = load_config(tiny, ["model.init_resample_patch=true", f"model.init_from={tmp_path / 'w.pth'}"])
    assert cfg.model.init_resample_patch is True
    assert load_config(tiny).model.init_resample_patch is False


def test_a_full_file_whose_decoder_differs_is_refused_with_the_encoder_only_fix(tmp_path):
    torch.manual_seed(0)
    other = MaskedAutoencoderViT(img_size=32, **{**PRESETS[TINY].as_kwargs(), "decoder_depth": 2})
    path = tmp_path / "mae_full_other_decoder.pth"
    torch.save({"model": other.state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"unexpected decoder_blocks\.1\..*its decoder differs from the "
                                              r"preset's: start from its encoder alone"):
        load_pretrained_into(create_model(TINY, img_size=32), path)
