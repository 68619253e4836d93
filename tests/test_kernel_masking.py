"""fastmae.kernels.masking (random masking, fused encoder input) against fastmae.reference.

Everything but the batch sums in the gradients is data movement, an index computation or
one add done as torch does it, so outputs are compared with torch.equal (and dtypes). On
CPU the kernels run in the Triton interpreter, whose float32 -> bfloat16 cast truncates
instead of rounding: bf16 results of an add are checked in the gpu-marked tests only;
bf16 inputs whose results are only copied or widened are checked here.
"""

import pytest
import torch

from fastmae import reference

masking = pytest.importorskip("fastmae.kernels.masking")

RATIOS = (0.0, 0.5, 0.75, 0.9)
# (L, mask_ratio) pairs that leave a visible token: L = 1 only with ratio 0
CASES = [(L, r) for L in (1, 49, 196, 256) for r in RATIOS if int(L * (1 - r)) >= 1]


def assert_same(a, b):
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.equal(a, b), (a - b).abs().max() if a.is_floating_point() else (a != b).sum()


def assert_all_same(outs, refs):
    for a, b in zip(outs, refs, strict=True):
        assert_same(a, b)


def tied_noise(N, L, device, levels=5):
    # few distinct values: most keys tie, so only a stable tie-break by index matches
    return torch.randint(0, levels, (N, L), device=device).float() / levels


def inputs(N, L, D, device, x_dtype=torch.float32, p_dtype=None, c_dtype=None):
    p_dtype = p_dtype or x_dtype
    x = torch.randn(N, L, D, device=device).to(x_dtype)
    pos = torch.randn(1, 1 + L, D, device=device).to(p_dtype)
    cls = torch.randn(1, 1, D, device=device).to(c_dtype or p_dtype)
    return x, pos, cls


# ------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("L,ratio", CASES)
@pytest.mark.parametrize("N", [1, 3])
def test_matches_reference(kernel_device, L, ratio, N):
    x, pos, cls = inputs(N, L, 40, kernel_device)
    noise = tied_noise(N, L, kernel_device) if N == 3 else torch.rand(N, L, device=kernel_device)
    assert_all_same(
        masking.encoder_input(x, pos, cls, ratio, noise), reference.encoder_input(x, pos, cls, ratio, noise)
    )
    assert_all_same(masking.random_masking(x, ratio, noise), reference.random_masking(x, ratio, noise))


