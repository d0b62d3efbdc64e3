"""Encoder export (maescale.export, tools/export_encoder.py) and visualisation (maescale.devtools.visualize,
tools/visualize.py) on checkpoints built here: fp32 DeepSpeed-layout checkpoint directories (the
stage-0 path of ``consolidated_state_dict``) and MAE ``{"model": ...}`` files with generated
weights. Real ZeRO-1/3 runs are in tests/e2e/test_export.py."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from maescale.checkpoint import MANIFEST, file_crc32
from maescale.rundir import tag_for_step
from maescale.config import load_config
from maescale.export import (BF16_RTOL, FP32_RTOL, MIN_COSINE, ExportError, export_encoder, load_source, read_export,
                             resample_similarity, sidecar_path, smooth_images)
from maescale.models import PRESETS, MAEArch, MaskedAutoencoderViT, create_model
from maescale.devtools.visualize import VisualizeError, visualize

REPO = Path(__file__).resolve().parents[1]
TINY = "mae_vit_tiny_patch4"
# A small stand-in for ViT-H/14 (patch 14), to test the /14 -> /16 path at ViT-H's 224 px cheaply.
P14 = "test_vit_patch14"
P14_ARCH = MAEArch(14, 64, 4, 2, 32, 1, 2)


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


export_cli = _load_tool("export_encoder").main
visualize_cli = _load_tool("visualize").main


@pytest.fixture
def p14_preset(monkeypatch):
    monkeypatch.setitem(PRESETS, P14, P14_ARCH)
    return P14


def make_model(name: str = TINY, img_size: int = 32, seed: int = 0) -> MaskedAutoencoderViT:
    """An MAE with MAE's initialisation plus noise on every weight (so nothing is trivially 0 or 1)."""
    torch.manual_seed(seed)
    model = create_model(name, img_size=img_size)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def make_checkpoint(run: Path, step: int, model: MaskedAutoencoderViT, name: str = TINY, img_size: int = 32,
                    config_name: str | None = None, latest: bool = True) -> Path:
    """A checkpoint directory as CheckpointManager leaves it, for a stage-0 fp32 run: the model in
    ``mp_rank_00_model_states.pt``, trainer state, config.yaml and MANIFEST.json."""
    ckpt = run / "checkpoints" / tag_for_step(step)
    ckpt.mkdir(parents=True)
    torch.save({"module": model.state_dict()}, ckpt / "mp_rank_00_model_states.pt")
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": 1, "format": 1}))
    (ckpt / "rank_00000.json").write_text("{}")
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"model.name={config_name or name}",
                                                        f"model.img_size={img_size}", f"output_dir={run}"])
    (ckpt / "config.yaml").write_text(cfg.to_yaml())
    files = {f.name: {"size": f.stat().st_size, "crc32": file_crc32(f)} for f in sorted(ckpt.iterdir())}
    (ckpt / MANIFEST).write_text(json.dumps({"format": 1, "files": files}))
    if latest:
        (run / "checkpoints" / "latest").write_text(ckpt.name)
    return ckpt


def timm_model(path: Path) -> torch.nn.Module:
    """Exactly what a user writes: name and kwargs from the metadata, ``checkpoint_path``."""
    _, meta = read_export(path)
    return timm.create_model(meta["timm"]["model_name"], num_classes=0, checkpoint_path=str(path),
                             **meta["timm"]["kwargs"]).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.fixture
def run(tmp_path) -> tuple[Path, MaskedAutoencoderViT]:
    model = make_model()
    run = tmp_path / "run"
    make_checkpoint(run, 4, model)
    return run, model


