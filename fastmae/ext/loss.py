"""mae_loss of the compiled extension (``backend="ext"``).

Kernels: ``csrc/ops/cuda/loss_kernel.cu`` and the C++ twin ``csrc/ops/cpu/loss_kernel.cpp``,
sharing ``csrc/ops/loss.h`` (and the patch index math of ``csrc/ops/patchify.h``); schemas
in ``csrc/ops/loss.cpp``. One pass over the removed patches: the target is gathered from the
images (never materialised), normalised per patch with ``norm_pix_loss``, and the squared
error reduced to fixed partial sums added in a fixed order (deterministic). Patches with mask
0 are not read (so, unlike the reference's ``0 * inf``, non-finite values there do not reach
the loss). Differentiable w.r.t. ``pred`` only, as the Triton op.
"""

from __future__ import annotations

import torch

from . import load, sync_poison

__all__ = ["mae_loss"]

load()
_ops = torch.ops.fastmae_ext


@torch.library.register_fake("fastmae_ext::mae_loss")
def _(imgs, pred, mask, patch_size, norm_pix_loss):
    return imgs.new_empty((), dtype=torch.float32), imgs.new_empty((), dtype=torch.float32)


@torch.library.register_fake("fastmae_ext::mae_loss_backward")
def _(grad_out, mask_sum, imgs, pred, mask, patch_size, norm_pix_loss):
    return pred.new_empty(pred.shape)


def _setup_context(ctx, inputs, output):
    imgs, pred, mask, patch_size, norm_pix_loss = inputs
    _, mask_sum = output
    ctx.mark_non_differentiable(mask_sum)
    ctx.save_for_backward(imgs, pred, mask, mask_sum)
    ctx.patch_size = patch_size
    ctx.norm_pix_loss = norm_pix_loss


def _backward(ctx, grad_out, grad_mask_sum):
    imgs, pred, mask, mask_sum = ctx.saved_tensors
    grad_pred = None
    if ctx.needs_input_grad[1]:
        grad_pred = _ops.mae_loss_backward(grad_out, mask_sum, imgs, pred, mask, ctx.patch_size, ctx.norm_pix_loss)
    return None, grad_pred, None, None, None


torch.library.register_autograd("fastmae_ext::mae_loss", _backward, setup_context=_setup_context)


def mae_loss(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int,
             norm_pix_loss: bool = False) -> torch.Tensor:
    """The MAE reconstruction loss, a 0-dim float32 tensor, as :func:`fastmae.reference.mae_loss`."""
    sync_poison()
    return _ops.mae_loss(imgs, pred, mask, patch_size, norm_pix_loss)[0]
