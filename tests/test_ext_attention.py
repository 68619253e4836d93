"""The compiled extension's attention (fastmae.ext.attention, backend="ext") against fastmae.reference.

CPU tests run the C++ twin (csrc/ops/cpu/attention_kernel.cpp), the GPU-marked ones the CUDA
kernels (csrc/ops/cuda/attention_kernel.cu: mma.sync for fp16/bf16, SIMT for fp32), both with
the index math of csrc/ops/attention.h.

Oracle (the FlashAttention convention of tests/test_kernel_attention.py): from the same
inputs, the reference in float64 and in the inputs' dtype; the op passes when
``max|op - ref64| <= 2 max|torch_lowprec - ref64| + floor`` for the output and for dq, dk, dv
from a random dO, ``floor`` two ulps of the dtype at the reference's magnitude and at least
1e-5 (N = 1: torch's dq, dk are exactly 0, the op's only up to fp32 rounding).
Skips (with the loader's reason) when fastmae._C is not built; fails instead under
``FASTMAE_EXT_REQUIRED=1``.
"""

import pytest
import torch
from _ext import require_ext

from fastmae import ext, ops
from fastmae import reference as ref

_OPS = ("attention_fwd", "attention_bwd")

require_ext(_OPS)

from fastmae.ext import attention as A  # noqa: E402

f16, f32, f64, bf16 = torch.float16, torch.float32, torch.float64, torch.bfloat16


# ----------------------------------------------------------------------------- oracle
def _floor(r, dtype):
    low = r.to(dtype)
    ulp = ((low + 0.3) - 0.3 - low).abs().max().item() if r.numel() else 0.0
    return max(2 * ulp, 1e-5)


def _assert_oracle(name, got, lowprec, exact, dtype):
    err = (got.double() - exact.double()).abs().max().item()
    base = (lowprec.double() - exact.double()).abs().max().item()
    bound = 2 * base + _floor(exact, dtype)
    assert err <= bound, f"{name}: max error {err:.3g} > 2 * {base:.3g} (torch {dtype}) + floor = {bound:.3g}"


def _packed_grads(fn, qkv, dout):
    qkv = qkv.detach().requires_grad_(True)
    out = fn(qkv)
    (g,) = torch.autograd.grad(out, qkv, dout)
    return out.detach(), g


def check_packed(qkv, dout, scale=None):
    dtype = qkv.dtype
    out, g = _packed_grads(lambda t: ops.attention_qkvpacked(t, scale=scale, backend="ext"), qkv, dout)
    out_lp, g_lp = _packed_grads(lambda t: ref.attention_qkvpacked(t, scale), qkv, dout)
    out_ex, g_ex = _packed_grads(lambda t: ref.attention_qkvpacked(t, scale), qkv.to(f64), dout.to(f64))
    assert out.dtype == dtype and out.shape == dout.shape and g.dtype == dtype and g.shape == qkv.shape
    _assert_oracle("out", out, out_lp, out_ex, dtype)
    for i, name in enumerate(("dq", "dk", "dv")):
        _assert_oracle(name, g[:, :, i], g_lp[:, :, i], g_ex[:, :, i], dtype)
    return out, g


def check_separate(q, k, v, dout, scale=None):
    dtype = q.dtype

    def run(fn, *ts):
        ts = [t.detach().requires_grad_(True) for t in ts]
        out = fn(*ts[:3])
        return out.detach(), torch.autograd.grad(out, ts[:3], ts[3])

    out, grads = run(lambda q, k, v: ops.attention(q, k, v, scale=scale, backend="ext"), q, k, v, dout)
    out_lp, grads_lp = run(lambda q, k, v: ref.attention(q, k, v, scale), q, k, v, dout)
    out_ex, grads_ex = run(lambda q, k, v: ref.attention(q, k, v, scale), *(t.to(f64) for t in (q, k, v, dout)))
    assert out.dtype == dtype and out.shape == q.shape
    _assert_oracle("out", out, out_lp, out_ex, dtype)
    for name, g, g_lp, g_ex, t in zip(("dq", "dk", "dv"), grads, grads_lp, grads_ex, (q, k, v)):
        assert g.dtype == dtype and g.shape == t.shape
        _assert_oracle(name, g, g_lp, g_ex, dtype)


