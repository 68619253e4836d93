"""Crop-aware image decoding into uint8 tensors.

A JPEG's size is read from its frame header (:func:`jpeg_info`, a few markers, no decoding),
so the crop box is drawn *before* anything is decoded (:func:`decode_crop`). Then:

0. **fastmae._jpeg's crop decode** (``csrc/jpeg/crop_decode.cc``, libjpeg-turbo's own API, built
   by setup.py when ``jpeglib.h`` is found) for 1- and 3-component JPEGs: only the crop's columns
   are inverse-DCT'd, upsampled and colour-converted (``jpeg_crop_scanline``, plus a 16-pixel
   margin each side so chroma upsampling at the crop's edges sees real neighbours), the rows
   above it are entropy-decoded only (``jpeg_skip_scanlines``), and decoding stops after its
   last row. At the DCT-reduced scale of step 1 when the crop allows it (same :func:`snap_box`).
   Its crop equals, bitwise, the same box cut from its own full decode (tests). Files it
   rejects go on to the steps below (which raise if they cannot read them either).
   :data:`JPEG_DECODER` (env ``FASTMAE_JPEG_DECODER``) picks the decoder: ``"auto"`` (this one
   when built, else the steps below), ``"crop"`` (this one, ImportError if not built) or
   ``"torchvision"`` (the steps below); ``decode_crop(decoder=...)`` and
   ``PretrainDataset.jpeg_decoder`` choose per call / per dataset (the benchmark does).
   A file that does not end with an EOI marker is decoded down to its last row (columns still
   cropped), so a truncated file is an error whatever the crop, as with a full decode.
   Measured here (``bench_data --images 128 --rounds 31``, ~500 px): the pipeline with it at
   3.27x the official images/s per core (rounds 2.78-3.87), with torchvision's decode 2.91x.
1. **DCT-reduced decode** when the crop allows it: libjpeg-turbo decodes at 1/2, 1/4 or 1/8
   scale by computing a smaller inverse DCT per 8x8 block. The largest scale ``s`` is taken
   at which the crop box still has at least ``size`` pixels on each side
   (``min(h, w) / s >= size``), so the resize from there is still a downscale. Pillow's
   ``Image.draft`` is the interface to it. The crop's edges are moved to the nearest multiple
   of ``s`` (:func:`snap_box`; at most s/2 source pixels on a crop of >= s*size), so that it
   is whole pixels of the reduced image and torch resizes it. Pillow is also handed a copy
   of the file whose frame header says fewer rows, ``_ROW_MARGIN`` below the crop's bottom
   edge: for a sequential (baseline) JPEG this decodes exactly the image's first rows and
   stops, so nothing below the crop is entropy-decoded, transformed or colour-converted (the
   margin gives chroma upsampling its real neighbour rows: the kept rows equal a full
   decode's bitwise; tests check this). Progressive JPEGs and files that do not end with an
   EOI marker are decoded whole. (torchvision's decoder would cut too, but prints libjpeg's
   "extraneous bytes" warning to stderr for each such file; and measured here, Pillow on a
   cut file, plus its RGB copy out, beat torchvision on the whole file only when under ~3/4
   of the rows are needed, so the cut is used on the reduced-scale path only.) Entropy
   decoding, which no scale skips, is most of a JPEG decode: measured here on 1400 px
   photographs the 1/2-scale decode took ~3/4 of a full one. On ImageNet-sized photographs
   (~500 px) with 224 px crops this path is rare (a crop of >= 448 px per side).
2. Otherwise torchvision's libjpeg-turbo decoder (``decode_jpeg``: measured faster here
   than Pillow's decode of the same library, whose pixels it equals for YCbCr and greyscale
   JPEGs, and it returns a tensor without a copy).
3. Files that are not 1- or 3-component JPEGs (PNG, CMYK JPEGs, ...) and JPEGs torchvision
   rejects are opened with Pillow and ``convert("RGB")``-ed exactly as torchvision's
   ``ImageFolder`` loader does.

Every path returns the crop resized by :func:`fastmae.data.transforms.resized_crop`.
An unreadable file raises (OSError, ValueError, RuntimeError, ...): the dataset decides
whether to skip it.
"""

from __future__ import annotations

import io
import os

import numpy as np
import torch

from .transforms import resized_crop

__all__ = ["jpeg_info", "rows_needed", "decode_rgb", "decode_crop", "dct_scale", "snap_box", "crop_decoder",
           "JPEG_DECODER"]

#: The JPEG decoder when ``decode_crop(decoder=None)``: "auto", "crop" or "torchvision" (module docstring).
JPEG_DECODER = os.environ.get("FASTMAE_JPEG_DECODER", "auto").strip().lower() or "auto"
_DECODERS = ("auto", "crop", "torchvision")
_CROP = None  # fastmae._jpeg.crop_decode once imported; False if it does not import
_CROP_ERROR = ""

