"""Plain-PyTorch reference ops: the oracle every fastmae kernel is tested against.

Each function reproduces the semantics of the official MAE code
(facebookresearch/mae, ``models_mae.py`` and ``util/pos_embed.py``) exactly,
written as directly as possible so that it can be read against the paper.
Nothing here is fast; everything here is the definition.

Conventions shared by all ops:

* images are ``(N, C, H, W)``; tokens are ``(N, L, D)`` with ``L = (H/p)(W/p)``
  patches in row-major grid order;
* a patch is flattened in (row, column, channel) order, channel innermost
  (the official ``einsum('nchpwq->nhwpqc')``);
* ``mask`` is float32, 0 for kept (visible) tokens and 1 for removed ones,
  in the original token order; ``ids_restore`` is int64.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "patchify",
    "unpatchify",
    "random_masking",
    "encoder_input",
    "decoder_unshuffle",
    "mae_loss",
    "attention",
    "attention_qkvpacked",
    "layer_norm",
    "add_layer_norm",
    "bias_gelu",
    "normalize_images",
    "get_2d_sincos_pos_embed",
    "num_kept",
]


# --------------------------------------------------------------------------- checks
def _check_tensor(name: str, t, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def _check_float(name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor, got {t.dtype}"
            + (" (convert integer images with .float() / 255 first)" if name == "imgs" else "")
        )


def _check_patch_size(patch_size) -> None:
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")


def mask_ratio_value(mask_ratio) -> float:
    """``mask_ratio`` as a Python float: a real number (a Python or NumPy scalar) or a 0-dim
    floating-point tensor, as the official code takes them; else a TypeError naming it."""
    if isinstance(mask_ratio, torch.Tensor):
        if mask_ratio.dim() == 0 and mask_ratio.is_floating_point():
            return float(mask_ratio)
    elif isinstance(mask_ratio, numbers.Real) and not isinstance(mask_ratio, (bool, np.bool_)):
        return float(mask_ratio)
    raise TypeError(f"mask_ratio must be a float (or a 0-dim float tensor), got {type(mask_ratio).__name__}"
                    + (f" of shape {tuple(mask_ratio.shape)} and dtype {mask_ratio.dtype}"
                       if isinstance(mask_ratio, torch.Tensor) else ""))


def num_kept(L: int, mask_ratio: float) -> int:
    """Number of visible tokens, ``int(L * (1 - mask_ratio))`` as in the official code.

    Raises ``ValueError`` naming ``mask_ratio`` when it is outside [0, 1) or leaves
    no visible token.
    """
    mask_ratio = mask_ratio_value(mask_ratio)
    if not (0.0 <= mask_ratio < 1.0) or math.isnan(mask_ratio):
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    len_keep = int(L * (1 - mask_ratio))
    if len_keep < 1:
        raise ValueError(
            f"mask_ratio={mask_ratio} leaves no visible token out of L={L} "
            f"(int(L * (1 - mask_ratio)) = {len_keep})"
        )
    return len_keep


def check_noise(noise, N: int, L: int, device: torch.device) -> None:
    """Validate a user-supplied masking noise tensor against the tokens' (N, L)."""
    _check_tensor("noise", noise)
    if tuple(noise.shape) != (N, L):
        raise ValueError(f"noise must have shape (N, L) = ({N}, {L}), got {tuple(noise.shape)}")
    if not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point tensor, got {noise.dtype}")
    if noise.device != device:
        raise ValueError(f"noise is on {noise.device} but the tokens are on {device}")


# --------------------------------------------------------------------------- patchify
def check_patchify(imgs, patch_size) -> None:
    _check_tensor("imgs", imgs, 4)
    _check_patch_size(patch_size)
    H, W = imgs.shape[-2:]
    if H % patch_size or W % patch_size:
        raise ValueError(f"image size {H}x{W} is not divisible by patch_size={patch_size}")


