"""``apply_fastmae``: fastmae's kernels in an existing MAE model instance, patched in place.

>>> model = models_mae.mae_vit_base_patch16(norm_pix_loss=True)   # official, on timm Blocks
>>> fastmae.apply_fastmae(model)                                  # or an HF ViTMAEForPreTraining
>>> loss, pred, mask = model(imgs, mask_ratio=0.75)

Models it takes, recognised by structure and method names (any class name):

* the official ``models_mae.MaskedAutoencoderViT`` (facebookresearch/mae) and copies of it:
  attributes ``patch_embed, cls_token, pos_embed, blocks, norm, decoder_embed, mask_token,
  decoder_pos_embed, decoder_blocks, decoder_norm, decoder_pred, norm_pix_loss`` and methods
  ``patchify, unpatchify, random_masking(x, mask_ratio), forward_encoder(x, mask_ratio),
  forward_decoder(x, ids_restore), forward_loss(imgs, pred, mask)``; blocks are timm's
  ``Block`` (attention: timm's ``Attention`` with a fused ``qkv``);
* Hugging Face ``ViTMAEForPreTraining`` (tested with transformers 5.24, its
  ``q_proj/k_proj/v_proj/o_proj`` attention and inline loss; the older layout, a
  ``ViTMAESelfAttention`` with ``query/key/value`` and a ``forward_loss`` method, is handled
  and tested on a re-creation of it, not on an installed older transformers; 4.x's extra
  ``head_mask``/``output_attentions`` arguments are refused when used);
* fastmae's own :class:`fastmae.MaskedAutoencoderViT`, which runs every part through the ops
  already: only its backend is set.

What each flag patches (all default on):

============ ======================================== ==========================================
flag         official model                           HF ViTMAEForPreTraining
============ ======================================== ==========================================
patchify     ``patchify``, ``unpatchify``             ``patchify``, ``unpatchify``
masking      ``forward_encoder``'s pos-embed add,      ``vit.embeddings.forward`` (incl.
             random masking and cls (one op,          ``interpolate_pos_encoding``) and
             :func:`fastmae.ops.encoder_input`),      ``random_masking``, ``config.mask_ratio``
             ``random_masking``; ``forward`` gains
             ``noise=`` (when it is the official
             ``forward``: a fork's own is kept)
unshuffle    ``forward_decoder``'s mask tokens,        ``decoder.forward``
             unshuffle and pos-embed add
             (:func:`fastmae.ops.decoder_unshuffle`)
loss         ``forward_loss`` (:func:`fastmae.ops.mae_loss`, ``norm_pix_loss`` as configured)
attention    each timm ``Attention.forward``          each attention module's ``forward``
             (:func:`fastmae.ops.attention_qkvpacked`) (:func:`fastmae.ops.attention`)
fused_blocks (off by default) timm Blocks: residual    not available (a ValueError)
             add + LayerNorm and fc1 bias + GELU
             fused (``ops.add_layer_norm``,
             ``ops.bias_gelu``), in ``forward_encoder``
             / ``forward_decoder``
============ ======================================== ==========================================

Guarantees: only the instance changes, never a class (two models of one class in one
process are independent: Liger-Kernel's issue 242); methods are bound into the instances'
``__dict__`` (the model and its submodules), nothing is registered, so ``state_dict()``
has the same keys and the same tensors; outputs equal the unpatched model's for the same
noise within the kernels' oracles. ``noise=None`` draws ``torch.rand(N, L)`` exactly as the
originals do, so a seeded run masks the same patches patched or not. Patching again first
undoes the previous patch (the last call's flags are what is patched);
:func:`remove_fastmae` undoes it. ``copy.deepcopy`` of a patched model is patched too; pickling
the whole module (``torch.save(model)``) is not supported while it is patched: save its
``state_dict()``, as the official code does, or :func:`remove_fastmae` first.

What cannot be patched exactly is refused with a ``ValueError`` naming it (qk-norm, gated
attention, attention dropout, an unofficial ``forward_encoder`` signature); an unrecognised
model names what was not found.
"""

from __future__ import annotations

import inspect
import sys
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .backend import check_name, resolve

__all__ = ["apply_fastmae", "remove_fastmae", "is_patched"]

_RECORD = "_fastmae_patch"  # on the root model: what was bound where, to undo it


class _MissingType:
    """'No instance attribute before patching': one object, also through copy.deepcopy."""

    def __repr__(self):
        return "<missing>"

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return "_MISSING"


