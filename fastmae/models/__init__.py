"""fastmae's models: the drop-in MAE (see :mod:`fastmae.models.mae`)."""

from .mae import (
    CONFIGS,
    MaskedAutoencoderViT,
    mae_vit_base_patch16,
    mae_vit_base_patch16_dec512d8b,
    mae_vit_huge_patch14,
    mae_vit_huge_patch14_dec512d8b,
    mae_vit_large_patch16,
    mae_vit_large_patch16_dec512d8b,
)

__all__ = [
    "CONFIGS",
    "MaskedAutoencoderViT",
    "mae_vit_base_patch16",
    "mae_vit_base_patch16_dec512d8b",
    "mae_vit_huge_patch14",
    "mae_vit_huge_patch14_dec512d8b",
    "mae_vit_large_patch16",
    "mae_vit_large_patch16_dec512d8b",
]
