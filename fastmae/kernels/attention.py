"""Memory-efficient (FlashAttention-2 style) softmax attention for MAE's short sequences.

``attention(q, k, v)`` computes ``softmax(q k^T * scale) v`` per (batch, head), non-causal,
on (B, N, H, D) tensors of any strides; ``attention_qkvpacked(qkv)`` reads the fused qkv
projection output (B, N, 3, H, D) through its strides, and its backward writes the
gradient in that same packed layout, so neither direction copies, stacks or permutes.

Forward (one program per block of BLOCK_M query rows of one (batch, head) pair)
    The scores ``S = q k^T`` are never stored. With ``qk_scale = scale * log2(e)`` the
    program walks over blocks of BLOCK_N keys keeping, per query row, the running maximum
    ``m`` of the (base-2) scores, the running sum ``l`` of ``exp2(s - m)`` and the
    unnormalised output ``acc``; when a new block raises the maximum, ``l`` and ``acc`` are
    rescaled by ``exp2(m_old - m_new)`` (the online softmax). At the end
    ``O = acc / l`` and the row's logsumexp ``lse = (m + log2 l) * ln 2`` (natural units,
    fp32, (B, H, N)) is stored for the backward.

    Short-sequence path: MAE's sequences are short (encoder 50 or 65 tokens, decoder 197 or
    257). When all N keys fit one tile (``ONE_KV_BLOCK``, BLOCK_N = the next power of two
    >= N), a program loads K and V once and does a plain, exact softmax: no loop, no
    rescaling.

Backward (FlashAttention-2)
    With ``P = exp(S * scale - lse)`` recomputed from the stored logsumexp and
    ``delta_i = sum_d dO_id O_id`` (= ``rowsum(P * dP)``):
    ``dV = P^T dO``, ``dP = dO V^T``, ``dS = P * (dP - delta)``, ``dQ = scale * dS K``,
    ``dK = scale * dS^T Q``.

    * short sequences (all keys of a (batch, head) pair in one tile, up to 256): one
      program per (batch, head) keeps K and V on chip, accumulates dK and dV in
      registers, and walks the queries BLOCK_M rows at a time; each step computes its
      rows' delta, S, P, dP and dS once and finishes their dQ (all keys are there), so
      the scores are computed once, nothing is reread and there is a single launch
      (BLOCK_M = BLOCK_N: the whole problem in one step);
    * otherwise three kernels: a preprocess computing delta; one program per block of
      keys accumulating dK, dV over all query blocks; one program per block of queries
      accumulating dQ over all key blocks. No atomics: the result is deterministic.

Reproducibility: with no atomics, a launch with a given config gives the same bits every
time. Which config runs is the autotuner's choice per (N, D, dtypes), made once per
process from timings; two processes may pick differently (near ties) and so round
differently. ``TRITON_CACHE_AUTOTUNING=1`` keeps the first choice on disk for later
processes.

Head dims up to :data:`MAX_HEAD_DIM` (128), any sequence length: padded keys get ``-inf``
scores, padded query rows read zeros (and a ``+inf`` logsumexp, so their probabilities are
0) and are never written. Head dims are padded to BLOCK_D = the next power of two
(80 -> 128) with masks on the D axis. fp16 and bf16 inputs are multiplied on the tensor
cores with fp32 accumulation (``P`` and ``dS`` are rounded to the input dtype before their
products, as in FlashAttention); fp32 inputs use ``input_precision="ieee"`` (no TF32).
"""

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from fastmae import reference
from fastmae._library import empty, interpreting, kernel_op, launch, register_cpu_fallback
from fastmae.ops import TRITON_ATTENTION_MAX_HEAD_DIM as MAX_HEAD_DIM

__all__ = ["attention", "attention_qkvpacked"]

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)

# Short-sequence paths: a (batch, head) problem is done in one tile when the padded sequence
# length is at most this many tokens and one K (or V) tile takes at most this many bytes.
SHORT_FWD_MAX_N = 256
SHORT_FWD_MAX_BYTES = 64 * 1024
SHORT_BWD_MAX_N = 256
SHORT_BWD_MAX_BYTES = 16 * 1024


