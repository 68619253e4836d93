"""fastmae.kernels.unshuffle (the decoder's fused unshuffle) against fastmae.reference.

The forward is data movement plus one add done as torch does it: compared with torch.equal
(and dtypes). On CPU the kernels run in the Triton interpreter, whose float32 -> bfloat16
cast truncates instead of rounding: bf16 results of an add are checked in the gpu-marked
tests only; bf16 inputs that are only copied or widened are checked here.
"""

import pytest
import torch

from fastmae import reference

unshuffle = pytest.importorskip("fastmae.kernels.unshuffle")

RATIOS = (0.0, 0.5, 0.75, 0.9)
CASES = [(L, r) for L in (1, 49, 196, 256) for r in RATIOS if int(L * (1 - r)) >= 1]


def assert_same(a, b):
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.equal(a, b), (a - b).abs().max()


def make(N, L, D, ratio, device, x_dtype=torch.float32, m_dtype=None, p_dtype=None, tied=False):
    """Decoder tokens (N, 1+len_keep, D), ids_restore from the reference's masking, mask token, pos."""
    noise = torch.randint(0, 4, (N, L), device=device).float() if tied else torch.rand(N, L, device=device)
    ids_restore = reference.random_masking(torch.empty(N, L, 1, device=device), ratio, noise)[2]
    x = torch.randn(N, 1 + reference.num_kept(L, ratio), D, device=device).to(x_dtype)
    mask_token = torch.randn(1, 1, D, device=device).to(m_dtype or x_dtype)
    pos = torch.randn(1, 1 + L, D, device=device).to(p_dtype or x_dtype)
    return x, ids_restore, mask_token, pos


# ------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("L,ratio", CASES)
@pytest.mark.parametrize("N", [1, 3])
def test_matches_reference(kernel_device, L, ratio, N):
    x, ids, mt, pos = make(N, L, 40, ratio, kernel_device, tied=N == 3)
    assert_same(unshuffle.decoder_unshuffle(x, ids, mt, pos), reference.decoder_unshuffle(x, ids, mt, pos))
    assert_same(unshuffle.decoder_unshuffle(x, ids, mt), reference.decoder_unshuffle(x, ids, mt))


@pytest.mark.parametrize(
    "x_dtype,m_dtype,p_dtype",
    [
        (torch.float16, None, None),  # pure fp16: the add rounds to fp16
        (torch.float64, None, None),
        (torch.float16, torch.float32, torch.float32),  # autocast: fp16 tokens, fp32 params
        (torch.bfloat16, torch.float32, torch.float32),  # bf16 tokens widened, fp32 add
        (torch.float16, torch.float16, torch.float32),  # fp16 cat, fp32 add
        (torch.float32, torch.float16, torch.float16),  # fp16 params widened
    ],
)
def test_dtypes(kernel_device, x_dtype, m_dtype, p_dtype):
    x, ids, mt, pos = make(3, 196, 40, 0.75, kernel_device, x_dtype, m_dtype, p_dtype)
    for p in (pos, None):
        assert_same(unshuffle.decoder_unshuffle(x, ids, mt, p), reference.decoder_unshuffle(x, ids, mt, p))


def test_bf16_without_pos(kernel_device):
    # no add: a copy, exact in bf16 too
    x, ids, mt, _ = make(3, 49, 40, 0.75, kernel_device, torch.bfloat16)
    assert_same(unshuffle.decoder_unshuffle(x, ids, mt), reference.decoder_unshuffle(x, ids, mt))


def test_int32_ids_and_strides(kernel_device):
    N, L, D, ratio = 3, 49, 40, 0.75
    T = 1 + reference.num_kept(L, ratio)
    _, ids, _, _ = make(N, L, D, ratio, kernel_device)
    x = torch.randn(T, N, 2 * D, device=kernel_device).transpose(0, 1)[:, :, ::2]
    ids32 = ids.t().contiguous().t().int()  # (N, L) int32, column-major
    mt = torch.randn(1, 1, 3 * D, device=kernel_device)[:, :, ::3]
    pos = torch.randn(1, D, 1 + L, device=kernel_device).transpose(1, 2)
    assert_same(unshuffle.decoder_unshuffle(x, ids32, mt, pos), reference.decoder_unshuffle(x, ids, mt, pos))


def test_wide_channels(kernel_device):
    x, ids, mt, pos = make(1, 196, 768, 0.75, kernel_device)
    assert_same(unshuffle.decoder_unshuffle(x, ids, mt, pos), reference.decoder_unshuffle(x, ids, mt, pos))


