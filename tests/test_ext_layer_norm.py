"""The compiled extension's add + LayerNorm (fastmae.ext.layer_norm, backend="ext") against fastmae.reference.

CPU tests run the C++ twin (csrc/ops/cpu/layer_norm_kernel.cpp); the GPU-marked ones the
CUDA kernels (csrc/ops/cuda/layer_norm_kernel.cu) through the same oracle.

Oracle (the FlashAttention convention of the Triton tests, :func:`fastmae.validate.two_x_tolerance`):
from the same inputs, the reference in float64 (``exact``) and in the tested dtypes (float32
math, outputs rounded to their dtypes, PyTorch's autograd: ``lowp``); the op passes when
``max|op - exact| <= 2 max|lowp - exact| + floor`` for y and the gradients of x, residual,
weight and bias (random gradients of y and s), with the fp32 floor the other tests use.
``s = x + residual`` is one float32 addition rounded once to residual_dtype in both: compared
for exact equality.

The module skips (with the loader's reason) when fastmae._C is not built, or was built
without these ops; under ``FASTMAE_EXT_REQUIRED=1`` (``make test``) that is a failure instead.
"""

import pytest
import torch
from _ext import misaligned, require_ext
from _ln_oracle import at_stored_s

from fastmae import ext, ops
from fastmae import reference as ref
from fastmae.validate import two_x_tolerance

f16, f32, f64, bf16 = torch.float16, torch.float32, torch.float64, torch.bfloat16
EPS = 1e-6
_OPS = ("add_layer_norm_fwd", "add_layer_norm_bwd")

require_ext(_OPS)

DEVICE = "cpu"


# ----------------------------------------------------------------------------- oracle
def _assert_2x(name, got, lowp, exact, dtype):
    assert got is not None, f"{name}: missing"
    assert got.shape == exact.shape and got.dtype == lowp.dtype, (name, got.shape, got.dtype, lowp.dtype)
    err = (got.double() - exact).abs().max().item() if got.numel() else 0.0
    tol = two_x_tolerance(exact, lowp, dtype)
    assert err <= tol, f"{name}: max error {err:.3g} > tolerance {tol:.3g} (2x torch {dtype} + floor)"


def _leaves(ts, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_(True) for t in ts]


def _run(fn, ts, grads, dtype=None):
    leaves = _leaves(ts, dtype)
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    pairs = [(o, g if dtype is None else g.to(dtype)) for o, g in zip(outs, grads) if g is not None]
    want = [t for t in leaves if t is not None]
    got = iter(torch.autograd.grad([o for o, _ in pairs], want, [g for _, g in pairs], allow_unused=True))
    return [o.detach() for o in outs], [None if t is None else next(got) for t in leaves]


def check_add(x, r, w, b, out_dtype=None, res_dtype=None, grad_s=True, views=None):
    """ops.add_layer_norm(backend='ext') against the oracle; returns its ((y, s), grads)."""
    view = views or (lambda t: t)
    y_dt = out_dtype or x.dtype
    s_dt = res_dtype or (x.dtype if r is None else r.dtype)
    shape = view(x).shape
    gy = torch.randn(shape, device=x.device).to(y_dt)
    gs = torch.randn(shape, device=x.device).to(s_dt) if grad_s else None

    def op(x, r, w, b):
        return ops.add_layer_norm(view(x), None if r is None else view(r), w, b, EPS, out_dtype=out_dtype,
                                  residual_dtype=res_dtype, backend="ext")

    def lowp(x, r, w, b):
        return ref.add_layer_norm(view(x), None if r is None else view(r), w, b, EPS, out_dtype, res_dtype)

    def exact(x, r, w, b):  # the LayerNorm of the stored s (tests/_ln_oracle.py)
        vr = None if r is None else view(r)
        return ref.add_layer_norm(at_stored_s(view(x), vr, s_dt), vr, w, b, EPS, f64, f64)

    (y, s), grads = _run(op, [x, r, w, b], [gy, gs])
    (yl, sl), gl = _run(lowp, [x, r, w, b], [gy, gs])
    (ye, _), ge = _run(exact, [x, r, w, b], [gy, gs], dtype=f64)
    assert y.dtype == y_dt and s.dtype == s_dt and y.shape == s.shape == shape
    _assert_2x("y", y, yl, ye, y_dt)
    assert torch.equal(s, sl), f"s: max error {(s.double() - sl.double()).abs().max().item():.3g}"
    for name, g, g_l, g_e, t in zip(("dx", "dresidual", "dweight", "dbias"), grads, gl, ge, (x, r, w, b)):
        if t is None:
            assert g is None
            continue
        assert g.dtype == t.dtype, name
        _assert_2x(name, g, g_l, g_e, t.dtype)
    return (y, s), grads


