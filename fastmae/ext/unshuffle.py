"""decoder_unshuffle of the compiled extension (``backend="ext"``).

Kernels: ``csrc/ops/cuda/unshuffle_kernel.cu`` and the C++ twin
``csrc/ops/cpu/unshuffle_kernel.cpp``, sharing the row map of ``csrc/ops/unshuffle.h``;
schemas in ``csrc/ops/unshuffle.cpp``. Every output row is written once from its source (the
cls row, a kept token or the mask token) with the position embedding added as torch adds: bit
for bit the reference. Backward (``decoder_unshuffle_backward``): the gradient rows scattered
to their kept rows, no atomics, and the removed rows summed for the mask token in a fixed
order (deterministic); ``grad pos_embed = grad.sum(0)``.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import load, sync_poison

__all__ = ["decoder_unshuffle"]

load()
_ops = torch.ops.fastmae_ext


def _out_dtype(x, mask_token, pos_embed):
    dtype = torch.promote_types(x.dtype, mask_token.dtype)
    return dtype if pos_embed is None else torch.promote_types(dtype, pos_embed.dtype)


@torch.library.register_fake("fastmae_ext::decoder_unshuffle")
def _(x, ids_restore, mask_token, pos_embed):
    N, _, D = x.shape
    return x.new_empty((N, 1 + ids_restore.shape[1], D), dtype=_out_dtype(x, mask_token, pos_embed))


@torch.library.register_fake("fastmae_ext::decoder_unshuffle_backward")
def _(grad, ids_restore, len_keep, x_dtype):
    N, _, D = grad.shape
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    return grad.new_empty((N, 1 + len_keep, D), dtype=x_dtype), grad.new_empty((D,), dtype=acc)


def _setup_context(ctx, inputs, output):
    x, ids_restore, mask_token, pos_embed = inputs
    ctx.save_for_backward(ids_restore)
    ctx.len_keep = x.shape[1] - 1
    ctx.x_dtype = x.dtype
    ctx.mask_dtype = mask_token.dtype
    ctx.pos_dtype = None if pos_embed is None else pos_embed.dtype


def _backward(ctx, grad):
    (ids_restore,) = ctx.saved_tensors
    need_x, _, need_mask, need_pos = ctx.needs_input_grad
    gx = gmask = gpos = None
    if need_x or need_mask:
        gx, gm = _ops.decoder_unshuffle_backward(grad, ids_restore, ctx.len_keep, ctx.x_dtype)
        gmask = gm.to(ctx.mask_dtype).view(1, 1, -1) if need_mask else None
        gx = gx if need_x else None
    if need_pos:
        gpos = grad.sum(0, keepdim=True).to(ctx.pos_dtype)
    return gx, None, gmask, gpos


torch.library.register_autograd("fastmae_ext::decoder_unshuffle", _backward, setup_context=_setup_context)


def decoder_unshuffle(x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                      pos_embed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`fastmae.reference.decoder_unshuffle`: (N, 1+len_keep, D) -> (N, 1+L, D), bit for bit."""
    sync_poison()
    return _ops.decoder_unshuffle(x, ids_restore, mask_token, pos_embed)
