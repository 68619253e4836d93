"""Test setup: without a CUDA device, Triton kernels run on CPU tensors through the
Triton interpreter, which must be switched on before triton and the kernels are imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from _cuda_guard import pytest_runtest_makereport  # noqa: E402, F401  (a faulting kernel stops its process)

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
try:
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:
    HAS_TRITON = False

# Device the Triton kernels are tested on: the GPU when there is one, else the CPU
# through the interpreter.
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def kernel_device():
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    return KERNEL_DEVICE


@pytest.fixture(autouse=True)
def _poison_kernel_outputs():
    # Every kernel output starts as NaN / -1, so an element a kernel fails to write fails its test.
    from fastmae._library import poisoned_outputs

    with poisoned_outputs():
        yield


@pytest.fixture(autouse=True)
def _fresh_seed():
    # Fresh random inputs every run, but reproducible within a run when printed on failure.
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    yield seed


# The loop builds of the extension's CPU kernels (csrc/common.h: 0 baseline, 1 AVX2 + FMA,
# 2 AVX-512). A test that takes the ``cpu_isa`` fixture runs once per build its module names in
# ``CPU_BUILDS`` (default: all three), with the others switched off through the private op
# fastmae_ext::_cpu_isa_cap; a build this CPU lacks is skipped (the best build it has already
# runs in the case above it).
CPU_ISA_LEVELS = {"avx512": 2, "avx2": 1, "baseline": 0}


def pytest_generate_tests(metafunc):
    if "cpu_isa" in metafunc.fixturenames:
        builds = getattr(metafunc.module, "CPU_BUILDS", tuple(CPU_ISA_LEVELS))
        metafunc.parametrize("cpu_isa", builds, indirect=True)


@pytest.fixture
def cpu_isa(request):
    cap = torch.ops.fastmae_ext._cpu_isa_cap
    level = CPU_ISA_LEVELS[request.param]
    if level > cap(2):
        pytest.skip(f"this CPU has no {request.param} build")
    cap(level)
    try:
        yield request.param
    finally:
        cap(2)