_MISSING = _MissingType()

_OFFICIAL_ATTRS = ("patch_embed", "cls_token", "pos_embed", "blocks", "norm", "decoder_embed", "mask_token",
                   "decoder_pos_embed", "decoder_blocks", "decoder_norm", "decoder_pred", "norm_pix_loss")
_OFFICIAL_METHODS = ("patchify", "unpatchify", "random_masking", "forward_encoder", "forward_decoder",
                     "forward_loss")
_HF_ATTRS = ("vit", "decoder", "config")


# ----------------------------------------------------------------------------- public API
def apply_fastmae(model: nn.Module, *, patchify: bool = True, masking: bool = True, unshuffle: bool = True,
                  loss: bool = True, attention: bool = True, fused_blocks: bool = False,
                  backend: str | None = None) -> nn.Module:
    """Patch ``model`` in place to run fastmae's ops, and return it (see the module docstring).

    ``backend`` is the ops' backend (``None``: the process default, see
    :func:`fastmae.set_backend`). ``"torch"`` runs the data path on the references and
    attention on SDPA, as fastmae's stock model; ``"sdpa"``/``"xformers"`` name the attention
    backend, the data path then uses the process default. ``fused_blocks`` (off by default;
    official model on timm Blocks only) runs the blocks as fastmae's model does on a kernel
    backend: each residual add fused into the next LayerNorm (:func:`fastmae.ops.add_layer_norm`,
    across blocks and into the final norm) and fc1's bias into the exact GELU
    (:func:`fastmae.ops.bias_gelu`); on a backend that resolves to the references (``"auto"``
    on CPU tensors, ``"torch"``) the stock blocks run.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    flags = dict(patchify=patchify, masking=masking, unshuffle=unshuffle, loss=loss, attention=attention,
                 fused_blocks=fused_blocks)
    for name, v in flags.items():
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be a bool, got {v!r}")
    if backend is not None:
        check_name(backend, attention=True)

    from .models.mae import MaskedAutoencoderViT as FastMAE

    if isinstance(model, FastMAE):  # already fastmae's ops everywhere
        if backend is not None:
            model.set_backend(backend)
        return model

    inner = next((a for a in ("module", "_orig_mod") if isinstance(model.__dict__.get("_modules", {}).get(a), nn.Module)
                  or isinstance(model.__dict__.get(a), nn.Module)), None)
    if inner is not None:  # DistributedDataParallel / torch.compile wrappers (compile's forwards attributes)
        raise ValueError(f"apply_fastmae: {type(model).__name__} wraps the model (.{inner}); patch the model "
                         f"itself: apply_fastmae(model.{inner}), or better apply_fastmae(model) before "
                         "DistributedDataParallel / torch.compile")
    kind, missing = _recognise(model)
    if kind is None:
        raise ValueError(
            f"apply_fastmae: {type(model).__name__} is not a model it knows: not an official MaskedAutoencoderViT "
            f"(missing {', '.join(missing['official'])}) nor an HF ViTMAEForPreTraining "
            f"(missing {', '.join(missing['hf'])})")

    data_backend = None if backend in ("sdpa", "xformers") else backend
    attn_backend = "sdpa" if backend == "torch" else backend
    # check everything before binding anything: a refused model is left as it was
    if kind == "official":
        plan = _plan_official(model, **flags)
    else:
        plan = _plan_hf(model, **flags)
    remove_fastmae(model)
    record = []
    for module, name, fn in plan:
        _set(record, module, name, types.MethodType(fn, module))
        # plain attribute (a str or None in __dict__, as nn.Module stores it): not in state_dict
        _set(record, module, "_fastmae_backend", attn_backend if fn in _ATTENTION_FNS else data_backend)
    _set(record, model, "_fastmae_flags", dict(flags))
    model.__dict__[_RECORD] = {"kind": kind, "flags": dict(flags), "backend": backend, "set": record}
    return model


def remove_fastmae(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_fastmae` on ``model`` (a no-op on an unpatched model); returns it."""
    record = model.__dict__.get(_RECORD)
    if record is None:
        return model
    for module, name, prev in reversed(record["set"]):
        if prev is _MISSING:
            module.__dict__.pop(name, None)
        else:
            module.__dict__[name] = prev
    del model.__dict__[_RECORD]
    return model