# --------------------------------------------------------------------------- tiles
@triton.jit
def _load_tile(ptr, offs_r, offs_d, stride_r, stride_d, mask_r, mask_d):
    """Load a (rows, BLOCK_D) tile, zeros outside ``mask_r x mask_d``."""
    ptrs = ptr + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d
    return tl.load(ptrs, mask=mask_r[:, None] & mask_d[None, :], other=0.0)


@triton.jit
def _load_tile_t(ptr, offs_r, offs_d, stride_r, stride_d, mask_r, mask_d):
    """Load the transpose (BLOCK_D, rows) of a (rows, BLOCK_D) tile, zeros outside the masks."""
    ptrs = ptr + offs_r[None, :] * stride_r + offs_d[:, None] * stride_d
    return tl.load(ptrs, mask=mask_r[None, :] & mask_d[:, None], other=0.0)


@triton.jit
def _store_tile(ptr, val, offs_r, offs_d, stride_r, stride_d, mask_r, mask_d):
    """Store a (rows, BLOCK_D) tile inside ``mask_r x mask_d``, cast to ``ptr``'s dtype."""
    ptrs = ptr + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d
    tl.store(ptrs, val.to(ptr.dtype.element_ty), mask=mask_r[:, None] & mask_d[None, :])


# --------------------------------------------------------------------------- forward
@triton.jit
def _attn_fwd(
    Q,  # (B, N, H, D) queries, any strides
    K,  # (B, N, H, D) keys, any strides
    V,  # (B, N, H, D) values, any strides
    O,  # (B, N, H, D) output, written
    LSE,  # (B, H, N) fp32 contiguous, written: each query row's logsumexp (natural log)
    stride_qb, stride_qn, stride_qh, stride_qd,  # Q's strides, in elements
    stride_kb, stride_kn, stride_kh, stride_kd,  # K's strides
    stride_vb, stride_vn, stride_vh, stride_vd,  # V's strides
    stride_ob, stride_on, stride_oh, stride_od,  # O's strides
    H,  # number of heads
    N,  # sequence length
    qk_scale,  # softmax scale * log2(e): scores in base 2
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # next power of two >= D
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per inner step
    ONE_KV_BLOCK: tl.constexpr,  # BLOCK_N >= N: all keys in one tile, no loop
    DOT_PRECISION: tl.constexpr,  # tl.dot input_precision ("ieee" for fp32 inputs)
):
    # Program -> (batch, head, query block); the query blocks of one head are neighbours.
    pid = tl.program_id(0)
    num_m = tl.cdiv(N, BLOCK_M)
    bh = pid // num_m
    start_m = (pid % num_m) * BLOCK_M
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask_d = offs_d < HEAD_DIM

    q = _load_tile(Q + off_b * stride_qb + off_h * stride_qh, offs_m, offs_d, stride_qn, stride_qd, mask_m, mask_d)
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh

    if ONE_KV_BLOCK:
        # The whole sequence in one tile: an exact softmax, no rescaling.
        mask_n = offs_n < N
        kt = _load_tile_t(K, offs_n, offs_d, stride_kn, stride_kd, mask_n, mask_d)
        v = _load_tile(V, offs_n, offs_d, stride_vn, stride_vd, mask_n, mask_d)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))  # padded keys
        m_i = tl.max(s, 1)
        p = tl.math.exp2(s - m_i[:, None])
        l_i = tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        kt_ptrs = K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
        v_ptrs = V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
        for start_n in range(0, N, BLOCK_N):
            mask_n = start_n + offs_n < N
            kt = tl.load(kt_ptrs, mask=mask_n[None, :] & mask_d[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            kt_ptrs += BLOCK_N * stride_kn
            v_ptrs += BLOCK_N * stride_vn
            s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
            s = tl.where(mask_n[None, :], s, float("-inf"))
            # Online softmax: every block holds a real key, so m_new is finite.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

    acc = acc / l_i[:, None]
    O += off_b * stride_ob + off_h * stride_oh
    _store_tile(O, acc, offs_m, offs_d, stride_on, stride_od, mask_m, mask_d)
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # ln 2: back to natural units
    tl.store(LSE + bh.to(tl.int64) * N + offs_m, lse, mask=mask_m)


# --------------------------------------------------------------------------- backward
@triton.jit
def _attn_bwd_short(
    Q,  # (B, N, H, D) queries, any strides
    K,  # (B, N, H, D) keys, any strides
    V,  # (B, N, H, D) values, any strides
    O,  # (B, N, H, D) forward output, any strides
    DO,  # (B, N, H, D) gradient of the output, any strides
    LSE,  # (B, H, N) fp32 contiguous: the forward's logsumexp
    DQKV,  # (B, N, 3, H, D) written: dQ, dK, dV in slots 0, 1, 2
    stride_qb, stride_qn, stride_qh, stride_qd,  # Q's strides, in elements
    stride_kb, stride_kn, stride_kh, stride_kd,  # K's strides
    stride_vb, stride_vn, stride_vh, stride_vd,  # V's strides
    stride_ob, stride_on, stride_oh, stride_od,  # O's strides
    stride_dob, stride_don, stride_doh, stride_dod,  # DO's strides
    stride_gb, stride_gn, stride_gs, stride_gh, stride_gd,  # DQKV's strides (s: the q/k/v slot)
    H,  # number of heads
    N,  # sequence length, <= BLOCK_N
    sm_scale,  # softmax scale
    qk_scale,  # sm_scale * log2(e)
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # next power of two >= D
    BLOCK_M: tl.constexpr,  # query rows per step (tuned; > BLOCK_N only pads the one step)
    BLOCK_N: tl.constexpr,  # next power of two >= N (>= 16): all keys
    DOT_PRECISION: tl.constexpr,  # tl.dot input_precision ("ieee" for fp32 inputs)
):
    # One program does the whole backward of one (batch, head) pair on chip: K, V and the
    # dK, dV accumulators stay in registers while the queries go by BLOCK_M rows a step.
    bh = tl.program_id(0)
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < HEAD_DIM

    k = _load_tile(K + off_b * stride_kb + off_h * stride_kh, offs_n, offs_d, stride_kn, stride_kd, mask_n, mask_d)
    v = _load_tile(V + off_b * stride_vb + off_h * stride_vh, offs_n, offs_d, stride_vn, stride_vd, mask_n, mask_d)
    Q += off_b * stride_qb + off_h * stride_qh
    O += off_b * stride_ob + off_h * stride_oh
    DO += off_b * stride_dob + off_h * stride_doh
    LSE += bh.to(tl.int64) * N
    DQKV += off_b * stride_gb + off_h * stride_gh

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        rows = start_m + offs_m
        mask_m = rows < N
        q = _load_tile(Q, rows, offs_d, stride_qn, stride_qd, mask_m, mask_d)
        o = _load_tile(O, rows, offs_d, stride_on, stride_od, mask_m, mask_d)
        do = _load_tile(DO, rows, offs_d, stride_don, stride_dod, mask_m, mask_d).to(q.dtype)
        # Padded query rows get lse = +inf, hence P = 0.
        lse = tl.load(LSE + rows, mask=mask_m, other=float("inf")) * 1.4426950408889634
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))  # padded keys
        p = tl.math.exp2(s - lse[:, None])
        dv += tl.dot(tl.trans(p.to(q.dtype)), do, input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = (p * (dp - delta[:, None])).to(q.dtype)
        # All keys are here: these rows' dQ is complete.
        dq = tl.dot(ds, k, input_precision=DOT_PRECISION) * sm_scale
        _store_tile(DQKV, dq, rows, offs_d, stride_gn, stride_gd, mask_m, mask_d)
        dk += tl.dot(tl.trans(ds), q, input_precision=DOT_PRECISION)

    _store_tile(DQKV + stride_gs, dk * sm_scale, offs_n, offs_d, stride_gn, stride_gd, mask_n, mask_d)
    _store_tile(DQKV + 2 * stride_gs, dv, offs_n, offs_d, stride_gn, stride_gd, mask_n, mask_d)


@triton.jit
def _attn_bwd_preprocess(
    O,  # (B, N, H, D) forward output, any strides
    DO,  # (B, N, H, D) gradient of the output, any strides
    DELTA,  # (B, H, N) fp32 contiguous, written: rowsum(dO * O)
    stride_ob, stride_on, stride_oh, stride_od,  # O's strides, in elements
    stride_dob, stride_don, stride_doh, stride_dod,  # DO's strides
    H,  # number of heads
    N,  # sequence length
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # next power of two >= D
    BLOCK_M: tl.constexpr,  # rows per program
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(N, BLOCK_M)
    bh = pid // num_m
    offs_m = (pid % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask_d = offs_d < HEAD_DIM
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    o = _load_tile(O + off_b * stride_ob + off_h * stride_oh, offs_m, offs_d, stride_on, stride_od, mask_m, mask_d)
    do = _load_tile(DO + off_b * stride_dob + off_h * stride_doh, offs_m, offs_d, stride_don, stride_dod, mask_m, mask_d)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * N + offs_m, delta, mask=mask_m)


@triton.jit
def _attn_bwd_dkdv(
    Q,  # (B, N, H, D) queries, any strides
    K,  # (B, N, H, D) keys, any strides
    V,  # (B, N, H, D) values, any strides
    DO,  # (B, N, H, D) gradient of the output, any strides
    LSE,  # (B, H, N) fp32 contiguous: the forward's logsumexp
    DELTA,  # (B, H, N) fp32 contiguous: rowsum(dO * O)
    DQKV,  # (B, N, 3, H, D): dK and dV written into slots 1 and 2
    stride_qb, stride_qn, stride_qh, stride_qd,  # Q's strides, in elements
    stride_kb, stride_kn, stride_kh, stride_kd,  # K's strides
    stride_vb, stride_vn, stride_vh, stride_vd,  # V's strides
    stride_dob, stride_don, stride_doh, stride_dod,  # DO's strides
    stride_gb, stride_gn, stride_gs, stride_gh, stride_gd,  # DQKV's strides (s: the q/k/v slot)
    H,  # number of heads
    N,  # sequence length
    sm_scale,  # softmax scale
    qk_scale,  # sm_scale * log2(e)
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # next power of two >= D
    BLOCK_M: tl.constexpr,  # query rows per inner step
    BLOCK_N: tl.constexpr,  # keys per program
    DOT_PRECISION: tl.constexpr,  # tl.dot input_precision ("ieee" for fp32 inputs)
):
    # One program per block of keys of one (batch, head): dK, dV accumulate over all queries.
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    bh = pid // num_n
    offs_n = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < HEAD_DIM
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)

    k = _load_tile(K + off_b * stride_kb + off_h * stride_kh, offs_n, offs_d, stride_kn, stride_kd, mask_n, mask_d)
    v = _load_tile(V + off_b * stride_vb + off_h * stride_vh, offs_n, offs_d, stride_vn, stride_vd, mask_n, mask_d)
    qt_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[None, :] * stride_qn + offs_d[:, None] * stride_qd
    do_ptrs = DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod
    LSE += bh.to(tl.int64) * N
    DELTA += bh.to(tl.int64) * N

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        rows = start_m + offs_m
        mask_m = rows < N
        qt = tl.load(qt_ptrs, mask=mask_m[None, :] & mask_d[:, None], other=0.0)
        do = tl.load(do_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(k.dtype)
        qt_ptrs += BLOCK_M * stride_qn
        do_ptrs += BLOCK_M * stride_don
        # Padded query rows: lse = +inf, so their P^T columns are 0.
        lse = tl.load(LSE + rows, mask=mask_m, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + rows, mask=mask_m, other=0.0)
        # Transposed scores S^T (keys x queries): the rows of dK, dV are keys. Padded keys
        # (rows of S^T) only feed dK, dV rows that are never stored.
        st = tl.dot(k, qt, input_precision=DOT_PRECISION) * qk_scale
        pt = tl.math.exp2(st - lse[None, :])
        dv += tl.dot(pt.to(k.dtype), do, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dst = (pt * (dpt - delta[None, :])).to(k.dtype)
        dk += tl.dot(dst, tl.trans(qt), input_precision=DOT_PRECISION)

    DQKV += off_b * stride_gb + off_h * stride_gh
    _store_tile(DQKV + stride_gs, dk * sm_scale, offs_n, offs_d, stride_gn, stride_gd, mask_n, mask_d)
    _store_tile(DQKV + 2 * stride_gs, dv, offs_n, offs_d, stride_gn, stride_gd, mask_n, mask_d)


@triton.jit
def _attn_bwd_dq(
    Q,  # (B, N, H, D) queries, any strides
    K,  # (B, N, H, D) keys, any strides
    V,  # (B, N, H, D) values, any strides
    DO,  # (B, N, H, D) gradient of the output, any strides
    LSE,  # (B, H, N) fp32 contiguous: the forward's logsumexp
    DELTA,  # (B, H, N) fp32 contiguous: rowsum(dO * O)
    DQKV,  # (B, N, 3, H, D): dQ written into slot 0
    stride_qb, stride_qn, stride_qh, stride_qd,  # Q's strides, in elements
    stride_kb, stride_kn, stride_kh, stride_kd,  # K's strides
    stride_vb, stride_vn, stride_vh, stride_vd,  # V's strides
    stride_dob, stride_don, stride_doh, stride_dod,  # DO's strides
    stride_gb, stride_gn, stride_gs, stride_gh, stride_gd,  # DQKV's strides (s: the q/k/v slot)
    H,  # number of heads
    N,  # sequence length
    sm_scale,  # softmax scale
    qk_scale,  # sm_scale * log2(e)
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # next power of two >= D
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per inner step
    DOT_PRECISION: tl.constexpr,  # tl.dot input_precision ("ieee" for fp32 inputs)
):
    # One program per block of queries of one (batch, head): dQ accumulates over all keys.
    pid = tl.program_id(0)
    num_m = tl.cdiv(N, BLOCK_M)
    bh = pid // num_m
    offs_m = (pid % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask_d = offs_d < HEAD_DIM
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)

    q = _load_tile(Q + off_b * stride_qb + off_h * stride_qh, offs_m, offs_d, stride_qn, stride_qd, mask_m, mask_d)
    do = _load_tile(DO + off_b * stride_dob + off_h * stride_doh, offs_m, offs_d, stride_don, stride_dod, mask_m, mask_d)
    do = do.to(q.dtype)
    lse = tl.load(LSE + bh.to(tl.int64) * N + offs_m, mask=mask_m, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + bh.to(tl.int64) * N + offs_m, mask=mask_m, other=0.0)
    kt_ptrs = K + off_b * stride_kb + off_h * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    vt_ptrs = V + off_b * stride_vb + off_h * stride_vh + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        mask_n = start_n + offs_n < N
        mask_nd = mask_n[None, :] & mask_d[:, None]
        kt = tl.load(kt_ptrs, mask=mask_nd, other=0.0)
        vt = tl.load(vt_ptrs, mask=mask_nd, other=0.0)
        kt_ptrs += BLOCK_N * stride_kn
        vt_ptrs += BLOCK_N * stride_vn
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))  # padded keys
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        ds = (p * (dp - delta[:, None])).to(q.dtype)
        dq += tl.dot(ds, tl.trans(kt), input_precision=DOT_PRECISION)

    DQKV += off_b * stride_gb + off_h * stride_gh
    _store_tile(DQKV, dq * sm_scale, offs_m, offs_d, stride_gn, stride_gd, mask_m, mask_d)


# --------------------------------------------------------------------------- autotuning
def _configs(blocks, warps, stages):
    return [
        triton.Config(dict(b), num_warps=w, num_stages=s) for b in blocks for w in warps for s in stages
    ]


if interpreting():
    # One small fixed configuration: the interpreter runs programs one by one on the CPU.
    # BLOCK_M != BLOCK_N, so that a mix-up of the two axes cannot pass the tests.
    _FWD_SHORT = _configs([{"BLOCK_M": 32}], [4], [1])
    _FWD_LONG = _configs([{"BLOCK_M": 64, "BLOCK_N": 32}], [4], [1])
    # 32-row query steps: N = 50 takes two, 197 seven (and N <= 32 one).
    _BWD_SHORT = _configs([{"BLOCK_M": 32}], [4], [1])
    _BWD_DKDV = _configs([{"BLOCK_M": 32, "BLOCK_N": 64}], [4], [1])
    _BWD_DQ = _configs([{"BLOCK_M": 64, "BLOCK_N": 32}], [4], [1])
    _PRE_BLOCK_M = 32
else:
    # The one-tile kernels have no loop to pipeline: num_stages=1.
    _FWD_SHORT = _configs([{"BLOCK_M": m} for m in (32, 64, 128)], [4, 8], [1])
    # 128 x 128 tiles with 8 warps: the usual best on sm_90 at long N (Triton's tutorial
    # configs); the sm_90 builds fit (D = 128, 3 stages: 224 KiB of shared memory) unspilled.
    _FWD_LONG = _configs(
        [{"BLOCK_M": m, "BLOCK_N": n} for m in (64, 128) for n in (32, 64)], [4, 8], [2, 3]
    ) + _configs([{"BLOCK_M": 128, "BLOCK_N": 128}], [8], [2, 3])
    # BLOCK_M = BLOCK_N is the whole problem in one step; larger ones are pruned.
    _BWD_SHORT = _configs([{"BLOCK_M": m} for m in (16, 32, 64, 128)], [4, 8], [1])
    _BWD_DKDV = _configs(
        [{"BLOCK_M": m, "BLOCK_N": n} for m, n in ((32, 64), (32, 128), (64, 64), (64, 128))], [4, 8], [2, 3]
    )
    _BWD_DQ = _configs(
        [{"BLOCK_M": m, "BLOCK_N": n} for m, n in ((64, 32), (128, 32), (64, 64), (128, 64))], [4, 8], [2, 3]
    )
    _PRE_BLOCK_M = 64

_KEY = ["N", "HEAD_DIM"]


def _prune_query_steps(configs, named_args, **kwargs):
    """One-tile backward: drop query steps longer than the (padded) sequence (a longer
    step is correct, it only pads) and fp32 score tiles above 128 x 128 (64 KiB, a quarter
    of an SM's registers: the sm_90 builds at BLOCK_N = 256, BLOCK_M = 128 spill heavily),
    keeping the smallest step when nothing is left."""
    block_n = kwargs.get("BLOCK_N", named_args.get("BLOCK_N"))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= block_n and c.kwargs["BLOCK_M"] * block_n <= 128 * 128]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"])]


