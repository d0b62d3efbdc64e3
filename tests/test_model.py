"""MaskedAutoencoderViT: masking, loss, patchify, attention kernels, checkpointing, timm fit."""

from __future__ import annotations

import pytest
import timm
import torch

from maescale.models import PRESETS, create_model, timm_encoder_kwargs
from maescale.models.mae import AttentionUnavailableError, MaskedAutoencoderViT, sincos_2d


def tiny(**kw) -> MaskedAutoencoderViT:
    torch.manual_seed(0)
    return create_model("mae_vit_tiny_patch4", img_size=kw.pop("img_size", 32), **kw)


# ---------------------------------------------------------------- masking
def test_masking_keeps_exact_count_and_is_consistent():
    m = tiny()
    n, length, dim = 5, 64, 8
    x = torch.randn(n, length, dim)
    for ratio in (0.5, 0.75, 0.9, 0.33):
        vis, mask, ids_restore = m.random_masking(x, ratio)
        keep = int(length * (1 - ratio))
        assert vis.shape == (n, keep, dim)
        assert torch.equal(mask.sum(1), torch.full((n,), float(length - keep)))
        # the visible tokens are exactly the rows of x where mask == 0, in some order
        for i in range(n):
            kept_rows = x[i][mask[i] == 0]
            assert torch.equal(torch.sort(vis[i].sum(1)).values, torch.sort(kept_rows.sum(1)).values)
        # ids_restore is a permutation; unshuffling the kept-first sequence restores order
        ids_shuffle = torch.argsort(ids_restore, dim=1)
        assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(length).expand(n, -1))


def test_masks_differ_between_samples_and_fixed_noise_fixes_them():
    m = tiny()
    x = torch.randn(4, 64, 8)
    _, mask, _ = m.random_masking(x, 0.75)
    assert len({tuple(r.tolist()) for r in mask}) == 4
    noise = torch.rand(4, 64)
    _, m1, r1 = m.random_masking(x, 0.75, noise=noise)
    _, m2, r2 = m.random_masking(x, 0.75, noise=noise.clone())
    assert torch.equal(m1, m2) and torch.equal(r1, r2)
    # lowest noise is kept
    assert torch.equal(m1[0] == 0, noise[0] <= noise[0].sort().values[15])


def test_masking_rejects_wrong_noise_shape():
    with pytest.raises(ValueError, match="noise must have shape"):
        tiny().random_masking(torch.randn(2, 64, 8), 0.75, noise=torch.rand(2, 63))


# ---------------------------------------------------------------- patches and loss
@pytest.mark.parametrize("chans", [1, 3, 4])
def test_patchify_unpatchify_inverse(chans):
    m = tiny(in_chans=chans)
    imgs = torch.randn(2, chans, 32, 32)
    p = m.patchify(imgs)
    assert p.shape == (2, 64, 16 * chans)
    assert torch.equal(m.unpatchify(p), imgs)
    # patch 0 is the top-left 4x4 block, pixel order (row, col, channel)
    assert torch.equal(p[0, 0], imgs[0, :, :4, :4].permute(1, 2, 0).reshape(-1))


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_only_on_masked_patches(norm_pix):
    m = tiny(norm_pix_loss=norm_pix)
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 64)
    loss, pred, mask = m(imgs, noise=noise)
    visible = mask == 0
    pred2 = pred.detach().clone()
    pred2[visible] += 100.0  # change predictions on visible patches only
    assert torch.allclose(m.forward_loss(imgs, pred2, mask), loss)
    pred3 = pred.detach().clone()
    pred3[~visible] += 1.0
    assert not torch.allclose(m.forward_loss(imgs, pred3, mask), loss)
    # reference computation
    target = m.patchify(imgs)
    if norm_pix:
        mu, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mu) / (var + 1e-6) ** 0.5
    ref = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    assert torch.allclose(loss, ref, rtol=1e-6)