def is_patched(model: nn.Module) -> dict | None:
    """What :func:`apply_fastmae` patched in ``model``: ``{"kind", "flags", "backend"}``, or None."""
    record = model.__dict__.get(_RECORD)
    if record is None:
        return None
    return {k: record[k] for k in ("kind", "flags", "backend")}


# ----------------------------------------------------------------------------- machinery
def _set(record, module, name, value):
    """Set ``module.__dict__[name]`` (instance only, the way Liger-Kernel's ``_bind_method_to_module``
    binds methods), recording what it replaced; the first record of a name keeps the original."""
    record.append((module, name, module.__dict__.get(name, _MISSING)))
    module.__dict__[name] = value


def _has_method(obj, name) -> bool:
    return callable(getattr(obj, name, None))


def _recognise(model):
    missing = {
        "official": [f"attribute {a!r}" for a in _OFFICIAL_ATTRS if not hasattr(model, a)]
        + [f"method {m!r}" for m in _OFFICIAL_METHODS if not _has_method(model, m)],
        "hf": [f"attribute {a!r}" for a in _HF_ATTRS if not hasattr(model, a)],
    }
    if not missing["official"]:
        return "official", missing
    if not missing["hf"]:
        missing["hf"] = _hf_missing(model)
        if not missing["hf"]:
            return "hf", missing
    return None, missing


def _class_fn(model, name):
    """The class's own function ``name`` (what a call resolves to once our instance binding is gone)."""
    return getattr(type(model), name, None)


def _params(fn) -> list[str]:
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return []


def _require_signature(model, method, want):
    """Refuse a method whose leading parameters (after self) are not the official ones."""
    fn = _class_fn(model, method)
    got = _params(fn)[1:] if fn is not None else []
    if got[: len(want)] != list(want):
        raise ValueError(
            f"apply_fastmae: {type(model).__name__}.{method}({', '.join(got)}) is not the official "
            f"{method}({', '.join(want)}); its data path may differ, so it is not patched "
            f"(pass {_FLAG_OF[method]}=False to leave it as it is)")


_FLAG_OF = {"forward_encoder": "masking", "random_masking": "masking", "forward_decoder": "unshuffle",
            "forward_loss": "loss"}


def _backend(self):
    return self.__dict__.get("_fastmae_backend")


# ----------------------------------------------------------------------------- official model
def _patch_size(model) -> int:
    ps = getattr(model.patch_embed, "patch_size", None)
    if ps is None:
        raise ValueError("apply_fastmae: model.patch_embed has no attribute 'patch_size'")
    ps = tuple(ps) if isinstance(ps, (tuple, list)) else (ps, ps)
    if ps[0] != ps[1]:
        raise ValueError(f"apply_fastmae: non-square patches {ps} are not supported")
    return int(ps[0])


def _plan_official(model, *, patchify, masking, unshuffle, loss, attention, fused_blocks):
    _patch_size(model)
    plan = []
    if patchify:
        plan += [(model, "patchify", _official_patchify), (model, "unpatchify", _official_unpatchify)]
    if fused_blocks:
        _check_fusable(model)
    if masking or fused_blocks:
        _require_signature(model, "forward_encoder", ("x", "mask_ratio"))
        plan.append((model, "forward_encoder", _official_forward_encoder))
    if masking:
        _require_signature(model, "random_masking", ("x", "mask_ratio"))
        plan.append((model, "random_masking", _official_random_masking))
        if _is_official_forward(_class_fn(model, "forward")):  # a fork's own forward is kept as it is
            plan.append((model, "forward", _official_forward))
    if unshuffle or fused_blocks:
        _require_signature(model, "forward_decoder", ("x", "ids_restore"))
        plan.append((model, "forward_decoder", _official_forward_decoder))
    if loss:
        _require_signature(model, "forward_loss", ("imgs", "pred", "mask"))
        plan.append((model, "forward_loss", _official_forward_loss))
    if attention:
        for where in ("blocks", "decoder_blocks"):
            for i, blk in enumerate(getattr(model, where)):
                attn = getattr(blk, "attn", None)
                _check_timm_attention(attn, f"{where}.{i}.attn")
                plan.append((attn, "forward", _timm_attention_forward))
    return plan


def _official_patchify(self, imgs):
    """imgs: (N, C, H, W) -> x: (N, L, patch_size**2 * C) (fastmae.ops.patchify)"""
    return ops.patchify(imgs, _patch_size(self), backend=_backend(self))


def _official_unpatchify(self, x):
    """x: (N, L, patch_size**2 * C) -> imgs: (N, C, H, W), square grid (fastmae.ops.unpatchify)"""
    return ops.unpatchify(x, _patch_size(self), backend=_backend(self))


