"""The pretraining augmentation on uint8 images: RandomResizedCrop (bicubic) + horizontal flip.

The official recipe (``main_pretrain.py``) is::

    transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=3),  # 3 = PIL bicubic
    transforms.RandomHorizontalFlip(),
    transforms.ToTensor(),
    transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])

Here the same crop distribution is drawn (:func:`crop_params` is torchvision's
``RandomResizedCrop.get_params`` algorithm, step for step), but from a generator that is a pure
function of ``(seed, epoch, index)`` (:func:`sample_rng`), so any worker of any process draws the
same crop and flip for the same sample: the global RNGs are never touched, which is what makes
exact resume possible. The crop is resized in uint8 with torch's antialiased bicubic
interpolation (``antialias=True`` uses PIL's kernel, a = -0.5, and PIL's fixed-point rounding),
and ToTensor + Normalize run later on the device (:func:`fastmae.data.to_device`).

Use in your own loop::

    rng = sample_rng(seed=0, epoch=3, index=17)
    top, left, h, w = crop_params(height, width, (0.2, 1.0), (3 / 4, 4 / 3), rng)
    flip = rng.random() < 0.5
    out = resized_crop(img_uint8_chw, (top, left, h, w), 224, flip)
"""

from __future__ import annotations

import math
import random

import torch

__all__ = ["sample_rng", "crop_params", "resized_crop"]

_MASK64 = (1 << 64) - 1


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """A Mersenne-Twister generator seeded by ``(seed, epoch, index)`` and nothing else.

    The three integers are packed into one seed, 64 bits each (taken modulo 2**64), so distinct
    triples in that range give distinct streams. ``random.Random`` is the same on every platform
    and process for the same integer seed, and creating one costs ~5 us.
    """
    key = ((int(seed) & _MASK64) << 128) | ((int(epoch) & _MASK64) << 64) | (int(index) & _MASK64)
    return random.Random(key)


def crop_params(height: int, width: int, scale, ratio, rng: random.Random) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random crop: torchvision's ``RandomResizedCrop.get_params``
    algorithm (10 tries of an area fraction uniform in ``scale`` and a log-uniform aspect ratio
    in ``ratio``, else the central crop clamped to ``ratio``), driven by ``rng``."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randrange(0, height - h + 1)
            left = rng.randrange(0, width - w + 1)
            return top, left, h, w
    # fallback: the central crop
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(img: torch.Tensor, box, size: int, flip: bool = False) -> torch.Tensor:
    """Crop ``box = (top, left, h, w)`` of a uint8 ``(3, H, W)`` image, resize it to
    ``(3, size, size)`` (bicubic, antialiased as PIL does) and flip it horizontally if ``flip``.

    Fastest when ``img`` is a channels-last view (HWC memory, as decoders return): torch's
    vectorised uint8 resampling then reads it in place. Returns a contiguous uint8 tensor.
    """
    top, left, h, w = box
    crop = img[:, top : top + h, left : left + w].unsqueeze(0)
    if h == size and w == size:
        out = crop.contiguous()
    else:
        out = torch.nn.functional.interpolate(crop, size=(size, size), mode="bicubic", antialias=True,
                                              align_corners=False)  # fmt: skip
    out = out[0]
    if flip:
        out = out.flip(-1)
    return out.contiguous()
