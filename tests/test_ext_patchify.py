"""The compiled extension's patchify / unpatchify (fastmae.ext.patchify, backend="ext") against fastmae.reference.

CPU tests run the C++ twins (csrc/ops/cpu/patchify_kernel.cpp); the GPU-marked ones the CUDA
kernels (csrc/ops/cuda/patchify_kernel.cu). Pure data movement: every comparison is exact
(torch.equal), gradients and casts included. Outputs are poisoned (NaN) by conftest, so an
element a kernel does not write fails.

The module skips (with the loader's reason) when fastmae._C is not built; under
``FASTMAE_EXT_REQUIRED=1`` (``make test``) that is a failure instead.
"""

import pytest
import torch
from _ext import require_ext

from fastmae import ext, ops
from fastmae import reference as ref

require_ext()

from fastmae.ext import patchify as E  # noqa: E402

# (N, C, H, W, p): one patch an image, L = 49, 196, a rectangular grid, P = 768 (ViT-B), p = 1, C = 4
SHAPES = [
    (3, 1, 2, 2, 2),
    (3, 3, 14, 14, 2),
    (1, 3, 28, 28, 2),
    (3, 3, 8, 24, 4),
    (2, 3, 32, 48, 16),
    (2, 2, 10, 6, 1),
    (2, 4, 12, 12, 3),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _imgs(N, C, H, W, dtype, device="cpu"):
    return (torch.randn(N, C, H, W, device=device) * 3).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,C,H,W,p", SHAPES)
def test_patchify_and_unpatchify_match_reference(N, C, H, W, p, dtype):
    imgs = _imgs(N, C, H, W, dtype)
    out = E.patchify(imgs, p)
    assert out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, ref.patchify(imgs, p))
    h, w = H // p, W // p
    x = torch.randn(N, h * w, p * p * C).to(dtype)
    back = E.unpatchify(x, p, None if h == w else (h, w))
    assert back.dtype == dtype and back.is_contiguous()
    assert torch.equal(back, ref.unpatchify(x, p, (h, w)))
    assert torch.equal(E.unpatchify(out, p, (h, w)), imgs)


def test_any_input_layout():
    imgs = _imgs(2, 3, 32, 48, torch.float32)
    for view in (imgs.to(memory_format=torch.channels_last), imgs[:, :, ::2, ::3], imgs.transpose(2, 3),
                 imgs[:, 1:]):
        assert torch.equal(E.patchify(view, 8), ref.patchify(view, 8))
    x = torch.randn(2, 64, 48)
    for view in (x.transpose(0, 1).contiguous().transpose(0, 1), x.unsqueeze(-1).expand(-1, -1, -1, 2)[..., 0]):
        assert torch.equal(E.unpatchify(view, 4, (8, 8)), ref.unpatchify(view, 4, (8, 8)))
    t = torch.randn(2, 64, 96)[:, :, ::2]  # a strided last dim
    assert torch.equal(E.unpatchify(t, 4, (8, 8)), ref.unpatchify(t, 4, (8, 8)))