def check_ln(x, w, b, out_dtype=None):
    y_dt = out_dtype or x.dtype
    gy = torch.randn(x.shape, device=x.device).to(y_dt)
    def op(x, w, b):
        return ops.layer_norm(x, w, b, EPS, out_dtype=out_dtype, backend="ext")

    (y,), grads = _run(op, [x, w, b], [gy])
    (yl,), gl = _run(lambda x, w, b: ref.layer_norm(x, w, b, EPS, out_dtype), [x, w, b], [gy])
    (ye,), ge = _run(lambda x, w, b: ref.layer_norm(x, w, b, EPS, f64), [x, w, b], [gy], dtype=f64)
    assert y.dtype == y_dt
    _assert_2x("y", y, yl, ye, y_dt)
    for name, g, g_l, g_e, t in zip(("dx", "dweight", "dbias"), grads, gl, ge, (x, w, b)):
        if t is not None:
            _assert_2x(name, g, g_l, g_e, t.dtype)


def _inputs(rows, D, x_dt=f32, r_dt=f32, w_dt=f32, device=DEVICE, lead=None):
    shape = tuple(lead or (rows,)) + (D,)
    x = (torch.randn(shape, device=device) * 0.7 + 0.3).to(x_dt)
    r = None if r_dt is None else (torch.randn(shape, device=device) * 2 - 0.5).to(r_dt)
    w = None if w_dt is None else (1 + 0.5 * torch.randn(D, device=device)).to(w_dt)
    b = None if w_dt is None else (0.3 * torch.randn(D, device=device)).to(w_dt)
    return x, r, w, b


# ----------------------------------------------------------------------------- CPU twin
ROWS = [1, 3, 197, 1000]
DIMS = [8, 40, 100, 768]


@pytest.mark.parametrize("dtype", [f32, f16, bf16])
@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("rows", ROWS)
def test_add_layer_norm_shapes(rows, D, dtype):
    x, r, w, b = _inputs(rows, D, dtype, dtype, dtype)
    check_add(x, r, w, b)


@pytest.mark.parametrize("dtype", [f32, f16])
@pytest.mark.parametrize("rows,D", [(1, 8), (3, 100), (197, 768), (1000, 40)])
def test_layer_norm_shapes(rows, D, dtype):
    x, _, w, b = _inputs(rows, D, dtype, None, dtype)
    check_ln(x, w, b)


def test_large_dims_and_leading_dims():
    x, r, w, b = _inputs(3, 2048, f16, f32, f32)
    check_add(x, r, w, b)
    x, r, w, b = _inputs(5, 3000, bf16, f32, f32)  # above the Triton limit: the twin takes any D
    check_add(x, r, w, b)
    x, r, w, b = _inputs(0, 40, f32, f16, f32, lead=(2, 3, 5))
    check_add(x, r, w, b)
    x, r, w, b = _inputs(0, 40, f16, f32, f32, lead=())  # x (D,): one row
    check_add(x, r, w, b)
    check_ln(x, w, b)


DTYPE_CASES = [
    (f16, f32, f32, None, None),
    (bf16, f32, f32, bf16, f32),
    (f32, f16, f32, f16, None),
    (f16, f16, f16, f32, f32),
    (f32, f32, bf16, bf16, bf16),
    (f16, None, f32, None, None),
    (bf16, None, f32, f32, f32),
    (f32, None, f32, f16, f16),
]


