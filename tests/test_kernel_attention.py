"""Triton flash attention (fastmae.kernels.attention) against fastmae.reference.

Oracle (the FlashAttention test convention): from the same inputs, the plain-PyTorch
reference run in float64 (also on the GPU, where fp32 inputs are tested too) and run in
the inputs' own dtype. The kernel passes when

    max|kernel - ref64| <= 2 * max|torch_lowprec - ref64| + floor

for the output and for dq, dk, dv from a random dO: the kernel may be at most twice as
far from the exact answer as PyTorch's own attention in that dtype is. ``floor`` is a
rounding floor for cases where PyTorch happens to be exact (N = 1: the softmax is exactly
1 and torch's dq, dk are exactly 0, while the kernel's dS = P * (dP - delta) is 0 only up
to the fp32 rounding of two D-term inner products): two ulps of the dtype at the
reference's magnitude (FlashAttention's ``ref + 0.3 - 0.3 - ref``), and at least 1e-5,
the scale of the fp32 rounding of the kernels' inner products (D * 6e-8, every dtype
accumulates in fp32), far below an fp16 ulp at 1 (1e-3) and below any real bug.
"""

import math

import pytest
import torch

from fastmae import reference as ref

triton = pytest.importorskip("triton")
from fastmae.kernels import attention as A  # noqa: E402

# (N, D): N = 1 (one key), 50 (ViT-B/16 encoder at 75% masking), 65 (ViT-H/14 encoder),
# 197 (ViT-B/16 decoder), D = 80 and 96 (padded to a 128-wide tile) and 128 at small N.
SHAPES = [(1, 32), (50, 64), (65, 80), (197, 32), (17, 96), (33, 128), (5, 8), (40, 16)]
DTYPES = [torch.float32, torch.float16]
GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


# ----------------------------------------------------------------------------- oracle
def _floor(r: torch.Tensor, dtype: torch.dtype) -> float:
    """Two ulps of ``dtype`` at the magnitude of ``r``, at least 1e-5 (see the module doc)."""
    low = r.to(dtype)
    ulp = ((low + 0.3) - 0.3 - low).abs().max().item()
    return max(2 * ulp, 1e-5)


def _assert_oracle(name, got, lowprec, exact, dtype):
    err = (got.double() - exact.double()).abs().max().item()
    base = (lowprec.double() - exact.double()).abs().max().item()
    bound = 2 * base + _floor(exact, dtype)
    assert err <= bound, f"{name}: max error {err:.3g} > 2 * {base:.3g} (torch {dtype}) + floor = {bound:.3g}"


def _packed_grads(fn, qkv, dout):
    """Output and d(qkv) of ``fn(qkv)`` for the output gradient ``dout``."""
    qkv = qkv.detach().requires_grad_(True)
    out = fn(qkv)
    (g,) = torch.autograd.grad(out, qkv, dout)
    return out.detach(), g


def _check_packed(qkv, dout, scale=None):
    """Kernel vs the oracle on a packed (B, N, 3, H, D) input; returns the kernel's (out, dqkv)."""
    dtype, exact = qkv.dtype, torch.float64
    out, g = _packed_grads(lambda t: A.attention_qkvpacked(t, scale), qkv, dout)
    out_lp, g_lp = _packed_grads(lambda t: ref.attention_qkvpacked(t, scale), qkv, dout)
    out_ex, g_ex = _packed_grads(lambda t: ref.attention_qkvpacked(t, scale), qkv.to(exact), dout.to(exact))
    assert out.dtype == dtype and out.shape == dout.shape and g.dtype == dtype and g.shape == qkv.shape
    _assert_oracle("out", out, out_lp, out_ex, dtype)
    for i, name in enumerate(("dq", "dk", "dv")):
        _assert_oracle(name, g[:, :, i], g_lp[:, :, i], g_ex[:, :, i], dtype)
    return out, g


def _check_separate(q, k, v, dout, scale=None):
    """Kernel vs the oracle on separate (B, N, H, D) q, k, v (any strides)."""
    dtype, exact = q.dtype, torch.float64

    def run(fn, *ts):
        ts = [t.detach().requires_grad_(True) for t in ts]
        out = fn(*ts[:3], scale)
        return out.detach(), torch.autograd.grad(out, ts[:3], ts[3])

    out, grads = run(A.attention, q, k, v, dout)
    out_lp, grads_lp = run(ref.attention, q, k, v, dout)
    out_ex, grads_ex = run(ref.attention, *(t.to(exact) for t in (q, k, v, dout)))
    assert out.dtype == dtype and out.shape == q.shape
    _assert_oracle("out", out, out_lp, out_ex, dtype)
    for name, g, g_lp, g_ex, t in zip(("dq", "dk", "dv"), grads, grads_lp, grads_ex, (q, k, v)):
        assert g.dtype == dtype and g.shape == t.shape
        _assert_oracle(name, g, g_lp, g_ex, dtype)