def test_reconstruct_undoes_norm_pix():
    m = tiny()
    imgs = torch.randn(2, 3, 32, 32)
    target = m.patch_targets(imgs)  # normalised targets: a perfect prediction
    assert torch.allclose(m.reconstruct(imgs, target), imgs, atol=1e-4)


def test_any_image_size_and_bad_size():
    m = create_model("mae_vit_tiny_patch4", img_size=48, in_chans=1)
    loss, pred, mask = m(torch.randn(2, 1, 48, 48))
    assert pred.shape == (2, 144, 16) and mask.shape == (2, 144)
    with pytest.raises(ValueError, match="not divisible"):
        create_model("mae_vit_tiny_patch4", img_size=30)


# ---------------------------------------------------------------- kernels and checkpointing
def test_sdpa_and_math_agree():
    m = tiny()
    imgs = torch.randn(3, 3, 32, 32)
    noise = torch.rand(3, 64)
    loss_sdpa, pred_sdpa, _ = m(imgs, noise=noise)
    m.set_attn_impl("math")
    loss_math, pred_math, _ = m(imgs, noise=noise)
    assert torch.allclose(pred_sdpa, pred_math, atol=1e-5, rtol=1e-5)
    assert torch.allclose(loss_sdpa, loss_math, atol=1e-6, rtol=1e-6)


def test_flash_backends_fail_clearly_on_cpu():
    m = tiny(attn_impl="flash")
    with pytest.raises(AttentionUnavailableError, match="needs CUDA tensors"):
        m(torch.randn(1, 3, 32, 32))
    m.set_attn_impl("flash_attn")
    with pytest.raises(AttentionUnavailableError, match="flash_attn"):
        m(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_same_loss_and_grads(every):
    ref = tiny()
    ck = tiny(act_ckpt_every=every)
    ck.load_state_dict(ref.state_dict())
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    l1, _, _ = ref(imgs, noise=noise)
    l2, _, _ = ck(imgs, noise=noise)
    l1.backward()
    l2.backward()
    assert torch.equal(l1, l2)
    for (n1, p1), (_, p2) in zip(ref.named_parameters(), ck.named_parameters()):
        assert torch.allclose(p1.grad, p2.grad, atol=1e-7), n1


# ---------------------------------------------------------------- init, names, presets
def test_initialisation_follows_mae_release():
    m = create_model("mae_vit_base_patch16", img_size=64)
    assert torch.allclose(m.pos_embed[0], sincos_2d(768, 4))
    assert torch.all(m.pos_embed[0, 0] == 0)
    assert not any(n in dict(m.named_parameters()) for n in ("pos_embed", "decoder_pos_embed"))
    assert abs(m.cls_token.std().item() - 0.02) < 0.004 and abs(m.mask_token.std().item() - 0.02) < 0.004
    w = m.blocks[0].attn.qkv.weight
    bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound  # xavier-uniform
    assert torch.all(m.blocks[0].attn.qkv.bias == 0)
    pw = m.patch_embed.proj.weight
    pbound = (6 / (pw.shape[0] + pw[0].numel())) ** 0.5
    assert pw.abs().max() <= pbound and pw.abs().max() > 0.9 * pbound
    assert torch.all(m.norm.weight == 1) and torch.all(m.norm.bias == 0)


def test_sincos_matches_mae_formula():
    # MAE: emb = [sin/cos of column index on first half, sin/cos of row index on second half]
    emb = sincos_2d(8, 3, cls_token=False)
    omega = 1.0 / 10000 ** (torch.arange(2, dtype=torch.float64) / 2.0)
    row, col = 1, 2  # patch index 5
    expected = torch.cat([torch.sin(col * omega), torch.cos(col * omega), torch.sin(row * omega), torch.cos(row * omega)])
    assert torch.allclose(emb[5].double(), expected, atol=1e-6)


MAE_RELEASE_KEYS = [
    "cls_token", "pos_embed", "mask_token", "decoder_pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
    "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight",
    "blocks.0.norm2.bias", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias", "norm.weight", "norm.bias",
    "decoder_embed.weight", "decoder_blocks.0.attn.qkv.weight", "decoder_norm.weight", "decoder_pred.weight",
    "decoder_pred.bias",
]


def test_parameter_names_are_the_mae_release_names():
    keys = set(tiny().state_dict())
    assert set(MAE_RELEASE_KEYS) <= keys
    assert all(k.split(".")[0] in {"cls_token", "pos_embed", "mask_token", "decoder_pos_embed", "patch_embed",
                                   "blocks", "norm", "decoder_embed", "decoder_blocks", "decoder_norm",
                                   "decoder_pred"} for k in keys)


# Known encoder sizes (timm's VisionTransformer with num_classes=0).
KNOWN_ENCODER_PARAMS = {
    "mae_vit_base_patch16": 85.8e6,
    "mae_vit_large_patch16": 303.3e6,
    "mae_vit_huge_patch14": 630.8e6,
    "mae_vit_giant_patch14": 1011.2e6,
}


@pytest.mark.parametrize("name", sorted(KNOWN_ENCODER_PARAMS))
def test_preset_sizes_and_timm_layout(name):
    m = create_model(name, device="meta")
    enc = m.encoder_state_dict()
    count = sum(v.numel() for v in enc.values())
    assert abs(count - KNOWN_ENCODER_PARAMS[name]) / KNOWN_ENCODER_PARAMS[name] < 0.005
    timm_name, kw = timm_encoder_kwargs(name, 224)
    t = timm.create_model(timm_name, num_classes=0, device="meta", **kw)
    tsd = t.state_dict()
    assert set(enc) == set(tsd)
    assert all(enc[k].shape == tsd[k].shape for k in enc)
    dec = sum(v.numel() for k, v in m.state_dict().items() if k not in enc)
    assert 25e6 < dec < 28e6  # 8 x 512-wide blocks + embed/pred, as in the paper


@pytest.mark.parametrize("name,img", [("mae_vit_tiny_patch4", 32), ("mae_vit_base_patch16", 64)])
def test_encoder_loads_strictly_into_timm_with_same_features(name, img):
    torch.manual_seed(1)
    m = create_model(name, img_size=img).eval()
    timm_name, kw = timm_encoder_kwargs(name, img)
    t = timm.create_model(timm_name, num_classes=0, pretrained=False, **kw).eval()
    t.load_state_dict(m.encoder_state_dict(), strict=True)
    x = torch.randn(2, 3, img, img)
    with torch.no_grad():
        ours = m.forward_features(x)
        theirs = t.forward_features(x)
        pooled = t(x)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)
    assert torch.allclose(ours[:, 0], pooled, atol=1e-5, rtol=1e-5)


