"""MAE random masking and the fused encoder input.

The official ``forward_encoder`` does, after ``patch_embed``::

    x = x + pos_embed[:, 1:, :]
    noise = torch.rand(N, L)                       # random_masking:
    ids_shuffle = torch.argsort(noise, dim=1)      #   small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :len_keep, None].repeat(1, 1, D))
    mask = torch.gather(ones with zeros[:len_keep], 1, ids_restore)
    x = torch.cat((cls_token + pos_embed[:, :1, :]).expand(N, -1, -1), x), dim=1)

Two kernels do the same.

1. ``_rank_kernel`` computes the shuffle. The reference's ``ids_restore`` is the rank of
   each token in the stable ascending order of its noise, so it is computed directly, by
   counting: ``rank[i] = #{j : key[j] < key[i] or (key[j] == key[i] and j < i)}``, the
   ties broken by index exactly as a stable argsort breaks them. The key is an
   order-preserving integer image of the noise: the float's bits, with all but the sign
   flipped for negative values (signed-integer order = float order), -0 folded onto +0 and
   every NaN onto one NaN above +inf, as torch orders them. fp16/bf16/fp32 noise gives a
   32-bit key (the conversion to fp32 is exact), float64 noise a 64-bit one, with no loss:
   the comparison takes any key width, where a packed (key, index) sort would not. (A
   32-bit key is packed with its index into one int64, so a pair costs one compare; a
   64-bit key is compared, then the indices.)
   Then ``ids_restore[i] = rank[i]``, ``mask[i] = rank[i] >= len_keep`` and, a scatter,
   ``ids_keep[rank[i]] = i`` for the kept ranks (a permutation: each written once).
   The grid is (sample, block of tokens), each program comparing its block against all of
   the row's keys in tiles: O(L^2) compares a sample, 38k for ViT-B's L = 196, which is
   nothing, and as parallel as the data. (A ``tl.sort`` of packed keys, one program a
   sample, would need a scatter through memory for ``ids_restore`` and two passes with a
   barrier for 64-bit keys; under the Triton interpreter its bitonic network also costs
   seconds a row, which would leave the tests unable to cover the model shapes.) The
   quadratic count is why L is limited, to :data:`MAX_TOKENS`.
   Without user noise it is drawn in the kernel with Philox (``tl.rand``, one stream
   element per token, recomputed wherever a key is needed) from a seed drawn with
   torch's generator on the tensors' device and passed as a one-element tensor (no host
   sync, no graph break), so ``torch.manual_seed`` reproduces it.

2. ``_gather_kernel``, over (sample, block of output rows, block of channels), writes the
   ``(N, 1 + len_keep, D)`` tokens: row 0 is ``cls_token + pos_embed[0]``, row ``1 + t`` is
   ``x[ids_keep[t]] + pos_embed[1 + ids_keep[t]]``. This is where the traffic is (all of
   ``x``'s kept rows); it gets a grid with as many programs as the data wants, whereas the
   ranking is tiny (L keys a sample), so the two are not fused: the gather needs the whole
   row's ranks before it can read any row (a fused kernel would rank the whole row in every
   program, or serialise the gather behind one program a sample). The second launch costs a
   few microseconds and ``len_keep`` int32 indices a sample.
   Adds are done as torch does them (operands converted to the output dtype, added in fp32
   for fp16/bf16 and rounded once), so the tokens are bit-for-bit the reference's.
   Without ``pos_embed``/``cls_token`` (:func:`random_masking`) it is a plain row gather.

Backward. The gradient of the gathered tokens goes back to the kept positions and is zero
at the removed ones: ``grad_x[n, l] = g[n, 1 + ids_restore[n, l]]`` if that is ``< len_keep``,
else 0. That is the decoder's unshuffle with no cls row, a zero mask token and no position
embedding (:func:`fastmae.kernels.unshuffle.unshuffle_rows`), a gather by ``ids_restore``
that writes every element once (no atomics). ``grad pos_embed[1:]`` is its batch sum and
``grad pos_embed[0] = grad cls_token = g[:, 0]`` summed over the batch (torch reductions:
deterministic).
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from fastmae import _autograd, reference
from fastmae._library import empty, interpreting, kernel_op, launch, register_cpu_fallback

from .unshuffle import _blocks, unshuffle_rows

__all__ = ["random_masking", "encoder_input", "MAX_TOKENS"]

MAX_TOKENS = 4096
"""Most tokens a sample the masking kernels take: the in-kernel ranking is quadratic in L."""

_DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


@triton.jit
def _noise_keys(noise_row_ptr, stride_nl, seed, rand_base, offs, ok, HAS_NOISE: tl.constexpr, NOISE64: tl.constexpr):
    """int64 keys whose signed order is the order of the noise at tokens ``offs`` (where ``ok``)."""
    if NOISE64:
        u = tl.load(noise_row_ptr + offs * stride_nl, mask=ok, other=0.0).to(tl.float64)
        bits = u.to(tl.int64, bitcast=True)
        bits = tl.where(u == 0.0, 0, bits)  # -0 -> +0: equal, as torch compares them
        bits = tl.where(u != u, 0x7FF8000000000000, bits)  # every NaN -> one NaN, above +inf
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits)  # signed order = float order
    else:
        if HAS_NOISE:
            u = tl.load(noise_row_ptr + offs * stride_nl, mask=ok, other=0.0).to(tl.float32)
        else:
            u = tl.rand(seed, rand_base + offs)  # int32 offsets: one Philox draw per token
        bits = u.to(tl.int32, bitcast=True)
        bits = tl.where(u == 0.0, 0, bits)
        bits = tl.where(u != u, 0x7FC00000, bits)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
    return key


@triton.jit
def _rank_kernel(
    noise_ptr,  # (N, L) any float dtype, read if HAS_NOISE
    seed_ptr,  # (1,) int64 Philox seed, read if not HAS_NOISE
    ids_keep_ptr,  # (N, len_keep) int32 out: ids_shuffle[:, :len_keep], the kept tokens in order
    mask_ptr,  # (N, L) float32 out: 0 kept, 1 removed
    ids_restore_ptr,  # (N, L) int64 out: rank of each token in the stable order of the noise
    L,  # tokens a sample
    len_keep,  # kept tokens a sample
    stride_nn, stride_nl,  # strides of noise
    stride_kn, stride_kl,  # strides of ids_keep
    stride_mn, stride_ml,  # strides of mask
    stride_rn, stride_rl,  # strides of ids_restore
    HAS_NOISE: tl.constexpr,  # noise given; else drawn with tl.rand
    NOISE64: tl.constexpr,  # noise is float64 (64-bit keys)
    BLOCK_I: tl.constexpr,  # tokens ranked a program
    BLOCK_J: tl.constexpr,  # tokens compared against per step
):
    pid_n = tl.program_id(0)
    n = pid_n.to(tl.int64)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = i < L
    if HAS_NOISE:
        seed = 0
    else:
        seed = tl.load(seed_ptr)
    noise_row = noise_ptr + n * stride_nn
    k_i = _noise_keys(noise_row, stride_nl, seed, pid_n * L, i, i_ok, HAS_NOISE, NOISE64)
    # rank[i] = #{j: key[j] < key[i], or equal with j < i}: the stable ascending order.
    # The counts accumulate elementwise over the steps and are reduced once at the end.
    acc = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.int32)
    if NOISE64:
        # 64-bit keys: key and index do not fit one integer, compare both
        for j0 in range(0, L, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            j_ok = j < L
            k_j = _noise_keys(noise_row, stride_nl, seed, pid_n * L, j, j_ok, HAS_NOISE, NOISE64)
            before = (k_j[None, :] < k_i[:, None]) | ((k_j[None, :] == k_i[:, None]) & (j[None, :] < i[:, None]))
            acc += (before & j_ok[None, :]).to(tl.int32)
    else:
        # 32-bit keys: (key, index) packed into one int64 whose signed order is the stable
        # order (key in the high half, the non-negative index in the low half); one compare
        # a pair, padding keys above everything
        kk_i = (k_i << 32) | i.to(tl.int64)
        for j0 in range(0, L, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            j_ok = j < L
            k_j = _noise_keys(noise_row, stride_nl, seed, pid_n * L, j, j_ok, HAS_NOISE, NOISE64)
            kk_j = tl.where(j_ok, (k_j << 32) | j.to(tl.int64), 0x7FFFFFFFFFFFFFFF)
            acc += (kk_j[None, :] < kk_i[:, None]).to(tl.int32)
    rank = tl.sum(acc, axis=1)
    tl.store(ids_restore_ptr + n * stride_rn + i * stride_rl, rank.to(tl.int64), mask=i_ok)
    tl.store(mask_ptr + n * stride_mn + i * stride_ml, (rank >= len_keep).to(tl.float32), mask=i_ok)
    # ids_shuffle[rank[i]] = i, kept part only (ranks are a permutation: one write each)
    tl.store(ids_keep_ptr + n * stride_kn + rank * stride_kl, i, mask=i_ok & (rank < len_keep))


@triton.jit
def _gather_kernel(
    x_ptr,  # (N, L, D) tokens
    pos_ptr,  # (1 + L, D) position embedding, cls row first (read if CLS)
    cls_ptr,  # (D,) cls token (read if CLS)
    ids_keep_ptr,  # (N, len_keep) int32 kept token indices, in shuffled order
    out_ptr,  # (N, CLS + len_keep, D) out, in the promoted dtype
    len_keep,  # kept tokens a sample
    D,  # channels
    stride_xn, stride_xl, stride_xd,  # strides of x
    stride_pt, stride_pd,  # strides of pos
    stride_cd,  # stride of cls
    stride_kn, stride_kl,  # strides of ids_keep
    stride_on, stride_ot, stride_od,  # strides of out
    CLS: tl.constexpr,  # 1: encoder input (row 0 = cls + pos[0], tokens + pos); 0: plain gather
    CLS_DTYPE: tl.constexpr,  # dtype of cls + pos[0] before its cast to out: 0 fp16, 1 bf16, 2 fp32, 3 fp64
    ACC64: tl.constexpr,  # add the tokens in float64 (float64 output); else float32
    BLOCK_T: tl.constexpr,  # output rows per program
    BLOCK_D: tl.constexpr,  # channels per program
):
    n = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # output rows
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = t < CLS + len_keep
    d_ok = d < D
    is_tok = row_ok & (t >= CLS)
    src = tl.load(ids_keep_ptr + n * stride_kn + (t - CLS) * stride_kl, mask=is_tok, other=0)
    m = is_tok[:, None] & d_ok[None, :]
    v = tl.load(x_ptr + n * stride_xn + src[:, None] * stride_xl + d[None, :] * stride_xd, mask=m, other=0.0)
    out_ty = out_ptr.dtype.element_ty
    if CLS:
        p = tl.load(pos_ptr + (1 + src)[:, None] * stride_pt + d[None, :] * stride_pd, mask=m, other=0.0)
        # x + pos as torch adds: in out's dtype (fp32 holds fp16/bf16 operands exactly), rounded once
        if ACC64:
            v = (v.to(tl.float64) + p.to(tl.float64)).to(out_ty)
        else:
            v = (v.to(tl.float32) + p.to(tl.float32)).to(out_ty)
        # cls row: (cls_token + pos[0]) in promote(cls, pos), then cast to out's dtype
        c = tl.load(cls_ptr + d * stride_cd, mask=d_ok, other=0.0)
        p0 = tl.load(pos_ptr + d * stride_pd, mask=d_ok, other=0.0)
        if CLS_DTYPE == 3:
            c = c.to(tl.float64) + p0.to(tl.float64)
        else:
            c = c.to(tl.float32) + p0.to(tl.float32)
            if CLS_DTYPE == 0:
                c = c.to(tl.float16)
            if CLS_DTYPE == 1:
                c = c.to(tl.bfloat16)
        v = tl.where((t == 0)[:, None], c.to(out_ty)[None, :], v)
    else:
        v = v.to(out_ty)
    tl.store(out_ptr + n * stride_on + t[:, None] * stride_ot + d[None, :] * stride_od, v, mask=row_ok[:, None] & d_ok[None, :])


# ---------------------------------------------------------------------------- host side
def _check_tokens(L: int) -> None:
    if L > MAX_TOKENS:
        raise ValueError(f"the Triton masking kernel sorts a sample's L tokens in one block: L={L} > {MAX_TOKENS}")


def _rank_blocks(L: int) -> tuple[int, int]:
    """(BLOCK_I, BLOCK_J) of the ranking: 128 x 32 compare tiles on a GPU (sm_90 builds at
    L = 196: about half the instructions a sample of 64 x 64 tiles, most of them the
    per-program keys of the BLOCK_I ranked tokens; 2 programs a sample); under the
    interpreter, whose cost is per program and per op, one program a row and big tiles."""
    block_l = triton.next_power_of_2(int(L))
    if interpreting():
        block_i = min(block_l, 1024)
        return block_i, max(1, min(block_l, 65536 // block_i))
    return min(block_l, 128), min(block_l, 32)


def _shuffle(noise: Optional[torch.Tensor], seed: Optional[torch.Tensor], N: int, L: int, len_keep: int, device):
    """Launch the ranking: (ids_keep int32 (N, len_keep), mask (N, L) float32, ids_restore (N, L) int64)."""
    _check_tokens(L)
    if noise is None and seed is None:
        raise ValueError("either noise or seed must be given")
    block_i, block_j = _rank_blocks(L)
    ids_keep = empty((N, len_keep), torch.int32, device)
    mask = empty((N, L), torch.float32, device)
    ids_restore = empty((N, L), torch.int64, device)
    noise_t = noise if noise is not None else ids_restore
    seed_t = seed if seed is not None else ids_restore
    launch(_rank_kernel)[(N, triton.cdiv(L, block_i))](
        noise_t, seed_t, ids_keep, mask, ids_restore,
        L, len_keep,
        noise.stride(0) if noise is not None else 0, noise.stride(1) if noise is not None else 0,
        ids_keep.stride(0), ids_keep.stride(1),
        mask.stride(0), mask.stride(1),
        ids_restore.stride(0), ids_restore.stride(1),
        HAS_NOISE=noise is not None, NOISE64=noise is not None and noise.dtype == torch.float64,
        BLOCK_I=block_i, BLOCK_J=block_j,
    )  # fmt: skip
    return ids_keep, mask, ids_restore


def _gather(x, ids_keep, out, pos_embed=None, cls_token=None):
    """Launch the token gather writing ``out`` (N, cls + len_keep, D)."""
    N, len_keep = ids_keep.shape
    D = x.shape[2]
    cls = cls_token is not None
    rows = int(cls) + len_keep
    block_t, block_d = _blocks(rows, D)
    cls_dtype = torch.promote_types(cls_token.dtype, pos_embed.dtype) if cls else out.dtype
    pos_t = pos_embed if cls else x
    cls_t = cls_token if cls else x
    launch(_gather_kernel)[(N, triton.cdiv(rows, block_t), triton.cdiv(D, block_d))](
        x, pos_t, cls_t, ids_keep, out,
        len_keep, D,
        x.stride(0), x.stride(1), x.stride(2),
        pos_embed.stride(1) if cls else 0, pos_embed.stride(2) if cls else 0,
        cls_token.stride(2) if cls else 0,
        ids_keep.stride(0), ids_keep.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        CLS=int(cls), CLS_DTYPE=_DTYPE_CODE[cls_dtype], ACC64=out.dtype == torch.float64,
        BLOCK_T=block_t, BLOCK_D=block_d,
    )  # fmt: skip
    return out


def _noise_from_seed(seed: torch.Tensor, N: int, L: int, device) -> torch.Tensor:
    # CPU fallback for seed-only calls: noise as a pure function of the seed
    gen = torch.Generator(device="cpu").manual_seed(int(seed.reshape(-1)[0]))
    return torch.rand(N, L, generator=gen).to(device)


def _draw_seed(device) -> torch.Tensor:
    # from torch's generator on the tensors' device, kept on the device (no host sync)
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)


# ------------------------------------------------------------------- random_masking op
@kernel_op("fastmae::random_masking")
def _random_masking(
    x: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor], seed: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    N, L, D = x.shape
    len_keep = reference.num_kept(int(L), mask_ratio)
    ids_keep, mask, ids_restore = _shuffle(noise, seed, N, L, len_keep, x.device)
    out = _gather(x, ids_keep, empty((N, len_keep, D), x.dtype, x.device))
    return out, mask, ids_restore


@_random_masking.register_fake
def _(x, mask_ratio, noise, seed):
    N, L, D = x.shape
    _check_tokens(L)
    len_keep = reference.num_kept(L, mask_ratio)
    return (
        x.new_empty((N, len_keep, D)),
        x.new_empty((N, L), dtype=torch.float32),
        x.new_empty((N, L), dtype=torch.int64),
    )


def _random_masking_cpu(x, mask_ratio, noise, seed):
    if noise is None:
        noise = _noise_from_seed(seed, x.shape[0], x.shape[1], x.device)
    return reference.random_masking(x, mask_ratio, noise)


register_cpu_fallback(_random_masking, _random_masking_cpu)


# -------------------------------------------------------------------- encoder_input op
def _tokens_dtype(x, pos_embed):
    # the reference: x + pos_embed promotes; the cls row is cast to that dtype
    return torch.promote_types(x.dtype, pos_embed.dtype)


@kernel_op("fastmae::encoder_input")
def _encoder_input(
    x: torch.Tensor,
    pos_embed: torch.Tensor,
    cls_token: torch.Tensor,
    mask_ratio: float,
    noise: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    N, L, D = x.shape
    len_keep = reference.num_kept(int(L), mask_ratio)
    ids_keep, mask, ids_restore = _shuffle(noise, seed, N, L, len_keep, x.device)
    out = empty((N, 1 + len_keep, D), _tokens_dtype(x, pos_embed), x.device)
    _gather(x, ids_keep, out, pos_embed, cls_token)
    return out, mask, ids_restore


@_encoder_input.register_fake
def _(x, pos_embed, cls_token, mask_ratio, noise, seed):
    N, L, D = x.shape
    _check_tokens(L)
    len_keep = reference.num_kept(L, mask_ratio)
    return (
        x.new_empty((N, 1 + len_keep, D), dtype=_tokens_dtype(x, pos_embed)),
        x.new_empty((N, L), dtype=torch.float32),
        x.new_empty((N, L), dtype=torch.int64),
    )


def _encoder_input_cpu(x, pos_embed, cls_token, mask_ratio, noise, seed):
    if noise is None:
        noise = _noise_from_seed(seed, x.shape[0], x.shape[1], x.device)
    return reference.encoder_input(x, pos_embed, cls_token, mask_ratio, noise)


register_cpu_fallback(_encoder_input, _encoder_input_cpu)


# ------------------------------------------------------------------------- backward op
@kernel_op("fastmae::masked_tokens_backward")
def _masked_tokens_backward(
    grad: torch.Tensor, ids_restore: torch.Tensor, num_prefix: int, dtype: torch.dtype
) -> torch.Tensor:
    """Gradient of the tokens before the gather: ``grad`` (N, num_prefix + len_keep, D)
    scattered back to the kept positions, zero at the removed ones; (N, L, D) in ``dtype``."""
    N, T, D = grad.shape
    out = empty((N, ids_restore.shape[1], D), dtype, grad.device)
    return unshuffle_rows(grad, ids_restore, T - num_prefix, out, cls=False, src_off=num_prefix)


def _masked_tokens_backward_cpu(grad, ids_restore, num_prefix, dtype):
    len_keep = grad.shape[1] - num_prefix
    rows = torch.gather(grad[:, num_prefix:], 1, ids_restore.clamp(max=len_keep - 1).unsqueeze(-1).expand(-1, -1, grad.shape[2]))
    return torch.where((ids_restore < len_keep).unsqueeze(-1), rows, 0).to(dtype)


register_cpu_fallback(_masked_tokens_backward, _masked_tokens_backward_cpu)


# -------------------------------------------------------------------------- autograd
# the fake of masked_tokens_backward and both ops' autograd: the same as the extension's
_autograd.register_masking("fastmae")


# ---------------------------------------------------------------------------- public
def random_masking(x: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None):
    """Fused :func:`fastmae.reference.random_masking`: ``(x_masked, mask, ids_restore)``.

    With ``noise`` the result is bit-for-bit the reference's (any float dtype; ties broken
    by token index). Without it the noise is drawn in the kernel from a seed taken from
    torch's generator on ``x``'s device: reproducible under ``torch.manual_seed``, but not
    the same numbers as the reference's ``torch.rand``.
    """
    seed = None if noise is not None else _draw_seed(x.device)
    return torch.ops.fastmae.random_masking(x, mask_ratio, noise, seed)


def encoder_input(
    x: torch.Tensor,
    pos_embed: torch.Tensor,
    cls_token: torch.Tensor,
    mask_ratio: float,
    noise: Optional[torch.Tensor] = None,
):
    """Fused :func:`fastmae.reference.encoder_input`: ``(tokens (N, 1+len_keep, D), mask, ids_restore)``.

    Adds ``pos_embed[:, 1:]``, masks and prepends ``cls_token + pos_embed[:, :1]`` in one
    pass over the kept tokens; noise as in :func:`random_masking`.
    """
    seed = None if noise is not None else _draw_seed(x.device)
    return torch.ops.fastmae.encoder_input(x, pos_embed, cls_token, mask_ratio, noise, seed)
