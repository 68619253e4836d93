"""MaskedAutoencoderViT: a drop-in for the official MAE model (facebookresearch/mae, models_mae.py).

Same constructor, methods, state_dict keys and initialisation as the official class, so
official checkpoints load with ``strict=True``. What differs is underneath: the data path
(pos-embed add + random masking, decoder unshuffle, loss) and attention go through
:mod:`fastmae.ops`, whose ``backend`` picks the reference, Triton or CUDA kernels.

Two extras, both keyword-only:

* ``backend``: the ops' backend for this model (``None``: the process default, see
  :func:`fastmae.set_backend`). ``"torch"`` is the stock model: reference data path and
  attention through torch's SDPA, as the official code on timm blocks.
* ``mask_tokens_in_encoder``: the paper's baseline, where the encoder sees all L tokens,
  the removed ones replaced by a learned token (``encoder_mask_token``, present only in
  this mode) and the decoder needs no unshuffle. It exists to measure the speedup of
  running the encoder on visible tokens only.

The fused blocks. Wherever the ops' backend resolves to a kernel backend (``"triton"``,
or ``"auto"`` on CUDA tensors; decided per call from the input's device, so a CPU model on
``"auto"`` runs the stock blocks), the transformer blocks run on fused ops with the same
weights and module names. As in FlashAttention's and Mamba's fused add-norm, the blocks
pass ``(hidden, residual)`` pairs and every residual add is fused into the *next*
LayerNorm, across blocks and into the final ``norm`` / ``decoder_norm``::

    y, s = add_layer_norm(h, r, norm1)         # s = h + r (the residual stream), y = norm1(s)
    y, s = add_layer_norm(attn(y), s, norm2)   # attn: qkv -> attention_qkvpacked -> proj
    h, r = fc2(bias_gelu(y @ fc1.weight.T, fc1.bias)), s
    ...
    x = add_layer_norm(h, r, norm)[0]          # after the last block

The first block gets ``r = None``. Under autocast the dtypes are those autocast gives the
stock model: matmuls in the autocast dtype, LayerNorm math in fp32, the residual stream in
fp32, the blocks' normalised outputs in the autocast dtype (what the next matmul would cast
them to) and the final norms' in fp32 (as autocast's ``layer_norm``). Custom ops are not
touched by autocast, so these dtypes are passed to the ops explicitly. The fused blocks
need ``nn.LayerNorm`` norm layers (every official configuration); a model built with
another ``norm_layer`` runs the stock blocks.
"""

from __future__ import annotations

import importlib
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..backend import _import_error, check_name, resolve
from ..reference import get_2d_sincos_pos_embed

__all__ = [
    "MaskedAutoencoderViT",
    "CONFIGS",
    "mae_vit_base_patch16_dec512d8b",
    "mae_vit_large_patch16_dec512d8b",
    "mae_vit_huge_patch14_dec512d8b",
    "mae_vit_base_patch16",
    "mae_vit_large_patch16",
    "mae_vit_huge_patch14",
]


def _import_kernels() -> None:
    """Import the Triton kernel modules now, eagerly: ``torch.compile`` traces the ops' dispatch
    but not an import. A no-op without triton (the ops then say what is missing when asked)."""
    if _import_error("triton") is not None:
        return
    for impls in ops._IMPLS.values():
        if "triton" in impls:
            try:
                importlib.import_module(impls["triton"].split(":")[0])
            except Exception:  # reported by the op itself (BackendUnavailableError) when it is called
                pass


def _attn_backend(backend: str | None) -> str | None:
    """The stock model runs attention through SDPA; other backends name their own kernel."""
    return "sdpa" if backend == "torch" else backend


class PatchEmbed(nn.Module):
    """Image to patch embedding: a stride-p convolution, (N, C, H, W) -> (N, L, D)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size = (patch_size, patch_size)
        for s in self.img_size:
            if s % patch_size:
                raise ValueError(f"img_size={img_size} is not divisible by patch_size={patch_size}")
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention on the fused qkv projection (B, N, 3, H, Dh), no permutes."""

    def __init__(self, dim, num_heads=8, qkv_bias=False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.backend = None

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads)
        x = ops.attention_qkvpacked(qkv, scale=self.scale, backend=self.backend)
        return self.proj(x.reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))

    def forward_fused(self, x, backend):
        """fc1 without its bias, then one op for bias + exact GELU, then fc2."""
        return self.fc2(ops.bias_gelu(F.linear(x, self.fc1.weight), self.fc1.bias, backend=backend))


def _add_norm(norm, x, residual, dtypes, backend):
    """``norm(x + residual)`` and ``x + residual`` in one op; ``dtypes``: (out_dtype, residual_dtype)."""
    return ops.add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps,
                              out_dtype=dtypes[0], residual_dtype=dtypes[1], backend=backend)