def _randn(*shape, dtype, device):
    return torch.randn(*shape, device=device).to(dtype)


# ----------------------------------------------------------------------------- CPU (interpreter)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,D", SHAPES)
def test_qkvpacked_matches_reference(kernel_device, N, D, dtype):
    B, H = 2, 2
    qkv = _randn(B, N, 3, H, D, dtype=dtype, device=kernel_device)
    _check_packed(qkv, _randn(B, N, H, D, dtype=dtype, device=kernel_device))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,D", SHAPES)
def test_separate_matches_reference(kernel_device, N, D, dtype):
    # q, k, v as the views qkv.unbind(2) of a fused projection, the layout MAE produces.
    B, H = 1, 3
    q, k, v = _randn(B, N, 3, H, D, dtype=dtype, device=kernel_device).unbind(2)
    _check_separate(q, k, v, _randn(B, N, H, D, dtype=dtype, device=kernel_device))


def _force_loops(monkeypatch):
    # The key-loop forward and the three-kernel backward (preprocess, dK/dV, dQ) whatever N.
    monkeypatch.setattr(A, "SHORT_FWD_MAX_N", 0)
    monkeypatch.setattr(A, "SHORT_BWD_MAX_N", 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,D", [(50, 64), (65, 80), (33, 128)])
def test_loop_paths(kernel_device, monkeypatch, N, D, dtype):
    # The loop kernels at MAE's short lengths, where the wrapper would pick one tile; under
    # the interpreter blocks are 32 and 64 wide: masked tails (50 = 32 + 18, 65 = 64 + 1).
    _force_loops(monkeypatch)
    B, H = 1, 2
    qkv = _randn(B, N, 3, H, D, dtype=dtype, device=kernel_device)
    _check_packed(qkv, _randn(B, N, H, D, dtype=dtype, device=kernel_device))


def test_long_sequence(kernel_device):
    # N = 257 (the ViT-B/16 decoder at 256 px + cls) pads to 512 > SHORT_FWD_MAX_N: the
    # key loop is chosen by the wrapper itself, with a one-row tail block.
    B, N, H, D = 1, 257, 2, 32
    qkv = _randn(B, N, 3, H, D, dtype=torch.float16, device=kernel_device)
    _check_packed(qkv, _randn(B, N, H, D, dtype=torch.float16, device=kernel_device))


@pytest.mark.parametrize("loops", [False, True])
def test_padding_is_never_written(kernel_device, monkeypatch, loops):
    # Every kernel output is allocated as the head of a NaN buffer twice its size: a store
    # from a padded query row (50 rows in blocks of 32/64) or a padded head-dim column
    # (80 in a 128-wide tile) of the last (batch, head) would land in the tail.
    if loops:
        _force_loops(monkeypatch)
    tails = []

    def guarded_empty(shape, dtype, device):
        n = math.prod(shape)
        buf = torch.full((2 * n,), float("nan"), dtype=dtype, device=device)
        tails.append(buf[n:])
        return buf[:n].view(shape)

    monkeypatch.setattr(A, "empty", guarded_empty)
    B, N, H, D = 2, 50, 2, 80
    qkv = _randn(B, N, 3, H, D, dtype=torch.float16, device=kernel_device)
    _check_packed(qkv, _randn(B, N, H, D, dtype=torch.float16, device=kernel_device))
    assert len(tails) == (4 if loops else 3)  # out, lse, dqkv (+ delta with the loops)
    assert all(torch.isnan(t).all() for t in tails)


def test_one_tile_backward_walks_query_steps(kernel_device, monkeypatch):
    # N = 197 (the decoder) pads to one 256-key tile: the backward is the single one-tile
    # kernel (no delta buffer: out, lse, dqkv only), walking the queries in 32-row steps
    # (7, the last one partial) under the interpreter.
    allocs = []

    def counting_empty(shape, dtype, device):
        allocs.append(tuple(shape))
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(A, "empty", counting_empty)
    B, N, H, D = 1, 197, 2, 32
    qkv = _randn(B, N, 3, H, D, dtype=torch.float16, device=kernel_device)
    _check_packed(qkv, _randn(B, N, H, D, dtype=torch.float16, device=kernel_device))
    assert allocs == [(B, N, H, D), (B, H, N), (B, N, 3, H, D)]


def test_prune_query_steps():
    # The one-tile backward's autotuner: steps no longer than the sequence, score tiles at
    # most 128 x 128; the smallest step survives when nothing else does.
    configs = [triton.Config({"BLOCK_M": m}, num_warps=w) for m in (16, 32, 64, 128) for w in (4, 8)]

    def steps(block_n):
        return sorted({c.kwargs["BLOCK_M"] for c in A._prune_query_steps(configs, {}, BLOCK_N=block_n)})

    assert steps(16) == [16]
    assert steps(64) == [16, 32, 64]
    assert steps(128) == [16, 32, 64, 128]
    assert steps(256) == [16, 32, 64]
    assert [c.kwargs["BLOCK_M"] for c in A._prune_query_steps(configs[4:], {}, BLOCK_N=16)] == [64]


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous(kernel_device, dtype):
    B, N, H, D = 2, 37, 2, 64
    dev = kernel_device
    q = _randn(B, H, N, D, dtype=dtype, device=dev).transpose(1, 2)  # heads-major storage
    k = _randn(B, N, H, 2 * D, dtype=dtype, device=dev)[..., ::2]  # stride 2 along D
    v = _randn(N, B, H, D, dtype=dtype, device=dev).transpose(0, 1)  # sequence-major storage
    dout = _randn(B, H, N, D, dtype=dtype, device=dev).transpose(1, 2)
    assert not any(t.is_contiguous() for t in (q, k, v, dout))
    _check_separate(q, k, v, dout)
    # Packed input with the (3, H) axes stored swapped, and an expanded (stride-0) dO.
    qkv = _randn(B, N, H, 3, D, dtype=dtype, device=dev).transpose(2, 3)
    dout = _randn(1, N, H, D, dtype=dtype, device=dev).expand(B, N, H, D)
    _check_packed(qkv, dout)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loops", [False, True])
def test_custom_scale(kernel_device, monkeypatch, loops, dtype):
    if loops:
        _force_loops(monkeypatch)
    B, N, H, D = 1, 50, 2, 32
    qkv = _randn(B, N, 3, H, D, dtype=dtype, device=kernel_device)
    dout = _randn(B, N, H, D, dtype=dtype, device=kernel_device)
    _check_packed(qkv, dout, scale=0.37)
    _check_separate(*qkv.unbind(2), dout, scale=0.05)


@pytest.mark.parametrize("N", [50, 197])
def test_logsumexp(kernel_device, N):
    # The saved logsumexp (B, H, N), fp32 from fp16 inputs: q.k products are exact in fp32
    # and the rest is fp32 arithmetic on values of magnitude <= ~10, so 1e-5 relative.
    B, H, D = 2, 2, 64
    qkv = _randn(B, N, 3, H, D, dtype=torch.float16, device=kernel_device).requires_grad_(True)
    q, k, v = qkv.detach().unbind(2)
    s = torch.einsum("bnhd,bmhd->bhnm", q.double(), k.double()) * D**-0.5
    ops = torch.ops.fastmae
    for out, lse in (ops.attention(*qkv.unbind(2), None), ops.attention_qkvpacked(qkv, None)):
        assert lse.dtype == torch.float32 and lse.shape == (B, H, N)
        torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=1e-5, atol=1e-5)
        assert out.requires_grad and not lse.requires_grad  # an auxiliary output, not differentiable


