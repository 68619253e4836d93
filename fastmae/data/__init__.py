"""fastmae's pretraining data pipeline: decode crop-aware, augment in uint8, normalise on the device.

The official ``main_pretrain.py`` decodes with PIL and runs RandomResizedCrop, ToTensor and
Normalize on the CPU, then ships float32 batches. Here each worker reads the JPEG header,
draws the crop first, decodes only the crop (``fastmae._jpeg``, libjpeg-turbo's crop/skip API, at a
DCT-reduced scale when the crop allows it; torchvision's decoder when that extension is not
built), resizes in uint8, and batches stay uint8 up
to the device, where one kernel normalises them. The crops have the official distribution.
A crop decoded at full scale equals the official tensor up to interpolation rounding; a crop
of at least twice the output size on each side is decoded at a DCT-reduced scale ``s`` with
its edges moved to that scale's grid (at most ``s/2`` source pixels each), which departs
further from the official pixels (:mod:`fastmae.data.decode`, step 1; ``crop_aware = False``
on the dataset decodes every image whole).

In your own loop::

    import torch
    from fastmae import data

    ds = data.PretrainDataset(data.find_train_root("/data/imagenet"), 224, seed=0)
    # or data.PretrainDataset(data.embedded_images(), 64): photos shipped in installed wheels
    sampler = torch.utils.data.DistributedSampler(ds)  # under torchrun; else leave it out
    loader = data.make_loader(ds, 256, sampler=sampler, num_workers=10)
    for epoch in range(epochs):
        ds.set_epoch(epoch)         # the augmentation of (seed, epoch, i) is the same in any worker
        sampler.set_epoch(epoch)
        for images, labels in loader:                 # uint8 (256, 3, 224, 224), pinned
            x = data.to_device(images, "cuda", dtype=torch.bfloat16)  # normalised on the GPU
            loss, _, _ = model(x, mask_ratio=0.75)

torchvision and Pillow are imported on first use (``import fastmae`` needs neither).
"""

from __future__ import annotations

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _require() -> None:
    """A clear ImportError now if torchvision or Pillow is missing (found, not imported: they are
    imported on first decode)."""
    import importlib.util

    missing = [m for m in ("torchvision", "PIL") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"fastmae.data needs torchvision and Pillow; not installed: {', '.join(missing)}. "
                          "Install them with `pip install torchvision pillow` (the torchvision build matching torch).")


_require()

from .dataset import IMG_EXTENSIONS, PretrainDataset, embedded_images, find_train_root  # noqa: E402
from .loader import EpochIndexSampler, collate, make_loader, to_device  # noqa: E402
from .transforms import crop_params, resized_crop, sample_rng  # noqa: E402

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
    "PretrainDataset",
    "embedded_images",
    "find_train_root",
    "make_loader",
    "collate",
    "to_device",
    "EpochIndexSampler",
    "crop_params",
    "resized_crop",
    "sample_rng",
]
