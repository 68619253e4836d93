"""The compiled extension's bias + exact GELU (fastmae.ext.bias_gelu, backend="ext") against fastmae.reference.

CPU tests run the C++ twin (csrc/ops/cpu/bias_gelu_kernel.cpp: vectorised Abramowitz-Stegun
erf; its AVX-512, AVX2 and baseline loop builds each, through the cpu_isa fixture of
conftest.py), the GPU-marked ones the CUDA kernels (csrc/ops/cuda/bias_gelu_kernel.cu).

Oracle (as tests/test_kernel_bias_gelu.py, :func:`fastmae.validate.two_x_tolerance`), for y,
dx and dbias: ``max|out - ref64| <= 2 max|lowp - ref64| + floor``, ``ref64`` the reference in
float64 on the same inputs, ``lowp`` the less accurate of PyTorch's reference in the input
dtypes and the stock path ``F.gelu(x + bias.to(x.dtype))``; the fp32 floor of the other tests
(the twin's erf approximation, |error| <= 1.5e-7, is far inside it; a tanh GELU is not).
Skips (with the loader's reason) when fastmae._C is not built; fails instead under
``FASTMAE_EXT_REQUIRED=1``.
"""

import pytest
import torch
import torch.nn.functional as F
from _ext import misaligned, require_ext

from fastmae import ext, ops
from fastmae import reference as ref
from fastmae.validate import two_x_tolerance

f16, f32, f64, bf16 = torch.float16, torch.float32, torch.float64, torch.bfloat16
_OPS = ("bias_gelu_fwd", "bias_gelu_bwd")

require_ext(_OPS)

ROWS = [1, 3, 197, 1000]
HIDDEN = [8, 40, 100, 768]
DTYPES = [(f32, f32), (f16, f32), (bf16, f32), (f16, f16), (f32, f16), (bf16, bf16)]


def _inputs(shape, x_dtype, bias_dtype, device="cpu"):
    x = (torch.randn(shape, device=device) * 1.5).to(x_dtype)
    bias = (torch.randn(shape[-1], device=device) * 0.7).to(bias_dtype)
    return x, bias


def _torch_results(x, bias, dy, stock):
    xl = x.detach().clone().requires_grad_(True)
    bl = bias.detach().clone().requires_grad_(True)
    y = F.gelu(xl + bl.to(xl.dtype)) if stock else ref.bias_gelu(xl, bl)
    dx, db = torch.autograd.grad(y, (xl, bl), dy.to(y.dtype))
    return y.detach(), dx, db


def check(x, bias, view=None):
    """ops.bias_gelu(backend='ext') vs the oracle (x of any strides; ``view``: applied to x's leaf
    before the op, e.g. :func:`misaligned`, which a clone would undo)."""
    xl = x.detach().clone().requires_grad_(True)
    bl = bias.detach().clone().requires_grad_(True)
    y = ops.bias_gelu(view(xl) if view else xl, bl, backend="ext")
    dy = torch.randn(y.shape, device=x.device).to(x.dtype)
    dx, db = torch.autograd.grad(y, (xl, bl), dy)
    assert y.shape == x.shape and y.dtype == x.dtype and dx.dtype == x.dtype and db.dtype == bias.dtype
    r64 = _torch_results(x.double(), bias.double(), dy.double(), stock=False)
    lowp = [_torch_results(x, bias, dy, stock) for stock in (False, True)]
    for i, (name, out, dt) in enumerate((("y", y, x.dtype), ("dx", dx, x.dtype), ("dbias", db, bias.dtype))):
        err = (out.double() - r64[i]).abs().max().item() if out.numel() else 0.0
        tol = two_x_tolerance(r64[i], [lp[i] for lp in lowp], dt)
        assert err <= tol, f"{name}: max error {err:.3e} against float64 > tolerance {tol:.3e}"


@pytest.mark.parametrize("x_dtype,bias_dtype", DTYPES)
@pytest.mark.parametrize("H", HIDDEN)
@pytest.mark.parametrize("M", ROWS)
def test_matches_reference(M, H, x_dtype, bias_dtype):
    check(*_inputs((M, H), x_dtype, bias_dtype))


