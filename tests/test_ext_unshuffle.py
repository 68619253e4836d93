"""The compiled extension's decoder_unshuffle (fastmae.ext.unshuffle, backend="ext") against fastmae.reference.

CPU tests run the C++ twin (csrc/ops/cpu/unshuffle_kernel.cpp); the GPU-marked ones the CUDA
kernels (csrc/ops/cuda/unshuffle_kernel.cu). The forward and grad x are data movement (the pos
add one rounding, as torch's): exact. grad mask_token is a sum over the removed rows, in a
fixed order of our own: float64 against a direct sum to 1e-12, and assert_close's dtype
tolerances against the reference's order (as the Triton tests).

The module skips (with the loader's reason) when fastmae._C is not built; under
``FASTMAE_EXT_REQUIRED=1`` (``make test``) that is a failure instead.
"""

import pytest
import torch
from _ext import require_ext

from fastmae import ext, ops
from fastmae import reference as ref

require_ext()

from fastmae.ext import unshuffle as E  # noqa: E402

f16, f32, f64, bf16 = torch.float16, torch.float32, torch.float64, torch.bfloat16


def assert_same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    assert torch.equal(a, b)


def make(N, L, D, ratio, x_dtype=f32, m_dtype=None, p_dtype=None, device="cpu", ids_dtype=torch.int64):
    len_keep = ref.num_kept(L, ratio)
    x = torch.randn(N, 1 + len_keep, D, device=device).to(x_dtype)
    ids = torch.argsort(torch.rand(N, L, device=device), dim=1).to(ids_dtype)
    mt = torch.randn(1, 1, D, device=device).to(m_dtype or x_dtype)
    pos = torch.randn(1, 1 + L, D, device=device).to(p_dtype or x_dtype)
    return x, ids, mt, pos


@pytest.mark.parametrize("L,ratio", [(1, 0.0), (4, 0.5), (49, 0.75), (196, 0.75), (197, 0.9)])
@pytest.mark.parametrize("with_pos", [True, False])
def test_matches_reference(L, ratio, with_pos):
    x, ids, mt, pos = make(3, L, 40, ratio)
    pos = pos if with_pos else None
    assert_same(E.decoder_unshuffle(x, ids, mt, pos), ref.decoder_unshuffle(x, ids, mt, pos))


@pytest.mark.parametrize("x_dtype,m_dtype,p_dtype", [(f16, None, None), (bf16, None, None), (f64, None, None),
                                                     (bf16, f32, f32), (f16, f16, f32), (f32, bf16, f16)])
def test_dtypes(x_dtype, m_dtype, p_dtype):
    x, ids, mt, pos = make(2, 49, 24, 0.75, x_dtype, m_dtype, p_dtype)
    assert_same(E.decoder_unshuffle(x, ids, mt, pos), ref.decoder_unshuffle(x, ids, mt, pos))
    assert_same(E.decoder_unshuffle(x, ids, mt), ref.decoder_unshuffle(x, ids, mt))


def test_int32_ids_and_strides():
    x, ids, mt, pos = make(2, 49, 32, 0.75, ids_dtype=torch.int32)
    xs = torch.randn(2, x.shape[1], 64)[:, :, ::2]
    ids_t = ids.t().contiguous().t()
    for xx, ii in ((x, ids), (xs, ids_t), (x.transpose(0, 1).contiguous().transpose(0, 1), ids)):
        assert_same(E.decoder_unshuffle(xx, ii, mt, pos), ref.decoder_unshuffle(xx, ii, mt, pos))


def _grads(fn, tensors, g):
    tensors = [t.detach().requires_grad_() for t in tensors]
    out = fn(*tensors)
    out.backward(g)
    return out, [t.grad for t in tensors]


@pytest.mark.parametrize("x_dtype,m_dtype,ratio", [(f32, None, 0.75), (f32, None, 0.0), (f16, None, 0.5),
                                                   (f16, f32, 0.9), (bf16, None, 0.75)])
@pytest.mark.parametrize("with_pos", [True, False])
def test_grads(x_dtype, m_dtype, ratio, with_pos):
    N, L, D = 3, 49, 40
    x, ids, mt, pos = make(N, L, D, ratio, x_dtype, m_dtype, m_dtype)
    tensors = (x, mt, pos) if with_pos else (x, mt)
    g = torch.randn(N, 1 + L, D).to(torch.promote_types(x.dtype, mt.dtype))

    def run(fn):
        return _grads(lambda x, mt, pos=None: fn(x, ids, mt, pos), tensors, g)

    out, grads = run(E.decoder_unshuffle)
    want, ref_grads = run(ref.decoder_unshuffle)
    assert_same(out, want)
    assert_same(grads[0], ref_grads[0])  # grad x: rows moved and cast: exact
    for a, b in zip(grads[1:], ref_grads[1:]):  # sums in another order: a few ulps
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b)


