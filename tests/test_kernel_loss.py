"""Fused Triton MAE loss (fastmae.kernels.loss) against fastmae.reference.mae_loss.

Tolerances. Kernel and reference both compute in float32 from the same inputs (a
low-precision pred is upcast by both), so they differ only in the order of the float32
reductions (patch mean / variance, the per-patch mean and the final sums) and in 1-ulp
differences of sqrt / reciprocal: relative error ~ eps32 * log2(terms) << 1e-5.
Gradients: elementwise ``c * (pred - t)``, where t carries a few ulp of the mean/variance
rounding, i.e. an *absolute* error ~ 1e-6 * |t| relative to the gradient scale, hence
``atol = 1e-5 * max|grad|`` beside ``rtol = 1e-5``; in fp16 one half-ulp rounding flip of
the final cast adds a relative 2**-10.
"""

import math

import pytest
import torch

from fastmae import reference as ref

pytest.importorskip("triton")
from fastmae.kernels import loss as K  # noqa: E402

# (N, C, H, W, p): L = 1 (P = 4, where the unbiased 1/(P-1) is far from 1/P), L = 49 (P = 12),
# L = 196 (P = 4), P = 48, P = 768 (ViT p=16) and P = 588 (p=14), both not powers of two.
CASES = [
    (3, 1, 2, 2, 2),
    (2, 3, 14, 14, 2),
    (1, 1, 28, 28, 2),
    (2, 3, 16, 16, 4),
    (2, 3, 32, 32, 16),
    (1, 3, 28, 28, 14),
]


def _inputs(N, C, H, W, p, device, pred_dtype=torch.float32, imgs_dtype=torch.float32, kept=0.25):
    L = (H // p) * (W // p)
    imgs = (torch.randn(N, C, H, W, device=device) * 2 + 0.5).to(imgs_dtype)
    pred = torch.randn(N, L, p * p * C, device=device).to(pred_dtype)
    mask = _mae_mask(N, L, kept, device)
    return imgs, pred, mask


def _mae_mask(N, L, kept, device):
    """1 = removed: a random int(L * kept) patches of each image are kept (all removed for L = 1)."""
    len_keep = int(L * kept)
    order = torch.rand(N, L, device=device).argsort(dim=1)
    return (order >= len_keep).float()


def _grad_tols(imgs, mask, p, norm, g, grad_ref):
    """Tolerances for d pred, kernel vs reference, from a float32 rounding analysis.

    d pred = c_m * (pred - t) with c_m = 2 g mask_m / (P sum(mask)). Each side computes
    the target with ~(log2 P + 1) ulps of error: a tree sum of P terms for the mean (and
    variance), one more rounding after. Without norm_pix_loss t is read exactly and only
    rtol is needed. With it, an error of k ulps of |mean| in t - mean is amplified by
    1 / std, and one of k ulps in the variance gives a relative error of t_norm:
    |delta t_norm| <= k eps (|mean| / std + |t_norm|), twice (kernel and reference).
    """
    eps = torch.finfo(torch.float32).eps
    t = ref.patchify(imgs, p).float()
    P = t.shape[-1]
    ulps = 2 * (math.log2(P) + 1)
    if norm:
        mean = t.mean(-1, keepdim=True)
        std = (t.var(-1, keepdim=True) + 1e-6).sqrt()
        scale = ((mean.abs() / std) + ((t - mean) / std).abs().amax(-1, keepdim=True)).max().item()
    else:
        scale = 0.0
    c = 2 * abs(float(g)) * mask.float().abs().max().item() / (P * mask.float().sum().item())
    atol = c * ulps * eps * scale
    if grad_ref.dtype == torch.float16:
        # The final cast may round the two float32 values to neighbouring fp16 numbers:
        # one ulp is at most 2**-10 relative, or the subnormal spacing 2**-24.
        return dict(rtol=2**-10, atol=atol + 2**-24)
    if grad_ref.dtype == torch.bfloat16:
        return dict(rtol=2**-7, atol=atol + 2**-133)  # likewise, one bf16 ulp
    return dict(rtol=1e-5, atol=atol)


def _check(imgs, pred, mask, p, norm, grads=True):
    pred = pred.detach().requires_grad_(True)
    pred_ref = pred.detach().clone().requires_grad_(True)
    out = K.mae_loss(imgs, pred, mask, p, norm)
    want = ref.mae_loss(imgs, pred_ref, mask, p, norm)
    assert out.shape == () and out.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=1e-5, atol=0)
    if grads:
        g = torch.rand((), device=pred.device) + 0.5  # not 1, so grad_out is really used
        out.backward(g)
        want.backward(g)
        assert pred.grad.dtype == pred.dtype and pred.grad.shape == pred.shape
        torch.testing.assert_close(pred.grad, pred_ref.grad, **_grad_tols(imgs, mask, p, norm, g, pred_ref.grad))


# (imgs, pred) dtypes. bf16 pred: forward only here -- the interpreter truncates the
# fp32 -> bf16 cast of the gradient instead of rounding it; bf16 gradients are GPU tests.
DTYPES = [
    (torch.float32, torch.float32),
    (torch.float32, torch.float16),
    (torch.float16, torch.float16),
    (torch.float32, torch.bfloat16),
]


