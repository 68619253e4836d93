"""The extension's CUDA kernels (csrc/ops/cuda/*.cu) run on the CPU, for machines without a GPU.

:func:`build` rewrites each kernel file a little (see emu.h: launches, dynamic shared memory,
the CUDA headers, the op registration) into ``build/cuda_emu/`` and compiles it with the C++
compiler against emu.h / emu.cpp, a CPU emulation of the CUDA C++ the kernels use: a block's
threads are fibers, barriers and warp collectives (shuffles, mma.sync) are released by a
scheduler that checks CUDA's rules (a lane that returned before its warp's shuffle, a launch
CUDA refuses, a write past the end of dynamic shared memory). The functions registered for
the CUDA key become ``torch.ops.fastmae_emu.<op>`` on CPU tensors.

:func:`emulated` then puts them behind ``torch.ops.fastmae_ext.<op>`` for CPU tensors (in
place of the C++ twins) while it is open, so that everything above the raw ops, the autograd
formulas and checks of fastmae.ext and fastmae.ops, runs on the emulated kernels unchanged.

This tests the kernels' index math, control flow, barriers and host-side launch logic, not the
GPU's numerics, timing or memory model (emu.h lists what is not modelled): the GPU run of
scripts/gpu_check.sh is still the judge.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CSRC = ROOT / "csrc"
KERNELS = sorted((CSRC / "ops" / "cuda").glob("*.cu"))
BUILD = ROOT / "build" / "cuda_emu"

SANITIZE = ["-fsanitize=alignment", "-fno-sanitize-recover=alignment"]
SMEM_OPTIN = 227 * 1024  # the emulated card's opt-in shared memory a block (sm_90; emu_cuda_context.h)

_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;(){}]*>)?)\s*<<<(.*?)>>>\s*\((.*?)\);", re.S)
_EXTERN_SMEM = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:]+)\s+(\w+)\[\];")
_STATIC_SMEM = re.compile(r"__shared__\s+((?:__align__\(\d+\)\s+)?[\w:]+)\s+([^;]+);")
_REGISTRATION = re.compile(r"TORCH_LIBRARY_IMPL\(fastmae_ext,\s*CUDA,\s*m\)")


def rewrite(src: str, header: bool = False, poison_scratch: bool = True) -> str:
    """One kernel file's source (or a header's: no registration), as the emulation compiles it
    (the rules in emu.h's header; and scratch buffers, at::empty, allocated poisoned as outputs are)."""
    src = src.replace("#include <ATen/cuda/CUDAContext.h>", '#include "emu_cuda_context.h"')
    src = src.replace("#include <c10/cuda/CUDAGuard.h>", '#include "emu_cuda_context.h"')
    if poison_scratch:  # csrc's kernel files (they have csrc/common.h): scratch buffers poisoned too
        src = src.replace("at::empty(", "::fastmae::empty_output(")
    src = _EXTERN_SMEM.sub(r"\1* \2 = reinterpret_cast<\1*>(::emu::dynamic_smem());", src)
    src = _STATIC_SMEM.sub(_static_smem, src)
    src = _LAUNCH.sub(
        lambda m: f"::emu::launch({m[1]}, ::emu::Config({m[2]}), [&] {{ {m[1]}({m[3]}); }}, {_cstr(m[1])});", src)
    if header:
        return src
    head, sep, tail = src.partition("TORCH_LIBRARY_IMPL(fastmae_ext, CUDA, m)")
    assert sep and not _REGISTRATION.search(tail), "one TORCH_LIBRARY_IMPL(fastmae_ext, CUDA, m) a kernel file"
    return head + "TORCH_LIBRARY_FRAGMENT(fastmae_emu, m)" + tail.replace("m.impl(", "m.def(")


def _static_smem(m: re.Match) -> str:
    # `__shared__ T a[..], b[..];` -> the arrays (static: one per kernel instantiation, shared by
    # the block's threads as blocks run one at a time) and their sizes noted for the launch check
    names = [d.strip().split("[")[0].strip() for d in m[2].split(",")]
    return f"static {m[1]} {m[2]};" + "".join(f" ::emu::note_static_smem({n}, sizeof({n}));" for n in names)


def _cstr(s: str) -> str:
    return '"' + " ".join(s.split()) + '"'


def op_names() -> list[str]:
    """The ops the kernel files register for the CUDA key."""
    names = []
    for f in KERNELS:
        tail = f.read_text().partition("TORCH_LIBRARY_IMPL(fastmae_ext, CUDA, m)")[2]
        names += re.findall(r'm\.impl\("(\w+)"', tail)
    return names


_loaded = False


def build(verbose: bool = False) -> None:
    """Compiles (incrementally: ninja, under build/cuda_emu) and loads the emulated kernels.

    Under ``FASTMAE_EMU_ASAN=1`` they are built with AddressSanitizer instead (build/cuda_emu_asan;
    run Python with libasan preloaded, scripts/emu_memcheck.sh): a read or write past the end of a
    tensor's allocation or of shared memory fails with its stack, as compute-sanitizer's memcheck
    would on the GPU."""
    global _loaded
    if _loaded:
        return
    from torch.utils import cpp_extension

    asan = os.environ.get("FASTMAE_EMU_ASAN") == "1"
    build_dir = BUILD.with_name(BUILD.name + "_asan") if asan else BUILD
    src_dir = build_dir / "src"
    src_dir.mkdir(parents=True, exist_ok=True)
    sources = [str(HERE / "emu.cpp")]
    # the kernels' own headers (.cuh) rewritten beside them: found first by their includes
    headers = sorted((CSRC / "ops" / "cuda").glob("*.cuh"))
    for f in [*KERNELS, HERE / "selftest.cu", *headers]:
        out = src_dir / (f.name if f.suffix == ".cuh" else f.stem + ".cpp")
        text = rewrite(f.read_text(), header=f.suffix == ".cuh", poison_scratch=f.parent != HERE)
        if not out.exists() or out.read_text() != text:
            tmp = out.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, out)
        if f.suffix != ".cuh":
            sources.append(str(out))
    cpp_extension.load(  # ninja rebuilds what changed, headers included
        name="fastmae_cuda_emu_asan" if asan else "fastmae_cuda_emu",
        sources=sources,
        # -fno-strict-aliasing: the kernels pun types through reinterpret_cast (a 32-bit word read
        # as a __half2, a __nv_bfloat162 as a uint32_t), as CUDA code does and nvcc compiles as
        # meant; g++ -O2 may drop such reads (seen: load_chunk's 16-bit path read zeros)
        # -fsanitize=alignment: a misaligned access (a 16-byte vector load from an 8-byte aligned
        # address) faults on the GPU; here it is an error naming the line, not a silent success
        extra_cflags=["-O2", "-fno-strict-aliasing", "-DFASTMAE_CUDA_EMU", "-include", str(HERE / "emu.h"),
                      "-Wno-unused-parameter", *SANITIZE, *(["-fsanitize=address", "-fno-omit-frame-pointer"]
                                                            if asan else [])],
        extra_ldflags=[*SANITIZE, *(["-fsanitize=address"] if asan else [])],
        extra_include_paths=[str(HERE), str(CSRC), str(CSRC / "ops"), str(CSRC / "ops" / "cuda")],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=verbose,
    )
    _loaded = True