def test_backward_op_removed_sum():
    N, L, D, ratio = 3, 196, 40, 0.75
    _, ids, _, _ = make(N, L, D, ratio)
    g = torch.randn(N, 1 + L, D, dtype=f64)
    len_keep = ref.num_kept(L, ratio)
    gx, gm = torch.ops.fastmae_ext.decoder_unshuffle_backward(g, ids, len_keep, f32)
    expect = (g[:, 1:] * (ids >= len_keep).unsqueeze(-1)).sum((0, 1))
    torch.testing.assert_close(gm, expect, rtol=1e-12, atol=1e-12)
    ids_keep = torch.argsort(ids, dim=1)[:, :len_keep]
    rows = torch.gather(g[:, 1:], 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    assert_same(gx, torch.cat([g[:, :1], rows], dim=1).to(f32))


def test_opcheck():
    x, ids, mt, pos = make(2, 16, 8, 0.75)
    for t in (x, mt, pos):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.fastmae_ext.decoder_unshuffle, (x, ids, mt, pos))
    torch.library.opcheck(torch.ops.fastmae_ext.decoder_unshuffle, (x, ids, mt, None))
    torch.library.opcheck(torch.ops.fastmae_ext.decoder_unshuffle_backward, (torch.randn(2, 17, 8), ids, 4, f16))


def test_ops_dispatch():
    x, ids, mt, pos = make(2, 49, 16, 0.75)
    assert_same(ops.decoder_unshuffle(x, ids, mt, pos, backend="ext"), ref.decoder_unshuffle(x, ids, mt, pos))


def test_cuda_kernels_are_registered():
    if not ext.has_cuda_kernels():
        pytest.skip("fastmae._C was built without its CUDA kernels")
    for op in ("decoder_unshuffle", "decoder_unshuffle_backward"):
        for key in ("CPU", "CUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmae_ext::{op}", key), (op, key)


@pytest.mark.gpu
@pytest.mark.parametrize("x_dtype,m_dtype", [(bf16, None), (f16, f32), (f32, None), (f64, None)])
@pytest.mark.parametrize("N,L,D,ratio", [(8, 196, 512, 0.75), (3, 49, 40, 0.5), (2, 197, 36, 0.0)])
def test_cuda_matches_reference(x_dtype, m_dtype, N, L, D, ratio, device="cuda"):
    x, ids, mt, pos = make(N, L, D, ratio, x_dtype, m_dtype, m_dtype, device=device)
    assert_same(E.decoder_unshuffle(x, ids, mt, pos), ref.decoder_unshuffle(x, ids, mt, pos))
    assert_same(E.decoder_unshuffle(x, ids.int(), mt), ref.decoder_unshuffle(x, ids, mt))
    g = torch.randn(N, 1 + L, D, device=device).to(torch.promote_types(x.dtype, mt.dtype))
    _, grads = _grads(lambda x, mt: E.decoder_unshuffle(x, ids, mt, pos), (x, mt), g)
    _, ref_grads = _grads(lambda x, mt: ref.decoder_unshuffle(x, ids, mt, pos), (x, mt), g)
    assert_same(grads[0], ref_grads[0])
    # an fp32 sum of up to 8 x 147 terms in the kernel's order: assert_close's defaults are no bound for it
    assert grads[1].dtype == ref_grads[1].dtype
    assert_mask_token_grad(grads[1], g, ids, L, ratio)


