"""Fused Triton bias + GELU (fastmae.kernels.bias_gelu) against fastmae.reference.bias_gelu.

Oracle (for y, dx and dbias alike): the FlashAttention rule of ``fastmae.validate``,
``max|out - ref64| <= 2 max|lowp - ref64| + floor`` (:func:`fastmae.validate.two_x_tolerance`),
with ``ref64`` the reference evaluated in float64 on the same inputs (upcast) and ``lowp``
the less accurate of PyTorch's two low-precision results: the reference itself (float32
math, rounded to the input dtypes) and the stock path ``F.gelu(x + bias.to(x.dtype))``
(the bias added in x's dtype, as the stock Linear's epilogue does). The floor,
``max(2 x the rounding error at 0.3 max|ref64|, 1e-5 max|ref64|)``, is the fp32 one the
other kernel tests use: kernel and reference evaluate erf/exp with different float32
implementations (libdevice or numpy against ATen's), a few ulps apart, and dbias adds up
to 10^3 float32 terms in another order (~sqrt(n) eps32 relative); a wrong bias, a
missing row or a tanh-approximate GELU (up to ~5e-4 absolute at |v| ~ 2) is off by far more.
"""

import pytest
import torch
import torch.nn.functional as F

from fastmae import ops
from fastmae import reference as ref
from fastmae.validate import two_x_tolerance

pytest.importorskip("triton")
from fastmae.kernels import bias_gelu as K  # noqa: E402

ROWS = [1, 3, 197, 1000]
HIDDEN = [8, 40, 100, 768]
# (x dtype, bias dtype): fp32; fp16 activations with the fp32 parameter (autocast) or an
# fp16 bias; fp32 activations with an fp16 bias. bf16 is GPU-only: the interpreter
# truncates float32 -> bf16 casts instead of rounding them.
DTYPES = [
    (torch.float32, torch.float32),
    (torch.float16, torch.float32),
    (torch.float16, torch.float16),
    (torch.float32, torch.float16),
]


def _inputs(shape, x_dtype, bias_dtype, device):
    """Pre-activations and a bias spread over GELU's curved part (|v| up to ~6)."""
    H = shape[-1]
    x = (torch.randn(shape, device=device) * 1.5).to(x_dtype)
    bias = (torch.randn(H, device=device) * 0.7).to(bias_dtype)
    return x, bias


def _torch_results(x, bias, dy, stock: bool):
    """(y, dx, dbias) of PyTorch's own path on fresh leaves."""
    xl = x.detach().clone().requires_grad_(True)
    bl = bias.detach().clone().requires_grad_(True)
    y = F.gelu(xl + bl.to(xl.dtype)) if stock else ref.bias_gelu(xl, bl)
    dx, db = torch.autograd.grad(y, (xl, bl), dy.to(y.dtype))
    return y.detach(), dx, db


def _check(x, bias, dy=None, run=None):
    """Kernel (through ops, backend='triton') vs the oracle; returns the kernel's (y, dx, dbias)."""
    xl = x.detach().requires_grad_(True)
    bl = bias.detach().requires_grad_(True)
    y = ops.bias_gelu(xl, bl, backend="triton") if run is None else run(xl, bl)
    if dy is None:
        dy = torch.randn(x.shape, device=x.device).to(x.dtype)
    dx, db = torch.autograd.grad(y, (xl, bl), dy)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert db.shape == bias.shape and db.dtype == bias.dtype
    r64 = _torch_results(x.double(), bias.double(), dy.double(), stock=False)
    lowp = [_torch_results(x, bias, dy, stock) for stock in (False, True)]
    for i, (name, out, dt) in enumerate((("y", y, x.dtype), ("dx", dx, x.dtype), ("dbias", db, bias.dtype))):
        err = (out.double() - r64[i]).abs().max().item() if out.numel() else 0.0
        tol = two_x_tolerance(r64[i], [lp[i] for lp in lowp], dt)
        assert err <= tol, f"{name}: max error {err:.3e} against float64 > tolerance {tol:.3e}"
    return y, dx, db


@pytest.mark.parametrize("x_dtype,bias_dtype", DTYPES[:2])
@pytest.mark.parametrize("H", HIDDEN)
@pytest.mark.parametrize("M", ROWS)
def test_matches_reference(kernel_device, M, H, x_dtype, bias_dtype):
    _check(*_inputs((M, H), x_dtype, bias_dtype, kernel_device))