def _rand_noise(x):
    # exactly the originals' draw, so that a seeded run masks the same patches patched or not
    return torch.rand(x.shape[0], x.shape[1], device=x.device)


def _official_random_masking(self, x, mask_ratio, noise=None):
    """Per-sample random masking by argsort of noise (fastmae.ops.random_masking)."""
    if noise is None:
        noise = _rand_noise(x)
    return ops.random_masking(x, mask_ratio, noise, backend=_backend(self))


def _flag(self, name) -> bool:
    return bool(self.__dict__.get("_fastmae_flags", {}).get(name))


def _official_forward_encoder(self, x, mask_ratio, noise=None):
    x = self.patch_embed(x)
    if _flag(self, "masking"):
        if noise is None:
            noise = _rand_noise(x)
        # pos-embed add w/o cls, random masking, cls token (+ its pos embed) prepended: one op
        x, mask, ids_restore = ops.encoder_input(x, self.pos_embed, self.cls_token, mask_ratio, noise,
                                                 backend=_backend(self))
    else:  # fused_blocks alone: the official data path
        if noise is not None:
            raise TypeError("forward_encoder: noise= needs apply_fastmae(masking=True)")
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio)
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    x = _run_blocks(self, x, self.blocks, self.norm)
    return x, mask, ids_restore


def _official_forward_decoder(self, x, ids_restore):
    x = self.decoder_embed(x)
    if _flag(self, "unshuffle"):
        # mask tokens appended, unshuffled, pos embed added: one op
        x = ops.decoder_unshuffle(x, ids_restore, self.mask_token, self.decoder_pos_embed, backend=_backend(self))
    else:  # fused_blocks alone: the official data path
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
    x = _run_blocks(self, x, self.decoder_blocks, self.decoder_norm)
    x = self.decoder_pred(x)
    return x[:, 1:, :]


# ------------------------------------------------------------------ fused blocks (timm's Block)
def _timm_block_classes():
    try:
        from timm.layers import Mlp
        from timm.models.vision_transformer import Block
    except ImportError:
        return None, None
    return Block, Mlp


def _is_layer_norm(m) -> bool:
    return type(m) is nn.LayerNorm and m.weight is not None and m.bias is not None


def _check_fusable(model):
    """fused_blocks needs timm's pre-norm Block with plain LayerNorms, exact GELU, and nothing between
    its ops (no LayerScale, DropPath or dropout): what the fused ops compute exactly."""
    Block, Mlp = _timm_block_classes()
    if Block is None:
        raise ValueError("apply_fastmae: fused_blocks needs timm's Block, and timm does not import")
    for name in ("norm", "decoder_norm"):
        if not _is_layer_norm(getattr(model, name)):
            raise ValueError(f"apply_fastmae: fused_blocks needs model.{name} to be an nn.LayerNorm with weight "
                             f"and bias, got {type(getattr(model, name)).__name__}; pass fused_blocks=False")
    for where in ("blocks", "decoder_blocks"):
        for i, blk in enumerate(getattr(model, where)):
            at = f"{where}.{i}"
            if type(blk).forward is not Block.forward:
                raise ValueError(f"apply_fastmae: fused_blocks supports timm's vision_transformer.Block (pre-norm); "
                                 f"{at} is a {type(blk).__name__}; pass fused_blocks=False")
            for n in ("ls1", "ls2", "drop_path1", "drop_path2"):
                if not _is_identity(getattr(blk, n, None)):
                    raise ValueError(f"apply_fastmae: fused_blocks: {at}.{n} is a {type(getattr(blk, n)).__name__} "
                                     "(layer scale / drop path), not fused; pass fused_blocks=False")
            for n in ("norm1", "norm2"):
                if not _is_layer_norm(getattr(blk, n)):
                    raise ValueError(f"apply_fastmae: fused_blocks needs {at}.{n} to be an nn.LayerNorm with "
                                     f"weight and bias; pass fused_blocks=False")
            mlp = blk.mlp
            if type(mlp).forward is not Mlp.forward or not _is_identity(getattr(mlp, "norm", None)):
                raise ValueError(f"apply_fastmae: fused_blocks supports timm's Mlp (fc1, act, fc2); {at}.mlp is "
                                 f"a {type(mlp).__name__}; pass fused_blocks=False")
            if type(mlp.act) is not nn.GELU or mlp.act.approximate != "none" or mlp.fc1.bias is None:
                raise ValueError(f"apply_fastmae: fused_blocks fuses fc1's bias with the exact GELU; {at}.mlp has "
                                 f"{mlp.act!r}{'' if mlp.fc1.bias is not None else ' and no fc1 bias'}; "
                                 "pass fused_blocks=False")
            for n in ("drop1", "drop2"):
                d = getattr(mlp, n, None)
                if d is not None and getattr(d, "p", 0.0) > 0:
                    raise ValueError(f"apply_fastmae: fused_blocks: {at}.mlp.{n} is dropout p={d.p}, not fused; "
                                     "pass fused_blocks=False")


