"""fastmae: fused kernels and a drop-in model for fast MAE pretraining.

>>> import fastmae
>>> model = fastmae.mae_vit_base_patch16(norm_pix_loss=True)
>>> loss, pred, mask = model(imgs, mask_ratio=0.75)

Ops live in :mod:`fastmae.ops` (each with ``backend=``), their plain-PyTorch oracles in
:mod:`fastmae.reference`, the Triton kernels in :mod:`fastmae.kernels` (imported lazily:
``import fastmae`` needs neither triton nor the CUDA extension nor xformers).
"""

from . import graph, ops, reference
from .backend import (
    BackendUnavailableError,
    available_backends,
    get_backend,
    set_backend,
    use_backend,
)
from .models import (
    CONFIGS,
    MaskedAutoencoderViT,
    mae_vit_base_patch16,
    mae_vit_base_patch16_dec512d8b,
    mae_vit_huge_patch14,
    mae_vit_huge_patch14_dec512d8b,
    mae_vit_large_patch16,
    mae_vit_large_patch16_dec512d8b,
)
from .patching import apply_fastmae, remove_fastmae  # torch and fastmae.ops only

__version__ = "0.1.0"

__all__ = [
    "ops",
    "reference",
    "graph",
    "BackendUnavailableError",
    "available_backends",
    "get_backend",
    "set_backend",
    "use_backend",
    "CONFIGS",
    "MaskedAutoencoderViT",
    "mae_vit_base_patch16",
    "mae_vit_base_patch16_dec512d8b",
    "mae_vit_huge_patch14",
    "mae_vit_huge_patch14_dec512d8b",
    "mae_vit_large_patch16",
    "mae_vit_large_patch16_dec512d8b",
    "apply_fastmae",
    "remove_fastmae",
]
