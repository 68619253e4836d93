"""mae_loss of the compiled extension (``backend="ext"``).

Kernels: ``csrc/ops/cuda/loss_kernel.cu`` and the C++ twin ``csrc/ops/cpu/loss_kernel.cpp``,
sharing ``csrc/ops/loss.h`` (and the patch index math of ``csrc/ops/patchify.h``); schemas
in ``csrc/ops/loss.cpp``. One pass over the removed patches: the target is gathered from the
images (never materialised), normalised per patch with ``norm_pix_loss``, and the squared
error reduced to fixed partial sums added in a fixed order (deterministic). Patches with mask
0 are not read (so, unlike the reference's ``0 * inf``, non-finite values there do not reach
the loss). Differentiable w.r.t. ``pred`` only, with the Triton op's formula
(:func:`fastmae._autograd.register_mae_loss`).
"""

from __future__ import annotations

import torch

from fastmae import _autograd

from . import load, sync_poison

__all__ = ["mae_loss"]

load()
_ops = torch.ops.fastmae_ext


@torch.library.register_fake("fastmae_ext::mae_loss")
def _(imgs, pred, mask, patch_size, norm_pix_loss):
    return imgs.new_empty((), dtype=torch.float32), imgs.new_empty((), dtype=torch.float32)


_autograd.register_mae_loss("fastmae_ext")


def mae_loss(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int,
             norm_pix_loss: bool = False) -> torch.Tensor:
    """The MAE reconstruction loss, a 0-dim float32 tensor, as :func:`fastmae.reference.mae_loss`."""
    sync_poison()
    return _ops.mae_loss(imgs, pred, mask, patch_size, norm_pix_loss)[0]
