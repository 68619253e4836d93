"""Backend selection for fastmae's ops.

Every op in :mod:`fastmae.ops` takes ``backend=``:

========== ==================================================================
``auto``    the fastest implementation available for the tensors' device:
            on CUDA tensors Triton when it imports, else the extension, else
            the reference (SDPA for attention); on CPU tensors the extension's
            C++ kernel for the ops where it was measured faster than the
            reference (``fastmae.ops.EXT_CPU_AUTO``), else the reference
``torch``   the plain-PyTorch reference (:mod:`fastmae.reference`)
``triton``  fastmae's Triton kernels (CUDA tensors, or CPU tensors under
            ``TRITON_INTERPRET=1``)
``ext``     fastmae's compiled extension ``fastmae._C`` (csrc/): CUDA kernels
            for CUDA tensors, their C++ twins for CPU tensors
``sdpa``    attention only: ``torch.nn.functional.scaled_dot_product_attention``
``xformers`` attention only: ``xformers.ops.memory_efficient_attention``
========== ==================================================================

The process-wide default is ``"auto"``, overridden by the ``FASTMAE_BACKEND``
environment variable and by :func:`set_backend`. A backend asked for by name that
cannot run raises :class:`BackendUnavailableError` saying what is missing; fastmae
never falls back silently. ``"cuda"`` was the extension's name before it served
both devices: it is a ``ValueError`` saying so.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os

import torch

from ._library import interpreting

__all__ = [
    "BACKENDS",
    "ATTENTION_BACKENDS",
    "BackendUnavailableError",
    "set_backend",
    "get_backend",
    "use_backend",
    "available_backends",
    "resolve",
    "check_name",
    "RENAMED",
]

BACKENDS = ("auto", "torch", "triton", "ext")
ATTENTION_BACKENDS = BACKENDS + ("sdpa", "xformers")

_default: str | None = None  # set_backend(); None means FASTMAE_BACKEND or "auto"


# old backend names -> what replaced them (a ValueError saying so wherever a name is accepted)
RENAMED = {"cuda": "ext"}


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run here; the message says what is missing."""


def _renamed(name, what: str = "backend") -> None:
    if isinstance(name, str) and name in RENAMED:
        raise ValueError(
            f"{what} {name!r} is now called {RENAMED[name]!r}: fastmae's compiled extension serves CUDA tensors "
            f"(CUDA kernels) and CPU tensors (C++ kernels) under one name; use {RENAMED[name]!r}"
        )