class Block(nn.Module):
    """Pre-norm transformer block, the layout of timm's ViT Block used by the official MAE."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def forward_fused(self, h, residual, dtypes, backend):
        """(hidden, residual) -> (hidden, residual): this block's adds fused into its norms."""
        y, s = _add_norm(self.norm1, h, residual, dtypes, backend)
        y, s = _add_norm(self.norm2, self.attn(y), s, dtypes, backend)
        return self.mlp.forward_fused(y, backend), s


class MaskedAutoencoderViT(nn.Module):
    """Masked Autoencoder with a VisionTransformer backbone."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3,
                 embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                 mlp_ratio=4., norm_layer=nn.LayerNorm, norm_pix_loss=False,
                 *, backend: str | None = None, mask_tokens_in_encoder: bool = False):
        super().__init__()
        # --------------------------------------------------------------------------
        # MAE encoder specifics
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)  # fixed sin-cos

        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.mask_tokens_in_encoder = bool(mask_tokens_in_encoder)
        if self.mask_tokens_in_encoder:  # the paper's baseline: not in official checkpoints
            self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # --------------------------------------------------------------------------
        # MAE decoder specifics
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)

        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))

        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim),
                                              requires_grad=False)  # fixed sin-cos

        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for i in range(decoder_depth)])

        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)  # decoder to patch
        # --------------------------------------------------------------------------

        self.norm_pix_loss = norm_pix_loss
        norms = [n for b in (*self.blocks, *self.decoder_blocks) for n in (b.norm1, b.norm2)]
        self._fusable = all(type(n) is nn.LayerNorm and n.weight is not None and n.bias is not None
                            for n in (*norms, self.norm, self.decoder_norm))  # the fused blocks need these
        self.set_backend(backend)
        self.initialize_weights()

    def set_backend(self, backend: str | None) -> None:
        """Run this model's ops on ``backend`` (``None``: the process default)."""
        if backend is not None:
            check_name(backend, attention=True)
        if backend != "torch":
            _import_kernels()
        self.backend = backend
        for m in self.modules():
            if isinstance(m, Attention):
                m.backend = _attn_backend(backend)

    @property
    def _ops_backend(self) -> str | None:
        """The backend of the data ops: the attention-only names leave them to the process default."""
        return None if self.backend in ("sdpa", "xformers") else self.backend

    def initialize_weights(self):
        # initialization
        # initialize (and freeze) pos_embed by sin-cos embedding
        grid = self.patch_embed.grid_size
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid, cls_token=True)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

        decoder_pos_embed = get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], grid, cls_token=True)
        self.decoder_pos_embed.data.copy_(torch.from_numpy(decoder_pos_embed).float().unsqueeze(0))

        # initialize patch_embed like nn.Linear (instead of nn.Conv2d)
        w = self.patch_embed.proj.weight.data
        torch.nn.init.xavier_uniform_(w.view([w.shape[0], -1]))

        # timm's trunc_normal_(std=.02) is effectively normal_(std=0.02) as cutoff is too big (2.)
        torch.nn.init.normal_(self.cls_token, std=.02)
        torch.nn.init.normal_(self.mask_token, std=.02)
        if self.mask_tokens_in_encoder:
            torch.nn.init.normal_(self.encoder_mask_token, std=.02)

        # initialize nn.Linear and nn.LayerNorm
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            # we use xavier_uniform following official JAX ViT:
            torch.nn.init.xavier_uniform_(m.weight)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    # ------------------------------------------------------------------ data path
    def patchify(self, imgs):
        """imgs: (N, C, H, W) -> x: (N, L, patch_size**2 * C)"""
        return ops.patchify(imgs, self.patch_embed.patch_size[0], backend=self._ops_backend)

    def unpatchify(self, x):
        """x: (N, L, patch_size**2 * C) -> imgs: (N, C, H, W)"""
        return ops.unpatchify(x, self.patch_embed.patch_size[0], self.patch_embed.grid_size, backend=self._ops_backend)

    def random_masking(self, x, mask_ratio, noise=None):
        """Per-sample random masking by per-sample shuffling of noise -> (x_masked, mask, ids_restore)."""
        return ops.random_masking(x, mask_ratio, noise, backend=self._ops_backend)

    def _check_imgs(self, imgs):
        if not isinstance(imgs, torch.Tensor):
            raise TypeError(f"imgs must be a torch.Tensor, got {type(imgs).__name__}")
        if not imgs.is_floating_point():
            raise TypeError(f"imgs must be a floating-point tensor, got {imgs.dtype} "
                            "(convert integer images with .float() first, and normalise them)")
        if imgs.dim() != 4:
            raise ValueError(f"imgs must be (N, C, H, W), got shape {tuple(imgs.shape)}")
        pe = self.patch_embed
        if imgs.shape[1] != pe.in_chans:
            raise ValueError(f"imgs has {imgs.shape[1]} channels but the model has in_chans={pe.in_chans}")
        if tuple(imgs.shape[2:]) != pe.img_size:
            raise ValueError(f"imgs is {imgs.shape[2]}x{imgs.shape[3]} but the model has img_size={pe.img_size}")

    # ------------------------------------------------------------------ model
    def forward_encoder(self, x, mask_ratio, noise=None):
        self._check_imgs(x)
        # embed patches
        x = self.patch_embed(x)

        if self.mask_tokens_in_encoder:
            return self._forward_encoder_with_mask_tokens(x, mask_ratio, noise)

        # add pos embed w/o cls token, mask, append cls token (+ its pos embed): one op
        x, mask, ids_restore = ops.encoder_input(x, self.pos_embed, self.cls_token, mask_ratio, noise,
                                                 backend=self._ops_backend)

        # apply Transformer blocks
        x = self._run_blocks(x, self.blocks, self.norm)

        return x, mask, ids_restore

    def _forward_encoder_with_mask_tokens(self, x, mask_ratio, noise):
        # the paper's baseline: removed tokens are replaced by a learned token, all L are encoded
        _, mask, ids_restore = ops.random_masking(x, mask_ratio, noise, backend=self._ops_backend)
        x = torch.where(mask.unsqueeze(-1).bool(), self.encoder_mask_token.to(x.dtype), x)
        x = x + self.pos_embed[:, 1:, :]
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self._run_blocks(x, self.blocks, self.norm)
        return x, mask, ids_restore

    def uses_fused_blocks(self, x: torch.Tensor) -> bool:
        """Whether a forward on ``x``'s device runs the fused blocks (see the module docstring)."""
        if self.backend in ("sdpa", "xformers") or not self._fusable:
            return False  # attention-only backends name the stock blocks
        return resolve(self.backend, x.device) != "torch"

    def _run_blocks(self, x, blocks, norm):
        if not self.uses_fused_blocks(x):
            for blk in blocks:
                x = blk(x)
            return norm(x)
        dev = x.device.type
        amp = torch.is_autocast_enabled(dev)
        # (out_dtype, residual_dtype) of the blocks' norms and of the final one; None: the op's default
        dtypes = (torch.get_autocast_dtype(dev), torch.float32) if amp else (None, None)
        h, r = x, None
        for blk in blocks:
            h, r = blk.forward_fused(h, r, dtypes, self.backend)
        return _add_norm(norm, h, r, (torch.float32 if amp else None, dtypes[1]), self.backend)[0]

    def forward_decoder(self, x, ids_restore):
        # embed tokens
        x = self.decoder_embed(x)

        if self.mask_tokens_in_encoder:  # already in the original order, all tokens present
            x = x + self.decoder_pos_embed
        else:  # append mask tokens, unshuffle, add pos embed: one op
            x = ops.decoder_unshuffle(x, ids_restore, self.mask_token, self.decoder_pos_embed,
                                      backend=self._ops_backend)

        # apply Transformer blocks
        x = self._run_blocks(x, self.decoder_blocks, self.decoder_norm)

        # predictor projection
        x = self.decoder_pred(x)

        # remove cls token
        x = x[:, 1:, :]

        return x

    def forward_loss(self, imgs, pred, mask):
        """
        imgs: [N, 3, H, W]
        pred: [N, L, p*p*3]
        mask: [N, L], 0 is keep, 1 is remove,
        """
        return ops.mae_loss(imgs, pred, mask, self.patch_embed.patch_size[0], self.norm_pix_loss,
                            backend=self._ops_backend)

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)  # [N, L, p*p*3]
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask


