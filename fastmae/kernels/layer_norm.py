"""LayerNorm, optionally fused with the residual add before it, forward and backward.

``add_layer_norm(x, residual, weight, bias, eps) -> (y, s)``: ``s = x + residual``,
``y = layer_norm(s) * weight + bias`` over the last dim ``D``; ``layer_norm(x, ...)`` is
the same without the add (and without writing ``s``). Each row of ``D`` values is
independent; ``M`` is the number of rows (the product of the leading dims).

Forward (:func:`_ln_fwd_kernel`): a program owns ``BLOCK_M`` consecutive rows as a
``(BLOCK_M, BLOCK_D)`` register tile, ``BLOCK_D = next_power_of_two(D)`` with the padding
lanes masked off. It reads ``x`` and ``residual`` once (any dtype, any strides), adds them
in float32, rounds the sum to ``residual_dtype`` and writes it as ``s``, then normalises
*that stored* ``s`` (so that the backward, which reads ``s``, sees exactly what the
forward normalised): ``mean = sum(s) / D``, ``var = sum((s - mean)^2) / D`` (two passes
over the tile in registers, no cancellation of ``E[s^2] - mean^2``), ``rstd = 1 /
sqrt(var + eps)``, ``y = (s - mean) * rstd * w + b``, rounded once to ``out_dtype``. It
also writes ``mean`` and ``rstd`` (float32, one per row). Saved for the backward: ``s``
(an output anyway; for ``layer_norm`` the input ``x``), ``mean``, ``rstd`` and ``weight``
-- never the normalised output.

Backward (:func:`_ln_bwd_kernel`), with ``dy`` the gradient of ``y`` and ``g`` that of
``s`` (the residual stream goes on past the norm), ``xhat = (s - mean) * rstd`` and
``wdy = w * dy``:

    ds = rstd * (wdy - xhat * mean(xhat * wdy) - mean(wdy)) + g
    dx = ds (in x's dtype),  d residual = ds (in residual's dtype)
    dW = sum over rows of dy * xhat,  dB = sum over rows of dy

One pass over the rows: a *persistent* grid of ``G`` programs, each owning
``tiles_per_program`` consecutive ``BLOCK_M``-row tiles, writes ``dx`` (and, when the
residual's dtype differs from x's, ``d residual``; when they agree the one tensor is
returned for both) and keeps its partial ``dW`` and ``dB`` in float32 registers across
its tiles. At the end it writes them as row ``pid`` of two ``(G, D)`` float32 buffers,
and :func:`_ln_dwdb_kernel` adds the ``G`` partials of each column in a fixed order. No
atomics: the gradients are bitwise identical from run to run.

``G`` is the trap Liger-Kernel fell into: with one program per SM the backward is
latency-bound (about 2x slower than torch's on H100). Here the backward's tiles are
``_BWD_TILE`` = 2048 elements (2 rows at D = 768, 4 at D = 512) with 4 warps, which ptxas
compiles to 114-120 registers a thread without spills for the model's dtypes (sm_90,
``python tests/_aot.py report --match _ln_bwd``): 4 programs (16 warps) fit an SM's 64 K
registers, 528 on the 132 SMs of an H100/H200. ``G`` is at most ``_BWD_PROGRAMS`` = 512,
one full wave at that occupancy (more programs would only queue behind it), and at least
one tile per program. The partials then cost ``2 G D 4`` bytes, written once and read
once: 2 x 3.1 MB at 12,800 x 768 (4% of the backward's 157 MB with a bf16 x and an fp32
residual), 2 x 2.1 MB at 50,432 x 512 (1% of 413 MB). This is a choice from those register counts and
this arithmetic, not from timings (no GPU was available when it was written);
``python -m benchmarks.bench_ops --sections norms`` measures it.

Math is in float32 (float64 when an input is float64); inputs and outputs can each be
float32, float16 or bfloat16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmae import reference
from fastmae._library import empty, interpreting, kernel_op, launch, register_cpu_fallback

__all__ = ["layer_norm", "add_layer_norm", "MAX_DIM"]

# The largest D the kernels take (the whole row is held in registers, padded to a power of two).
MAX_DIM = 2048
# Elements per (BLOCK_M, BLOCK_D) tile of the forward and the backward: BLOCK_M = max(1,
# _TILE // BLOCK_D) rows. The interpreter runs programs one after another at ~30 ms each
# and vectorises a tile with numpy, so there tiles are larger (fewer programs).
_TILE = 32768 if interpreting() else 4096
_BWD_TILE = 32768 if interpreting() else 2048
# At most this many programs in the backward's persistent grid (see the module doc).
_BWD_PROGRAMS = 512
# The dW/dB reduction: columns per program, and partial rows added per step.
_FINAL_COLS = 32
_FINAL_ROWS = 128


@triton.jit
def _row_offsets(rows, T, stride_b, stride_t):
    """Element offsets (int64) of rows ``m = b*T + t`` of a tensor whose leading dims are (B, T)."""
    rows = rows.to(tl.int64)
    return (rows // T) * stride_b + (rows % T) * stride_t


@triton.jit
def _ln_fwd_kernel(
    x_ptr,
    r_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    s_ptr,
    mean_ptr,
    rstd_ptr,
    M,
    D,
    eps,
    x_T,
    stride_xb,
    stride_xt,
    stride_xd,
    r_T,
    stride_rb,
    stride_rt,
    stride_rd,
    HAS_RES: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    STORE_S: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """y = LayerNorm(s) and s = x (+ residual) for BLOCK_M rows.

    Args:
        x_ptr: x, M rows of D values (leading dims (B, T) with strides), any float dtype.
        r_ptr: residual, like x (any float dtype); read only when HAS_RES.
        w_ptr, b_ptr: weight, bias (D,), contiguous; read only when HAS_W / HAS_B.
        y_ptr: output (M, D), contiguous, out_dtype.
        s_ptr: output (M, D), contiguous, residual_dtype; written only when STORE_S.
        mean_ptr, rstd_ptr: outputs (M,) in the math dtype ACC (float32, or float64).
        M, D: rows and row length.
        eps: added to the variance.
        x_T, stride_xb, stride_xt, stride_xd: x's second leading dim and strides, in elements.
        r_T, stride_rb, stride_rt, stride_rd: the same for residual.
        HAS_RES, HAS_W, HAS_B: residual / weight / bias given.
        STORE_S: write s (rounded to s's dtype; y normalises the rounded s).
        BLOCK_M: rows per program; BLOCK_D: power of two >= D.
    Grid: (cdiv(M, BLOCK_M),).
    """
    ACC = mean_ptr.dtype.element_ty
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < M
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    x_offs = _row_offsets(rows, x_T, stride_xb, stride_xt)[:, None] + cols[None, :].to(tl.int64) * stride_xd
    s = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(ACC)
    if HAS_RES:
        r_offs = _row_offsets(rows, r_T, stride_rb, stride_rt)[:, None] + cols[None, :].to(tl.int64) * stride_rd
        s += tl.load(r_ptr + r_offs, mask=mask, other=0.0).to(ACC)
    out_offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    if STORE_S:
        s_low = s.to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + out_offs, s_low, mask=mask)
        s = s_low.to(ACC)
    mean = tl.sum(s, axis=1) / D
    diff = tl.where(mask, s - mean[:, None], 0.0)
    var = tl.sum(diff * diff, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    y = diff * rstd[:, None]
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    tl.store(y_ptr + out_offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _ln_bwd_kernel(
    dy_ptr,
    g_ptr,
    s_ptr,
    mean_ptr,
    rstd_ptr,
    w_ptr,
    dx_ptr,
    dr_ptr,
    dw_part_ptr,
    db_part_ptr,
    M,
    D,
    tiles_per_program,
    dy_T,
    stride_dyb,
    stride_dyt,
    stride_dyd,
    g_T,
    stride_gb,
    stride_gt,
    stride_gd,
    s_T,
    stride_sb,
    stride_st,
    stride_sd,
    HAS_G: tl.constexpr,
    HAS_W: tl.constexpr,
    STORE_DR: tl.constexpr,
    PARTIALS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dx (and d residual) for ``tiles_per_program`` tiles of BLOCK_M rows, and this program's
    partial dW / dB.

    Args:
        dy_ptr: gradient of y, M rows of D (leading dims (B, T) with strides), any float dtype.
        g_ptr: gradient of s, like dy; read only when HAS_G.
        s_ptr: the forward's s (for layer_norm its input x), like dy.
        mean_ptr, rstd_ptr: (M,) from the forward, in the math dtype ACC.
        w_ptr: weight (D,), contiguous; read only when HAS_W.
        dx_ptr: output (M, D), contiguous, x's dtype.
        dr_ptr: output (M, D), contiguous, residual's dtype; written only when STORE_DR.
        dw_part_ptr, db_part_ptr: outputs (num_programs, D), ACC dtype: this program's
            sums of dy * xhat and of dy over its rows; written only when PARTIALS.
        M, D: rows and row length.
        tiles_per_program: consecutive BLOCK_M-row tiles each program owns.
        dy_T, stride_dy*: dy's second leading dim and strides (g_*, s_*: g's, s's).
        BLOCK_M: rows per tile; BLOCK_D: power of two >= D.
    Grid: (cdiv(cdiv(M, BLOCK_M), tiles_per_program),).
    """
    ACC = mean_ptr.dtype.element_ty
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    cols64 = cols.to(tl.int64)
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    dw = tl.zeros((BLOCK_D,), dtype=ACC)
    db = tl.zeros((BLOCK_D,), dtype=ACC)
    for i in range(0, tiles_per_program):
        rows = (pid * tiles_per_program + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        s_offs = _row_offsets(rows, s_T, stride_sb, stride_st)[:, None] + cols64[None, :] * stride_sd
        s = tl.load(s_ptr + s_offs, mask=mask, other=0.0).to(ACC)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
        dy_offs = _row_offsets(rows, dy_T, stride_dyb, stride_dyt)[:, None] + cols64[None, :] * stride_dyd
        dy = tl.load(dy_ptr + dy_offs, mask=mask, other=0.0).to(ACC)
        if HAS_W:
            wdy = dy * w[None, :]
        else:
            wdy = dy
        c1 = tl.sum(xhat * wdy, axis=1) / D
        c2 = tl.sum(wdy, axis=1) / D
        ds = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_G:
            g_offs = _row_offsets(rows, g_T, stride_gb, stride_gt)[:, None] + cols64[None, :] * stride_gd
            ds += tl.load(g_ptr + g_offs, mask=mask, other=0.0).to(ACC)
        out_offs = rows.to(tl.int64)[:, None] * D + cols64[None, :]
        tl.store(dx_ptr + out_offs, ds.to(dx_ptr.dtype.element_ty), mask=mask)
        if STORE_DR:
            tl.store(dr_ptr + out_offs, ds.to(dr_ptr.dtype.element_ty), mask=mask)
        if PARTIALS:
            dw += tl.sum(dy * xhat, axis=0)
            db += tl.sum(dy, axis=0)
    if PARTIALS:
        part_offs = pid.to(tl.int64) * D + cols
        tl.store(dw_part_ptr + part_offs, dw, mask=col_ok)
        tl.store(db_part_ptr + part_offs, db, mask=col_ok)


@triton.jit
def _ln_dwdb_kernel(
    dw_part_ptr,
    db_part_ptr,
    dw_ptr,
    db_ptr,
    num_partials,
    D,
    HAS_DW: tl.constexpr,
    HAS_DB: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dW[c] = sum_p dw_part[p, c] and dB likewise, over the partials in a fixed order.

    Args:
        dw_part_ptr, db_part_ptr: (num_partials, D) partial sums from _ln_bwd_kernel.
        dw_ptr, db_ptr: outputs (D,) in weight's / bias's dtype; written when HAS_DW / HAS_DB.
        num_partials: programs of the backward kernel.
        D: columns.
        BLOCK_G: partial rows added per step; BLOCK_N: columns per program.
    Grid: (cdiv(D, BLOCK_N),).
    """
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    acc_w = tl.zeros((BLOCK_G, BLOCK_N), dtype=dw_part_ptr.dtype.element_ty)
    acc_b = tl.zeros((BLOCK_G, BLOCK_N), dtype=db_part_ptr.dtype.element_ty)
    for start in range(0, num_partials, BLOCK_G):
        parts = start + tl.arange(0, BLOCK_G)
        mask = (parts < num_partials)[:, None] & col_ok[None, :]
        offs = parts.to(tl.int64)[:, None] * D + cols[None, :]
        if HAS_DW:
            acc_w += tl.load(dw_part_ptr + offs, mask=mask, other=0.0)
        if HAS_DB:
            acc_b += tl.load(db_part_ptr + offs, mask=mask, other=0.0)
    if HAS_DW:
        tl.store(dw_ptr + cols, tl.sum(acc_w, axis=0).to(dw_ptr.dtype.element_ty), mask=col_ok)
    if HAS_DB:
        tl.store(db_ptr + cols, tl.sum(acc_b, axis=0).to(db_ptr.dtype.element_ty), mask=col_ok)


# ----------------------------------------------------------------------------- host
def _blocks(D: int, M: int, tile: int) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_M, num_warps) for rows of D values, M rows, ``tile`` elements a tile."""
    block_d = triton.next_power_of_2(int(D))
    block_m = max(1, min(tile // block_d, triton.next_power_of_2(max(int(M), 1))))
    elems = block_m * block_d
    num_warps = 8 if elems >= 4096 else (4 if elems >= 1024 else 2)
    return block_d, block_m, num_warps


def bwd_grid(M: int, block_m: int) -> tuple[int, int]:
    """(programs, tiles per program) of the backward's persistent grid for M rows."""
    tiles = triton.cdiv(int(M), block_m)
    per = triton.cdiv(tiles, _BWD_PROGRAMS)
    return triton.cdiv(tiles, per), per


def _rows(t: torch.Tensor):
    """``(t, T, stride_b, stride_t, stride_d)``: t's leading dims as (B, T) with two strides
    (t's own strides: no copy), merging the dims that are contiguous with each other. A
    tensor whose leading dims do not merge into two (rank >= 4 with three or more
    non-mergeable leading strides) is copied to contiguous rows."""
    dims = [(n, st) for n, st in zip(t.shape[:-1], t.stride()[:-1]) if n != 1]
    merged: list[list[int]] = []
    for n, st in dims:
        if merged and merged[-1][1] == st * n:
            merged[-1] = [merged[-1][0] * n, st]
        else:
            merged.append([n, st])
    if len(merged) > 2:
        t = t.contiguous()
        merged = [[t.numel() // t.shape[-1], t.stride(-2)]]
    sd = t.stride(-1)
    if not merged:
        return t, 1, 0, 0, sd
    if len(merged) == 1:
        return t, 1, merged[0][1], 0, sd
    return t, merged[1][0], merged[0][1], merged[1][1], sd


def _forward(x, residual, weight, bias, eps, out_dtype, s_dtype):
    """(y, s or None, mean, rstd); s is written when ``s_dtype`` is not None."""
    D = x.shape[-1]
    M = x.numel() // D if D else 0
    acc = reference.layer_norm_math_dtype(x, residual, weight, bias)
    y = empty(x.shape, out_dtype, x.device)
    s = empty(x.shape, s_dtype, x.device) if s_dtype is not None else None
    mean = empty((M,), acc, x.device)
    rstd = empty((M,), acc, x.device)
    if M == 0:
        return y, s, mean, rstd
    block_d, block_m, num_warps = _blocks(D, M, _TILE)
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    x, x_T, sxb, sxt, sxd = _rows(x)
    if residual is not None:
        residual, r_T, srb, srt, srd = _rows(residual)
    else:
        r_T, srb, srt, srd = 1, 0, 0, 0
    # absent tensors are passed as x (never read): every pointer argument is a tensor
    launch(_ln_fwd_kernel)[(triton.cdiv(M, block_m),)](
        x,
        x if residual is None else residual,
        x if weight is None else weight,
        x if bias is None else bias,
        y,
        y if s is None else s,
        mean,
        rstd,
        M,
        D,
        float(eps),
        x_T,
        sxb,
        sxt,
        sxd,
        r_T,
        srb,
        srt,
        srd,
        HAS_RES=residual is not None,
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        STORE_S=s is not None,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return y, s, mean, rstd


@kernel_op("fastmae::add_layer_norm")
def _add_layer_norm_op(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    out_dtype: torch.dtype,
    residual_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, s, mean, rstd); mean and rstd (per row, the math dtype) are saved for the backward."""
    return _forward(x, residual, weight, bias, eps, out_dtype, residual_dtype)


@kernel_op("fastmae::layer_norm")
def _layer_norm_op(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd)."""
    y, _, mean, rstd = _forward(x, None, weight, bias, eps, out_dtype, None)
    return y, mean, rstd


@kernel_op("fastmae::layer_norm_backward")
def _layer_norm_backward_op(
    grad_y: torch.Tensor,
    grad_s: torch.Tensor | None,
    s: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    dx_dtype: torch.dtype,
    dres_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, d residual, dW, dB); d residual is written only when ``dres_dtype`` is given and
    differs from ``dx_dtype``, dW / dB when weight / bias are given; those not written are
    empty (shape (0,))."""
    D = s.shape[-1]
    M = s.numel() // D if D else 0
    dev = s.device
    dx = empty(s.shape, dx_dtype, dev)
    store_dr = dres_dtype is not None and dres_dtype != dx_dtype
    dr = empty(s.shape, dres_dtype, dev) if store_dr else empty((0,), dx_dtype, dev)
    dw = empty((D,), weight.dtype, dev) if weight is not None else empty((0,), dx_dtype, dev)
    db = empty((D,), bias.dtype, dev) if bias is not None else empty((0,), dx_dtype, dev)
    partials = weight is not None or bias is not None
    if M == 0:
        if partials:  # sums over no rows
            dw.zero_()
            db.zero_()
        return dx, dr, dw, db
    block_d, block_m, num_warps = _blocks(D, M, _BWD_TILE)
    programs, per = bwd_grid(M, block_m)
    dw_part = empty((programs, D) if partials else (1,), mean.dtype, dev)
    db_part = empty((programs, D) if partials else (1,), mean.dtype, dev)
    weight = None if weight is None else weight.contiguous()
    grad_y, dy_T, sdyb, sdyt, sdyd = _rows(grad_y)
    if grad_s is not None:
        grad_s, g_T, sgb, sgt, sgd = _rows(grad_s)
    else:
        g_T, sgb, sgt, sgd = 1, 0, 0, 0
    s, s_T, ssb, sst, ssd = _rows(s)
    launch(_ln_bwd_kernel)[(programs,)](  # absent tensors passed as one that is never read
        grad_y,
        grad_y if grad_s is None else grad_s,
        s,
        mean,
        rstd,
        s if weight is None else weight,
        dx,
        dr,
        dw_part,
        db_part,
        M,
        D,
        per,
        dy_T,
        sdyb,
        sdyt,
        sdyd,
        g_T,
        sgb,
        sgt,
        sgd,
        s_T,
        ssb,
        sst,
        ssd,
        HAS_G=grad_s is not None,
        HAS_W=weight is not None,
        STORE_DR=store_dr,
        PARTIALS=partials,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    if partials:
        launch(_ln_dwdb_kernel)[(triton.cdiv(D, _FINAL_COLS),)](
            dw_part,
            db_part,
            dw,
            db,
            programs,
            D,
            HAS_DW=weight is not None,
            HAS_DB=bias is not None,
            BLOCK_G=_FINAL_ROWS,
            BLOCK_N=_FINAL_COLS,
            num_warps=4,
        )
    return dx, dr, dw, db


@_add_layer_norm_op.register_fake
def _(x, residual, weight, bias, eps, out_dtype, residual_dtype):
    M = x.numel() // x.shape[-1] if x.shape[-1] else 0
    acc = reference.layer_norm_math_dtype(x, residual, weight, bias)
    return (x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape, dtype=residual_dtype),
            x.new_empty((M,), dtype=acc), x.new_empty((M,), dtype=acc))


@_layer_norm_op.register_fake
def _(x, weight, bias, eps, out_dtype):
    M = x.numel() // x.shape[-1] if x.shape[-1] else 0
    acc = reference.layer_norm_math_dtype(x, weight, bias)
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty((M,), dtype=acc), x.new_empty((M,), dtype=acc)


@_layer_norm_backward_op.register_fake
def _(grad_y, grad_s, s, mean, rstd, weight, bias, dx_dtype, dres_dtype):
    D = s.shape[-1]
    store_dr = dres_dtype is not None and dres_dtype != dx_dtype
    return (s.new_empty(s.shape, dtype=dx_dtype),
            s.new_empty(s.shape, dtype=dres_dtype) if store_dr else s.new_empty((0,), dtype=dx_dtype),
            s.new_empty((D,), dtype=weight.dtype) if weight is not None else s.new_empty((0,), dtype=dx_dtype),
            s.new_empty((D,), dtype=bias.dtype) if bias is not None else s.new_empty((0,), dtype=dx_dtype))


def _grads(ctx, grad_y, grad_s, s, mean, rstd, weight, bias, res_dtype):
    """(dx, d residual or None, dW or None, dB or None) from the outputs' gradients (either may be None)."""
    if grad_y is None:  # only s is used downstream: its gradient passes straight through the add
        if grad_s is None:
            return None, None, None, None
        dx = grad_s.to(ctx.x_dtype)
        return dx, None if res_dtype is None else grad_s.to(res_dtype), None, None
    dx, dr, dw, db = torch.ops.fastmae.layer_norm_backward(
        grad_y, grad_s, s, mean, rstd, weight, bias, ctx.x_dtype, res_dtype
    )
    if res_dtype is None:
        dr = None
    elif res_dtype == ctx.x_dtype:
        dr = dx  # one tensor for both: autograd copies it before accumulating into a second leaf
    return (dx, dr, dw if weight is not None and ctx.needs_w else None,
            db if bias is not None and ctx.needs_b else None)


def _setup_add(ctx, inputs, output):
    x, residual, weight, bias, eps, out_dtype, residual_dtype = inputs
    _, s, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(s, mean, rstd, weight, bias)
    ctx.x_dtype = x.dtype
    ctx.res_dtype = None if residual is None else residual.dtype
    ctx.needs_w, ctx.needs_b = ctx.needs_input_grad[2], ctx.needs_input_grad[3]


def _backward_add(ctx, grad_y, grad_s, grad_mean, grad_rstd):
    s, mean, rstd, weight, bias = ctx.saved_tensors
    dx, dr, dw, db = _grads(ctx, grad_y, grad_s, s, mean, rstd, weight, bias, ctx.res_dtype)
    return dx, dr, dw, db, None, None, None


def _setup_ln(ctx, inputs, output):
    x, weight, bias, eps, out_dtype = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, mean, rstd, weight, bias)
    ctx.x_dtype = x.dtype
    ctx.needs_w, ctx.needs_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2]


def _backward_ln(ctx, grad_y, grad_mean, grad_rstd):
    x, mean, rstd, weight, bias = ctx.saved_tensors
    dx, _, dw, db = _grads(ctx, grad_y, None, x, mean, rstd, weight, bias, None)
    return dx, dw, db, None, None


_add_layer_norm_op.register_autograd(_backward_add, setup_context=_setup_add)
_layer_norm_op.register_autograd(_backward_ln, setup_context=_setup_ln)


# CPU tensors outside the interpreter run the reference; the statistics in the math dtype, as the kernels.
def _add_layer_norm_cpu(x, residual, weight, bias, eps, out_dtype, residual_dtype):
    y, s = reference.add_layer_norm(x, residual, weight, bias, eps, out_dtype, residual_dtype)
    acc = reference.layer_norm_math_dtype(x, residual, weight, bias)
    var, mean = torch.var_mean(s.to(acc).reshape(-1, x.shape[-1]), dim=-1, correction=0)
    return y, s.clone() if s is x else s, mean, torch.rsqrt(var + eps)


def _layer_norm_cpu(x, weight, bias, eps, out_dtype):
    y, _, mean, rstd = _add_layer_norm_cpu(x, None, weight, bias, eps, out_dtype, x.dtype)
    return y, mean, rstd


def _layer_norm_backward_cpu(grad_y, grad_s, s, mean, rstd, weight, bias, dx_dtype, dres_dtype):
    """The backward formula of the module doc in plain PyTorch, from the saved statistics."""
    acc = mean.dtype
    D = s.shape[-1]
    dy = grad_y.to(acc).reshape(-1, D)
    xhat = (s.to(acc).reshape(-1, D) - mean[:, None]) * rstd[:, None]
    wdy = dy if weight is None else dy * weight.to(acc)
    c1 = (xhat * wdy).mean(-1, keepdim=True)
    c2 = wdy.mean(-1, keepdim=True)
    ds = (wdy - (xhat * c1 + c2)) * rstd[:, None]
    if grad_s is not None:
        ds = ds + grad_s.to(acc).reshape(-1, D)
    ds = ds.reshape(s.shape)
    store_dr = dres_dtype is not None and dres_dtype != dx_dtype
    def none():  # outputs must not alias each other
        return s.new_empty((0,), dtype=dx_dtype)

    return (ds.to(dx_dtype), ds.to(dres_dtype) if store_dr else none(),
            (dy * xhat).sum(0).to(weight.dtype) if weight is not None else none(),
            dy.sum(0).to(bias.dtype) if bias is not None else none())


register_cpu_fallback(_add_layer_norm_op, _add_layer_norm_cpu)
register_cpu_fallback(_layer_norm_op, _layer_norm_cpu)
register_cpu_fallback(_layer_norm_backward_op, _layer_norm_backward_cpu)


# ----------------------------------------------------------------------------- public
def _check_dim(x: torch.Tensor) -> None:
    if x.shape[-1] > MAX_DIM:
        raise ValueError(f"x's last dim D={x.shape[-1]} is above the Triton LayerNorm kernels' limit of {MAX_DIM}")


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
    residual_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, s)`` as :func:`fastmae.reference.add_layer_norm`; both differentiable."""
    _check_dim(x)
    out_dtype = out_dtype or x.dtype
    residual_dtype = residual_dtype or (x.dtype if residual is None else residual.dtype)
    y, s, _, _ = torch.ops.fastmae.add_layer_norm(x, residual, weight, bias, float(eps), out_dtype, residual_dtype)
    return y, s


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``y`` as :func:`fastmae.reference.layer_norm`."""
    _check_dim(x)
    return torch.ops.fastmae.layer_norm(x, weight, bias, float(eps), out_dtype or x.dtype)[0]
