"""``fastmae visualize CHECKPOINT IMAGE``: the official MAE demo's 4-panel reconstruction figure.

The panels of the official notebook (``demo/mae_visualize.ipynb``, ``run_one_image``):
*original*, *masked* (removed patches blanked), *reconstruction* (the decoder's prediction of
every patch) and *reconstruction + visible* (the visible patches pasted over the prediction).

Input convention (:func:`save_reconstruction`): an image file (anything PIL reads; converted
to RGB, its shorter side resized to the model's input size with bicubic filtering, then
center-cropped), or a uint8 tensor ``(3, H, W)`` in RGB order as :class:`fastmae.data`
yields (resized and center-cropped the same way when it is not the model's size). Pixels
are then normalised with the ImageNet mean and std, as in training. :func:`reconstruct`
takes the already-normalised batch ``(N, 3, H, W)``.

Norm-pix models (``norm_pix_loss=True``) predict each patch normalised by its own mean and
variance, which the decoder never sees. To display a predicted patch it must be
un-normalised, and the masked patch's own statistics would leak the answer. fastmae uses
statistics of the **visible** patches only, per image: with ``m_i`` and ``v_i`` the mean
and the unbiased variance of visible patch ``i`` over its ``p*p*3`` values (the loss's
definition, in ImageNet-normalised pixels),

    mean = average of m_i over the visible patches,  var = average of v_i over them,
    pixels = pred * sqrt(var + 1e-6) + mean        (every patch, from the same two numbers)

so nothing in the figure's last three panels depends on the masked patches' pixels; the
figure's caption says so.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "reconstruct", "save_reconstruction", "load_image",
           "figure_size", "add_arguments", "run"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PANELS = ("original", "masked", "reconstruction", "reconstruction + visible")
PANEL_KEYS = ("original", "masked", "reconstruction", "reconstruction_visible")
_PANEL_INCHES = 3.2
_CAPTION_INCHES = 0.9
_DPI = 100


def figure_size() -> tuple[int, int]:
    """The PNG's (width, height) in pixels: four square panels in a row above a caption."""
    return round(4 * _PANEL_INCHES * _DPI), round((_PANEL_INCHES + _CAPTION_INCHES) * _DPI)


# ----------------------------------------------------------------------------- images
def _model_geometry(model) -> tuple[int, int]:
    """(input size, patch size) of an MAE with a ``patch_embed`` (fastmae's or the official one)."""
    pe = getattr(model, "patch_embed", None)
    if pe is None:
        raise TypeError(f"model must be an MAE with a 'patch_embed' (fastmae's or the official "
                        f"MaskedAutoencoderViT), got {type(model).__name__}")
    size = pe.img_size if isinstance(pe.img_size, (tuple, list)) else (pe.img_size, pe.img_size)
    patch = pe.patch_size if isinstance(pe.patch_size, (tuple, list)) else (pe.patch_size, pe.patch_size)
    if size[0] != size[1]:
        raise ValueError(f"model input size {tuple(size)} is not square")
    return int(size[0]), int(patch[0])


def _resize_center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, size, size): shorter side to ``size`` (bicubic, antialiased), center crop."""
    _, h, w = img.shape
    if (h, w) == (size, size):
        return img
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(img[None].float(), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[0, :, top:top + size, left:left + size].round().clamp(0, 255).to(torch.uint8)


def load_image(image, size: int) -> torch.Tensor:
    """An image file path or a uint8 (3, H, W) RGB tensor -> uint8 (3, size, size) (see the module docstring)."""
    if isinstance(image, (str, os.PathLike)):
        from PIL import Image, UnidentifiedImageError

        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image: no file at {path!r}")
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                w, h = im.size
                scale = size / min(w, h)
                nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
                im = im.resize((nw, nh), Image.Resampling.BICUBIC)
                left, top = (nw - size) // 2, (nh - size) // 2
                im = im.crop((left, top, left + size, top + size))
                data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"image: cannot read {path!r} as an image ({e})") from e
        return data.view(size, size, 3).permute(2, 0, 1).contiguous()
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise TypeError(f"image must be a uint8 (3, H, W) RGB tensor or an image file path, got a "
                            f"{image.dtype} tensor of shape {tuple(image.shape)} (for normalised float images "
                            "use fastmae.visualize.reconstruct)")
        return _resize_center_crop(image.cpu(), size)
    raise TypeError(f"image must be an image file path or a uint8 (3, H, W) tensor, got {type(image).__name__}")


def _normalise(img_u8: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (img_u8.float() / 255.0 - mean) / std


def _to_display(x: torch.Tensor):
    """ImageNet-normalised (3, H, W) -> uint8 (H, W, 3) numpy, as the demo's show_image does."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return torch.clip((x.float().cpu() * std + mean) * 255, 0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


