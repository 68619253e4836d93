"""random_masking / encoder_input of the compiled extension (``backend="ext"``).

Kernels: ``csrc/ops/cuda/masking_kernel.cu`` (one kernel a call: each block ranks its
sample's (noise, index) keys in shared memory by counting, then gathers its share of the kept
rows with the pos-embed add and the cls row) and the C++ twin
``csrc/ops/cpu/masking_kernel.cpp`` (a stable sort of the same keys a sample), sharing
``csrc/ops/masking.h``; schemas in ``csrc/ops/masking.cpp``.

Without ``noise`` the wrapper draws it as the reference does, ``torch.rand(N, L)`` on the
tokens' device, so under ``torch.manual_seed`` the result is the reference's, bit for bit.

Backward: the Triton op's formula (:func:`fastmae._autograd.register_masking`), on the
extension's ``masked_tokens_backward`` (the unshuffle row kernel with no cls row and a zero
fill).
"""

from __future__ import annotations

from typing import Optional

import torch

from fastmae import _autograd, reference

from . import load, sync_poison

__all__ = ["random_masking", "encoder_input", "MAX_TOKENS"]

MAX_TOKENS = 4096
"""Most tokens a sample: the CUDA kernel ranks a sample's keys in shared memory."""

load()
_ops = torch.ops.fastmae_ext


def _check_tokens(L: int) -> None:
    if L > MAX_TOKENS:
        raise ValueError(f"backend='ext' masks at most {MAX_TOKENS} tokens a sample (the CUDA kernel ranks them "
                         f"in shared memory); got L={L}")


def _fake_masks(x, len_keep):
    N, L, _ = x.shape
    return x.new_empty((N, L), dtype=torch.float32), x.new_empty((N, L), dtype=torch.int64)


@torch.library.register_fake("fastmae_ext::random_masking")
def _(x, noise, len_keep):
    N, L, D = x.shape
    return (x.new_empty((N, len_keep, D)), *_fake_masks(x, len_keep))


@torch.library.register_fake("fastmae_ext::encoder_input")
def _(x, pos_embed, cls_token, noise, len_keep):
    N, L, D = x.shape
    dtype = torch.promote_types(x.dtype, pos_embed.dtype)
    return (x.new_empty((N, 1 + len_keep, D), dtype=dtype), *_fake_masks(x, len_keep))


_autograd.register_masking("fastmae_ext")


def _noise(x: torch.Tensor, noise: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.rand(x.shape[0], x.shape[1], device=x.device) if noise is None else noise


def random_masking(x: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None):
    """:func:`fastmae.reference.random_masking`: ``(x_masked, mask, ids_restore)``, bit for bit."""
    _check_tokens(x.shape[1])
    sync_poison()
    return _ops.random_masking(x, _noise(x, noise), reference.num_kept(x.shape[1], mask_ratio))


def encoder_input(x: torch.Tensor, pos_embed: torch.Tensor, cls_token: torch.Tensor, mask_ratio: float,
                  noise: Optional[torch.Tensor] = None):
    """:func:`fastmae.reference.encoder_input`: ``(tokens (N, 1+len_keep, D), mask, ids_restore)``, bit for bit."""
    _check_tokens(x.shape[1])
    sync_poison()
    return _ops.encoder_input(x, pos_embed, cls_token, _noise(x, noise), reference.num_kept(x.shape[1], mask_ratio))
