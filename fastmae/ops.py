"""fastmae's ops, each with a ``backend=`` keyword (see :mod:`fastmae.backend`).

=================== =============================== ==========================================
op                  reference (``backend="torch"``)  Triton kernel (``backend="triton"``)
=================== =============================== ==========================================
patchify            :func:`fastmae.reference.patchify`         :mod:`fastmae.kernels.patchify`
unpatchify          :func:`fastmae.reference.unpatchify`       :mod:`fastmae.kernels.patchify`
random_masking      :func:`fastmae.reference.random_masking`   :mod:`fastmae.kernels.masking`
encoder_input       :func:`fastmae.reference.encoder_input`    :mod:`fastmae.kernels.masking`
decoder_unshuffle   :func:`fastmae.reference.decoder_unshuffle` :mod:`fastmae.kernels.unshuffle`
mae_loss            :func:`fastmae.reference.mae_loss`         :mod:`fastmae.kernels.loss`
attention           :func:`fastmae.reference.attention`        :mod:`fastmae.kernels.attention`
attention_qkvpacked :func:`fastmae.reference.attention_qkvpacked` :mod:`fastmae.kernels.attention`
bias_gelu           :func:`fastmae.reference.bias_gelu`        :mod:`fastmae.kernels.bias_gelu`
normalize_images    :func:`fastmae.reference.normalize_images` :mod:`fastmae.kernels.normalize`
layer_norm          :func:`fastmae.reference.layer_norm`       :mod:`fastmae.kernels.layer_norm`
add_layer_norm      :func:`fastmae.reference.add_layer_norm`   :mod:`fastmae.kernels.layer_norm`
=================== =============================== ==========================================

Arguments are validated here, once, whatever the backend: bad input raises a
``ValueError``/``TypeError`` naming the argument before any kernel runs.
"""

from __future__ import annotations

import sys

import torch

from . import reference as ref
from .backend import BackendUnavailableError, _import_error, get_backend, resolve

__all__ = [
    "patchify",
    "unpatchify",
    "random_masking",
    "encoder_input",
    "decoder_unshuffle",
    "mae_loss",
    "attention",
    "attention_qkvpacked",
    "bias_gelu",
    "normalize_images",
    "TRITON_ATTENTION_MAX_HEAD_DIM",
    "layer_norm",
    "add_layer_norm",
    "TRITON_LAYER_NORM_MAX_DIM",
]

# The Triton attention kernels hold whole head rows in their tiles (D padded to a power of
# two): head dims up to this are compiled for sm_90 in CI (tests/_aot.py) and tested. Above
# it ``backend="auto"`` takes SDPA and ``backend="triton"`` is a ValueError.
TRITON_ATTENTION_MAX_HEAD_DIM = 128
# The Triton LayerNorm kernels hold a whole row in registers: D up to this. Above it
# ``backend="auto"`` takes the reference and ``backend="triton"`` is a ValueError.
TRITON_LAYER_NORM_MAX_DIM = 2048