def _add_norm(norm, x, residual, dtypes, backend):
    """``norm(x + residual)`` and ``x + residual`` in one op; ``dtypes``: (out_dtype, residual_dtype)."""
    return ops.add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps,
                              out_dtype=dtypes[0], residual_dtype=dtypes[1], backend=backend)


def _run_blocks(self, x, blocks, norm):
    """The blocks and the final norm; with fused_blocks, on a kernel backend (as fastmae's own model:
    on ``"auto"``, CUDA tensors), each residual add is fused into the next LayerNorm and fc1's bias
    into the GELU, passing (hidden, residual) pairs between blocks."""
    b = _backend(self)
    if not _flag(self, "fused_blocks") or resolve(b, x.device) == "torch":
        for blk in blocks:
            x = blk(x)
        return norm(x)
    dev = x.device.type
    amp = torch.is_autocast_enabled(dev)
    # (out_dtype, residual_dtype): what autocast gives the stock blocks (bf16/fp16 outputs, fp32 stream)
    dtypes = (torch.get_autocast_dtype(dev), torch.float32) if amp else (None, None)
    h, r = x, None
    for blk in blocks:
        y, s = _add_norm(blk.norm1, h, r, dtypes, b)
        y, s = _add_norm(blk.norm2, blk.attn(y), s, dtypes, b)
        mlp = blk.mlp
        h, r = mlp.fc2(ops.bias_gelu(F.linear(y, mlp.fc1.weight), mlp.fc1.bias, backend=b)), s
    return _add_norm(norm, h, r, (torch.float32 if amp else None, dtypes[1]), b)[0]


def _official_forward_loss(self, imgs, pred, mask):
    """MSE on removed patches, per-patch normalised targets if norm_pix_loss (fastmae.ops.mae_loss)."""
    return ops.mae_loss(imgs, pred, mask, _patch_size(self), bool(self.norm_pix_loss), backend=_backend(self))


def _official_forward_as_published(self, imgs, mask_ratio=0.75):
    # models_mae.py's forward, compiled here only to compare a model's forward with (_is_official_forward)
    latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio)
    pred = self.forward_decoder(latent, ids_restore)
    loss = self.forward_loss(imgs, pred, mask)
    return loss, pred, mask


def _is_official_forward(fn) -> bool:
    """Whether ``fn`` is the official ``forward`` (same bytecode, names and defaults; comments and
    line numbers aside): only that one is replaced by the one taking ``noise=``, so that a fork
    whose forward returns more or adds loss terms keeps them."""
    code, want = getattr(fn, "__code__", None), _official_forward_as_published.__code__
    return (code is not None and all(getattr(code, a) == getattr(want, a) for a in (
        "co_code", "co_names", "co_varnames", "co_consts", "co_argcount", "co_kwonlyargcount"))
        and code.co_flags & 0xFFFF == want.co_flags & 0xFFFF  # the __future__ flags above differ by module
        and fn.__defaults__ == _official_forward_as_published.__defaults__ and not fn.__closure__)  # fmt: skip


def _official_forward(self, imgs, mask_ratio=0.75, noise=None):
    latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
    pred = self.forward_decoder(latent, ids_restore)
    loss = self.forward_loss(imgs, pred, mask)
    return loss, pred, mask