@pytest.mark.parametrize("x_dt,r_dt,w_dt,out_dt,res_dt", DTYPE_CASES)
def test_dtype_combinations(x_dt, r_dt, w_dt, out_dt, res_dt):
    x, r, w, b = _inputs(197, 100, x_dt, r_dt, w_dt)
    check_add(x, r, w, b, out_dt, res_dt)
    if r_dt is None:
        check_ln(x, w, b, out_dt)


@pytest.mark.parametrize("with_w,with_b", [(False, False), (True, False), (False, True)])
def test_no_weight_or_bias(with_w, with_b):
    x, r, w, b = _inputs(197, 40, f16, f32, f32)
    check_add(x, r, w if with_w else None, b if with_b else None)
    check_ln(x, w if with_w else None, b if with_b else None)


def test_only_one_output_used():
    x, r, w, b = _inputs(50, 40, f16, f32, f32)
    check_add(x, r, w, b, grad_s=False)
    xl, rl, wl, bl = _leaves([x, r, w, b])
    _, s = ops.add_layer_norm(xl, rl, wl, bl, EPS, backend="ext")
    gs = torch.randn_like(s)
    dx, dr, dw, db = torch.autograd.grad(s, (xl, rl, wl, bl), gs, allow_unused=True)
    assert torch.equal(dx, gs.to(f16)) and torch.equal(dr, gs) and dw is None and db is None


def test_non_contiguous():
    # x and residual as transposed / strided views; weight with stride 2
    base_x = torch.randn(100, 197) * 0.7
    base_r = torch.randn(197, 200) * 2
    x, r = base_x.t(), base_r[:, ::2]
    assert not x.is_contiguous() and not r.is_contiguous()
    w = (1 + 0.5 * torch.randn(200))[::2]
    b = 0.3 * torch.randn(100)
    check_add(x, r, w, b)
    check_ln(x, w, b)


def test_deterministic():
    x, r, w, b = _inputs(1000, 768, f16, f32, f32)
    (_, _), g1 = _run(lambda *t: ops.add_layer_norm(*t, EPS, backend="ext"), [x, r, w, b],
                      [torch.ones(1000, 768, dtype=f16), None])
    (_, _), g2 = _run(lambda *t: ops.add_layer_norm(*t, EPS, backend="ext"), [x, r, w, b],
                      [torch.ones(1000, 768, dtype=f16), None])
    for a, c in zip(g1, g2):
        assert torch.equal(a, c)


@pytest.mark.parametrize("with_res", [True, False])
def test_opcheck(with_res):
    x, r, w, b = _inputs(37, 40, f16, f32, f32)
    r = r if with_res else None
    fwd = torch.ops.fastmae_ext.add_layer_norm_fwd
    args = (x.requires_grad_(True), None if r is None else r.requires_grad_(True), w.requires_grad_(True),
            b.requires_grad_(True), EPS, f16, f32)
    torch.library.opcheck(fwd, args)
    y, s, mean, rstd = fwd(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    bwd_args = (torch.randn_like(y), torch.randn_like(s) if with_res else None, s if with_res else x.detach(),
                mean, rstd, w.detach(), b.detach(), f16, f32 if with_res else None)
    torch.library.opcheck(torch.ops.fastmae_ext.add_layer_norm_bwd, bwd_args)


def test_torch_compile_fullgraph():
    # the ext wrapper itself (ops.add_layer_norm resolves the backend at trace time, which
    # reads the extension's build record: not this op's concern)
    from fastmae.ext import layer_norm as E

    x, r, w, b = _inputs(64, 40, f32, f32, f32)

    def f(x, r, w, b):
        y, s = E.add_layer_norm(x, r, w, b, EPS)
        return y * 2, s

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, r, w, b)
    want = f(x, r, w, b)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_float64_is_a_clear_error():
    x, r, w, b = _inputs(3, 8, f64, f64, f64)
    with pytest.raises(TypeError, match="backend='ext' LayerNorm computes in float32"):
        ops.add_layer_norm(x, r, w, b, EPS, backend="ext")


