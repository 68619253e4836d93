"""The compiled extension's MAE loss (fastmae.ext.loss, backend="ext") against fastmae.reference.

CPU tests run the C++ twin (csrc/ops/cpu/loss_kernel.cpp); the GPU-marked ones the CUDA kernel
(csrc/ops/cuda/loss_kernel.cu).

Oracles. Forward, fp32 inputs: within 1e-6 relative of the reference (both compute in float32
from the same values and differ only in the order of the reductions; the twin's sums are in
float64). Low-precision pred / imgs: the 2x oracle of the Triton tests, against a float64
loss from the same (rounded) inputs: ``|ext - exact| <= 2 |reference - exact| + 4 eps32 |exact|``.
Gradients: the rounding analysis of tests/test_kernel_loss.py (``_grad_tols``). The loss is
deterministic: repeated calls are bitwise equal.

The module skips (with the loader's reason) when fastmae._C is not built; under
``FASTMAE_EXT_REQUIRED=1`` (``make test``) that is a failure instead.
"""

import pytest
import torch
from _ext import require_ext

from fastmae import ext, ops
from fastmae import reference as ref

require_ext()

from test_kernel_loss import CASES, _grad_tols, _inputs, _mae_mask, _mask_of_kind  # noqa: E402

from fastmae.ext import loss as E  # noqa: E402

f16, f32, f64, bf16 = torch.float16, torch.float32, torch.float64, torch.bfloat16
EPS32 = torch.finfo(f32).eps


def _exact(imgs, pred, mask, p, norm):
    """The loss in float64 from the same values (the inputs' own rounding included)."""
    t = ref.patchify(imgs.double(), p)
    if norm:
        t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
    m = mask.double()
    return (((pred.double() - t) ** 2).mean(-1) * m).sum() / m.sum()


def _check(imgs, pred, mask, p, norm, grads=True):
    pred = pred.detach().requires_grad_(True)
    pred_ref = pred.detach().clone().requires_grad_(True)
    out = E.mae_loss(imgs, pred, mask, p, norm)
    want = ref.mae_loss(imgs, pred_ref, mask, p, norm)
    assert out.shape == () and out.dtype == f32
    if imgs.dtype == f32 and pred.dtype == f32:
        torch.testing.assert_close(out, want, rtol=1e-6, atol=0)
    else:
        exact = _exact(imgs, pred, mask, p, norm)
        err, ref_err = (out.double() - exact).abs(), (want.double() - exact).abs()
        assert err <= 2 * ref_err + 4 * EPS32 * exact.abs(), (err.item(), ref_err.item())
    assert torch.equal(E.mae_loss(imgs, pred, mask, p, norm), out)  # deterministic
    if grads:
        g = torch.rand(()) + 0.5  # not 1, so grad_out is really used
        out.backward(g)
        want.backward(g)
        assert pred.grad.dtype == pred.dtype and pred.grad.shape == pred.shape
        torch.testing.assert_close(pred.grad, pred_ref.grad, **_grad_tols(imgs, mask, p, norm, g, pred_ref.grad))


DTYPES = [(f32, f32), (f32, f16), (f16, f16), (f32, bf16), (bf16, bf16), (f64, f64), (f64, f32)]


@pytest.mark.parametrize("imgs_dtype,pred_dtype", DTYPES)
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("N,C,H,W,p", CASES)
def test_loss_and_grad_match_reference(N, C, H, W, p, norm, imgs_dtype, pred_dtype):
    imgs, pred, mask = _inputs(N, C, H, W, p, "cpu", pred_dtype, imgs_dtype)
    _check(imgs, pred, mask, p, norm)


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("kind", ["half", "one_removed", "one_kept", "all_removed", "weighted", "bool"])
def test_masks(kind, norm):
    imgs, pred, _ = _inputs(2, 3, 14, 14, 2, "cpu")
    _check(imgs, pred, _mask_of_kind(kind, 2, 49, "cpu"), 2, norm)


def test_vit_b_shape_and_strides():
    imgs, pred, mask = _inputs(2, 3, 224, 224, 16, "cpu")
    _check(imgs, pred, mask, 16, True)
    _check(imgs.to(memory_format=torch.channels_last), pred.transpose(0, 1).contiguous().transpose(0, 1),
           mask.t().contiguous().t(), 16, True)


def test_removed_patches_only_are_read():
    imgs, pred, mask = _inputs(2, 3, 16, 16, 4, "cpu")
    pred2, imgs2 = pred.clone(), imgs.clone()
    kept = mask == 0
    pred2[kept] = float("nan")
    imgs2.view(2, 3, 4, 4, 4, 4).permute(0, 2, 4, 1, 3, 5).reshape(2, 16, 48)[kept] = float("nan")
    assert torch.equal(E.mae_loss(imgs2, pred2, mask, 4, True), E.mae_loss(imgs, pred, mask, 4, True))


def test_opcheck():
    imgs, pred, mask = _inputs(2, 3, 8, 8, 4, "cpu")
    pred.requires_grad_()
    torch.library.opcheck(torch.ops.fastmae_ext.mae_loss, (imgs, pred, mask, 4, True))
    torch.library.opcheck(torch.ops.fastmae_ext.mae_loss, (imgs, pred, mask.bool(), 4, False))
    ms = mask.sum()
    torch.library.opcheck(torch.ops.fastmae_ext.mae_loss_backward, (torch.tensor(1.5), ms, imgs, pred.detach(), mask, 4,
                                                                    True))


def test_ops_dispatch():
    imgs, pred, mask = _inputs(2, 3, 16, 16, 4, "cpu")
    torch.testing.assert_close(ops.mae_loss(imgs, pred, mask, 4, True, backend="ext"),
                               ref.mae_loss(imgs, pred, mask, 4, True), rtol=1e-6, atol=0)


