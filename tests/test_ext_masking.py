"""The compiled extension's random_masking / encoder_input (fastmae.ext.masking) against fastmae.reference.

CPU tests run the C++ twin (csrc/ops/cpu/masking_kernel.cpp); the GPU-marked ones the CUDA
kernel (csrc/ops/cuda/masking_kernel.cu). Data movement and indices: exact equality (the
tokens too: x + pos is one add rounded once, as torch does it), ties in the noise broken by
index as the reference's stable argsort. Without noise the op draws torch.rand as the
reference does: the same result under the same seed.

The module skips (with the loader's reason) when fastmae._C is not built; under
``FASTMAE_EXT_REQUIRED=1`` (``make test``) that is a failure instead.
"""

import pytest
import torch
from _ext import require_ext

from fastmae import ext, ops
from fastmae import reference as ref

require_ext()

from fastmae.ext import masking as E  # noqa: E402

f16, f32, f64, bf16 = torch.float16, torch.float32, torch.float64, torch.bfloat16


def assert_same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    assert torch.equal(a, b)


def tied_noise(N, L, device="cpu", levels=5, dtype=f32):
    # few distinct values: most keys tie, so only a stable tie-break by index matches
    return (torch.randint(0, levels, (N, L), device=device).float() / levels).to(dtype)


def inputs(N, L, D, x_dtype=f32, p_dtype=None, c_dtype=None, device="cpu"):
    p_dtype = p_dtype or x_dtype
    x = torch.randn(N, L, D, device=device).to(x_dtype)
    pos = torch.randn(1, 1 + L, D, device=device).to(p_dtype)
    cls = torch.randn(1, 1, D, device=device).to(c_dtype or p_dtype)
    return x, pos, cls


@pytest.mark.parametrize("L,ratio", [(1, 0.0), (4, 0.5), (49, 0.75), (196, 0.75), (197, 0.9), (64, 0.0)])
@pytest.mark.parametrize("tied", [False, True])
def test_matches_reference(L, ratio, tied):
    N, D = 3, 40
    x, pos, cls = inputs(N, L, D)
    noise = tied_noise(N, L) if tied else torch.rand(N, L)
    for a, b in zip(E.encoder_input(x, pos, cls, ratio, noise), ref.encoder_input(x, pos, cls, ratio, noise)):
        assert_same(a, b)
    for a, b in zip(E.random_masking(x, ratio, noise), ref.random_masking(x, ratio, noise)):
        assert_same(a, b)


@pytest.mark.parametrize("x_dtype,p_dtype,c_dtype", [
    (f16, None, None), (bf16, None, None), (f64, None, None), (f16, f32, None), (bf16, f32, f16),
    (f32, f16, bf16), (f16, f16, f32),
])
def test_dtypes(x_dtype, p_dtype, c_dtype):
    N, L, D = 2, 49, 24
    x, pos, cls = inputs(N, L, D, x_dtype, p_dtype, c_dtype)
    noise = torch.rand(N, L)
    for a, b in zip(E.encoder_input(x, pos, cls, 0.75, noise), ref.encoder_input(x, pos, cls, 0.75, noise)):
        assert_same(a, b)


@pytest.mark.parametrize("noise_dtype", [f16, bf16, f64])
def test_noise_dtypes_and_special_values(noise_dtype):
    N, L, D = 3, 50, 8
    x = torch.randn(N, L, D)
    noise = tied_noise(N, L, levels=7, dtype=noise_dtype)
    noise[0, :6] = torch.tensor([float("nan"), -0.0, 0.0, float("inf"), -float("inf"), float("nan")])
    noise[1] = -noise[1]
    for a, b in zip(E.random_masking(x, 0.5, noise), ref.random_masking(x, 0.5, noise)):
        assert_same(a, b)
    if noise_dtype == f64:  # two values that one float32 would not tell apart
        n = torch.full((1, 4), 0.5, dtype=f64)
        n[0, 0] += 1e-12
        for a, b in zip(E.random_masking(x[:1, :4], 0.5, n), ref.random_masking(x[:1, :4], 0.5, n)):
            assert_same(a, b)


def test_strided_inputs():
    N, L, D = 2, 49, 32
    big = torch.randn(N, L, 2 * D)
    x = big[:, :, ::2]  # a strided channel dim
    xt = torch.randn(L, N, D).transpose(0, 1)  # a permuted batch dim
    _, pos, cls = inputs(N, L, D)
    noise = torch.rand(L, N).t()
    for t in (x, xt):
        for a, b in zip(E.encoder_input(t, pos, cls, 0.75, noise), ref.encoder_input(t, pos, cls, 0.75, noise)):
            assert_same(a, b)


def test_drawn_noise_is_the_references_under_a_seed():
    x, pos, cls = inputs(4, 196, 16)
    torch.manual_seed(1234)
    got = E.encoder_input(x, pos, cls, 0.75)
    torch.manual_seed(1234)
    want = ref.encoder_input(x, pos, cls, 0.75)
    for a, b in zip(got, want):
        assert_same(a, b)