def _error(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 -- the type and message are what is compared
        return type(e), str(e)
    return None


@pytest.mark.parametrize("case", ["weight_shape", "int_x", "eps", "residual_shape", "out_dtype"])
def test_bad_input_errors_are_the_other_backends(case):
    x, r, w, b = _inputs(4, 8)
    kw = dict(out_dtype=None)
    if case == "weight_shape":
        w = torch.ones(7)
    elif case == "int_x":
        x = torch.ones(4, 8, dtype=torch.int32)
    elif case == "residual_shape":
        r = torch.ones(4, 9)
    elif case == "out_dtype":
        kw = dict(out_dtype=torch.int64)
    eps = 0.0 if case == "eps" else EPS
    got = _error(lambda: ops.add_layer_norm(x, r, w, b, eps, backend="ext", **kw))
    want = _error(lambda: ops.add_layer_norm(x, r, w, b, eps, backend="torch", **kw))
    assert got is not None and got == want


def test_cuda_kernels_are_registered():
    # In a build with nvcc, both ops have CUDA kernels (checked on any machine, GPU or not).
    if not ext.has_cuda_kernels():
        pytest.skip("fastmae._C was built without CUDA (CppExtension)")
    for name in _OPS:
        for key in ("CPU", "CUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmae_ext::{name}", key), (name, key)


# ----------------------------------------------------------------------------- CUDA kernels
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [bf16, f16, f32])
@pytest.mark.parametrize("rows,D", [(1, 8), (3, 40), (197, 100), (1000, 768), (50, 1280), (7, 2048), (33, 3000)])
def test_cuda_matches_reference(rows, D, dtype, device="cuda"):
    # D % 8 == 0: 16-byte path (in registers up to 1024, re-read above); 100, 3000: scalar path
    x, r, w, b = _inputs(rows, D, dtype, f32, f32, device=device)
    check_add(x, r, w, b, res_dtype=f32)
    x, r, w, b = _inputs(rows, D, dtype, dtype, dtype, device=device)
    check_add(x, r, w, b)
    check_ln(x, w, b)


@pytest.mark.gpu
@pytest.mark.parametrize("x_dt,r_dt,w_dt,out_dt,res_dt", DTYPE_CASES)
def test_cuda_dtype_combinations(x_dt, r_dt, w_dt, out_dt, res_dt, device="cuda"):
    x, r, w, b = _inputs(197, 768, x_dt, r_dt, w_dt, device=device)
    check_add(x, r, w, b, out_dt, res_dt)


@pytest.mark.gpu
def test_cuda_non_contiguous_and_misaligned(device="cuda"):
    base = torch.randn(197, 769, device=device)
    x = base[:, 1:]  # rows 769 apart: made contiguous (a fresh, aligned copy), then the 16-byte path
    r = torch.randn(768, 197, device=device).t()
    w, b = 1 + 0.5 * torch.randn(768, device=device), 0.3 * torch.randn(768, device=device)
    check_add(x, r, w, b)
    # contiguous but one element past an allocation's start: the scalar path
    x, r, w, b = _inputs(197, 768, device=device)
    check_add(x, r, w, b, views=misaligned)


@pytest.mark.gpu
@pytest.mark.parametrize("rows,D", [(12800, 768), (50432, 512)])
def test_cuda_deterministic_and_mae_shapes(rows, D, device="cuda"):
    x, r, w, b = _inputs(rows, D, bf16, f32, f32, device=device)
    check_add(x, r, w, b, out_dtype=bf16)
    gy = torch.randn(rows, D, device=device).to(bf16)
    runs = [_run(lambda *t: ops.add_layer_norm(*t, EPS, out_dtype=bf16, backend="ext"), [x, r, w, b], [gy, None])[1]
            for _ in range(2)]
    for a, c in zip(*runs):
        assert torch.equal(a, c)


@pytest.mark.gpu
def test_cuda_backward_up_to_the_cards_shared_memory(device="cuda", optin=None):
    # the backward keeps a block's dW / dB partials (4 warps x 2 x D floats) in shared memory, with
    # the opt-in above 48 KB: the largest D the card allows runs, the next is a clear error
    if optin is None:
        optin = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    D = optin // 32 // 8 * 8
    x, r, w, b = _inputs(40, D, device=device)
    check_add(x, r, w, b)
    x, r, w, b = _inputs(4, D + 8, device=device)
    leaves = [t.detach().requires_grad_() for t in (x, r, w, b)]
    y, s = ops.add_layer_norm(*leaves, EPS, backend="ext")
    with pytest.raises(RuntimeError, match="bytes of shared memory a block; this card allows"):
        y.sum().backward()