# The same forward kernel, tuned twice: with all keys in one tile (BLOCK_N chosen here from N)
# and with the key loop (BLOCK_N tuned).
_attn_fwd_short = triton.autotune(configs=_FWD_SHORT, key=_KEY)(_attn_fwd)
_attn_fwd_long = triton.autotune(configs=_FWD_LONG, key=_KEY)(_attn_fwd)
_attn_bwd_short_tuned = triton.autotune(
    configs=_BWD_SHORT, key=_KEY, prune_configs_by={"early_config_prune": _prune_query_steps}
)(_attn_bwd_short)
_attn_bwd_dkdv_tuned = triton.autotune(configs=_BWD_DKDV, key=_KEY)(_attn_bwd_dkdv)
_attn_bwd_dq_tuned = triton.autotune(configs=_BWD_DQ, key=_KEY)(_attn_bwd_dq)


# --------------------------------------------------------------------------- host side
def _pow2_at_least(n, lo: int = 16) -> int:
    """The smallest power of two >= max(n, lo), by comparisons only (``n`` may be symbolic)."""
    b = lo
    while b < n:
        b *= 2
    return b


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _resolve_scale(scale: Optional[float], D: int) -> float:
    return float(D) ** -0.5 if scale is None else float(scale)


def _strides(t: torch.Tensor):
    return tuple(t.stride())


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float]):
    """Launch the forward on (B, N, H, D) views of any strides; returns (out, lse)."""
    B, N, H, D = q.shape
    D = int(D)  # a compile-time constant of the kernels
    sm_scale = _resolve_scale(scale, D)
    out = empty((B, N, H, D), q.dtype, q.device)
    lse = empty((B, H, N), torch.float32, q.device)
    block_d = _pow2_at_least(D)
    block_n = _pow2_at_least(N)
    one_tile = block_n <= SHORT_FWD_MAX_N and block_n * block_d * q.element_size() <= SHORT_FWD_MAX_BYTES
    args = (q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out), H, N, sm_scale * LOG2E)
    grid = lambda META: (triton.cdiv(N, META["BLOCK_M"]) * B * H,)
    common = dict(HEAD_DIM=D, BLOCK_D=block_d, DOT_PRECISION=_dot_precision(q.dtype))
    if one_tile:
        launch(_attn_fwd_short)[grid](*args, BLOCK_N=block_n, ONE_KV_BLOCK=True, **common)
    else:
        launch(_attn_fwd_long)[grid](*args, ONE_KV_BLOCK=False, **common)
    return out, lse


