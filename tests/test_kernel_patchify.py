"""Triton patchify / unpatchify (fastmae.kernels.patchify) against fastmae.reference.

Pure data movement: every comparison is exact (torch.equal), gradients included (the
gradient of a permutation is the inverse permutation, with at most an exact dtype cast).
"""

import pytest
import torch

from fastmae import reference as ref

pytest.importorskip("triton")
from fastmae.kernels import patchify as K  # noqa: E402

# (N, C, H, W, p): L = 1 (image = one patch), 49, 196, 256, a rectangular grid (2 x 6),
# P = 768 (ViT-B patch, not a power of two, several blocks per patch row), p = 1.
SHAPES = [
    (3, 1, 2, 2, 2),
    (3, 3, 14, 14, 2),
    (1, 3, 28, 28, 2),
    (1, 1, 32, 32, 2),
    (3, 3, 8, 24, 4),
    (2, 3, 32, 48, 16),
    (2, 2, 10, 6, 1),
]
# bf16 is fine on CPU here: the kernels only load and store, no tl.dot.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _imgs(N, C, H, W, dtype, device):
    return torch.randn(N, C, H, W, device=device).to(dtype)


def _grid(H, W, p):
    return (H // p, W // p)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,C,H,W,p", SHAPES)
def test_patchify_matches_reference(kernel_device, N, C, H, W, p, dtype):
    imgs = _imgs(N, C, H, W, dtype, kernel_device)
    out = K.patchify(imgs, p)
    assert out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, ref.patchify(imgs, p))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,C,H,W,p", SHAPES)
def test_unpatchify_matches_reference_and_round_trips(kernel_device, N, C, H, W, p, dtype):
    h, w = _grid(H, W, p)
    x = torch.randn(N, h * w, p * p * C, device=kernel_device).to(dtype)
    grid = None if h == w else (h, w)  # the default square grid where it applies
    out = K.unpatchify(x, p, grid)
    assert out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, ref.unpatchify(x, p, (h, w)))
    assert torch.equal(K.patchify(out, p), x)
    imgs = _imgs(N, C, H, W, dtype, kernel_device)
    assert torch.equal(K.unpatchify(K.patchify(imgs, p), p, (h, w)), imgs)


def test_patchify_non_contiguous(kernel_device):
    p = 2
    base = _imgs(3, 3, 12, 20, torch.float32, kernel_device)
    views = [
        base.to(memory_format=torch.channels_last),
        base[:, :, 2:10, ::2],  # a crop and a strided width
        base[:, 1:2],  # one channel of three
        base[1:2].expand(4, -1, -1, -1),  # batch stride 0
        base.transpose(2, 3),  # H and W swapped: stride_w > stride_h
    ]
    for imgs in views:
        assert not imgs.is_contiguous()
        assert torch.equal(K.patchify(imgs, p), ref.patchify(imgs, p))


def test_unpatchify_non_contiguous(kernel_device):
    p, h, w, C, N = 2, 3, 5, 3, 2
    D = p * p * C
    views = [
        torch.randn(h * w, N, D, device=kernel_device).transpose(0, 1),  # (L, N, D) storage
        torch.randn(N, h * w, 2 * D, device=kernel_device)[:, :, ::2],  # strided features
        torch.randn(N, D, h * w, device=kernel_device).transpose(1, 2),  # feature-major
    ]
    for x in views:
        assert not x.is_contiguous()
        assert torch.equal(K.unpatchify(x, p, (h, w)), ref.unpatchify(x, p, (h, w)))


def test_many_blocks_and_tails(kernel_device, monkeypatch):
    # A 16-element block makes every patch row span several programs, the last one partial:
    # patchify's run is w*D = 5*12 = 60 elements, unpatchify's stripe C*p*W = 3*2*10 = 60.
    monkeypatch.setattr(K, "_BLOCK", 16)
    N, C, H, W, p = 2, 3, 6, 10, 2
    imgs = _imgs(N, C, H, W, torch.float32, kernel_device)
    tokens = K.patchify(imgs, p)
    assert torch.equal(tokens, ref.patchify(imgs, p))
    x = torch.randn_like(tokens)
    assert torch.equal(K.unpatchify(x, p, (3, 5)), ref.unpatchify(x, p, (3, 5)))


# Casts the interpreter performs exactly as a GPU (round to nearest even). It truncates
# float32 -> bfloat16 instead, so casts *to* bf16 are tested on a GPU only (below).
CASTS = [
    (torch.float32, torch.float16),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.float16),
    (torch.float32, torch.float32),
]


@pytest.mark.parametrize("src,dst", CASTS)
def test_out_dtype(kernel_device, src, dst):
    N, C, H, W, p = 2, 3, 8, 12, 2
    # Scaled so fp32 -> fp16 rounds nearly every value (and stays in fp16 range).
    imgs = (torch.randn(N, C, H, W, device=kernel_device) * 100).to(src)
    out = K.patchify(imgs, p, out_dtype=dst)
    assert out.dtype == dst
    assert torch.equal(out, ref.patchify(imgs, p).to(dst))
    x = (torch.randn(N, 24, p * p * C, device=kernel_device) * 100).to(src)
    back = K.unpatchify(x, p, (4, 6), out_dtype=dst)
    assert back.dtype == dst
    assert torch.equal(back, ref.unpatchify(x, p, (4, 6)).to(dst))