def test_mae_release_checkpoint_loads_strictly():
    # A checkpoint in the original release's layout: {"model": state_dict with MAE names}.
    src = tiny()
    ckpt = {"model": {k: v.clone() for k, v in src.state_dict().items()}}
    dst = create_model("mae_vit_tiny_patch4", img_size=32)
    dst.load_state_dict(ckpt["model"], strict=True)
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))


def test_presets_cover_paper_sizes_and_beyond():
    assert {"mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14", "mae_vit_giant_patch14"} <= set(PRESETS)
    h = PRESETS["mae_vit_huge_patch14"]
    assert (h.patch_size, h.embed_dim, h.depth, h.num_heads) == (14, 1280, 32, 16)
    assert (h.decoder_embed_dim, h.decoder_depth, h.decoder_num_heads) == (512, 8, 16)


# ---------------------------------------------------------------- training sanity
def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    m = create_model("mae_vit_tiny_patch4", img_size=32)
    # smooth images (structure to inpaint), fixed noise so the same patches are hidden
    xs = torch.linspace(0, 1, 32)
    imgs = torch.stack([torch.stack([torch.sin(6.28 * (a * xs[:, None] + b * xs[None, :]))
                                     for a, b in ((1, 0), (0, 1), (1, 1))]) for _ in range(1)] * 4)
    imgs = imgs + 0.05 * torch.randn_like(imgs)
    noise = torch.rand(4, 64)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3, betas=(0.9, 0.95))
    first = None
    for step in range(300):
        loss, _, _ = m(imgs, noise=noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first / 5, (first, loss.item())


def test_regional_compile_keeps_parameter_names():
    m = tiny()
    keys = list(m.state_dict())
    m.compile_blocks()
    assert list(m.state_dict()) == keys  # checkpoints and exports keep the MAE/timm names


# ---------------------------------------------------------------- packed qkv layout
def _timm_attention_twin(m: MaskedAutoencoderViT) -> MaskedAutoencoderViT:
    """The same model with timm's own ``Attention`` (permute(2, 0, 3, 1, 4).unbind(0)) in every block."""
    import copy

    from timm.layers import Attention

    twin = copy.deepcopy(m)
    for blk in [*twin.blocks, *twin.decoder_blocks]:
        blk.attn.__class__ = Attention
    return twin


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_packed_qkv_layout_same_outputs_grads_and_names_as_timm(impl):
    m = tiny(attn_impl=impl)
    ref = _timm_attention_twin(m)
    if impl == "math":
        for blk in [*ref.blocks, *ref.decoder_blocks]:
            blk.attn.fused_attn = False
    assert list(m.state_dict()) == list(ref.state_dict())
    imgs, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 64)
    loss, pred, _ = m(imgs, noise=noise)
    loss_ref, pred_ref, _ = ref(imgs, noise=noise)
    loss.backward()
    loss_ref.backward()
    assert torch.allclose(pred, pred_ref, atol=1e-6, rtol=1e-5)
    grads, grads_ref = dict(m.named_parameters()), dict(ref.named_parameters())
    for name, p in grads.items():
        assert torch.allclose(p.grad, grads_ref[name].grad, atol=1e-6, rtol=1e-5), name