def _backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: Optional[float],
) -> torch.Tensor:
    """Launch the backward; returns dqkv (B, N, 3, H, D), the gradients in the packed layout."""
    B, N, H, D = q.shape
    D = int(D)
    sm_scale = _resolve_scale(scale, D)
    dqkv = empty((B, N, 3, H, D), q.dtype, q.device)
    block_d = _pow2_at_least(D)
    block_n = _pow2_at_least(N)
    common = dict(HEAD_DIM=D, BLOCK_D=block_d, DOT_PRECISION=_dot_precision(q.dtype))
    if block_n <= SHORT_BWD_MAX_N and block_n * block_d * q.element_size() <= SHORT_BWD_MAX_BYTES:
        launch(_attn_bwd_short_tuned)[(B * H,)](
            q, k, v, out, dout, lse, dqkv,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(dout), *_strides(dqkv),
            H, N, sm_scale, sm_scale * LOG2E,
            BLOCK_N=block_n, **common,
        )  # fmt: skip
        return dqkv

    delta = empty((B, H, N), torch.float32, q.device)
    launch(_attn_bwd_preprocess)[(triton.cdiv(N, _PRE_BLOCK_M) * B * H,)](
        out, dout, delta, *_strides(out), *_strides(dout), H, N,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=_PRE_BLOCK_M,
    )  # fmt: skip
    args = (
        q, k, v, dout, lse, delta, dqkv,
        *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dqkv),
        H, N, sm_scale, sm_scale * LOG2E,
    )  # fmt: skip
    launch(_attn_bwd_dkdv_tuned)[lambda META: (triton.cdiv(N, META["BLOCK_N"]) * B * H,)](*args, **common)
    launch(_attn_bwd_dq_tuned)[lambda META: (triton.cdiv(N, META["BLOCK_M"]) * B * H,)](*args, **common)
    return dqkv