# ----------------------------------------------------------------------------- reconstruction
def _visible_stats(target: torch.Tensor, visible: torch.Tensor):
    """Per image: the mean over visible patches of each patch's mean and unbiased variance."""
    m = target.mean(dim=-1)  # (N, L)
    v = target.var(dim=-1)  # (N, L), unbiased: the loss's definition
    zero = torch.zeros((), dtype=target.dtype, device=target.device)
    n = visible.sum(dim=1).to(target.dtype)  # (N,)
    mean = torch.where(visible, m, zero).sum(dim=1) / n
    var = torch.where(visible, v, zero).sum(dim=1) / n
    return mean, var


def _run_model(model, imgs, mask_ratio, noise, seed):
    import inspect

    try:
        takes_noise = "noise" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes_noise = False
    if takes_noise:  # fastmae's model, or one patched by apply_fastmae
        return model(imgs, mask_ratio=mask_ratio, noise=noise)
    # the official forward(imgs, mask_ratio) draws torch.rand(N, L) itself: seed it, leaving the caller's RNG be
    with torch.random.fork_rng(devices=[imgs.device] if imgs.device.type == "cuda" else []):
        torch.manual_seed(seed)
        return model(imgs, mask_ratio)


@torch.no_grad()
def reconstruct(model, imgs_normalised: torch.Tensor, mask_ratio: float = 0.75, seed: int = 0) -> dict:
    """The four panels for a batch of ImageNet-normalised images ``(N, 3, H, W)``.

    Returns a dict of ``(N, 3, H, W)`` float tensors in normalised pixels (``original``,
    ``masked``, ``reconstruction``, ``reconstruction_visible``), plus ``mask`` ``(N, L)``
    (1 = removed), ``loss`` (the model's) and ``norm_pix`` (whether predictions were
    un-normalised with the visible patches' statistics). The masking noise is
    ``torch.rand(N, L)`` from a CPU generator seeded with ``seed`` (for a model whose forward
    takes no ``noise``, the official one unpatched, torch's RNG is seeded with ``seed`` around
    the call instead: the same patches on CPU), so a seed picks the same patches everywhere.
    """
    if not isinstance(imgs_normalised, torch.Tensor) or imgs_normalised.dim() != 4:
        raise TypeError("imgs_normalised must be a (N, 3, H, W) float tensor")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    size, p = _model_geometry(model)
    if tuple(imgs_normalised.shape[1:]) != (3, size, size):
        raise ValueError(f"imgs_normalised must be (N, 3, {size}, {size}) for this model, "
                         f"got {tuple(imgs_normalised.shape)}")
    from . import reference

    reference.num_kept((size // p) ** 2, mask_ratio)  # a clear error for a bad mask_ratio
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        x = imgs_normalised.to(device=param.device, dtype=param.dtype)
        N, L = x.shape[0], (size // p) ** 2
        noise = torch.rand(N, L, generator=torch.Generator().manual_seed(seed)).to(x.device)
        loss, pred, mask = _run_model(model, x, mask_ratio, noise, seed)
    finally:
        model.train(was_training)
    pred, mask = pred.float(), mask.float()
    x = x.float()
    norm_pix = bool(getattr(model, "norm_pix_loss", False))
    if norm_pix:
        target = reference.patchify(x, p)
        mean, var = _visible_stats(target, mask == 0)
        pred = pred * (var + 1.0e-6).sqrt()[:, None, None] + mean[:, None, None]
    y = reference.unpatchify(pred, p)
    m = reference.unpatchify(mask.unsqueeze(-1).expand(-1, -1, p * p * 3), p)
    return {
        "original": x,
        "masked": x * (1 - m),
        "reconstruction": y,
        "reconstruction_visible": x * (1 - m) + y * m,
        "mask": mask,
        "loss": float(loss),
        "norm_pix": norm_pix,
    }


def _atomic_write(path: Path, write) -> None:
    """Temp file beside ``path`` (usual permissions), fsync, rename: the pretraining checkpoints' writer."""
    from .pretrain.checkpoint import atomic_write

    atomic_write(str(path), write)


def _caption(panels: dict, mask_ratio: float, seed: int, title: str | None) -> str:
    kept = int((panels["mask"][0] == 0).sum())
    L = panels["mask"].shape[1]
    lines = [f"{title + ': ' if title else ''}mask ratio {mask_ratio} ({L - kept} of {L} patches removed), "
             f"seed {seed}, loss {panels['loss']:.4f}"]
    if panels["norm_pix"]:
        lines.append("norm-pix model: each predicted patch is un-normalised with the mean and variance of the "
                     "VISIBLE patches")
        lines.append("(averaged per image), never with the masked patch's own pixels, which would leak the answer")
    return "\n".join(lines)


def save_figure(panels: dict, path, *, mask_ratio: float, seed: int, title: str | None = None, index: int = 0):
    """Write image ``index`` of :func:`reconstruct`'s panels as the 4-panel PNG (atomically); returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    w, h = figure_size()
    fig = Figure(figsize=(w / _DPI, h / _DPI), dpi=_DPI)
    FigureCanvasAgg(fig)
    bottom = _CAPTION_INCHES / (_PANEL_INCHES + _CAPTION_INCHES)
    for i, (key, name) in enumerate(zip(PANEL_KEYS, PANELS)):
        ax = fig.add_axes((i / 4 + 0.005, bottom, 0.24, 0.86 * (1 - bottom)))
        ax.imshow(_to_display(panels[key][index]), interpolation="nearest")
        ax.set_title(name, fontsize=12)
        ax.axis("off")
    fig.text(0.5, 0.04, _caption(panels, mask_ratio, seed, title), ha="center", va="bottom", fontsize=8.5)
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=_DPI))
    return path


def save_reconstruction(model, image, path, *, mask_ratio: float = 0.75, seed: int = 0,
                        title: str | None = None) -> Path:
    """The demo's 4-panel figure of ``model`` on ``image``, written as a PNG at ``path``; returns the path.

    ``image``: an image file path or a uint8 ``(3, H, W)`` RGB tensor (see the module docstring).
    """
    size, _ = _model_geometry(model)
    img = load_image(image, size)
    panels = reconstruct(model, _normalise(img)[None], mask_ratio, seed)
    return save_figure(panels, path, mask_ratio=mask_ratio, seed=seed, title=title)


# ----------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="official-layout checkpoint ({'model': state_dict, 'args': ...}) or a bare state dict")
    p.add_argument("image", metavar="IMAGE", help="image file (resized and center-cropped to --input_size)")
    p.add_argument("--out", default=None, metavar="PNG", help="output PNG (default: <IMAGE stem>_mae.png here)")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="model name, e.g. mae_vit_large_patch16 (default: the checkpoint's args.model)")
    p.add_argument("--mask_ratio", default=0.75, type=float, help="fraction of patches removed (default 0.75)")
    p.add_argument("--seed", default=0, type=int, help="seed of the random mask (default 0)")
    p.add_argument("--input_size", default=None, type=int,
                   help="image size (default: the checkpoint's args.input_size, else 224)")
    p.add_argument("--norm_pix_loss", default=None, action=argparse.BooleanOptionalAction,
                   help="the model was trained with normalised-pixel targets (default: the checkpoint's "
                        "args.norm_pix_loss, else false)")
    p.add_argument("--device", default="cpu", help="device to run on (default cpu)")


class VisualizeError(ValueError):
    """A checkpoint, image or option that cannot be used; the message says why."""


def _load_checkpoint(path: str):
    if not os.path.isfile(path):
        raise VisualizeError(f"CHECKPOINT: no file at {path!r}")
    try:
        from .pretrain.checkpoint import SAFE_GLOBALS  # argparse.Namespace and the pathlib paths of official args

        with torch.serialization.safe_globals(SAFE_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise VisualizeError(f"CHECKPOINT {path!r} cannot be read as a torch checkpoint (truncated, corrupt, or "
                             f"holding objects other than tensors, argparse.Namespace and pathlib paths): "
                             f"{first}") from e
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        return ckpt["model"], ckpt.get("args")
    if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt, None  # a bare state dict
    raise VisualizeError(f"CHECKPOINT {path!r} is neither an official-layout checkpoint (a dict with a 'model' "
                         f"state_dict) nor a bare state dict")


def _arg(args, name):
    if args is None:
        return None
    return args.get(name) if isinstance(args, dict) else getattr(args, name, None)


def _build(name: str, input_size: int, norm_pix_loss: bool):
    from .models import mae

    names = sorted(n for n in dir(mae) if n.startswith("mae_vit_") and callable(getattr(mae, n)))
    if name not in names:
        raise VisualizeError(f"--model {name!r} is not one of fastmae's models: {', '.join(names)}")
    return getattr(mae, name)(img_size=input_size, norm_pix_loss=norm_pix_loss)


def _load_state(model, state: dict, path: str, name: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing and all(k.startswith(("decoder", "mask_token")) for k in missing):
        raise VisualizeError(f"CHECKPOINT {path!r} has no decoder ({', '.join(missing[:3])}, ... missing): an "
                             "encoder-only checkpoint (such as the official mae_pretrain_vit_*.pth) cannot "
                             "reconstruct; use one with the decoder (e.g. mae_visualize_vit_*.pth)")
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append(f"shape mismatch {'; '.join(shapes[:3])}{' ...' if len(shapes) > 3 else ''}")
        raise VisualizeError(f"CHECKPOINT {path!r} does not fit --model {name} (check --model and "
                             f"--input_size): {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)


def run(args, command: str | None = None) -> int:
    """``fastmae visualize``: returns the exit status (0 written, 2 bad input)."""
    import sys

    from ._timing import cli_device

    if cli_device(args.device, "fastmae visualize") is None:
        return 2
    try:
        out = write_from_checkpoint(args)
    except (VisualizeError, FileNotFoundError, TypeError, ValueError) as e:
        print(f"fastmae visualize: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # matplotlib / Pillow: optional, needed only here
        print(f"fastmae visualize: error: {e}; install matplotlib and Pillow (pip install matplotlib pillow)",
              file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def write_from_checkpoint(args) -> Path:
    state, ck_args = _load_checkpoint(args.checkpoint)
    name = args.model or _arg(ck_args, "model")
    if not name:
        raise VisualizeError(f"CHECKPOINT {args.checkpoint!r} does not name its model (no args.model): "
                             "pass --model, e.g. --model mae_vit_large_patch16")
    input_size = args.input_size or _arg(ck_args, "input_size") or 224
    norm_pix = args.norm_pix_loss if args.norm_pix_loss is not None else bool(_arg(ck_args, "norm_pix_loss"))
    if not os.path.isfile(args.image):
        raise VisualizeError(f"IMAGE: no file at {args.image!r}")
    model = _build(name, int(input_size), norm_pix)
    _load_state(model, state, args.checkpoint, name)
    model.to(args.device)
    out = args.out or f"{Path(args.image).stem}_mae.png"
    return save_reconstruction(model, args.image, out, mask_ratio=args.mask_ratio, seed=args.seed,
                               title=f"{name} ({Path(args.checkpoint).name})")