def test_deterministic(kernel_device):
    B, N, H, D = 1, 65, 2, 32
    qkv = _randn(B, N, 3, H, D, dtype=torch.float16, device=kernel_device)
    dout = _randn(B, N, H, D, dtype=torch.float16, device=kernel_device)
    a = _packed_grads(A.attention_qkvpacked, qkv, dout)
    b = _packed_grads(A.attention_qkvpacked, qkv, dout)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_opcheck(kernel_device):
    B, N, H, D = 1, 20, 2, 32
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    qkv = torch.randn(B, N, 3, H, D, device=kernel_device, requires_grad=True)
    q, k, v = (torch.randn(B, N, H, D, device=kernel_device, requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.fastmae.attention_qkvpacked.default, (qkv, None), test_utils=tests)
    torch.library.opcheck(torch.ops.fastmae.attention_qkvpacked.default, (qkv, 0.2), test_utils=tests)
    torch.library.opcheck(torch.ops.fastmae.attention.default, (q, k, v, None), test_utils=tests)
    out, lse = torch.ops.fastmae.attention(q, k, v, None)
    dout = torch.randn_like(out)
    args = (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, None)
    torch.library.opcheck(torch.ops.fastmae.attention_backward.default, args, test_utils=tests)


def test_torch_compile_fullgraph(kernel_device):
    B, N, H, D = 2, 20, 2, 32

    def f(qkv):
        return A.attention_qkvpacked(qkv).float().square().sum()

    compiled = torch.compile(f, fullgraph=True)
    qkv = _randn(B, N, 3, H, D, dtype=torch.float16, device=kernel_device).requires_grad_(True)
    qkv_eager = qkv.detach().clone().requires_grad_(True)
    loss = compiled(qkv)
    loss_eager = f(qkv_eager)
    # The same kernels on the same inputs; dO = 2 * out exactly in both.
    torch.testing.assert_close(loss, loss_eager)
    loss.backward()
    loss_eager.backward()
    assert torch.equal(qkv.grad, qkv_eager.grad)


def test_cpu_fallbacks_are_the_reference():
    # What CPU tensors run outside the interpreter: the reference, and fresh tensors.
    B, N, H, D = 2, 9, 2, 16
    qkv = torch.randn(B, N, 3, H, D, dtype=torch.float64)
    q, k, v = qkv.unbind(2)
    out, lse = A._attention_qkvpacked_cpu(qkv, 0.3)
    assert torch.equal(out, ref.attention(q, k, v, 0.3)) and out.is_contiguous()
    s = torch.einsum("bnhd,bmhd->bhnm", q, k) * 0.3
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=1e-6, atol=1e-6)  # fp32 lse
    dout = torch.randn(B, N, H, D, dtype=torch.float64)
    g = A._attention_backward_cpu(dout, q, k, v, out, lse, 0.3)
    want = torch.autograd.grad(ref.attention_qkvpacked(qkv.requires_grad_(True), 0.3), qkv, dout)[0]
    assert torch.equal(g, want)


