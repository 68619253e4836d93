"""fastmae.visualize and ``fastmae visualize``: the demo's 4-panel PNG, the no-leak un-normalisation
of norm-pix predictions, the input conventions, and the CLI's errors."""

import argparse
import copy
import os

import numpy as np
import official_mae
import pytest
import torch
import torch.nn as nn
from PIL import Image

import fastmae
from fastmae import cli
from fastmae import reference as ref
from fastmae import visualize as V
from fastmae.models.mae import mae_vit_tiny_patch8


def tiny(norm_pix_loss=True, **kw):
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=24,
               decoder_depth=1, decoder_num_heads=2, mlp_ratio=2.0, norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6),
               norm_pix_loss=norm_pix_loss)
    cfg.update(kw)
    return fastmae.MaskedAutoencoderViT(**cfg)


def _photo(h=48, w=40):
    """A random-but-structured uint8 RGB image (smooth gradients plus noise), (3, h, w)."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([yy, xx, (yy + xx) / 2]) * 200
    return (base + torch.rand(3, h, w) * 55).clamp(0, 255).to(torch.uint8)


def _masked_pixels(mask, p, size):
    """(N, 3, size, size) bool: the pixels of removed patches."""
    m = mask.unsqueeze(-1).expand(-1, -1, p * p * 3)
    return ref.unpatchify(m, p).bool()[:, :, :size, :size]


# ----------------------------------------------------------------------------- the PNG
def test_png_written_with_four_panels(tmp_path):
    out = V.save_reconstruction(tiny(), _photo(), tmp_path / "sub" / "r.png", mask_ratio=0.75, seed=0)
    assert out == tmp_path / "sub" / "r.png"
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.size == V.figure_size()
        a = np.asarray(im.convert("RGB"))
    w, h = V.figure_size()
    band = a[int(0.15 * h): int(0.7 * h)]  # the panels' rows, above the caption
    for i in range(4):  # each quarter of the width holds an image, not the white background
        quarter = band[:, i * w // 4 + 10: (i + 1) * w // 4 - 10]
        assert (quarter < 245).any(axis=-1).mean() > 0.5, i
    assert not list(tmp_path.glob("sub/.*tmp"))  # the atomic write left no temp file
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # the usual permissions, not mkstemp's 0600


def test_reconstruction_definition():
    """norm-pix: every predicted patch un-normalised with the mean over visible patches of their
    means and unbiased variances (per image); otherwise the prediction is used as it is."""
    imgs = V._normalise(_photo(32, 32))[None].repeat(2, 1, 1, 1)
    imgs[1] = imgs[1].flip(-1)
    for norm_pix in (True, False):
        m = tiny(norm_pix_loss=norm_pix)
        panels = V.reconstruct(m, imgs, mask_ratio=0.5, seed=3)
        noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            _, pred, mask = m.eval()(imgs, 0.5, noise)
        assert torch.equal(panels["mask"], mask)
        if norm_pix:
            t = ref.patchify(imgs, 8)
            vis = mask == 0
            mean = torch.stack([t[i][vis[i]].mean(-1).mean() for i in range(2)])
            var = torch.stack([t[i][vis[i]].var(-1).mean() for i in range(2)])
            pred = pred * (var + 1e-6).sqrt()[:, None, None] + mean[:, None, None]
        torch.testing.assert_close(panels["reconstruction"], ref.unpatchify(pred, 8), rtol=1e-6, atol=1e-6)
        mp = _masked_pixels(mask, 8, 32)
        assert torch.equal(panels["masked"], torch.where(mp, 0.0, imgs))
        assert torch.equal(panels["reconstruction_visible"][~mp], imgs[~mp])
        assert torch.equal(panels["reconstruction_visible"][mp], panels["reconstruction"][mp])
        assert panels["norm_pix"] is norm_pix


def test_masked_pixels_do_not_leak():
    """Changing the removed patches' true pixels changes nothing but the 'original' panel."""
    m = tiny(norm_pix_loss=True)
    imgs = V._normalise(_photo(32, 32))[None]
    a = V.reconstruct(m, imgs, mask_ratio=0.75, seed=5)
    mp = _masked_pixels(a["mask"], 8, 32)
    other = torch.where(mp, torch.randn_like(imgs) * 3 + 2, imgs)  # very different statistics
    b = V.reconstruct(m, other, mask_ratio=0.75, seed=5)
    assert torch.equal(a["mask"], b["mask"])
    for k in ("masked", "reconstruction", "reconstruction_visible"):
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["original"], b["original"])
    # while the visible patches do matter (the statistics come from them)
    vis_changed = torch.where(mp, imgs, imgs * 2 + 1)
    c = V.reconstruct(m, vis_changed, mask_ratio=0.75, seed=5)
    assert not torch.equal(a["reconstruction"][mp], c["reconstruction"][mp])