def _backward_ops(attn: torch.nn.Module, x: torch.Tensor) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    y = attn(x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        y.backward(torch.ones_like(y))
    return [e.name for e in prof.events() if e.name.startswith("aten::")]


def test_packed_qkv_backward_drops_the_copy_after_the_stack():
    """Eager backward of one attention layer, by aten op names: timm's layout stacks dq/dk/dv into
    (3, B, H, N, D) and copies that into the (B, N, 3C) layout the qkv linear needs (clone); ours
    stacks straight into that layout, so only the stack is left (no SDPA backend writes packed grads)."""
    from timm.layers import Attention

    from maescale.models.mae import MAEAttention

    torch.manual_seed(0)
    ours = MAEAttention(64, num_heads=4, qkv_bias=True)
    timm_attn = Attention(64, num_heads=4, qkv_bias=True)
    timm_attn.load_state_dict(ours.state_dict())
    x = torch.randn(2, 17, 64, requires_grad=True)
    ops, ops_timm = _backward_ops(ours, x), _backward_ops(timm_attn, x)
    assert "aten::stack" in ops_timm and "aten::clone" in ops_timm
    assert "aten::stack" in ops and "aten::clone" not in ops and "aten::copy_" not in ops, ops
    assert len(ops) < len(ops_timm)


def test_full_regions_compile_marks_every_block_and_keeps_names(monkeypatch):
    """model.compile=full_regions: the whole forward compiled, each block one nested compile region
    (the same function for all blocks, so it is traced once per block shape). Compile time measured
    on CPU: bench/compile_time_cpu.json."""
    from maescale.models import mae

    m = tiny()
    keys = list(m.state_dict())
    m.compile_model("full_regions")
    assert list(m.state_dict()) == keys
    regions = {blk.forward.__func__ for blk in [*m.blocks, *m.decoder_blocks]}
    assert regions == {mae._block_region()}

    mae._block_region.cache_clear()
    monkeypatch.delattr(torch.compiler, "nested_compile_region")
    with pytest.raises(RuntimeError, match="model.compile=full_regions needs torch.compiler.nested_compile_region"):
        tiny().compile_model("full_regions")
    mae._block_region.cache_clear()