def _randn(*shape, dtype, device="cpu"):
    return torch.randn(*shape, device=device).to(dtype)


# ----------------------------------------------------------------------------- CPU twin
# N = 1, 5 (tiny), 50 (ViT-B/16 encoder at 75% masking), 197 (its decoder), 256 (the limit);
# every head dim the CUDA kernels take.
SHAPES = [(1, 32), (5, 64), (50, 64), (50, 80), (197, 32), (65, 128), (256, 64), (17, 80)]


@pytest.mark.parametrize("dtype", [f32, f16, bf16])
@pytest.mark.parametrize("N,D", SHAPES)
def test_qkvpacked_matches_reference(N, D, dtype):
    B, H = 2, 2
    check_packed(_randn(B, N, 3, H, D, dtype=dtype), _randn(B, N, H, D, dtype=dtype))


@pytest.mark.parametrize("dtype", [f32, f16])
@pytest.mark.parametrize("N,D", SHAPES[:5])
def test_separate_matches_reference(N, D, dtype):
    q, k, v = _randn(1, N, 3, 3, D, dtype=dtype).unbind(2)
    check_separate(q, k, v, _randn(1, N, 3, D, dtype=dtype))


def test_scale_and_large_logits():
    qkv = _randn(2, 50, 3, 2, 64, dtype=f16) * 3
    check_packed(qkv, _randn(2, 50, 2, 64, dtype=f16), scale=0.3)


@pytest.mark.parametrize("dtype", [f32, f16])
def test_non_contiguous(dtype):
    B, N, H, D = 2, 37, 2, 64
    q = _randn(B, H, N, D, dtype=dtype).transpose(1, 2)
    k = _randn(B, N, H, 2 * D, dtype=dtype)[..., ::2]
    v = _randn(N, B, H, D, dtype=dtype).transpose(0, 1)
    dout = _randn(B, H, N, D, dtype=dtype).transpose(1, 2)
    check_separate(q, k, v, dout)


def test_lse_is_the_logsumexp():
    q, k, v = _randn(2, 50, 3, 2, 32, dtype=f32).unbind(2)
    out, lse = torch.ops.fastmae_ext.attention_fwd(q, k, v, 0.25)
    want = torch.logsumexp(torch.einsum("bnhd,bmhd->bhnm", q.double(), k.double()) * 0.25, dim=-1)
    assert lse.dtype == f32 and lse.shape == (2, 2, 50)
    torch.testing.assert_close(lse.double(), want, rtol=0, atol=1e-5)


def test_deterministic():
    qkv, dout = _randn(2, 197, 3, 2, 64, dtype=f16), _randn(2, 197, 2, 64, dtype=f16)
    a = _packed_grads(lambda t: ops.attention_qkvpacked(t, backend="ext"), qkv, dout)
    b = _packed_grads(lambda t: ops.attention_qkvpacked(t, backend="ext"), qkv, dout)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_opcheck():
    q, k, v = _randn(1, 17, 3, 2, 32, dtype=f16).unbind(2)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    torch.library.opcheck(torch.ops.fastmae_ext.attention_fwd, (q, k, v, 0.2))
    out, lse = torch.ops.fastmae_ext.attention_fwd(q.detach(), k.detach(), v.detach(), 0.2)
    dout = _randn(1, 17, 2, 32, dtype=f16)
    args = (dout, q.detach(), k.detach(), v.detach(), out, lse, 0.2)
    torch.library.opcheck(torch.ops.fastmae_ext.attention_bwd, args)