def _is_identity(m) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _check_timm_attention(attn, where):
    if attn is None:
        raise ValueError(f"apply_fastmae: {where} not found (blocks without an 'attn'; pass attention=False)")
    for a in ("qkv", "num_heads", "proj"):
        if not hasattr(attn, a):
            raise ValueError(f"apply_fastmae: {where} ({type(attn).__name__}) has no attribute {a!r}: not timm's "
                             "Attention with a fused qkv; pass attention=False")
    if not (_is_identity(getattr(attn, "q_norm", None)) and _is_identity(getattr(attn, "k_norm", None))):
        raise ValueError(f"apply_fastmae: {where} uses qk-norm (q_norm/k_norm), which fastmae's attention "
                         "does not fuse; pass attention=False")
    if getattr(attn, "gate", None) is not None:
        raise ValueError(f"apply_fastmae: {where} is gated attention, not supported; pass attention=False")
    drop = getattr(attn, "attn_drop", None)
    if drop is not None and getattr(drop, "p", 0.0) > 0:
        raise ValueError(f"apply_fastmae: {where} has attention dropout p={drop.p}, which fastmae's attention "
                         "kernels do not implement; pass attention=False")
    qkv_out = attn.qkv.out_features
    if qkv_out % (3 * attn.num_heads):
        raise ValueError(f"apply_fastmae: {where}.qkv has {qkv_out} outputs, not 3 * num_heads * head_dim")


def _timm_scale(attn, head_dim):
    # timm's fused path (F.scaled_dot_product_attention) uses the default scale, its other path attn.scale
    if getattr(attn, "fused_attn", False):
        return head_dim**-0.5
    return float(getattr(attn, "scale", head_dim**-0.5))


def _timm_attention_forward(self, x, attn_mask=None, is_causal=False):
    if attn_mask is not None or is_causal:
        raise ValueError("fastmae-patched attention: attn_mask and is_causal are not supported "
                         "(MAE attention is unmasked); patch with attention=False")
    B, N, _ = x.shape
    head_dim = self.qkv.out_features // (3 * self.num_heads)
    qkv = self.qkv(x).view(B, N, 3, self.num_heads, head_dim)
    x = ops.attention_qkvpacked(qkv, scale=_timm_scale(self, head_dim), backend=_backend(self))
    x = x.reshape(B, N, self.num_heads * head_dim)
    norm = getattr(self, "norm", None)
    if norm is not None:
        x = norm(x)
    x = self.proj(x)
    proj_drop = getattr(self, "proj_drop", None)
    return proj_drop(x) if proj_drop is not None else x


# ----------------------------------------------------------------------------- HF ViTMAE
def _hf_missing(model) -> list[str]:
    need = {"vit": ("embeddings",), "decoder": ("decoder_embed", "mask_token", "decoder_pos_embed",
                                                "decoder_layers", "decoder_norm", "decoder_pred"),
            "config": ("mask_ratio", "norm_pix_loss", "patch_size", "num_channels", "image_size")}
    out = []
    for parent, names in need.items():
        obj = getattr(model, parent)
        out += [f"attribute '{parent}.{n}'" for n in names if not hasattr(obj, n)]
    emb = getattr(model.vit, "embeddings", None)
    if emb is not None:
        out += [f"attribute 'vit.embeddings.{n}'" for n in ("patch_embeddings", "cls_token", "position_embeddings")
                if not hasattr(emb, n)]
        out += [f"method 'vit.embeddings.{n}'" for n in ("random_masking", "interpolate_pos_encoding")
                if not _has_method(emb, n)]
    if not _has_method(model, "patchify"):
        out.append("method 'patchify'")
    return out


def _plan_hf(model, *, patchify, masking, unshuffle, loss, attention, fused_blocks):
    if fused_blocks:
        raise ValueError("apply_fastmae: fused_blocks is for timm Blocks (the official model); HF ViTMAELayer "
                         "is not fused yet; pass fused_blocks=False")
    plan = []
    if patchify:
        plan += [(model, "patchify", _hf_patchify), (model, "unpatchify", _hf_unpatchify)]
    if masking:
        emb = model.vit.embeddings
        plan += [(emb, "random_masking", _hf_random_masking), (emb, "forward", _hf_embeddings_forward)]
    if unshuffle:
        plan.append((model.decoder, "forward", _hf_decoder_forward))
    if loss:
        plan.append((model, "forward_loss", _hf_forward_loss))
        if _class_fn(model, "forward_loss") is None:  # transformers >= 5.2x computes the loss inline
            plan.append((model, "forward", _hf_forward))
    if attention:
        found = 0
        for name, m in model.named_modules():
            if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")):
                _check_hf_dropout(m, name)
                plan.append((m, "forward", _hf_attention_forward))
                found += 1
            elif all(hasattr(m, a) for a in ("query", "key", "value", "num_attention_heads", "attention_head_size")):
                _check_hf_dropout(m, name)
                plan.append((m, "forward", _hf_self_attention_forward))
                found += 1
        if not found:
            raise ValueError("apply_fastmae: no attention module with q_proj/k_proj/v_proj/o_proj or "
                             "query/key/value found in the HF model; pass attention=False")
    return plan


