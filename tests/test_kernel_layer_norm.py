"""Triton LayerNorm and residual add + LayerNorm (fastmae.kernels.layer_norm) against fastmae.reference.

Oracle (the FlashAttention convention of tests/test_kernel_attention.py, implemented by
:func:`fastmae.validate.two_x_tolerance`): from the same inputs, the reference evaluated
in float64 (every input, ``s`` and ``y`` in float64: ``exact``) and in the tested dtypes
(float32 math, outputs rounded to their dtypes, PyTorch's autograd for the gradients:
``lowp``). The kernel passes when

    max|kernel - exact| <= 2 max|lowp - exact| + max(2 ulps of the dtype at 0.3 max|exact|, 1e-5 max|exact|)

for ``y`` and for the gradients of x, residual, weight and bias from random gradients of
``y`` and ``s``. The first term dominates in fp16 (the rounding of the outputs, and in
lowp of the intermediate gradient casts); the floor, in fp32, is the float32
accumulation-order floor of the existing tests (dW / dB sum up to 1000 rows, the row
statistics up to 2048 values, in another order than PyTorch's), far below a wrong
normalisation, a missing residual gradient or a row or column off by one.

``s = x + residual`` is one float32 addition rounded once to residual_dtype in both the
kernel and the reference: compared for exact equality (fp32 and fp16; the interpreter
truncates instead of rounding bf16 casts, so bf16 is a GPU test). ``y`` is the LayerNorm of
that stored ``s``, so ``exact`` normalises the same stored values, with the rounding's
gradient passed straight through in float64 (``tests/_ln_oracle.at_stored_s``): the float64 LayerNorm of
the unrounded sum is another function, and at small D the one-ulp shift of an element of
``s`` moved its gradient by more than the kernel's and PyTorch's own rounding (PyTorch's
second rounding of dx, after the add of ds, could land nearer it by chance; about 1 seed in
5,500 at D = 8 in bf16 failed so, while against the stored ``s`` the kernel was the nearer).
"""

import math

import pytest
import torch
from _ln_oracle import at_stored_s

from fastmae import ops
from fastmae import reference as ref
from fastmae.validate import two_x_tolerance

pytest.importorskip("triton")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fastmae.kernels import layer_norm as K  # noqa: E402

f16, f32, f64, bf16 = torch.float16, torch.float32, torch.float64, torch.bfloat16
EPS = 1e-6


# ----------------------------------------------------------------------------- oracle
def _assert_2x(name, got, lowp, exact, dtype):
    assert got is not None, f"{name}: missing"
    assert got.shape == exact.shape and got.dtype == lowp.dtype, (name, got.shape, got.dtype, lowp.dtype)
    err = (got.double() - exact).abs().max().item() if got.numel() else 0.0
    tol = two_x_tolerance(exact, lowp, dtype)
    assert err <= tol, f"{name}: max error {err:.3g} > tolerance {tol:.3g} (2x torch {dtype} + floor)"


def _leaf(t, dtype=None):
    if t is None:
        return None
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)