# Start-of-frame markers: SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC).
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Sequential Huffman frames (baseline, extended): MCU rows in order, one scan per component set.
_SEQUENTIAL = frozenset((0xC0, 0xC1))
# Rows decoded below a crop's bottom edge: the chroma upsampler's context (libjpeg's fancy
# upsampling reads the chroma row below; the last decoded row replicates instead). One MCU
# row of the largest sampling factor (16 rows) is more than enough.
_ROW_MARGIN = 16


def jpeg_info(data) -> tuple[int, int, int, int, int] | None:
    """``(height, width, components, sof_marker, sof_offset)`` from a JPEG's frame header, or
    None if ``data`` is not a JPEG (or is cut short before its frame header)."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    pos = 2
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # no length field
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        length = (data[pos + 2] << 8) | data[pos + 3]
        if marker in _SOF:
            if pos + 10 > n:
                return None
            height = (data[pos + 5] << 8) | data[pos + 6]
            width = (data[pos + 7] << 8) | data[pos + 8]
            return height, width, data[pos + 9], marker, pos
        pos += 2 + length
    return None


def rows_needed(info, bottom: int) -> int:
    """Rows to decode so that rows ``[0, bottom)`` equal a full decode's: ``bottom +
    _ROW_MARGIN`` for a sequential JPEG, else (progressive) the whole height."""
    height, _, _, marker, _ = info
    return min(height, bottom + _ROW_MARGIN) if marker in _SEQUENTIAL else height


def _cut_rows(data: bytearray, info, rows: int) -> bytearray:
    """``data`` (a private copy) with its frame header saying ``rows`` rows (in place)."""
    pos = info[4]
    data[pos + 5] = rows >> 8
    data[pos + 6] = rows & 0xFF
    return data


def dct_scale(box_h: int, box_w: int, size: int) -> int:
    """The largest libjpeg scale denominator (8, 4, 2 or 1) at which a ``box_h x box_w`` crop
    still has at least ``size`` pixels per side."""
    side = min(box_h, box_w)
    for s in (8, 4, 2):
        if side >= s * size:
            return s
    return 1


def snap_box(box, s: int, height: int, width: int) -> tuple[int, int, int, int]:
    """``box = (top, left, h, w)`` in source pixels -> ``(top, left, h, w)`` in the pixels of the
    1/s-scale decode, each edge moved to the nearest multiple of ``s`` source pixels.

    The crop then covers source pixels ``[top*s, min((top+h)*s, height))`` (and likewise in x):
    its edges moved by at most s/2 on a crop of at least ``s * size`` pixels, itself a
    RandomResizedCrop draw (area and aspect change by under 1/size relative). Whole reduced
    pixels let torch's resize, 2x faster here than Pillow's fractional-box resize, do the rest.
    """
    top, left, h, w = box
    rh_max, rw_max = -(-height // s), -(-width // s)
    x0, x1 = round(left / s), round((left + w) / s)
    y0, y1 = round(top / s), round((top + h) / s)
    x0, y0 = min(x0, rw_max - 1), min(y0, rh_max - 1)
    x1, y1 = max(x0 + 1, min(x1, rw_max)), max(y0 + 1, min(y1, rh_max))
    return y0, x0, y1 - y0, x1 - x0


def _pil_open(data):
    from PIL import Image

    return Image.open(io.BytesIO(data))


def _pil_to_chw(img) -> torch.Tensor:
    """A PIL RGB image as a uint8 (3, H, W) channels-last tensor (one copy, out of PIL)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def decode_rgb(data) -> torch.Tensor:
    """The whole image as uint8 (3, H, W), as Pillow's ``open(...).convert("RGB")`` gives it."""
    info = jpeg_info(data)
    if info is not None and info[2] in (1, 3):
        try:
            return _tv_decode(data)
        except RuntimeError:
            pass  # Pillow may still read it; if not it raises below
    img = _pil_open(data)
    return _pil_to_chw(img.convert("RGB"))


_JPEG_OP = None


def _tv_decode(data) -> torch.Tensor:
    """torchvision's libjpeg-turbo decode to uint8 RGB (3, H, W), a channels-last view.

    Calls torchvision's ``image::decode_jpeg`` op directly: ``torchvision.io.decode_jpeg``
    around it adds ~15 us of checks and, from torchvision 0.29, a DeprecationWarning per call.
    """
    global _JPEG_OP
    if _JPEG_OP is None:
        try:
            from torchvision.io import ImageReadMode  # loads torchvision's image ops

            rgb = ImageReadMode.RGB.value
            op = torch.ops.image.decode_jpeg
        except (ImportError, AttributeError, RuntimeError) as e:  # installed but broken (built for another torch)
            raise ImportError(f"fastmae.data decodes JPEGs with torchvision, which does not load: {e}") from e
        _JPEG_OP = lambda buf: op(buf, rgb, False)  # noqa: E731  (mode, apply_exif_orientation=False)
    buf = torch.frombuffer(data if isinstance(data, bytearray) else bytearray(data), dtype=torch.uint8)
    return _JPEG_OP(buf)