def test_caption_says_where_statistics_come_from(tmp_path, monkeypatch):
    texts = []
    from matplotlib.figure import Figure

    real = Figure.text

    def spy(self, x, y, s, *a, **k):
        texts.append(s)
        return real(self, x, y, s, *a, **k)

    monkeypatch.setattr(Figure, "text", spy)
    V.save_reconstruction(tiny(norm_pix_loss=True), _photo(), tmp_path / "a.png")
    assert "VISIBLE patches" in texts[-1] and "never with the masked patch's own pixels" in texts[-1]
    V.save_reconstruction(tiny(norm_pix_loss=False), _photo(), tmp_path / "b.png", mask_ratio=0.5, seed=2)
    assert "VISIBLE" not in texts[-1] and "mask ratio 0.5 (8 of 16 patches removed), seed 2" in texts[-1]


def test_seed_and_mask_ratio():
    m = tiny()
    imgs = V._normalise(_photo(32, 32))[None]
    a, b, c = (V.reconstruct(m, imgs, 0.75, s)["mask"] for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert V.reconstruct(m, imgs, 0.5, 0)["mask"].sum() == 8
    state = torch.get_rng_state()
    V.reconstruct(m, imgs, 0.75, 0)
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is left alone
    with pytest.raises(ValueError, match="mask_ratio"):
        V.reconstruct(m, imgs, 1.0, 0)
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        V.reconstruct(m, torch.randn(1, 3, 16, 16), 0.75, 0)
    assert m.training  # restored after the eval-mode forward


def test_official_model_with_and_without_patching():
    """The official forward takes no noise: its torch.rand is seeded; patched, the same patches."""
    stock = official_mae.tiny(img_size=32, patch_size=8)
    imgs = V._normalise(_photo(32, 32))[None]
    a = V.reconstruct(stock, imgs, 0.75, 4)
    b = V.reconstruct(fastmae.apply_fastmae(copy.deepcopy(stock)), imgs, 0.75, 4)
    assert torch.equal(a["mask"], b["mask"]) and a["mask"].sum() == 12
    torch.testing.assert_close(a["reconstruction"], b["reconstruction"], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- inputs
def test_image_inputs(tmp_path):
    img = _photo(32, 32)
    path = tmp_path / "x.png"
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(path)
    assert torch.equal(V.load_image(path, 32), img)  # a file already at the size: exact
    assert torch.equal(V.load_image(str(path), 32), V.load_image(img, 32))
    wide = tmp_path / "wide.jpg"
    Image.fromarray(_photo(30, 70).permute(1, 2, 0).numpy()).save(wide, quality=90)
    for x in (wide, _photo(30, 70), _photo(90, 33)):
        y = V.load_image(x, 32)
        assert y.dtype == torch.uint8 and y.shape == (3, 32, 32)
    with pytest.raises(TypeError, match="uint8"):
        V.load_image(torch.rand(3, 32, 32), 32)
    with pytest.raises(TypeError, match="uint8"):
        V.load_image(torch.zeros(32, 32, 3, dtype=torch.uint8), 32)
    with pytest.raises(FileNotFoundError, match="no file"):
        V.load_image(tmp_path / "missing.png", 32)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read"):
        V.load_image(bad, 32)
    with pytest.raises(TypeError, match="patch_embed"):
        V.save_reconstruction(nn.Linear(2, 2), img, tmp_path / "z.png")


# ----------------------------------------------------------------------------- CLI
@pytest.fixture
def files(tmp_path):
    torch.manual_seed(0)
    model = mae_vit_tiny_patch8(img_size=32, norm_pix_loss=True)
    sd = model.state_dict()
    ck = tmp_path / "checkpoint-0.pth"
    torch.save({"model": sd, "epoch": 0, "args": argparse.Namespace(model="mae_vit_tiny_patch8", input_size=32,
                                                                    norm_pix_loss=True)}, ck)
    bare = tmp_path / "bare.pth"
    torch.save(sd, bare)
    enc = tmp_path / "encoder.pth"
    torch.save({"model": {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))}}, enc)
    img = tmp_path / "photo.jpg"
    Image.fromarray(_photo(50, 64).permute(1, 2, 0).numpy()).save(img)
    return dict(ck=str(ck), bare=str(bare), enc=str(enc), img=str(img), dir=tmp_path)


