"""Masked Autoencoder ViT (He et al., "Masked Autoencoders Are Scalable Vision Learners", 2021).

The code follows the paper's steps so a reader who knows it finds each one: :meth:`patchify`,
:meth:`random_masking`, :meth:`forward_encoder` (visible patches only), :meth:`forward_decoder`
(mask tokens, unshuffle), :meth:`forward_loss` (masked patches only). Transformer blocks are
timm's, with an attention layer that adds an implementation switch (SDPA / forced FlashAttention
/ the ``flash_attn`` package / explicit math). Parameter names are those of the original MAE
release, so public checkpoints load strictly and the encoder fits timm's ``VisionTransformer``.
"""

from __future__ import annotations

import contextlib

import math
import types
from functools import lru_cache, partial
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import Attention, PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

ATTN_IMPLS = ("sdpa", "math", "flash", "cudnn", "flash_attn")
COMPILE_MODES = ("blocks", "full", "graphs", "full_regions")
# Parameter/buffer prefixes that belong to the decoder side (not exported with the encoder).
DECODER_KEYS = ("decoder_", "mask_token")


class AttentionUnavailableError(RuntimeError):
    """The requested attention implementation cannot run on these inputs."""


class MAEAttention(Attention):
    """timm's ``Attention`` with a choice of kernel; parameters and math are unchanged.

    ``impl``: ``sdpa`` lets PyTorch pick the SDPA backend; ``flash`` / ``cudnn`` force SDPA's
    FlashAttention / cuDNN backend and fail clearly when it cannot run (on an H200, cuDNN's kernel
    took 0.062 ms against flash's 0.078 for ViT-H's encoder attention at 128 x 16 heads x 65 tokens
    x 80); ``flash_attn`` calls the ``flash_attn`` package; ``math`` is the explicit
    ``softmax(q k^T / sqrt(d)) v`` reference.
    """

    impl: str = "sdpa"

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal or self.gate is not None:
            raise NotImplementedError("MAEAttention does not take masks or gates")
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        if self.impl == "flash_attn":
            out = _flash_attn_packed(qkv, self.head_dim)  # (B, N, H, D)
            out = out.reshape(B, N, self.attn_dim)
        else:
            # Unbind the packed (B, N, 3, H, D) layout on its own axis, then view each as (B, H, N, D):
            # the same strided views as timm's permute(2, 0, 3, 1, 4).unbind(0), but autograd's stack of
            # dq/dk/dv lands in (B, N, 3, H, D) order, which the qkv linear's backward reads as it is.
            # timm's order stacks into (3, B, H, N, D) and copies once more to get back (eager; compiled
            # blocks fuse both into one copy). No SDPA backend writes packed gradients (the stack stays).
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # each (B, H, N, D)
            q, k = self.q_norm(q), self.k_norm(k)
            if self.impl == "sdpa":
                out = F.scaled_dot_product_attention(q, k, v)
            elif self.impl in ("flash", "cudnn"):
                out = _sdpa_forced(q, k, v, self.impl)
            else:
                attn = (q * self.scale) @ k.transpose(-2, -1)
                out = attn.softmax(dim=-1) @ v
            out = out.transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj(self.norm(out))


def _flash_requirements(q: torch.Tensor, head_dim: int) -> str | None:
    """Why FlashAttention cannot run on ``q`` (None when it can)."""
    if not q.is_cuda:
        return f"it needs CUDA tensors, got device '{q.device}'"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"it needs bf16 or fp16, got {q.dtype} (set train.precision=bf16)"
    if head_dim % 8 != 0 or head_dim > 256:
        return f"it needs a head dim that is a multiple of 8 and at most 256, got {head_dim}"
    return None


