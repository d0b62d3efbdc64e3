"""Named MAE architectures. Pure data (no torch import) so config validation stays light."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class MAEArch:
    """Architecture of an MAE: ViT encoder plus the lightweight decoder."""

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int
    mlp_ratio: float = 4.0
    # timm model whose encoder layout matches (None: no registered match, build by kwargs)
    timm_name: str | None = None

    def as_kwargs(self) -> dict:
        """Constructor keyword arguments of :class:`MaskedAutoencoderViT`."""
        d = asdict(self)
        d.pop("timm_name")
        return d


PRESETS: dict[str, MAEArch] = {
    # For tests: a handful of milliseconds per step on one CPU core.
    "mae_vit_tiny_patch4": MAEArch(4, 64, 2, 2, 32, 1, 2),
    # For the CPU demo: small enough to learn visibly in minutes on two cores.
    "mae_vit_mini_patch8": MAEArch(8, 128, 4, 4, 96, 2, 3),
    # The MAE paper's sizes (He et al. 2021, Table/Appendix A.1): decoder 512 wide, 8 blocks.
    "mae_vit_base_patch16": MAEArch(16, 768, 12, 12, 512, 8, 16, timm_name="vit_base_patch16_224"),
    "mae_vit_large_patch16": MAEArch(16, 1024, 24, 16, 512, 8, 16, timm_name="vit_large_patch16_224"),
    "mae_vit_huge_patch14": MAEArch(14, 1280, 32, 16, 512, 8, 16, timm_name="vit_huge_patch14_224"),
    # Beyond the paper: ViT-g/14 (Zhai et al. 2022 "Scaling ViTs"), ~1.0B encoder parameters.
    "mae_vit_giant_patch14": MAEArch(14, 1408, 40, 16, 512, 8, 16, mlp_ratio=48 / 11,
                                     timm_name="vit_giant_patch14_224"),
}