def test_cuda_kernels_are_registered():
    if not ext.has_cuda_kernels():
        pytest.skip("fastmae._C was built without its CUDA kernels")
    for op in ("mae_loss", "mae_loss_backward"):
        for key in ("CPU", "CUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmae_ext::{op}", key), (op, key)


@pytest.mark.gpu
@pytest.mark.parametrize("imgs_dtype,pred_dtype", DTYPES)
@pytest.mark.parametrize("norm", [False, True])
def test_cuda_matches_reference(imgs_dtype, pred_dtype, norm, device="cuda"):
    for N, C, H, W, p in CASES + [(8, 3, 224, 224, 16)]:
        imgs, pred, _ = _inputs(N, C, H, W, p, device, pred_dtype, imgs_dtype)
        mask = _mae_mask(N, (H // p) * (W // p), 0.25, device)
        _check_cuda(imgs, pred, mask, p, norm)


def _check_cuda(imgs, pred, mask, p, norm):
    pred = pred.detach().requires_grad_(True)
    pred_ref = pred.detach().clone().requires_grad_(True)
    out = E.mae_loss(imgs, pred, mask, p, norm)
    want = ref.mae_loss(imgs, pred_ref, mask, p, norm)
    exact = _exact(imgs, pred, mask, p, norm)
    # the CUDA kernel sums in float32 (tree order): the 2x oracle in every dtype
    assert (out.double() - exact).abs() <= 2 * (want.double() - exact).abs() + 8 * EPS32 * exact.abs()
    assert torch.equal(E.mae_loss(imgs, pred, mask, p, norm), out)
    g = torch.rand((), device=imgs.device) + 0.5
    out.backward(g)
    want.backward(g)
    torch.testing.assert_close(pred.grad, pred_ref.grad, **_grad_tols(imgs, mask, p, norm, g, pred_ref.grad))


# Patches that fill a block's shared memory: a warp holds one patch (P floats) there, up to 48 KB
# a block less the kernel's static arrays. 48 KB is exactly 4, 3 and 8 patches of P = 3072 (ViT-/32
# RGB), 4096 (p = 64, one channel) and 1536 (six channels at p = 16): a block takes one warp fewer.
# A patch above the limit (P = 12288) is a clear error, not a failed launch.
@pytest.mark.gpu
@pytest.mark.parametrize("norm", [False, True])
def test_cuda_patches_that_fill_shared_memory(norm, device="cuda"):
    for N, C, H, W, p in [(2, 3, 64, 96, 32), (1, 1, 128, 128, 64), (2, 6, 32, 48, 16)]:
        imgs, pred, _ = _inputs(N, C, H, W, p, device)
        _check_cuda(imgs, pred, _mae_mask(N, (H // p) * (W // p), 0.25, device), p, norm)
    imgs, pred, mask = _inputs(1, 3, 64, 64, 64, device)
    with pytest.raises(RuntimeError, match="above the CUDA loss kernel's limit"):
        E.mae_loss(imgs, pred, torch.ones_like(mask), 64, norm)


@pytest.mark.gpu
def test_cuda_raw_ops_scalars_and_devices():
    # a direct torch.ops call with CPU scalars (as opcheck makes them) gives the on-device call's bits;
    # a mask or pred on another device is an error, not a read of another device's memory
    imgs, pred, mask = _inputs(2, 3, 32, 32, 16, "cuda")
    ms = mask.sum()
    op, bwd = torch.ops.fastmae_ext.mae_loss, torch.ops.fastmae_ext.mae_loss_backward
    want = bwd(torch.tensor(1.5, device="cuda"), ms, imgs, pred, mask, 16, True)
    assert torch.equal(bwd(torch.tensor(1.5), ms.cpu(), imgs, pred, mask, 16, True), want)
    for args in ((imgs, pred, mask.cpu()), (imgs, pred.cpu(), mask)):
        with pytest.raises(RuntimeError, match="must be on one device"):
            op(*args, 16, True)
        with pytest.raises(RuntimeError, match="must be on one device"):
            bwd(torch.tensor(1.5, device="cuda"), ms, *args, 16, True)


# Image layouts and alignments for both implementations (the CUDA kernel gathers the target in
# 16-byte vectors only for a unit x stride, whole-vector strides and an aligned base; else
# scalar reads): each view goes through the same oracle as the contiguous image.
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("imgs_dtype,pred_dtype", [(f32, f32), (f16, f16), (bf16, f32)])
@pytest.mark.parametrize("C,p", [(3, 16), (1, 16), (3, 8), (3, 14)])
@pytest.mark.parametrize("norm", [False, True])
def test_image_layouts_and_alignment(device, imgs_dtype, pred_dtype, C, p, norm):
    N, h, w = 2, 3, 4
    H, W, L = h * p, w * p, h * w
    big = torch.randn(N + 1, C, H + 2, W + 9, device=device).to(imgs_dtype)
    flat = torch.randn(N * C * H * W + 1, device=device).to(imgs_dtype)
    views = {
        "offset by one element": flat[1:].view(N, C, H, W),
        "crop": big[1:, :, 2:2 + H, 1:1 + W],
        "channels_last": big[:N, :, :H, :W].contiguous(memory_format=torch.channels_last),
    }
    pred = torch.randn(N, L, p * p * C, device=device).to(pred_dtype)
    mask = _mae_mask(N, L, 0.25, device)
    for imgs in views.values():
        if device == "cpu":
            _check(imgs, pred, mask, p, norm)
        else:
            _check_cuda(imgs, pred, mask, p, norm)