def _sdpa_forced(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = SDPBackend.FLASH_ATTENTION if impl == "flash" else SDPBackend.CUDNN_ATTENTION
    reason = _flash_requirements(q, q.shape[-1])
    if reason is None:
        try:
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        except RuntimeError as exc:
            reason = str(exc).splitlines()[0]
    name = "FlashAttention" if impl == "flash" else "cuDNN attention"
    raise AttentionUnavailableError(
        f"model.attn_impl={impl}: the {name} backend of SDPA cannot run: {reason}. "
        "Use model.attn_impl=sdpa to let PyTorch pick a backend.")


def _flash_attn_packed(qkv: torch.Tensor, head_dim: int) -> torch.Tensor:
    try:
        from flash_attn import flash_attn_qkvpacked_func
    except ImportError:
        raise AttentionUnavailableError(
            "model.attn_impl=flash_attn needs the flash_attn package (pip install flash-attn "
            "--no-build-isolation); or use model.attn_impl=sdpa") from None
    reason = _flash_requirements(qkv, head_dim)
    if reason is not None:
        raise AttentionUnavailableError(f"model.attn_impl=flash_attn cannot run: {reason}")
    return flash_attn_qkvpacked_func(qkv)


@lru_cache(maxsize=None)
def _block_region() -> Callable:
    """One ``Block.forward`` marked as a nested compile region (one function object, so that every
    block of a model, and every model, reuses the same region)."""
    if not hasattr(torch.compiler, "nested_compile_region"):
        raise RuntimeError(f"model.compile=full_regions needs torch.compiler.nested_compile_region (torch >= 2.8), "
                           f"torch {torch.__version__} has not; use model.compile=full or blocks")

    @torch.compiler.nested_compile_region
    def block_forward(self: Block, x: torch.Tensor) -> torch.Tensor:
        return Block.forward(self, x)

    return block_forward


# --------------------------------------------------------------------------------------------
# Fixed 2-D sine-cosine position embeddings (as in MAE / MoCo v3)
# --------------------------------------------------------------------------------------------


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim): ``[sin(p * w_i), cos(p * w_i)]`` with ``w_i = 10000^(-2i/dim)``."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dim, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = positions.to(torch.float64).reshape(-1)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """(grid_size**2 [+1], dim) embedding; half the channels encode the row, half the column.

    The first half is the embedding of the column index (x), the second of the row index (y),
    matching the MAE release so that its checkpoints (which store this table) agree exactly.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs dim divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, xs), sincos_1d(dim // 2, ys)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb], dim=0)
    return emb.float()


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class MaskedAutoencoderViT(nn.Module):
    """MAE with a ViT encoder that sees only visible patches and a light ViT decoder.

    Args:
        img_size: square input size; any multiple of ``patch_size``.
        patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio: the encoder ViT.
        decoder_embed_dim, decoder_depth, decoder_num_heads: the decoder ViT.
        mask_ratio: fraction of patches dropped (default for :meth:`forward`).
        norm_pix_loss: normalise each target patch by its own mean/std (the paper's default).
        attn_impl: ``sdpa`` | ``math`` | ``flash`` | ``flash_attn`` (see :class:`MAEAttention`).
        act_ckpt_every: recompute every k-th block in backward (activation checkpointing); 0 off.
        device: build directly on this device (``"meta"`` to inspect huge models for free).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        attn_impl: str = "sdpa",
        act_ckpt_every: int = 0,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        dd = {"device": device}
        norm_layer: Callable[..., nn.Module] = partial(nn.LayerNorm, eps=1e-6)

        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.act_ckpt_every = act_ckpt_every
        self.grid_size = img_size // patch_size
        num_patches = self.grid_size**2

        # ---- encoder
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, **dd)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
        # Fixed (not trained) position tables are persistent buffers: they are in the state
        # dict under the MAE/timm names, but no optimizer or ZeRO partitioning touches them.
        self.register_buffer("pos_embed", torch.zeros(1, num_patches + 1, embed_dim, **dd))
        block = partial(Block, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm_layer, attn_layer=MAEAttention, **dd)
        self.blocks = nn.ModuleList([block(embed_dim, num_heads) for _ in range(depth)])
        self.norm = norm_layer(embed_dim, **dd)

        # ---- decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True, **dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim, **dd))
        self.register_buffer("decoder_pos_embed", torch.zeros(1, num_patches + 1, decoder_embed_dim, **dd))
        self.decoder_blocks = nn.ModuleList([block(decoder_embed_dim, decoder_num_heads) for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim, **dd)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True, **dd)

        # Set by a ZeRO step whose parameters may still be arriving (an asynchronous all-gather)
        # when the next forward starts: called with each layer right before it runs, so the
        # gathers of later layers overlap the earlier ones (maescale.gradsync). None: a no-op.
        self.param_waiter: Callable[[nn.Module, bool], None] | None = None
        self.encoder_frozen = False  # decoder warm-up: the encoder runs without autograd

        self.set_attn_impl(attn_impl)
        if torch.device(device or "cpu").type != "meta":
            self.initialize_weights()

    # ---------------------------------------------------------------- initialisation
    def initialize_weights(self) -> None:
        """As the MAE release: sin-cos tables, xavier-uniform linears (and patch projection),
        cls/mask tokens N(0, 0.02), LayerNorm weight 1 / bias 0."""
        self.pos_embed.copy_(sincos_2d(self.pos_embed.shape[-1], self.grid_size)[None])
        self.decoder_pos_embed.copy_(sincos_2d(self.decoder_pos_embed.shape[-1], self.grid_size)[None])
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a linear layer over flattened patches
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.patch_embed.proj.bias is not None:
            nn.init.zeros_(self.patch_embed.proj.bias)

    # ---------------------------------------------------------------- patches
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C), patches in row-major order, pixels as (p, q, c)."""
        p = self.patch_size
        if imgs.shape[-1] % p or imgs.shape[-2] % p:
            raise ValueError(f"image size {tuple(imgs.shape[-2:])} is not divisible by patch size {p}")
        return rearrange(imgs, "n c (h p) (w q) -> n (h w) (p q c)", p=p, q=p)

    def unpatchify(self, x: torch.Tensor, channels: int | None = None) -> torch.Tensor:
        """(N, L, p*p*C) -> (N, C, H, W); the inverse of :meth:`patchify` for square grids."""
        p = self.patch_size
        h = math.isqrt(x.shape[1])
        if h * h != x.shape[1]:
            raise ValueError(f"{x.shape[1]} patches do not form a square grid")
        c = channels or self.in_chans
        return rearrange(x, "n (h w) (p q c) -> n c (h p) (w q)", h=h, p=p, q=p, c=c)

    # ---------------------------------------------------------------- masking
    @staticmethod
    def random_masking(
        x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep a random ``int(L * (1 - mask_ratio))`` patches per sample.

        Each sample's patches are ranked by uniform noise (``noise`` may be given, shape (N, L));
        the lowest-ranked are kept. Returns ``(x_visible, mask, ids_restore)`` where ``mask`` is
        (N, L) with 0 = kept, 1 = removed, in the original patch order, and ``ids_restore``
        unshuffles a kept-first sequence back into that order.
        """
        n, length, dim = x.shape
        len_keep = int(length * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(n, length, device=x.device)
        elif noise.shape != (n, length):
            raise ValueError(f"noise must have shape {(n, length)}, got {tuple(noise.shape)}")
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
        mask = torch.ones(n, length, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_visible, mask, ids_restore

    # ---------------------------------------------------------------- encoder / decoder
    def _await(self, module: nn.Module, recurse: bool = True) -> None:
        if self.param_waiter is not None:
            self.param_waiter(module, recurse)

    def _run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        k = self.act_ckpt_every
        for i, blk in enumerate(blocks):
            self._await(blk)
            if k and i % k == 0 and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embed patches, drop the masked ones, run the encoder on visible patches + cls."""
        self._await(self, recurse=False)  # cls_token, mask_token
        self._await(self.patch_embed)
        # Images may stay float32 (the loss target keeps full precision) while weights are bf16.
        x = self.patch_embed(imgs.to(self.patch_embed.proj.weight.dtype))
        x = x + self.pos_embed[:, 1:, :].to(x.dtype)
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).to(x.dtype).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = self._run_blocks(self.blocks, x)
        self._await(self.norm)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Project, insert mask tokens, unshuffle, add positions, decode, predict pixels."""
        self._await(self.decoder_embed)
        x = self.decoder_embed(x)
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.to(x.dtype).expand(n, length + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # visible first, then masked
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1)
        x = x + self.decoder_pos_embed.to(x.dtype)
        x = self._run_blocks(self.decoder_blocks, x)
        self._await(self.decoder_norm)
        self._await(self.decoder_pred)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]  # drop cls

    def patch_targets(self, imgs: torch.Tensor) -> torch.Tensor:
        """Per-patch pixel targets in float32, normalised per patch when ``norm_pix_loss``."""
        target = self.patchify(imgs).float()
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the masked patches only (computed in float32)."""
        target = self.patch_targets(imgs)
        loss = ((pred.float() - target) ** 2).mean(dim=-1)  # (N, L) per-patch loss
        return (loss * mask).sum() / mask.sum()

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(loss, pred, mask)``: pred (N, L, p*p*C), mask (N, L) with 1 = masked."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        # Decoder warm-up (model.decoder_warmup_steps): the encoder only runs forward, no graph for it.
        with torch.no_grad() if self.encoder_frozen else contextlib.nullcontext():
            latent, mask, ids_restore = self.forward_encoder(imgs, ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Prediction as an image in the input's space, undoing ``norm_pix_loss`` with each
        patch's own mean/std from ``imgs`` (as the MAE paper's visualisations do)."""
        pred = pred.float()
        if self.norm_pix_loss:
            target = self.patchify(imgs).float()
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            pred = pred * (var + 1.0e-6) ** 0.5 + mean
        return self.unpatchify(pred)

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """All tokens (cls first) of the encoder on the whole, unmasked image, after ``norm``:
        the same quantity as timm's ``VisionTransformer.forward_features``."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = self._run_blocks(self.blocks, torch.cat([cls, x], dim=1))
        return self.norm(x)

    # ---------------------------------------------------------------- helpers
    def set_attn_impl(self, impl: str) -> None:
        """Switch every block's attention kernel (parameters are shared by all of them)."""
        if impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
        self.attn_impl = impl
        for blk in [*self.blocks, *self.decoder_blocks]:
            blk.attn.impl = impl

    def compile_blocks(self, **kwargs) -> None:
        """Regional ``torch.compile``: each block compiled in place (names unchanged)."""
        for blk in [*self.blocks, *self.decoder_blocks]:
            blk.compile(**kwargs)

    def compile_model(self, mode: str = "blocks", **kwargs) -> None:
        """``torch.compile`` the transformer blocks (``blocks``: fast to compile, one graph reused by
        every block), the whole forward with the loss (``full``: patchify, masking gathers, norms,
        residuals and the loss fused across block boundaries; ``full_regions``: the same with each
        block a nested compile region, compiled once and reused), or the blocks with CUDA graphs
        (``graphs``: ``mode="reduce-overhead"``, each block's kernels replayed as one graph launch,
        for micro-batches small enough that launching kernels costs more than running them).
        Parameter names are unchanged either way."""
        if mode == "blocks":
            self.compile_blocks(**kwargs)
        elif mode == "graphs":
            self.compile_blocks(mode="reduce-overhead", **kwargs)
        elif mode == "full":
            self.compile(**kwargs)  # nn.Module.compile: compiles __call__, keeps the module (and its names)
        elif mode == "full_regions":
            # ``full``, with each transformer block a nested compile region: traced and compiled once
            # per block shape (encoder, decoder) and reused, instead of unrolling all of them into
            # one graph whose compile time grows with the depth (ViT-H: 40 blocks).
            region = _block_region()
            for blk in [*self.blocks, *self.decoder_blocks]:
                blk.forward = types.MethodType(region, blk)
            self.compile(**kwargs)
        else:
            raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights with timm ``VisionTransformer`` names (no decoder, no mask token)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(DECODER_KEYS)}

    def no_weight_decay(self) -> set[str]:
        """Parameter names that must not be decayed besides biases and norms (MAE recipe)."""
        return {"cls_token", "mask_token", "pos_embed", "decoder_pos_embed"}
