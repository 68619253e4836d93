"""Bias + exact (erf) GELU, ``gelu(x + bias)``, in fastmae's compiled extension.

Semantics of :func:`fastmae.reference.bias_gelu`: ``v = float(x) + float(bias)``, ``y =
0.5 v (1 + erf(v / sqrt 2))`` in x's dtype; the backward recomputes ``v`` from the saved
``x`` and ``bias`` (nothing else is saved), ``dx = dy gelu'(v)`` in x's dtype and ``dbias``
= the column sums of the float32 ``dy gelu'(v)``, in bias's dtype.

The ops are ``torch.ops.fastmae_ext.bias_gelu_fwd`` / ``bias_gelu_bwd``
(``csrc/ops/bias_gelu.cpp``; math in ``csrc/ops/bias_gelu.h``):

* CPU (``csrc/ops/cpu/bias_gelu_kernel.cpp``): ``at::parallel_for`` over rows, one fused pass
  per row with vectorisable erf / exp approximations (Abramowitz & Stegun 7.1.26, |error| <=
  1.5e-7, as ATen's vectorised CPU erf), compiled for AVX-512, AVX2 + FMA and the baseline and
  chosen at run time; dbias from fixed 32-row block partials summed in block order.
* CUDA (``csrc/ops/cuda/bias_gelu_kernel.cu``): 16-byte accesses, libdevice erff / expf;
  dbias from one fp32 partial per 64-row block, then a fixed-order column sum. No atomics.

Inputs are float32, float16 or bfloat16 (float64 is the reference's).
"""

from __future__ import annotations

import torch

from . import load, sync_poison

__all__ = ["bias_gelu", "DTYPES"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
load()
_ops = torch.ops.fastmae_ext
_FWD = "fastmae_ext::bias_gelu_fwd"
_BWD = "fastmae_ext::bias_gelu_bwd"


@torch.library.register_fake(_FWD)
def _(x, bias):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake(_BWD)
def _(dy, x, bias):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(bias)


def _setup(ctx, inputs, output):
    x, bias = inputs
    ctx.save_for_backward(x, bias)


def _backward(ctx, dy):
    x, bias = ctx.saved_tensors
    dx, db = _ops.bias_gelu_bwd(dy, x, bias)
    return dx, db


torch.library.register_autograd(_FWD, _backward, setup_context=_setup)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu(x + bias)`` (arguments validated by :func:`fastmae.ops.bias_gelu`)."""
    for name, t in (("x", x), ("bias", bias)):
        if t.dtype not in DTYPES:
            raise TypeError(f"backend='ext' bias_gelu computes in float32: {name} must be float32, float16 or "
                            f"bfloat16, got {t.dtype}; use backend='torch' for float64")
    sync_poison()
    shape = x.shape
    return _ops.bias_gelu_fwd(x.reshape(-1, shape[-1]), bias).view(shape)
