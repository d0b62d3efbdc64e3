"""maescale.devtools.kernel_check on a CPU: call sites, linear shapes, and the compiled block's kernels."""

from __future__ import annotations

import pytest

from maescale.devtools.kernel_check import attention_sites, block_kernels, linear_shapes


def test_vit_huge_call_sites_and_shapes():
    assert attention_sites("mae_vit_huge_patch14") == [
        {"site": "encoder", "heads": 16, "head_dim": 80, "tokens": 65},
        {"site": "decoder", "heads": 16, "head_dim": 32, "tokens": 257}]
    shapes = {(s["site"], s["in"], s["out"]): (s["tokens"], s["layers"]) for s in linear_shapes("mae_vit_huge_patch14")}
    assert shapes[("encoder", 1280, 3840)] == (65, 32) and shapes[("encoder", 5120, 1280)] == (65, 32)
    assert shapes[("decoder", 1280, 512)] == (65, 1)  # decoder_embed: the encoder's tokens
    assert shapes[("decoder", 512, 588)] == (257, 1) and shapes[("decoder", 512, 2048)] == (257, 8)


@pytest.mark.slow
def test_compiled_block_fuses_norms_residuals_and_gelu():
    """What inductor fuses in one block (here the CPU backend; the GPU check lists the GPU's)."""
    doc = block_kernels("mae_vit_tiny_patch4", 2, img_size=32, device="cpu")
    fwd = doc["forward"]["kernels"]
    assert any("add" in k and "layer_norm" in k for k in fwd), fwd  # residual add + the next norm: one kernel
    assert any("gelu" in k for k in fwd) and len(fwd) <= 5, fwd
    assert sum("mm" in e for e in doc["forward"]["extern"]) == 4  # qkv, proj, fc1, fc2 stay GEMM calls
    assert any("stack" in k for k in doc["backward"]["kernels"])  # dq/dk/dv: one copy left (see MAEAttention)