# --------------------------------------------------------------------------------------------
# Round trip: checkpoint -> file -> timm, same features
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_export_loads_in_timm_with_same_features(run, tmp_path, suffix):
    run_dir, model = run
    out = tmp_path / "out" / f"encoder{suffix}"
    result = export_encoder(run_dir, out)
    assert out.is_file() and sidecar_path(out).is_file()
    assert listing(out.parent) == {out.name, out.name + ".json"}  # no temp files left

    state, meta = read_export(out)
    ref_state = model.encoder_state_dict()
    assert state.keys() == ref_state.keys()
    assert not any(k.startswith(("decoder", "mask_token")) for k in state)
    assert all(torch.equal(state[k], ref_state[k]) for k in state)
    tm = timm_model(out)
    assert set(tm.state_dict()) == set(state)  # exactly timm's VisionTransformer names
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(tm.forward_features(x), model.forward_features(x)) <= FP32_RTOL

    # metadata in the file and in the sidecar
    assert meta["model"] == TINY and meta["img_size"] == 32 and meta["patch_size"] == 4
    assert meta["source"]["step"] == 4 and meta["source"]["run_dir"] == str(run_dir.resolve())
    assert meta["mean"] == [0.485, 0.456, 0.406] and meta["std"] == [0.229, 0.224, 0.225]
    assert meta["maescale_version"] and meta["timm"]["model_name"] == "vit_base_patch16_224"
    side = json.loads(sidecar_path(out).read_text())
    assert {k: side[k] for k in meta} == meta
    assert side["verification"]["features_max_rel_err"] <= FP32_RTOL
    assert side["verification"]["timm_strict_load"] is True
    assert result.verification == side["verification"]
    if suffix == ".pth":
        raw = torch.load(out, weights_only=True)
        assert set(raw) == {"model", "maescale"}  # timm reads "model", ignores "maescale"


def test_vit_base_export_fits_timm_name_and_vitdet(tmp_path):
    """A ViT-B/16 export loads with nothing but timm's registered name (as the README shows) and
    fits detectron2's ViTDet ViT-B backbone (configs/COCO/mask_rcnn_vitdet_b_100ep.py). Shapes
    only: the weights are zeros and timm builds on the meta device (its strict load still checks
    every key and shape); features are compared on the tiny models above."""
    import warnings

    meta_model = create_model("mae_vit_base_patch16", img_size=224, device="meta")
    src = tmp_path / "mae_base.pth"
    torch.save({"model": {k: torch.zeros(v.shape) for k, v in meta_model.state_dict().items()}}, src)
    out = tmp_path / "vit_base.pth"
    export_encoder(src, out, verify=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "copying ... to a meta parameter is a no-op"
        timm.create_model("vit_base_patch16_224", num_classes=0, checkpoint_path=str(out), device="meta")
    state, meta = read_export(out)
    assert meta["model"] == "mae_vit_base_patch16" and meta["model_inferred"]
    check_vitdet_layout(state, embed_dim=768, depth=12, num_heads=12, patch_size=16,
                        window_block_indexes=[0, 1, 3, 4, 6, 7, 9, 10])


def test_step_selection(tmp_path):
    run = tmp_path / "run"
    old, new = make_model(seed=1), make_model(seed=2)
    make_checkpoint(run, 2, old, latest=False)
    make_checkpoint(run, 4, new)
    export_encoder(run, tmp_path / "latest.pth", verify=False)
    export_encoder(run, tmp_path / "step2.pth", step=2, verify=False)
    export_encoder(run / "checkpoints" / "step_00000002", tmp_path / "dir2.pth", verify=False)
    for name, model, step in (("latest.pth", new, 4), ("step2.pth", old, 2), ("dir2.pth", old, 2)):
        state, meta = read_export(tmp_path / name)
        assert torch.equal(state["blocks.0.attn.qkv.weight"], model.state_dict()["blocks.0.attn.qkv.weight"])
        assert meta["source"]["step"] == step
    with pytest.raises(ExportError, match=r"no checkpoint of step 3 \(steps there: 2, 4\)"):
        export_encoder(run, tmp_path / "step3.pth", step=3)


def test_bf16_export(run, tmp_path):
    run_dir, model = run
    out = tmp_path / "encoder_bf16.safetensors"
    result = export_encoder(run_dir, out, dtype="bfloat16")
    state, meta = read_export(out)
    assert meta["dtype"] == "bfloat16" and all(v.dtype == torch.bfloat16 for v in state.values())
    assert torch.equal(state["pos_embed"], model.state_dict()["pos_embed"].bfloat16())
    check = result.verification
    assert check["features_max_rel_err"] <= FP32_RTOL  # exactly the bf16 weights
    assert 0 < check["dtype_drift_max_rel_err"] <= BF16_RTOL and check["dtype_tolerance"] == BF16_RTOL
    tm = timm_model(out)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(tm.forward_features(x), model.forward_features(x)) <= BF16_RTOL


# --------------------------------------------------------------------------------------------
# Resampling for detection: --img-size, --patch-size
# --------------------------------------------------------------------------------------------


def upsampled_similarity(model: MaskedAutoencoderViT, tm: torch.nn.Module, size: int) -> dict[str, float]:
    """The stated check, computed independently: smooth images through the original model, the
    same images resized bicubically to ``size`` through the resampled timm model; cosine of
    patch tokens (average-pooled to the common grid) and of cls."""
    x = smooth_images(2, 3, model.img_size, seed=5)
    with torch.no_grad():
        a = model.forward_features(x)
        b = tm.forward_features(F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False))
    return resample_similarity(a, b)