# Configurations of the official models: (patch_size, embed_dim, depth, num_heads); all use a
# 512-wide, 8-block, 16-head decoder, mlp_ratio 4 and LayerNorm(eps=1e-6).
CONFIGS = {
    "base": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "large": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}


def _factory(name: str, **kwargs) -> MaskedAutoencoderViT:
    cfg = dict(CONFIGS[name], decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
               mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    cfg.update(kwargs)
    return MaskedAutoencoderViT(**cfg)


def mae_vit_base_patch16_dec512d8b(**kwargs):
    return _factory("base", **kwargs)


def mae_vit_large_patch16_dec512d8b(**kwargs):
    return _factory("large", **kwargs)


def mae_vit_huge_patch14_dec512d8b(**kwargs):
    return _factory("huge", **kwargs)


# set recommended archs
mae_vit_base_patch16 = mae_vit_base_patch16_dec512d8b  # decoder: 512 dim, 8 blocks
mae_vit_large_patch16 = mae_vit_large_patch16_dec512d8b  # decoder: 512 dim, 8 blocks
mae_vit_huge_patch14 = mae_vit_huge_patch14_dec512d8b  # decoder: 512 dim, 8 blocks


def mae_vit_tiny_patch8(**kwargs):
    """Not an official configuration: a tiny MAE for CPU demos and tests (``fastmae pretrain`` with
    no arguments): 64 px images, 8 px patches, a 4-block 192-wide encoder, a 2-block 128-wide decoder."""
    cfg = dict(img_size=64, patch_size=8, embed_dim=192, depth=4, num_heads=3, decoder_embed_dim=128,
               decoder_depth=2, decoder_num_heads=4, mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    cfg.update(kwargs)
    return MaskedAutoencoderViT(**cfg)