# ---------------------------------------------------------------------------- autograd
def _grads(fn, tensors, g):
    tensors = [t.detach().requires_grad_() for t in tensors]
    out = fn(*tensors)
    out.backward(g)
    return out, [t.grad for t in tensors]


@pytest.mark.parametrize(
    "x_dtype,m_dtype,ratio",
    [
        (torch.float32, None, 0.75),
        (torch.float32, None, 0.0),
        (torch.float16, None, 0.5),
        (torch.float16, torch.float32, 0.9),
    ],
)
@pytest.mark.parametrize("with_pos", [True, False])
def test_grads(kernel_device, x_dtype, m_dtype, ratio, with_pos):
    N, L, D = 3, 49, 40
    x, ids, mt, pos = make(N, L, D, ratio, kernel_device, x_dtype, m_dtype, m_dtype)
    tensors = (x, mt, pos) if with_pos else (x, mt)
    dtype = torch.promote_types(x.dtype, mt.dtype)
    g = torch.randn(N, 1 + L, D, device=kernel_device).to(dtype)

    def run(fn):
        return _grads(lambda x, mt, pos=None: fn(x, ids, mt, pos), tensors, g)

    out, grads = run(unshuffle.decoder_unshuffle)
    ref, ref_grads = run(reference.decoder_unshuffle)
    assert_same(out, ref)
    assert_same(grads[0], ref_grads[0])  # grad x: rows moved and cast, no arithmetic: exact
    # grad mask_token: a sum over the N*(L - len_keep) removed positions (up to 3*45 terms),
    # accumulated in fp32 in another order than the reference's: a few fp32 ulps of the
    # partial sums (~1e-6 abs for unit normals), or one rounding of the result to fp16.
    # grad pos: the same batch sum as the reference. assert_close's dtype tolerances cover both.
    for a, b in zip(grads[1:], ref_grads[1:]):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b)


def test_backward_op_removed_sum(kernel_device):
    # the fused partial sums against a direct sum over the removed rows, float64: tight
    N, L, D, ratio = 3, 196, 40, 0.75
    _, ids, _, _ = make(N, L, D, ratio, kernel_device)
    g = torch.randn(N, 1 + L, D, device=kernel_device, dtype=torch.float64)
    len_keep = reference.num_kept(L, ratio)
    gx, gm = torch.ops.fastmae.decoder_unshuffle_backward(g, ids, len_keep, torch.float64)
    expect = (g[:, 1:] * (ids >= len_keep).unsqueeze(-1)).sum((0, 1))
    torch.testing.assert_close(gm, expect, rtol=1e-12, atol=1e-12)
    ref_gx, ref_gm = unshuffle._backward_reference(g, ids, len_keep, torch.float64)  # the CPU fallback
    assert_same(gx, ref_gx)
    torch.testing.assert_close(gm, ref_gm, rtol=1e-12, atol=1e-12)


def test_backward_loops_over_rows_and_channel_blocks(kernel_device, monkeypatch):
    # GPU-like blocking: each program walks all 1 + L rows of its sample BLOCK_T at a time
    # (here 8: 50 rows -> 7 steps, the last one partial) over one of several channel blocks
    # (16: D = 40 -> 3 blocks, the last one partial).
    monkeypatch.setattr(unshuffle, "_bwd_blocks", lambda D: (8, 16))
    N, L, D, ratio = 3, 49, 40, 0.5
    _, ids, _, _ = make(N, L, D, ratio, kernel_device)
    g = torch.randn(N, 1 + L, D, device=kernel_device, dtype=torch.float64)
    len_keep = reference.num_kept(L, ratio)
    gx, gm = torch.ops.fastmae.decoder_unshuffle_backward(g, ids, len_keep, torch.float64)
    ref_gx, ref_gm = unshuffle._backward_reference(g, ids, len_keep, torch.float64)
    assert_same(gx, ref_gx)
    torch.testing.assert_close(gm, ref_gm, rtol=1e-12, atol=1e-12)  # float64 sums, two orders


