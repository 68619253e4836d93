"""Autograd formulas that fastmae's two op libraries share.

The Triton ops (``torch.ops.fastmae.*``, :mod:`fastmae.kernels`) and the compiled
extension's (``torch.ops.fastmae_ext.*``, :mod:`fastmae.ext`) of patchify / unpatchify
(whose forward fakes are the same too), masking, decoder unshuffle and the MAE loss have the
same backward: the forward saves the same tensors and the backward
calls its own library's backward op with the same arguments. So each formula is written
once, here, for a library's namespace ``ns``: ``register_<op>(ns)`` registers the autograd
formula of ``ns::<op>`` and the fake function of its backward op, whose schema is the same in
both libraries (``fastmae_ext::masked_tokens_backward`` is ``fastmae::masked_tokens_backward``).

What differs stays in each op's file: the forward schemas (the Triton masking ops take
``mask_ratio`` and a seed, the extension's ``noise`` and ``len_keep``), their fake
functions, validation and the kernels. The forward's trailing non-tensor arguments get no
gradient, so a backward returns ``None`` for every input after the ones it differentiates,
as many as the forward's schema has (counted in ``setup_context``).
"""

from __future__ import annotations

import torch

__all__ = ["register_patchify", "register_masking", "register_decoder_unshuffle", "register_mae_loss"]


def _grads(ctx, *grads):
    """``grads`` for the first inputs, then None for the remaining ones of the forward."""
    return grads + (None,) * (ctx.num_inputs - len(grads))


