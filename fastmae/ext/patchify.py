"""patchify / unpatchify of the compiled extension (``backend="ext"``).

Kernels: ``csrc/ops/cuda/patchify_kernel.cu`` (CUDA tensors) and its C++ twin
``csrc/ops/cpu/patchify_kernel.cpp`` (CPU tensors), sharing the index math of
``csrc/ops/patchify.h``; schemas in ``csrc/ops/patchify.cpp``. Fakes and autograd (each op's
backward is the other, cast back to the input's dtype): the Triton ops'
(:func:`fastmae._autograd.register_patchify`). Here: the public wrappers :mod:`fastmae.ops`
dispatches to. Inputs are validated by :mod:`fastmae.ops`.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastmae import _autograd

from . import load, sync_poison

__all__ = ["patchify", "unpatchify"]

load()
_ops = torch.ops.fastmae_ext


_autograd.register_patchify("fastmae_ext")


def _square_side(L) -> int:
    return int(L**0.5 + 0.5)  # exact for squares; math.isqrt breaks dynamic-shape tracing


def patchify(imgs: torch.Tensor, patch_size: int, *, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), as :func:`fastmae.reference.patchify` (cast to ``out_dtype``)."""
    sync_poison()
    return _ops.patchify(imgs, patch_size, out_dtype)


def unpatchify(x: torch.Tensor, patch_size: int, grid_size: Optional[tuple[int, int]] = None, *,
               out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """(N, L, p*p*C) -> (N, C, H, W), as :func:`fastmae.reference.unpatchify`."""
    sync_poison()
    h, w = (_square_side(x.shape[1]),) * 2 if grid_size is None else grid_size
    return _ops.unpatchify(x, patch_size, h, w, out_dtype)