# The backward's grad in layouts autograd can hand over (the CUDA kernel moves 16-byte vectors
# only for whole-vector rows and strides on an aligned base; other grads are made contiguous or
# take the scalar kernel). grad x is rows moved: exact. grad mask_token is a sum over the N * (L -
# len_keep) removed positions, in float32 in an order of the kernel's choosing: against the
# float64 sum, within the worst-case bound of such a sum (n eps32 sum|terms|) plus the rounding
# to its dtype. (assert_close's default rtol is not a bound here: an expanded grad repeats one
# row, so each column sums n equal terms.)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("x_dtype,m_dtype", [(f32, None), (bf16, f32), (f16, None)])
def test_backward_grad_layouts(device, x_dtype, m_dtype):
    N, L, D, ratio = 3, 49, 64, 0.75
    x, ids, mt, pos = make(N, L, D, ratio, x_dtype, m_dtype, m_dtype, device=device)
    dt = torch.promote_types(x.dtype, mt.dtype)
    g = torch.randn(N, 1 + L, D, device=device).to(dt)
    wide = torch.randn(N, 1 + L, D + 8, device=device).to(dt)
    flat = torch.randn(N * (1 + L) * D + 1, device=device).to(dt)
    grads = {
        "contiguous": g,
        "d stride 2": torch.stack([g, g], -1).flatten(-2)[..., ::2],
        "sliced from a wider D": wide[..., 3:3 + D],
        "offset by one element": flat[1:].view(N, 1 + L, D),
        "expanded over tokens": g[:, :1].expand(N, 1 + L, D),
    }
    for name, gv in grads.items():
        _, got = _grads(lambda x, mt: E.decoder_unshuffle(x, ids, mt, pos), (x, mt), gv)
        _, want = _grads(lambda x, mt: ref.decoder_unshuffle(x, ids, mt, pos), (x, mt), gv.contiguous())
        assert_same(got[0], want[0])
        assert got[1].dtype == want[1].dtype, name
        assert_mask_token_grad(got[1], gv, ids, L, ratio, name)


def assert_mask_token_grad(got, g, ids, L, ratio, name=""):
    """The mask token's gradient, a sum over the N * (L - len_keep) removed positions in the
    kernel's accumulation dtype (float64 for float64, else float32) in an order of its choosing:
    against the float64 sum, within the worst-case bound of any order of such a sum (n eps_acc
    sum|terms|) plus the rounding to its dtype."""
    removed = (ids >= ref.num_kept(L, ratio)).unsqueeze(-1)  # (N, L, 1): the mask token's positions
    n = int(removed.sum())
    terms = g[:, 1:].double() * removed
    exact = terms.sum((0, 1))
    acc_eps = torch.finfo(f64 if got.dtype == f64 else f32).eps
    bound = n * acc_eps * terms.abs().sum((0, 1)) + torch.finfo(got.dtype).eps * exact.abs()
    err = (got.double().flatten() - exact).abs()
    assert bool((err <= bound).all()), (name, (err - bound).max().item())


# Nothing to move: an empty batch or zero-width tokens give the reference's empty outputs, and
# the mask token's gradient is zero (a sum over no rows), on both devices (on CUDA an empty
# grid is not a launch, so the kernels must not be launched).
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("N,D", [(0, 16), (2, 0)])
def test_empty(device, N, D):
    x, ids, mt, pos = make(N, 16, D, 0.75, device=device)
    assert_same(E.decoder_unshuffle(x, ids, mt, pos), ref.decoder_unshuffle(x, ids, mt, pos))
    g = torch.randn(N, 17, D, device=device)
    _, grads = _grads(lambda x, mt: E.decoder_unshuffle(x, ids, mt, pos), (x, mt), g)
    _, ref_grads = _grads(lambda x, mt: ref.decoder_unshuffle(x, ids, mt, pos), (x, mt), g)
    assert_same(grads[0], ref_grads[0])
    assert_same(grads[1], ref_grads[1])


def out_of_range(ids, len_keep, L):
    """``ids`` with its removed positions (values >= len_keep) set to values out of [0, L):
    negative (-1 read the cls row), far below (an out-of-bounds read), L and beyond."""
    bad = ids.clone()
    n, l = (ids >= len_keep).nonzero(as_tuple=True)
    pick = torch.tensor([-1, -(10**6), L, L + 5, 2**40, -(2**40)], device=ids.device).to(ids.dtype)
    bad[n, l] = pick[torch.randint(0, len(pick), (len(n),), device=ids.device)]
    bad[n[:2], l[:2]] = pick[:2]  # both negatives, always
    return bad


# ids_restore's values out of [0, L): the CUDA kernels, which cannot raise, take them as the
# mask token, forward and backward, and never access out of bounds (run on CPU tensors through
# the emulation: test_ext_cuda_emulated.py); the CPU twin refuses them.
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.gpu)])
def test_raw_ops_take_ids_out_of_range_as_removed(device):
    N, L, D, ratio = 3, 16, 8, 0.75
    x, ids, mt, pos = make(N, L, D, ratio, device=device)
    len_keep = x.shape[1] - 1
    bad = out_of_range(ids, len_keep, L)
    assert_same(torch.ops.fastmae_ext.decoder_unshuffle(x, bad, mt, pos), ref.decoder_unshuffle(x, ids, mt, pos))
    g = torch.randn(N, 1 + L, D, device=device)
    gx, gm = torch.ops.fastmae_ext.decoder_unshuffle_backward(g, bad, len_keep, f32)
    want_gx, want_gm = torch.ops.fastmae_ext.decoder_unshuffle_backward(g, ids, len_keep, f32)
    assert_same(gx, want_gx)
    assert_same(gm, want_gm)


def test_cpu_refuses_ids_out_of_range():
    """The C++ twin checks each value it reads (forward and backward; fastmae.ops does not read
    them on the host): a ValueError naming ids_restore; the reference raises torch.gather's."""
    N, L, D = 2, 16, 8
    x, ids, mt, pos = make(N, L, D, 0.75)
    len_keep = x.shape[1] - 1
    g = torch.randn(N, 1 + L, D)
    for k in range(4):  # one bad value anywhere: a kept position, a removed one, the first, the last
        bad = ids.clone()
        n, l = int(torch.randint(0, N, ())), [int(torch.randint(0, L, ())), 0, L - 1, int(torch.randint(0, L, ()))][k]
        bad[n, l] = [-1, L, -(10**6), 2**40][k]
        msg = rf"ids_restore must hold token positions in \[0, L=16\) .*got {int(bad[n, l])}"
        with pytest.raises(ValueError, match=msg):
            ops.decoder_unshuffle(x, bad, mt, pos, backend="ext")
        with pytest.raises(ValueError, match=msg):
            torch.ops.fastmae_ext.decoder_unshuffle_backward(g, bad, len_keep, f32)
        with pytest.raises(RuntimeError, match="out of bounds"):
            ops.decoder_unshuffle(x, bad, mt, pos, backend="torch")


@pytest.mark.gpu
def test_cuda_inputs_on_two_devices_are_an_error():
    # the dispatcher takes the CUDA kernel when any input is on the GPU: it must not read the others' memory
    x, ids, mt, pos = make(2, 16, 8, 0.75, device="cuda")
    E_ = torch.ops.fastmae_ext
    for args in ((x, ids.cpu(), mt, pos), (x, ids, mt.cpu(), pos), (x, ids, mt, pos.cpu())):
        with pytest.raises(RuntimeError, match="must be on one device"):
            E_.decoder_unshuffle(*args)
    with pytest.raises(RuntimeError, match="must be on one device"):
        E_.decoder_unshuffle_backward(torch.randn(2, 17, 8, device="cuda"), ids.cpu(), x.shape[1] - 1, x.dtype)


# The backward's grid: slabs of kCols = 64 columns on x, samples on y, whose extent stops at
# 65535. A batch above it (the blocks then take several samples each), and tokens of more than
# 65535 slabs (the grid had them on y). Exact as above.
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("N,L,D", [(65535 + 3, 4, 8), (1, 2, (65535 + 1) * 64)])
def test_backward_above_the_grids_y_extent(device, N, L, D):
    ratio = 0.5
    x, ids, mt, pos = make(N, L, D, ratio, device=device)
    g = torch.randn(N, 1 + L, D, device=device)
    _, got = _grads(lambda x, mt: E.decoder_unshuffle(x, ids, mt, pos), (x, mt), g)
    _, want = _grads(lambda x, mt: ref.decoder_unshuffle(x, ids, mt, pos), (x, mt), g)
    assert_same(got[0], want[0])
    assert_mask_token_grad(got[1], g, ids, L, ratio)


# The raw op's dtype argument: one the kernels do not compute (integers, bool, float8) is the
# same clear error on both devices (the CUDA kernel cast to it before).
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_raw_op_takes_a_float_x_dtype_only(device):
    ids = torch.argsort(torch.rand(2, 8, device=device), dim=1)
    g = torch.randn(2, 9, 4, device=device)
    for dt in (torch.int32, torch.int64, torch.bool, torch.float8_e5m2):
        with pytest.raises(RuntimeError, match="x_dtype must be float32, float64, float16 or bfloat16, got"):
            torch.ops.fastmae_ext.decoder_unshuffle_backward(g, ids, 2, dt)