@pytest.mark.parametrize("x_dtype,bias_dtype", DTYPES)
def test_bias_dtypes(kernel_device, x_dtype, bias_dtype):
    _check(*_inputs((2, 49, 100), x_dtype, bias_dtype, kernel_device))


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16])
def test_vit_b_mlp_width_once(kernel_device, x_dtype):
    # H = 3072 (ViT-B's fc1): three column blocks of 1024.
    assert K._blocks(197, 3072)[1] == 1024
    _check(*_inputs((197, 3072), x_dtype, torch.float32, kernel_device))


def test_one_dim_and_empty(kernel_device):
    _check(*_inputs((100,), torch.float32, torch.float32, kernel_device))  # one row
    x, bias = _inputs((0, 40), torch.float32, torch.float32, kernel_device)
    xl, bl = x.requires_grad_(True), bias.requires_grad_(True)
    y = ops.bias_gelu(xl, bl, backend="triton")
    assert y.shape == (0, 40)
    dx, db = torch.autograd.grad(y, (xl, bl), torch.randn(0, 40, device=kernel_device))
    assert dx.shape == (0, 40) and torch.equal(db, torch.zeros_like(bias))  # an empty sum


def test_non_contiguous(kernel_device):
    dev = kernel_device
    base = torch.randn(100, 2 * 197, device=dev) * 1.5
    cases = {
        "transposed": torch.randn(100, 197, device=dev).t(),  # last-dim stride 197
        "every other column": base[:, ::2][:97],  # last-dim stride 2, row stride 394
        "row slice": base[3:60, 5:105],  # row stride 394, offset start
        "unflattenable": torch.randn(6, 2, 5, 24, device=dev).permute(2, 0, 1, 3)[:, ::2],  # reshape copies
    }
    for name, x in cases.items():
        assert not x.is_contiguous(), name
        bias = torch.randn(2 * x.shape[-1], device=dev)[::2]  # a strided bias too
        _check(x, bias)
        _check(x.half(), bias)


def test_non_contiguous_and_broadcast_grad(kernel_device):
    # dy with stride 0 (y.sum()'s gradient, expanded) and a transposed dy.
    x, bias = _inputs((33, 40), torch.float32, torch.float32, kernel_device)
    _check(x, bias, dy=torch.full((1, 1), 0.75, device=kernel_device).expand(33, 40))
    _check(x, bias, dy=torch.randn(40, 33, device=kernel_device).t())


def test_many_programs_and_loops(kernel_device, monkeypatch):
    # 16-column blocks (H = 40: 3 blocks, the last half padding), 4 rows a tile: 197 rows are
    # 50 row tiles; 7 backward programs per column block walk 7 or 8 tiles each; the final
    # reduction adds the 7 partial rows 2 at a time (the last step partial), 8 columns a program.
    monkeypatch.setattr(K, "_TILE", 64)
    monkeypatch.setattr(K, "_MAX_BLOCK_H", 16)
    monkeypatch.setattr(K, "_CPU_ROW_PROGRAMS", 7)
    monkeypatch.setattr(K, "_FINAL_BLOCK_P", 2)
    monkeypatch.setattr(K, "_FINAL_BLOCK_H", 8)
    assert K._blocks(197, 40)[:2] == (4, 16)
    if torch.device(kernel_device).type == "cpu":
        assert K._row_programs(50, 3, torch.device("cpu")) == 7
    for x_dtype in (torch.float32, torch.float16):
        _check(*_inputs((197, 40), x_dtype, torch.float32, kernel_device))
    # more programs than row tiles: P is capped at the row tiles (3 rows: one tile)
    _check(*_inputs((3, 40), torch.float32, torch.float32, kernel_device))


def test_block_h_choice():
    assert K._block_h(3072) == 1024 and K._block_h(2048) == 1024 and K._block_h(768) == 256
    assert K._block_h(100) == 128 and K._block_h(8) == 8 and K._block_h(40) == 64 and K._block_h(5120) == 1024
    assert K._block_h(1280) == 256 and K._block_h(1500) == 512  # 1536 lanes: less padding than 2048


