"""Decoder unshuffle: the MAE decoder's input tokens in one pass.

After ``decoder_embed``, the official ``forward_decoder`` does::

    mask_tokens = mask_token.repeat(N, L + 1 - T, 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)                 # no cls token
    x_ = torch.gather(x_, 1, ids_restore[..., None].repeat(1, 1, D))  # unshuffle
    x = torch.cat([x[:, :1, :], x_], dim=1)                           # append cls token
    x = x + decoder_pos_embed

which writes ``(N, L, D)`` tensors four times. Here every output row is produced once,
directly from its source::

    out[n, 0]     = x[n, 0]                                   (+ pos[0])
    out[n, 1 + l] = x[n, 1 + j] if j < len_keep else mask_token  (+ pos[1 + l]),
                    j = ids_restore[n, l],  len_keep = T - 1

``_unshuffle_kernel`` runs over (sample, block of output rows, block of channels): it
loads the row indices, gathers the kept rows (a masked load; removed rows take the mask
token), adds the position embedding in the promoted dtype and stores. The add is done as
torch does it, both operands converted to the output dtype and added (in fp32 for
fp16/bf16 outputs, which rounds exactly like a native half-precision add), so the result is
bit-for-bit the reference's.

Backward. ``ids_restore`` is a permutation, so each kept row of ``x`` has exactly one
source row in the output gradient ``g``: ``grad_x[n, 1 + j] = g[n, 1 + l]`` for the ``l``
with ``ids_restore[n, l] = j < len_keep``, and ``grad_x[n, 0] = g[n, 0]``.
``_unshuffle_bwd_kernel`` walks the rows of ``g`` and scatters them to their kept row:
every row of ``grad_x`` is written once, so no atomics are needed. The rows that held the
mask token are summed in the same pass: one program per (sample, block of channels) walks
all of the sample's rows, ``BLOCK_T`` at a time, and reduces the removed ones to one fp32
partial sum, ``(N, D)``, which the wrapper sums over the batch with torch; the result is
deterministic (fixed order). (A program per block of rows would write a partial per
block: at 16 rows a block that is a quarter of ``g``'s bytes again, written and re-read.)
``grad pos_embed = g.sum(0)``.

The forward kernel with no cls row, a zero fill and no position embedding is the backward
of the encoder's token gather (:mod:`fastmae.kernels.masking`): grads scattered back to the
kept positions, zero at the removed ones. :func:`unshuffle_rows` is that shared launcher.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from fastmae import _autograd, reference
from fastmae._library import empty, interpreting, kernel_op, launch, register_cpu_fallback

__all__ = ["decoder_unshuffle", "unshuffle_rows"]


@triton.jit
def _unshuffle_kernel(
    src_ptr,  # (N, SRC_OFF + len_keep, D) the kept tokens (after CLS cls rows, if any)
    ids_restore_ptr,  # (N, L) int64/int32: position of each original token in the shuffled order
    fill_ptr,  # (D,) value of the removed positions (the mask token), read if HAS_FILL
    pos_ptr,  # (CLS + L, D) position embedding added to every output row, read if HAS_POS
    out_ptr,  # (N, CLS + L, D) output, in the promoted dtype
    L,  # number of tokens (patches)
    len_keep,  # number of kept tokens: ids_restore < len_keep is kept
    D,  # channels
    stride_sn, stride_st, stride_sd,  # strides of src
    stride_in, stride_il,  # strides of ids_restore
    stride_fd,  # stride of fill
    stride_pt, stride_pd,  # strides of pos (rows, channels)
    stride_on, stride_ot, stride_od,  # strides of out
    CLS: tl.constexpr,  # 1: src row 0 is the cls token, copied to out row 0; 0: no cls row
    SRC_OFF: tl.constexpr,  # the kept tokens start at row SRC_OFF of src
    HAS_FILL: tl.constexpr,  # removed positions take fill; else zero
    HAS_POS: tl.constexpr,  # add pos to every output row
    ACC64: tl.constexpr,  # add in float64 (float64 output); else float32
    BLOCK_T: tl.constexpr,  # output rows per program
    BLOCK_D: tl.constexpr,  # channels per program
):
    n = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # output rows
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = t < CLS + L
    d_ok = d < D
    is_tok = row_ok & (t >= CLS)
    is_cls = t < CLS

    # j: rank of token t - CLS in the shuffle; kept tokens sit at src row SRC_OFF + j
    j = tl.load(ids_restore_ptr + n * stride_in + (t - CLS) * stride_il, mask=is_tok, other=0)
    # kept: 0 <= j < len_keep; anything else is the fill (a j out of range never reads out of bounds)
    take = is_cls | (is_tok & (j >= 0) & (j < len_keep))
    src_row = tl.where(is_cls, 0, SRC_OFF + j)
    take2 = take[:, None] & d_ok[None, :]
    v = tl.load(src_ptr + n * stride_sn + src_row[:, None] * stride_st + d[None, :] * stride_sd, mask=take2, other=0.0)
    out_ty = out_ptr.dtype.element_ty
    v = v.to(out_ty)  # a widening: out's dtype is the promotion of the inputs'
    if HAS_FILL:
        f = tl.load(fill_ptr + d * stride_fd, mask=d_ok, other=0.0).to(out_ty)
        v = tl.where(take2, v, f[None, :])
    ok2 = row_ok[:, None] & d_ok[None, :]
    if HAS_POS:
        p = tl.load(pos_ptr + t[:, None] * stride_pt + d[None, :] * stride_pd, mask=ok2, other=0.0)
        # torch's add: both operands in the output dtype, added, rounded once
        # (out is float64 only if an input is; fp32 holds fp16/bf16 sums exactly before the rounding)
        if ACC64:
            v = (v.to(tl.float64) + p.to(tl.float64)).to(out_ty)
        else:
            v = (v.to(tl.float32) + p.to(tl.float32)).to(out_ty)
    tl.store(out_ptr + n * stride_on + t[:, None] * stride_ot + d[None, :] * stride_od, v, mask=ok2)


@triton.jit
def _unshuffle_bwd_kernel(
    g_ptr,  # (N, 1 + L, D) gradient of the unshuffled tokens
    ids_restore_ptr,  # (N, L) int64/int32
    gx_ptr,  # (N, 1 + len_keep, D) gradient of the decoder tokens x (x's dtype)
    partial_ptr,  # (N, D) fp32/fp64: per-sample sums of g over removed rows
    L,  # number of tokens
    len_keep,  # number of kept tokens
    D,  # channels
    stride_gn, stride_gt, stride_gd,  # strides of g
    stride_in, stride_il,  # strides of ids_restore
    stride_xn, stride_xt, stride_xd,  # strides of gx
    stride_pn,  # row stride of partial (channels contiguous)
    BLOCK_T: tl.constexpr,  # rows of g per step
    BLOCK_D: tl.constexpr,  # channels per program
):
    n = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    acc_ty = partial_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=acc_ty)
    for t0 in range(0, 1 + L, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)  # rows of g
        row_ok = t < 1 + L
        is_tok = row_ok & (t >= 1)
        j = tl.load(ids_restore_ptr + n * stride_in + (t - 1) * stride_il, mask=is_tok, other=0)
        kept = is_tok & (j >= 0) & (j < len_keep)  # as the forward: anything else was the fill
        removed = is_tok & ~kept

        g = tl.load(g_ptr + n * stride_gn + t[:, None] * stride_gt + d[None, :] * stride_gd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        # scatter: g row 0 -> x row 0 (cls), g row 1 + l -> x row 1 + j for kept tokens
        dst = tl.where(t == 0, 0, 1 + j)
        wr = ((t == 0) | kept)[:, None] & d_ok[None, :]
        tl.store(gx_ptr + n * stride_xn + dst[:, None] * stride_xt + d[None, :] * stride_xd, g.to(gx_ptr.dtype.element_ty), mask=wr)
        # the mask token's share: the removed rows, accumulated elementwise in a fixed order
        acc += tl.where(removed[:, None], g.to(acc_ty), 0.0)
    tl.store(partial_ptr + n * stride_pn + d, tl.sum(acc, axis=0), mask=d_ok)


def _blocks(rows: int, D: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_D) for a row-gather over ``rows`` rows of ``D`` channels.

    On a GPU: 256-channel slabs, 16 rows, 4096 elements a program. Under the interpreter,
    whose cost is per program, as few and as large programs as reasonable.
    """
    rows, D = int(rows), int(D)  # sizes specialise the block shapes (a guard when traced symbolically)
    if interpreting():
        block_d = min(triton.next_power_of_2(D), 1024)
        return max(1, min(triton.next_power_of_2(rows), 16384 // block_d)), block_d
    block_d = min(triton.next_power_of_2(D), 256)
    return max(1, 4096 // block_d), block_d


def _bwd_blocks(D: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_D) of the backward, whose programs walk all rows of a sample.

    On a GPU: 64-channel slabs (128-byte rows in 16-bit dtypes), 64 rows a step, so that
    (sample, slab) programs are many (2048 for a 512-wide decoder at batch 256). Under the
    interpreter, as few and as large programs as reasonable.
    """
    D = int(D)
    if interpreting():
        block_d = min(triton.next_power_of_2(D), 1024)
        return max(1, 16384 // block_d), block_d
    block_d = min(triton.next_power_of_2(D), 64)
    return max(1, 4096 // block_d), block_d


def unshuffle_rows(
    src: torch.Tensor,
    ids_restore: torch.Tensor,
    len_keep: int,
    out: torch.Tensor,
    *,
    cls: bool,
    src_off: int,
    fill: Optional[torch.Tensor] = None,
    pos: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Launch :func:`_unshuffle_kernel` writing ``out`` (N, cls + L, D); see the kernel's arguments.

    ``fill`` is (1, 1, D) or None (zeros), ``pos`` (1, cls + L, D) or None.
    """
    N, L = ids_restore.shape
    D = out.shape[2]
    rows = int(cls) + L
    block_t, block_d = _blocks(rows, D)
    fill_t = fill if fill is not None else src
    pos_t = pos if pos is not None else src
    grid = (N, triton.cdiv(rows, block_t), triton.cdiv(D, block_d))
    launch(_unshuffle_kernel)[grid](
        src, ids_restore, fill_t, pos_t, out,
        L, len_keep, D,
        src.stride(0), src.stride(1), src.stride(2),
        ids_restore.stride(0), ids_restore.stride(1),
        fill.stride(2) if fill is not None else 0,
        pos.stride(1) if pos is not None else 0, pos.stride(2) if pos is not None else 0,
        out.stride(0), out.stride(1), out.stride(2),
        CLS=int(cls), SRC_OFF=src_off, HAS_FILL=fill is not None, HAS_POS=pos is not None,
        ACC64=out.dtype == torch.float64,
        BLOCK_T=block_t, BLOCK_D=block_d,
    )  # fmt: skip
    return out


def _out_dtype(x: torch.Tensor, mask_token: torch.Tensor, pos_embed: Optional[torch.Tensor]) -> torch.dtype:
    # the reference: cat([x, mask_tokens]) promotes, then + pos_embed promotes again
    dtype = torch.promote_types(x.dtype, mask_token.dtype)
    return dtype if pos_embed is None else torch.promote_types(dtype, pos_embed.dtype)


# ------------------------------------------------------------------------- forward op
@kernel_op("fastmae::decoder_unshuffle")
def _decoder_unshuffle(
    x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, pos_embed: Optional[torch.Tensor]
) -> torch.Tensor:
    N, T, D = x.shape
    L = ids_restore.shape[1]
    out = empty((N, 1 + L, D), _out_dtype(x, mask_token, pos_embed), x.device)
    return unshuffle_rows(x, ids_restore, T - 1, out, cls=True, src_off=1, fill=mask_token, pos=pos_embed)


@_decoder_unshuffle.register_fake
def _(x, ids_restore, mask_token, pos_embed):
    N, _, D = x.shape
    return x.new_empty((N, 1 + ids_restore.shape[1], D), dtype=_out_dtype(x, mask_token, pos_embed))


register_cpu_fallback(_decoder_unshuffle, reference.decoder_unshuffle)


# ------------------------------------------------------------------------ backward op
@kernel_op("fastmae::decoder_unshuffle_backward")
def _decoder_unshuffle_backward(
    grad: torch.Tensor, ids_restore: torch.Tensor, len_keep: int, x_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad of x in ``x_dtype``, sum of ``grad`` over removed positions (D,) in fp32/fp64)."""
    N, T, D = grad.shape
    L = T - 1
    block_t, block_d = _bwd_blocks(D)
    acc_dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
    gx = empty((N, 1 + len_keep, D), x_dtype, grad.device)
    partial = empty((N, D), acc_dtype, grad.device)
    launch(_unshuffle_bwd_kernel)[(N, triton.cdiv(D, block_d))](
        grad, ids_restore, gx, partial,
        L, len_keep, D,
        grad.stride(0), grad.stride(1), grad.stride(2),
        ids_restore.stride(0), ids_restore.stride(1),
        gx.stride(0), gx.stride(1), gx.stride(2),
        partial.stride(0),
        BLOCK_T=block_t, BLOCK_D=block_d,
    )  # fmt: skip
    return gx, partial.sum(dim=0)


def _backward_reference(grad, ids_restore, len_keep, x_dtype):
    # plain PyTorch: kept row j of x came from row ids_shuffle[j] (the inverse permutation)
    D = grad.shape[2]
    ids_keep = torch.argsort(ids_restore.long(), dim=1)[:, :len_keep]
    rows = torch.gather(grad[:, 1:], 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    gx = torch.cat([grad[:, :1], rows], dim=1).to(x_dtype)
    acc_dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
    removed = (ids_restore >= len_keep).unsqueeze(-1)
    gm = torch.where(removed, grad[:, 1:].to(acc_dtype), 0).sum(dim=(0, 1))
    return gx, gm


register_cpu_fallback(_decoder_unshuffle_backward, _backward_reference)


# ------------------------------------------------------------------------- autograd
# the fake of decoder_unshuffle_backward and the op's autograd: the same as the extension's
_autograd.register_decoder_unshuffle("fastmae")


# --------------------------------------------------------------------------- public
def decoder_unshuffle(
    x: torch.Tensor,
    ids_restore: torch.Tensor,
    mask_token: torch.Tensor,
    pos_embed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Fused :func:`fastmae.reference.decoder_unshuffle`: (N, 1+len_keep, D) -> (N, 1+L, D).

    ``ids_restore`` is int64 or int32. Bit-for-bit the reference's output.
    """
    return torch.ops.fastmae.decoder_unshuffle(x, ids_restore, mask_token, pos_embed)