@pytest.mark.parametrize("out_dtype", [None, torch.float16])
@pytest.mark.parametrize("N,C,H,W,p", [(3, 3, 8, 24, 4), (1, 1, 2, 2, 2)])
def test_grads_match_reference(kernel_device, N, C, H, W, p, out_dtype):
    imgs = _imgs(N, C, H, W, torch.float32, kernel_device).requires_grad_(True)
    imgs_ref = imgs.detach().clone().requires_grad_(True)
    out = K.patchify(imgs, p, out_dtype=out_dtype)
    want = ref.patchify(imgs_ref, p)
    if out_dtype is not None:
        want = want.to(out_dtype)
    g = torch.randn_like(want)
    out.backward(g)
    want.backward(g)
    assert imgs.grad.dtype == torch.float32
    assert torch.equal(imgs.grad, imgs_ref.grad)

    h, w = _grid(H, W, p)
    x = torch.randn(N, h * w, p * p * C, device=kernel_device, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out = K.unpatchify(x, p, (h, w))
    want = ref.unpatchify(x_ref, p, (h, w))
    g = torch.randn_like(want)
    out.backward(g)
    want.backward(g)
    assert torch.equal(x.grad, x_ref.grad)


def test_opcheck(kernel_device):
    imgs = _imgs(2, 3, 4, 6, torch.float32, kernel_device).requires_grad_(True)
    x = torch.randn(2, 6, 12, device=kernel_device, requires_grad=True)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    for out_dtype in (None, torch.float16):
        torch.library.opcheck(torch.ops.fastmae.patchify.default, (imgs, 2, out_dtype), test_utils=tests)
        torch.library.opcheck(torch.ops.fastmae.unpatchify.default, (x, 2, 2, 3, out_dtype), test_utils=tests)


def test_torch_compile_fullgraph(kernel_device):
    p = 2

    def f(imgs):
        tokens = K.patchify(imgs, p, out_dtype=torch.float16)
        return K.unpatchify(tokens * 2, p, (3, 4), out_dtype=torch.float32)

    compiled = torch.compile(f, fullgraph=True)
    imgs = _imgs(2, 3, 6, 8, torch.float32, kernel_device).requires_grad_(True)
    imgs_ref = imgs.detach().clone().requires_grad_(True)
    out = compiled(imgs)
    want = ref.unpatchify(ref.patchify(imgs_ref, p).to(torch.float16) * 2, p, (3, 4)).float()
    assert torch.equal(out, want)
    g = torch.randn_like(want)
    out.backward(g)
    want.backward(g)
    assert torch.equal(imgs.grad, imgs_ref.grad)


def test_torch_compile_dynamic_shapes(kernel_device):
    # Symbolic L and H: unpatchify's default square grid must be derived without a graph break.
    f = torch.compile(lambda x: K.unpatchify(x, 2) + 1, fullgraph=True, dynamic=True)
    g = torch.compile(lambda imgs: K.patchify(imgs, 2) + 1, fullgraph=True, dynamic=True)
    for side in (4, 5):
        x = torch.randn(2, side * side, 12, device=kernel_device)
        assert torch.equal(f(x), ref.unpatchify(x, 2) + 1)
        imgs = torch.randn(2, 3, 2 * side, 6, device=kernel_device)
        assert torch.equal(g(imgs), ref.patchify(imgs, 2) + 1)


def test_cpu_fallbacks_are_the_reference():
    # The functions registered for CPU tensors outside the interpreter; they must return
    # fresh tensors (an op may not alias its input), also for p = 1 where the reference is a view.
    imgs = torch.randn(2, 3, 4, 6)
    for p in (1, 2):
        out = K._patchify_cpu(imgs, p, None)
        assert torch.equal(out, ref.patchify(imgs, p))
        assert out.untyped_storage().data_ptr() != imgs.untyped_storage().data_ptr()
        back = K._unpatchify_cpu(out, p, 4 // p, 6 // p, torch.float16)
        assert torch.equal(back, imgs.half())


# ----------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("src", [torch.float32, torch.float16])
def test_out_dtype_bf16_gpu(src):
    imgs = (torch.randn(4, 3, 224, 224, device="cuda") * 100).to(src)
    out = K.patchify(imgs, 16, out_dtype=torch.bfloat16)
    assert torch.equal(out, ref.patchify(imgs, 16).to(torch.bfloat16))
    x = (torch.randn(4, 196, 768, device="cuda") * 100).to(src)
    assert torch.equal(K.unpatchify(x, 16, out_dtype=torch.bfloat16), ref.unpatchify(x, 16).to(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p,size", [(16, 224), (14, 224), (8, (96, 160))])
def test_vit_shapes_gpu(dtype, p, size):
    H, W = (size, size) if isinstance(size, int) else size
    imgs = torch.randn(8, 3, H, W, device="cuda").to(dtype)
    tokens = K.patchify(imgs, p)
    assert torch.equal(tokens, ref.patchify(imgs, p))
    assert torch.equal(K.patchify(imgs.to(memory_format=torch.channels_last), p), tokens)
    grid = (H // p, W // p)
    assert torch.equal(K.unpatchify(tokens, p, grid), imgs)
    x = torch.randn_like(tokens)
    assert torch.equal(K.unpatchify(x, p, grid), ref.unpatchify(x, p, grid))