def _run(fn, bases, views, grads):
    """Outputs of ``fn(*views(leaves))`` and the gradients of the leaves (the bases' copies)."""
    leaves = [_leaf(t) for t in bases]
    args = [None if t is None else v(t) for t, v in zip(leaves, views)]
    outs = fn(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    pairs = [(o, g) for o, g in zip(outs, grads) if g is not None]
    want = [t for t in leaves if t is not None]
    got = torch.autograd.grad([o for o, _ in pairs], want, [g for _, g in pairs], allow_unused=True)
    it = iter(got)
    return [o.detach() for o in outs], [None if t is None else next(it) for t in leaves]


def _ident(t):
    return t



def check_add(x, r, w, b, out_dtype=None, res_dtype=None, views=None, grad_s=True, eps=EPS):
    """add_layer_norm kernel against the oracle; returns the kernel's ((y, s), grads)."""
    views = views or [_ident] * 4
    bases = [x, r, w, b]
    y_dt = out_dtype or x.dtype
    s_dt = res_dtype or (x.dtype if r is None else r.dtype)
    shape = views[0](x).shape
    gy = torch.randn(shape, device=x.device).to(y_dt)
    gs = torch.randn(shape, device=x.device).to(s_dt) if grad_s else None

    def kern(x, r, w, b):
        return K.add_layer_norm(x, r, w, b, eps, out_dtype, res_dtype)

    def lowp(x, r, w, b):
        return ref.add_layer_norm(x, r, w, b, eps, out_dtype, res_dtype)

    def exact(x, r, w, b):
        return ref.add_layer_norm(at_stored_s(x, r, s_dt), r, w, b, eps, f64, f64)

    (y, s), grads = _run(kern, bases, views, [gy, gs])
    (yl, sl), gl = _run(lowp, bases, views, [gy, gs])
    b64 = [None if t is None else t.double() for t in bases]
    (ye, _), ge = _run(exact, b64, views, [gy.double(), None if gs is None else gs.double()])
    assert y.dtype == y_dt and s.dtype == s_dt and y.shape == s.shape == shape
    _assert_2x("y", y, yl, ye, y_dt)
    assert torch.equal(s, sl), f"s: max error {(s.double() - sl.double()).abs().max().item():.3g}"
    for name, g, g_l, g_e, t in zip(("dx", "dresidual", "dweight", "dbias"), grads, gl, ge, bases):
        if t is None:
            assert g is None
            continue
        assert g.dtype == t.dtype
        _assert_2x(name, g, g_l, g_e, t.dtype)
    return (y, s), grads


def check_ln(x, w, b, out_dtype=None, views=None, eps=EPS):
    views = views or [_ident] * 3
    bases = [x, w, b]
    y_dt = out_dtype or x.dtype
    gy = torch.randn(views[0](x).shape, device=x.device).to(y_dt)

    def kern(x, w, b):
        return K.layer_norm(x, w, b, eps, out_dtype)

    def lowp(x, w, b):
        return ref.layer_norm(x, w, b, eps, out_dtype)

    def exact(x, w, b):
        return ref.layer_norm(x, w, b, eps, f64)

    (y,), grads = _run(kern, bases, views, [gy])
    (yl,), gl = _run(lowp, bases, views, [gy])
    (ye,), ge = _run(exact, [None if t is None else t.double() for t in bases], views, [gy.double()])
    assert y.dtype == y_dt
    _assert_2x("y", y, yl, ye, y_dt)
    for name, g, g_l, g_e, t in zip(("dx", "dweight", "dbias"), grads, gl, ge, bases):
        if t is None:
            assert g is None
            continue
        _assert_2x(name, g, g_l, g_e, t.dtype)
    return y, grads


def _inputs(rows, D, x_dt=f32, r_dt=f32, w_dt=f32, device="cpu", lead=None):
    """x and residual (rows, D) (or ``lead + (D,)``) on different scales and offsets, as a residual
    stream and a sublayer output are; weight around 1, bias around 0, both random."""
    shape = tuple(lead or (rows,)) + (D,)
    x = (torch.randn(shape, device=device) * 0.7 + 0.3).to(x_dt)
    r = None if r_dt is None else (torch.randn(shape, device=device) * 2 - 0.5).to(r_dt)
    w = None if w_dt is None else (1 + 0.5 * torch.randn(D, device=device)).to(w_dt)
    b = None if w_dt is None else (0.3 * torch.randn(D, device=device)).to(w_dt)
    return x, r, w, b


# ----------------------------------------------------------------------------- shapes
ROWS = [1, 3, 197, 1000]
DIMS = [8, 40, 100, 768]


@pytest.mark.parametrize("dtype", [f32, f16])
@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("rows", ROWS)
def test_add_layer_norm_shapes(kernel_device, rows, D, dtype):
    x, r, w, b = _inputs(rows, D, dtype, dtype, dtype, kernel_device)
    check_add(x, r, w, b)


@pytest.mark.parametrize("dtype", [f32, f16])
@pytest.mark.parametrize("rows,D", [(1, 8), (3, 100), (197, 768), (1000, 40)])
def test_layer_norm_shapes(kernel_device, rows, D, dtype):
    x, _, w, b = _inputs(rows, D, dtype, None, dtype, kernel_device)
    check_ln(x, w, b)


def test_largest_dim(kernel_device):
    x, r, w, b = _inputs(3, 2048, f16, f32, f32, kernel_device)
    check_add(x, r, w, b)
    check_ln(x, w, b)


def test_leading_dims_and_rank_one(kernel_device):
    x, r, w, b = _inputs(0, 40, f32, f16, f32, kernel_device, lead=(2, 3, 5))
    check_add(x, r, w, b)
    x, r, w, b = _inputs(0, 40, f16, f32, f32, kernel_device, lead=())  # x (D,): one row
    check_add(x, r, w, b)
    check_ln(x, w, b)


# (x, residual, weight/bias, out_dtype, residual_dtype): the model under autocast (a low-precision
# sublayer output added to an fp32 residual stream, fp32 parameters, y in the autocast dtype for
# the next matmul), an fp32 x on a low-precision stream, y in a wider dtype than x, and residual
# None (s = x in residual_dtype).
DTYPE_CASES = [
    (f16, f32, f32, None, None),
    (f16, f32, f32, f16, f32),
    (f32, f16, f32, f16, None),
    (f16, f16, f16, f32, f32),
    (f32, f32, f16, f16, f16),
    (f16, None, f32, None, None),
    (f16, None, f32, f32, f32),
    (f32, None, f32, f16, f16),
]


@pytest.mark.parametrize("x_dt,r_dt,w_dt,out_dt,res_dt", DTYPE_CASES)
def test_dtype_combinations(kernel_device, x_dt, r_dt, w_dt, out_dt, res_dt):
    x, r, w, b = _inputs(197, 100, x_dt, r_dt, w_dt, kernel_device)
    check_add(x, r, w, b, out_dt, res_dt)
    if r_dt is None:
        check_ln(x, w, b, out_dt)


def test_float64(kernel_device):
    # fp64 inputs compute in fp64 (kernel and reference): y within the fp32 floor of the exact result
    x, r, w, b = _inputs(37, 100, f64, f64, f64, kernel_device)
    check_add(x, r, w, b)


@pytest.mark.parametrize("with_w,with_b", [(False, False), (True, False), (False, True)])
def test_no_weight_or_bias(kernel_device, with_w, with_b):
    x, r, w, b = _inputs(197, 40, f16, f32, f32, kernel_device)
    check_add(x, r, w if with_w else None, b if with_b else None)
    check_ln(x, w if with_w else None, b if with_b else None)


def test_only_one_output_used(kernel_device):
    # s unused: its gradient is None (no zeros read); y unused: d x = d s, no dW / dB.
    x, r, w, b = _inputs(50, 40, f16, f32, f32, kernel_device)
    check_add(x, r, w, b, grad_s=False)
    xl, rl, wl, bl = (_leaf(t) for t in (x, r, w, b))
    _, s = K.add_layer_norm(xl, rl, wl, bl, EPS)
    gs = torch.randn_like(s)
    dx, dr, dw, db = torch.autograd.grad(s, (xl, rl, wl, bl), gs, allow_unused=True)
    assert torch.equal(dx, gs.to(f16)) and torch.equal(dr, gs) and dw is None and db is None


def test_eps_matters(kernel_device):
    # Nearly constant rows: the variance is of the order of eps, so a wrong eps (or one outside
    # the square root) moves y by O(1).
    x, r, w, b = _inputs(20, 64, f32, f32, f32, kernel_device)
    x = 0.5 + 1e-3 * x
    r = 1e-3 * r
    for eps in (1e-6, 1e-5, 1e-3):
        check_add(x, r, w, b, eps=eps)


# ----------------------------------------------------------------------------- layouts
def test_non_contiguous(kernel_device):
    D = 40
    dev = kernel_device
    # x: a (4, 9, D) view with last-dim stride 2 and a sliced token dim; residual: (B, T) leading
    # dims that do not merge (stored transposed); weight, bias: strided.
    x = torch.randn(4, 10, 2 * D, device=dev, dtype=f16)
    r = torch.randn(10, 4, D, device=dev)
    w = 1 + torch.randn(2 * D, device=dev)
    b = torch.randn(3 * D, device=dev)
    views = [lambda t: t[:, 1:, ::2], lambda t: t.transpose(0, 1)[:, 1:], lambda t: t[::2], lambda t: t[::3]]
    assert not any(v(t).is_contiguous() for v, t in zip(views, (x, r, w, b)))
    check_add(x, r, w, b, views=views)
    check_ln(x, w, b, views=[views[0], views[2], views[3]])
    # rank 4 with three non-mergeable leading dims (copied to rows), and a broadcast (stride 0) residual
    x4 = torch.randn(3, 4, 5, D, device=dev)
    r4 = torch.randn(1, 1, 5, D, device=dev)
    views4 = [lambda t: t.permute(2, 0, 1, 3)[:, :, 1:], lambda t: t.expand(3, 4, 5, D).permute(2, 0, 1, 3)[:, :, 1:],
              _ident, _ident]
    check_add(x4, r4, w[:D].clone(), b[:D].clone(), views=views4)


def test_gradients_with_stride_zero(kernel_device):
    # y.sum() and s.sum() send expanded (stride 0) gradients into the backward kernel
    x, r, w, b = _inputs(33, 40, f32, f32, f32, kernel_device)
    leaves = [_leaf(t) for t in (x, r, w, b)]
    y, s = K.add_layer_norm(*leaves, EPS)
    got = torch.autograd.grad(y.sum() + 0.5 * s.sum(), leaves)
    ones = torch.ones_like(y)
    lref = [_leaf(t) for t in (x, r, w, b)]
    yr, sr = ref.add_layer_norm(*lref, EPS)
    want = torch.autograd.grad([yr, sr], lref, [ones, 0.5 * ones])
    l64 = [_leaf(t, f64) for t in (x, r, w, b)]
    y6, s6 = ref.add_layer_norm(*l64, EPS)
    exact = torch.autograd.grad([y6, s6], l64, [ones.double(), 0.5 * ones.double()])
    for name, g, gl, ge in zip(("dx", "dres", "dw", "db"), got, want, exact):
        _assert_2x(name, g, gl, ge, f32)


def test_zero_rows(kernel_device):
    x = torch.randn(0, 3, 40, device=kernel_device, requires_grad=True)
    w = torch.randn(40, device=kernel_device, requires_grad=True)
    y, s = K.add_layer_norm(x, x, w, None, EPS)
    assert y.shape == s.shape == x.shape
    (dw,) = torch.autograd.grad(y, w, torch.zeros_like(y))
    assert torch.equal(dw, torch.zeros_like(w))


# ----------------------------------------------------------------------------- the dW / dB reduction
def test_many_programs_and_reduction_loops(kernel_device, monkeypatch):
    # Forward: 2-row tiles (D = 40 -> BLOCK_D = 64), 99 programs for 197 rows. Backward: 99 tiles
    # over at most 7 programs -> 15 tiles each (the persistent loop), the last program with 9; the
    # reduction adds the 7 partial rows 4 at a time (2 steps, the last partial) in 16-column
    # programs (3 of them, the last half empty).
    monkeypatch.setattr(K, "_TILE", 128)
    monkeypatch.setattr(K, "_BWD_TILE", 128)
    monkeypatch.setattr(K, "_BWD_PROGRAMS", 7)
    monkeypatch.setattr(K, "_FINAL_ROWS", 4)
    monkeypatch.setattr(K, "_FINAL_COLS", 16)
    assert K._blocks(40, 197, K._BWD_TILE)[:2] == (64, 2)
    assert K.bwd_grid(197, 2) == (7, 15)
    x, r, w, b = _inputs(197, 40, f16, f32, f32, kernel_device)
    check_add(x, r, w, b)
    check_ln(x, w, b)


def test_backward_grid_is_persistent():
    # MAE shapes on the GPU constants: at most _BWD_PROGRAMS programs, several tiles each.
    for M, D in ((12800, 768), (50432, 512), (3, 2048)):
        block_d, block_m, _ = K._blocks(D, M, 2048)
        programs, per = K.bwd_grid(M, block_m)
        tiles = math.ceil(M / block_m)
        assert programs <= K._BWD_PROGRAMS and programs * per >= tiles > (programs - 1) * per


def test_deterministic(kernel_device):
    x, r, w, b = _inputs(300, 100, f16, f32, f32, kernel_device)
    gy, gs = torch.randn(300, 100).to(f16), torch.randn(300, 100)
    runs = []
    for _ in range(2):
        leaves = [_leaf(t) for t in (x, r, w, b)]
        y, s = K.add_layer_norm(*leaves, EPS)
        runs.append((y, s) + torch.autograd.grad([y, s], leaves, [gy, gs]))
    for a, c in zip(*runs):
        assert torch.equal(a, c)


# ----------------------------------------------------------------------------- op checks
_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("with_res", [True, False])
def test_opcheck(kernel_device, with_res):
    x, r, w, b = _inputs(0, 24, f16, f32, f32, kernel_device, lead=(2, 5))
    x, w, b = x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True)
    r = r.requires_grad_(True) if with_res else None
    torch.library.opcheck(torch.ops.fastmae.add_layer_norm.default, (x, r, w, b, EPS, f16, f32), test_utils=_OPCHECK)
    torch.library.opcheck(torch.ops.fastmae.layer_norm.default, (x, w, None, EPS, f32), test_utils=_OPCHECK)
    y, s, mean, rstd = torch.ops.fastmae.add_layer_norm(x, r, w, b, EPS, f16, f32)
    gy, gs, s, w, b = torch.randn_like(y), torch.randn_like(s), s.detach(), w.detach(), b.detach()
    for args in ((gy, gs, s, mean, rstd, w, b, f16, f32), (gy, None, s, mean, rstd, None, b, f16, None),
                 (gy, gs, s, mean, rstd, w, None, f32, f32)):
        torch.library.opcheck(torch.ops.fastmae.layer_norm_backward.default, args, test_utils=_OPCHECK)