# ------------------------------------------------------------------- registration, compile
def test_ids_out_of_range_take_the_mask_token(kernel_device):
    """The kernels do not check ids_restore's values (fastmae.ops does, on CPU): a value out of
    [0, len_keep) is the mask token, forward and backward, never an access out of bounds."""
    N, L, D, ratio = 2, 16, 8, 0.75
    x, ids, mt, pos = make(N, L, D, ratio, kernel_device)
    len_keep = x.shape[1] - 1
    bad = ids.clone()
    n, l = (ids >= len_keep).nonzero(as_tuple=True)
    pick = torch.tensor([-1, -(10**6), L, L + 5, 2**40], device=kernel_device)
    bad[n, l] = pick[torch.arange(len(n), device=kernel_device) % len(pick)]
    assert_same(unshuffle.decoder_unshuffle(x, bad, mt, pos), reference.decoder_unshuffle(x, ids, mt, pos))
    g = torch.randn(N, 1 + L, D, device=kernel_device, dtype=torch.float64)
    gx, gm = torch.ops.fastmae.decoder_unshuffle_backward(g, bad, len_keep, torch.float64)
    want_gx, want_gm = torch.ops.fastmae.decoder_unshuffle_backward(g, ids, len_keep, torch.float64)
    assert_same(gx, want_gx)
    assert_same(gm, want_gm)


def test_opcheck(kernel_device):
    N, L, D = 2, 49, 40
    x, ids, mt, pos = make(N, L, D, 0.75, kernel_device)
    x, mt, pos = (t.requires_grad_() for t in (x, mt, pos))
    for args in ((x, ids, mt, pos), (x, ids.int(), mt, None)):
        torch.library.opcheck(torch.ops.fastmae.decoder_unshuffle, args)
    g = torch.randn(N, 1 + L, D, device=kernel_device)
    torch.library.opcheck(torch.ops.fastmae.decoder_unshuffle_backward, (g, ids, x.shape[1] - 1, torch.float16))


def test_compile_fullgraph(kernel_device):
    N, L, D = 2, 49, 40
    x, ids, mt, pos = make(N, L, D, 0.75, kernel_device)

    def f(x, ids, mt, pos):
        y = unshuffle.decoder_unshuffle(x, ids, mt, pos)
        return (y * y).sum(), y

    xs = [t.clone().requires_grad_() for t in (x, mt, pos)]
    loss, y = torch.compile(f, fullgraph=True)(xs[0], ids, *xs[1:])
    loss.backward()
    ref_xs = [t.clone().requires_grad_() for t in (x, mt, pos)]
    ref_loss, ref_y = f(ref_xs[0], ids, *ref_xs[1:])
    ref_loss.backward()
    assert_same(y, ref_y)
    for a, b in zip(xs, ref_xs):
        torch.testing.assert_close(a.grad, b.grad)  # inductor may order the squares' sums differently


# --------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("p_dtype", [torch.bfloat16, torch.float32])
def test_vit_b_decoder_bf16(p_dtype):
    # MAE ViT-B decoder: N=64, L=196, D=512, ratio 0.75; bf16 tokens, bf16 or fp32 params
    N, L, D = 64, 196, 512
    x, ids, mt, pos = make(N, L, D, 0.75, "cuda", torch.bfloat16, p_dtype, p_dtype)
    g = torch.randn(N, 1 + L, D, device="cuda").to(torch.promote_types(x.dtype, mt.dtype))
    out, grads = _grads(lambda *t: unshuffle.decoder_unshuffle(t[0], ids, *t[1:]), (x, mt, pos), g)
    ref, ref_grads = _grads(lambda *t: reference.decoder_unshuffle(t[0], ids, *t[1:]), (x, mt, pos), g)
    assert_same(out, ref)
    assert_same(grads[0], ref_grads[0])
    for a, b in zip(grads[1:], ref_grads[1:]):  # sums over 64*147 / 64 terms, another order
        torch.testing.assert_close(a, b, rtol=2e-2 if a.dtype == torch.bfloat16 else 1e-4, atol=1e-2)


@pytest.mark.gpu
def test_deterministic_repeats():
    # the backward scatters rows from many programs and reduces partial sums: repeated runs
    # must give identical bits
    N, L, D = 128, 256, 1024
    x, ids, mt, pos = make(N, L, D, 0.75, "cuda", torch.bfloat16, torch.float32, torch.float32)
    x, mt, pos = (t.requires_grad_() for t in (x, mt, pos))
    g = torch.randn(N, 1 + L, D, device="cuda")
    first = None
    for _ in range(10):
        y = unshuffle.decoder_unshuffle(x, ids, mt, pos)
        grads = torch.autograd.grad(y, (x, mt, pos), g)
        if first is None:
            first = (y, grads)
            assert_same(y, reference.decoder_unshuffle(x, ids, mt, pos))
        else:
            assert_same(y, first[0])
            for a, b in zip(grads, first[1]):
                assert_same(a, b)
