"""LayerNorm fused with the residual add before it, in fastmae's compiled extension.

``add_layer_norm(x, residual, weight, bias, eps, out_dtype, residual_dtype) -> (y, s)`` and
``layer_norm(...) -> y`` with the semantics of :func:`fastmae.reference.add_layer_norm`:
``s = x + residual`` in float32, stored in ``residual_dtype``; ``y = layer_norm(s)`` of that
stored ``s`` in float32 math, stored in ``out_dtype``. Both outputs are differentiable.

The ops are ``torch.ops.fastmae_ext.add_layer_norm_fwd`` / ``add_layer_norm_bwd``
(``csrc/ops/layer_norm.cpp``; math in ``csrc/ops/layer_norm.h``):

* CPU (``csrc/ops/cpu/layer_norm_kernel.cpp``): ``at::parallel_for`` over rows; fp32 rows
  are read and written in place, in the forward all-bf16 rows too (converted in registers),
  other fp16 / bf16 rows through fp32 row buffers; one pass for the add and its sum, a
  centred-variance pass, one for y, on 8-lane vectors with 32-lane fixed-order sums
  (``csrc/ops/cpu/fvec.h``); the row loops are compiled for AVX2+FMA and for the baseline
  target, picked at run time. The backward cuts the rows into fixed
  32-row blocks with one dW/dB partial each, summed in block order.
* CUDA (``csrc/ops/cuda/layer_norm_kernel.cu``): a warp per row with 16-byte accesses
  (scalar for D % 8 != 0), the row in registers up to D = 1024; the backward gives each
  128-row block one dW/dB partial (warps accumulate in shared memory, lanes own columns),
  then a fixed-order column sum. No atomics: the same bits on every run.

When an input needs a gradient, :func:`add_layer_norm` runs the ops through
:class:`_AddLayerNorm` (an ``autograd.Function`` with the registered formula; eagerly below
the autograd key: no generated Python autograd kernel per call; under torch.compile, traced
with the registered op inside). It reshapes x and residual to rows itself, so that their one
gradient reaches both as one tensor (views of it, one per input, would share storage in
their ``.grad``).

Saved for the backward: ``s`` (``x`` for ``layer_norm``), ``mean``, ``rstd``, ``weight`` and
``bias`` -- never the normalised output. Inputs and outputs are float32, float16 or
bfloat16 (float64 is the reference's: :func:`fastmae.ops.add_layer_norm` takes it there on
``backend="auto"``).
"""

from __future__ import annotations

import math

import torch

from . import load, sync_poison