def test_torch_compile_fullgraph(kernel_device):
    def f(x, r, w, b, w2, b2):
        y, s = K.add_layer_norm(x * 1.5, r, w, b, EPS, out_dtype=f16)
        z = K.layer_norm(y, w2, b2, EPS, out_dtype=f32)
        return (z * z).sum() + (s * 0.5).sum()

    def g(x, r, w, b, w2, b2):
        y, s = ref.add_layer_norm(x * 1.5, r, w, b, EPS, out_dtype=f16)
        z = ref.layer_norm(y, w2, b2, EPS, out_dtype=f32)
        return (z * z).sum() + (s * 0.5).sum()

    x, r, w, b = _inputs(21, 40, f16, f32, f32, kernel_device)
    w2, b2 = 1 + torch.randn(40, device=kernel_device), torch.randn(40, device=kernel_device)
    compiled = torch.compile(f, fullgraph=True)
    ins = [x, r, w, b, w2, b2]
    leaves = [_leaf(t) for t in ins]
    out = compiled(*leaves)
    got = torch.autograd.grad(out, leaves)
    lref = [_leaf(t) for t in ins]
    want_out = g(*lref)
    want = torch.autograd.grad(want_out, lref)
    l64 = [_leaf(t, f64) for t in ins]

    def g64(x, r, w, b, w2, b2):
        y, s = ref.add_layer_norm(x * 1.5, r, w, b, EPS, out_dtype=f64)
        z = ref.layer_norm(y, w2, b2, EPS, out_dtype=f64)
        return (z * z).sum() + (s * 0.5).sum()

    exact_out = g64(*l64)
    exact = torch.autograd.grad(exact_out, l64)
    # the compiled graph's y is fp16 as in the reference: the same roundings, the 2x oracle on each
    _assert_2x("out", out.detach(), want_out.detach(), exact_out.detach(), f16)
    for name, a, c, e, t in zip(("x", "r", "w", "b", "w2", "b2"), got, want, exact, ins):
        _assert_2x("d" + name, a, c, e, t.dtype)