def test_img_size_resample(run, tmp_path):
    run_dir, model = run
    out = tmp_path / "encoder_128.pth"
    result = export_encoder(run_dir, out, img_size=128)
    state, meta = read_export(out)
    assert meta["img_size"] == 128 and meta["pretrain_img_size"] == 32 and meta["resampled"]["pos_embed"]
    assert state["pos_embed"].shape == (1, 32 * 32 + 1, 64)
    assert torch.equal(state["pos_embed"][:, 0], model.pos_embed[:, 0])  # cls position kept
    assert torch.equal(state["patch_embed.proj.weight"], model.patch_embed.proj.weight)
    tm = timm_model(out)
    assert tm.patch_embed.img_size == (128, 128)
    sim = upsampled_similarity(model, tm, 128)
    assert min(sim.values()) >= MIN_COSINE, sim
    rc = result.verification["resample_check"]
    assert min(rc["patch_token_cosine_mean"], rc["cls_cosine_min"]) >= MIN_COSINE == rc["threshold"]


@pytest.mark.parametrize("img_size", [None, 256])
def test_patch_size_resample_14_to_16(p14_preset, tmp_path, img_size):
    """ViT-H/14 -> /16 as for ViTDet: at 224 px the grid goes 16x16 -> 14x14 (197 positions);
    with --img-size 256 it stays 16x16."""
    model = make_model(P14, 224)
    src = tmp_path / "mae_p14.pth"
    torch.save({"model": model.state_dict()}, src)
    out = tmp_path / "encoder_p16.pth"
    result = export_encoder(src, out, patch_size=16, img_size=img_size)
    size = img_size or 224
    state, meta = read_export(out)
    assert meta["patch_size"] == 16 and meta["pretrain_patch_size"] == 14 and meta["img_size"] == size
    assert meta["timm"]["kwargs"]["patch_size"] == 16
    assert state["patch_embed.proj.weight"].shape == (64, 3, 16, 16)
    assert state["pos_embed"].shape == (1, (size // 16) ** 2 + 1, 64)
    tm = timm_model(out)
    assert tm.patch_embed.patch_size == (16, 16) and tm.patch_embed.img_size == (size, size)
    sim = upsampled_similarity(model, tm, size)
    assert min(sim.values()) >= MIN_COSINE, sim
    assert min(result.verification["resample_check"][k] for k in ("patch_token_cosine_mean", "cls_cosine_min")) \
        >= MIN_COSINE
    # ViTDet-H (mask_rcnn_vitdet_h_75ep: patch 16, pretrain_img_size 224); with --img-size the
    # ViTDet config must say model.backbone.net.pretrain_img_size=<that size>.
    check_vitdet_layout(state, embed_dim=64, depth=4, num_heads=2, patch_size=16, window_block_indexes=[0, 1, 2],
                        pretrain_img_size=size)


def test_resample_check_catches_a_transposed_grid(run, tmp_path, monkeypatch):
    """The semantic check has teeth: a position grid resampled with rows and columns swapped fails."""
    import maescale.export as export

    real = export.resample_encoder

    def transposed(enc, **kw):
        out = real(enc, **kw)
        pos = out["pos_embed"]
        g = int((pos.shape[1] - 1) ** 0.5)
        grid = pos[:, 1:].reshape(1, g, g, -1).transpose(1, 2).reshape(1, g * g, -1)
        return {**out, "pos_embed": torch.cat([pos[:, :1], grid], dim=1)}

    monkeypatch.setattr(export, "resample_encoder", transposed)
    run_dir, _ = run
    out = tmp_path / "out" / "bad.pth"
    with pytest.raises(ExportError, match="resampled features are not close"):
        export_encoder(run_dir, out, img_size=64)
    assert listing(out.parent) == set()


def test_verification_failure_leaves_nothing(run, tmp_path, monkeypatch):
    import maescale.export as export

    real = export.save_encoder

    def corrupting(path, tensors, meta, fmt):
        tensors = dict(tensors)
        tensors["blocks.1.mlp.fc2.weight"] = tensors["blocks.1.mlp.fc2.weight"] * 1.01
        real(path, tensors, meta, fmt)

    monkeypatch.setattr(export, "save_encoder", corrupting)
    run_dir, _ = run
    out = tmp_path / "out" / "encoder.pth"
    out.parent.mkdir()
    out.write_bytes(b"previous export")
    with pytest.raises(ExportError, match="timm's features differ from maescale's"):
        export_encoder(run_dir, out, force=True)
    assert out.read_bytes() == b"previous export"  # untouched
    assert listing(out.parent) == {"encoder.pth"}


# --------------------------------------------------------------------------------------------
# Public MAE files in: full, encoder-only, our own exports
# --------------------------------------------------------------------------------------------


def test_public_mae_files_export_and_reexport(tmp_path, capsys):
    model = make_model()
    full, enc_only = tmp_path / "mae_full.pth", tmp_path / "mae_encoder.pth"
    torch.save({"model": model.state_dict()}, full)  # the original MAE names, with decoder
    torch.save({"model": model.encoder_state_dict()}, enc_only)

    assert export_cli([str(full), "--output", str(tmp_path / "a.pth")]) == 0
    printed = capsys.readouterr().out
    assert f"model preset {TINY} inferred from the weights' shapes" in printed
    assert export_cli([str(enc_only), "--output", str(tmp_path / "b.safetensors"), "--model", TINY]) == 0
    assert "inferred" not in capsys.readouterr().out
    # an export is itself an encoder-only MAE file: exporting it again changes nothing
    assert export_cli([str(tmp_path / "b.safetensors"), "--output", str(tmp_path / "c.pth")]) == 0
    a, meta_a = read_export(tmp_path / "a.pth")
    c, meta_c = read_export(tmp_path / "c.pth")
    assert meta_a["model_inferred"] and not meta_c["model_inferred"]
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)
    assert all(torch.equal(a[k], model.encoder_state_dict()[k]) for k in a)
    # a plain state dict (no "model" key) is accepted too
    torch.save(model.encoder_state_dict(), tmp_path / "plain.pth")
    assert export_cli([str(tmp_path / "plain.pth"), "--output", str(tmp_path / "d.pth")]) == 0


def test_preset_inference_errors(tmp_path):
    weird = MaskedAutoencoderViT(img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=2, decoder_embed_dim=32,
                                 decoder_depth=1, decoder_num_heads=2)
    path = tmp_path / "weird.pth"
    torch.save({"model": weird.state_dict()}, path)
    with pytest.raises(ExportError, match=r"no model preset has these shapes \(embed dim 48, depth 3.*--model"):
        load_source(path)
    with pytest.raises(ExportError, match="do not match model mae_vit_tiny_patch4"):
        load_source(path, model=TINY)
    with pytest.raises(ExportError, match="unknown model preset 'vit_nope'"):
        load_source(path, model="vit_nope")


def test_init_from_a_public_checkpoint_then_export(tmp_path):
    """A full public MAE file initialises a maescale model strictly; its encoder exports."""
    from maescale.checkpoint import load_pretrained_into

    model = make_model(seed=3)
    path = tmp_path / "mae_full.pth"
    torch.save({"model": model.state_dict()}, path)
    fresh = create_model(TINY, img_size=32)
    assert load_pretrained_into(fresh, path) == {"missing": [], "unexpected": []}
    export_encoder(path, tmp_path / "enc.pth")
    state, _ = read_export(tmp_path / "enc.pth")
    assert all(torch.equal(state[k], fresh.state_dict()[k]) for k in state)


# --------------------------------------------------------------------------------------------
# Bad inputs: a clear error (exit 2, "error: ..."), nothing left behind
# --------------------------------------------------------------------------------------------


def _truncated_pth(tmp_path: Path) -> Path:
    p = tmp_path / "truncated.pth"
    torch.save({"model": make_model().state_dict()}, p)
    p.write_bytes(p.read_bytes()[:5000])
    return p


def _truncated_checkpoint(tmp_path: Path) -> Path:
    run = tmp_path / "trunc_run"
    ckpt = make_checkpoint(run, 4, make_model())
    f = ckpt / "mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[:100])
    return run


def _mismatched_config(tmp_path: Path) -> Path:
    run = tmp_path / "mismatch_run"
    make_checkpoint(run, 4, make_model(), config_name="mae_vit_mini_patch8")
    return run


def _corrupt_latest(tmp_path: Path) -> Path:
    run = tmp_path / "corrupt_run"
    make_checkpoint(run, 2, make_model(), latest=False)
    ckpt = make_checkpoint(run, 4, make_model())
    f = ckpt / "mp_rank_00_model_states.pt"
    data = bytearray(f.read_bytes())
    data[-100] ^= 0xFF  # same size, different bytes
    f.write_bytes(bytes(data))
    return run


def _empty_run(tmp_path: Path) -> Path:
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    return tmp_path / "empty_run"


def _plain_dir(tmp_path: Path) -> Path:
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hi")
    return tmp_path / "plain"


BAD_INPUTS = {
    "missing path": (lambda t: t / "nope", [], "no such file or directory"),
    "folder without checkpoint": (_plain_dir, [], "holds no checkpoint: expected a run directory"),
    "run without checkpoints": (_empty_run, [], "holds no checkpoint"),
    "weights do not fit config": (_mismatched_config, [], r"do not match the model its config names .*"
                                                          r"mae_vit_mini_patch8.*pos_embed: weights \(1, 65, 64\)"),
    "truncated file": (_truncated_pth, [], "is not a readable torch checkpoint \\(truncated or corrupt\\?\\)"),
    "truncated checkpoint": (_truncated_checkpoint, [], "mp_rank_00_model_states.pt is 100 bytes.*truncated"),
    "format vs extension": (lambda t: make_checkpoint(t / "r", 4, make_model()), ["--format", "safetensors"],
                            "timm reads a file as safetensors exactly when"),
    "image size vs patch": (lambda t: make_checkpoint(t / "r", 4, make_model()), ["--img-size", "30"],
                            "image size 30 is not a multiple of patch size 4"),
    "missing step": (lambda t: make_checkpoint(t / "r", 4, make_model()).parent.parent, ["--step", "9"],
                     "no checkpoint of step 9"),
    "corrupt latest": (lambda t: _corrupt_latest(t), [], r"fails its CRC32 check \(corrupt\) \(--step N exports "
                                                         r"another checkpoint of the run; steps there: 2\)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_fail_clearly(tmp_path, capsys, case):
    make_source, extra, message = BAD_INPUTS[case]
    source = make_source(tmp_path)
    out_dir = tmp_path / "exports"
    out_dir.mkdir()
    rc = export_cli([str(source), "--output", str(out_dir / "encoder.pth"), *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    import re

    assert re.search(message, err), err
    assert listing(out_dir) == set()


def test_existing_output_needs_force(run, tmp_path, capsys):
    run_dir, _ = run
    out = tmp_path / "encoder.pth"
    out.write_bytes(b"keep me")
    assert export_cli([str(run_dir), "-o", str(out)]) == 2
    assert "exists; pass --force to replace it" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me" and not sidecar_path(out).exists()
    assert export_cli([str(run_dir), "-o", str(out), "--force"]) == 0
    assert read_export(out)[1]["model"] == TINY
    assert listing(tmp_path) == {"run", "encoder.pth", "encoder.pth.json"}


def test_cli_runs_as_a_script(run, tmp_path):
    run_dir, _ = run
    out = tmp_path / "encoder.safetensors"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "export_encoder.py"), str(run_dir), "--output",
                           str(out), "--dtype", "bfloat16"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "verified: timm features within" in proc.stdout and "timm.create_model('vit_base_patch16_224'" in proc.stdout
    assert read_export(out)[1]["dtype"] == "bfloat16"


# --------------------------------------------------------------------------------------------
# detectron2 / ViTDet layout
# --------------------------------------------------------------------------------------------


def vitdet_model_shapes(embed_dim: int, depth: int, num_heads: int, patch_size: int, window_block_indexes,
                        img_size: int = 1024, pretrain_img_size: int = 224, window_size: int = 14,
                        mlp_ratio: float = 4.0, in_chans: int = 3, fpn_channels: int = 256) -> dict[str, tuple]:
    """Parameter names and shapes of a ViTDet model's backbone, written down from detectron2
    (facebookresearch/detectron2, ``detectron2/modeling/backbone/vit.py``):

    * ``ViT``: ``patch_embed.proj`` (a Conv2d of kernel = stride = patch), ``pos_embed`` of shape
      (1, (pretrain_img_size // patch) ** 2 + 1, D) with ``pretrain_use_cls_token=True`` (the
      default; ``get_abs_pos`` drops the cls position and resizes the grid at run time),
      ``blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`` and, with
      ``use_rel_pos=True`` (ViTDet's configs), ``attn.rel_pos_h/w`` of (2 * size - 1, head dim),
      size = window_size in window blocks, img_size // patch in global ones. No cls_token, no
      final norm.
    * ``SimpleFeaturePyramid`` holds it as ``net`` and is ``model.backbone``: prefix
      ``backbone.net.``; its own ``simfp_*`` convs carry LayerNorms named ``...norm.weight``
      with ``out_channels`` (256) entries, which a ``norm.weight`` in a checkpoint suffix-matches.

    Defaults follow ``configs/common/models/mask_rcnn_vitdet.py`` (img_size 1024, patch 16,
    window 14, mlp_ratio 4, use_rel_pos, scale factors (4, 2, 1, 0.5), 256 channels).
    """
    d, hidden, head_dim = embed_dim, int(embed_dim * mlp_ratio), embed_dim // num_heads
    net: dict[str, tuple] = {
        "patch_embed.proj.weight": (d, in_chans, patch_size, patch_size),
        "patch_embed.proj.bias": (d,),
        "pos_embed": (1, (pretrain_img_size // patch_size) ** 2 + 1, d),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        size = window_size if i in window_block_indexes else img_size // patch_size
        net.update({
            b + "norm1.weight": (d,), b + "norm1.bias": (d,),
            b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "attn.rel_pos_h": (2 * size - 1, head_dim), b + "attn.rel_pos_w": (2 * size - 1, head_dim),
            b + "norm2.weight": (d,), b + "norm2.bias": (d,),
            b + "mlp.fc1.weight": (hidden, d), b + "mlp.fc1.bias": (hidden,),
            b + "mlp.fc2.weight": (d, hidden), b + "mlp.fc2.bias": (d,),
        })
    shapes = {"backbone.net." + k: v for k, v in net.items()}
    # SimpleFeaturePyramid's Conv2d(..., norm=LN) layers: simfp_2 (x4): 4, 5; simfp_3 (x2): 1, 2;
    # simfp_4 (x1): 0, 1; simfp_5 (x0.5): 1, 2.
    for stage, idx in ((2, (4, 5)), (3, (1, 2)), (4, (0, 1)), (5, (1, 2))):
        for i in idx:
            for p in ("weight", "bias"):
                shapes[f"backbone.simfp_{stage}.{i}.norm.{p}"] = (fpn_channels,)
    return shapes


def detectron2_match(model_shapes: dict[str, tuple], ckpt: dict[str, torch.Tensor]):
    """detectron2's ``align_and_update_state_dicts`` (``detectron2/checkpoint/c2_model_loading.py``),
    which ``DetectionCheckpointer`` applies to every non-.pkl file (``matching_heuristics``): each
    model key takes the longest checkpoint key equal to it or a '.'-suffix of it; a shape mismatch
    is skipped with a warning; one checkpoint key feeding two model keys is an error."""
    loaded, skipped, used = {}, [], {}
    for mk in sorted(model_shapes):
        cands = [ck for ck in ckpt if mk == ck or mk.endswith("." + ck)]
        if not cands:
            continue
        ck = max(cands, key=len)
        if tuple(ckpt[ck].shape) != tuple(model_shapes[mk]):
            skipped.append((mk, ck))
            continue
        assert ck not in used, f"detectron2 would fail: {ck} matches {used[ck]} and {mk}"
        used[ck] = mk
        loaded[mk] = ck
    return loaded, skipped


def check_vitdet_layout(state: dict[str, torch.Tensor], **vit_args) -> None:
    shapes = vitdet_model_shapes(**vit_args)
    loaded, skipped = detectron2_match(shapes, state)
    backbone = {k for k in shapes if k.startswith("backbone.net.")}
    zero_init = {k for k in backbone if ".rel_pos_" in k}  # not in MAE checkpoints; ViTDet zero-inits them
    assert set(loaded) == backbone - zero_init, sorted(backbone - zero_init - set(loaded))[:5]
    assert all(loaded[k] == k[len("backbone.net."):] for k in loaded)
    assert {ck for _, ck in skipped} <= {"norm.weight", "norm.bias"}  # final norm vs FPN norms: shape differs
    assert set(state) - set(loaded.values()) == {"cls_token", "norm.weight", "norm.bias"}


# --------------------------------------------------------------------------------------------
# Visualize
# --------------------------------------------------------------------------------------------


def write_images(folder: Path, count: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        w, h = rng.integers(30, 60, 2)
        arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img{i:02d}.{'png' if i % 2 else 'jpg'}")
    return folder


def test_visualize_png_size_and_determinism(run, tmp_path):
    run_dir, _ = run
    images = write_images(tmp_path / "images", 5)
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    assert visualize_cli([str(run_dir), "--images", str(images), "--output", str(a), "--num", "3", "--seed", "7"]) == 0
    visualize(run_dir, images, b, num=3, seed=7)
    visualize(run_dir, images, c, num=3, seed=8)
    assert Image.open(a).size == (4 * 32, 3 * 32)  # 4 columns x N rows of img_size
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    grid = np.asarray(Image.open(a))
    # column 1 of row 0 is the original image, center-cropped and resized
    from maescale.devtools.visualize import center_crop_resize

    expected = center_crop_resize(Image.open(images / "img00.jpg"), 32).permute(1, 2, 0).numpy()
    assert np.abs(grid[:32, :32].astype(int) - expected.astype(int)).max() <= 1
    # column 2 shows exactly 75% of the patches grey (the default mask ratio)
    masked = grid[:32, 32:64].reshape(8, 4, 8, 4, 3).transpose(0, 2, 1, 3, 4).reshape(64, -1)
    grey = (masked == 128).all(axis=1)
    assert grey.sum() == 48
    r = visualize(run_dir, images, tmp_path / "d.png", num=10, mask_ratio=0.5)  # only 5 images exist
    assert (r.height, r.width) == (5 * 32, 4 * 32) and r.mask_ratio == 0.5


def test_visualize_from_shards_and_full_mae_file(tmp_path):
    from tests.helpers import write_shards

    pattern = write_shards(tmp_path / "shards", num_images=10, per_shard=4, size=40)
    model = make_model()
    full = tmp_path / "mae_full.pth"
    torch.save({"model": model.state_dict()}, full)
    r1 = visualize(full, pattern, tmp_path / "a.png", num=6, seed=1)
    r2 = visualize(full, tmp_path / "shards", tmp_path / "b.png", num=6, seed=1)  # a folder of shards
    assert (r1.height, r1.width) == (6 * 32, 128) and len(r1.images) == 6
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert r1.images[4].endswith("shard-000001.tar:img000004")


def test_visualize_errors(tmp_path, run, capsys):
    run_dir, model = run
    enc = tmp_path / "enc.pth"
    torch.save({"model": model.encoder_state_dict()}, enc)
    images = write_images(tmp_path / "images", 2)
    with pytest.raises(VisualizeError, match="encoder only"):
        visualize(enc, images, tmp_path / "x.png")
    with pytest.raises(VisualizeError, match="matches no files"):
        visualize(run_dir, tmp_path / "nothing-*.tar", tmp_path / "x.png")
    with pytest.raises(VisualizeError, match="--mask-ratio"):
        visualize(run_dir, images, tmp_path / "x.png", mask_ratio=1.0)
    assert visualize_cli([str(tmp_path / "nope"), "--images", str(images), "-o", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "x.png").exists()
