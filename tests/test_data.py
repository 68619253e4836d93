"""fastmae.data: folders, crop distribution, pixels against the official pipeline, corrupt files, loader.

Oracles (see each test for the numbers):

* crop distribution: two-sample Kolmogorov-Smirnov tests of fastmae's crops against
  torchvision's ``RandomResizedCrop.get_params`` (the official algorithm with torch's RNG),
  4 statistics x 2 image shapes, each at alpha = 1e-4: a false failure in at most 8e-4 of
  runs (Bonferroni; KS on these partly discrete statistics is conservative, so less);
* pixels: for the *same* crop box and flip, fastmae's uint8 crop normalised on the "device"
  (``ops.normalize_images``) against the official PIL crop + bicubic resize + ToTensor +
  Normalize. Full-resolution decode: same JPEG pixels (both libjpeg-turbo) and the same
  separable antialiased bicubic filter (PIL's a = -0.5 kernel, support scaled by the
  downscale factor), computed in fixed point by PIL and by torch with different coefficient
  precision and intermediate rounding: pixels differ by a few levels at most (measured
  <= 4/255), mean absolute error <= 0.5/255 and PSNR >= 50 dB are required. DCT-reduced decode:
  the 1/s-scale IDCT (an s x s block average in effect) replaces part of the bicubic
  prefilter, a real interpolation difference: mean absolute error <= 2/255 and PSNR >= 38 dB
  (measured 0.2-1.1/255 and 42-54 dB on photographs);
* decoding only the rows above a crop: those rows equal a full decode's, bitwise.
"""

import io
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

PIL = pytest.importorskip("PIL")
pytest.importorskip("torchvision")
from PIL import Image  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402
from torchvision.transforms import InterpolationMode  # noqa: E402
from torchvision.transforms import functional as TF  # noqa: E402

from fastmae import data, ops  # noqa: E402
from fastmae.data import decode as D  # noqa: E402
from fastmae.data import transforms as T  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MEAN, STD = data.IMAGENET_MEAN, data.IMAGENET_STD


# ------------------------------------------------------------------------------ helpers
def _photo(size=(500, 375), seed=0) -> Image.Image:
    """A real photograph (shipped in a wheel), resized/cropped to ``size``, seed picks which."""
    paths = data.embedded_images()
    with Image.open(paths[seed % len(paths)]) as im:
        im = im.convert("RGB")
    W, H = im.size
    aspect = size[0] / size[1]
    bw, bh = (W, W / aspect) if W / H < aspect else (H * aspect, H)
    return im.resize(size, Image.Resampling.BICUBIC, box=(0, 0, bw, bh))


def _jpeg_bytes(img, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=kw.pop("quality", 90), **kw)
    return buf.getvalue()