# op -> {backend: "module:function"}; modules are imported on first use, so that
# ``import fastmae`` never needs triton, xformers or the CUDA extension.
_IMPLS: dict[str, dict[str, str]] = {
    "patchify": {"triton": "fastmae.kernels.patchify:patchify", "ext": "fastmae.ext.patchify:patchify"},
    "unpatchify": {"triton": "fastmae.kernels.patchify:unpatchify", "ext": "fastmae.ext.patchify:unpatchify"},
    "random_masking": {"triton": "fastmae.kernels.masking:random_masking", "ext": "fastmae.ext.masking:random_masking"},
    "encoder_input": {"triton": "fastmae.kernels.masking:encoder_input", "ext": "fastmae.ext.masking:encoder_input"},
    "decoder_unshuffle": {"triton": "fastmae.kernels.unshuffle:decoder_unshuffle",
                          "ext": "fastmae.ext.unshuffle:decoder_unshuffle"},
    "mae_loss": {"triton": "fastmae.kernels.loss:mae_loss", "ext": "fastmae.ext.loss:mae_loss"},
    "attention": {"triton": "fastmae.kernels.attention:attention"},
    "attention_qkvpacked": {"triton": "fastmae.kernels.attention:attention_qkvpacked"},
    "bias_gelu": {"triton": "fastmae.kernels.bias_gelu:bias_gelu"},
    "normalize_images": {"triton": "fastmae.kernels.normalize:normalize_images"},
    "layer_norm": {"triton": "fastmae.kernels.layer_norm:layer_norm"},
    "add_layer_norm": {"triton": "fastmae.kernels.layer_norm:add_layer_norm"},
}
# backend="ext" (fastmae._C) for LayerNorm, bias + GELU and attention: fp32/fp16/bf16 (float64 is a
# TypeError there); attention N <= 256 and D in (32, 64, 80, 128), else a ValueError (fastmae/ext/attention.py)
_IMPLS["layer_norm"]["ext"] = "fastmae.ext.layer_norm:layer_norm"
_IMPLS["add_layer_norm"]["ext"] = "fastmae.ext.layer_norm:add_layer_norm"
_IMPLS["bias_gelu"]["ext"] = "fastmae.ext.bias_gelu:bias_gelu"
_IMPLS["attention"]["ext"] = "fastmae.ext.attention:attention"
_IMPLS["attention_qkvpacked"]["ext"] = "fastmae.ext.attention:attention_qkvpacked"


def _impl(op: str, backend: str):
    target = _IMPLS[op][backend]
    module, fn = target.split(":")
    # the import goes through backend._import_error, which torch.compile runs at trace time
    # and keeps as a constant (dynamo refuses to trace importlib: under fullgraph an error);
    # the imported module is then read from sys.modules, which dynamo traces
    err = _import_error(module)
    if err is not None:
        raise BackendUnavailableError(f"backend={backend!r} for {op}: cannot import {module} ({err})")
    return getattr(sys.modules[module], fn)


# The ops whose C++ kernel (backend="ext" on CPU tensors) ``backend="auto"`` takes for CPU
# tensors: those measured faster than the reference on CPU (benchmarks/bench_cpu_twins.py,
# benchmarks/results/cpu_twins.json); the others run the reference there.
# Measured 2026-12-02 15:50-15:53 UTC (AMD EPYC with AVX-512, 2 threads, load 1.2-1.5, ViT-B batch 8, four
# whole runs, glibc malloc pinned: see the benchmark's docstring), ext / reference: patchify 5.3x-5.6x,
# unpatchify 3.1x-3.7x, random_masking 4.8x-5.6x, encoder_input 4.6x-5.3x, decoder_unshuffle 5.1x-5.7x,
# mae_loss 7.0x-8.2x (forward + backward 3.6x-4.0x), bias_gelu 1.07x-1.29x (forward + backward 1.27x-1.35x)
# in fp32, 1.14x-1.37x (1.24x-1.54x) with bf16 and 1.11x-1.46x (1.30x-1.56x) with fp16 activations. Not
# taken: add_layer_norm (fp32 1.27x-1.36x forward but 0.99x-1.10x forward + backward; fp16 0.93x-1.76x
# forward), attention (fp32 1.02x-1.11x encoder, 1.44x-1.48x decoder, fp16 7.6x-16x, but bf16 0.70x-0.82x:
# the twin converts bf16 to fp32 and multiplies in fp32, the reference multiplies in bf16).
EXT_CPU_AUTO = frozenset({"patchify", "unpatchify", "random_masking", "encoder_input", "decoder_unshuffle",
                          "mae_loss", "bias_gelu"})


def _backend(op: str, backend, device: torch.device, attention: bool = False) -> str:
    implemented = {"torch", *_IMPLS[op]} | ({"sdpa", "xformers"} if attention else set())
    return resolve(backend, device, attention=attention, implemented=implemented,
                   auto_cpu=("ext",) if op in EXT_CPU_AUTO else ())