def test_torch_compile_fullgraph():
    qkv = _randn(2, 50, 3, 2, 32, dtype=f32)
    f = torch.compile(lambda t: A.attention_qkvpacked(t) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(qkv), A.attention_qkvpacked(qkv) * 2, rtol=0, atol=0)


@pytest.mark.parametrize("N,D,match", [(257, 64, "N=257"), (50, 96, "D=96"), (50, 256, "D=256"), (50, 16, "D=16")])
def test_limits_are_clear_errors(N, D, match):
    qkv = _randn(1, N, 3, 1, D, dtype=f16)
    with pytest.raises(ValueError, match=match):
        ops.attention_qkvpacked(qkv, backend="ext")
    with pytest.raises(ValueError, match=match):
        ops.attention(*qkv.unbind(2), backend="ext")


def test_float64_is_a_clear_error():
    with pytest.raises(TypeError, match="float64"):
        ops.attention(*_randn(1, 5, 3, 1, 32, dtype=f64).unbind(2), backend="ext")


def test_auto_never_takes_ext_on_cpu():
    # the CPU twin is not in ops.EXT_CPU_AUTO: auto runs the reference for CPU tensors
    assert "attention" not in ops.EXT_CPU_AUTO and "attention_qkvpacked" not in ops.EXT_CPU_AUTO


