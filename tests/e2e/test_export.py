"""End to end: real 2-process DeepSpeed ZeRO-1/ZeRO-3 bf16 runs -> tools/export_encoder.py ->
timm, same features; a public MAE checkpoint and a timm ViT (resampled) initialising a run;
tools/visualize.py on a run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

from maescale.export import FP32_RTOL, read_export, sidecar_path
from maescale.models import create_model
from tests.helpers import REPO, final_weights, run_train, write_shards

pytestmark = pytest.mark.slow

TINY = REPO / "configs" / "tiny.yaml"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_e2e_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("shards"), num_images=48, per_shard=24, size=40)


def overrides(shards: str, out: Path, steps: int, **extra) -> list[str]:
    values = {"output_dir": str(out), "data.train_shards": shards, "data.num_samples": 48, "train.max_steps": steps,
              "train.log_every": 1, "train.image_every": 0, "checkpoint.every_steps": 0, "checkpoint.keep_last": 1}
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.mark.parametrize("stage,suffix", [(1, ".pth"), (3, ".safetensors")])
def test_zero_bf16_run_exports_to_timm(shards, tmp_path, stage, suffix):
    out = tmp_path / f"zero{stage}"
    run_train(TINY, overrides(shards, out, 6, **{"deepspeed.zero_stage": stage, "train.precision": "bf16"}), nproc=2)
    ckpt = out / "checkpoints" / "step_00000006"
    assert len(list(ckpt.glob("*zero_pp_rank_*optim_states.pt"))) == 2  # really sharded over 2 ranks

    enc = tmp_path / f"encoder{suffix}"
    assert _tool("export_encoder")([str(out), "--output", str(enc)]) == 0
    state, meta = read_export(enc)
    assert meta["source"]["step"] == 6 and meta["model"] == "mae_vit_tiny_patch4" and meta["img_size"] == 32
    assert sidecar_path(enc).is_file()

    # The reference: the run's full weights consolidated by DeepSpeed's zero_to_fp32.
    model = create_model("mae_vit_tiny_patch4", img_size=32)
    model.load_state_dict(final_weights(out))
    model.eval()
    ref = model.encoder_state_dict()
    assert state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in state)
    # fp32 master weights (from the optimizer shards), not the bf16 module copy
    assert any(not torch.equal(v, v.bfloat16().float()) for v in state.values())

    tm = timm.create_model(meta["timm"]["model_name"], num_classes=0, checkpoint_path=str(enc),
                           **meta["timm"]["kwargs"]).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = tm.forward_features(x), model.forward_features(x)
    assert float((got - want).abs().max() / want.abs().max()) <= FP32_RTOL

    if stage == 3:  # visualize the same run: PNG of the right size, deterministic with --seed
        png_a, png_b = tmp_path / "a.png", tmp_path / "b.png"
        vis = _tool("visualize")
        for png in (png_a, png_b):
            assert vis([str(out), "--images", shards, "--output", str(png), "--num", "5", "--seed", "3"]) == 0
        assert Image.open(png_a).size == (4 * 32, 5 * 32)
        assert png_a.read_bytes() == png_b.read_bytes()


def test_public_mae_checkpoint_initialises_a_run(shards, tmp_path):
    """A full checkpoint with the original MAE names (decoder included) starts a run via
    model.init_from; after two steps at lr 1e-6 the weights are still the file's."""
    torch.manual_seed(123)
    public = create_model("mae_vit_tiny_patch4", img_size=32)
    with torch.no_grad():
        for p in public.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "mae_pretrain_full.pth"
    torch.save({"model": public.state_dict()}, path)

    out = tmp_path / "run"
    run_train(TINY, overrides(shards, out, 2, **{"model.init_from": str(path), "optim.lr": 1e-6}))
    assert f"initialised from public MAE checkpoint {path}" in (out / "logs" / "train.log").read_text()
    weights = final_weights(out)
    expected = public.state_dict()
    assert weights.keys() == expected.keys()
    assert max(float((weights[k].detach() - expected[k]).abs().max()) for k in weights) < 1e-4
    fresh = create_model("mae_vit_tiny_patch4", img_size=32).state_dict()["decoder_pred.weight"]
    assert float((weights["decoder_pred.weight"].detach() - fresh).abs().max()) > 0.01  # not a fresh init

    enc = tmp_path / "encoder.pth"
    assert _tool("export_encoder")([str(out), "--output", str(enc)]) == 0
    state, _ = read_export(enc)
    assert all(torch.equal(state[k], weights[k]) for k in state)


def test_timm_vit_initialises_a_run_at_another_image_and_patch_size(shards, tmp_path):
    """model.init_from with a timm VisionTransformer's own .safetensors (classifier head, patch 2,
    a 16x16 grid of learned positions) starts the tiny run (patch 4, 8x8) with
    model.init_resample_patch: the head is dropped and named, the kernel resampled, the learned
    table kept and resampled, and after two steps the table is still exactly that (fixed)."""
    from safetensors.torch import save_file
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    torch.manual_seed(7)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, patch_size=2, embed_dim=64,
                            depth=2, num_heads=2, num_classes=10)
    path = tmp_path / "timm_vit_p2.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))

    out = tmp_path / "run"
    run_train(TINY, overrides(shards, out, 2, **{"model.init_from": str(path), "model.init_resample_patch": "true",
                                                 "optim.lr": 1e-6}))
    log = (out / "logs" / "train.log").read_text()
    assert "dropped 2 tensors that are not part of an MAE: head.bias, head.weight" in log
    assert "patch embedding resampled from patch 2 to 4 (model.init_resample_patch)" in log
    assert "learned table; kept as the model's fixed position table, resampled bicubically from 16x16 to 8x8" in log
    weights = {k: v.detach() for k, v in final_weights(out).items()}
    pos = resample_abs_pos_embed(vit.pos_embed.detach(), [8, 8], [16, 16], num_prefix_tokens=1,
                                 interpolation="bicubic", antialias=True)
    assert torch.allclose(weights["pos_embed"], pos, atol=1e-6)
    kernel = resample_patch_embed(vit.patch_embed.proj.weight.detach(), [4, 4], interpolation="bicubic",
                                  antialias=True)
    assert float((weights["patch_embed.proj.weight"] - kernel).abs().max()) < 1e-4
    assert float((weights["blocks.1.mlp.fc2.weight"] - vit.blocks[1].mlp.fc2.weight.detach()).abs().max()) < 1e-4