__all__ = ["add_layer_norm", "layer_norm", "DTYPES"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
load()
_ops = torch.ops.fastmae_ext
_FWD = "fastmae_ext::add_layer_norm_fwd"
_BWD = "fastmae_ext::add_layer_norm_bwd"


@torch.library.register_fake(_FWD)
def _(x, residual, weight, bias, eps, out_dtype, residual_dtype):
    rows, D = x.shape
    s = x.new_empty((rows, D), dtype=residual_dtype) if residual is not None else x.new_empty((0,))
    f32 = torch.float32
    return x.new_empty((rows, D), dtype=out_dtype), s, x.new_empty((rows,), dtype=f32), x.new_empty((rows,), dtype=f32)


@torch.library.register_fake(_BWD)
def _(dy, ds, s, mean, rstd, weight, bias, x_dtype, residual_dtype):
    rows, D = s.shape
    sep = residual_dtype is not None and residual_dtype != x_dtype
    dres = s.new_empty((rows, D), dtype=residual_dtype) if sep else s.new_empty((0,))
    dw = weight.new_empty((D,)) if weight is not None else s.new_empty((0,))
    db = bias.new_empty((D,)) if bias is not None else s.new_empty((0,))
    return s.new_empty((rows, D), dtype=x_dtype), dres, dw, db


def _setup(ctx, inputs, output):
    x, residual, weight, bias, eps, out_dtype, residual_dtype = inputs
    y, s, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # an unused y or s gives None, not a zeros tensor
    ctx.has_residual = residual is not None
    ctx.x_dtype = x.dtype
    ctx.residual_dtype = residual.dtype if residual is not None else None
    ctx.save_for_backward(s if residual is not None else x, mean, rstd, weight, bias)


def _backward(ctx, dy, ds, dmean, drstd):
    s, mean, rstd, weight, bias = ctx.saved_tensors
    if ds is not None and ds.numel() == 0:
        ds = None
    if dy is None:  # y unused: the gradient flows through s alone; dW, dB are zero (None)
        if ds is None:
            return None, None, None, None, None, None, None
        dres = ds.to(ctx.residual_dtype) if ctx.has_residual else None
        return ds.to(ctx.x_dtype), dres, None, None, None, None, None
    dx, dres, dw, db = _ops.add_layer_norm_bwd(dy, ds, s, mean, rstd, weight, bias, ctx.x_dtype, ctx.residual_dtype)
    dresidual = None
    if ctx.has_residual:
        dresidual = dres if dres.numel() else dx
    return (dx, dresidual, dw if weight is not None else None, db if bias is not None else None, None, None, None)


torch.library.register_autograd(_FWD, _backward, setup_context=_setup)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (rows, D), the ops' layout (a view when the strides allow; D = 0 too)."""
    return t if t.dim() == 2 else t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _shaped(t: torch.Tensor, shape) -> torch.Tensor:
    """An op's (rows, D) output in the input's ``shape``."""
    return t if t.shape == shape else t.view(shape)


def _forward_op(x, residual, *args):
    """``(op inputs, (y, s, mean, rstd))``: the forward op on x, residual as rows; traced when
    compiling (dynamo has no below-autograd mode), else called below the autograd key."""
    inputs = (_rows(x), None if residual is None else _rows(residual), *args)
    if torch.compiler.is_compiling():
        return inputs, _ops.add_layer_norm_fwd(*inputs)
    with torch._C._AutoDispatchBelowAutograd():
        return inputs, _ops.add_layer_norm_fwd(*inputs)


def _in_shape(out, shape, has_residual: bool):
    """The forward op's outputs with y and s in x's ``shape`` (s is empty without a residual)."""
    y, s, mean, rstd = out
    return _shaped(y, shape), (_shaped(s, shape) if has_residual else s), mean, rstd


class _AddLayerNorm(torch.autograd.Function):
    """The eager path of :func:`add_layer_norm`: the registered autograd formula (``_setup``,
    ``_backward``) with the ops called below the autograd dispatch key, which skips the
    generated Python autograd kernel of ``register_autograd`` (tens of microseconds a call,
    forward and backward). Under torch.compile dynamo traces this Function, with the
    registered op inside.

    It takes x and residual in their own shape (..., D) and reshapes them to the op's rows
    inside, so that when x and residual get one gradient (same dtype) it is one tensor
    returned for both: reshaped outside, each input's view would be a separate tensor on one
    storage, and accumulating into ``.grad`` (a second micro-batch, in place) would add into
    both."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, out_dtype, residual_dtype):
        inputs, out = _forward_op(x, residual, weight, bias, eps, out_dtype, residual_dtype)
        _setup(ctx, inputs, out)
        ctx.shape = x.shape
        return _in_shape(out, x.shape, residual is not None)

    @staticmethod
    def backward(ctx, dy, ds, dmean, drstd):
        dy = None if dy is None else _rows(dy)
        ds = None if ds is None or ds.numel() == 0 else _rows(ds)
        if torch.is_grad_enabled() or torch.compiler.is_compiling():  # create_graph: as the registered op does
            dx, dres, *rest = _backward(ctx, dy, ds, dmean, drstd)
        else:
            with torch._C._AutoDispatchBelowAutograd():
                dx, dres, *rest = _backward(ctx, dy, ds, dmean, drstd)
        gx = None if dx is None else _shaped(dx, ctx.shape)
        if dres is not dx:
            gres = None if dres is None else _shaped(dres, ctx.shape)
        elif torch.compiler.is_compiling():  # inductor returns two outputs on one buffer as two views of it
            gres = gx.clone()
        else:
            gres = gx  # one tensor for both: autograd copies it before accumulating into a second leaf
        return (gx, gres, *rest)


def _fwd(x, residual, *args):
    """``(y, s, mean, rstd)`` of x, residual (..., D), y and s in x's shape, with autograd: the
    :class:`_AddLayerNorm` fast path when an input needs a gradient, else straight to the
    kernel; when compiling, the registered op on the rows."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, residual, *args[:2])):
        return _AddLayerNorm.apply(x, residual, *args)
    return _in_shape(_forward_op(x, residual, *args)[1], x.shape, residual is not None)


_OK = frozenset(DTYPES)
_OK_OR_NONE = frozenset((*DTYPES, None))


def _check_dtypes(**tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.dtype not in DTYPES:
            raise TypeError(f"backend='ext' LayerNorm computes in float32: {name} must be float32, float16 or "
                            f"bfloat16, got {t.dtype}; use backend='torch' for float64")


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, eps: float = 1e-6, out_dtype: torch.dtype | None = None,
                   residual_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, s)``: see the module docstring (arguments validated by :func:`fastmae.ops.add_layer_norm`)."""
    if not (x.dtype in _OK and (residual is None or residual.dtype in _OK) and (weight is None or weight.dtype in _OK)
            and (bias is None or bias.dtype in _OK) and out_dtype in _OK_OR_NONE and residual_dtype in _OK_OR_NONE):
        _check_dtypes(x=x, residual=residual, weight=weight, bias=bias)
        for name, dt in (("out_dtype", out_dtype), ("residual_dtype", residual_dtype)):
            if dt is not None and dt not in DTYPES:
                raise TypeError(f"backend='ext' LayerNorm: {name} must be float32, float16 or bfloat16, got {dt}")
    sync_poison()
    out_dtype = out_dtype or x.dtype
    if residual is None:
        s = x.to(residual_dtype or x.dtype)
        return _fwd(s, None, weight, bias, float(eps), out_dtype, s.dtype)[0], s
    return _fwd(x, residual, weight, bias, float(eps), out_dtype, residual_dtype or residual.dtype)[:2]


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-6,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``add_layer_norm(x, None, ...)[0]``: LayerNorm without the add (nothing written for ``s``)."""
    return add_layer_norm(x, None, weight, bias, eps, out_dtype)[0]
