"""Fused MAE reconstruction loss (the official ``forward_loss``) and its backward.

The reference materialises ``target = patchify(imgs)`` (N, L, P), normalises it, forms
``(pred - target)**2`` and reduces it twice. Here one pass reads each image pixel and each
prediction once and writes a handful of partial sums.

Forward, ``P = p*p*C`` values per patch, ``M = N*L`` patches (rows):

1. Each program owns ``BLOCK_M`` consecutive rows and holds them as a
   ``(BLOCK_M, BLOCK_P)`` tile, ``BLOCK_P = next_power_of_two(P)`` with the padding
   lanes masked off (P = 768 for p=16, C=3 and 588 for p=14 are not powers of two).
   It loads the rows' mask values first and reads pixels and predictions only for rows
   with ``mask_m != 0``: a kept patch (mask 0, a quarter of them in MAE) contributes
   ``loss_m * 0 = 0`` whatever it holds, so its bytes are never fetched. (Unlike the
   reference, where ``0 * inf`` is NaN, non-finite values in kept patches therefore do not
   reach the loss or the gradient.)
   Row ``m = n*L + l`` is patch ``(i, j) = (l // w, l % w)`` of image ``n``; its element
   ``d`` is ``imgs[n, c, i*p + r, j*p + q]`` with ``r = d // (p*C)``, ``q = (d // C) % p``,
   ``c = d % C`` (see :mod:`fastmae.kernels.patchify`): the target is gathered straight
   from ``imgs`` through its strides, never materialised.
2. In float32: with ``norm_pix_loss`` the target becomes ``(t - mean) / sqrt(var + 1e-6)``
   with the *unbiased* variance ``sum((t - mean)**2) / (P - 1)`` (two passes over the
   tile in registers); then ``loss_m = sum_d (pred - t)**2 / P``.
3. The program writes two partial sums, ``sum_m loss_m * mask_m`` and ``sum_m mask_m``,
   to a ``(2, num_programs)`` buffer; a one-program kernel adds them up in a fixed order
   and divides. No atomics, so the loss is bitwise deterministic. The op also returns
   ``sum(mask)`` (non-differentiable), which the backward needs: saved from the forward,
   it costs the backward no reduction launch.

Backward (w.r.t. ``pred`` only; ``imgs`` and ``mask`` get no gradient, as in MAE where
they are data): the same tile recomputes the target (again only for rows with
``mask_m != 0``; the others get zeros without reading anything) and writes

    d pred[m, d] = grad_out * mask_m * 2 * (pred[m, d] - t[m, d]) / (P * sum(mask))

in ``pred``'s dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmae import _autograd, reference
from fastmae._library import empty, kernel_op, launch, register_cpu_fallback

__all__ = ["mae_loss"]

# Elements per (BLOCK_M, BLOCK_P) tile: BLOCK_M = max(1, _TILE // BLOCK_P) rows per
# program. Elements per step of the final reduction: _FINAL_BLOCK. Both powers of two;
# tests lower them to exercise many programs and the final reduction's loop.
_TILE = 4096
_FINAL_BLOCK = 1024


@triton.jit
def _load_target(
    imgs_ptr,
    n,
    l,
    w,
    row_valid,
    stride_n,
    stride_c,
    stride_h,
    stride_w,
    PATCH: tl.constexpr,
    C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    NORM_PIX: tl.constexpr,
):
    """The float32 target tile (BLOCK_M, BLOCK_P) of patches (n, l) gathered from imgs,
    normalised per patch when NORM_PIX; padding lanes and rows not in ``row_valid`` are 0
    (and not read)."""
    P = PATCH * PATCH * C
    d = tl.arange(0, BLOCK_P)
    r = d // (PATCH * C)
    q = (d // C) % PATCH
    c = d % C
    i = l // w
    j = l % w
    valid = row_valid[:, None] & (d < P)[None, :]
    offs = (
        n.to(tl.int64)[:, None] * stride_n
        + c[None, :] * stride_c
        + (i[:, None] * PATCH + r[None, :]) * stride_h
        + (j[:, None] * PATCH + q[None, :]) * stride_w
    )
    t = tl.load(imgs_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    if NORM_PIX:
        mean = tl.sum(t, axis=1) / P
        t = tl.where(valid, t - mean[:, None], 0.0)
        var = tl.sum(t * t, axis=1) / (P - 1)  # unbiased, as torch.var
        t = t * (1.0 / tl.sqrt(var + 1e-6))[:, None]
    return t


@triton.jit
def _mae_loss_fwd_kernel(
    imgs_ptr,
    pred_ptr,
    mask_ptr,
    partial_ptr,
    M,
    L,
    w,
    stride_in,
    stride_ic,
    stride_ih,
    stride_iw,
    stride_pn,
    stride_pl,
    stride_pd,
    stride_mn,
    stride_ml,
    PATCH: tl.constexpr,
    C: tl.constexpr,
    NORM_PIX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Partial sums of loss*mask and of mask over BLOCK_M patches.

    Args:
        imgs_ptr: images (N, C, H, W), any strides and float dtype.
        pred_ptr: predictions (N, L, P), any strides and float dtype.
        mask_ptr: mask (N, L), any strides and dtype (1 = removed patch, counted).
        partial_ptr: float32 (2, num_programs): row 0 sum(loss*mask), row 1 sum(mask).
        M: number of patches N*L.
        L: patches per image.
        w: patches per grid row (W // PATCH).
        stride_in, stride_ic, stride_ih, stride_iw: strides of imgs, in elements.
        stride_pn, stride_pl, stride_pd: strides of pred.
        stride_mn, stride_ml: strides of mask.
        PATCH: patch size p.
        C: channels; P = PATCH*PATCH*C.
        NORM_PIX: normalise each target patch (norm_pix_loss).
        BLOCK_M: patches per program.
        BLOCK_P: power of two >= P.
    Grid: (cdiv(M, BLOCK_M),).
    """
    P = PATCH * PATCH * C
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < M
    n = rows // L
    l = rows % L
    m = tl.load(mask_ptr + n.to(tl.int64) * stride_mn + l * stride_ml, mask=row_valid, other=0).to(tl.float32)
    # Rows with mask 0 add loss * 0 = 0: their pixels and predictions are not read.
    live = row_valid & (m != 0.0)
    t = _load_target(imgs_ptr, n, l, w, live, stride_in, stride_ic, stride_ih, stride_iw, PATCH, C, BLOCK_P, NORM_PIX)

    d = tl.arange(0, BLOCK_P)
    valid = live[:, None] & (d < P)[None, :]
    p_offs = n.to(tl.int64)[:, None] * stride_pn + l[:, None] * stride_pl + d[None, :] * stride_pd
    x = tl.load(pred_ptr + p_offs, mask=valid, other=0.0).to(tl.float32)
    err = tl.where(valid, x - t, 0.0)
    loss = tl.sum(err * err, axis=1) / P  # per-patch mean squared error

    num_programs = tl.num_programs(0)
    tl.store(partial_ptr + pid, tl.sum(loss * m, axis=0))
    tl.store(partial_ptr + num_programs + pid, tl.sum(m, axis=0))