def test_deterministic(kernel_device):
    x, bias = _inputs((197, 100), torch.float16, torch.float32, kernel_device)
    dy = torch.randn(197, 100, device=kernel_device).half()
    runs = [_check(x, bias, dy) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_saves_only_x_and_bias(kernel_device):
    x, bias = _inputs((5, 40), torch.float16, torch.float32, kernel_device)
    x.requires_grad_(True)
    bias.requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = ops.bias_gelu(x, bias, backend="triton")
    assert len(saved) == 2
    assert saved[0].dtype == x.dtype and saved[0].data_ptr() == x.data_ptr() and saved[0].shape == x.shape
    assert saved[1].dtype == bias.dtype and saved[1].data_ptr() == bias.data_ptr()
    y.sum().backward()
    assert x.grad is not None and bias.grad is not None


def test_grad_of_one_input_only(kernel_device):
    x, bias = _inputs((7, 40), torch.float32, torch.float32, kernel_device)
    x.requires_grad_(True)
    (dx,) = torch.autograd.grad(ops.bias_gelu(x, bias, backend="triton").sum(), (x,))
    assert dx.shape == x.shape and bias.grad is None


def test_opcheck(kernel_device):
    x, bias = _inputs((6, 40), torch.float16, torch.float32, kernel_device)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.fastmae.bias_gelu.default, (x.requires_grad_(True), bias.requires_grad_(True)),
                          test_utils=tests)
    dy = torch.randn(6, 40, device=kernel_device).half()
    torch.library.opcheck(torch.ops.fastmae.bias_gelu_backward.default, (dy, x.detach(), bias.detach()),
                          test_utils=tests)


def test_torch_compile_fullgraph(kernel_device):
    def f(x, bias):  # the op itself, as the other kernel tests (ops' backend lookup imports modules)
        return K.bias_gelu(x * 1.5, bias) * 2

    compiled = torch.compile(f, fullgraph=True)
    x, bias = _inputs((3, 5, 40), torch.float32, torch.float32, kernel_device)

    def run(xl, bl):
        return compiled(xl, bl)

    # the same oracle, on the compiled function against the reference of x * 1.5, then * 2
    xl, bl = x.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    y = run(xl, bl)
    dy = torch.randn_like(y)
    dx, db = torch.autograd.grad(y, (xl, bl), dy)
    x64, b64 = x.double().requires_grad_(True), bias.double().requires_grad_(True)
    y64 = ref.bias_gelu(x64 * 1.5, b64) * 2
    dx64, db64 = torch.autograd.grad(y64, (x64, b64), dy.double())
    x32, b32 = x.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    y32 = ref.bias_gelu(x32 * 1.5, b32) * 2
    dx32, db32 = torch.autograd.grad(y32, (x32, b32), dy)
    for out, r64, r32 in ((y, y64, y32), (dx, dx64, dx32), (db, db64, db32)):
        assert (out.double() - r64).abs().max() <= two_x_tolerance(r64, r32, torch.float32)


def test_cpu_fallbacks_are_the_reference():
    # The functions registered for CPU tensors outside the interpreter.
    x, bias = _inputs((4, 40), torch.float16, torch.float32, "cpu")
    assert torch.equal(K._bias_gelu_cpu(x, bias), ref.bias_gelu(x, bias))
    dy = torch.randn(4, 40).half()
    xl, bl = x.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    want = torch.autograd.grad(ref.bias_gelu(xl, bl), (xl, bl), dy)
    got = K._bias_gelu_backward_cpu(dy, x, bias)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_reference_is_the_exact_gelu_in_float32():
    # v = float(x) + float(bias), the erf GELU, rounded once to x's dtype.
    x = torch.randn(64, 24).half()
    bias = torch.randn(24)
    v = x.double() + bias.double()
    exact = 0.5 * v * (1 + torch.erf(v / 2**0.5))
    out = ref.bias_gelu(x, bias)
    assert out.dtype == torch.float16
    assert ((out.double() - exact).abs() <= 2**-11 * exact.abs() + 1e-6).all()  # half an fp16 ulp + fp32 error
    tanh = F.gelu(v, approximate="tanh")
    assert (exact - tanh).abs().max() > 1e-4  # what a tanh-approximate op (cuBLASLt's epilogue) would miss