def test_cpu_fallbacks_are_the_reference():
    # The functions registered for CPU tensors outside the interpreter.
    x, r, w, b = _inputs(0, 40, f16, f32, f32, "cpu", lead=(3, 7))
    y, s, mean, rstd = K._add_layer_norm_cpu(x, r, w, b, EPS, f16, f32)
    yr, sr = ref.add_layer_norm(x, r, w, b, EPS, f16, f32)
    assert torch.equal(y, yr) and torch.equal(s, sr) and mean.shape == rstd.shape == (21,)
    yk, sk, mk, rk = torch.ops.fastmae.add_layer_norm(x, r, w, b, EPS, f16, f32)  # the kernels (interpreter)
    torch.testing.assert_close(mean, mk, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rstd, rk, rtol=1e-5, atol=0)
    y1, m1, r1 = K._layer_norm_cpu(x, w, None, EPS, f32)
    assert torch.equal(y1, ref.layer_norm(x, w, None, EPS, f32))
    gy, gs = torch.randn_like(yr), torch.randn_like(sr)
    cpu = K._layer_norm_backward_cpu(gy, gs, s, mean, rstd, w, b, f16, f32)
    # the backward fallback against the oracle: the reference's autograd in float64 and in the dtypes
    _, low = _run(lambda *t: ref.add_layer_norm(*t, EPS, f16, f32), [x, r, w, b], [_ident] * 4, [gy, gs])
    _, ex = _run(lambda *t: ref.add_layer_norm(*t, EPS, f64, f64), [t.double() for t in (x, r, w, b)], [_ident] * 4,
                 [gy.double(), gs.double()])
    for name, g, gl, ge in zip(("dx", "dresidual", "dweight", "dbias"), cpu, low, ex):
        _assert_2x(name, g, gl, ge, gl.dtype)
    dx, dr, dw, db = K._layer_norm_backward_cpu(gy, None, x, m1, r1, None, None, f16, f16)
    assert dr.shape == dw.shape == db.shape == (0,) and dx.shape == x.shape


