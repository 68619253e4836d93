"""How fastmae's Triton kernels become ``torch.library`` ops.

On a GPU each op is a ``torch.library.triton_op`` whose kernels are launched through
``wrap_triton``: ``torch.compile(fullgraph=True)`` then sees the Triton kernels themselves
and schedules them with the rest of the graph. Under the Triton interpreter
(``TRITON_INTERPRET=1``, used to test on CPU) kernels are plain Python that touch the
tensors' data, which a traced ``triton_op`` cannot do; there the same host wrapper is
registered as an opaque ``torch.library.custom_op`` instead, so opcheck, autograd and
``torch.compile`` are still exercised end to end.

The autograd formulas that the Triton ops share with the compiled extension's
(:mod:`fastmae.ext`) are in :mod:`fastmae._autograd`.
"""

from __future__ import annotations

import contextlib
import os

import torch

__all__ = ["interpreting", "kernel_op", "launch", "register_cpu_fallback", "empty", "poisoned_outputs"]

_poison = False


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernel_op(name: str, mutates_args=()):
    """Decorator registering a Triton host wrapper as the op ``name`` (``"fastmae::x"``)."""
    if interpreting():
        return torch.library.custom_op(name, mutates_args=mutates_args)
    return torch.library.triton_op(name, mutates_args=mutates_args)


def launch(kernel):
    """``kernel`` ready to be launched from a :func:`kernel_op` host wrapper (``launch(k)[grid](...)``)."""
    if interpreting():
        return kernel
    return torch.library.wrap_triton(kernel)


def register_cpu_fallback(op, fn) -> None:
    """Run ``fn`` (the plain-PyTorch reference) for CPU tensors, except under the interpreter,
    where CPU tensors are exactly what the Triton kernels are tested on."""
    if not interpreting():
        op.register_kernel("cpu")(fn)


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Allocate a kernel output. Every host wrapper allocates through this, so that tests
    (:func:`poisoned_outputs`) can fill outputs with NaN / -1 and catch unwritten elements."""
    if _poison:
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@contextlib.contextmanager
def poisoned_outputs(enabled: bool = True):
    """Within this context kernel outputs start as NaN (floats) or -1 (integers)."""
    global _poison
    old, _poison = _poison, enabled
    try:
        yield
    finally:
        _poison = old
