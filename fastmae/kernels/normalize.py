"""Image normalisation on the device: uint8 (B, C, H, W) -> ``(x / 255 - mean[c]) / std[c]``.

This is torchvision's ``ToTensor`` + ``Normalize`` (which the official pipeline runs on the
CPU), moved to the GPU so that batches cross PCIe as uint8, 4x fewer bytes than float32.
It is a pure streaming op: one byte read and one float written per element.

Algorithm: program ``(pid_plane, pid_block)`` owns ``BLOCK`` consecutive pixels of image
plane ``pid_plane = b * C + c``. It picks the channel's mean and std from the scalar
arguments (up to 4 channels; passed by value, so no host-to-device copy of them per call),
loads the pixels through the input's strides (any layout: NCHW, channels-last, a crop
view), converts them to float32 and computes, with IEEE round-to-nearest division as the
CPU's ``ToTensor`` (``x.float().div(255)``) and ``Normalize`` (``sub_(mean).div_(std)``) do::

    y = div_rn(div_rn(x, 255) - mean[c], std[c])

then rounds to the output dtype and stores into a contiguous (B, C, H, W) tensor. The result
is bitwise the reference's (:func:`fastmae.reference.normalize_images`) in every output
dtype: the same three correctly rounded float32 operations, then one rounding. (A multiply
by ``1/255`` or by ``1/std`` would be faster by a hair and differ in the last bit; the op is
memory-bound, so it keeps the exact form.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmae import reference
from fastmae._library import empty, kernel_op, launch, register_cpu_fallback

__all__ = ["normalize_images"]

# Pixels of one plane per program (a power of two); tests lower it to exercise many blocks.
_BLOCK = 1024


@triton.jit
def _normalize_images_kernel(
    x_ptr,
    out_ptr,
    C,
    H,
    W,
    stride_b,
    stride_c,
    stride_h,
    stride_w,
    m0,
    m1,
    m2,
    m3,
    s0,
    s1,
    s2,
    s3,
    BLOCK: tl.constexpr,
):
    """``out[b, c] = (x[b, c] / 255 - m_c) / s_c`` for BLOCK pixels of plane ``b*C + c``.

    Args:
        x_ptr: uint8 images (B, C, H, W), any strides.
        out_ptr: output (B, C, H, W), contiguous, float dtype.
        C, H, W: channels, height, width.
        stride_b, stride_c, stride_h, stride_w: strides of x, in elements.
        m0..m3, s0..s3: float32 mean and std of channels 0..3 (those >= C unused).
        BLOCK: pixels per program.
    Grid: (B * C, cdiv(H * W, BLOCK)).
    """
    plane = tl.program_id(0)
    pid = tl.program_id(1)
    b = plane // C
    c = plane % C
    mean = tl.where(c == 0, m0, tl.where(c == 1, m1, tl.where(c == 2, m2, m3)))
    std = tl.where(c == 0, s0, tl.where(c == 1, s1, tl.where(c == 2, s2, s3)))
    hw = pid * BLOCK + tl.arange(0, BLOCK)
    valid = hw < H * W
    h = hw // W
    w = hw % W
    src = b.to(tl.int64) * stride_b + c.to(tl.int64) * stride_c + h.to(tl.int64) * stride_h + w * stride_w
    x = tl.load(x_ptr + src, mask=valid, other=0).to(tl.float32)
    y = tl.div_rn(tl.div_rn(x, 255.0) - mean, std)
    dst = plane.to(tl.int64) * H * W + hw
    tl.store(out_ptr + dst, y.to(out_ptr.dtype.element_ty), mask=valid)


@kernel_op("fastmae::normalize_images")
def _normalize_images_op(imgs: torch.Tensor, mean: list[float], std: list[float], out_dtype: torch.dtype) -> torch.Tensor:
    B, C, H, W = imgs.shape
    out = empty((B, C, H, W), out_dtype, imgs.device)
    if out.numel() == 0:
        return out
    if triton.cdiv(H * W, _BLOCK) > 65535:  # CUDA's limit on grid dimension 1
        raise ValueError(f"imgs planes of {H}x{W} pixels are above the Triton kernel's {65535 * _BLOCK} pixel limit")
    m = [float(v) for v in mean] + [0.0] * (4 - C)
    s = [float(v) for v in std] + [1.0] * (4 - C)
    launch(_normalize_images_kernel)[(B * C, triton.cdiv(H * W, _BLOCK))](
        imgs, out, C, H, W, *imgs.stride(), *m, *s, BLOCK=_BLOCK, num_warps=4
    )
    return out


@_normalize_images_op.register_fake
def _(imgs, mean, std, out_dtype):
    return imgs.new_empty(imgs.shape, dtype=out_dtype)


# CPU tensors outside the interpreter run the reference.
register_cpu_fallback(_normalize_images_op, reference.normalize_images)


def normalize_images(imgs: torch.Tensor, mean, std, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(imgs / 255 - mean) / std`` of uint8 (B, C, H, W) images, C <= 4, contiguous ``out_dtype``
    (see :func:`fastmae.reference.normalize_images`; arguments are checked in :mod:`fastmae.ops`)."""
    return torch.ops.fastmae.normalize_images(imgs, [float(v) for v in mean], [float(v) for v in std], out_dtype)