def test_leading_dims_wide_rows_and_extremes():
    check(*_inputs((2, 3, 50, 40), f32, f32))
    check(*_inputs((8, 3072), bf16, f32))
    x, b = _inputs((64, 16), f32, f32)
    x[0] = torch.tensor([-1e4, -60, -20, -13.2, -9.25, -5, -1e-3, 0, 1e-30, 3, 9.3, 13.2, 20, 60, 1e4, 1e30])
    check(x, b * 0)


def test_non_contiguous():
    x = (torch.randn(100, 197) * 1.5).t()  # (197, 100), rows strided
    b = (torch.randn(200) * 0.7)[::2]
    assert not x.is_contiguous() and not b.is_contiguous()
    check(x, b)


def test_deterministic():
    x, b = _inputs((1000, 768), f16, f32)
    dy = torch.randn(1000, 768).to(f16)
    outs = []
    for _ in range(2):
        xl, bl = x.clone().requires_grad_(True), b.clone().requires_grad_(True)
        outs.append(torch.autograd.grad(ops.bias_gelu(xl, bl, backend="ext"), (xl, bl), dy))
    assert all(torch.equal(a, c) for a, c in zip(*outs))


# ----------------------------------------------------------------------------- CPU code paths
# Every row-loop build of the CPU twin (AVX-512, AVX2+FMA, baseline): the cpu_isa fixture (conftest.py).
CPU_BUILDS = ("avx512", "avx2", "baseline")


@pytest.mark.parametrize("x_dtype,bias_dtype", DTYPES)
@pytest.mark.parametrize("M,H", [(1, 8), (37, 100), (70, 771), (33, 3072)])  # H % 16 != 0: the tails
def test_cpu_builds_against_oracle(cpu_isa, M, H, x_dtype, bias_dtype):
    check(*_inputs((M, H), x_dtype, bias_dtype))


def test_cpu_builds_extremes_and_strides(cpu_isa):
    x, b = _inputs((64, 19), f32, f32)
    x[0, :16] = torch.tensor([-1e4, -60, -20, -13.2, -9.25, -5, -1e-3, 0, 1e-30, 3, 9.3, 13.2, 20, 60, 1e4, 1e30])
    check(x, b * 0)
    check(x.to(bf16), b * 0)
    check((torch.randn(100, 197) * 1.5).t(), (torch.randn(200) * 0.7)[::2])


def test_cpu_builds_mixed_dy_dtype(cpu_isa):
    # the op itself takes dy in another dtype than x: the fp32 row buffers; a 16-bit dy (or x)
    # is exact in fp32, so the results equal those of the fp32 inputs, to the bit
    bwd = torch.ops.fastmae_ext.bias_gelu_bwd
    for lowp in (f16, bf16):
        x, b = _inputs((70, 100), lowp, f32)
        dy = torch.randn(70, 100).to(lowp)
        want_dx, want_db = bwd(dy.float(), x.float(), b)
        got_dx, got_db = bwd(dy, x.float(), b)  # fp32 x, 16-bit dy
        assert torch.equal(got_dx, want_dx) and torch.equal(got_db, want_db)
        got_dx, got_db = bwd(dy.float(), x, b)  # 16-bit x, fp32 dy: dx in x's dtype
        assert torch.equal(got_dx, want_dx.to(lowp)) and torch.equal(got_db, want_db)


@pytest.mark.parametrize("x_dtype", [f32, bf16])
def test_cpu_same_bits_for_any_thread_count(cpu_isa, x_dtype):
    # dbias partials over fixed 32-row blocks, summed in block order: no dependence on threads
    x, b = _inputs((1000, 771), x_dtype, f32)
    dy = torch.randn(1000, 771).to(x_dtype)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            xl, bl = x.clone().requires_grad_(True), b.clone().requires_grad_(True)
            y = ops.bias_gelu(xl, bl, backend="ext")
            runs.append((y.detach(), *torch.autograd.grad(y, (xl, bl), dy)))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        assert all(torch.equal(a, c) for a, c in zip(runs[0], run))