@pytest.mark.parametrize(
    "x_dtype,p_dtype,c_dtype",
    [
        (torch.float16, None, None),  # pure fp16: the add rounds to fp16
        (torch.float64, None, None),
        (torch.float16, torch.float32, None),  # autocast: fp16 tokens, fp32 params -> fp32 tokens
        (torch.bfloat16, torch.float32, None),  # autocast with bf16: exact widening, then fp32 add
        (torch.float32, torch.float16, torch.float16),  # fp16 params: the cls row rounds to fp16 first
        (torch.float16, torch.float16, torch.float32),  # cls row in fp32, then cast to fp16 tokens
    ],
)
def test_dtypes(kernel_device, x_dtype, p_dtype, c_dtype):
    N, L = 3, 196
    x, pos, cls = inputs(N, L, 40, kernel_device, x_dtype, p_dtype, c_dtype)
    noise = torch.rand(N, L, device=kernel_device)
    out = masking.encoder_input(x, pos, cls, 0.75, noise)
    assert_all_same(out, reference.encoder_input(x, pos, cls, 0.75, noise))
    assert out[0].dtype == torch.promote_types(x.dtype, pos.dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_random_masking_dtypes(kernel_device, dtype):
    # a pure gather: exact in every dtype, bf16 included
    x = torch.randn(3, 49, 40, device=kernel_device).to(dtype)
    noise = tied_noise(3, 49, kernel_device)
    assert_all_same(masking.random_masking(x, 0.75, noise), reference.random_masking(x, 0.75, noise))


def test_wide_channels(kernel_device):
    # ViT-B width, several channel blocks on a GPU
    x, pos, cls = inputs(1, 196, 768, kernel_device)
    noise = torch.rand(1, 196, device=kernel_device)
    assert_all_same(masking.encoder_input(x, pos, cls, 0.75, noise), reference.encoder_input(x, pos, cls, 0.75, noise))


@pytest.mark.parametrize("noise_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_noise_dtypes(kernel_device, noise_dtype):
    N, L = 3, 196
    x, pos, cls = inputs(N, L, 40, kernel_device)
    # ties after rounding to the noise dtype (fp16/bf16 have few values in [0, 1))
    noise = torch.rand(N, L, device=kernel_device).to(noise_dtype)
    assert_all_same(masking.encoder_input(x, pos, cls, 0.5, noise), reference.encoder_input(x, pos, cls, 0.5, noise))


def test_float64_noise_is_not_rounded(kernel_device):
    # float64 noise that would tie after a cast to float32: its full precision must decide
    N, L = 2, 49
    x = torch.randn(N, L, 40, device=kernel_device)
    base = torch.randint(0, 3, (N, L), device=kernel_device).double() / 3
    noise = base + torch.randint(0, 1000, (N, L), device=kernel_device).double() * 1e-13
    ties32 = (noise.float()[:, :, None] == noise.float()[:, None, :]).sum()
    ties64 = (noise[:, :, None] == noise[:, None, :]).sum()
    assert ties32 > ties64  # a cast to float32 would merge distinct keys
    assert_all_same(masking.random_masking(x, 0.5, noise), reference.random_masking(x, 0.5, noise))


@pytest.mark.parametrize("noise_dtype", [torch.float32, torch.float64])
def test_special_noise_values(kernel_device, noise_dtype):
    # -0 and +0 compare equal, NaNs (any sign) sort last: torch's order, ties by index
    N, L = 3, 49
    pool = torch.tensor([float("nan"), -float("nan"), -0.0, 0.0, float("inf"), -float("inf"), -1.5, 2.0, 1e-40])
    noise = pool[torch.randint(0, len(pool), (N, L))].to(device=kernel_device, dtype=noise_dtype)
    x = torch.randn(N, L, 40, device=kernel_device)
    assert_all_same(masking.random_masking(x, 0.5, noise), reference.random_masking(x, 0.5, noise))


def test_strided_inputs(kernel_device):
    N, L, D = 3, 49, 40
    x = torch.randn(L, N, 2 * D, device=kernel_device).transpose(0, 1)[:, :, ::2]  # (N, L, D) strided
    pos = torch.randn(1, D, 1 + L, device=kernel_device).transpose(1, 2)
    cls = torch.randn(1, 1, 2 * D, device=kernel_device)[:, :, ::2]
    noise = torch.rand(L, N, device=kernel_device).t()
    assert_all_same(masking.encoder_input(x, pos, cls, 0.75, noise), reference.encoder_input(x, pos, cls, 0.75, noise))


def test_max_tokens(kernel_device):
    # the largest row the ranking takes, one sample; one more token is refused
    L = masking.MAX_TOKENS
    x = torch.randn(1, L, 8, device=kernel_device)
    noise = tied_noise(1, L, kernel_device, levels=1000)
    assert_all_same(masking.random_masking(x, 0.75, noise), reference.random_masking(x, 0.75, noise))
    with pytest.raises(ValueError, match="L=4097"):
        masking.random_masking(torch.randn(1, L + 1, 8, device=kernel_device), 0.75)


def test_bad_ratio_raises(kernel_device):
    with pytest.raises(ValueError, match="mask_ratio"):
        masking.random_masking(torch.randn(1, 4, 8, device=kernel_device), 0.9)


# --------------------------------------------------------------------------- noise=None
def _check_drawn(out, x, pos, cls, ratio):
    tokens, mask, ids_restore = out
    N, L, _ = x.shape
    len_keep = reference.num_kept(L, ratio)
    assert_same(ids_restore.sort(dim=1).values, torch.arange(L, device=x.device).expand(N, L))  # permutations
    assert torch.equal(mask.sum(1), torch.full((N,), float(L - len_keep), device=x.device))
    # the reference, given noise that sorts into the kernel's own permutation, agrees exactly
    assert_all_same(out, reference.encoder_input(x, pos, cls, ratio, ids_restore.float()))


@pytest.mark.parametrize("L,ratio", [(49, 0.75), (196, 0.9)])
def test_drawn_noise(kernel_device, _fresh_seed, L, ratio):
    N = 3
    x, pos, cls = inputs(N, L, 40, kernel_device)
    out = masking.encoder_input(x, pos, cls, ratio)
    _check_drawn(out, x, pos, cls, ratio)
    ids = out[2]
    assert not torch.equal(ids[0], ids[1]) and not torch.equal(ids[1], ids[2])  # a stream per sample
    # torch.manual_seed reproduces the draw; the next draw differs
    torch.manual_seed(_fresh_seed + 1)
    a = masking.encoder_input(x, pos, cls, ratio)
    b = masking.encoder_input(x, pos, cls, ratio)
    torch.manual_seed(_fresh_seed + 1)
    assert_all_same(masking.encoder_input(x, pos, cls, ratio), a)
    assert not torch.equal(a[2], b[2])
    torch.manual_seed(_fresh_seed + 1)
    xm, mask, ids_restore = masking.random_masking(x, ratio)  # same seed, same draw
    assert_same(ids_restore, a[2])
    assert_same(xm, reference.random_masking(x, ratio, ids_restore.float())[0])


# ---------------------------------------------------------------------------- autograd
def _grads(fn, tensors, grad_out):
    tensors = [t.detach().requires_grad_() for t in tensors]
    out = fn(*tensors)
    out[0].backward(grad_out)
    return out, [t.grad for t in tensors]


@pytest.mark.parametrize(
    "x_dtype,p_dtype,ratio",
    [
        (torch.float32, None, 0.75),
        (torch.float32, None, 0.0),
        (torch.float16, None, 0.5),
        (torch.float16, torch.float32, 0.75),
    ],
)
def test_encoder_input_grads(kernel_device, x_dtype, p_dtype, ratio):
    N, L, D = 3, 49, 40
    x, pos, cls = inputs(N, L, D, kernel_device, x_dtype, p_dtype)
    noise = tied_noise(N, L, kernel_device)
    dtype = torch.promote_types(x.dtype, pos.dtype)
    g = torch.randn(N, 1 + reference.num_kept(L, ratio), D, device=kernel_device).to(dtype)
    out, grads = _grads(lambda *t: masking.encoder_input(*t, ratio, noise), (x, pos, cls), g)
    ref_out, ref_grads = _grads(lambda *t: reference.encoder_input(*t, ratio, noise), (x, pos, cls), g)
    assert_all_same(out, ref_out)
    gx, gpos, gcls = grads
    # grad x: moved and cast, no arithmetic: exact
    assert_same(gx, ref_grads[0])
    # grad pos / cls: a sum over the batch (3 terms) per element; torch's reduction order may
    # differ from the reference's, a few ulps of the operands: assert_close's dtype tolerances
    for a, b in zip((gpos, gcls), ref_grads[1:]):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("ratio", [0.0, 0.75])
def test_random_masking_grads(kernel_device, ratio):
    N, L, D = 3, 49, 40
    x = torch.randn(N, L, D, device=kernel_device)
    noise = tied_noise(N, L, kernel_device)
    g = torch.randn(N, reference.num_kept(L, ratio), D, device=kernel_device)
    out, (gx,) = _grads(lambda t: masking.random_masking(t, ratio, noise), (x,), g)
    ref_out, (ref_gx,) = _grads(lambda t: reference.random_masking(t, ratio, noise), (x,), g)
    assert_all_same(out, ref_out)
    assert_same(gx, ref_gx)  # data movement only (zeros at removed tokens): exact


def test_only_some_grads(kernel_device):
    # MAE's pos_embed is a frozen buffer: only x and cls need grads (grad x cast in the kernel)
    N, L, D = 2, 49, 40
    x, pos, cls = inputs(N, L, D, kernel_device, torch.float16, torch.float32)
    noise = torch.rand(N, L, device=kernel_device)
    x.requires_grad_()
    cls.requires_grad_()
    tokens = masking.encoder_input(x, pos, cls, 0.75, noise)[0]
    g = torch.randn_like(tokens)
    gx, gcls = torch.autograd.grad(tokens, (x, cls), g)
    rx, rcls = torch.autograd.grad(reference.encoder_input(x, pos, cls, 0.75, noise)[0], (x, cls), g)
    assert_same(gx, rx)
    torch.testing.assert_close(gcls, rcls)  # batch sum, as above


# ------------------------------------------------------------------- registration, compile
def test_opcheck(kernel_device):
    N, L, D = 2, 49, 40
    x, pos, cls = (t.requires_grad_() for t in inputs(N, L, D, kernel_device))
    noise = torch.rand(N, L, device=kernel_device)
    seed = torch.randint(0, 2**31 - 1, (1,), device=kernel_device)
    for args in ((x, 0.75, noise, None), (x, 0.5, None, seed)):
        torch.library.opcheck(torch.ops.fastmae.random_masking, args)
    for args in ((x, pos, cls, 0.75, noise, None), (x, pos, cls, 0.5, None, seed)):
        torch.library.opcheck(torch.ops.fastmae.encoder_input, args)
    ids_restore = reference.random_masking(x.detach(), 0.75, noise)[2]
    g = torch.randn(N, 1 + reference.num_kept(L, 0.75), D, device=kernel_device)
    torch.library.opcheck(torch.ops.fastmae.masked_tokens_backward, (g, ids_restore, 1, torch.float16))


def test_compile_fullgraph(kernel_device):
    N, L, D = 2, 49, 40
    x, pos, cls = inputs(N, L, D, kernel_device)
    noise = tied_noise(N, L, kernel_device)

    def f(x, pos, cls, noise):
        tokens, mask, ids_restore = masking.encoder_input(x, pos, cls, 0.75, noise)
        xm = masking.random_masking(x, 0.5, noise)[0]
        return (tokens * tokens).sum() + xm.sum(), mask, ids_restore, tokens

    cf = torch.compile(f, fullgraph=True)
    xs = [t.clone().requires_grad_() for t in (x, pos, cls)]
    out = cf(*xs, noise)
    out[0].backward()
    ref_xs = [t.clone().requires_grad_() for t in (x, pos, cls)]
    ref = f(*ref_xs, noise)
    ref[0].backward()
    for a, b in zip(out[1:], ref[1:]):
        assert_same(a, b)
    for a, b in zip(xs, ref_xs):
        torch.testing.assert_close(a.grad, b.grad)  # inductor may fuse the squares/sums differently
    # drawn noise traces too (the seed is a device tensor, not a Python int)
    drawn = torch.compile(lambda x: masking.random_masking(x, 0.75), fullgraph=True)(x)
    assert_same(drawn[0], reference.random_masking(x, 0.75, drawn[2].float())[0])


def test_cpu_fallbacks_agree(kernel_device):
    # the plain-PyTorch fallbacks registered for CPU tensors outside the interpreter
    N, L, D = 2, 49, 40
    x, pos, cls = inputs(N, L, D, kernel_device)
    seed = torch.tensor([1234], device=kernel_device)
    a = masking._encoder_input_cpu(x, pos, cls, 0.75, None, seed)
    assert_all_same(masking._encoder_input_cpu(x, pos, cls, 0.75, None, seed), a)  # a function of the seed
    assert_all_same(masking._random_masking_cpu(x, 0.75, None, seed), reference.random_masking(x, 0.75, a[2].float()))
    g = torch.randn_like(a[0])
    assert_same(
        masking._masked_tokens_backward_cpu(g, a[2], 1, torch.float32),
        torch.ops.fastmae.masked_tokens_backward(g, a[2], 1, torch.float32),
    )


# --------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("p_dtype", [torch.bfloat16, torch.float32])
def test_vit_b_bf16(p_dtype):
    # ViT-B/16 at 224 px: N=64, L=196, D=768, mask ratio 0.75; bf16 tokens with bf16 params
    # (adds rounded to bf16) or fp32 params (autocast: fp32 tokens)
    N, L, D = 64, 196, 768
    x, pos, cls = inputs(N, L, D, "cuda", torch.bfloat16, p_dtype)
    noise = torch.rand(N, L, device="cuda")
    g = torch.randn(N, 1 + 49, D, device="cuda").to(torch.promote_types(x.dtype, pos.dtype))
    out, grads = _grads(lambda *t: masking.encoder_input(*t, 0.75, noise), (x, pos, cls), g)
    ref, ref_grads = _grads(lambda *t: reference.encoder_input(*t, 0.75, noise), (x, pos, cls), g)
    assert_all_same(out, ref)
    assert_same(grads[0], ref_grads[0])
    for a, b in zip(grads[1:], ref_grads[1:]):  # batch sums of 64 terms, order may differ
        torch.testing.assert_close(a, b)
    drawn = masking.encoder_input(x, pos, cls, 0.75)
    _check_drawn(drawn, x, pos, cls, 0.75)


@pytest.mark.gpu
def test_deterministic_repeats():
    # many programs write ids_keep by scatter and read it back in a second kernel: repeated
    # runs (and a large L, many rank tiles) must give identical bits
    N, L, D = 128, 256, 1024
    x, pos, cls = (t.requires_grad_() for t in inputs(N, L, D, "cuda", torch.bfloat16))
    noise = tied_noise(N, L, "cuda", levels=50)
    g = torch.randn(N, 1 + reference.num_kept(L, 0.75), D, device="cuda", dtype=torch.bfloat16)
    first = None
    for _ in range(10):
        out = masking.encoder_input(x, pos, cls, 0.75, noise)
        grads = torch.autograd.grad(out[0], (x, pos, cls), g)
        if first is None:
            first = (out, grads)
            assert_all_same(out, reference.encoder_input(x, pos, cls, 0.75, noise))
        else:
            assert_all_same(out, first[0])
            assert_all_same(grads, first[1])
    seed = torch.randint(0, 2**31 - 1, (1,), device="cuda")
    a = torch.ops.fastmae.random_masking(x.detach(), 0.75, None, seed)
    for _ in range(5):
        assert_all_same(torch.ops.fastmae.random_masking(x.detach(), 0.75, None, seed), a)
    big = torch.rand(8, masking.MAX_TOKENS, device="cuda", dtype=torch.float64)
    xb = torch.randn(8, masking.MAX_TOKENS, 64, device="cuda")
    assert_all_same(masking.random_masking(xb, 0.9, big), reference.random_masking(xb, 0.9, big))