def check_unpatchify(x, patch_size, grid_size=None) -> tuple[int, int]:
    """Validate :func:`unpatchify`'s arguments; returns the patch grid (h, w)."""
    _check_tensor("x", x, 3)
    _check_patch_size(patch_size)
    N, L, D = x.shape
    if D % (patch_size * patch_size):
        raise ValueError(f"x's last dim {D} is not a multiple of patch_size**2 = {patch_size**2}")
    if grid_size is None:
        h = w = int(L**0.5 + 0.5)  # exact for perfect squares; math.isqrt breaks dynamic-shape tracing
        if h * w != L:
            raise ValueError(f"x has L={L} tokens, not a square grid; pass grid_size=(h, w)")
        return h, w
    h, w = grid_size
    if h * w != L:
        raise ValueError(f"grid_size={tuple(grid_size)} does not match L={L}")
    return h, w


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), patches row-major, (row, col, channel) inside."""
    check_patchify(imgs, patch_size)
    p = patch_size
    N, C, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(N, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(N, h * w, p * p * C)


def unpatchify(x: torch.Tensor, patch_size: int, grid_size: tuple[int, int] | None = None) -> torch.Tensor:
    """(N, L, p*p*C) -> (N, C, H, W); the inverse of :func:`patchify`.

    ``grid_size=(h, w)`` gives the patch grid; by default it is square, ``h = w = sqrt(L)``.
    """
    h, w = check_unpatchify(x, patch_size, grid_size)
    p = patch_size
    N, L, D = x.shape
    C = D // (p * p)
    x = x.reshape(N, h, w, p, p, C)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(N, C, h * p, w * p)


# --------------------------------------------------------------------------- masking
def check_random_masking(x, mask_ratio, noise=None) -> int:
    """Validate :func:`random_masking`'s arguments; returns ``len_keep``."""
    _check_tensor("x", x, 3)
    N, L, D = x.shape
    len_keep = num_kept(L, mask_ratio)
    if noise is not None:
        check_noise(noise, N, L, x.device)
    return len_keep