def test_max_tokens():
    x = torch.randn(1, E.MAX_TOKENS + 1, 4)
    with pytest.raises(ValueError, match="at most 4096 tokens"):
        E.random_masking(x, 0.5)
    x = torch.randn(1, E.MAX_TOKENS, 4)
    noise = torch.rand(1, E.MAX_TOKENS)
    for a, b in zip(E.random_masking(x, 0.5, noise), ref.random_masking(x, 0.5, noise)):
        assert_same(a, b)


def _grads(fn, tensors, grad_out):
    tensors = [t.detach().requires_grad_() for t in tensors]
    out = fn(*tensors)
    out[0].backward(grad_out)
    return out, [t.grad for t in tensors]


@pytest.mark.parametrize("x_dtype,p_dtype,ratio", [(f32, None, 0.75), (f32, None, 0.0), (f16, None, 0.5),
                                                   (f16, f32, 0.75), (bf16, None, 0.75)])
def test_encoder_input_grads(x_dtype, p_dtype, ratio):
    N, L, D = 3, 49, 40
    x, pos, cls = inputs(N, L, D, x_dtype, p_dtype)
    noise = tied_noise(N, L)
    dtype = torch.promote_types(x.dtype, pos.dtype)
    g = torch.randn(N, 1 + ref.num_kept(L, ratio), D).to(dtype)
    out, grads = _grads(lambda *t: E.encoder_input(*t, ratio, noise), (x, pos, cls), g)
    ref_out, ref_grads = _grads(lambda *t: ref.encoder_input(*t, ratio, noise), (x, pos, cls), g)
    for a, b in zip(out, ref_out):
        assert_same(a, b)
    assert_same(grads[0], ref_grads[0])  # grad x: moved and cast, no arithmetic: exact
    # grad pos / cls: batch sums (3 terms) per element, in torch's own reduction order on both
    # sides up to the summation order: assert_close's dtype tolerances, as the Triton tests
    for a, b in zip(grads[1:], ref_grads[1:]):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("ratio", [0.0, 0.75])
def test_random_masking_grads(ratio):
    N, L, D = 3, 49, 40
    x = torch.randn(N, L, D)
    noise = tied_noise(N, L)
    g = torch.randn(N, ref.num_kept(L, ratio), D)
    out, (gx,) = _grads(lambda t: E.random_masking(t, ratio, noise), (x,), g)
    ref_out, (ref_gx,) = _grads(lambda t: ref.random_masking(t, ratio, noise), (x,), g)
    for a, b in zip(out, ref_out):
        assert_same(a, b)
    assert_same(gx, ref_gx)


def test_masked_tokens_backward_op():
    N, L, D, K = 2, 49, 16, 12
    ids = torch.stack([torch.randperm(L) for _ in range(N)])
    g = torch.randn(N, 1 + K, D, dtype=f64)
    out = torch.ops.fastmae_ext.masked_tokens_backward(g, ids, 1, f32)
    rows = torch.gather(g[:, 1:], 1, ids.clamp(max=K - 1).unsqueeze(-1).expand(-1, -1, D))
    assert_same(out, torch.where((ids < K).unsqueeze(-1), rows, 0).to(f32))


def test_opcheck():
    x, pos, cls = inputs(2, 16, 8)
    noise = torch.rand(2, 16)
    x.requires_grad_()
    pos.requires_grad_()
    cls.requires_grad_()
    torch.library.opcheck(torch.ops.fastmae_ext.encoder_input, (x, pos, cls, noise, 4))
    torch.library.opcheck(torch.ops.fastmae_ext.random_masking, (x, noise, 8))
    ids = torch.stack([torch.randperm(16) for _ in range(2)])
    torch.library.opcheck(torch.ops.fastmae_ext.masked_tokens_backward, (torch.randn(2, 5, 8), ids, 1, f16))


def test_ops_dispatch_and_compile():
    x, pos, cls = inputs(2, 49, 16)
    noise = torch.rand(2, 49)
    for a, b in zip(ops.encoder_input(x, pos, cls, 0.75, noise, backend="ext"),
                    ref.encoder_input(x, pos, cls, 0.75, noise)):
        assert_same(a, b)
    f = torch.compile(lambda *t: E.encoder_input(*t, 0.75, noise)[0].sum(), fullgraph=True, backend="eager")
    torch.testing.assert_close(f(x, pos, cls), ref.encoder_input(x, pos, cls, 0.75, noise)[0].sum())


def test_cuda_kernels_are_registered():
    if not ext.has_cuda_kernels():
        pytest.skip("fastmae._C was built without its CUDA kernels")
    for op in ("random_masking", "encoder_input", "masked_tokens_backward"):
        for key in ("CPU", "CUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmae_ext::{op}", key), (op, key)