def _error(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 -- the type and message are what is compared
        return type(e), str(e)
    return None


@pytest.mark.parametrize("case", ["shapes", "dtypes", "ndim", "int", "scale", "packed_slot"])
def test_bad_input_errors_are_the_other_backends(case):
    q, k, v = _randn(1, 5, 3, 1, 32, dtype=f32).unbind(2)
    kw = {}
    if case == "shapes":
        k = _randn(1, 6, 1, 32, dtype=f32)
    elif case == "dtypes":
        v = v.to(f16)
    elif case == "ndim":
        q = q[0]
    elif case == "int":
        q, k, v = (t.to(torch.int32) for t in (q, k, v))
    elif case == "scale":
        kw = dict(scale=-1.0)
    if case == "packed_slot":
        qkv = _randn(1, 5, 2, 1, 32, dtype=f32)
        got = _error(lambda: ops.attention_qkvpacked(qkv, backend="ext"))
        want = _error(lambda: ops.attention_qkvpacked(qkv, backend="torch"))
    else:
        got = _error(lambda: ops.attention(q, k, v, backend="ext", **kw))
        want = _error(lambda: ops.attention(q, k, v, backend="torch", **kw))
    assert got is not None and got == want


def test_cuda_kernels_are_registered():
    if not ext.has_cuda_kernels():
        pytest.skip("fastmae._C was built without CUDA (CppExtension)")
    for name in _OPS:
        for key in ("CPU", "CUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmae_ext::{name}", key), (name, key)


def test_shared_limits():
    assert A.MAX_N == 256 and A.HEAD_DIMS == (32, 64, 80, 128)


# ----------------------------------------------------------------------------- CUDA kernels
# N around the 16-row strips and the pairs-per-block steps (N <= 16: 4 pairs a block, <= 32: 2),
# MAE's 50 / 65 / 197 / 257-1, every head dim; fp16 and bf16 on mma.sync, fp32 on the SIMT path.
GPU_N = [1, 5, 16, 17, 32, 33, 50, 64, 65, 197, 256]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [bf16, f16, f32])
@pytest.mark.parametrize("D", [32, 64, 80, 128])
@pytest.mark.parametrize("N", GPU_N)
def test_cuda_qkvpacked_matches_reference(N, D, dtype, device="cuda"):
    B, H = 3, 5
    check_packed(_randn(B, N, 3, H, D, dtype=dtype, device=device), _randn(B, N, H, D, dtype=dtype, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [bf16, f16, f32])
def test_cuda_non_contiguous_and_scale(dtype, device="cuda"):
    B, N, H, D = 2, 37, 3, 80
    q = _randn(B, H, N, D, dtype=dtype, device=device).transpose(1, 2)
    k = _randn(B, N, H, 2 * D, dtype=dtype, device=device)[..., ::2]
    v = _randn(N, B, H, D, dtype=dtype, device=device).transpose(0, 1)
    dout = _randn(B, H, N, D, dtype=dtype, device=device).transpose(1, 2)
    check_separate(q, k, v, dout, scale=0.3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [bf16, f16])
@pytest.mark.parametrize("B,N,H,D", [(256, 50, 12, 64), (256, 197, 16, 32), (64, 65, 16, 80)])
def test_cuda_mae_shapes_and_deterministic(B, N, H, D, dtype, device="cuda"):
    qkv = _randn(B, N, 3, H, D, dtype=dtype, device=device)
    dout = _randn(B, N, H, D, dtype=dtype, device=device)
    out, g = check_packed(qkv, dout)
    out2, g2 = _packed_grads(lambda t: ops.attention_qkvpacked(t, backend="ext"), qkv, dout)
    assert torch.equal(out, out2) and torch.equal(g, g2)


# ----------------------------------------------------------------------------- CPU twin: tiling
# The C++ twin computes every product with register tiles of 6 rows x 16 (or 8) columns over
# N padded to a multiple of 8 (and D too, for head dims the CUDA kernels do not take, reachable
# through torch.ops): every row-tail 1..6 and both column tails, at MAE's head counts.
# Both builds of the twin's tile loops, AVX2+FMA and baseline: the cpu_isa fixture (conftest.py).
CPU_BUILDS = ("avx2", "baseline")


@pytest.mark.parametrize("N", list(range(1, 26)) + [31, 33, 48, 49, 63, 64, 97])
def test_cpu_every_tile_tail(N, cpu_isa):
    check_packed(_randn(1, N, 3, 2, 32, dtype=f32), _randn(1, N, 2, 32, dtype=f32))


@pytest.mark.parametrize("B,N,H,D", [(2, 50, 12, 64), (2, 197, 16, 32)])
def test_cpu_mae_shapes(B, N, H, D, cpu_isa):
    # the benchmark's encoder and decoder heads (ViT-B at 75% masking), several pairs a thread
    check_packed(_randn(B, N, 3, H, D, dtype=f32), _randn(B, N, H, D, dtype=f32))


@pytest.mark.parametrize("D", [8, 20, 40, 72])
def test_cpu_any_head_dim_through_torch_ops(D):
    # backend="ext" takes D in HEAD_DIMS (the CUDA kernels'); the C++ op itself pads D to a multiple of 8
    q, k, v, dout = _randn(2, 4, 23, 2, D, dtype=f32).unbind(1)
    scale = D ** -0.5
    out, lse = torch.ops.fastmae_ext.attention_fwd(q, k, v, scale)
    g = torch.ops.fastmae_ext.attention_bwd(dout, q, k, v, out, lse, scale)

    def run(*ts):
        ts = [t.detach().requires_grad_(True) for t in ts]
        o = ref.attention(*ts[:3], scale)
        return (o.detach(), *torch.autograd.grad(o, ts[:3], ts[3]))

    lowprec, exact = run(q, k, v, dout), run(*(t.double() for t in (q, k, v, dout)))
    for name, got, lp, ex in zip(("out", "dq", "dk", "dv"), (out, *g.unbind(2)), lowprec, exact):
        _assert_oracle(name, got, lp, ex, f32)


def _check_softmax_underflow(dtype, device):
    # logits spread over hundreds: most of P underflows (the twin's exp gives exactly 0 below
    # ln FLT_MIN), lse must still be the logsumexp. For the oracle q and k are small integers, so
    # that every logit is exact in fp32 whatever the summation order: with rounded logits of
    # this size the problem is so ill-conditioned that the fp32 result is a lottery over
    # rounding orders (PyTorch itself, with the head dim permuted, fails the oracle for 65 of 200
    # seeds; scripts/attention_oracle_spread.py). The lse check takes 6 N(0, 1) inputs.
    qkv = _randn(2, 40, 3, 2, 32, dtype=f32, device=device)
    qkv[:, :, :2] = torch.randint(-6, 7, qkv[:, :, :2].shape, device=device).float()
    check_packed(qkv.to(dtype), _randn(2, 40, 2, 32, dtype=dtype, device=device), scale=1.0)
    q, k, v = (_randn(2, 40, 3, 2, 32, dtype=f32, device=device) * 6).unbind(2)
    _, lse = torch.ops.fastmae_ext.attention_fwd(q, k, v, 1.0)
    want = torch.logsumexp(torch.einsum("bnhd,bmhd->bhnm", q.double(), k.double()), dim=-1)
    torch.testing.assert_close(lse.double(), want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [f32, bf16])
def test_cpu_softmax_underflow(dtype, cpu_isa):
    _check_softmax_underflow(dtype, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [f32, bf16])
def test_cuda_softmax_underflow(dtype, device="cuda"):
    # fp32 on the SIMT path (whose delta is sum_j P dP, as the twin's), bf16 on mma.sync
    # (FlashAttention's dO . O)
    _check_softmax_underflow(dtype, device)


def test_cpu_result_does_not_depend_on_threads():
    # one task per (batch, head) pair, nothing shared between tasks: bitwise equal on 1 and 2 threads
    qkv, dout = _randn(3, 50, 3, 5, 64, dtype=f32), _randn(3, 50, 5, 64, dtype=f32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = _packed_grads(lambda t: ops.attention_qkvpacked(t, backend="ext"), qkv, dout)
        torch.set_num_threads(2)
        b = _packed_grads(lambda t: ops.attention_qkvpacked(t, backend="ext"), qkv, dout)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------------------- edges of the ops
# Empty sequences give empty outputs on both devices (on CUDA an empty grid is not a launch), an
# lse of the wrong shape is the same error on both (the CUDA backward reads it by (B, H, N)).
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [f16, f32])
def test_raw_ops_empty_sequences_and_lse_shape(device, dtype):
    fwd, bwd = torch.ops.fastmae_ext.attention_fwd, torch.ops.fastmae_ext.attention_bwd
    q = _randn(2, 0, 3, 64, dtype=dtype, device=device)
    out, lse = fwd(q, q, q, 0.125)
    assert out.shape == (2, 0, 3, 64) and out.dtype == dtype and lse.shape == (2, 3, 0)
    assert bwd(out, q, q, q, out, lse, 0.125).shape == (2, 0, 3, 3, 64)
    q, k, v, dout = (_randn(2, 5, 3, 64, dtype=dtype, device=device) for _ in range(4))
    out, lse = fwd(q, k, v, 0.125)
    with pytest.raises(RuntimeError, match=r"attention_bwd: lse \(B, H, N\)"):
        bwd(dout, q, k, v, out, lse.transpose(1, 2).contiguous(), 0.125)  # (B, N, H): as many values


@pytest.mark.gpu
def test_cuda_inputs_on_two_devices_are_an_error():
    # the dispatcher takes the CUDA kernel when any input is on the GPU: it must not read the others' memory
    q, k, v, dout = (_randn(2, 5, 3, 64, dtype=f16, device="cuda") for _ in range(4))
    fwd, bwd = torch.ops.fastmae_ext.attention_fwd, torch.ops.fastmae_ext.attention_bwd
    with pytest.raises(RuntimeError, match="must be on one device"):
        fwd(q, k.cpu(), v, 0.125)
    out, lse = fwd(q, k, v, 0.125)
    with pytest.raises(RuntimeError, match="must be on one device"):
        bwd(dout, q, k, v, out, lse.cpu(), 0.125)