def check_encoder_input(x, pos_embed, cls_token, mask_ratio, noise=None) -> int:
    """Validate :func:`encoder_input`'s arguments; returns ``len_keep``."""
    len_keep = check_random_masking(x, mask_ratio, noise)
    _check_tensor("pos_embed", pos_embed, 3)
    _check_tensor("cls_token", cls_token, 3)
    N, L, D = x.shape
    if tuple(pos_embed.shape) != (1, 1 + L, D):
        raise ValueError(f"pos_embed must have shape (1, 1+L, D) = (1, {1 + L}, {D}), got {tuple(pos_embed.shape)}")
    if tuple(cls_token.shape) != (1, 1, D):
        raise ValueError(f"cls_token must have shape (1, 1, {D}), got {tuple(cls_token.shape)}")
    for name, t in (("pos_embed", pos_embed), ("cls_token", cls_token)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    return len_keep


def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
    """Per-sample random masking by sorting noise (the official ``random_masking``).

    Returns ``(x_masked, mask, ids_restore)``: the ``len_keep = int(L*(1-mask_ratio))``
    tokens with the smallest noise, in ascending-noise order; the float32 binary mask
    (0 keep, 1 remove) in the original order; and ``ids_restore = argsort(ids_shuffle)``.
    Ties in ``noise`` are broken by token index (a stable argsort).
    """
    len_keep = check_random_masking(x, mask_ratio, noise)
    N, L, D = x.shape
    if noise is None:
        noise = torch.rand(N, L, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)  # ascend: small is keep
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones([N, L], device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore


def encoder_input(
    x: torch.Tensor,
    pos_embed: torch.Tensor,
    cls_token: torch.Tensor,
    mask_ratio: float,
    noise: torch.Tensor | None = None,
):
    """The encoder's input as in ``forward_encoder``, from patch embeddings to tokens.

    ``x`` (N, L, D) patch embeddings; ``pos_embed`` (1, 1+L, D) with the cls row first;
    ``cls_token`` (1, 1, D). Adds ``pos_embed[:, 1:]``, masks, and prepends
    ``cls_token + pos_embed[:, :1]``. Returns ``(tokens (N, 1+len_keep, D), mask,
    ids_restore)``; the tokens' dtype is the promotion of the three inputs' dtypes.
    """
    check_encoder_input(x, pos_embed, cls_token, mask_ratio, noise)
    x = x + pos_embed[:, 1:, :]
    x, mask, ids_restore = random_masking(x, mask_ratio, noise)
    cls = cls_token + pos_embed[:, :1, :]
    x = torch.cat((cls.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)
    return x, mask, ids_restore


def check_decoder_unshuffle(x, ids_restore, mask_token, pos_embed=None) -> None:
    _check_tensor("x", x, 3)
    _check_tensor("ids_restore", ids_restore, 2)
    _check_tensor("mask_token", mask_token, 3)
    N, T, D = x.shape
    if ids_restore.shape[0] != N:
        raise ValueError(f"ids_restore has batch {ids_restore.shape[0]} but x has batch {N}")
    if ids_restore.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"ids_restore must be an int64 or int32 tensor, got {ids_restore.dtype}")
    L = ids_restore.shape[1]
    if not 1 <= T - 1 <= L:
        raise ValueError(f"x must have 1 + len_keep tokens with 1 <= len_keep <= L={L}, got {T}")
    if tuple(mask_token.shape) != (1, 1, D):
        raise ValueError(f"mask_token must have shape (1, 1, {D}), got {tuple(mask_token.shape)}")
    if pos_embed is not None:
        _check_tensor("pos_embed", pos_embed, 3)
        if tuple(pos_embed.shape) != (1, 1 + L, D):
            raise ValueError(f"pos_embed must have shape (1, {1 + L}, {D}), got {tuple(pos_embed.shape)}")
    for name, t in (("ids_restore", ids_restore), ("mask_token", mask_token), ("pos_embed", pos_embed)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def decoder_unshuffle(
    x: torch.Tensor,
    ids_restore: torch.Tensor,
    mask_token: torch.Tensor,
    pos_embed: torch.Tensor | None = None,
) -> torch.Tensor:
    """The decoder's unshuffle as in ``forward_decoder`` (after ``decoder_embed``).

    ``x`` (N, 1+len_keep, D) with the cls token first; ``ids_restore`` (N, L);
    ``mask_token`` (1, 1, D); optional ``pos_embed`` (1, 1+L, D) added at the end.
    Appends ``L - len_keep`` mask tokens, restores the original order, keeps cls first.
    Returns (N, 1+L, D) in the promotion of the inputs' dtypes.
    """
    check_decoder_unshuffle(x, ids_restore, mask_token, pos_embed)
    N, T, D = x.shape
    L = ids_restore.shape[1]
    ids_restore = ids_restore.long()
    mask_tokens = mask_token.repeat(N, L + 1 - T, 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x_.shape[2]))
    x = torch.cat([x[:, :1, :].to(x_.dtype), x_], dim=1)
    if pos_embed is not None:
        x = x + pos_embed
    return x


# --------------------------------------------------------------------------- loss
def check_mae_loss(imgs, pred, mask, patch_size) -> None:
    check_patchify(imgs, patch_size)
    _check_float("imgs", imgs)
    _check_tensor("pred", pred, 3)
    _check_tensor("mask", mask, 2)
    N, C, H, W = imgs.shape
    shape = (N, (H // patch_size) * (W // patch_size), patch_size * patch_size * C)
    if tuple(pred.shape) != shape:
        raise ValueError(f"pred must have shape {shape} (the patchified imgs), got {tuple(pred.shape)}")
    _check_float("pred", pred)
    if tuple(mask.shape) != shape[:2]:
        raise ValueError(f"mask must have shape {shape[:2]}, got {tuple(mask.shape)}")
    for name, t in (("pred", pred), ("mask", mask)):
        if t.device != imgs.device:
            raise ValueError(f"{name} is on {t.device} but imgs is on {imgs.device}")


def mae_loss(
    imgs: torch.Tensor,
    pred: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_pix_loss: bool = False,
) -> torch.Tensor:
    """The official ``forward_loss``: MSE on removed patches, float32 math.

    target = patchify(imgs); with ``norm_pix_loss`` each patch is normalised by its
    mean and *unbiased* variance, ``(t - mean) / sqrt(var + 1e-6)``. The squared error
    is averaged over the patch, then over removed patches: ``(loss*mask).sum()/mask.sum()``.
    """
    check_mae_loss(imgs, pred, mask, patch_size)
    target = patchify(imgs, patch_size).float()
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = (pred.float() - target) ** 2
    loss = loss.mean(dim=-1)
    mask = mask.float()
    return (loss * mask).sum() / mask.sum()


# --------------------------------------------------------------------------- attention
def check_attention(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, 4)
        _check_float(name, t)
    if q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"q, k, v must have equal shapes, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise TypeError(f"q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def check_attention_qkvpacked(qkv) -> None:
    _check_tensor("qkv", qkv, 5)
    _check_float("qkv", qkv)
    if qkv.shape[2] != 3:
        raise ValueError(f"qkv must have shape (B, N, 3, H, D), got {tuple(qkv.shape)}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Plain softmax attention, non-causal; q, k, v and the result are (B, N, H, D).

    Computed in the inputs' dtype (upcast the inputs for a high-precision oracle).
    """
    check_attention(q, k, v)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, D)
    s = torch.matmul(qt, kt.transpose(-2, -1)) * scale
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p, vt).transpose(1, 2)


def attention_qkvpacked(qkv: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """:func:`attention` on the fused projection output ``qkv`` (B, N, 3, H, D)."""
    check_attention_qkvpacked(qkv)
    q, k, v = qkv.unbind(2)
    return attention(q, k, v, scale)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Attention through ``torch.nn.functional.scaled_dot_product_attention`` (B, N, H, D)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


# --------------------------------------------------------------------------- layer norm
def _check_eps(eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a positive finite float, got {eps!r}")


def _check_dtype_arg(name: str, dtype) -> None:
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"{name} must be None or a floating-point torch.dtype, got {dtype!r}")


def check_layer_norm(x, weight, bias, eps, out_dtype=None) -> None:
    """Validate :func:`layer_norm`'s arguments: x (..., D) float, weight / bias None or (D,) float."""
    _check_tensor("x", x)
    _check_float("x", x)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension (..., D), got shape {tuple(x.shape)}")
    D = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        _check_tensor(name, t)
        if tuple(t.shape) != (D,):
            raise ValueError(f"{name} must have shape (D,) = ({D},) (the last dim of x), got {tuple(t.shape)}")
        _check_float(name, t)
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    _check_eps(eps)
    _check_dtype_arg("out_dtype", out_dtype)


def check_add_layer_norm(x, residual, weight, bias, eps, out_dtype=None, residual_dtype=None) -> None:
    """Validate :func:`add_layer_norm`'s arguments (those of :func:`check_layer_norm`, and residual
    None or a float tensor of x's shape)."""
    check_layer_norm(x, weight, bias, eps, out_dtype)
    if residual is not None:
        _check_tensor("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        _check_float("residual", residual)
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device} but x is on {x.device}")
    _check_dtype_arg("residual_dtype", residual_dtype)


def layer_norm_math_dtype(*tensors) -> torch.dtype:
    """The dtype LayerNorm computes in: float64 when any input is float64, else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, eps: float = 1e-6, out_dtype: torch.dtype | None = None,
                   residual_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add fused with LayerNorm over the last dim: returns ``(y, s)``.

    ``s = x + residual`` computed in float32 (float64 if an input is) and stored in
    ``residual_dtype`` (default ``residual.dtype``; with ``residual=None``, ``s = x`` in
    ``residual_dtype`` or ``x.dtype``); ``y = layer_norm(s)`` of that stored ``s`` in float32
    math (``torch.nn.functional.layer_norm``, biased variance, ``eps`` inside the square
    root), affine with ``weight`` / ``bias`` when given, stored in ``out_dtype`` (default
    ``x.dtype``). Both outputs are differentiable.
    """
    check_add_layer_norm(x, residual, weight, bias, eps, out_dtype, residual_dtype)
    m = layer_norm_math_dtype(x, residual, weight, bias)
    if residual is None:
        s = x.to(residual_dtype or x.dtype)
    else:
        s = (x.to(m) + residual.to(m)).to(residual_dtype or residual.dtype)
    y = F.layer_norm(s.to(m), (x.shape[-1],), None if weight is None else weight.to(m),
                     None if bias is None else bias.to(m), eps)
    return y.to(out_dtype or x.dtype), s


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-6,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """LayerNorm over the last dim in float32 math, stored in ``out_dtype`` (default ``x.dtype``):
    ``add_layer_norm(x, None, weight, bias, eps, out_dtype)[0]``."""
    check_layer_norm(x, weight, bias, eps, out_dtype)
    return add_layer_norm(x, None, weight, bias, eps, out_dtype)[0]


# --------------------------------------------------------------------------- bias + GELU
def check_bias_gelu(x, bias) -> None:
    """Validate :func:`bias_gelu`'s arguments: x (..., H) float, bias (H,) float on x's device."""
    _check_tensor("x", x)
    _check_float("x", x)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension (..., H), got shape {tuple(x.shape)}")
    _check_tensor("bias", bias)
    H = x.shape[-1]
    if tuple(bias.shape) != (H,):
        raise ValueError(f"bias must have shape (H,) = ({H},) (the last dim of x), got {tuple(bias.shape)}")
    _check_float("bias", bias)
    if bias.device != x.device:
        raise ValueError(f"bias is on {bias.device} but x is on {x.device}")


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu(x + bias)`` with the exact GELU ``0.5 v (1 + erf(v / sqrt 2))``, ``v = x + bias``.

    Computed in float32 (float64 when an input is float64) from both inputs upcast, and
    returned in ``x``'s dtype: the MLP's fc1 bias and activation, with ``x`` the output of
    ``F.linear(x, fc1.weight)`` (bf16 under autocast) and ``bias`` the fp32 parameter.
    Differentiable in both; the bias gradient is the sum over rows of the float32
    gradient of ``v``.
    """
    check_bias_gelu(x, bias)
    m = torch.float64 if torch.float64 in (x.dtype, bias.dtype) else torch.float32
    return F.gelu(x.to(m) + bias.to(m)).to(x.dtype)


# --------------------------------------------------------------------------- image normalisation
NORMALIZE_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_normalize_images(imgs, mean, std, out_dtype) -> None:
    _check_tensor("imgs", imgs, 4)
    if imgs.dtype != torch.uint8:
        raise TypeError(f"imgs must be a uint8 tensor (N, C, H, W), got {imgs.dtype}")
    C = imgs.shape[1]
    if not 1 <= C <= 4:
        raise ValueError(f"imgs must have 1 to 4 channels (dim 1), got shape {tuple(imgs.shape)}")
    for name, v in (("mean", mean), ("std", std)):
        if isinstance(v, torch.Tensor) or not isinstance(v, (list, tuple)) or len(v) != C:
            raise ValueError(f"{name} must be a list or tuple of {C} floats (one per channel of imgs), got {v!r}")
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v):
            raise ValueError(f"{name} must hold finite floats, got {v!r}")
    if not all(x > 0 for x in std):
        raise ValueError(f"std must be positive, got {std!r}")
    if out_dtype not in NORMALIZE_OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {NORMALIZE_OUT_DTYPES}, got {out_dtype!r}")


def normalize_images(imgs: torch.Tensor, mean, std, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> ``(imgs / 255 - mean[c]) / std[c]`` in ``out_dtype``, contiguous.

    Exactly torchvision's ``ToTensor`` then ``Normalize(mean, std)`` on the CPU: float32
    ``x / 255`` with IEEE division, then ``(x - mean) / std`` with mean and std rounded to
    float32, then one rounding to ``out_dtype``. The divisor 255 is a tensor on ``imgs``'
    device: CUDA torch multiplies by the reciprocal when dividing by a Python number, which
    differs from ToTensor in the last bit for about half of the 256 values.
    """
    dev = imgs.device
    x = imgs.to(torch.float32) / torch.tensor(255.0, dtype=torch.float32, device=dev)
    m = torch.tensor(mean, dtype=torch.float32, device=dev).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=dev).view(-1, 1, 1)
    return ((x - m) / s).to(out_dtype).contiguous()


# --------------------------------------------------------------------------- pos embed
def _1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega  # (D/2,)
    out = np.einsum("m,d->md", pos.reshape(-1), omega)  # outer product
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size, cls_token: bool = False) -> np.ndarray:
    """2-D sin-cos position embedding, float64 ``(h*w [+1], embed_dim)``.

    The official ``get_2d_sincos_pos_embed``: the first half of the channels encodes the
    *w* (column) coordinate, the second half the row, each as [sin, cos] halves with
    ``omega = 1 / 10000**(i / (D/4))``; with ``cls_token`` a zero row comes first.
    ``grid_size`` is an int (square) or ``(h, w)``.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4 for the 2-D sin-cos embedding, got {embed_dim}")
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    grid_h = np.arange(gh, dtype=np.float32)
    grid_w = np.arange(gw, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)  # here w goes first
    grid = grid.reshape([2, 1, gh, gw])
    emb = np.concatenate([_1d_sincos(embed_dim // 2, grid[0]), _1d_sincos(embed_dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb
