"""fastmae's compiled extension ``fastmae._C``: the ``backend="ext"`` ops.

The extension (csrc/, see csrc/README.md) registers its ops as ``torch.ops.fastmae_ext.*``
with CUDA kernels for CUDA tensors and C++ kernels ("CPU twins") for CPU tensors. This
package loads it on first use and says precisely why it cannot when it cannot: not built,
built for another torch, built without CUDA. Nothing here runs at ``import fastmae``; the
per-op modules (``fastmae.ext.patchify``, ...) load the extension when they are imported,
and hold each op's ``register_fake``, ``register_autograd`` and public wrapper (masking,
unshuffle, the loss and patchify register the Triton ops' autograd formulas, :mod:`fastmae._autograd`).
"""

from __future__ import annotations

import functools
import importlib
import json
import os

import torch

from fastmae import _library

__all__ = ["load", "problem", "build_info", "has_cuda_kernels", "sync_poison", "BUILD_HINT"]

BUILD_HINT = "pip install --no-build-isolation -e .  (or: make ext)"
_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_INFO_FILE = os.path.join(_PKG_DIR, "_C_build.json")


def build_info() -> dict | None:
    """What ``setup.py`` recorded when it built the extension (torch version, CUDA, archs), or None."""
    try:
        with open(_INFO_FILE) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _base(version: str) -> str:
    return version.split("+")[0]


@functools.cache
def _load():
    """(module, None) or (None, the reason it cannot be used)."""
    info = build_info()
    if info is not None and info.get("torch") != torch.__version__:
        return None, (f"fastmae._C was built for torch {info.get('torch')} but torch {torch.__version__} "
                      f"is installed; rebuild it: {BUILD_HINT}")
    try:
        mod = importlib.import_module("fastmae._C")
    except ModuleNotFoundError as e:
        if e.name != "fastmae._C":
            raise
        return None, f"fastmae's compiled extension fastmae._C is not built; build it: {BUILD_HINT}"
    except ImportError as e:  # e.g. undefined symbol: a build for another torch
        return None, (f"fastmae._C does not load ({e}); it was probably built for another torch than "
                      f"{torch.__version__}; rebuild it: {BUILD_HINT}")
    built_for = getattr(mod, "torch_version", None)
    if built_for is None or _base(built_for) != _base(torch.__version__):
        return None, (f"fastmae._C was built for torch {built_for} but torch {torch.__version__} is installed; "
                      f"rebuild it: {BUILD_HINT}")
    return mod, None


def problem() -> str | None:
    """Why the extension cannot be used (a sentence naming the fix), or None."""
    return _load()[1]


def load():
    """The loaded ``fastmae._C`` module (its ops are then in ``torch.ops.fastmae_ext``).

    Raises :class:`fastmae.BackendUnavailableError` saying what is missing.
    """
    mod, why = _load()
    if mod is None:
        from fastmae.backend import BackendUnavailableError

        raise BackendUnavailableError(why)
    return mod


def has_cuda_kernels() -> bool:
    """Whether the loaded extension holds its CUDA kernels (it was built with nvcc)."""
    mod, _ = _load()
    return mod is not None and bool(getattr(mod, "with_cuda", 0))


_poison_state = False


def sync_poison() -> None:
    """Forward :func:`fastmae._library.poisoned_outputs` to the extension's output allocator
    (a flag the C++ side reads; a Python bool compare per call when nothing changed)."""
    global _poison_state
    if _library._poison != _poison_state:
        torch.ops.fastmae_ext._set_poison(_library._poison)
        _poison_state = _library._poison