# ----------------------------------------------------------------------------- bad input
def test_bad_input_names_the_argument():
    x = torch.randn(4, 8)
    bias = torch.randn(8)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.bias_gelu(x, torch.randn(9))
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.bias_gelu(x, torch.randn(1, 8))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        ops.bias_gelu(torch.ones(4, 8, dtype=torch.int32), bias)
    with pytest.raises(TypeError, match="bias must be a floating-point"):
        ops.bias_gelu(x, torch.ones(8, dtype=torch.int64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ops.bias_gelu([1.0] * 8, bias)
    with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
        ops.bias_gelu(x, None)
    with pytest.raises(ValueError, match="x must have at least 1 dimension"):
        ops.bias_gelu(torch.tensor(1.0), torch.randn(()))
    with pytest.raises(ValueError, match="bias is on meta"):
        ops.bias_gelu(x, torch.randn(8, device="meta"))
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.bias_gelu(x, bias, backend="nope")


def test_float64(kernel_device):
    # The Triton kernels compute in float32: float64 is the reference's on auto, an error on triton.
    x, bias = torch.randn(3, 8, dtype=torch.float64), torch.randn(8)
    assert torch.equal(ops.bias_gelu(x, bias), ref.bias_gelu(x, bias))
    with pytest.raises(TypeError, match="computes in float32"):
        ops.bias_gelu(x.to(kernel_device), bias.to(kernel_device), backend="triton")
    with pytest.raises(TypeError, match="computes in float32"):
        ops.bias_gelu(x.float().to(kernel_device), bias.double().to(kernel_device), backend="triton")


def test_dispatch():
    from fastmae.backend import BACKENDS, BackendUnavailableError

    x, bias = torch.randn(3, 8), torch.randn(8)
    assert torch.equal(ops.bias_gelu(x, bias, backend="torch"), ref.bias_gelu(x, bias))
    # auto on CPU tensors: the C++ twin where the extension is built (ops.EXT_CPU_AUTO), else the reference
    from fastmae import ext

    want = ops.bias_gelu(x, bias, backend="ext") if ext.problem() is None else ref.bias_gelu(x, bias)
    assert "bias_gelu" in ops.EXT_CPU_AUTO and torch.equal(ops.bias_gelu(x, bias), want)
    for name in set(BACKENDS) - {"auto", "torch", "triton"} - set(ops._IMPLS["bias_gelu"]):
        with pytest.raises(BackendUnavailableError):  # the compiled extension has no bias_gelu (yet)
            ops.bias_gelu(x, bias, backend=name)
    with pytest.raises(ValueError, match="attention only"):
        ops.bias_gelu(x, bias, backend="sdpa")


# ----------------------------------------------------------------------------- properties
hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
_FLOATS = st.sampled_from([torch.float32, torch.float16])


@hypothesis.settings(max_examples=12, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(lead=st.lists(st.integers(1, 9), min_size=0, max_size=2), H=st.integers(1, 300),
                  x_dtype=_FLOATS, bias_dtype=_FLOATS, transposed=st.booleans())
def test_property_any_shape_and_dtype(kernel_device, lead, H, x_dtype, bias_dtype, transposed):
    shape = (*lead, H)
    x, bias = _inputs(shape, x_dtype, bias_dtype, kernel_device)
    if transposed and x.dim() >= 2:  # the same values laid out with the last dim strided
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    _check(x, bias)


# ----------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,H", [(12800, 3072), (50432, 2048), (197, 100), (1000, 768)])
def test_bf16_gpu(M, H, bias_dtype):
    # ViT-B/16 MAE at batch 256: encoder fc1 (12,800 x 3072) and decoder fc1 (50,432 x 2048).
    _check(*_inputs((M, H), torch.bfloat16, bias_dtype, "cuda"))


@pytest.mark.gpu
def test_dbias_deterministic_gpu():
    # Hundreds of programs write partial sums concurrently; without atomics dx and dbias must
    # not depend on their order.
    x, bias = _inputs((50432, 2048), torch.bfloat16, torch.float32, "cuda")
    dy = torch.randn(50432, 2048, device="cuda").bfloat16()
    x.requires_grad_(True)
    bias.requires_grad_(True)
    first = None
    for _ in range(3):
        y = ops.bias_gelu(x, bias, backend="triton")
        dx, db = torch.autograd.grad(y, (x, bias), dy)
        if first is None:
            first = (y, dx, db)
        else:
            assert torch.equal(y, first[0]) and torch.equal(dx, first[1]) and torch.equal(db, first[2])


# ----------------------------------------------------------------------------- benchmark
def _bench_ops():
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/: not installed
    from benchmarks import bench_ops

    return bench_ops


def test_bench_floor_bytes():
    bench_ops = _bench_ops()
    M, H = 12800, 3072
    fwd = bench_ops.bias_gelu_bytes(M, H, "fwd", 2)
    assert fwd == M * H * 2 + 4 * H + M * H * 2  # read x, the fp32 bias; write y
    # backward: read dy, x, bias; write dx, dbias
    assert bench_ops.bias_gelu_bytes(M, H, "fwd+bwd", 2) == fwd + 3 * M * H * 2 + 2 * 4 * H
    assert bench_ops.bias_gelu_bytes(3, 5, "fwd", 4, bias_es=2) == 2 * 3 * 5 * 4 + 5 * 2
    assert bench_ops.linear_bias_gelu_flops(12800, 768, 3072) == 2 * 12800 * 768 * 3072


def test_bench_step_is_capture_safe(kernel_device):
    # The timed forward + backward returns autograd.grad's (dx, dbias), never touches .grad.
    bench_ops = _bench_ops()
    for backend in ("torch", "triton"):
        make, step = bench_ops._mlp_case("bias_gelu", 6, 4, 40, "fwd+bwd", backend, kernel_device, torch.float32)
        x, b, g = make()
        dx, db = step(x, b, g)
        assert x.grad is None and b.grad is None
        xr, br = x.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
        ref.bias_gelu(xr, br).backward(g)
        torch.testing.assert_close(dx, xr.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(db, br.grad, rtol=1e-5, atol=1e-5)
    make, step = bench_ops._mlp_case("linear_bias_gelu", 6, 4, 40, "fwd", "torch:addmm_activation", kernel_device,
                                     torch.float32)
    x, w, b = make()
    assert step(x, w, b).shape == (6, 40)
    with pytest.raises(ValueError, match="forward only"):
        bench_ops._mlp_case("linear_bias_gelu", 6, 4, 40, "fwd+bwd", "torch", kernel_device, torch.float32)


def test_bench_section_cpu_run(kernel_device, tmp_path):
    if torch.device(kernel_device).type != "cpu":
        pytest.skip("the CPU smoke run of the harness")
    import json

    bench_ops = _bench_ops()
    rc = bench_ops.main(["--device", "cpu", "--sections", "bias_gelu", "--backends", "torch,triton", "--out",
                         str(tmp_path), "--quiet", "--reps", "2", "--warmup", "1", "--dtype", "fp32"])
    assert rc == 0
    (path,) = tmp_path.glob("ops-*.json")
    rows = json.load(open(path))["results"]
    assert {(r["op"], r["backend"], r["direction"]) for r in rows if r["status"] == "ok"} == {
        *(("bias_gelu", b, d) for b in ("torch", "triton") for d in ("fwd", "fwd+bwd")),
        *(("linear_bias_gelu", b, "fwd") for b in ("torch", "triton", "torch:addmm_activation", "torch:linear"))}
    for r in rows:
        if r["op"] == "bias_gelu":
            M, H = r["shape"]
            assert r["floor_bytes"] == bench_ops.bias_gelu_bytes(M, H, r["direction"], 4)
            assert r["x_floor"] == pytest.approx(r["ms"] / r["floor_ms"])
        else:
            assert r["flops"] == bench_ops.linear_bias_gelu_flops(*r["shape"]) and r["tflops"] > 0


@pytest.mark.gpu
def test_addmm_activation_gelu_is_the_tanh_approximation_on_cuda():
    # The evidence the module docstring cites, on the device: cuBLASLt's bias + GELU epilogue
    # (torch._addmm_activation) matches the tanh GELU, not the exact one this op computes.
    x = torch.randn(512, 64, device="cuda") * 0.25
    w = torch.randn(64, 256, device="cuda") * 0.25
    b = torch.randn(256, device="cuda")
    pre = torch.addmm(b, x, w)
    y = torch._addmm_activation(b, x, w, use_gelu=True)
    to_tanh = (y - F.gelu(pre, approximate="tanh")).abs().max().item()
    to_erf = (y - F.gelu(pre)).abs().max().item()
    assert to_erf > 1e-4 and to_tanh < to_erf / 10, (to_tanh, to_erf)