def _check_hf_dropout(m, name):
    # where transformers' layouts keep it: attention_dropout (q/k/v/o_proj), dropout_prob (5.x
    # ViTMAESelfAttention), attention_probs_dropout_prob (4.4x SDPA) or an nn.Dropout at .dropout (4.4x)
    ps = [float(getattr(m, a, 0.0) or 0.0) for a in ("attention_dropout", "dropout_prob",
                                                      "attention_probs_dropout_prob")]
    drop = getattr(m, "dropout", None)
    if isinstance(drop, nn.Dropout):
        ps.append(float(drop.p))
    p = max(ps)
    if p > 0:
        raise ValueError(f"apply_fastmae: {name} has attention dropout p={p} (config.attention_probs_dropout_prob), "
                         "which fastmae's attention kernels do not implement; pass attention=False")


def _hf_check_pixels(config, pixel_values, interpolate_pos_encoding):
    # the checks HF's patchify makes, in its words
    p = config.patch_size
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
        raise ValueError("pixel_values must be a (batch_size, num_channels, height, width) tensor")
    if not interpolate_pos_encoding and (pixel_values.shape[2] != pixel_values.shape[3]
                                         or pixel_values.shape[2] % p != 0):
        raise ValueError("Make sure the pixel values have a squared size that is divisible by the patch size")
    if pixel_values.shape[1] != config.num_channels:
        raise ValueError("Make sure the number of channels of the pixel values is equal to the one set in the "
                         "configuration")


def _hf_patchify(self, pixel_values, interpolate_pos_encoding: bool = False):
    """(N, C, H, W) -> (N, L, patch_size**2 * C) (fastmae.ops.patchify)"""
    _hf_check_pixels(self.config, pixel_values, interpolate_pos_encoding)
    return ops.patchify(pixel_values, self.config.patch_size, backend=_backend(self))


def _hf_unpatchify(self, patchified_pixel_values, original_image_size=None):
    """(N, L, patch_size**2 * C) -> (N, C, H, W) (fastmae.ops.unpatchify)"""
    p = self.config.patch_size
    if original_image_size is None:
        original_image_size = (self.config.image_size, self.config.image_size)
    h, w = original_image_size[0] // p, original_image_size[1] // p
    if h * w != patchified_pixel_values.shape[1]:
        raise ValueError(f"The number of patches in the patchified pixel values {patchified_pixel_values.shape[1]}, "
                         f"does not match the number of patches on original image {h}*{w}")
    return ops.unpatchify(patchified_pixel_values, p, (h, w), backend=_backend(self))


def _hf_random_masking(self, sequence, noise=None):
    """Per-sample random masking with ``config.mask_ratio`` (fastmae.ops.random_masking)."""
    if noise is None:
        noise = _rand_noise(sequence)
    return ops.random_masking(sequence, self.config.mask_ratio, noise.to(sequence.device), backend=_backend(self))


def _hf_embeddings_forward(self, pixel_values, noise=None, interpolate_pos_encoding=False):
    height, width = pixel_values.shape[2:]
    size = tuple(getattr(self, "image_size", None) or self.patch_embeddings.image_size)
    if not interpolate_pos_encoding and (height, width) != size:
        raise ValueError(f"Input image size ({height}*{width}) doesn't match model ({size[0]}*{size[1]}).")
    if "interpolate_pos_encoding" in _params(type(self.patch_embeddings).forward):  # transformers < 5.2x
        embeddings = self.patch_embeddings(pixel_values, interpolate_pos_encoding=bool(interpolate_pos_encoding))
    else:
        embeddings = self.patch_embeddings(pixel_values)
    if interpolate_pos_encoding:
        position_embeddings = self.interpolate_pos_encoding(embeddings, height, width)
    else:
        position_embeddings = self.position_embeddings
    if noise is None:
        noise = _rand_noise(embeddings)
    # pos-embed add w/o cls, random masking (config.mask_ratio), cls (+ its pos embed) prepended: one op
    return ops.encoder_input(embeddings, position_embeddings, self.cls_token, self.config.mask_ratio,
                             noise.to(embeddings.device), backend=_backend(self))


