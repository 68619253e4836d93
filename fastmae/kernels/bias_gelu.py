"""Bias + exact GELU, ``y = gelu(x + bias)``, and its backward with the bias gradient fused in.

In every transformer block's MLP (fc1 -> GELU -> fc2) fc1 runs as ``F.linear(x, fc1.weight)``
without its bias, and this op adds the bias and applies the GELU in one pass over the
pre-activation, instead of the stock path's bias epilogue, GELU kernel and, in the
backward, GELU-backward kernel plus a separate column-sum kernel for the bias gradient.

``x`` is viewed as ``(M, H)`` rows (``M`` = the product of its leading dims; ``reshape``
copies only when those dims cannot be flattened into one, any other strides, a
last-dim stride other than 1 included, are read in place, uncoalesced). All math is in
float32, whatever the input dtypes: ``v = float(x) + float(bias)``,
``gelu(v) = 0.5 v (1 + erf(v / sqrt(2)))`` (the exact GELU, ``F.gelu(approximate="none")``).

Forward. Program ``(i, j)`` of a ``(cdiv(M, BLOCK_M), cdiv(H, BLOCK_H))`` grid owns a
``(BLOCK_M, BLOCK_H)`` tile: it loads the tile of ``x`` and the ``BLOCK_H`` bias values,
and stores ``gelu(v)`` in ``x``'s dtype. It reads ``M H`` activations and ``H`` bias
values and writes ``M H`` activations: the memory floor. ``BLOCK_H`` is the power of two
(at most ``_MAX_BLOCK_H``) that pads ``H`` least (3072 = 3 x 1024, 768 = 3 x 256), so the
column dimension is covered by a few column blocks rather than one tile of
``next_power_of_two(H)`` lanes.

Backward. ``dv = dy * gelu'(v)`` with ``gelu'(v) = Phi(v) + v phi(v) = 0.5 (1 + erf(v /
sqrt 2)) + v exp(-v^2 / 2) / sqrt(2 pi)`` (torch's ``gelu_backward``), ``v`` recomputed
from the saved ``x`` and ``bias``; ``dx = dv`` in ``x``'s dtype, ``dbias = sum_m dv``.

1. ``_bias_gelu_bwd_kernel``, a persistent grid ``(P, cdiv(H, BLOCK_H))``: program
   ``(p, j)`` walks the row tiles ``p, p + P, p + 2P, ...`` of column block ``j``, writes
   each ``dx`` tile and adds ``dv`` into a ``(BLOCK_M, BLOCK_H)`` float32 tile held in
   registers; at the end it sums that tile's rows and writes ``partial[p, cols]`` of a
   float32 ``(P, H)`` buffer. ``P`` is ``_PROGRAMS_PER_SM`` programs per SM over the column
   blocks, and never more than the row tiles: several programs per SM, not one
   (Liger-Kernel's LayerNorm backward, with one program per SM, leaves too few loads in
   flight to saturate HBM). The register report (``python tests/_aot.py report --match
   _bias``, evidence, not a speed claim) puts the 4096-element, 8-warp tile at ~120
   registers a thread (16 elements a thread; 4 warps, 32 elements a thread, take 190-255
   and spill), so about two such programs fit an SM at once: four per SM are two full
   waves whatever the real occupancy. The buffer stays small: ``P H 4`` bytes, ~2 MB at
   H = 3072 on an H200, against the ~236 MB of ``dy``, ``x``, ``dx`` traffic.
2. ``_bias_grad_kernel``, grid ``cdiv(H, _FINAL_BLOCK_H)``: each program adds the ``P``
   partial rows of its columns, ``_FINAL_BLOCK_P`` rows at a time, in a fixed order, and
   stores ``dbias`` in ``bias``'s dtype.

No atomics: every addition's order is fixed by ``(M, H, P)`` and the block sizes, so the
gradients are bitwise identical from run to run on a device (``P`` depends on its SM
count).

``dbias`` sums the float32 ``dv``, not ``dx`` rounded to ``x``'s dtype: it is the
gradient of the op as defined (float32 math, the reference's autograd gives exactly
this sum, up to its order), and the more accurate one. The stock bf16 model differs: its
Linear's bias gradient is the sum of the bf16 gradient of the GELU input, so each of the
``M`` terms carries a rounding of up to 2^-9 relative that this op does not have.

Saved for the backward: ``x`` (the pre-activation minus the bias, in its input dtype)
and ``bias``, nothing else (no ``v``, no ``y``).

Why not ``torch._addmm_activation(bias, mat1, mat2, use_gelu=True)`` (cuBLASLt's
``CUBLASLT_EPILOGUE_GELU_BIAS``) for the forward: on CUDA its GELU is the tanh
approximation, not the exact GELU this op computes. Evidence, torch 2.14.1:
``torch/_decomp/decompositions.py`` decomposes ``aten._addmm_activation`` as
``aten.gelu(out, approximate="tanh")`` when ``self.is_cuda`` and ``aten.gelu(out)`` (erf)
otherwise; ``aten/src/ATen/native/cuda/Blas.cpp``, when the cuBLASLt epilogue is not
used, applies ``at::gelu_(result, "tanh")`` to match it. On the CPU (checked here:
``_addmm_activation`` in float64 equals ``F.gelu(addmm(...))`` exactly and differs from the
tanh form by ~5e-4) it is the erf GELU, so CPU tests cannot show the difference. It also
has no derivative ("derivative for aten::_addmm_activation is not implemented") and does
not return the pre-activation the backward needs. ``benchmarks/bench_ops.py`` still
measures it beside ``F.linear`` + this op, for the figure.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmae import reference
from fastmae._library import empty, interpreting, kernel_op, launch, register_cpu_fallback

__all__ = ["bias_gelu"]

# Elements per (BLOCK_M, BLOCK_H) tile of both main kernels (BLOCK_M = _TILE // BLOCK_H
# rows); the widest column block; backward programs per SM (over all column blocks); the
# final reduction's (rows, columns) per step. Powers of two. The interpreter runs each
# program as numpy code, so larger tiles there mean fewer, equally cheap programs; the
# ahead-of-time compile (tests/_aot.py) takes the values of a GPU import. Tests lower them
# to exercise many programs and loop iterations.
_TILE = 65536 if interpreting() else 4096
_MAX_BLOCK_H = 1024
_PROGRAMS_PER_SM = 4
_FINAL_BLOCK_P = 64
_FINAL_BLOCK_H = 32
# Backward row programs (P) when the device has no SM count (CPU tensors under the
# interpreter); tests set it.
_CPU_ROW_PROGRAMS = 4


@triton.jit
def _gelu_terms(v):
    """(Phi(v), phi(v)) in float32: the standard normal CDF and density at ``v``."""
    cdf = 0.5 * (1.0 + tl.erf(v * 0.7071067811865476))  # 1 / sqrt(2)
    pdf = tl.exp(-0.5 * v * v) * 0.3989422804014327  # 1 / sqrt(2 pi)
    return cdf, pdf


@triton.jit
def _bias_gelu_fwd_kernel(
    x_ptr,
    bias_ptr,
    y_ptr,
    M,
    H,
    stride_xm,
    stride_xh,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """y = gelu(x + bias) on one (BLOCK_M, BLOCK_H) tile.

    Args:
        x_ptr: pre-activation (M, H), any strides and float dtype.
        bias_ptr: bias (H,), contiguous, any float dtype.
        y_ptr: output (M, H), contiguous, x's dtype.
        M, H: rows and columns.
        stride_xm, stride_xh: strides of x, in elements.
        BLOCK_M, BLOCK_H: tile shape (powers of two).
    Grid: (cdiv(M, BLOCK_M), cdiv(H, BLOCK_H)).
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    mask = (rows < M)[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols64[None, :] * stride_xh, mask=mask, other=0.0)
    b = tl.load(bias_ptr + cols, mask=col_ok, other=0.0)
    v = x.to(tl.float32) + b.to(tl.float32)[None, :]
    cdf, _ = _gelu_terms(v)
    tl.store(y_ptr + rows64[:, None] * H + cols64[None, :], (v * cdf).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    dy_ptr,
    x_ptr,
    bias_ptr,
    dx_ptr,
    partial_ptr,
    M,
    H,
    stride_dym,
    stride_dyh,
    stride_xm,
    stride_xh,
    num_row_tiles,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """dx = dy * gelu'(x + bias) over row tiles pid(0), pid(0) + P, ... of one column block,
    and that program's partial column sums of dx (float32, before rounding).

    Args:
        dy_ptr: gradient of y (M, H), any strides and float dtype.
        x_ptr, bias_ptr: the forward's inputs (x any strides, bias contiguous).
        dx_ptr: output (M, H), contiguous, x's dtype.
        partial_ptr: float32 (P, H) output: row p = this program's sum over its rows.
        M, H: rows and columns.
        stride_dym, stride_dyh, stride_xm, stride_xh: strides of dy and x, in elements.
        num_row_tiles: cdiv(M, BLOCK_M).
        BLOCK_M, BLOCK_H: tile shape (powers of two).
    Grid: (P, cdiv(H, BLOCK_H)), P <= num_row_tiles.
    """
    pid_p = tl.program_id(0)
    num_p = tl.num_programs(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    cols64 = cols.to(tl.int64)
    b = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for tile in range(pid_p, num_row_tiles, num_p):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols64[None, :] * stride_xh, mask=mask, other=0.0)
        dy = tl.load(dy_ptr + rows64[:, None] * stride_dym + cols64[None, :] * stride_dyh, mask=mask, other=0.0)
        v = x.to(tl.float32) + b[None, :]
        cdf, pdf = _gelu_terms(v)
        dv = dy.to(tl.float32) * (cdf + v * pdf)
        tl.store(dx_ptr + rows64[:, None] * H + cols64[None, :], dv.to(dx_ptr.dtype.element_ty), mask=mask)
        acc += tl.where(mask, dv, 0.0)
    tl.store(partial_ptr + pid_p.to(tl.int64) * H + cols64, tl.sum(acc, axis=0), mask=col_ok)


@triton.jit
def _bias_grad_kernel(partial_ptr, dbias_ptr, P, H, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr):
    """dbias[cols] = sum over p of partial[p, cols], BLOCK_P rows a step, in a fixed order.

    Args:
        partial_ptr: float32 (P, H) from _bias_gelu_bwd_kernel.
        dbias_ptr: output (H,), bias's dtype.
        P, H: partial rows and columns.
        BLOCK_P, BLOCK_H: rows added per step, columns per program (powers of two).
    Grid: (cdiv(H, BLOCK_H),).
    """
    cols = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    acc = tl.zeros((BLOCK_P, BLOCK_H), dtype=tl.float32)
    for start in range(0, P, BLOCK_P):
        r = start + tl.arange(0, BLOCK_P)
        offs = r.to(tl.int64)[:, None] * H + cols[None, :]
        acc += tl.load(partial_ptr + offs, mask=(r < P)[:, None] & col_ok[None, :], other=0.0)
    tl.store(dbias_ptr + cols, tl.sum(acc, axis=0).to(dbias_ptr.dtype.element_ty), mask=col_ok)


# ----------------------------------------------------------------------------- host
def _block_h(H: int) -> int:
    """The power of two <= _MAX_BLOCK_H (and >= min(128, next_power_of_two(H))) covering H
    with the fewest padding lanes; the widest on ties."""
    top = min(triton.next_power_of_2(int(H)), _MAX_BLOCK_H)
    bottom = min(128, top)
    best, b = top, top
    while b >= bottom:
        if triton.cdiv(H, b) * b < triton.cdiv(H, best) * best:
            best = b
        b //= 2
    return best


def _blocks(M: int, H: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_H, num_warps) for an (M, H) pre-activation."""
    block_h = _block_h(H)
    block_m = max(1, min(_TILE // block_h, triton.next_power_of_2(int(M))))
    num_warps = 8 if block_m * block_h >= 4096 else 4  # 16 elements a thread at most: see the module doc
    return block_m, block_h, num_warps


def _row_programs(num_row_tiles: int, num_col_blocks: int, device: torch.device) -> int:
    """P, the backward's row programs per column block."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        target = max(1, sms * _PROGRAMS_PER_SM // num_col_blocks)
    else:
        target = _CPU_ROW_PROGRAMS
    return max(1, min(int(num_row_tiles), target))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as (M, H); a view unless its leading dims cannot be flattened into one."""
    return t.reshape(-1, t.shape[-1])


@kernel_op("fastmae::bias_gelu")
def _bias_gelu_op(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    H = x.shape[-1]
    x2 = _rows(x)
    bias = bias.contiguous()
    M = x2.shape[0]
    y = empty(x.shape, x.dtype, x.device)
    if M * H == 0:
        return y
    block_m, block_h, num_warps = _blocks(M, H)
    launch(_bias_gelu_fwd_kernel)[(triton.cdiv(M, block_m), triton.cdiv(H, block_h))](
        x2, bias, y, M, H, *x2.stride(), BLOCK_M=block_m, BLOCK_H=block_h, num_warps=num_warps
    )
    return y


@kernel_op("fastmae::bias_gelu_backward")
def _bias_gelu_backward_op(
    grad_y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx in x's dtype and shape, dbias in bias's dtype)."""
    H = x.shape[-1]
    x2 = _rows(x)
    dy2 = _rows(grad_y)
    bias = bias.contiguous()
    M = x2.shape[0]
    dx = empty(x.shape, x.dtype, x.device)
    dbias = empty((H,), bias.dtype, bias.device)
    if M * H == 0:
        dbias.zero_()
        return dx, dbias
    block_m, block_h, num_warps = _blocks(M, H)
    num_row_tiles = triton.cdiv(M, block_m)
    num_col_blocks = triton.cdiv(H, block_h)
    P = _row_programs(num_row_tiles, num_col_blocks, x.device)
    partial = empty((P, H), torch.float32, x.device)
    launch(_bias_gelu_bwd_kernel)[(P, num_col_blocks)](
        dy2, x2, bias, dx, partial, M, H, *dy2.stride(), *x2.stride(), num_row_tiles,
        BLOCK_M=block_m, BLOCK_H=block_h, num_warps=num_warps,
    )  # fmt: skip
    launch(_bias_grad_kernel)[(triton.cdiv(H, _FINAL_BLOCK_H),)](
        partial, dbias, P, H, BLOCK_P=_FINAL_BLOCK_P, BLOCK_H=_FINAL_BLOCK_H
    )
    return dx, dbias


@_bias_gelu_op.register_fake
def _(x, bias):
    return x.new_empty(x.shape)


@_bias_gelu_backward_op.register_fake
def _(grad_y, x, bias):
    return x.new_empty(x.shape), bias.new_empty((x.shape[-1],))


def _setup_context(ctx, inputs, output):
    x, bias = inputs
    ctx.save_for_backward(x, bias)  # only the inputs: v is recomputed, y is not kept


def _backward(ctx, grad_y):
    x, bias = ctx.saved_tensors
    dx, dbias = torch.ops.fastmae.bias_gelu_backward(grad_y, x, bias)
    return (dx if ctx.needs_input_grad[0] else None), (dbias if ctx.needs_input_grad[1] else None)


_bias_gelu_op.register_autograd(_backward, setup_context=_setup_context)


# CPU tensors outside the interpreter run the reference.
def _bias_gelu_cpu(x, bias):
    return reference.bias_gelu(x, bias).contiguous()


def _bias_gelu_backward_cpu(grad_y, x, bias):
    # torch.func.vjp, not torch.autograd.grad: an op's kernel runs below the autograd key, where
    # autograd records nothing
    dx, dbias = torch.func.vjp(reference.bias_gelu, x, bias)[1](grad_y)
    return dx.contiguous(), dbias


register_cpu_fallback(_bias_gelu_op, _bias_gelu_cpu)
register_cpu_fallback(_bias_gelu_backward_op, _bias_gelu_backward_cpu)


# ----------------------------------------------------------------------------- public
def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu(x + bias)`` (exact erf GELU, float32 math) in ``x``'s dtype, as
    :func:`fastmae.reference.bias_gelu`; differentiable w.r.t. ``x`` and ``bias``."""
    return torch.ops.fastmae.bias_gelu(x, bias)