def _auto(backend) -> bool:
    """Whether ``backend`` (an op's argument) leaves the choice to fastmae: ``"auto"``, or None with
    a process default of auto, or of sdpa / xformers (which the other ops read as auto)."""
    if backend is not None:
        return backend == "auto"
    return get_backend() in ("auto", "sdpa", "xformers")


def _attention_backend(op: str, backend, device: torch.device, head_dim: int) -> str:
    b = _backend(op, backend, device, attention=True)
    if b == "triton" and head_dim > TRITON_ATTENTION_MAX_HEAD_DIM:
        if _auto(backend):
            return "sdpa"
        raise ValueError(f"head dim D={head_dim} (the last dim of q, k, v) is above the Triton attention "
                         f"kernels' limit of {TRITON_ATTENTION_MAX_HEAD_DIM}; use backend='sdpa' or 'auto'")
    return b


def patchify(imgs: torch.Tensor, patch_size: int, *, backend: str | None = None) -> torch.Tensor:
    """(N, C, H, W) images -> (N, L, patch_size**2 * C) patches (see :func:`fastmae.reference.patchify`)."""
    ref.check_patchify(imgs, patch_size)
    b = _backend("patchify", backend, imgs.device)
    if b == "torch":
        return ref.patchify(imgs, patch_size)
    return _impl("patchify", b)(imgs, patch_size)


def unpatchify(x: torch.Tensor, patch_size: int, grid_size=None, *, backend: str | None = None) -> torch.Tensor:
    """(N, L, patch_size**2 * C) -> (N, C, H, W), the inverse of :func:`patchify`."""
    ref.check_unpatchify(x, patch_size, grid_size)
    b = _backend("unpatchify", backend, x.device)
    if b == "torch":
        return ref.unpatchify(x, patch_size, grid_size)
    return _impl("unpatchify", b)(x, patch_size, grid_size)


def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None, *,
                   backend: str | None = None):
    """Per-sample random masking -> ``(x_masked, mask, ids_restore)`` (the official semantics)."""
    ref.check_random_masking(x, mask_ratio, noise)
    mask_ratio = ref.mask_ratio_value(mask_ratio)  # a NumPy scalar or 0-dim tensor -> float, for the kernels
    b = _backend("random_masking", backend, x.device)
    if b == "torch":
        return ref.random_masking(x, mask_ratio, noise)
    return _impl("random_masking", b)(x, mask_ratio, noise)


def encoder_input(x: torch.Tensor, pos_embed: torch.Tensor, cls_token: torch.Tensor, mask_ratio: float,
                  noise: torch.Tensor | None = None, *, backend: str | None = None):
    """Patch embeddings -> encoder tokens: pos-embed add, random masking, cls prepended.

    Returns ``(tokens (N, 1+len_keep, D), mask, ids_restore)``.
    """
    ref.check_encoder_input(x, pos_embed, cls_token, mask_ratio, noise)
    mask_ratio = ref.mask_ratio_value(mask_ratio)
    b = _backend("encoder_input", backend, x.device)
    if b == "torch":
        return ref.encoder_input(x, pos_embed, cls_token, mask_ratio, noise)
    return _impl("encoder_input", b)(x, pos_embed, cls_token, mask_ratio, noise)


