"""patchify / unpatchify of the compiled extension (``backend="ext"``).

Kernels: ``csrc/ops/cuda/patchify_kernel.cu`` (CUDA tensors) and its C++ twin
``csrc/ops/cpu/patchify_kernel.cpp`` (CPU tensors), sharing the index math of
``csrc/ops/patchify.h``; schemas in ``csrc/ops/patchify.cpp``. Here: fake tensors for
``torch.compile``, autograd (each op's backward is the other, cast back to the input's
dtype), and the public wrappers :mod:`fastmae.ops` dispatches to. Inputs are validated by
:mod:`fastmae.ops`.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import load, sync_poison

__all__ = ["patchify", "unpatchify"]

load()
_ops = torch.ops.fastmae_ext


@torch.library.register_fake("fastmae_ext::patchify")
def _(imgs, patch_size, out_dtype):
    N, C, H, W = imgs.shape
    p = patch_size
    return imgs.new_empty((N, (H // p) * (W // p), p * p * C), dtype=out_dtype or imgs.dtype)


@torch.library.register_fake("fastmae_ext::unpatchify")
def _(x, patch_size, h, w, out_dtype):
    N, L, D = x.shape
    p = patch_size
    return x.new_empty((N, D // (p * p), h * p, w * p), dtype=out_dtype or x.dtype)


def _patchify_setup(ctx, inputs, output):
    imgs, patch_size, _ = inputs
    ctx.patch_size = patch_size
    ctx.grid = (imgs.shape[2] // patch_size, imgs.shape[3] // patch_size)
    ctx.in_dtype = imgs.dtype


def _patchify_backward(ctx, grad):
    h, w = ctx.grid
    return _ops.unpatchify(grad, ctx.patch_size, h, w, ctx.in_dtype), None, None


def _unpatchify_setup(ctx, inputs, output):
    x, patch_size, _, _, _ = inputs
    ctx.patch_size = patch_size
    ctx.in_dtype = x.dtype


def _unpatchify_backward(ctx, grad):
    return _ops.patchify(grad, ctx.patch_size, ctx.in_dtype), None, None, None, None


torch.library.register_autograd("fastmae_ext::patchify", _patchify_backward, setup_context=_patchify_setup)
torch.library.register_autograd("fastmae_ext::unpatchify", _unpatchify_backward, setup_context=_unpatchify_setup)


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
