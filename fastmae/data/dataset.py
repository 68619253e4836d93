"""The pretraining dataset: image folders in, augmented uint8 crops out."""

from __future__ import annotations

import math
import numbers
import os
import pathlib
import warnings

import torch

from .decode import decode_crop
from .transforms import crop_params, sample_rng

__all__ = ["IMG_EXTENSIONS", "find_train_root", "embedded_images", "PretrainDataset"]

# torchvision.datasets.folder.IMG_EXTENSIONS (ImageFolder's default filter)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Colour photographs that ship inside installed wheels (scikit-image's data directory,
# matplotlib's sample_data); greyscale and synthetic images of those directories are left out.
_SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                   "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png")  # fmt: skip
_MPL_PHOTOS = ("grace_hopper.jpg",)


def find_train_root(data_path) -> pathlib.Path:
    """``<data_path>/train`` if it is a directory (the official ImageNet layout), else ``data_path``."""
    root = pathlib.Path(data_path)
    return root / "train" if (root / "train").is_dir() else root


def embedded_images() -> list[pathlib.Path]:
    """Real colour photographs shipped inside installed packages (nothing is downloaded):
    scikit-image's data directory (astronaut, chelsea, coffee, rocket, motorcycle, ...) and
    matplotlib's ``sample_data/grace_hopper.jpg``. Raises FileNotFoundError if none is found."""
    found: list[pathlib.Path] = []
    try:
        import skimage

        d = pathlib.Path(skimage.__file__).parent / "data"
        found += [d / n for n in _SKIMAGE_PHOTOS if (d / n).is_file()]
    except ImportError:
        pass
    try:
        import matplotlib

        d = pathlib.Path(matplotlib.get_data_path()) / "sample_data"
        found += [d / n for n in _MPL_PHOTOS if (d / n).is_file()]
    except ImportError:
        pass
    if not found:
        raise FileNotFoundError("no embedded photographs found: install scikit-image (its wheel ships astronaut.png, "
                                "chelsea.png, ...) or matplotlib (sample_data/grace_hopper.jpg), or pass a data path")
    return found


def _is_image(path: pathlib.Path) -> bool:
    # ImageFolder's test (has_file_allowed_extension): the name's end, so a file named ".jpg" counts
    return path.name.lower().endswith(IMG_EXTENSIONS)