def decoder_unshuffle(x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                      pos_embed: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """Decoder tokens (N, 1+len_keep, D) -> (N, 1+L, D): mask tokens in, original order, (+ pos_embed).

    ``ids_restore`` is random_masking's (a permutation of ``range(L)`` per sample). Its values are
    not checked here (that would read them on the host every step): where a kernel reads them,
    a value out of ``[0, L)`` is an error on CPU tensors (the C++ twin's ValueError naming
    ids_restore; the reference's is torch.gather's) and, on CUDA, where a kernel cannot raise,
    the mask token (never an access out of bounds; torch's gather would stop the process with
    a device assert).
    """
    ref.check_decoder_unshuffle(x, ids_restore, mask_token, pos_embed)
    b = _backend("decoder_unshuffle", backend, x.device)
    if b == "torch":
        return ref.decoder_unshuffle(x, ids_restore, mask_token, pos_embed)
    return _impl("decoder_unshuffle", b)(x, ids_restore, mask_token, pos_embed)


def mae_loss(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int,
             norm_pix_loss: bool = False, *, backend: str | None = None) -> torch.Tensor:
    """MSE on removed patches, optionally against per-patch normalised pixels (float32 scalar).

    The kernels differentiate ``pred`` only: the target ``patchify(imgs)`` and ``mask`` are
    constants to them, as in MAE's training. When ``imgs`` or ``mask`` requires grad (and grad
    mode is on), ``backend="auto"`` takes the reference, which differentiates all three as the
    official ``forward_loss`` does; a named kernel backend is a ValueError naming the input.
    """
    ref.check_mae_loss(imgs, pred, mask, patch_size)
    b = _backend("mae_loss", backend, imgs.device)
    if b != "torch" and torch.is_grad_enabled() and (imgs.requires_grad or mask.requires_grad):
        if not _auto(backend):
            name = "imgs" if imgs.requires_grad else "mask"
            raise ValueError(f"backend={b!r} mae_loss gives {name} no gradient (its kernels differentiate pred "
                             f"only), but {name} requires grad; use backend='torch' or 'auto' (the reference)")
        b = "torch"
    if b == "torch":
        return ref.mae_loss(imgs, pred, mask, patch_size, norm_pix_loss)
    return _impl("mae_loss", b)(imgs, pred, mask, patch_size, norm_pix_loss)


def _check_scale(scale) -> None:
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0):
        raise ValueError(f"scale must be a positive float or None, got {scale!r}")


def _xformers_attention(q, k, v, scale):
    import xformers.ops as xops

    return xops.memory_efficient_attention(q, k, v, scale=scale)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
              backend: str | None = None) -> torch.Tensor:
    """Non-causal softmax attention; q, k, v and the result are (B, N, H, D).

    Backends: ``torch`` (plain math), ``sdpa`` (torch's scaled_dot_product_attention),
    ``triton`` (fastmae's memory-efficient kernel, head dims up to
    :data:`TRITON_ATTENTION_MAX_HEAD_DIM`), ``xformers``; ``auto`` picks Triton for CUDA
    tensors (SDPA when Triton is missing or D is above that limit) and the reference for
    CPU tensors.
    """
    ref.check_attention(q, k, v)
    _check_scale(scale)
    b = _attention_backend("attention", backend, q.device, q.shape[-1])
    if b == "torch":
        return ref.attention(q, k, v, scale)
    if b == "sdpa":
        return ref.sdpa_attention(q, k, v, scale)
    if b == "xformers":
        return _xformers_attention(q, k, v, scale)
    return _impl("attention", b)(q, k, v, scale)