def register_patchify(ns: str) -> None:
    """Fakes and autograd of ``ns::patchify(imgs, patch_size, out_dtype)`` and
    ``ns::unpatchify(x, patch_size, h, w, out_dtype)``: both are permutations of the elements,
    so the backward of each is the other on the gradient, cast back to the input's dtype."""
    ops = getattr(torch.ops, ns)

    @torch.library.register_fake(f"{ns}::patchify")
    def _(imgs, patch_size, out_dtype):
        N, C, H, W = imgs.shape
        p = patch_size
        return imgs.new_empty((N, (H // p) * (W // p), p * p * C), dtype=out_dtype or imgs.dtype)

    @torch.library.register_fake(f"{ns}::unpatchify")
    def _(x, patch_size, h, w, out_dtype):
        N, L, D = x.shape
        p = patch_size
        return x.new_empty((N, D // (p * p), h * p, w * p), dtype=out_dtype or x.dtype)

    def patchify_setup(ctx, inputs, output):
        imgs, patch_size, _ = inputs
        ctx.patch_size = patch_size
        ctx.grid = (imgs.shape[2] // patch_size, imgs.shape[3] // patch_size)
        ctx.in_dtype = imgs.dtype

    def patchify_backward(ctx, grad):
        h, w = ctx.grid
        return ops.unpatchify(grad, ctx.patch_size, h, w, ctx.in_dtype), None, None

    def unpatchify_setup(ctx, inputs, output):
        ctx.patch_size = inputs[1]
        ctx.in_dtype = inputs[0].dtype

    def unpatchify_backward(ctx, grad):
        return ops.patchify(grad, ctx.patch_size, ctx.in_dtype), None, None, None, None

    torch.library.register_autograd(f"{ns}::patchify", patchify_backward, setup_context=patchify_setup)
    torch.library.register_autograd(f"{ns}::unpatchify", unpatchify_backward, setup_context=unpatchify_setup)


def register_masking(ns: str) -> None:
    """Autograd of ``ns::random_masking`` and ``ns::encoder_input``; fake of ``ns::masked_tokens_backward``.

    The gradient of the gathered tokens goes back to the kept positions
    (``masked_tokens_backward``: scattered, zero at the removed ones); ``grad pos_embed[1:]``
    is its batch sum, ``grad pos_embed[0] = grad cls_token`` the batch sum of the cls row's
    gradient. Both forwards start ``(x, ...)`` / ``(x, pos_embed, cls_token, ...)`` and return
    ``(tokens, mask, ids_restore)``.
    """
    ops = getattr(torch.ops, ns)

    @torch.library.register_fake(f"{ns}::masked_tokens_backward")
    def _(grad, ids_restore, num_prefix, dtype):
        return grad.new_empty((grad.shape[0], ids_restore.shape[1], grad.shape[2]), dtype=dtype)

    def random_masking_setup(ctx, inputs, output):
        x = inputs[0]
        _, mask, ids_restore = output
        ctx.mark_non_differentiable(mask, ids_restore)
        ctx.save_for_backward(ids_restore)
        ctx.x_dtype = x.dtype
        ctx.num_inputs = len(inputs)

    def random_masking_backward(ctx, grad, grad_mask, grad_ids):
        (ids_restore,) = ctx.saved_tensors
        gx = None
        if ctx.needs_input_grad[0]:
            gx = ops.masked_tokens_backward(grad, ids_restore, 0, ctx.x_dtype)
        return _grads(ctx, gx)

    def encoder_input_setup(ctx, inputs, output):
        x, pos_embed, cls_token = inputs[:3]
        _, mask, ids_restore = output
        ctx.mark_non_differentiable(mask, ids_restore)
        ctx.save_for_backward(ids_restore)
        ctx.x_dtype, ctx.pos_dtype, ctx.cls_dtype = x.dtype, pos_embed.dtype, cls_token.dtype
        ctx.cls_row_dtype = torch.promote_types(cls_token.dtype, pos_embed.dtype)
        ctx.num_inputs = len(inputs)

    def encoder_input_backward(ctx, grad, grad_mask, grad_ids):
        (ids_restore,) = ctx.saved_tensors
        need_x, need_pos, need_cls = ctx.needs_input_grad[:3]
        gx = gpos = gcls = None
        if need_x or need_pos:
            # the batch sum for pos needs the grads in the tokens' dtype; else cast in the kernel
            dtype = grad.dtype if need_pos else ctx.x_dtype
            g_tokens = ops.masked_tokens_backward(grad, ids_restore, 1, dtype)
            if need_x:
                gx = g_tokens.to(ctx.x_dtype)
        if need_pos or need_cls:
            # cls row = (cls_token + pos[0]) in cls_row_dtype, broadcast over the batch, then cast:
            # its grads are cast back to cls_row_dtype, then summed over the batch
            g0 = grad[:, :1].to(ctx.cls_row_dtype).sum(0, keepdim=True)
            if need_cls:
                gcls = g0.to(ctx.cls_dtype)
            if need_pos:
                gpos = torch.cat([g0.to(ctx.pos_dtype), g_tokens.sum(0, keepdim=True).to(ctx.pos_dtype)], dim=1)
        return _grads(ctx, gx, gpos, gcls)

    torch.library.register_autograd(f"{ns}::random_masking", random_masking_backward,
                                    setup_context=random_masking_setup)
    torch.library.register_autograd(f"{ns}::encoder_input", encoder_input_backward,
                                    setup_context=encoder_input_setup)


def register_decoder_unshuffle(ns: str) -> None:
    """Autograd of ``ns::decoder_unshuffle(x, ids_restore, mask_token, pos_embed)``; fake of
    ``ns::decoder_unshuffle_backward``.

    ``decoder_unshuffle_backward`` gives grad x (the gradient rows of the kept tokens and the
    cls row, in x's dtype) and the sum of the removed rows' gradient (D,) in fp32 (fp64 for
    fp64 grads), grad mask_token; ``grad pos_embed = grad.sum(0)``.
    """
    ops = getattr(torch.ops, ns)

    @torch.library.register_fake(f"{ns}::decoder_unshuffle_backward")
    def _(grad, ids_restore, len_keep, x_dtype):
        N, _, D = grad.shape
        acc_dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
        return grad.new_empty((N, 1 + len_keep, D), dtype=x_dtype), grad.new_empty((D,), dtype=acc_dtype)

    def setup_context(ctx, inputs, output):
        x, ids_restore, mask_token, pos_embed = inputs
        ctx.save_for_backward(ids_restore)
        ctx.len_keep = x.shape[1] - 1
        ctx.x_dtype = x.dtype
        ctx.mask_dtype = mask_token.dtype
        ctx.pos_dtype = None if pos_embed is None else pos_embed.dtype

    def backward(ctx, grad):
        (ids_restore,) = ctx.saved_tensors
        need_x, _, need_mask, need_pos = ctx.needs_input_grad
        gx = gmask = gpos = None
        if need_x or need_mask:
            gx, gm = ops.decoder_unshuffle_backward(grad, ids_restore, ctx.len_keep, ctx.x_dtype)
            gmask = gm.to(ctx.mask_dtype).view(1, 1, -1) if need_mask else None
            gx = gx if need_x else None
        if need_pos:
            gpos = grad.sum(0, keepdim=True).to(ctx.pos_dtype)
        return gx, None, gmask, gpos

    torch.library.register_autograd(f"{ns}::decoder_unshuffle", backward, setup_context=setup_context)


def register_mae_loss(ns: str) -> None:
    """Autograd of ``ns::mae_loss(imgs, pred, mask, patch_size, norm_pix_loss) -> (loss, mask_sum)``
    w.r.t. ``pred`` only (imgs and mask are data); fake of ``ns::mae_loss_backward``."""
    ops = getattr(torch.ops, ns)

    @torch.library.register_fake(f"{ns}::mae_loss_backward")
    def _(grad_out, mask_sum, imgs, pred, mask, patch_size, norm_pix_loss):
        return pred.new_empty(pred.shape)

    def setup_context(ctx, inputs, output):
        imgs, pred, mask, patch_size, norm_pix_loss = inputs
        _, mask_sum = output
        ctx.mark_non_differentiable(mask_sum)
        ctx.save_for_backward(imgs, pred, mask, mask_sum)
        ctx.patch_size = patch_size
        ctx.norm_pix_loss = norm_pix_loss

    def backward(ctx, grad_out, grad_mask_sum):
        imgs, pred, mask, mask_sum = ctx.saved_tensors
        grad_pred = None
        if ctx.needs_input_grad[1]:
            grad_pred = ops.mae_loss_backward(grad_out, mask_sum, imgs, pred, mask, ctx.patch_size, ctx.norm_pix_loss)
        return None, grad_pred, None, None, None

    torch.library.register_autograd(f"{ns}::mae_loss", backward, setup_context=setup_context)