def test_opcheck():
    x, b = _inputs((37, 40), f16, f32)
    torch.library.opcheck(torch.ops.fastmae_ext.bias_gelu_fwd, (x.requires_grad_(True), b.requires_grad_(True)))
    torch.library.opcheck(torch.ops.fastmae_ext.bias_gelu_bwd, (torch.randn(37, 40).to(f16), x.detach(), b.detach()))


def test_torch_compile_fullgraph():
    from fastmae.ext import bias_gelu as E  # the ext wrapper itself (see test_ext_layer_norm)

    x, b = _inputs((64, 40), f32, f32)
    f = torch.compile(lambda x, b: E.bias_gelu(x, b) * 2, fullgraph=True, backend="aot_eager")
    assert torch.equal(f(x, b), E.bias_gelu(x, b) * 2)


def _error(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 -- the type and message are what is compared
        return type(e), str(e)
    return None


@pytest.mark.parametrize("case", ["bias_shape", "int_x", "int_bias", "scalar_x"])
def test_bad_input_errors_are_the_other_backends(case):
    x, b = _inputs((4, 8), f32, f32)
    if case == "bias_shape":
        b = torch.ones(7)
    elif case == "int_x":
        x = torch.ones(4, 8, dtype=torch.int32)
    elif case == "int_bias":
        b = torch.ones(8, dtype=torch.int64)
    elif case == "scalar_x":
        x = torch.tensor(1.0)
    got = _error(lambda: ops.bias_gelu(x, b, backend="ext"))
    want = _error(lambda: ops.bias_gelu(x, b, backend="torch"))
    assert got is not None and got == want


def test_float64():
    x, b = _inputs((4, 8), f64, f64)
    with pytest.raises(TypeError, match="float64"):
        ops.bias_gelu(x, b, backend="ext")


def test_cuda_kernels_are_registered():
    if not ext.has_cuda_kernels():
        pytest.skip("fastmae._C was built without CUDA (CppExtension)")
    for name in _OPS:
        for key in ("CPU", "CUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmae_ext::{name}", key), (name, key)


# ----------------------------------------------------------------------------- CUDA kernels
@pytest.mark.gpu
@pytest.mark.parametrize("x_dtype,bias_dtype", DTYPES)
@pytest.mark.parametrize("M,H", [(1, 8), (3, 40), (197, 100), (1000, 768), (12800, 3072), (777, 2048)])
def test_cuda_matches_reference(M, H, x_dtype, bias_dtype, device="cuda"):
    check(*_inputs((M, H), x_dtype, bias_dtype, device=device))


@pytest.mark.gpu
def test_cuda_misaligned_and_deterministic(device="cuda", big=(50432, 2048)):
    base = torch.randn(197 * 769 + 1, device=device).to(bf16)
    x = base[1:].view(197, 769)[:, :768]  # strided: made contiguous (a fresh, aligned copy), the 16-byte path
    check(x, torch.randn(768, device=device))
    check(*_inputs((197, 768), bf16, f32, device=device), view=misaligned)  # one element off: the scalar path
    x, b = _inputs(big, bf16, f32, device=device)
    dy = torch.randn(big, device=device).to(bf16)
    outs = []
    for _ in range(2):
        xl, bl = x.clone().requires_grad_(True), b.clone().requires_grad_(True)
        outs.append(torch.autograd.grad(ops.bias_gelu(xl, bl, backend="ext"), (xl, bl), dy))
    assert all(torch.equal(a, c) for a, c in zip(*outs))


@pytest.mark.gpu
def test_cuda_inputs_on_two_devices_are_an_error():
    # the dispatcher takes the CUDA kernel when any input is on the GPU: it must not read the others' memory
    fwd, bwd = torch.ops.fastmae_ext.bias_gelu_fwd, torch.ops.fastmae_ext.bias_gelu_bwd
    x, b = _inputs((37, 40), f32, f32, device="cuda")
    dy = torch.randn_like(x)
    with pytest.raises(RuntimeError, match="must be on one device"):
        fwd(x, b.cpu())
    for args in ((dy.cpu(), x, b), (dy, x, b.cpu())):
        with pytest.raises(RuntimeError, match="must be on one device"):
            bwd(*args)