# Shapes and devices the ops read by: a residual or ds of another shape is the same error on both
# devices; on CUDA an input on another device is an error, not a read of another device's memory.
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_raw_ops_shape_checks(device):
    fwd, bwd = torch.ops.fastmae_ext.add_layer_norm_fwd, torch.ops.fastmae_ext.add_layer_norm_bwd
    x, r, w, b = _inputs(6, 16, device=device)
    with pytest.raises(RuntimeError, match="add_layer_norm_fwd: residual must match x"):
        fwd(x, r[:5], w, b, EPS, f32, f32)
    y, s, mean, rstd = fwd(x, r, w, b, EPS, f32, f32)
    with pytest.raises(RuntimeError, match="add_layer_norm_bwd: ds must match s"):
        bwd(torch.randn_like(y), torch.randn_like(s)[:5], s, mean, rstd, w, b, f32, f32)


# Edges the raw ops take alike on both devices: rows of D = 0 (empty outputs; mean and rstd are
# 0 / 0, as the CPU computes them; on CUDA nothing to launch), rows above 2^20 elements (the
# CUDA forward stopped there), and dtype arguments outside float32 / float16 / bfloat16 (the
# same error, naming the argument).
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_raw_ops_edges_alike_on_both_devices(device):
    fwd, bwd = torch.ops.fastmae_ext.add_layer_norm_fwd, torch.ops.fastmae_ext.add_layer_norm_bwd
    x, r, w, b = _inputs(3, 0, device=device)
    y, s, mean, rstd = fwd(x, r, w, b, EPS, f32, f32)
    assert y.shape == s.shape == (3, 0) and bool(mean.isnan().all()) and bool(rstd.isnan().all())
    dx, dres, dw, db = bwd(torch.randn_like(y), torch.randn_like(s), s, mean, rstd, w, b, f32, None)
    assert dx.shape == (3, 0) and dres.numel() == 0 and dw.shape == db.shape == (0,)
    leaves = [t.requires_grad_() for t in (x, r, w, b)]
    y, s = ops.add_layer_norm(*leaves, EPS, backend="ext")
    grads = torch.autograd.grad((y, s), leaves, (torch.ones_like(y), torch.ones_like(s)))
    assert [g.shape for g in grads] == [(3, 0), (3, 0), (0,), (0,)]

    x, r, w, b = _inputs(3, 16, device=device)
    for name, args in (("out_dtype", (torch.int32, f32)), ("out_dtype", (f64, f32)),
                       ("residual_dtype", (f32, torch.int64))):
        with pytest.raises(RuntimeError, match=f"add_layer_norm_fwd: {name} must be float32, float16 or bfloat16"):
            fwd(x, r, w, b, EPS, *args)
    with pytest.raises(RuntimeError, match="add_layer_norm_fwd: x must be float32, float16 or bfloat16, got Double"):
        fwd(x.double(), r, w, b, EPS, f32, f32)
    y, s, mean, rstd = fwd(x, r, w, b, EPS, f32, f32)
    dy = torch.randn_like(y)
    with pytest.raises(RuntimeError, match="add_layer_norm_bwd: x_dtype must be float32, float16 or bfloat16"):
        bwd(dy, None, s, mean, rstd, w, b, torch.int32, None)
    with pytest.raises(RuntimeError, match="add_layer_norm_bwd: residual_dtype must be float32, float16 or bfloat16"):
        bwd(dy, None, s, mean, rstd, w, b, f32, torch.int16)
    with pytest.raises(RuntimeError, match="add_layer_norm_bwd: bias must be float32, float16 or bfloat16"):
        bwd(dy, None, s, mean, rstd, w, b.to(torch.int32), f32, None)
    # a zero gradient is +0 in every lane, vector body and tail alike (dx = (...) * rstd + 0)
    x, r, w, b = _inputs(3, 8 * 5 + 3, device=device)
    y, s, mean, rstd = fwd(x, r, -w.abs(), b, EPS, f32, f32)
    dx = bwd(torch.zeros_like(y), None, s, mean, rstd, -w.abs(), b, f32, None)[0]
    assert bool((dx.view(torch.int32) == 0).all()), "a -0 in dx"

    # a row of 2^20 + 8 elements: the forward against the oracle (the CUDA backward stops far
    # below, where a block's dW / dB partials fill its shared memory: its own clear error)
    x, r, w, b = _inputs(2, (1 << 20) + 8, device=device)
    y, s = ops.add_layer_norm(x, r, w, b, EPS, backend="ext")
    yl, sl = ref.add_layer_norm(x, r, w, b, EPS)
    ye, _ = ref.add_layer_norm(at_stored_s(x.double(), r.double(), f32), r.double(), w.double(), b.double(), EPS)
    _assert_2x("y", y, yl, ye, f32)
    assert torch.equal(s, sl)