def _scan(root) -> tuple[list[tuple[str, int]], list[str]]:
    """(samples, classes) of ``root``: ImageFolder's (sorted class folders, sorted files in
    each, walked recursively, following links) or, without class folders, its images (label 0)."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {str(root)!r} is not a directory")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    samples: list[tuple[str, int]] = []
    if classes:
        empty = []
        for label, name in enumerate(classes):
            n = len(samples)
            for dirpath, _, files in sorted(os.walk(root / name, followlinks=True)):
                for f in sorted(files):
                    p = pathlib.Path(dirpath) / f
                    if _is_image(p):
                        samples.append((str(p), label))
            if len(samples) == n:
                empty.append(name)
        if empty:  # as ImageFolder (allow_empty=False): a class without images would shift no label, but
            # a drop-in reads the tree the official code reads, or says why not
            raise FileNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) in the class folder(s) "
                                    f"{', '.join(empty)} under {str(root)!r} (ImageFolder refuses them too)")
    else:
        samples = [(str(p), 0) for p in sorted(root.iterdir()) if p.is_file() and _is_image(p)]
        classes = [""] if samples else []
    return samples, classes


class _DrawError(Exception):
    """An error raised while drawing an item's crop (its cause), told apart from the decoder's."""


class PretrainDataset(torch.utils.data.Dataset):
    """MAE pretraining images: ``ds[i] -> (uint8 (3, input_size, input_size), label)``.

    ``root`` is a folder of class folders (``root/<class>/*``, read as torchvision's
    ``ImageFolder`` reads it: same sorted classes, labels and file order), a flat folder of
    images (label 0), or a list of image paths (label 0). Each item is decoded crop-aware
    (:mod:`fastmae.data.decode`) and augmented as the official recipe does:
    ``RandomResizedCrop(input_size, scale, ratio, bicubic)`` then a horizontal flip with
    probability ``hflip``. ToTensor and Normalize are left to the device
    (:func:`fastmae.data.to_device`).

    The randomness of item ``i`` is a pure function of ``(seed, epoch, i)``
    (:func:`fastmae.data.transforms.sample_rng`): call :meth:`set_epoch` each epoch; the same
    triple gives the same crop and flip in any process or worker, and no global RNG is touched.

    ``on_error="skip"``: an unreadable or corrupt file is skipped with a warning (once per file
    and process), counted in :attr:`num_skipped` (each time it is met, in this process; workers
    count their own), and the next readable item (``i+1``, ``i+2``, ... wrapping around) is
    returned instead, with that item's own randomness. ``"raise"``: a ``RuntimeError`` naming
    the file.

    In your own loop::

        ds = PretrainDataset(find_train_root("/data/imagenet"), 224, seed=0)
        loader = make_loader(ds, 256, num_workers=10)
        for epoch in range(epochs):
            ds.set_epoch(epoch)  # before iterating: workers see it (persistent ones too)
            for images, labels in loader:
                x = to_device(images, "cuda")  # (B, 3, 224, 224) float32, normalised on the GPU
    """

    def __init__(self, root, input_size: int = 224, *, seed: int = 0, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
                 hflip: float = 0.5, on_error: str = "skip"):  # fmt: skip
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size <= 0:
            raise ValueError(f"input_size must be a positive int, got {input_size!r}")
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        for name, r in (("scale", scale), ("ratio", ratio)):
            if not (len(r) == 2 and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in r)
                    and 0 < r[0] <= r[1] and math.isfinite(r[1])):
                raise ValueError(f"{name} must be (min, max) of finite numbers with 0 < min <= max, got {r!r}")
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip must be a probability in [0, 1], got {hflip!r}")
        if isinstance(root, (str, os.PathLike)):
            self.root = pathlib.Path(root)
            self.samples, self.classes = _scan(self.root)
            if not self.samples:
                raise FileNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) found under {str(root)!r}")
        else:
            self.root = None
            self.samples = [(str(p), 0) for p in root]
            self.classes = [""] if self.samples else []
            if not self.samples:
                raise ValueError("root is an empty list of image paths")
        self.targets = [label for _, label in self.samples]
        self.input_size = input_size
        self.seed = int(seed)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip = float(hflip)
        self.on_error = on_error
        self.epoch = 0
        self.num_skipped = 0
        self.crop_aware = True  # decode only what the crop needs (rows above its bottom, DCT-reduced scale)
        self.jpeg_decoder = None  # "auto", "crop" or "torchvision": fastmae.data.decode.JPEG_DECODER if None
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Draw epoch ``epoch``'s crops and flips from now on."""
        self.epoch = int(epoch)

    def load(self, index: int, epoch: int | None = None) -> torch.Tensor:
        """Item ``index``'s uint8 crop for ``epoch`` (default: the current one); raises on an
        unreadable file."""
        path, _ = self.samples[index]
        rng = sample_rng(self.seed, self.epoch if epoch is None else epoch, index)
        with open(path, "rb") as f:
            data = f.read()

        def crop(h, w):
            try:
                return crop_params(h, w, self.scale, self.ratio, rng)
            except Exception as e:  # not the file's fault: must not be skipped as an unreadable image
                raise _DrawError(e) from e

        return decode_crop(data, self.input_size, crop, lambda: rng.random() < self.hflip,
                           crop_aware=self.crop_aware, decoder=self.jpeg_decoder)  # fmt: skip

    def __getitem__(self, index):
        """``(uint8 image, label)`` of sample ``index`` for the current epoch; ``index`` may also be
        an ``(epoch, index)`` pair (what :func:`fastmae.data.make_loader`'s sampler sends)."""
        epoch = None
        if isinstance(index, tuple):
            epoch, index = index
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        for k in range(n):
            j = (index + k) % n
            try:
                return self.load(j, epoch), self.samples[j][1]
            except _DrawError as e:  # drawing the crop failed: the error itself, not a skipped file
                raise e.__cause__ from None
            except Exception as e:  # a corrupt or unreadable file: any decoder error
                path = self.samples[j][0]
                if self.on_error == "raise":
                    raise RuntimeError(f"cannot read image {path!r}: {type(e).__name__}: {e}") from e
                self.num_skipped += 1
                if path not in self._warned:
                    self._warned.add(path)
                    warnings.warn(f"skipping unreadable image {path!r} ({type(e).__name__}: {e})", stacklevel=2)
        raise RuntimeError(f"no readable image among the {n} samples")