def set_order(order: str = "ascending", seed: int = 0) -> None:
    """The order in which the emulation resumes runnable threads (and runs blocks):
    ``ascending``, ``descending`` or ``shuffled`` (from ``seed``)."""
    torch.ops.fastmae_emu.emu_set_order({"ascending": 0, "descending": 1, "shuffled": 2}[order], seed)


def launches() -> int:
    """The number of emulated kernel launches so far in this process."""
    return int(torch.ops.fastmae_emu.emu_launches())


@contextlib.contextmanager
def emulated():
    """While open, ``torch.ops.fastmae_ext.<op>`` on CPU tensors runs the emulated CUDA kernel
    (every op the kernel files register for CUDA); the C++ twins come back on exit."""
    from fastmae import ext
    from fastmae.ext import patchify  # noqa: F401 -- the probe below

    ext.load()  # first: the extension's own CPU kernels, registered later, would take precedence
    build()
    lib = torch.library.Library("fastmae_ext", "IMPL")
    try:
        for name in op_names():
            lib.impl(name, getattr(torch.ops.fastmae_emu, name), "CPU")
        before = launches()
        ext.patchify.patchify(torch.ones(1, 1, 2, 2), 2)
        if launches() == before:
            raise RuntimeError("_cuda_emu.emulated: torch.ops.fastmae_ext.patchify did not run the emulated kernel")
        yield
    finally:
        lib._destroy()

