"""Analytic FLOP accounting of MAE pretraining, peak-FLOP/s table and MFU.

What is counted (a multiply-add is 2 FLOPs), per image, for a forward pass:

* patch embedding: a ``p*p*C -> D`` linear map on **all** ``L`` patches (it runs before masking);
* encoder: ``depth`` blocks on ``Ne = int(L * (1 - mask_ratio)) + 1`` tokens (visible + cls);
* ``decoder_embed`` (``D -> Dd``) on the ``Ne`` encoder outputs;
* decoder: ``decoder_depth`` blocks on ``Nd = L + 1`` tokens; ``decoder_pred`` (``Dd -> p*p*C``).

A block on ``N`` tokens of width ``d`` with MLP width ``h = int(d * mlp_ratio)`` costs
``2 * N * (3d^2 + d^2 + 2*d*h)`` in its linear layers (qkv, proj, fc1, fc2) and ``4 * N^2 * d``
in attention (``Q K^T`` and ``A V``, each ``N^2 * d`` multiply-adds summed over heads).

Not counted, as in every MFU convention (and as ``torch.utils.flop_counter`` does not count them
either): LayerNorm, GELU, softmax, scaling, residual adds, bias adds, position embeddings,
masking/gather, and the loss. They are memory-bound and well under 1% of the matmul FLOPs.

Training FLOPs (*model FLOPs*, the numerator of MFU) are forward + backward, the backward costing
twice the forward (a gradient for the input and one for the weight of every matmul; two matmuls
per attention matmul), **except** the patch embedding, whose input is the pixels: it needs no input
gradient, so its backward costs 1x, not 2x. This is the exact count of the matmul work the math
requires (:func:`torch.utils.flop_counter.FlopCounterMode` gives the same number on a real step),
and it is ``3 * forward - patch_embed_forward``: for ViT-H/14 at 224 the difference from a plain
``3 x forward`` is 0.39 GFLOPs (0.13%).

*Hardware FLOPs* add what the implementation recomputes: with activation checkpointing every
``k``-th block (the model's ``act_ckpt_every=k``), the forward of each checkpointed block runs
again in backward, up to its last saved tensor (see :func:`train_flops_per_image`). FlashAttention's own recomputation of ``Q K^T`` inside its backward kernel is
not added (it is a kernel detail, as in the PaLM/Megatron MFU conventions).

The issue's figure for ViT-H/14 at 224 px, mask ratio 0.75, 8 x 512 decoder was "about 291
GFLOPs per image per training step". This count gives 97.12 GFLOPs forward (encoder 82.87 of
which patch embedding 0.39; decoder 14.26; attention matmuls 1.77), 3 x forward = 291.37, and
290.99 model FLOPs with the patch-embedding correction: the same figure to 0.1%. The encoder's 32
blocks on 65 tokens are 85% of it. With checkpointing of every block the hardware FLOPs are
355.9 GFLOPs (+22%; 387.5, +33%, when whole blocks are recomputed). ``python -m maescale.flops`` prints the breakdown of every preset.

Checked against ``torch.utils.flop_counter.FlopCounterMode`` on real forward/backward steps
(``tests/test_flops.py``): identical counts with ``attn_impl="math"``. With ``sdpa`` on CPU the
counter misses attention entirely (torch 2.14 registers formulas for the CUDA flash /
memory-efficient / cuDNN SDPA kernels, not for ``_scaled_dot_product_flash_attention_for_cpu``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from maescale.models.presets import PRESETS, MAEArch

__all__ = [
    "FlopBreakdown", "mae_flops_per_image", "train_flops_per_image", "block_flops",
    "peak_flops", "mfu", "PEAK_TFLOPS", "num_ckpt_blocks",
]


@dataclass(frozen=True)
class FlopBreakdown:
    """FLOPs of one image (2 per multiply-add); every field is a float count, not a rate.

    ``forward`` = ``encoder + decoder``; ``encoder`` includes the patch embedding, ``decoder``
    includes ``decoder_embed`` and ``decoder_pred``. ``attention`` is the ``QK^T``/``AV`` part of
    both; ``linear`` all the rest (``forward = linear + attention``). ``backward`` and
    ``train`` (= forward + backward, the model FLOPs of one training step) follow the module doc.
    """

    img_size: int
    mask_ratio: float
    num_patches: int
    encoder_tokens: int  # visible patches + cls
    decoder_tokens: int  # all patches + cls
    patch_embed: float
    encoder_block: float  # one encoder block (linear + attention)
    encoder_blocks: float  # all encoder blocks
    encoder_attention: float
    decoder_embed: float
    decoder_block: float  # one decoder block
    decoder_blocks: float
    decoder_attention: float
    decoder_pred: float
    encoder: float
    decoder: float
    attention: float
    linear: float
    forward: float
    backward: float
    train: float

    def as_dict(self) -> dict:
        return asdict(self)


def block_flops(tokens: int, dim: int, mlp_ratio: float) -> tuple[float, float]:
    """Forward FLOPs of one transformer block: ``(linear, attention)``."""
    hidden = int(dim * mlp_ratio)  # as timm's Block
    linear = 2.0 * tokens * (3 * dim * dim + dim * dim + 2 * dim * hidden)
    attention = 4.0 * tokens * tokens * dim
    return linear, attention


def _encoder_tokens(num_patches: int, mask_ratio: float) -> int:
    return int(num_patches * (1 - mask_ratio)) + 1  # as MaskedAutoencoderViT.random_masking


def mae_flops_per_image(arch: MAEArch, img_size: int = 224, mask_ratio: float = 0.75,
                        in_chans: int = 3) -> FlopBreakdown:
    """Forward/backward FLOPs of one image through the MAE (see the module docstring)."""
    if img_size % arch.patch_size:
        raise ValueError(f"img_size {img_size} is not divisible by patch_size {arch.patch_size}")
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    L = (img_size // arch.patch_size) ** 2
    patch_dim = arch.patch_size**2 * in_chans
    ne, nd = _encoder_tokens(L, mask_ratio), L + 1
    D, Dd = arch.embed_dim, arch.decoder_embed_dim

    patch_embed = 2.0 * L * patch_dim * D
    enc_lin, enc_att = block_flops(ne, D, arch.mlp_ratio)
    dec_lin, dec_att = block_flops(nd, Dd, arch.mlp_ratio)
    decoder_embed = 2.0 * ne * D * Dd
    decoder_pred = 2.0 * nd * Dd * patch_dim

    encoder_blocks = arch.depth * (enc_lin + enc_att)
    decoder_blocks = arch.decoder_depth * (dec_lin + dec_att)
    encoder = patch_embed + encoder_blocks
    decoder = decoder_embed + decoder_blocks + decoder_pred
    forward = encoder + decoder
    attention = arch.depth * enc_att + arch.decoder_depth * dec_att
    # Backward: 2x forward for every matmul, but the patch embedding gets no input gradient
    # (its input is the pixels), only a weight gradient: 1x its forward.
    backward = 2.0 * forward - patch_embed
    return FlopBreakdown(
        img_size=img_size, mask_ratio=mask_ratio, num_patches=L, encoder_tokens=ne, decoder_tokens=nd,
        patch_embed=patch_embed,
        encoder_block=enc_lin + enc_att, encoder_blocks=encoder_blocks, encoder_attention=arch.depth * enc_att,
        decoder_embed=decoder_embed,
        decoder_block=dec_lin + dec_att, decoder_blocks=decoder_blocks,
        decoder_attention=arch.decoder_depth * dec_att, decoder_pred=decoder_pred,
        encoder=encoder, decoder=decoder, attention=attention, linear=forward - attention,
        forward=forward, backward=backward, train=forward + backward,
    )


def num_ckpt_blocks(depth: int, act_ckpt_every: int) -> int:
    """How many of ``depth`` blocks the model checkpoints (blocks ``i`` with ``i % k == 0``)."""
    return 0 if act_ckpt_every <= 0 else len(range(0, depth, act_ckpt_every))


def train_flops_per_image(arch: MAEArch, img_size: int = 224, mask_ratio: float = 0.75,
                          act_ckpt_every: int = 0, early_stop: bool = True) -> tuple[float, float]:
    """``(model_flops, hardware_flops)`` of one image in one training step.

    ``model_flops`` is forward + backward (use it for MFU); ``hardware_flops`` adds the forward of
    the checkpointed blocks, recomputed in backward when ``act_ckpt_every = k > 0`` (the model
    applies the same ``k`` to encoder and decoder blocks; MFU ignores it, HFU counts it).

    ``early_stop``: PyTorch's non-reentrant checkpoint (what the model uses) stops recomputing
    once every tensor saved for backward is back (``torch.utils.checkpoint.set_checkpoint_early_stop``,
    on by default). A block's last matmul, ``fc2``, saves its input before it runs, and its output
    is saved by nobody, so it is not rerun: the recompute is the block forward minus ``fc2``.
    ``FlopCounterMode`` on a real step agrees exactly. ``early_stop=False`` counts the whole
    block forward (reentrant checkpointing, e.g. DeepSpeed's).
    """
    f = mae_flops_per_image(arch, img_size, mask_ratio)
    enc_re, dec_re = f.encoder_block, f.decoder_block
    if early_stop:
        enc_re -= 2.0 * f.encoder_tokens * arch.embed_dim * int(arch.embed_dim * arch.mlp_ratio)
        dec_re -= 2.0 * f.decoder_tokens * arch.decoder_embed_dim * int(arch.decoder_embed_dim * arch.mlp_ratio)
    recompute = (num_ckpt_blocks(arch.depth, act_ckpt_every) * enc_re
                 + num_ckpt_blocks(arch.decoder_depth, act_ckpt_every) * dec_re)
    return f.train, f.train + recompute


# --------------------------------------------------------------------------------------------
# Peak FLOP/s by device name
# --------------------------------------------------------------------------------------------

# Dense (no 2:4 sparsity) tensor-core peak, TFLOP/s per GPU, from the vendors' datasheets.
# First match wins, so specific names come before general ones. Columns: bf16 (= fp16), tf32,
# fp32 (non-tensor-core).
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    (r"gh200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"h200.*nvl", {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    (r"h200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM; same SMs/clock as H100 SXM
    (r"h100.*nvl", {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    (r"h100.*pcie", {"bf16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    (r"h100", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # "NVIDIA H100 80GB HBM3" = SXM5
    (r"h800.*pcie", {"bf16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    (r"h800", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"h20\b", {"bf16": 148.0, "tf32": 74.0, "fp32": 44.0}),
    (r"gb200", {"bf16": 2500.0, "tf32": 1250.0, "fp32": 80.0}),
    (r"b200", {"bf16": 2250.0, "tf32": 1100.0, "fp32": 80.0}),
    (r"a100|a800", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"l40s", {"bf16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    (r"\bl4\b", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"a10g", {"bf16": 70.0, "tf32": 35.0, "fp32": 31.2}),
    (r"\ba10\b", {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"mi300x", {"bf16": 1307.4, "tf32": 653.7, "fp32": 163.4}),
    (r"mi250x", {"bf16": 383.0, "fp32": 47.9}),
]
_DTYPE_ALIASES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "bf16", "float16": "bf16", "half": "bf16",
                  "tf32": "tf32", "fp32": "fp32", "float32": "fp32"}


def peak_flops(device_name: str | None, override_tflops: float | None = None, dtype: str = "bf16") -> float | None:
    """Peak FLOP/s of one device: ``override_tflops * 1e12`` when given, else the table entry
    for ``device_name`` (``torch.cuda.get_device_name()``, e.g. "NVIDIA H100 80GB HBM3"),
    else ``None`` (unknown device, CPU): MFU is then not reported rather than invented."""
    if override_tflops is not None:
        if override_tflops <= 0:
            raise ValueError(f"peak TFLOP/s override must be positive, got {override_tflops}")
        return float(override_tflops) * 1e12
    if not device_name:
        return None
    key = _DTYPE_ALIASES.get(str(dtype).lower().replace("torch.", ""))
    if key is None:
        raise ValueError(f"unknown dtype {dtype!r}; one of {sorted(_DTYPE_ALIASES)}")
    name = device_name.lower()
    for pattern, peaks in PEAK_TFLOPS:
        if re.search(pattern, name):
            return peaks[key] * 1e12 if key in peaks else None
    return None


def mfu(model_flops_per_image: float, images_per_s_per_device: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s of one device over its peak (0..1), or
    ``None`` when the peak is unknown. Use the *model* FLOPs (no recomputation), per device."""
    if peak is None or peak <= 0:
        return None
    return model_flops_per_image * images_per_s_per_device / peak


def breakdown_table(img_size: int = 224, mask_ratio: float = 0.75, act_ckpt_every: int = 1) -> str:
    """A text table of the analytic GFLOPs of every preset (``python -m maescale.flops``)."""
    head = (f"{'preset':<24}{'params':>9}{'enc tok':>8}{'fwd':>9}{'enc':>9}{'dec':>8}{'attn':>7}"
            f"{'train':>9}{'+ckpt':>9}   GFLOPs/image @ {img_size}px, mask {mask_ratio}, ckpt every {act_ckpt_every}")
    rows = [head]
    for name, arch in PRESETS.items():
        if img_size % arch.patch_size:
            continue
        f = mae_flops_per_image(arch, img_size, mask_ratio)
        model, hw = train_flops_per_image(arch, img_size, mask_ratio, act_ckpt_every)
        rows.append(f"{name:<24}{param_count(arch) / 1e6:>8.1f}M{f.encoder_tokens:>8d}{f.forward / 1e9:>9.2f}"
                    f"{f.encoder / 1e9:>9.2f}{f.decoder / 1e9:>8.2f}{f.attention / 1e9:>7.2f}"
                    f"{model / 1e9:>9.2f}{hw / 1e9:>9.2f}")
    return "\n".join(rows)


def param_count(arch: MAEArch, in_chans: int = 3) -> int:
    """Trainable parameters of the MAE (position tables are fixed buffers, not counted)."""
    def block(d: int) -> int:
        h = int(d * arch.mlp_ratio)
        return (2 * d) + (3 * d * d + 3 * d) + (d * d + d) + (2 * d) + (d * h + h) + (h * d + d)

    D, Dd, pd = arch.embed_dim, arch.decoder_embed_dim, arch.patch_size**2 * in_chans
    enc = pd * D + D + D + arch.depth * block(D) + 2 * D  # patch proj, cls, blocks, norm
    dec = D * Dd + Dd + Dd + arch.decoder_depth * block(Dd) + 2 * Dd + Dd * pd + pd
    return enc + dec


if __name__ == "__main__":  # pragma: no cover - a convenience print
    print(breakdown_table())
    arch = PRESETS["mae_vit_huge_patch14"]
    f = mae_flops_per_image(arch, 224, 0.75)
    print(f"\nViT-H/14: forward {f.forward / 1e9:.2f}, 3x forward {3 * f.forward / 1e9:.2f}, "
          f"model (train) {f.train / 1e9:.2f} GFLOPs/image; encoder share {f.encoder / f.forward:.1%}")