@pytest.mark.parametrize("imgs_dtype,pred_dtype", DTYPES)
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("N,C,H,W,p", CASES)
def test_loss_and_grad_match_reference(kernel_device, N, C, H, W, p, norm, imgs_dtype, pred_dtype):
    imgs, pred, mask = _inputs(N, C, H, W, p, kernel_device, pred_dtype, imgs_dtype)
    _check(imgs, pred, mask, p, norm, grads=pred_dtype != torch.bfloat16)


def _mask_of_kind(kind, N, L, device):
    if kind == "half":
        return _mae_mask(N, L, 0.5, device)
    if kind == "one_removed":  # a single removed patch in the whole batch
        mask = torch.zeros(N, L, device=device)
        mask.view(-1)[torch.randint(N * L, ()).item()] = 1
        return mask
    if kind == "one_kept":
        mask = torch.ones(N, L, device=device)
        mask.view(-1)[torch.randint(N * L, ()).item()] = 0
        return mask
    if kind == "all_removed":
        return torch.ones(N, L, device=device)
    if kind == "weighted":  # a non-binary float mask: the reference weights by it
        return torch.rand(N, L, device=device) + 0.1
    if kind == "bool":
        return _mae_mask(N, L, 0.25, device).bool()
    raise ValueError(kind)


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("kind", ["half", "one_removed", "one_kept", "all_removed", "weighted", "bool"])
def test_masks(kernel_device, kind, norm):
    N, C, H, W, p = 2, 3, 14, 14, 2
    imgs, pred, _ = _inputs(N, C, H, W, p, kernel_device)
    mask = _mask_of_kind(kind, N, 49, kernel_device)
    _check(imgs, pred, mask, p, norm)


@pytest.mark.parametrize("p,C", [(2, 1), (4, 3)])
def test_nearly_flat_patches(kernel_device, p, C):
    # Patch variance ~ 1e-6, the size of the eps under the square root: the normalised
    # target depends on eps and on the unbiased 1/(P-1) as much as on the pixels.
    imgs, pred, mask = _inputs(2, C, 4 * p, 4 * p, p, kernel_device)
    imgs = 0.5 + 1e-3 * torch.randn_like(imgs)
    _check(imgs, pred, mask, p, True)


@pytest.mark.parametrize("norm", [False, True])
def test_non_contiguous(kernel_device, norm):
    N, C, H, W, p = 2, 3, 8, 12, 2
    L, P = 24, 12
    imgs = torch.randn(N, C, H, W, device=kernel_device).to(memory_format=torch.channels_last)
    pred = torch.randn(L, N, 2 * P, device=kernel_device).transpose(0, 1)[:, :, 1::2]  # (N, L, P) view
    mask = _mae_mask(L, N, 0.25, kernel_device).t()  # (N, L), transposed storage
    assert not (imgs.is_contiguous() or pred.is_contiguous() or mask.is_contiguous())
    _check(imgs, pred, mask, p, norm)
    crop = torch.randn(N, C, H + 3, 2 * W, device=kernel_device)[:, :, 1 : H + 1, ::2]
    _check(crop, pred, mask, p, norm)


@pytest.mark.parametrize("norm", [False, True])
def test_many_programs_and_final_loop(kernel_device, monkeypatch, norm):
    # 4 patches per program (P = 12 -> BLOCK_P = 16): 98 patches -> 25 programs, the last
    # one half empty; the final reduction adds 25 partials 8 at a time, the last step partial.
    monkeypatch.setattr(K, "_TILE", 64)
    monkeypatch.setattr(K, "_FINAL_BLOCK", 8)
    assert K._blocks(12, 98)[:2] == (16, 4)
    imgs, pred, mask = _inputs(2, 3, 14, 14, 2, kernel_device)
    _check(imgs, pred, mask, 2, norm)