def _write(path: Path, payload: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return path


def _official(img: Image.Image, box, flip: bool, size: int) -> torch.Tensor:
    """The official pipeline's tensor for a given crop box and flip."""
    out = TF.resized_crop(img, *box, [size, size], interpolation=InterpolationMode.BICUBIC)
    if flip:
        out = TF.hflip(out)
    return TF.normalize(TF.to_tensor(out), MEAN, STD)


def _errors(ours: torch.Tensor, official: torch.Tensor) -> tuple[float, float, float]:
    """(mean abs, max abs, PSNR in dB) in [0, 1] pixel units (normalisation undone)."""
    e = (ours - official) * torch.tensor(STD).view(3, 1, 1)
    mse = float((e**2).mean())
    return float(e.abs().mean()), float(e.abs().max()), (10 * math.log10(1 / mse) if mse > 0 else math.inf)


# ------------------------------------------------------------------------------ folders
def test_find_train_root(tmp_path):
    assert data.find_train_root(tmp_path) == tmp_path
    (tmp_path / "train").mkdir()
    assert data.find_train_root(str(tmp_path)) == tmp_path / "train"


def test_embedded_images_are_colour_photographs():
    paths = data.embedded_images()
    assert len(paths) >= 5
    for p in paths:
        with Image.open(p) as im:
            a = np.asarray(im.convert("RGB"), dtype=np.int16)
        assert min(a.shape[:2]) >= 200
        assert np.abs(a[..., 0] - a[..., 1]).mean() > 2  # not greyscale


def test_class_folders_read_as_imagefolder(tmp_path):
    jpg = _jpeg_bytes(_photo((40, 30)))
    # ".jpg" (no stem): ImageFolder tests the name's end, not its suffix
    tree = {"b_cls": ["z.jpg", "a.JPEG", "m.png", ".jpg"], "a_cls": ["x.jpeg"], "c_cls": ["sub/q.jpg", "n.txt"]}
    for cls, files in tree.items():
        for f in files:
            _write(tmp_path / cls / f, jpg)
    ds = data.PretrainDataset(tmp_path, 32)
    official = datasets.ImageFolder(str(tmp_path))
    assert ds.classes == official.classes
    assert ds.samples == [(p, y) for p, y in official.samples]
    assert len(ds) == 6


def test_class_folder_without_images_is_refused_as_by_imagefolder(tmp_path):
    _write(tmp_path / "a_cls" / "x.jpg", _jpeg_bytes(_photo((40, 30))))
    _write(tmp_path / "b_cls" / "notes.txt", b"no image here")
    (tmp_path / "c_cls").mkdir()
    with pytest.raises(FileNotFoundError):
        datasets.ImageFolder(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="class folder.*b_cls, c_cls"):
        data.PretrainDataset(tmp_path, 16)


def test_flat_folder_and_path_list(tmp_path):
    jpg = _jpeg_bytes(_photo((40, 30)))
    paths = [_write(tmp_path / f"{k}.jpg", jpg) for k in (2, 0, 1)]
    _write(tmp_path / "notes.txt", b"not an image")
    ds = data.PretrainDataset(tmp_path, 16)
    assert [p for p, _ in ds.samples] == sorted(str(p) for p in paths) and {y for _, y in ds.samples} == {0}
    ds2 = data.PretrainDataset(paths, 16)
    assert [p for p, _ in ds2.samples] == [str(p) for p in paths]
    img, label = ds2[1]
    assert img.shape == (3, 16, 16) and img.dtype == torch.uint8 and label == 0


@pytest.mark.parametrize("kwargs, match", [
    ({"input_size": 0}, "input_size"), ({"on_error": "ignore"}, "on_error"), ({"scale": (0.5, 0.2)}, "scale"),
    ({"ratio": (0, 1)}, "ratio"), ({"hflip": 1.5}, "hflip"), ({"scale": (0.2, math.inf)}, "scale"),
    ({"scale": (math.nan, 1.0)}, "scale"), ({"ratio": (0.75, math.inf)}, "ratio"),
    ({"ratio": (0.75, math.nan)}, "ratio"), ({"scale": (0.2,)}, "scale"), ({"ratio": ("3/4", 1)}, "ratio"),
])  # fmt: skip
def test_bad_arguments(tmp_path, kwargs, match):
    _write(tmp_path / "a.jpg", _jpeg_bytes(_photo((40, 30))))
    with pytest.raises(ValueError, match=match):
        data.PretrainDataset(tmp_path, **{"input_size": 16, **kwargs})


def test_empty_roots(tmp_path):
    with pytest.raises(FileNotFoundError, match="no images"):
        data.PretrainDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        data.PretrainDataset(tmp_path / "missing")
    with pytest.raises(ValueError, match="empty"):
        data.PretrainDataset([])


# ------------------------------------------------------------------------------ randomness
def test_crop_distribution_matches_official():
    from scipy.stats import ks_2samp

    n = 3000
    base = int(torch.randint(0, 2**31, ()).item())
    for H, W in ((375, 500), (500, 160)):  # a usual photo; a narrow one where many draws fall back
        img = torch.empty(1, H, W).expand(3, H, W)
        official = [transforms.RandomResizedCrop.get_params(img, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(n)]
        ours = [T.crop_params(H, W, (0.2, 1.0), (3 / 4, 4 / 3), T.sample_rng(base, 0, i)) for i in range(n)]
        for name, stat in {
            "area": lambda t, l, h, w, H=H, W=W: h * w / (H * W),
            "log aspect": lambda t, l, h, w: math.log(w / h),
            "centre x": lambda t, l, h, w, W=W: (l + w / 2) / W,
            "centre y": lambda t, l, h, w, H=H: (t + h / 2) / H,
        }.items():
            a, b = [stat(*c) for c in official], [stat(*c) for c in ours]
            p = ks_2samp(a, b).pvalue
            assert p > 1e-4, f"{name} of {H}x{W} crops differs from torchvision's (KS p={p:.2e}, seed {base})"
        for t, l, h, w in ours:
            assert 0 <= t and 0 <= l and 0 < h and 0 < w and t + h <= H and l + w <= W


def test_flip_rate():
    # the flip is the draw after the crop; over 4000 items its rate is 0.5 within 5 sigma (~0.04)
    base = int(torch.randint(0, 2**31, ()).item())
    flips = []
    for i in range(4000):
        rng = T.sample_rng(base, 3, i)
        T.crop_params(375, 500, (0.2, 1.0), (3 / 4, 4 / 3), rng)
        flips.append(rng.random() < 0.5)
    assert abs(sum(flips) / 4000 - 0.5) < 5 * 0.5 / math.sqrt(4000)


def test_randomness_is_a_function_of_seed_epoch_index(tmp_path):
    paths = [_write(tmp_path / f"{k}.jpg", _jpeg_bytes(_photo((120, 90), seed=k))) for k in range(3)]
    a, b = data.PretrainDataset(paths, 32, seed=5), data.PretrainDataset(paths, 32, seed=5)
    torch.manual_seed(0)  # global RNGs play no part
    x = a[1][0]
    torch.manual_seed(1)
    assert torch.equal(x, b[1][0])
    assert torch.equal(a[(0, 1)][0], x)  # the (epoch, index) form the loader's sampler sends
    b.set_epoch(1)
    assert not torch.equal(x, b[1][0])
    assert torch.equal(a[(1, 1)][0], b[1][0])
    assert not torch.equal(x, data.PretrainDataset(paths, 32, seed=6)[1][0])
    state = torch.get_rng_state()
    a[2]
    assert torch.equal(state, torch.get_rng_state())


# ------------------------------------------------------------------------------ pixels
@pytest.mark.parametrize("seed", range(4))
def test_pixels_match_official_full_decode(seed):
    img = _photo((500, 375) if seed % 2 else (333, 500), seed)
    jpg = _jpeg_bytes(img)
    decoded = Image.open(io.BytesIO(jpg)).convert("RGB")
    rng = T.sample_rng(int(torch.randint(0, 2**31, ()).item()), 0, seed)
    for k in range(3):
        box = T.crop_params(decoded.size[1], decoded.size[0], (0.2, 1.0), (3 / 4, 4 / 3), rng)
        flip = k % 2 == 1
        assert D.dct_scale(box[2], box[3], 224) == 1
        u8 = D.decode_crop(jpg, 224, lambda h, w, box=box: box, lambda flip=flip: flip)
        ours = ops.normalize_images(u8[None], MEAN, STD)[0]
        mae, mx, psnr = _errors(ours, _official(decoded, box, flip, 224))
        assert mae <= 0.5 / 255 and psnr >= 50, (box, flip, mae * 255, mx * 255, psnr)


@pytest.mark.parametrize("seed", range(3))
def test_pixels_match_official_reduced_decode(seed):
    img = _photo((1400, 1050), seed)
    jpg = _jpeg_bytes(img)
    decoded = Image.open(io.BytesIO(jpg)).convert("RGB")
    rng = T.sample_rng(int(torch.randint(0, 2**31, ()).item()), 0, seed)
    scales = set()
    for k in range(4):
        box = T.crop_params(1050, 1400, (0.6, 1.0), (3 / 4, 4 / 3), rng)
        flip = k % 2 == 0
        s = D.dct_scale(box[2], box[3], 224)
        scales.add(s)
        u8 = D.decode_crop(jpg, 224, lambda h, w, box=box: box, lambda flip=flip: flip)
        assert u8.shape == (3, 224, 224) and u8.dtype == torch.uint8 and u8.is_contiguous()
        # the crop fastmae takes: the drawn box with its edges on the reduced image's pixel grid
        t, l, h, w = D.snap_box(box, s, 1050, 1400)
        snapped = (t * s, l * s, min((t + h) * s, 1050) - t * s, min((l + w) * s, 1400) - l * s)
        assert all(abs(a - b) <= s / 2 for a, b in zip((box[0], box[1], box[0] + box[2], box[1] + box[3]),
                                                       (snapped[0], snapped[1], snapped[0] + snapped[2],
                                                        snapped[1] + snapped[3])))  # fmt: skip
        mae, mx, psnr = _errors(ops.normalize_images(u8[None], MEAN, STD)[0], _official(decoded, snapped, flip, 224))
        assert mae <= 2 / 255 and psnr >= 38, (box, flip, mae * 255, mx * 255, psnr)
    assert scales - {1}, "no crop took the reduced path"


@pytest.mark.parametrize("subsampling", [0, 1, 2])  # 4:4:4, 4:2:2, 4:2:0
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_row_cut_decode_equals_full_decode(subsampling, mode):
    img = _photo((301, 237), subsampling)
    jpg = _jpeg_bytes(img.convert(mode), subsampling=subsampling)
    info = D.jpeg_info(jpg)
    assert info[:2] == (237, 301) and info[3] == 0xC0
    full = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"))
    for bottom in torch.randint(1, 237, (6,)).tolist():
        rows = D.rows_needed(info, bottom)
        cut = Image.open(io.BytesIO(bytes(D._cut_rows(bytearray(jpg), info, rows)))).convert("RGB")
        assert cut.size == (301, rows)
        np.testing.assert_array_equal(np.asarray(cut)[:bottom], full[:bottom])


@pytest.mark.parametrize("s", [2, 4, 8])
def test_row_cut_decode_equals_full_decode_at_reduced_scale(s):
    jpg = _jpeg_bytes(_photo((640, 480), s))  # 4:2:0, Pillow's default
    info = D.jpeg_info(jpg)

    def draft(payload, rows):
        im = Image.open(io.BytesIO(payload))
        im.draft("RGB", (640 // s, rows // s))
        return np.asarray(im.convert("RGB"))

    full = draft(jpg, 480)
    assert full.shape[:2] == (480 // s, 640 // s)
    for bottom in torch.randint(1, 480, (5,)).tolist():
        rows = D.rows_needed(info, bottom)
        cut = draft(bytes(D._cut_rows(bytearray(jpg), info, rows)), rows)
        keep = -(-bottom // s)  # reduced rows that hold source rows [0, bottom)
        np.testing.assert_array_equal(cut[:keep], full[:keep])


def test_progressive_jpeg_is_decoded_whole():
    jpg = _jpeg_bytes(_photo((200, 150)), progressive=True)
    info = D.jpeg_info(jpg)
    assert info[3] == 0xC2 and D.rows_needed(info, 10) == 150


@pytest.mark.parametrize("kind", ["png", "gray_jpeg", "cmyk_jpeg", "rgba_png"])
def test_other_formats_follow_pil_convert_rgb(kind):
    img = _photo((90, 70), 1)
    buf = io.BytesIO()
    if kind == "png":
        img.save(buf, format="PNG")
    elif kind == "gray_jpeg":
        img.convert("L").save(buf, format="JPEG", quality=90)
    elif kind == "cmyk_jpeg":
        img.convert("CMYK").save(buf, format="JPEG", quality=90)
    else:
        img.convert("RGBA").save(buf, format="PNG")
    payload = buf.getvalue()
    decoded = Image.open(io.BytesIO(payload)).convert("RGB")  # the official loader
    box = (5, 7, 60, 70)
    u8 = D.decode_crop(payload, 48, lambda h, w: box, lambda: True)
    mae, _, psnr = _errors(ops.normalize_images(u8[None], MEAN, STD)[0], _official(decoded, box, True, 48))
    assert mae <= 0.5 / 255 and psnr >= 50


def test_jpeg_info_rejects_non_jpeg():
    assert D.jpeg_info(b"\x89PNG\r\n\x1a\n" + bytes(100)) is None
    assert D.jpeg_info(b"\xff\xd8\xff") is None
    assert D.jpeg_info(_jpeg_bytes(_photo((64, 48)))[:30]) is None


# ------------------------------------------------------------------------------ fastmae._jpeg crop decode
def _jpeg_ext():
    """fastmae._jpeg, or skip (fail under FASTMAE_EXT_REQUIRED=1, as `make test` runs) saying why."""
    try:
        from fastmae import _jpeg
    except ImportError as e:
        if os.environ.get("FASTMAE_EXT_REQUIRED") == "1":
            pytest.fail(f"fastmae._jpeg is not built ({e}) but FASTMAE_EXT_REQUIRED=1")
        pytest.skip(f"fastmae._jpeg is not built ({e}): `make ext` builds it where libjpeg's jpeglib.h is installed")
    return _jpeg


def _u8(payload) -> torch.Tensor:
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8)


_KINDS = [("RGB", 2, False), ("RGB", 0, False), ("RGB", 1, False), ("L", 0, False), ("RGB", 2, True)]


@pytest.mark.parametrize("mode,subsampling,progressive", _KINDS, ids=["420", "444", "422", "gray", "420prog"])
@pytest.mark.parametrize("s", [1, 2, 4, 8])
def test_crop_decode_equals_its_full_decode_bitwise(mode, subsampling, progressive, s):
    """Random boxes (odd image sizes, boxes down to 1 px, at the image's edges) equal the same box
    cut from the decoder's own full decode, bitwise: the crop margin makes edge upsampling exact."""
    J = _jpeg_ext()
    for k, size in enumerate([(333, 251), (97, 129), (17, 9), (500, 375)]):
        img = _photo(size, k + s).convert(mode)
        kw = {} if mode == "L" else {"subsampling": subsampling}
        buf = _u8(_jpeg_bytes(img, progressive=progressive, **kw))
        H, W = -(-size[1] // s), -(-size[0] // s)
        full = J.crop_decode(buf, 0, 0, H, W, s)
        assert full.shape == (H, W, 3) and full.dtype == torch.uint8
        for _ in range(12):
            t, l = int(torch.randint(0, H, ())), int(torch.randint(0, W, ()))
            h, w = int(torch.randint(1, H - t + 1, ())), int(torch.randint(1, W - l + 1, ()))
            if int(torch.randint(0, 4, ())) == 0:  # also boxes touching the right/bottom edges
                h, w = H - t, W - l
            crop = J.crop_decode(buf, t, l, h, w, s)
            assert torch.equal(crop, full[t : t + h, l : l + w]), (size, (t, l, h, w))


@pytest.mark.parametrize("mode,subsampling,progressive", _KINDS, ids=["420", "444", "422", "gray", "420prog"])
def test_crop_decode_full_image_equals_torchvision_and_pil(mode, subsampling, progressive):
    """Measured here: fastmae._jpeg (system libjpeg-turbo 2.1.5), torchvision's decode_jpeg and
    Pillow's decode give identical pixels at scale 1 (all libjpeg-turbo, ISLOW IDCT, fancy upsampling)."""
    J = _jpeg_ext()
    img = _photo((333, 251), 2).convert(mode)
    jpg = _jpeg_bytes(img, progressive=progressive, **({} if mode == "L" else {"subsampling": subsampling}))
    ours = J.crop_decode(_u8(jpg), 0, 0, 251, 333, 1).permute(2, 0, 1)
    assert torch.equal(ours, D._tv_decode(jpg))
    pil = torch.from_numpy(np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB")).copy()).permute(2, 0, 1)
    assert torch.equal(ours, pil)


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("size", [(500, 375), (1400, 1050)])
def test_decode_crop_with_crop_decoder_equals_resize_of_full_decode(flip, size):
    """decode_crop(decoder="crop") is resized_crop of the same box of a full decode (at the scale
    dct_scale picks, on snap_box's grid), flip included, bitwise."""
    J = _jpeg_ext()
    jpg = _jpeg_bytes(_photo(size, 1))
    rng = T.sample_rng(int(torch.randint(0, 2**31, ()).item()), 0, 0)
    for _ in range(3):
        box = T.crop_params(size[1], size[0], (0.2, 1.0), (3 / 4, 4 / 3), rng)
        s = D.dct_scale(box[2], box[3], 224)
        rbox = D.snap_box(box, s, size[1], size[0]) if s > 1 else box
        full = J.crop_decode(_u8(jpg), 0, 0, -(-size[1] // s), -(-size[0] // s), s).permute(2, 0, 1)
        want = T.resized_crop(full, rbox, 224, flip)
        got = D.decode_crop(jpg, 224, lambda h, w, box=box: box, lambda: flip, decoder="crop")
        assert torch.equal(got, want), (box, s)
        tv = D.decode_crop(jpg, 224, lambda h, w, box=box: box, lambda: flip, decoder="torchvision")
        if s == 1:  # torchvision's path: the same pixels, the same resize
            assert torch.equal(got, tv)


def test_crop_decode_errors():
    J = _jpeg_ext()
    jpg = _jpeg_bytes(_photo((120, 90)), progressive=True)  # progressive: every scan is read
    with pytest.raises(RuntimeError, match="Premature end"):
        J.crop_decode(_u8(jpg[: len(jpg) // 2]), 0, 0, 10, 10)
    with pytest.raises(RuntimeError, match="libjpeg"):
        J.crop_decode(_u8(b"\xff\xd8 nothing"), 0, 0, 1, 1)
    with pytest.raises(RuntimeError, match="outside the 90x120 image"):
        J.crop_decode(_u8(jpg), 0, 0, 91, 1)
    with pytest.raises(RuntimeError, match="outside the 45x60 image"):
        J.crop_decode(_u8(jpg), 0, 50, 1, 11, 2)
    with pytest.raises(RuntimeError, match="scale_denom"):
        J.crop_decode(_u8(jpg), 0, 0, 1, 1, 3)
    base = _jpeg_bytes(_photo((120, 90)))  # baseline, cut: the crop decoder reads to the end, whatever the box
    J.crop_decode(_u8(base[: len(base) // 2]), 0, 0, 4, 4)  # the crop alone would not see the cut
    with pytest.raises((RuntimeError, OSError), match="truncated|Premature"):
        D.decode_crop(base[: len(base) // 2], 8, lambda h, w: (0, 0, 4, 4), lambda: False, decoder="crop")
    cmyk = io.BytesIO()
    _photo((40, 30)).convert("CMYK").save(cmyk, format="JPEG")
    with pytest.raises(RuntimeError, match="4-component"):
        J.crop_decode(_u8(cmyk.getvalue()), 0, 0, 1, 1)


def test_decoder_switch(monkeypatch):
    jpg = _jpeg_bytes(_photo((64, 48)))
    with pytest.raises(ValueError, match="decoder"):
        D.decode_crop(jpg, 16, lambda h, w: (0, 0, h, w), lambda: False, decoder="nvjpeg")
    monkeypatch.setattr(D, "_CROP", False)  # as if fastmae._jpeg were not built
    with pytest.raises(ImportError, match="fastmae._jpeg"):
        D.decode_crop(jpg, 16, lambda h, w: (0, 0, h, w), lambda: False, decoder="crop")
    out = D.decode_crop(jpg, 16, lambda h, w: (0, 0, h, w), lambda: False)  # auto: torchvision
    assert out.shape == (3, 16, 16)


def test_import_and_decode_without_the_jpeg_extension():
    code = ("import sys; sys.modules['fastmae._jpeg'] = None\n"
            "import io, fastmae, fastmae.data\nfrom fastmae.data import decode as D\n"
            "from PIL import Image\nb = io.BytesIO(); Image.new('RGB', (40, 30), (200, 10, 30)).save(b, 'JPEG')\n"
            "out = D.decode_crop(b.getvalue(), 8, lambda h, w: (0, 0, h, w), lambda: False)\n"
            "assert out.shape == (3, 8, 8) and D._CROP is False, D._CROP")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


def test_setup_builds_the_jpeg_extension_only_with_jpeglib(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("fastmae_setup_jpeg", REPO / "setup.py")
    setup_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_py)  # not __main__: setup() does not run
    assert "csrc/jpeg/crop_decode.cc" not in setup_py.sources()[0]  # not compiled into fastmae._C
    (tmp_path / "jpeglib.h").write_text("")
    cmd = {}
    (ext,) = setup_py.jpeg_ext_modules(cmd, {"CPATH": str(tmp_path)})
    assert ext.name == "fastmae._jpeg" and "jpeg" in ext.libraries and str(tmp_path) in ext.include_dirs
    assert ext.sources == ["csrc/jpeg/crop_decode.cc"] and "build_ext" in cmd
    assert setup_py.jpeg_ext_modules({}, {"CPATH": str(tmp_path), "FASTMAE_BUILD_EXT": "0"}) == []
    setup_py.find_jpeglib = lambda env=None: None
    assert setup_py.jpeg_ext_modules({}, {}) == []
    assert "not building fastmae._jpeg" in capsys.readouterr().err


@pytest.mark.parametrize("decoder", ["crop", "torchvision"])
def test_corrupt_files_are_skipped_with_either_decoder(tmp_path, decoder):
    if decoder == "crop":
        _jpeg_ext()
    _corrupt_folder(tmp_path)
    ds = data.PretrainDataset(tmp_path, 32)
    ds.jpeg_decoder = decoder
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        items = [ds[i] for i in range(len(ds))]
    assert ds.num_skipped == 4 and all(img.shape == (3, 32, 32) for img, _ in items)


# ------------------------------------------------------------------------------ corrupt files
def _corrupt_folder(tmp_path):
    good = _jpeg_bytes(_photo((120, 90)))
    paths = [
        _write(tmp_path / "0_good.jpg", good),
        _write(tmp_path / "1_truncated.jpg", good[: len(good) // 2]),
        _write(tmp_path / "2_garbage.jpg", bytes(torch.randint(0, 256, (2000,), dtype=torch.uint8).tolist())),
        _write(tmp_path / "3_good.jpg", good),
        _write(tmp_path / "4_empty.jpg", b""),
    ]
    return paths


def test_corrupt_files_are_skipped_and_counted(tmp_path):
    paths = _corrupt_folder(tmp_path)
    ds = data.PretrainDataset(tmp_path, 32)
    with pytest.warns(UserWarning, match="skipping unreadable image") as rec:
        items = [ds[i] for i in range(len(ds))]
    # every time a bad file is met it counts: item 1 meets files 1 and 2, item 2 file 2, item 4 file 4
    assert ds.num_skipped == 4
    assert sorted({str(w.message).split("'")[1] for w in rec}) == [str(paths[k]) for k in (1, 2, 4)]
    for img, _ in items:
        assert img.shape == (3, 32, 32)
    # a skipped item is its next readable neighbour, with that neighbour's randomness
    assert torch.equal(items[1][0], items[3][0]) and torch.equal(items[2][0], items[3][0])
    assert torch.equal(items[4][0], items[0][0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per file: no second warning
        ds[1]
    assert ds.num_skipped == 6


def test_corrupt_file_raises_when_asked(tmp_path):
    paths = _corrupt_folder(tmp_path)
    ds = data.PretrainDataset(tmp_path, 32, on_error="raise")
    ds[0]
    with pytest.raises(RuntimeError, match="cannot read image .*1_truncated.jpg"):
        ds[1]
    with pytest.raises(RuntimeError, match="2_garbage.jpg"):
        ds[2]
    del paths


def test_an_error_drawing_the_crop_is_raised_not_skipped(tmp_path, monkeypatch):
    """Only the file's own errors (reading, decoding) skip it: an error from the crop's drawing
    (here a finite scale whose area overflows, as torchvision's get_params overflows) is raised
    as itself, for every file, instead of each file being reported unreadable in turn."""
    import fastmae.data.dataset as dataset_mod

    for k in range(3):
        _write(tmp_path / f"{k}.jpg", _jpeg_bytes(_photo((60, 40), k)))
    ds = data.PretrainDataset(tmp_path, 16, scale=(0.2, 1e308))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "skipping unreadable image"
        with pytest.raises(OverflowError):
            for _ in range(20):  # each draw overflows with probability ~1 - 1e-300
                ds[0]
        seen = []

        def failing(*args):
            seen.append(args[:2])
            raise ZeroDivisionError("drawn wrong")

        monkeypatch.setattr(dataset_mod, "crop_params", failing)
        with pytest.raises(ZeroDivisionError, match="drawn wrong"):
            data.PretrainDataset(tmp_path, 16)[1]
    assert ds.num_skipped == 0 and seen == [(40, 60)]


def test_all_corrupt_is_an_error(tmp_path):
    _write(tmp_path / "bad.jpg", b"\xff\xd8 nothing")
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="no readable image"):
        data.PretrainDataset(tmp_path, 32)[0]


# ------------------------------------------------------------------------------ loader, device
def test_loader_batches_and_epochs_reach_persistent_workers(tmp_path):
    paths = [_write(tmp_path / "c" / f"{k}.jpg", _jpeg_bytes(_photo((100, 80), k))) for k in range(6)]
    ds = data.PretrainDataset(tmp_path, 24, seed=3)
    loader = data.make_loader(ds, 4, shuffle=False, num_workers=2, drop_last=False)
    assert loader.persistent_workers
    for epoch in (0, 1, 2):
        if epoch == 2:  # what the official loop calls: it sets the dataset's epoch too
            loader.sampler.set_epoch(epoch)
            assert ds.epoch == 2
        else:
            ds.set_epoch(epoch)
        batches = list(loader)
        imgs = torch.cat([b[0] for b in batches])
        assert imgs.dtype == torch.uint8 and imgs.shape == (6, 3, 24, 24)
        assert batches[0][1].dtype == torch.int64
        want = torch.stack([data.PretrainDataset(paths, 24, seed=3).load(i, epoch) for i in range(6)])
        assert torch.equal(imgs, want), f"epoch {epoch}: workers drew another augmentation"


def test_loader_over_a_subset_draws_each_epoch(tmp_path):
    """A dataset wrapping a PretrainDataset (Subset) gets no (epoch, index) pairs: its workers
    are not persistent by default, so each epoch's copy carries the epoch set on the dataset."""
    paths = [_write(tmp_path / f"{k}.jpg", _jpeg_bytes(_photo((100, 80), k))) for k in range(5)]
    ds = data.PretrainDataset(tmp_path, 24, seed=1)
    keep = [4, 0, 2]
    loader = data.make_loader(torch.utils.data.Subset(ds, keep), 3, shuffle=False, num_workers=2, drop_last=False)
    assert not loader.persistent_workers
    got = []
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        (imgs, _), = list(loader)
        want = torch.stack([data.PretrainDataset(paths, 24, seed=1).load(i, epoch) for i in keep])
        assert torch.equal(imgs, want), f"epoch {epoch}: workers drew another augmentation"
        got.append(imgs)
    assert not torch.equal(got[0], got[1])


def test_loader_defaults_and_errors(tmp_path):
    _write(tmp_path / "a.jpg", _jpeg_bytes(_photo((60, 40))))
    ds = data.PretrainDataset(tmp_path, 8)
    loader = data.make_loader(ds, 1, num_workers=0)
    assert loader.drop_last and not loader.persistent_workers
    imgs, labels = next(iter(loader))
    assert imgs.shape == (1, 3, 8, 8) and labels.tolist() == [0]
    with pytest.raises(ValueError, match="batch_size"):
        data.make_loader(ds, 0)
    with pytest.raises(ValueError, match="num_workers"):
        data.make_loader(ds, 1, num_workers=-1)
    with pytest.raises(ValueError, match="exclusive"):
        data.make_loader(ds, 1, sampler=torch.utils.data.SequentialSampler(ds), shuffle=True)


def test_to_device_normalises_like_the_official_pipeline():
    u8 = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    official = torch.stack([TF.normalize(TF.to_tensor(x.permute(1, 2, 0).numpy()), MEAN, STD) for x in u8])
    torch.testing.assert_close(data.to_device(u8, "cpu"), official, rtol=0, atol=0)
    assert data.to_device(u8, "cpu", dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="uint8"):
        data.to_device(u8.float(), "cpu")


# ------------------------------------------------------------------------------ imports
def test_import_fastmae_needs_neither_torchvision_nor_pil():
    code = ("import sys, fastmae, fastmae.data; "
            "bad = [m for m in ('torchvision', 'PIL') if m in sys.modules]; assert not bad, bad")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


def test_missing_torchvision_is_a_clear_error():
    code = ("import sys; sys.modules['torchvision'] = None\n"
            "try:\n    import fastmae.data\nexcept ImportError as e:\n    print(e)\n"
            "else:\n    raise SystemExit('imported')")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120, capture_output=True,
                         text=True)  # fmt: skip
    assert "needs torchvision" in out.stdout and "pip install" in out.stdout


# ------------------------------------------------------------------------------ benchmark
def test_bench_data_smoke(tmp_path):
    from benchmarks import bench_data

    record = bench_data.main(["--images", "3", "--rounds", "1", "--batch-size", "2", "--out", str(tmp_path),
                              "--device-transfer", "cpu", "--transfer-batch", "2"])  # fmt: skip
    files = list(tmp_path.glob("bench-data-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["kind"] == "data"
    pipes = record["results"]["pipelines"]
    assert set(pipes) == {"official", "fastmae", "fastmae_torchvision_decode", "fastmae_full_decode"}
    assert record["results"]["jpeg_decoder"] in ("fastmae._jpeg", "torchvision")
    assert all(p["images_per_cpu_s_median"] > 0 for p in pipes.values())
    assert record["env"]["card"].startswith("cpu")
    t = record["results"]["device_transfer"]
    assert t["batch_size"] == 2 and t["fastmae_uint8_copy_and_normalize_ms_median"] > 0