@triton.jit
def _mae_loss_final_kernel(partial_ptr, loss_ptr, mask_sum_ptr, num_partials, BLOCK: tl.constexpr):
    """loss = sum(partial[0]) / sum(partial[1]), in a fixed order; also writes sum(partial[1]).

    Args:
        partial_ptr: float32 (2, num_partials) from the forward kernel.
        loss_ptr: float32 scalar output.
        mask_sum_ptr: float32 scalar output, sum(mask) (for the backward).
        num_partials: programs of the forward kernel.
        BLOCK: partials added per step.
    Grid: (1,).
    """
    acc_loss = tl.zeros((BLOCK,), dtype=tl.float32)
    acc_mask = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, num_partials, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < num_partials
        acc_loss += tl.load(partial_ptr + offs, mask=valid, other=0.0)
        acc_mask += tl.load(partial_ptr + num_partials + offs, mask=valid, other=0.0)
    mask_sum = tl.sum(acc_mask, axis=0)
    tl.store(loss_ptr, tl.sum(acc_loss, axis=0) / mask_sum)
    tl.store(mask_sum_ptr, mask_sum)


@triton.jit
def _mae_loss_bwd_kernel(
    grad_out_ptr,
    mask_sum_ptr,
    imgs_ptr,
    pred_ptr,
    mask_ptr,
    grad_pred_ptr,
    M,
    L,
    w,
    stride_in,
    stride_ic,
    stride_ih,
    stride_iw,
    stride_pn,
    stride_pl,
    stride_pd,
    stride_mn,
    stride_ml,
    PATCH: tl.constexpr,
    C: tl.constexpr,
    NORM_PIX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """d loss / d pred for BLOCK_M patches.

    Args:
        grad_out_ptr: scalar gradient of the loss.
        mask_sum_ptr: float32 scalar sum(mask), from the forward.
        grad_pred_ptr: output (N, L, P), contiguous, pred's dtype.
        The others: as in _mae_loss_fwd_kernel.
    Grid: (cdiv(M, BLOCK_M),).
    """
    P = PATCH * PATCH * C
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < M
    n = rows // L
    l = rows % L
    m = tl.load(mask_ptr + n.to(tl.int64) * stride_mn + l * stride_ml, mask=row_valid, other=0).to(tl.float32)
    # Rows with mask 0 get a zero gradient: nothing of theirs is read (x = t = 0 there).
    live = row_valid & (m != 0.0)
    t = _load_target(imgs_ptr, n, l, w, live, stride_in, stride_ic, stride_ih, stride_iw, PATCH, C, BLOCK_P, NORM_PIX)

    d = tl.arange(0, BLOCK_P)
    valid = row_valid[:, None] & (d < P)[None, :]
    p_offs = n.to(tl.int64)[:, None] * stride_pn + l[:, None] * stride_pl + d[None, :] * stride_pd
    x = tl.load(pred_ptr + p_offs, mask=live[:, None] & (d < P)[None, :], other=0.0).to(tl.float32)

    # The chain rule in the reference's order: d loss_m = g / sum(mask) * mask_m,
    # d err^2 = d loss_m / P, d pred = d err^2 * 2 * (pred - t).
    g = tl.load(grad_out_ptr).to(tl.float32) / tl.load(mask_sum_ptr)
    row_grad = g * m / P
    grad = row_grad[:, None] * (2.0 * (x - t))
    out_offs = rows.to(tl.int64)[:, None] * P + d[None, :]
    tl.store(grad_pred_ptr + out_offs, grad.to(grad_pred_ptr.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------- host
def _blocks(P: int, M: int) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_M, num_warps) for P values per patch and M patches."""
    block_p = triton.next_power_of_2(int(P))
    block_m = max(1, min(_TILE // block_p, triton.next_power_of_2(int(M))))
    num_warps = 8 if block_m * block_p >= 8192 else 4
    return block_p, block_m, num_warps


def _loadable_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask reinterpreted as uint8 (same bytes), which every Triton version loads as 0/1."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _strides(imgs, pred, mask):
    """The 9 strides the kernels take, in elements."""
    return (*imgs.stride(), *pred.stride(), *mask.stride())


@kernel_op("fastmae::mae_loss")
def _mae_loss_op(
    imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix_loss: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, sum(mask)), both float32 scalars; the second is saved for the backward."""
    N, C, H, W = imgs.shape
    p = patch_size
    L = pred.shape[1]
    M = N * L
    mask = _loadable_mask(mask)
    block_p, block_m, num_warps = _blocks(p * p * C, M)
    num_programs = triton.cdiv(M, block_m)
    partial = empty((2, num_programs), torch.float32, imgs.device)
    launch(_mae_loss_fwd_kernel)[(num_programs,)](
        imgs,
        pred,
        mask,
        partial,
        M,
        L,
        W // p,
        *_strides(imgs, pred, mask),
        PATCH=int(p),
        C=int(C),
        NORM_PIX=bool(norm_pix_loss),
        BLOCK_M=block_m,
        BLOCK_P=block_p,
        num_warps=num_warps,
    )
    loss = empty((), torch.float32, imgs.device)
    mask_sum = empty((), torch.float32, imgs.device)
    launch(_mae_loss_final_kernel)[(1,)](partial, loss, mask_sum, num_programs, BLOCK=_FINAL_BLOCK)
    return loss, mask_sum


@kernel_op("fastmae::mae_loss_backward")
def _mae_loss_backward_op(
    grad_out: torch.Tensor,
    mask_sum: torch.Tensor,
    imgs: torch.Tensor,
    pred: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_pix_loss: bool,
) -> torch.Tensor:
    N, C, H, W = imgs.shape
    p = patch_size
    L = pred.shape[1]
    M = N * L
    block_p, block_m, num_warps = _blocks(p * p * C, M)
    mask = _loadable_mask(mask)
    grad_pred = empty(pred.shape, pred.dtype, pred.device)
    launch(_mae_loss_bwd_kernel)[(triton.cdiv(M, block_m),)](
        grad_out,
        mask_sum,
        imgs,
        pred,
        mask,
        grad_pred,
        M,
        L,
        W // p,
        *_strides(imgs, pred, mask),
        PATCH=int(p),
        C=int(C),
        NORM_PIX=bool(norm_pix_loss),
        BLOCK_M=block_m,
        BLOCK_P=block_p,
        num_warps=num_warps,
    )
    return grad_pred


@_mae_loss_op.register_fake
def _(imgs, pred, mask, patch_size, norm_pix_loss):
    return imgs.new_empty((), dtype=torch.float32), imgs.new_empty((), dtype=torch.float32)


# the fake of mae_loss_backward and the op's autograd: the same as the extension's
_autograd.register_mae_loss("fastmae")


# CPU tensors outside the interpreter run the reference.
def _mae_loss_cpu(imgs, pred, mask, patch_size, norm_pix_loss):
    return reference.mae_loss(imgs, pred, mask, patch_size, norm_pix_loss), mask.sum(dtype=torch.float32)


def _mae_loss_backward_cpu(grad_out, mask_sum, imgs, pred, mask, patch_size, norm_pix_loss):
    # torch.func.vjp: an op's kernel runs below the autograd key, where autograd records nothing
    (grad_pred,) = torch.func.vjp(lambda p: reference.mae_loss(imgs, p, mask, patch_size, norm_pix_loss), pred)[1](
        grad_out)
    return grad_pred


register_cpu_fallback(_mae_loss_op, _mae_loss_cpu)
register_cpu_fallback(_mae_loss_backward_op, _mae_loss_backward_cpu)


# ----------------------------------------------------------------------------- public
def mae_loss(
    imgs: torch.Tensor,
    pred: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_pix_loss: bool = False,
) -> torch.Tensor:
    """The MAE reconstruction loss, a 0-dim float32 tensor, as :func:`fastmae.reference.mae_loss`.

    Differentiable w.r.t. ``pred`` only (``imgs`` and ``mask`` are treated as data).
    """
    return torch.ops.fastmae.mae_loss(imgs, pred, mask, patch_size, norm_pix_loss)[0]
