"""Softmax attention for MAE's short sequences in fastmae's compiled extension.

``attention(q, k, v, scale)`` on (B, N, H, D) tensors of any strides and
``attention_qkvpacked(qkv, scale)`` on the fused projection output (B, N, 3, H, D) (read in
place; its gradient is written straight into one (B, N, 3, H, D) tensor), non-causal, with
the semantics of :func:`fastmae.reference.attention`. The ops are
``torch.ops.fastmae_ext.attention_fwd`` -> (out, lse) and ``attention_bwd`` -> dqkv
(``csrc/ops/attention.cpp``; index math and softmax pieces in ``csrc/ops/attention.h``),
with the Triton kernel's conventions: lse (B, H, N) float32 in natural log, the backward
recomputing P = exp(scale q k^T - lse), delta = rowsum(dO * O), dV = P^T dO, dP = dO V^T,
dS = P * (dP - delta), dQ = scale dS K, dK = scale dS^T Q.

* CPU (``csrc/ops/cpu/attention_kernel.cpp``): at::parallel_for over (batch, head) pairs,
  fp32 math, every product on 6 x 16 register tiles (AVX2 + FMA where the CPU has them), an
  exact two-pass softmax per row (all N keys at once) with a vectorised exp, saving lse; the
  backward recomputes the forward's P from S bit for bit (it does not read lse) and, holding
  whole rows, takes delta = rowsum(P * dP) in double rather than rowsum(dO * O): where P is
  nearly one-hot, dP - delta cancels and the dO * O form's error came through (at exact
  logits in the hundreds it failed the 2x oracle for 56 of 200 seeds, now none:
  scripts/attention_oracle_spread.py --logits int).
* CUDA (``csrc/ops/cuda/attention_kernel.cu``): fp16 / bf16 on the tensor cores
  (mma.sync m16n8k16, fp32 accumulation, P and dS rounded to the input dtype before their
  products as in FlashAttention), a pair's whole K and V in shared memory, several pairs per
  block when N <= 32; fp32 inputs take a SIMT path (warp per row, no TF32).

Limits of backend ``"ext"`` on both devices (so that a CPU test covers what the GPU runs):
N <= :data:`MAX_N` and D in :data:`HEAD_DIMS`, fp32 / fp16 / bf16; anything else is a
``ValueError`` / ``TypeError`` naming the argument (``backend="auto"`` never picks ``"ext"``
for attention).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import load, sync_poison

__all__ = ["attention", "attention_qkvpacked", "MAX_N", "HEAD_DIMS", "DTYPES"]

MAX_N = 256
HEAD_DIMS = (32, 64, 80, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

load()
_ops = torch.ops.fastmae_ext
_FWD = "fastmae_ext::attention_fwd"
_BWD = "fastmae_ext::attention_bwd"


@torch.library.register_fake(_FWD)
def _(q, k, v, scale):
    B, N, H, D = q.shape
    return q.new_empty((B, N, H, D)), q.new_empty((B, H, N), dtype=torch.float32)


@torch.library.register_fake(_BWD)
def _(dout, q, k, v, out, lse, scale):
    B, N, H, D = q.shape
    return q.new_empty((B, N, 3, H, D))


def _setup(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _ops.attention_bwd(dout, q, k, v, out, lse, ctx.scale).unbind(2)
    return dq, dk, dv, None


torch.library.register_autograd(_FWD, _backward, setup_context=_setup)


class _PackedAttention(torch.autograd.Function):
    """The packed path: q, k, v are strided views of qkv, and the backward returns the
    kernel's (B, N, 3, H, D) gradient as it is (no stack of three separate gradients)."""

    @staticmethod
    def forward(qkv, scale):
        out, lse = _ops.attention_fwd(*qkv.unbind(2), scale)
        return out, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        qkv, scale = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(qkv, out, lse)
        ctx.scale = scale

    @staticmethod
    def backward(ctx, dout, dlse):
        qkv, out, lse = ctx.saved_tensors
        return _ops.attention_bwd(dout, *qkv.unbind(2), out, lse, ctx.scale), None


def _check(shape, dtype) -> None:
    N, D = shape[1], shape[-1]
    if dtype not in DTYPES:
        raise TypeError(f"backend='ext' attention takes float32, float16 or bfloat16 inputs, got {dtype}")
    if N > MAX_N:
        raise ValueError(f"sequence length N={N} (dim 1 of q, k, v) is above backend='ext' attention's one-tile "
                         f"limit of {MAX_N}; use backend='triton', 'sdpa' or 'auto'")
    if D not in HEAD_DIMS:
        raise ValueError(f"head dim D={D} (the last dim of q, k, v) is not one of backend='ext' attention's "
                         f"{HEAD_DIMS}; use backend='triton', 'sdpa' or 'auto'")


def _scale(scale: Optional[float], D: int) -> float:
    return float(D) ** -0.5 if scale is None else float(scale)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """softmax(q k^T * scale) v on (B, N, H, D) q, k, v of any strides; ``scale`` defaults to D ** -0.5."""
    _check(q.shape, q.dtype)
    sync_poison()
    return _ops.attention_fwd(q, k, v, _scale(scale, q.shape[-1]))[0]


def attention_qkvpacked(qkv: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """:func:`attention` on the packed (B, N, 3, H, D) projection output, read in place."""
    _check(qkv.shape, qkv.dtype)
    sync_poison()
    return _PackedAttention.apply(qkv, _scale(scale, qkv.shape[-1]))[0]