def test_cli_writes_png(files, capsys):
    out = files["dir"] / "fig.png"
    assert cli.main(["visualize", files["ck"], files["img"], "--out", str(out), "--seed", "1"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    with Image.open(out) as im:
        assert im.size == V.figure_size()
    out2 = files["dir"] / "fig2.png"
    assert cli.main(["visualize", files["bare"], files["img"], "--out", str(out2), "--model", "mae_vit_tiny_patch8",
                     "--input_size", "32", "--norm_pix_loss"]) == 0
    assert out2.is_file()


@pytest.mark.parametrize("case,msg", [
    (lambda f: [f["bare"], f["img"]], "does not name its model"),
    (lambda f: [f["dir"] / "nope.pth", f["img"]], "CHECKPOINT: no file"),
    (lambda f: [f["ck"], f["dir"] / "nope.jpg"], "IMAGE: no file"),
    (lambda f: [f["enc"], f["img"], "--model", "mae_vit_tiny_patch8", "--input_size", "32"], "no decoder"),
    (lambda f: [f["ck"], f["img"], "--input_size", "64"], "does not fit --model mae_vit_tiny_patch8"),
    (lambda f: [f["ck"], f["img"], "--model", "mae_vit_base_patch16"], "does not fit --model mae_vit_base_patch16"),
    (lambda f: [f["ck"], f["img"], "--model", "resnet50"], "not one of fastmae's models"),
    (lambda f: [f["ck"], f["img"], "--mask_ratio", "1.0"], "mask_ratio"),
    (lambda f: [f["corrupt"], f["img"]], "cannot be read"),
    (lambda f: [f["truncated"], f["img"]], "cannot be read"),
])
def test_cli_errors(files, case, msg, capsys):
    (files["dir"] / "corrupt.pth").write_bytes(b"\x00garbage" * 10)
    files["corrupt"] = str(files["dir"] / "corrupt.pth")
    data = open(files["ck"], "rb").read()
    (files["dir"] / "truncated.pth").write_bytes(data[: len(data) // 2])
    files["truncated"] = str(files["dir"] / "truncated.pth")
    argv = ["visualize", *map(str, case(files)), "--out", str(files["dir"] / "never.png")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and err.startswith("fastmae visualize: error:")
    assert not (files["dir"] / "never.png").exists()


def test_cli_reads_checkpoints_with_pathlib_args(files, capsys):
    """The official submitit_pretrain.py puts pathlib paths into args: such a checkpoint loads."""
    import pathlib

    ck = torch.load(files["ck"], weights_only=False)
    ck["args"].output_dir, ck["args"].log_dir = pathlib.Path("/checkpoint/u/1"), pathlib.PurePosixPath("/log")
    path = files["dir"] / "submitit.pth"
    torch.save(ck, path)
    out = files["dir"] / "fig.png"
    assert cli.main(["visualize", str(path), files["img"], "--out", str(out)]) == 0 and out.is_file()


@pytest.mark.parametrize("command", [["validate"], ["bench"], ["visualize", "a.pth", "b.jpg"]])
@pytest.mark.parametrize("device, msg", [("gpu", "is not a device name"), ("cuda", "no CUDA device"),
                                         ("meta", "runs on cpu or cuda")])
def test_cli_device_errors(command, device, msg, capsys):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert cli.main([*command, "--device", device]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastmae {command[0]}: --device") and msg in err


def test_cli_argument_errors(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["visualize", "only-one-arg"])
    assert e.value.code == 2 and "IMAGE" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["visualize", "a.pth", "b.jpg", "--mask_ratio", "lots"])
    assert e.value.code == 2 and "--mask_ratio" in capsys.readouterr().err