def check_name(name, attention: bool = False) -> str:
    """``name`` if it is a backend name (``attention``: one of the attention backends), else ValueError."""
    allowed = ATTENTION_BACKENDS if attention else BACKENDS
    _renamed(name)
    if not isinstance(name, str) or name not in allowed:
        raise ValueError(f"backend must be one of {allowed}, got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend (``None`` restores ``FASTMAE_BACKEND`` / ``"auto"``).

    ``"sdpa"`` and ``"xformers"`` are accepted too: attention uses them, the other ops
    then use ``"auto"``.
    """
    global _default
    _default = None if name is None else check_name(name, attention=True)


def get_backend() -> str:
    """The process-wide default backend."""
    if _default is not None:
        return _default
    env = os.environ.get("FASTMAE_BACKEND", "").strip()
    if env:
        _renamed(env, "FASTMAE_BACKEND")
        if env not in ATTENTION_BACKENDS:
            raise ValueError(f"FASTMAE_BACKEND must be one of {ATTENTION_BACKENDS}, got {env!r}")
        return env
    return "auto"


@contextlib.contextmanager
def use_backend(name: str | None):
    """Context manager form of :func:`set_backend`."""
    global _default
    old = _default
    set_backend(name)
    try:
        yield
    finally:
        _default = old


# ----------------------------------------------------------------- availability
def _assume_constant_result(fn):
    """What ``torch.compiler.assume_constant_result`` does (it sets this attribute), without
    importing torch._dynamo when fastmae is imported (~2 s; it is needed only when compiling)."""
    fn._dynamo_marked_constant = True
    return fn


@functools.cache
def _import_error_cached(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as e:  # ImportError, or a broken install raising anything else
        return f"{type(e).__name__}: {e}"
    return None


# assume_constant_result: torch.compile calls it at trace time and keeps the answer (dynamo
# would otherwise trace into importlib, which it refuses: a graph break, an error under
# fullgraph). The cache sits inside: dynamo warns about tracing through an lru_cache wrapper.
@_assume_constant_result
def _import_error(module: str) -> str | None:
    """None when ``module`` imports, else the error as a sentence (cached per module)."""
    return _import_error_cached(module)


def _triton_problem(device: torch.device) -> str | None:
    err = _import_error("triton")
    if err is not None:
        return f"the Triton backend needs the 'triton' package, which does not import ({err})"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreting():
        return None
    return (
        f"the Triton backend runs on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1, "
        f"set before triton is imported); got a tensor on {device}"
    )


# a constant for torch.compile too: loading the extension reads its build record (a file)
@_assume_constant_result
def _ext_problem(device: torch.device) -> str | None:
    from . import ext  # light: loads fastmae._C only now, when the backend is asked about

    why = ext.problem()
    if why is not None:
        return f"backend='ext': {why}"
    if device.type == "cuda" and not ext.has_cuda_kernels():
        return ("backend='ext': fastmae._C was built without its CUDA kernels (a CPU torch or no nvcc at build "
                f"time), so it runs on CPU tensors only; rebuild it with the CUDA toolkit: {ext.BUILD_HINT}")
    if device.type not in ("cpu", "cuda"):
        return f"backend='ext' runs on CPU and CUDA tensors; got a tensor on {device}"
    return None


def _xformers_problem(device: torch.device) -> str | None:
    err = _import_error("xformers.ops")
    if err is not None:
        return f"the xformers backend needs the 'xformers' package, which does not import ({err})"
    if device.type != "cuda":
        return f"the xformers backend runs on CUDA tensors only; got a tensor on {device}"
    return None


def _problem(backend: str, device: torch.device) -> str | None:
    if backend == "triton":
        return _triton_problem(device)
    if backend == "ext":
        return _ext_problem(device)
    if backend == "xformers":
        return _xformers_problem(device)
    return None  # torch, sdpa: always available


def available_backends(device="cpu", attention: bool = False) -> list[str]:
    """The named backends that can run on ``device`` (``auto`` excluded)."""
    device = torch.device(device)
    names = ATTENTION_BACKENDS if attention else BACKENDS
    return [b for b in names if b != "auto" and _problem(b, device) is None]


def resolve(requested: str | None, device: torch.device, attention: bool = False, implemented=None,
            auto_cpu=()) -> str:
    """The concrete backend an op runs with.

    ``requested`` is the op's ``backend=`` argument (``None`` means the process default);
    ``implemented`` is the set of backends the op has (default: all); ``auto_cpu`` the
    backends ``"auto"`` may take for CPU tensors, in order, before the reference (those
    measured faster than it for this op). Raises
    :class:`BackendUnavailableError` when a named backend cannot run, ``ValueError`` for
    an unknown name.
    """
    name = get_backend() if requested is None else requested
    name = check_name(name, attention=True)
    if name in ("sdpa", "xformers") and not attention:
        if requested is None:  # process default set for attention: the other ops use auto
            name = "auto"
        else:
            raise ValueError(f"backend={name!r} is for attention only; use one of {BACKENDS}")
    implemented = set(ATTENTION_BACKENDS if attention else BACKENDS) if implemented is None else set(implemented)
    if name == "auto":
        if device.type == "cuda":
            for cand in ("triton", "ext"):
                if cand in implemented and _problem(cand, device) is None:
                    return cand
            return "sdpa" if attention else "torch"
        for cand in auto_cpu:
            if cand in implemented and _problem(cand, device) is None:
                return cand
        return "torch"
    problem = _problem(name, device)
    if problem is not None:
        raise BackendUnavailableError(problem)
    if name not in implemented:
        raise BackendUnavailableError(f"backend={name!r} has no implementation of this op yet")
    return name