@pytest.mark.gpu
def test_cuda_inputs_on_two_devices_are_an_error():
    fwd, bwd = torch.ops.fastmae_ext.add_layer_norm_fwd, torch.ops.fastmae_ext.add_layer_norm_bwd
    x, r, w, b = _inputs(6, 16, device="cuda")
    for args in ((x, r.cpu(), w, b), (x, r, w.cpu(), b), (x, r, w, b.cpu())):
        with pytest.raises(RuntimeError, match="must be on one device"):
            fwd(*args, EPS, f32, f32)
    y, s, mean, rstd = fwd(x, r, w, b, EPS, f32, f32)
    dy = torch.randn_like(y)
    for args in ((dy.cpu(), None, s, mean, rstd, w), (dy, s.cpu(), s, mean, rstd, w),
                 (dy, None, s, mean.cpu(), rstd, w), (dy, None, s, mean, rstd, w.cpu())):
        with pytest.raises(RuntimeError, match="must be on one device"):
            bwd(*args, b, f32, f32)


# ----------------------------------------------------------------------------- CPU code paths
# Both row-loop builds of the CPU twin, AVX2+FMA and baseline: the cpu_isa fixture (conftest.py).
CPU_BUILDS = ("avx2", "baseline")


@pytest.mark.parametrize("x_dt,r_dt,w_dt,out_dt,res_dt", [(f32, f32, f32, None, None), (f16, f16, f16, None, None),
                                                          (bf16, bf16, bf16, None, None), *DTYPE_CASES])
@pytest.mark.parametrize("rows,D", [(1, 8), (37, 100), (70, 768), (3, 1000)])  # D % 16 != 0: the tails
def test_cpu_builds_against_oracle(cpu_isa, rows, D, x_dt, r_dt, w_dt, out_dt, res_dt):
    x, r, w, b = _inputs(rows, D, x_dt, r_dt, w_dt)
    check_add(x, r, w, b, out_dt, res_dt)
    if r_dt is None:
        check_ln(x, w, b, out_dt)


def test_cpu_builds_without_weight_or_ds(cpu_isa):
    x, r, w, b = _inputs(70, 100, f32, f32, f32)
    check_add(x, r, None, None)
    check_add(x, r, w, None, grad_s=False)


def test_cpu_same_bits_for_any_thread_count():
    # dW / dB partials over fixed 32-row blocks, summed in block order: no dependence on threads
    x, r, w, b = _inputs(1000, 768, f32, f32, f32)
    gy, gs = torch.randn(1000, 768), torch.randn(1000, 768)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            runs.append(_run(lambda *t: ops.add_layer_norm(*t, EPS, backend="ext"), [x, r, w, b], [gy, gs]))
    finally:
        torch.set_num_threads(threads)
    for (outs, grads) in runs[1:]:
        for a, c in zip(outs + grads, runs[0][0] + runs[0][1]):
            assert torch.equal(a, c)


