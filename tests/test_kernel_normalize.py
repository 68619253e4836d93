"""Triton image normalisation (fastmae.kernels.normalize) against fastmae.reference.normalize_images.

Oracle: bitwise equality. Kernel and reference compute the same three correctly rounded
float32 operations (``x / 255``, ``- mean``, ``/ std``; IEEE division in both), then one
rounding to the output dtype, so every output dtype must match exactly. The reference itself
is checked bitwise against torchvision's ToTensor + Normalize (the official CPU pipeline).

One exception, a property of Triton's CPU interpreter and not of the kernel: the interpreter
converts float32 to bfloat16 by truncation (round toward zero), where the GPU rounds to
nearest even. On the CPU the bfloat16 output is therefore checked to be exactly the reference's
float32 result truncated (so the float32 values feeding the conversion are still bitwise
right); the exact round-to-nearest comparison runs on a GPU (marked ``gpu``).
"""

import pytest
import torch

from fastmae import ops
from fastmae import reference as ref

pytest.importorskip("triton")
from conftest import INTERPRET  # noqa: E402

from fastmae.kernels import normalize as K  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# (B, C, H, W): one block, a ragged last block, 1 and 4 channels, a tall thin plane.
SHAPES = [(2, 3, 8, 8), (1, 3, 13, 29), (3, 1, 5, 7), (2, 4, 6, 10), (1, 3, 70, 3)]


def _u8(shape, device):
    # the full 0..255 range, fresh each run (conftest seeds randomly)
    return torch.randint(0, 256, shape, dtype=torch.uint8, device=device)


def _stats(C):
    mean = tuple(torch.rand(C).tolist())
    std = tuple((torch.rand(C) * 0.5 + 0.05).tolist())
    return mean, std


def _truncate_to_bf16(x32: torch.Tensor) -> torch.Tensor:
    return (x32.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    # 32-pixel blocks: many programs per plane, ragged last blocks, in every test.
    monkeypatch.setattr(K, "_BLOCK", 32)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.float64, torch.bfloat16])
def test_matches_reference(kernel_device, shape, out_dtype):
    x = _u8(shape, kernel_device)
    mean, std = _stats(shape[1])
    got = ops.normalize_images(x, mean, std, out_dtype=out_dtype, backend="triton")
    assert got.dtype == out_dtype and got.shape == x.shape and got.is_contiguous()
    assert not got.isnan().any()  # outputs start poisoned: every element was written
    if out_dtype is torch.bfloat16 and INTERPRET:
        want = _truncate_to_bf16(ref.normalize_images(x, mean, std, torch.float32))
    else:
        want = ref.normalize_images(x, mean, std, out_dtype)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.gpu
def test_bf16_rounds_to_nearest_on_gpu():
    x = _u8((4, 3, 64, 64), "cuda")
    got = ops.normalize_images(x, MEAN, STD, out_dtype=torch.bfloat16, backend="triton")
    torch.testing.assert_close(got, ref.normalize_images(x, MEAN, STD, torch.bfloat16), rtol=0, atol=0)


def test_every_byte_value(kernel_device):
    # all 256 values in every channel: the division by 255 is exact for each
    x = torch.arange(256, dtype=torch.uint8, device=kernel_device).view(1, 1, 16, 16).expand(2, 3, 16, 16)
    got = ops.normalize_images(x.contiguous(), MEAN, STD, backend="triton")
    torch.testing.assert_close(got, ref.normalize_images(x, MEAN, STD), rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["channels_last", "crop_view", "transposed", "expanded"])
def test_any_strides(kernel_device, layout):
    base = _u8((2, 3, 20, 24), kernel_device)
    if layout == "channels_last":
        x = base.to(memory_format=torch.channels_last)
    elif layout == "crop_view":
        x = base[:, :, 3:17, 5:21]
    elif layout == "transposed":
        x = base.transpose(2, 3)
    else:
        x = base[:1].expand(3, 3, 20, 24)
    got = ops.normalize_images(x, MEAN, STD, backend="triton")
    assert got.is_contiguous()
    torch.testing.assert_close(got, ref.normalize_images(x.contiguous(), MEAN, STD), rtol=0, atol=0)


def test_reference_is_torchvision_to_tensor_normalize():
    transforms = pytest.importorskip("torchvision.transforms")
    x = _u8((2, 3, 9, 11), "cpu")
    mean, std = _stats(3)
    official = torch.stack([transforms.Normalize(mean, std)(transforms.ToTensor()(img.permute(1, 2, 0).numpy()))
                            for img in x])  # fmt: skip
    torch.testing.assert_close(ref.normalize_images(x, mean, std), official, rtol=0, atol=0)


def test_empty_batch(kernel_device):
    x = torch.empty((0, 3, 4, 4), dtype=torch.uint8, device=kernel_device)
    assert ops.normalize_images(x, backend="triton").shape == (0, 3, 4, 4)


def test_fake_and_opcheck(kernel_device):
    x = _u8((2, 3, 5, 6), kernel_device)
    torch.library.opcheck(torch.ops.fastmae.normalize_images, (x, list(MEAN), list(STD), torch.float32),
                          test_utils=("test_schema", "test_faketensor"))  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"imgs": torch.zeros(2, 3, 4, 4)}, TypeError, "uint8"),
        ({"imgs": torch.zeros(3, 4, 4, dtype=torch.uint8)}, ValueError, "4 dimensions"),
        ({"imgs": torch.zeros(1, 5, 4, 4, dtype=torch.uint8)}, ValueError, "1 to 4 channels"),
        ({"mean": (0.5, 0.5)}, ValueError, "mean"),
        ({"std": (0.2, 0.0, 0.2)}, ValueError, "std must be positive"),
        ({"std": (0.2, float("nan"), 0.2)}, ValueError, "finite"),
        ({"mean": torch.tensor([0.5, 0.5, 0.5])}, ValueError, "mean"),
        ({"out_dtype": torch.int32}, ValueError, "out_dtype"),
    ],
)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_arguments(kwargs, exc, match, backend):
    args = {"imgs": torch.zeros(1, 3, 4, 4, dtype=torch.uint8), "mean": MEAN, "std": STD, "out_dtype": torch.float32}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        ops.normalize_images(args["imgs"], args["mean"], args["std"], out_dtype=args["out_dtype"], backend=backend)


def test_auto_on_cpu_is_the_reference():
    x = _u8((1, 3, 4, 4), "cpu")
    torch.testing.assert_close(ops.normalize_images(x, MEAN, STD), ref.normalize_images(x, MEAN, STD), rtol=0, atol=0)