# --------------------------------------------------------------------------- ops
@kernel_op("fastmae::attention")
def _attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, N, H, D), lse (B, H, N) fp32) of softmax attention on (B, N, H, D) q, k, v."""
    return _forward(q, k, v, scale)


@kernel_op("fastmae::attention_qkvpacked")
def _attention_qkvpacked_op(qkv: torch.Tensor, scale: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, N, H, D), lse (B, H, N) fp32) of softmax attention on the packed qkv (B, N, 3, H, D)."""
    q, k, v = qkv.unbind(2)  # strided views: the kernel reads the packed tensor in place
    return _forward(q, k, v, scale)


@kernel_op("fastmae::attention_backward")
def _attention_backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """dqkv (B, N, 3, H, D): the gradients of q, k, v, packed."""
    return _backward(dout, q, k, v, out, lse, scale)


@_attention_op.register_fake
def _(q, k, v, scale=None):
    B, N, H, D = q.shape
    return q.new_empty((B, N, H, D)), q.new_empty((B, H, N), dtype=torch.float32)


@_attention_qkvpacked_op.register_fake
def _(qkv, scale=None):
    B, N, _, H, D = qkv.shape
    return qkv.new_empty((B, N, H, D)), qkv.new_empty((B, H, N), dtype=torch.float32)