def attention_qkvpacked(qkv: torch.Tensor, *, scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """:func:`attention` on the fused qkv projection output (B, N, 3, H, D) -> (B, N, H, D).

    The Triton kernel reads q, k and v through strides and writes its gradient straight
    into a (B, N, 3, H, D) tensor: no permute or copy around attention.
    """
    ref.check_attention_qkvpacked(qkv)
    _check_scale(scale)
    b = _attention_backend("attention_qkvpacked", backend, qkv.device, qkv.shape[-1])
    if b == "torch":
        return ref.attention_qkvpacked(qkv, scale)
    q, k, v = qkv.unbind(2)
    if b == "sdpa":
        return ref.sdpa_attention(q, k, v, scale)
    if b == "xformers":
        return _xformers_attention(q, k, v, scale)
    return _impl("attention_qkvpacked", b)(qkv, scale)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """``gelu(x + bias)``, the exact (erf) GELU, float32 math, in ``x``'s dtype: the MLP's fc1 bias + activation.

    ``x`` (..., H) fp32/fp16/bf16, any strides; ``bias`` (H,) any float dtype (the fp32
    parameter under autocast). Differentiable in both; the backward recomputes ``x + bias``
    from the saved ``x`` and fuses the bias gradient (see :mod:`fastmae.kernels.bias_gelu`).
    The Triton kernels compute in float32: float64 inputs take the reference on
    ``backend="auto"`` and are a TypeError on ``backend="triton"``.
    """
    ref.check_bias_gelu(x, bias)
    b = _backend("bias_gelu", backend, x.device)
    if b != "torch" and torch.float64 in (x.dtype, bias.dtype):
        if _auto(backend):
            b = "torch"
        else:
            raise TypeError(f"backend={b!r} bias_gelu computes in float32: x and bias must be float32, float16 or "
                            f"bfloat16, got x {x.dtype} and bias {bias.dtype}; use backend='torch' for float64")
    if b == "torch":
        return ref.bias_gelu(x, bias)
    return _impl("bias_gelu", b)(x, bias)


def _layer_norm_backend(op: str, backend, device: torch.device, D: int) -> str:
    b = _backend(op, backend, device)
    if b == "triton" and D > TRITON_LAYER_NORM_MAX_DIM:
        if _auto(backend):
            return "torch"
        raise ValueError(f"x's last dim D={D} is above the Triton LayerNorm kernels' limit of "
                         f"{TRITON_LAYER_NORM_MAX_DIM}; use backend='torch' or 'auto'")
    return b


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-6, *,
               out_dtype: torch.dtype | None = None, backend: str | None = None) -> torch.Tensor:
    """LayerNorm over the last dim, float32 math, ``y`` in ``out_dtype`` (default ``x.dtype``);
    ``weight`` / ``bias`` (D,) or None (see :func:`fastmae.reference.layer_norm`)."""
    ref.check_layer_norm(x, weight, bias, eps, out_dtype)
    b = _layer_norm_backend("layer_norm", backend, x.device, x.shape[-1])
    if b == "torch":
        return ref.layer_norm(x, weight, bias, eps, out_dtype)
    return _impl("layer_norm", b)(x, weight, bias, eps, out_dtype)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, eps: float = 1e-6, *, out_dtype: torch.dtype | None = None,
                   residual_dtype: torch.dtype | None = None, backend: str | None = None):
    """Residual add fused with LayerNorm -> ``(y, s)``: ``s = x + residual`` in ``residual_dtype``
    (default ``residual.dtype``), ``y = layer_norm(s)`` in ``out_dtype`` (default ``x.dtype``),
    float32 math; both differentiable (see :func:`fastmae.reference.add_layer_norm`)."""
    ref.check_add_layer_norm(x, residual, weight, bias, eps, out_dtype, residual_dtype)
    b = _layer_norm_backend("add_layer_norm", backend, x.device, x.shape[-1])
    if b == "torch":
        return ref.add_layer_norm(x, residual, weight, bias, eps, out_dtype, residual_dtype)
    return _impl("add_layer_norm", b)(x, residual, weight, bias, eps, out_dtype, residual_dtype)


def normalize_images(imgs: torch.Tensor, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), *,
                     out_dtype: torch.dtype = torch.float32, backend: str | None = None) -> torch.Tensor:
    """uint8 images (N, C, H, W), any strides, C <= 4 -> ``(imgs / 255 - mean) / std`` in ``out_dtype``.

    ToTensor + Normalize (ImageNet statistics by default) on the images' device, bitwise as
    torchvision computes them on the CPU (see :func:`fastmae.reference.normalize_images`);
    ``mean`` and ``std``: one float per channel. Used by :func:`fastmae.data.to_device`.
    """
    ref.check_normalize_images(imgs, mean, std, out_dtype)
    b = _backend("normalize_images", backend, imgs.device)
    if b == "torch":
        return ref.normalize_images(imgs, mean, std, out_dtype)
    return _impl("normalize_images", b)(imgs, mean, std, out_dtype)