@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_casts_on_the_way(in_dtype, out_dtype):
    imgs = _imgs(2, 3, 16, 16, in_dtype)
    assert torch.equal(E.patchify(imgs, 4, out_dtype=out_dtype), ref.patchify(imgs, 4).to(out_dtype))
    x = torch.randn(2, 16, 48).to(in_dtype)
    assert torch.equal(E.unpatchify(x, 4, out_dtype=out_dtype), ref.unpatchify(x, 4).to(out_dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_are_the_inverse_permutation(dtype):
    imgs = _imgs(2, 3, 16, 24, dtype).requires_grad_()
    g = torch.randn(2, 24, 48).to(dtype)
    (gi,) = torch.autograd.grad(E.patchify(imgs, 4), imgs, g)
    (gr,) = torch.autograd.grad(ref.patchify(imgs, 4), imgs, g)
    assert gi.dtype == dtype and torch.equal(gi, gr)
    x = torch.randn(2, 24, 48).to(dtype).requires_grad_()
    gimg = torch.randn(2, 3, 16, 24).to(dtype)
    (gx,) = torch.autograd.grad(E.unpatchify(x, 4, (4, 6)), x, gimg)
    (gxr,) = torch.autograd.grad(ref.unpatchify(x, 4, (4, 6)), x, gimg)
    assert torch.equal(gx, gxr)
    # a cast on the way: the gradient comes back in the input's dtype
    imgs32 = _imgs(1, 3, 8, 8, torch.float32).requires_grad_()
    out = E.patchify(imgs32, 4, out_dtype=torch.bfloat16)
    (g32,) = torch.autograd.grad(out, imgs32, torch.ones_like(out))
    assert g32.dtype == torch.float32 and torch.equal(g32, torch.ones_like(imgs32))


def test_opcheck():
    imgs = _imgs(2, 3, 8, 12, torch.float32).requires_grad_()
    torch.library.opcheck(torch.ops.fastmae_ext.patchify, (imgs, 4, None))
    torch.library.opcheck(torch.ops.fastmae_ext.patchify, (imgs, 2, torch.float16))
    x = torch.randn(2, 6, 48, requires_grad=True)
    torch.library.opcheck(torch.ops.fastmae_ext.unpatchify, (x, 4, 2, 3, None))


def test_ops_dispatch_and_compile():
    imgs = _imgs(2, 3, 16, 16, torch.float32)
    assert torch.equal(ops.patchify(imgs, 4, backend="ext"), ref.patchify(imgs, 4))
    x = ops.patchify(imgs, 4, backend="ext")
    assert torch.equal(ops.unpatchify(x, 4, backend="ext"), imgs)
    f = torch.compile(lambda t: E.unpatchify(E.patchify(t, 4) * 2, 4), fullgraph=True, backend="eager")
    assert torch.equal(f(imgs), imgs * 2)


def test_cuda_kernels_are_registered():
    # built with nvcc (as make test does with the CUDA torch): the CUDA kernels are in the module
    if not ext.has_cuda_kernels():
        pytest.skip("fastmae._C was built without its CUDA kernels")
    for op in ("fastmae_ext::patchify", "fastmae_ext::unpatchify"):
        for key in ("CPU", "CUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op, key), (op, key)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,C,H,W,p", SHAPES + [(8, 3, 224, 224, 16)])
def test_cuda_matches_reference(N, C, H, W, p, dtype, device="cuda"):
    imgs = _imgs(N, C, H, W, dtype, device)
    assert torch.equal(E.patchify(imgs, p), ref.patchify(imgs, p))
    assert torch.equal(E.patchify(imgs.to(memory_format=torch.channels_last), p), ref.patchify(imgs, p))
    for out_dtype in DTYPES:
        assert torch.equal(E.patchify(imgs, p, out_dtype=out_dtype), ref.patchify(imgs, p).to(out_dtype))
    h, w = H // p, W // p
    x = torch.randn(N, h * w, p * p * C, device=device).to(dtype)
    assert torch.equal(E.unpatchify(x, p, (h, w)), ref.unpatchify(x, p, (h, w)))
    assert torch.equal(E.unpatchify(x[:, :, :], p, (h, w), out_dtype=torch.float32),
                       ref.unpatchify(x, p, (h, w)).float())


# The raw ops' out_dtype: one the kernels do not compute (integers, bool, float8) is the same
# clear error on both devices (the CUDA kernels cast to it before).
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_raw_ops_take_a_float_out_dtype_only(device):
    imgs = torch.randn(1, 3, 8, 8, device=device)
    x = torch.randn(1, 4, 48, device=device)
    for dt in (torch.int32, torch.uint8, torch.bool, torch.float8_e4m3fn):
        with pytest.raises(RuntimeError, match="out_dtype must be float32, float64, float16 or bfloat16, got"):
            torch.ops.fastmae_ext.patchify(imgs, 4, dt)
        with pytest.raises(RuntimeError, match="out_dtype must be float32, float64, float16 or bfloat16, got"):
            torch.ops.fastmae_ext.unpatchify(x, 4, 2, 2, dt)


# Both builds of the C++ twin's task loops, AVX2 and baseline: the cpu_isa fixture (conftest.py).
CPU_BUILDS = ("avx2", "baseline")


# The C++ twin's fast path (fp32, C = 3, unit x / d stride: AVX2 (de)interleave of 8 pixels,
# then SSE of 4, then a scalar tail, p = 16 as a compile-time constant) in both builds, against
# the reference: patch sizes with every tail (p % 8 in 1..7, with and without a 4-pixel step),
# ViT-B's shape, non-finite values moved bit for bit, and views that keep a unit last stride but
# not the others (an image crop, tokens of a sliced batch).
@pytest.mark.parametrize("p", [4, 5, 6, 7, 8, 11, 12, 16, 20])
def test_fast_path_patch_sizes_and_views(cpu_isa, p):
    N, C, h, w = 2, 3, 3, 5
    imgs = _imgs(N, C, h * p, w * p, torch.float32)
    imgs[0, 1, 0, :3] = float("nan")
    imgs[1, 2, -1, -2:] = float("inf")
    out = E.patchify(imgs, p)
    assert torch.equal(out.view(torch.int32), ref.patchify(imgs, p).view(torch.int32))
    assert torch.equal(E.unpatchify(out, p, (h, w)).view(torch.int32), imgs.view(torch.int32))
    big = _imgs(N + 1, C, h * p + 3, w * p + 5, torch.float32)
    crop = big[1:, :, 2:2 + h * p, 1:1 + w * p]
    assert torch.equal(E.patchify(crop, p), ref.patchify(crop, p))
    x = torch.randn(2 * N, h * w, p * p * C)[::2]
    assert torch.equal(E.unpatchify(x, p, (h, w)), ref.unpatchify(x, p, (h, w)))


def test_fast_path_vit_b(cpu_isa):
    imgs = _imgs(2, 3, 224, 224, torch.float32)
    out = E.patchify(imgs, 16)
    assert torch.equal(out, ref.patchify(imgs, 16))
    assert torch.equal(E.unpatchify(out, 16), imgs)
    x = torch.randn(3, 196, 768)  # fresh tokens, not a patchify output
    assert torch.equal(E.unpatchify(x, 16), ref.unpatchify(x, 16))


# Only fp32 -> fp32 with C = 3 and a unit last stride takes the fast path; in both builds, the
# neighbours that must not (a cast, another C, a strided last dim, fp64) still match exactly.
def test_fast_path_neighbours(cpu_isa):
    imgs = _imgs(2, 3, 24, 40, torch.float32)
    x = torch.randn(2, 15, 192)
    assert torch.equal(E.patchify(imgs, 8, out_dtype=torch.bfloat16), ref.patchify(imgs, 8).to(torch.bfloat16))
    assert torch.equal(E.unpatchify(x, 8, (3, 5), out_dtype=torch.float16),
                       ref.unpatchify(x, 8, (3, 5)).to(torch.float16))
    for t in (imgs[:, :2], imgs.double(), imgs.to(memory_format=torch.channels_last)):
        assert torch.equal(E.patchify(t, 8), ref.patchify(t, 8))
    for t in (torch.randn(2, 15, 256), x.double(), torch.randn(2, 15, 384)[..., ::2]):
        assert torch.equal(E.unpatchify(t, 8, (3, 5)), ref.unpatchify(t, 8, (3, 5)))


# Input layouts and alignments for both implementations (the CUDA kernels take a 16-byte vector
# path only for unit x / d strides, whole-vector strides, aligned bases and p a multiple of the
# vector width, C = 1 or 3; every other case falls back to scalar reads): each view below is
# compared exactly with the reference, so a wrong choice between the paths fails here.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _image_views(N, C, H, W, dtype, device):
    big = _imgs(N + 1, C, H + 2, W + 9, dtype, device)
    flat = _imgs(1, 1, 1, N * C * H * W + 3, dtype, device).flatten()
    return {
        "contiguous": big[:N, :, :H, :W].contiguous(),
        "offset by one element": flat[1:1 + N * C * H * W].view(N, C, H, W),
        "crop": big[1:, :, 2:2 + H, 1:1 + W],
        "channels_last": big[:N, :, :H, :W].contiguous(memory_format=torch.channels_last),
        "x stride 2": _imgs(N, C, H, 2 * W, dtype, device)[..., ::2],
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("C,p", [(1, 4), (1, 8), (1, 16), (3, 8), (3, 14), (3, 16), (2, 8)])
def test_layouts_and_alignment(device, dtype, C, p):
    N, h, w = 2, 3, 4
    for name, imgs in _image_views(N, C, h * p, w * p, dtype, device).items():
        want = ref.patchify(imgs, p)
        assert torch.equal(E.patchify(imgs, p), want), name
        for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
            assert torch.equal(E.patchify(imgs, p, out_dtype=out_dtype), want.to(out_dtype)), (name, out_dtype)
    D = p * p * C
    tokens = (torch.randn(2 * N, h * w, D + 5, device=device) * 3).to(dtype)
    flat = (torch.randn(N * h * w * D + 1, device=device) * 3).to(dtype)
    token_views = {
        "contiguous": tokens[:N, :, :D].contiguous(),
        "offset by one element": flat[1:].view(N, h * w, D),
        "sliced batch": tokens[::2, :, :D],
        "d stride 2": (torch.randn(N, h * w, 2 * D, device=device) * 3).to(dtype)[..., ::2],
        "transposed": tokens[:N, :, :D].transpose(0, 1).contiguous().transpose(0, 1),
    }
    for name, x in token_views.items():
        want = ref.unpatchify(x, p, (h, w))
        assert torch.equal(E.unpatchify(x, p, (h, w)), want), name
        for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
            got = E.unpatchify(x, p, (h, w), out_dtype=out_dtype)
            assert torch.equal(got, want.to(out_dtype)), (name, out_dtype)
