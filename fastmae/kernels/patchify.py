"""Patchify / unpatchify: images (N, C, H, W) <-> patch tokens (N, L, p*p*C).

Pure data movement, so the kernels are built for memory bandwidth: every element is
read once and written once, and the *writes* are contiguous.

Index math (``p`` the patch size, ``h = H/p``, ``w = W/p``, ``D = p*p*C``, ``L = h*w``)::

    tokens[n, i*w + j, (r*p + q)*C + c] == imgs[n, c, i*p + r, j*p + q]

for ``0 <= i < h``, ``0 <= j < w``, ``0 <= r, q < p``, ``0 <= c < C``: patches in
row-major grid order, each flattened (row, column, channel), channel innermost -- the
official ``einsum('nchpwq->nhwpqc')``.

patchify
    One program per (image ``n``, patch row ``i``) and per ``BLOCK`` elements of that
    patch row's tokens. The ``w`` tokens of patch row ``i`` are one contiguous run
    ``tokens[n, i*w:(i+1)*w, :]`` of ``w*D`` elements, so a program stores a contiguous
    ``BLOCK``-slice of it. A flat offset ``e`` in that run decomposes as
    ``j = e // D, d = e % D, r = d // (p*C), q = (d // C) % p, c = d % C``, and the
    element comes from ``imgs[n, c, i*p + r, j*p + q]`` through the image's strides
    (any layout: channels-last, slices, ...). ``p`` and ``C`` are compile-time constants
    so these divisions are multiply-shifts. The read side gathers from the image stripe
    ``imgs[n, :, i*p:(i+1)*p, :]``, whose ``C*p`` rows are each read in full by the
    ``p*C``-periodic pattern, so reads stay cache-line friendly.

unpatchify
    The mirror image: one program per (image ``n``, patch row ``i``) and per ``BLOCK``
    elements of the output stripe ``out[n, :, i*p:(i+1)*p, :]``, which is ``C``
    contiguous runs of ``p*W`` elements. A flat offset ``e`` in the stripe decomposes as
    ``c = e // (p*W), r = (e // W) % p, x = e % W, j = x // p, q = x % p``, and the
    element comes from ``tokens[n, i*w + j, (r*p + q)*C + c]`` through the tokens'
    strides. ``p``, ``C`` and ``w`` are compile-time constants (one compilation per image
    width), so the divisions by ``W = w*p`` are multiply-shifts too.

Both ops may cast on the way (``out_dtype``), which costs nothing extra, and each is the
other's backward. Outputs are always contiguous.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastmae import _autograd, reference
from fastmae._library import empty, kernel_op, launch, register_cpu_fallback

__all__ = ["patchify", "unpatchify"]

# Elements of output stored per program (a power of two; tests lower it to exercise the
# multi-block and tail paths).
_BLOCK = 1024


@triton.jit
def _patchify_kernel(
    imgs_ptr,
    out_ptr,
    h,
    w,
    stride_n,
    stride_c,
    stride_h,
    stride_w,
    PATCH: tl.constexpr,
    C: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Copy one BLOCK-slice of the tokens of one patch row.

    Args:
        imgs_ptr: images (N, C, H, W), any strides.
        out_ptr: tokens (N, h*w, PATCH*PATCH*C), contiguous; its dtype is the output dtype.
        h, w: patch grid (H // PATCH, W // PATCH).
        stride_n, stride_c, stride_h, stride_w: strides of imgs, in elements.
        PATCH: patch size p.
        C: channels.
        BLOCK: elements per program.
    Grid: (N * h, cdiv(w * D, BLOCK)).
    """
    D = PATCH * PATCH * C  # constexpr: the divisions below are multiply-shifts
    pid_row = tl.program_id(0)  # n * h + i
    pid_blk = tl.program_id(1)
    n = pid_row // h
    i = pid_row % h

    e = pid_blk * BLOCK + tl.arange(0, BLOCK)  # flat offset in tokens[n, i*w:(i+1)*w, :]
    valid = e < w * D
    j = e // D
    d = e % D
    r = d // (PATCH * C)
    q = (d // C) % PATCH
    c = d % C

    src = imgs_ptr + n.to(tl.int64) * stride_n + c * stride_c + (i * PATCH + r) * stride_h + (j * PATCH + q) * stride_w
    x = tl.load(src, mask=valid)
    # Patch row i of image n starts at token n*L + i*w: a contiguous run of w*D elements.
    dst = out_ptr + pid_row.to(tl.int64) * w * D + e
    tl.store(dst, x.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _unpatchify_kernel(
    x_ptr,
    out_ptr,
    h,
    w: tl.constexpr,
    stride_n,
    stride_l,
    stride_d,
    PATCH: tl.constexpr,
    C: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Fill one BLOCK-slice of the image stripe of one patch row.

    Args:
        x_ptr: tokens (N, h*w, PATCH*PATCH*C), any strides.
        out_ptr: images (N, C, h*PATCH, w*PATCH), contiguous; its dtype is the output dtype.
        h, w: patch grid; w is a compile-time constant, so that the divisions by
            W = w*PATCH below are multiply-shifts (a runtime divisor costs ~20
            instructions a division, three times an element).
        stride_n, stride_l, stride_d: strides of x, in elements.
        PATCH: patch size p.
        C: channels.
        BLOCK: elements per program.
    Grid: (N * h, cdiv(C * PATCH * W, BLOCK)).
    """
    pid_row = tl.program_id(0)  # n * h + i
    pid_blk = tl.program_id(1)
    n = pid_row // h
    i = pid_row % h
    W = w * PATCH
    H = h * PATCH

    e = pid_blk * BLOCK + tl.arange(0, BLOCK)  # flat offset in the stripe out[n, :, i*p:(i+1)*p, :]
    valid = e < C * PATCH * W
    c = e // (PATCH * W)
    r = (e // W) % PATCH
    col = e % W
    j = col // PATCH
    q = col % PATCH

    src = x_ptr + n.to(tl.int64) * stride_n + (i * w + j) * stride_l + ((r * PATCH + q) * C + c) * stride_d
    v = tl.load(src, mask=valid)
    # out[n, c, i*p + r, col]; the channel planes are H*W apart.
    dst = out_ptr + n.to(tl.int64) * C * H * W + c * H * W + (i * PATCH + r) * W + col
    tl.store(dst, v.to(out_ptr.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------- ops
@kernel_op("fastmae::patchify")
def _patchify_op(imgs: torch.Tensor, patch_size: int, out_dtype: Optional[torch.dtype]) -> torch.Tensor:
    N, C, H, W = imgs.shape
    p = patch_size
    h, w = H // p, W // p
    D = p * p * C
    out = empty((N, h * w, D), out_dtype if out_dtype is not None else imgs.dtype, imgs.device)
    grid = (N * h, triton.cdiv(w * D, _BLOCK))
    launch(_patchify_kernel)[grid](
        imgs,
        out,
        h,
        w,
        imgs.stride(0),
        imgs.stride(1),
        imgs.stride(2),
        imgs.stride(3),
        PATCH=int(p),
        C=int(C),
        BLOCK=_BLOCK,
    )
    return out


@kernel_op("fastmae::unpatchify")
def _unpatchify_op(x: torch.Tensor, patch_size: int, h: int, w: int, out_dtype: Optional[torch.dtype]) -> torch.Tensor:
    N, L, D = x.shape
    p = patch_size
    C = D // (p * p)
    out = empty((N, C, h * p, w * p), out_dtype if out_dtype is not None else x.dtype, x.device)
    grid = (N * h, triton.cdiv(C * p * w * p, _BLOCK))
    launch(_unpatchify_kernel)[grid](
        x,
        out,
        h,
        int(w),
        x.stride(0),
        x.stride(1),
        x.stride(2),
        PATCH=int(p),
        C=int(C),
        BLOCK=_BLOCK,
    )
    return out


# Fakes and autograd (the backward of patchify is unpatchify of the gradient, back in the
# input's dtype, and vice versa), shared with the extension's ops.
_autograd.register_patchify("fastmae")


# CPU tensors outside the interpreter run the reference (copied: an op's output must not
# alias its input, and the reference may return a view when p == 1).
def _patchify_cpu(imgs, patch_size, out_dtype):
    out = reference.patchify(imgs, patch_size)
    return out.to(out_dtype if out_dtype is not None else imgs.dtype, copy=True)


def _unpatchify_cpu(x, patch_size, h, w, out_dtype):
    out = reference.unpatchify(x, patch_size, (h, w))
    return out.to(out_dtype if out_dtype is not None else x.dtype, copy=True)


register_cpu_fallback(_patchify_op, _patchify_cpu)
register_cpu_fallback(_unpatchify_op, _unpatchify_cpu)


# ----------------------------------------------------------------------------- public
def _square_side(L) -> int:
    """sqrt(L) for a perfect square L, also for a SymInt under torch.compile, where
    math.isqrt breaks the graph (exact: sqrt of a square below 2**52 is exact in float64)."""
    return int(L**0.5 + 0.5)


def patchify(imgs: torch.Tensor, patch_size: int, *, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), as :func:`fastmae.reference.patchify`.

    ``out_dtype`` casts on the way: the result equals ``reference.patchify(imgs, p).to(out_dtype)``.
    """
    return torch.ops.fastmae.patchify(imgs, patch_size, out_dtype)


def unpatchify(
    x: torch.Tensor,
    patch_size: int,
    grid_size: Optional[tuple[int, int]] = None,
    *,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """(N, L, p*p*C) -> (N, C, H, W), as :func:`fastmae.reference.unpatchify`.

    ``grid_size=(h, w)`` gives the patch grid (default square, ``h = w = sqrt(L)``);
    ``out_dtype`` casts on the way.
    """
    if grid_size is None:
        h = w = _square_side(x.shape[1])
    else:
        h, w = grid_size
    return torch.ops.fastmae.unpatchify(x, patch_size, h, w, out_dtype)
