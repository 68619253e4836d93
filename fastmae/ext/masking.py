"""random_masking / encoder_input of the compiled extension (``backend="ext"``).

Kernels: ``csrc/ops/cuda/masking_kernel.cu`` (one kernel a call: each block ranks its
sample's (noise, index) keys in shared memory by counting, then gathers its share of the kept
rows with the pos-embed add and the cls row) and the C++ twin
``csrc/ops/cpu/masking_kernel.cpp`` (a stable sort of the same keys a sample), sharing
``csrc/ops/masking.h``; schemas in ``csrc/ops/masking.cpp``.

Without ``noise`` the wrapper draws it as the reference does, ``torch.rand(N, L)`` on the
tokens' device, so under ``torch.manual_seed`` the result is the reference's, bit for bit.

Backward, as the Triton op's: the gradient of the gathered tokens goes back to the kept
positions (``masked_tokens_backward``, the unshuffle row kernel with no cls row and a zero
fill), ``grad pos_embed[1:]`` is its batch sum, ``grad pos_embed[0] = grad cls_token`` the
batch sum of the cls row's gradient.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastmae import reference

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


@torch.library.register_fake("fastmae_ext::masked_tokens_backward")
def _(grad, ids_restore, num_prefix, dtype):
    return grad.new_empty((grad.shape[0], ids_restore.shape[1], grad.shape[2]), dtype=dtype)


def _random_masking_setup(ctx, inputs, output):
    x = inputs[0]
    _, mask, ids_restore = output
    ctx.mark_non_differentiable(mask, ids_restore)
    ctx.save_for_backward(ids_restore)
    ctx.x_dtype = x.dtype


def _random_masking_backward(ctx, grad, grad_mask, grad_ids):
    (ids_restore,) = ctx.saved_tensors
    gx = _ops.masked_tokens_backward(grad, ids_restore, 0, ctx.x_dtype) if ctx.needs_input_grad[0] else None
    return gx, None, None


def _encoder_input_setup(ctx, inputs, output):
    x, pos_embed, cls_token = inputs[:3]
    _, mask, ids_restore = output
    ctx.mark_non_differentiable(mask, ids_restore)
    ctx.save_for_backward(ids_restore)
    ctx.x_dtype, ctx.pos_dtype, ctx.cls_dtype = x.dtype, pos_embed.dtype, cls_token.dtype
    ctx.cls_row_dtype = torch.promote_types(cls_token.dtype, pos_embed.dtype)


def _encoder_input_backward(ctx, grad, grad_mask, grad_ids):
    (ids_restore,) = ctx.saved_tensors
    need_x, need_pos, need_cls = ctx.needs_input_grad[:3]
    gx = gpos = gcls = None
    if need_x or need_pos:
        # the batch sum for pos needs the grads in the tokens' dtype; else cast in the kernel
        dtype = grad.dtype if need_pos else ctx.x_dtype
        g_tokens = _ops.masked_tokens_backward(grad, ids_restore, 1, dtype)
        if need_x:
            gx = g_tokens.to(ctx.x_dtype)
    if need_pos or need_cls:
        g0 = grad[:, :1].to(ctx.cls_row_dtype).sum(0, keepdim=True)
        if need_cls:
            gcls = g0.to(ctx.cls_dtype)
        if need_pos:
            gpos = torch.cat([g0.to(ctx.pos_dtype), g_tokens.sum(0, keepdim=True).to(ctx.pos_dtype)], dim=1)
    return gx, gpos, gcls, None, None


torch.library.register_autograd("fastmae_ext::random_masking", _random_masking_backward,
                                setup_context=_random_masking_setup)
torch.library.register_autograd("fastmae_ext::encoder_input", _encoder_input_backward,
                                setup_context=_encoder_input_setup)


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