def crop_decoder(decoder: str | None = None):
    """``fastmae._jpeg.crop_decode`` if ``decoder`` (default :data:`JPEG_DECODER`) asks for it
    and it is built, else None. ``"crop"`` without the extension is an ImportError saying why."""
    global _CROP, _CROP_ERROR
    decoder = JPEG_DECODER if decoder is None else decoder
    if decoder not in _DECODERS:
        raise ValueError(f"decoder (FASTMAE_JPEG_DECODER) must be one of {_DECODERS}, got {decoder!r}")
    if decoder == "torchvision":
        return None
    if _CROP is None:
        try:
            from fastmae import _jpeg

            _CROP = _jpeg.crop_decode
        except ImportError as e:  # not built (no jpeglib.h at build time), or built for another torch
            _CROP, _CROP_ERROR = False, str(e)
    if _CROP is False and decoder == "crop":
        raise ImportError(f"decoder='crop' needs the extension fastmae._jpeg, which does not import ({_CROP_ERROR}); "
                          "build it with `make ext` (needs libjpeg-turbo's jpeglib.h)")
    return _CROP or None


def decode_crop(data, size: int, draw_box, flip_fn, *, crop_aware: bool = True,
                decoder: str | None = None) -> torch.Tensor:  # fmt: skip
    """Decode ``data`` (the file's bytes) and return its random crop as uint8 (3, size, size).

    ``draw_box(height, width) -> (top, left, h, w)`` draws the crop from the image size;
    ``flip_fn() -> bool`` draws the flip, after the crop (the official order of draws).
    ``crop_aware=False`` decodes every JPEG whole at full scale with torchvision (for
    measurement and tests). ``decoder``: "auto", "crop" or "torchvision" (default
    :data:`JPEG_DECODER`, see the module docstring).
    """
    info = jpeg_info(data)
    crop_fn = crop_decoder(decoder) if crop_aware else None
    if info is not None and info[2] in (1, 3):
        height, width = info[0], info[1]
        box = draw_box(height, width)
        flip = flip_fn()
        top, left, h, w = box
        s = dct_scale(h, w, size) if crop_aware else 1
        if crop_fn is not None:
            rbox = snap_box(box, s, height, width) if s > 1 else box
            # a file that does not end with EOI may be truncated: decode down to the last row, so
            # that libjpeg meets the end of its data (an error) whatever the crop, as a full decode does
            rows = rbox[2] if data[-2:] == b"\xff\xd9" else -(-height // s) - rbox[0]
            buf = torch.frombuffer(data if isinstance(data, bytearray) else bytearray(data), dtype=torch.uint8)
            try:
                hwc = crop_fn(buf, rbox[0], rbox[1], rows, rbox[3], s)
            except RuntimeError:
                pass  # corrupt, truncated, or something libjpeg rejects: the paths below decide
            else:
                return resized_crop(hwc.permute(2, 0, 1), (0, 0, rbox[2], rbox[3]), size, flip)
        if s > 1:
            rtop, rleft, rh, rw = snap_box(box, s, height, width)
            cut, rows = data, height
            if data[-2:] == b"\xff\xd9":  # Pillow keeps libjpeg's warning about the unread rest to itself
                rows = rows_needed(info, min(height, (rtop + rh) * s))
                if rows < height:
                    cut = _cut_rows(bytearray(data), info, rows)
            img = _pil_open(cut)
            drafted = img.draft("RGB", (max(1, width // s), max(1, rows // s)))
            # libjpeg's scaled output pixel j covers source pixels [j*s, (j+1)*s)
            if drafted and round(width / drafted[1][2]) == s:
                if img.mode != "RGB":
                    img = img.convert("RGB")
                img = img.crop((rleft, rtop, rleft + rw, rtop + rh))
                return resized_crop(_pil_to_chw(img), (0, 0, rh, rw), size, flip)
        try:
            img = _tv_decode(data)
        except RuntimeError:
            img = _pil_to_chw(_pil_open(data).convert("RGB"))
        if img.shape[1:] != (height, width):
            raise ValueError(f"decoded size {tuple(img.shape[1:])} differs from the header's {(height, width)}")
        return resized_crop(img, box, size, flip)
    img = decode_rgb(data)
    box = draw_box(img.shape[1], img.shape[2])
    return resized_crop(img, box, size, flip_fn())