@_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, scale=None):
    B, N, H, D = q.shape
    return q.new_empty((B, N, 3, H, D))


# Autograd. lse is an auxiliary output (saved for the backward), not differentiable.
def _setup_context(ctx, inputs, output):
    *tensors, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(*tensors, out, lse)
    ctx.scale = scale


def _attention_bwd(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(dout, q, k, v, out, lse, ctx.scale).unbind(2)
    return dq, dk, dv, None


def _attention_qkvpacked_bwd(ctx, dout, dlse):
    qkv, out, lse = ctx.saved_tensors
    q, k, v = qkv.unbind(2)
    return _attention_backward_op(dout, q, k, v, out, lse, ctx.scale), None


_attention_op.register_autograd(_attention_bwd, setup_context=_setup_context)
_attention_qkvpacked_op.register_autograd(_attention_qkvpacked_bwd, setup_context=_setup_context)


# CPU tensors outside the interpreter run the plain-PyTorch reference.
def _reference_lse(q, k, scale):
    s = torch.einsum("bnhd,bmhd->bhnm", q.float(), k.float()) * _resolve_scale(scale, q.shape[-1])
    return torch.logsumexp(s, dim=-1)


def _attention_cpu(q, k, v, scale=None):
    return reference.attention(q, k, v, scale).contiguous(), _reference_lse(q, k, scale)


def _attention_qkvpacked_cpu(qkv, scale=None):
    return _attention_cpu(*qkv.unbind(2), scale)


def _attention_backward_cpu(dout, q, k, v, out, lse, scale=None):
    # torch.func.vjp: an op's kernel runs below the autograd key, where autograd records nothing
    qkv = torch.stack((q, k, v), dim=2)
    (dqkv,) = torch.func.vjp(lambda t: reference.attention_qkvpacked(t, scale), qkv)[1](dout)
    return dqkv


register_cpu_fallback(_attention_op, _attention_cpu)
register_cpu_fallback(_attention_qkvpacked_op, _attention_qkvpacked_cpu)
register_cpu_fallback(_attention_backward_op, _attention_backward_cpu)


# --------------------------------------------------------------------------- public
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """softmax(q k^T * scale) v for (B, N, H, D) q, k, v of any strides; (B, N, H, D) result.

    ``scale`` defaults to ``D ** -0.5``. Differentiable.
    """
    _check_head_dim(q.shape[-1])
    return _attention_op(q, k, v, scale)[0]


def attention_qkvpacked(qkv: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """:func:`attention` on the fused projection output ``qkv`` (B, N, 3, H, D), read in place;
    its gradient is written in the same packed layout."""
    _check_head_dim(qkv.shape[-1])
    return _attention_qkvpacked_op(qkv, scale)[0]


def _check_head_dim(D: int) -> None:
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head dim D={D} (the last dim of q, k, v) is above the Triton attention kernels' "
                         f"limit of {MAX_HEAD_DIM}; use backend='sdpa' or 'auto'")