# ----------------------------------------------------------------------------- properties
_DT = st.sampled_from([f32, f16])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 70), D=st.integers(8, 300), x_dt=_DT, r_dt=st.sampled_from([None, f32, f16]),
       w_dt=st.sampled_from([None, f32, f16]), out_dt=st.sampled_from([None, f32, f16]))
def test_property_add_layer_norm(kernel_device, rows, D, x_dt, r_dt, w_dt, out_dt):
    x, r, w, b = _inputs(rows, D, x_dt, r_dt, w_dt, kernel_device)
    check_add(x, r, w, b, out_dt)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 70), D=st.integers(8, 300), x_dt=_DT, out_dt=st.sampled_from([None, f32, f16]))
def test_property_layer_norm(kernel_device, rows, D, x_dt, out_dt):
    x, _, w, b = _inputs(rows, D, x_dt, None, f32, kernel_device)
    check_ln(x, w, b, out_dt)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_input_names_the_argument(kernel_device, backend):
    x, r, w, b = _inputs(4, 16, f32, f32, f32, kernel_device)
    cases = [
        (dict(weight=torch.ones(15)), ValueError, "weight"),
        (dict(bias=torch.ones(16, 1)), ValueError, "bias"),
        (dict(x=torch.ones(4, 16, dtype=torch.int64)), TypeError, "x"),
        (dict(weight=torch.ones(16, dtype=torch.int32)), TypeError, "weight"),
        (dict(eps=0.0), ValueError, "eps"),
        (dict(eps=-1e-5), ValueError, "eps"),
        (dict(eps=float("nan")), ValueError, "eps"),
        (dict(eps=float("inf")), ValueError, "eps"),
        (dict(out_dtype=torch.int32), TypeError, "out_dtype"),
        (dict(out_dtype="float16"), TypeError, "out_dtype"),
        (dict(x="not a tensor"), TypeError, "x"),
    ]
    for kw, err, name in cases:
        args = dict(x=x, weight=w, bias=b, eps=EPS)
        args.update(kw)
        with pytest.raises(err, match=name):
            ops.layer_norm(args.pop("x"), args.pop("weight"), args.pop("bias"), backend=backend, **args)
    add_cases = cases + [
        (dict(residual=torch.ones(4, 15)), ValueError, "residual"),
        (dict(residual=torch.ones(4, 16, dtype=torch.int32)), TypeError, "residual"),
        (dict(residual_dtype=torch.int64), TypeError, "residual_dtype"),
    ]
    for kw, err, name in add_cases:
        args = dict(x=x, residual=r, weight=w, bias=b, eps=EPS)
        args.update(kw)
        with pytest.raises(err, match=name):
            ops.add_layer_norm(args.pop("x"), args.pop("residual"), args.pop("weight"), args.pop("bias"),
                               backend=backend, **args)