def test_head_dim_above_the_limit_is_a_clear_error(kernel_device):
    D = A.MAX_HEAD_DIM + 1
    q = torch.randn(1, 4, 1, D, device=kernel_device)
    with pytest.raises(ValueError, match=f"head dim D={D}"):
        A.attention(q, q, q)
    with pytest.raises(ValueError, match=f"head dim D={D}"):
        A.attention_qkvpacked(torch.stack((q, q, q), 2))


# ----------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize(
    "B,N,H,D",
    [
        (8, 50, 12, 64),  # ViT-B/16 encoder, 75% masking
        (8, 197, 16, 32),  # ViT-L decoder (512 wide, 16 heads)
        (8, 65, 16, 80),  # ViT-H/14 encoder
        (8, 257, 16, 64),  # ViT-L/14 decoder
        (2, 1024, 8, 64),
        (2, 1024, 8, 128),
    ],
)
def test_mae_shapes_gpu(B, N, H, D, dtype):
    qkv = torch.randn(B, N, 3, H, D, device="cuda").to(dtype)
    dout = torch.randn(B, N, H, D, device="cuda").to(dtype)
    _check_packed(qkv, dout)
    _check_separate(*qkv.unbind(2), dout)


@pytest.mark.gpu
def test_autotune_and_determinism_gpu():
    # Every autotuned kernel runs (and tunes) once; the results are bitwise reproducible
    # (no atomics: dQ and dK/dV come from separate kernels).
    for N in (50, 1024):
        qkv = torch.randn(4, N, 3, 8, 64, device="cuda", dtype=torch.bfloat16)
        dout = torch.randn(4, N, 8, 64, device="cuda", dtype=torch.bfloat16)
        a = _packed_grads(A.attention_qkvpacked, qkv, dout)
        b = _packed_grads(A.attention_qkvpacked, qkv, dout)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for tuned in (A._attn_fwd_short, A._attn_fwd_long, A._attn_bwd_short_tuned, A._attn_bwd_dkdv_tuned):
        assert len(tuned.cache) > 0, tuned
    assert len(A._attn_bwd_dq_tuned.cache) > 0


@pytest.mark.gpu
def test_opcheck_and_compile_gpu():
    # On the GPU the ops are triton_ops, traced into the graph: check that path too.
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    qkv = torch.randn(2, 50, 3, 4, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    torch.library.opcheck(torch.ops.fastmae.attention_qkvpacked.default, (qkv, None), test_utils=tests)
    q, k, v = (t.detach().requires_grad_(True) for t in qkv.unbind(2))
    torch.library.opcheck(torch.ops.fastmae.attention.default, (q, k, v, None), test_utils=tests)

    def f(qkv):
        return A.attention_qkvpacked(qkv).float().square().sum()

    for N in (50, 300):
        qkv = torch.randn(2, N, 3, 4, 64, device="cuda", dtype=torch.float16, requires_grad=True)
        qkv_eager = qkv.detach().clone().requires_grad_(True)
        loss, loss_eager = torch.compile(f, fullgraph=True)(qkv), f(qkv_eager)
        torch.testing.assert_close(loss, loss_eager)
        loss.backward()
        loss_eager.backward()
        assert torch.equal(qkv.grad, qkv_eager.grad)
