"""Shared by the tests of the compiled extension (tests/test_ext_*.py).

:func:`require_ext` opens each such module: it skips the module, with the loader's reason,
when ``fastmae._C`` is not built, does not load, or lacks the ops the module tests; under
``FASTMAE_EXT_REQUIRED=1`` (``make test``, CI) that is a failure instead, so a broken build
cannot pass as skipped tests.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastmae import ext


def why_unavailable(ops: tuple[str, ...] = ()) -> str | None:
    """Why the extension (with ``torch.ops.fastmae_ext.<op>`` for each of ``ops``) cannot be tested, or None."""
    why = ext.problem()
    if why is None and not all(hasattr(torch.ops.fastmae_ext, n) for n in ops):
        why = f"fastmae._C was built without {ops}; rebuild it: {ext.BUILD_HINT}"
    return why


def require_ext(ops: tuple[str, ...] = ()) -> None:
    """Skip the module, or the test when called inside one (fail under FASTMAE_EXT_REQUIRED=1),
    when the extension is unusable."""
    why = why_unavailable(ops)
    if why is None:
        return
    if os.environ.get("FASTMAE_EXT_REQUIRED") == "1":
        raise RuntimeError(why)
    pytest.skip(why, allow_module_level=True)


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values, contiguous, starting one element past the start of an allocation (differentiable):
    what a kernel's 16-byte vector path must refuse. (A clone or ``.contiguous()`` of a strided view is
    a fresh, aligned allocation: only a view like this one reaches a kernel misaligned.)"""
    return torch.cat([t.new_zeros(1), t.reshape(-1)])[1:].view(t.shape)