def test_dim_limit(kernel_device):
    x = torch.randn(2, 2049, device=kernel_device)
    with pytest.raises(ValueError, match="D=2049"):
        ops.layer_norm(x, None, None, backend="triton")
    with pytest.raises(ValueError, match="D=2049"):
        ops.add_layer_norm(x, x, None, None, backend="triton")
    # auto on CPU tensors is the reference anyway; it takes any D
    assert torch.equal(ops.layer_norm(x, None, None, backend="auto"), ref.layer_norm(x, None, None))


def test_ops_dispatch(kernel_device):
    x, r, w, b = _inputs(10, 24, f16, f32, f32, kernel_device)
    y, s = ops.add_layer_norm(x, r, w, b, backend="triton")
    yr, sr = ops.add_layer_norm(x, r, w, b, backend="torch")
    assert torch.equal(s, sr) and y.dtype == yr.dtype == f16 and s.dtype == f32
    assert (y.float() - yr.float()).abs().max() <= 2e-3 * yr.float().abs().max()
    assert ops.layer_norm(x, w, b, out_dtype=f32, backend="triton").dtype == f32


# ----------------------------------------------------------------------------- bench floor
def test_bench_floor_bytes():
    from benchmarks import bench_ops

    M, D = 12800, 768
    bf, fp = 2, 4
    # add_layer_norm fwd: read x (bf16) + residual (fp32) + w, b (fp32); write y (bf16), s (fp32), mean, rstd
    fwd = M * D * (bf + fp) + 2 * D * fp + M * D * (bf + fp) + 2 * M * fp
    assert bench_ops.norm_op_bytes("add_layer_norm", M, D, "fwd") == fwd
    # bwd: read dy (bf16), ds (fp32), s (fp32), mean, rstd, w; write dx (bf16), dres (fp32), dw, db
    bwd = M * D * (bf + fp + fp) + 2 * M * fp + D * fp + M * D * (bf + fp) + 2 * D * fp
    assert bench_ops.norm_op_bytes("add_layer_norm", M, D, "fwd+bwd") == fwd + bwd
    lfwd = M * D * fp + 2 * D * fp + M * D * bf + 2 * M * fp
    lbwd = M * D * (bf + fp) + 2 * M * fp + D * fp + M * D * fp + 2 * D * fp
    assert bench_ops.norm_op_bytes("layer_norm", M, D, "fwd") == lfwd
    assert bench_ops.norm_op_bytes("layer_norm", M, D, "fwd+bwd") == lfwd + lbwd