@pytest.mark.parametrize("with_res", [True, False])
def test_eager_path_is_the_registered_op(with_res):
    # fastmae.ext.layer_norm calls the ops below the autograd key (an autograd.Function): the
    # same bits as the op's registered autograd formula, which torch.compile traces
    x, r, w, b = _inputs(50, 40, f16, f32, f32)
    r = r if with_res else None
    gy, gs = torch.randn(50, 40).to(f16), torch.randn(50, 40)

    def registered(x, r, w, b):
        y, s, _, _ = torch.ops.fastmae_ext.add_layer_norm_fwd(x, r, w, b, EPS, f16, f32 if with_res else f16)
        return (y, s) if with_res else (y,)

    def eager(x, r, w, b):
        y, s = ops.add_layer_norm(x, r, w, b, EPS, backend="ext")
        return (y, s) if with_res else (y,)

    grads = [gy, gs] if with_res else [gy]
    got, want = _run(eager, [x, r, w, b], grads), _run(registered, [x, r, w, b], grads)
    for a, c in zip(got[0] + got[1], want[0] + want[1]):
        assert (a is None and c is None) or torch.equal(a, c)


@pytest.mark.parametrize("mode,shape,used", [
    *((m, sh, u) for m in ("eager", "aot_eager") for sh in ((6, 40), (2, 3, 40)) for u in ("y", "s", "both")),
    ("inductor", (2, 3, 40), "y"),  # one case: slow to compile
])  # fmt: skip
def test_gradients_of_x_and_residual_accumulate_apart(mode, shape, used):
    """x and residual of one dtype get one gradient: it must reach their .grad as separate
    storage, or accumulating a second micro-batch (in place) adds into both. The wrapper
    reshaped outside the op (one view each of one tensor; 3-D inputs eagerly, every shape under
    torch.compile): each .grad came out 3x the step's gradient after two steps, not 2x."""
    from fastmae.ext import layer_norm as E

    f = (lambda x, r: E.add_layer_norm(x, r, None, None, EPS)) if mode == "eager" else torch.compile(
        lambda x, r: E.add_layer_norm(x, r, None, None, EPS), backend=mode, fullgraph=True)
    x, r = torch.randn(*shape, requires_grad=True), torch.randn(*shape, requires_grad=True)
    gy, gs = torch.randn(*shape), torch.randn(*shape)

    def loss(y, s):
        return {"y": (y * gy).sum(), "s": (s * gs).sum(), "both": (y * gy).sum() + (s * gs).sum()}[used]

    for _ in range(2):
        loss(*f(x, r)).backward()
    want = torch.autograd.grad(loss(*ref.add_layer_norm(x, r, None, None, EPS)), x)[0]
    assert x.grad.untyped_storage().data_ptr() != r.grad.untyped_storage().data_ptr()
    torch.testing.assert_close(x.grad, 2 * want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r.grad, 2 * want, rtol=1e-5, atol=1e-5)


def _conversion_edges(dt, n):
    """n fp32 values at the edges of rounding to dt: exact ties between neighbours of dt (both
    parities of the last bit), dt's subnormals and ties among them, the overflow threshold,
    infinities, fp32 subnormals, random values across the range, and a NaN."""
    fi = torch.finfo(dt)
    v = (torch.randn(n) * 4).to(dt)
    up = (v.view(torch.int16) + 1).view(dt)  # the neighbour one step further from zero
    ties = (v.double() + up.double()) / 2  # exact in fp32 (dt has at most 11 significand bits)
    step = fi.smallest_normal / 2 ** (10 if dt == f16 else 7)  # dt's subnormal spacing
    sub = torch.randint(1, 128, (n,)).double() * step / 2  # subnormals of dt and the ties between them
    specials = torch.tensor([fi.max, -fi.max, float(fi.max) * (1 + 2.0 ** -12), float(fi.max) * 1.01, float("inf"),
                             -float("inf"), 1e-40, -3e-39, fi.smallest_normal, fi.tiny / 2, 65519.99, 65520.0,
                             float("nan")], dtype=torch.float64)
    pool = torch.cat([ties, sub, -sub, v.double() * 1.0001])
    pool = torch.cat([specials, pool[torch.randint(0, len(pool), (n - len(specials),))]])
    return pool[torch.randperm(n)].float()  # every special, at a random place (vector body or tail)