def _output_class(module, name):
    cls = getattr(sys.modules[type(module).__module__], name, None)
    if cls is None:
        raise RuntimeError(f"fastmae-patched {type(module).__name__}: {name} not found in {type(module).__module__}")
    return cls


def _hf_decoder_forward(self, hidden_states, ids_restore, interpolate_pos_encoding=False, **kwargs):
    for k in ("output_attentions", "output_hidden_states"):
        if kwargs.get(k):
            raise ValueError(f"fastmae-patched ViTMAEDecoder: {k}=True is not supported; patch with unshuffle=False")
    x = self.decoder_embed(hidden_states)
    L = ids_restore.shape[1]
    if interpolate_pos_encoding:  # HF's method reads only the token count of its argument
        pos = self.interpolate_pos_encoding(x.new_empty((x.shape[0], 1 + L, 0)))
    else:
        pos = self.decoder_pos_embed
    # mask tokens appended, unshuffled, pos embed added: one op
    x = ops.decoder_unshuffle(x, ids_restore.to(x.device), self.mask_token, pos, backend=_backend(self))
    for layer in self.decoder_layers:
        x = layer(x)
        if isinstance(x, tuple):  # transformers 4.x layers return tuples
            x = x[0]
    x = self.decoder_norm(x)
    logits = self.decoder_pred(x)[:, 1:, :]
    return _output_class(self, "ViTMAEDecoderOutput")(logits=logits)


def _hf_forward_loss(self, pixel_values, pred, mask, interpolate_pos_encoding: bool = False):
    """MSE on removed patches, per-patch normalised if config.norm_pix_loss (fastmae.ops.mae_loss)."""
    _hf_check_pixels(self.config, pixel_values, interpolate_pos_encoding)
    return ops.mae_loss(pixel_values, pred, mask, self.config.patch_size, bool(self.config.norm_pix_loss),
                        backend=_backend(self))


def _hf_forward(self, pixel_values=None, noise=None, interpolate_pos_encoding=None, attention_mask=None, **kwargs):
    """ViTMAEForPreTraining.forward of transformers 5.2x with the loss through ``self.forward_loss``."""
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    outputs = self.vit(pixel_values, noise=noise, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
    latent, ids_restore, mask = outputs.last_hidden_state, outputs.ids_restore, outputs.mask
    logits = self.decoder(latent, ids_restore, interpolate_pos_encoding=interpolate_pos_encoding).logits
    loss = self.forward_loss(pixel_values, logits, mask, interpolate_pos_encoding=bool(interpolate_pos_encoding))
    out = _output_class(self, "ViTMAEForPreTrainingOutput")(
        loss=loss, logits=logits, mask=mask, ids_restore=ids_restore,
        hidden_states=outputs.hidden_states, attentions=outputs.attentions)
    return out if return_dict else out.to_tuple()


def _hf_heads(self, hidden_states, q, k, v, head_dim, scale):
    B, N = hidden_states.shape[:2]
    shape = (B, N, -1, head_dim)  # (B, N, H, D): fastmae's attention layout, no transposes
    return ops.attention(q(hidden_states).view(shape), k(hidden_states).view(shape), v(hidden_states).view(shape),
                         scale=scale, backend=_backend(self)).reshape(B, N, -1)


def _hf_attention_forward(self, hidden_states, attention_mask=None, **kwargs):
    """ViTMAEAttention (q_proj/k_proj/v_proj/o_proj) -> (output, None): no attention weights."""
    if attention_mask is not None:
        raise ValueError("fastmae-patched attention: attention_mask is not supported; patch with attention=False")
    if kwargs.get("output_attentions"):
        raise ValueError("fastmae-patched attention returns no attention weights; patch with attention=False")
    out = _hf_heads(self, hidden_states, self.q_proj, self.k_proj, self.v_proj, self.head_dim,
                    getattr(self, "scaling", self.head_dim**-0.5))
    return self.o_proj(out), None


def _hf_self_attention_forward(self, hidden_states, head_mask=None, output_attentions=False, **kwargs):
    """ViTMAESelfAttention (query/key/value; the output projection is a separate module) -> (context, None)."""
    if head_mask is not None or output_attentions:
        raise ValueError("fastmae-patched attention: head_mask and output_attentions are not supported; "
                         "patch with attention=False")
    d = self.attention_head_size
    return _hf_heads(self, hidden_states, self.query, self.key, self.value, d, getattr(self, "scaling", d**-0.5)), None


_ATTENTION_FNS = (_timm_attention_forward, _hf_attention_forward, _hf_self_attention_forward)