# ----------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("M,D", [(12800, 768), (50432, 512), (6272, 1024), (4000, 1280), (197, 2048)])
def test_bf16_mae_shapes_gpu(M, D):
    # the model under autocast: bf16 sublayer output, fp32 residual stream and parameters, bf16 y
    x, r, w, b = _inputs(M, D, bf16, f32, f32, "cuda")
    check_add(x, r, w, b, bf16)
    x, r, w, b = _inputs(M, D, bf16, bf16, bf16, "cuda")
    check_add(x, r, w, b)
    check_ln(x, w, b)
    x, _, w, b = _inputs(M, D, f32, None, f32, "cuda")
    check_ln(x, w, b, bf16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [f32, f16])
def test_mae_shapes_gpu(dtype):
    x, r, w, b = _inputs(12800, 768, dtype, f32, f32, "cuda")
    check_add(x, r, w, b, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("M,D", [(12800, 768), (50432, 512)])
def test_deterministic_gpu(M, D):
    # Hundreds of programs run concurrently; with no atomics dW / dB (and dx) must not depend on their order.
    x, r, w, b = _inputs(M, D, bf16, f32, f32, "cuda")
    gy, gs = torch.randn(M, D, device="cuda").to(bf16), torch.randn(M, D, device="cuda")
    first = None
    for _ in range(3):
        leaves = [_leaf(t) for t in (x, r, w, b)]
        y, s = K.add_layer_norm(*leaves, EPS, bf16)
        got = (y, s) + torch.autograd.grad([y, s], leaves, [gy, gs])
        if first is None:
            first = got
        else:
            for a, c in zip(first, got):
                assert torch.equal(a, c)


@pytest.mark.parametrize("op", ["add_layer_norm", "layer_norm"])
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
def test_bench_norm_case_triton_matches_torch(kernel_device, op, direction):
    # the benchmark's timed step: fastmae's op (interpreter here) computes what the stock path does
    from benchmarks import bench_ops

    make, step = bench_ops._norm_case(op, 20, 48, direction, "triton", kernel_device, f16)
    _, stock = bench_ops._norm_case(op, 20, 48, direction, "torch", kernel_device, f16)
    args = make()
    got, want = step(*args), stock(*args)
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    n = {("add_layer_norm", "fwd"): 2, ("add_layer_norm", "fwd+bwd"): 4, ("layer_norm", "fwd"): 1,
         ("layer_norm", "fwd+bwd"): 3}[op, direction]
    assert len(got) == len(want) == n
    for a, c in zip(got, want):
        assert a.dtype == c.dtype and a.shape == c.shape
        torch.testing.assert_close(a.float(), c.float(), rtol=2e-3, atol=2e-3 * c.float().abs().max().item())
    assert all(t.grad is None for t in args if isinstance(t, torch.Tensor))


def test_bench_norms_section_cpu(tmp_path):
    import json

    from benchmarks import bench_ops

    assert bench_ops.main(["--device", "cpu", "--out", str(tmp_path), "--quiet", "--reps", "2", "--warmup", "1",
                           "--sections", "norms", "--backends", "torch,triton"]) == 0
    (path,) = tmp_path.glob("ops-*.json")
    rows = json.load(open(path))["results"]
    assert {(r["op"], r["backend"], r["direction"]) for r in rows if r["status"] == "ok"} >= {
        (op, "torch", d) for op in bench_ops.NORM_OPS for d in ("fwd", "fwd+bwd")}
    for r in rows:
        M, D = r["shape"]
        assert r["section"] == "norms" and r["floor_bytes"] == bench_ops.norm_op_bytes(r["op"], M, D, r["direction"])
