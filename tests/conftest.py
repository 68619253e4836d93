"""Test setup: without a CUDA device, Triton kernels run on CPU tensors through the
Triton interpreter, which must be switched on before triton and the kernels are imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

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