def _split(s):
    # x + r == s exactly in fp32: x keeps the top 12 significand bits, r the rest
    hi = (s.view(torch.int32) & ~0xFFF).view(torch.float32)
    hi = torch.where(torch.isfinite(s), hi, s)
    return hi, torch.where(torch.isfinite(s), s - hi, torch.zeros_like(s))


def _same_bits(got, want):
    assert torch.equal(torch.isnan(got), torch.isnan(want)), "NaN positions differ"
    bits = {2: torch.int16, 4: torch.int32}[got.element_size()]
    bad = (got.view(bits) != want.view(bits)) & ~torch.isnan(want)
    assert not bad.any(), f"{int(bad.sum())} values differ from torch's conversion, e.g. {want[bad][:4].tolist()}"


@pytest.mark.parametrize("dt", [f16, bf16])
def test_cpu_row_conversions_give_torchs_bits(cpu_isa, dt):
    # The twin's fp32 -> dt row store (8-wide where the build has it, then the tail) through s =
    # x + residual stored in dt, and its dt -> fp32 load through x in dt with s in fp32: the bits
    # of the reference's .to() for every non-NaN value, NaN where it has NaN.
    rows, D = 6, 8 * 9 + 5
    target = _conversion_edges(dt, rows * D).view(rows, D)
    x, r = _split(target)
    assert torch.equal((x + r)[~torch.isnan(target)], target[~torch.isnan(target)])
    w, b = torch.randn(D), torch.randn(D)
    _, s = ops.add_layer_norm(x, r, w, b, EPS, residual_dtype=dt, backend="ext")
    _same_bits(s, ref.add_layer_norm(x, r, w, b, EPS, residual_dtype=dt)[1])
    xd = target.to(dt)
    _, s = ops.add_layer_norm(xd, r, w, b, EPS, residual_dtype=f32, backend="ext")
    _same_bits(s, ref.add_layer_norm(xd, r, w, b, EPS, residual_dtype=f32)[1])


def test_cpu_bf16_rows_round_in_registers_as_torch(cpu_isa):
    # x, residual, s and y all bf16: the twin rounds s = x + residual in registers (fvec.h).
    # Sums that are exact ties between two bf16 neighbours (r half an ulp of x, both signs and
    # both parities), just above and below them, bf16 subnormals, overflow of fp32, infinities
    # and NaN, at random places in rows that span the 32-lane blocks, an 8-lane block and the
    # tail (D = 77): the bits of the reference's rounding.
    rows, D = 6, 77
    n = rows * D
    x = (torch.randn(n) * 8).to(bf16)
    half_ulp = torch.ldexp(torch.ones(n), torch.frexp(x.float())[1] - 9)  # half an ulp of x in bf16
    r = half_ulp * torch.tensor([1.0, -1.0, 1.5, -1.5, 0.75, -0.75])[torch.randint(0, 6, (n,))]
    specials = [(3.0e38, 3.0e38), (-3.0e38, -3.0e38), (float("inf"), 1.0), (float("inf"), float("-inf")),
                (float("nan"), 1.0), (1.0e-39, 2.0e-39), (-1.0e-39, 1.0e-40), (0.0, -0.0), (-0.0, -0.0)]
    where = torch.randperm(n)[:len(specials)]
    for k, (a, c) in zip(where.tolist(), specials):
        x[k], r[k] = a, c
    x, r = x.view(rows, D), r.to(bf16).view(rows, D)
    w, b = torch.randn(D), torch.randn(D)
    w.view(torch.int32)[torch.randint(0, D, (3,))] = 0x7FFFFFFF  # NaN weights whose payload rounds up into the sign
    y, s = ops.add_layer_norm(x, r, w, b, EPS, backend="ext")
    assert s.dtype == bf16 and y.dtype == bf16
    y_ref, s_ref = ref.add_layer_norm(x, r, w, b, EPS)
    _same_bits(s, s_ref)
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref))  # y's NaNs stay NaN (rounding them naively gives -0)
    rounded = (x.float() + r.float()) != (x.float() + r.float()).to(bf16).float()
    assert rounded.float().mean() > 0.5  # most sums are rounded: the test exercises the rounding