def test_deterministic(kernel_device):
    imgs, pred, mask = _inputs(2, 3, 14, 14, 2, kernel_device)
    pred.requires_grad_(True)
    runs = []
    for _ in range(2):
        loss = K.mae_loss(imgs, pred, mask, 2, True)
        (grad,) = torch.autograd.grad(loss, pred)
        runs.append((loss, grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_no_grad_for_imgs_and_mask(kernel_device):
    imgs, pred, mask = _inputs(1, 3, 8, 8, 4, kernel_device)
    imgs.requires_grad_(True)
    mask.requires_grad_(True)
    pred.requires_grad_(True)
    K.mae_loss(imgs, pred, mask, 4, False).backward()
    assert imgs.grad is None and mask.grad is None and pred.grad is not None


@pytest.mark.parametrize("norm", [False, True])
def test_opcheck(kernel_device, norm):
    imgs, pred, mask = _inputs(2, 3, 8, 12, 2, kernel_device, torch.float16)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(
        torch.ops.fastmae.mae_loss.default, (imgs, pred.requires_grad_(True), mask, 2, norm), test_utils=tests
    )
    g = torch.rand((), device=kernel_device)
    mask_sum = mask.sum(dtype=torch.float32)
    torch.library.opcheck(
        torch.ops.fastmae.mae_loss_backward.default,
        (g, mask_sum, imgs, pred.detach(), mask, 2, norm),
        test_utils=tests,
    )


def test_op_returns_mask_sum(kernel_device):
    # The forward op's second output, sum(mask), is what the backward divides by.
    imgs, pred, _ = _inputs(2, 3, 14, 14, 2, kernel_device)
    mask = _mask_of_kind("weighted", 2, 49, kernel_device)
    loss, mask_sum = torch.ops.fastmae.mae_loss(imgs, pred.requires_grad_(True), mask, 2, True)
    assert mask_sum.shape == () and mask_sum.dtype == torch.float32 and not mask_sum.requires_grad
    torch.testing.assert_close(mask_sum, mask.sum(), rtol=1e-6, atol=0)  # float32 sums in two orders


@pytest.mark.parametrize("norm", [False, True])
def test_kept_patches_are_not_read(kernel_device, norm):
    # Patches with mask 0 add loss * 0: the kernels skip their bytes, so NaN/inf there
    # changes nothing (the reference, which multiplies, would give NaN), and their
    # gradient is exactly zero. Compared with the reference on the same inputs with those
    # patches made finite (any finite values give the reference the same result).
    N, C, H, W, p = 2, 3, 14, 14, 2
    imgs, pred, mask = _inputs(N, C, H, W, p, kernel_device)
    kept = mask == 0
    assert kept.any() and (~kept).any()
    bad_pred = pred.clone()
    bad_pred[kept] = float("nan")
    pix_kept = ref.unpatchify(kept[..., None].expand(-1, -1, p * p * C).float(), p).bool()  # (N, C, H, W)
    bad_imgs = imgs.masked_fill(pix_kept, float("inf"))
    bad_pred.requires_grad_(True)
    out = K.mae_loss(bad_imgs, bad_pred, mask, p, norm)
    pred_ref = pred.clone().requires_grad_(True)
    want = ref.mae_loss(imgs, pred_ref, mask, p, norm)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=0)
    g = torch.rand((), device=kernel_device) + 0.5
    out.backward(g)
    want.backward(g)
    assert torch.equal(bad_pred.grad[kept], torch.zeros_like(bad_pred.grad[kept]))
    torch.testing.assert_close(bad_pred.grad, pred_ref.grad, **_grad_tols(imgs, mask, p, norm, g, pred_ref.grad))


def test_torch_compile_fullgraph(kernel_device):
    p = 2

    def f(imgs, pred, mask):
        return K.mae_loss(imgs, pred * 1.5, mask, p, True) * 2

    compiled = torch.compile(f, fullgraph=True)
    imgs, pred, mask = _inputs(2, 3, 8, 12, p, kernel_device)
    pred.requires_grad_(True)
    pred_ref = pred.detach().clone().requires_grad_(True)
    out = compiled(imgs, pred, mask)
    want = ref.mae_loss(imgs, pred_ref * 1.5, mask, p, True) * 2
    torch.testing.assert_close(out, want, rtol=1e-5, atol=0)
    out.backward()
    want.backward()
    torch.testing.assert_close(pred.grad, pred_ref.grad, **_grad_tols(imgs, mask, p, True, 3.0, pred_ref.grad))


def test_cpu_fallbacks_are_the_reference():
    # The functions registered for CPU tensors outside the interpreter.
    imgs, pred, mask = _inputs(2, 3, 8, 8, 4, "cpu")
    loss, mask_sum = K._mae_loss_cpu(imgs, pred, mask, 4, True)
    assert torch.equal(loss, ref.mae_loss(imgs, pred, mask, 4, True))
    assert torch.equal(mask_sum, mask.sum())
    pred_ref = pred.clone().requires_grad_(True)
    g = torch.tensor(0.7)
    ref.mae_loss(imgs, pred_ref, mask, 4, True).backward(g)
    assert torch.equal(K._mae_loss_backward_cpu(g, mask_sum, imgs, pred, mask, 4, True), pred_ref.grad)


# ----------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("pred_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_vit_b_shape_gpu(norm, pred_dtype):
    # ViT-B MAE pretraining: N = 8 images 224 x 224, p = 16 (L = 196, P = 768), 75% removed,
    # fp32 images and an autocast (bf16) decoder output; reference on the same pred upcast.
    imgs, pred, mask = _inputs(8, 3, 224, 224, 16, "cuda", pred_dtype)
    _check(imgs, pred, mask, 16, norm)


@pytest.mark.gpu
def test_deterministic_gpu():
    # Thousands of programs run concurrently; without atomics the result must not depend on their order.
    imgs, pred, mask = _inputs(64, 3, 224, 224, 16, "cuda", torch.bfloat16)
    pred.requires_grad_(True)
    first = None
    for _ in range(3):
        loss = K.mae_loss(imgs, pred, mask, 16, True)
        (grad,) = torch.autograd.grad(loss, pred)
        if first is None:
            first = (loss, grad)
        else:
            assert torch.equal(loss, first[0]) and torch.equal(grad, first[1])