@pytest.mark.gpu
@pytest.mark.parametrize("x_dtype,p_dtype", [(bf16, None), (f16, None), (f32, None), (bf16, f32), (f64, None)])
@pytest.mark.parametrize("N,L,D,ratio", [(8, 196, 768, 0.75), (3, 49, 40, 0.5), (2, 4096, 8, 0.9), (4, 197, 36, 0.0)])
def test_cuda_matches_reference(x_dtype, p_dtype, N, L, D, ratio, device="cuda"):
    x, pos, cls = inputs(N, L, D, x_dtype, p_dtype, device=device)
    for noise in (torch.rand(N, L, device=device), tied_noise(N, L, device)):
        for a, b in zip(E.encoder_input(x, pos, cls, ratio, noise), ref.encoder_input(x, pos, cls, ratio, noise)):
            assert_same(a, b)
        for a, b in zip(E.random_masking(x, ratio, noise), ref.random_masking(x, ratio, noise)):
            assert_same(a, b)
    g = torch.randn(N, 1 + ref.num_kept(L, ratio), D, device=device).to(torch.promote_types(x.dtype, pos.dtype))
    _, grads = _grads(lambda *t: E.encoder_input(*t, ratio, noise), (x, pos, cls), g)
    _, ref_grads = _grads(lambda *t: ref.encoder_input(*t, ratio, noise), (x, pos, cls), g)
    assert_same(grads[0], ref_grads[0])


# The C++ twin sorts and gathers each sample in one task: more samples than threads, one sample,
# and each sample of a batch alone give the batch's rows (nothing leaks between tasks).
@pytest.mark.parametrize("noise_dtype", [f32, f16, f64])
def test_samples_are_independent_tasks(noise_dtype):
    N, L, D = 9, 196, 48
    x, pos, cls = inputs(N, L, D)
    noise = tied_noise(N, L, levels=11, dtype=noise_dtype)
    got = E.encoder_input(x, pos, cls, 0.75, noise)
    for a, b in zip(got, ref.encoder_input(x, pos, cls, 0.75, noise)):
        assert_same(a, b)
    for n in (0, 4, N - 1):
        one = E.encoder_input(x[n:n + 1], pos, cls, 0.75, noise[n:n + 1])
        for a, b in zip(one, got):
            assert_same(a, b[n:n + 1])
    for a, b in zip(E.random_masking(x, 0.75, noise), ref.random_masking(x, 0.75, noise)):
        assert_same(a, b)


# An empty batch: empty outputs of the reference's shapes and dtypes on both devices (on CUDA
# an empty grid is not a launch, so the kernel must not be launched).
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_empty_batch(device):
    x, pos, cls = inputs(0, 16, 8, device=device)
    noise = torch.rand(0, 16, device=device)
    for a, b in zip(E.encoder_input(x, pos, cls, 0.75, noise), ref.encoder_input(x, pos, cls, 0.75, noise)):
        assert_same(a, b)
    for a, b in zip(E.random_masking(x, 0.75, noise), ref.random_masking(x, 0.75, noise)):
        assert_same(a, b)


# Tokens of one feature whose last dim has a stride other than 1 (a size-1 dim's stride is free:
# such a tensor is contiguous, .contiguous() keeps it): the kernels must not require it to be 1
# (the CUDA kernel did, at N = L = D = 1 from a strided view; found by the emulation's fuzz test).
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_single_feature_tokens_from_a_strided_view(device):
    N, L = 2, 16
    x = torch.randn(N * L, device=device).as_strided((N, L, 1), (L, 1, 7))
    assert x.is_contiguous() and x.contiguous().stride(2) == 7
    pos, cls = torch.randn(1, 1 + L, 1, device=device), torch.randn(1, 1, 1, device=device)
    noise = torch.rand(N, L, device=device)
    for a, b in zip(E.encoder_input(x, pos, cls, 0.75, noise), ref.encoder_input(x, pos, cls, 0.75, noise)):
        assert_same(a, b)
    for a, b in zip(E.random_masking(x, 0.75, noise), ref.random_masking(x, 0.75, noise)):
        assert_same(a, b)


@pytest.mark.gpu
def test_cuda_inputs_on_two_devices_are_an_error():
    # the dispatcher takes the CUDA kernel when any input is on the GPU: it must not read the others' memory
    x, pos, cls = inputs(2, 16, 8, device="cuda")
    noise = torch.rand(2, 16, device="cuda")
    E_ = torch.ops.fastmae_ext
    for args in ((x, pos, cls, noise.cpu()), (x, pos.cpu(), cls, noise), (x, pos, cls.cpu(), noise)):
        with pytest.raises(RuntimeError, match="must be on one device"):
            E_.encoder_input(*args, 4)
    with pytest.raises(RuntimeError, match="must be on one device"):
        E_.random_masking(x, noise.cpu(), 4)


# The raw backward op's dtype argument: one the kernels do not compute (integers, bool, float8)
# is the same clear error on both devices.
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_raw_backward_takes_a_float_dtype_only(device):
    ids = torch.argsort(torch.rand(2, 8, device=device), dim=1)
    g = torch.randn(2, 3, 4, device=device)  # cls + 2 kept tokens
    for dt in (torch.int32, torch.int64, torch.bool, torch.float8_e5m2):
        with pytest.raises(RuntimeError, match="dtype must be float32, float64, float16 or bfloat16, got"):
            torch.ops.fastmae_ext.masked_tokens_backward(g, ids, 1, dt)
