"""decoder_unshuffle of the compiled extension (``backend="ext"``).

Kernels: ``csrc/ops/cuda/unshuffle_kernel.cu`` and the C++ twin
``csrc/ops/cpu/unshuffle_kernel.cpp``, sharing the row map of ``csrc/ops/unshuffle.h``;
schemas in ``csrc/ops/unshuffle.cpp``. Every output row is written once from its source (the
cls row, a kept token or the mask token) with the position embedding added as torch adds: bit
for bit the reference. Backward (``decoder_unshuffle_backward``): the gradient rows scattered
to their kept rows, no atomics, and the removed rows summed for the mask token in a fixed
order (deterministic); ``grad pos_embed = grad.sum(0)`` (the Triton op's formula,
:func:`fastmae._autograd.register_decoder_unshuffle`).
"""

from __future__ import annotations

from typing import Optional

import torch

from fastmae import _autograd

from . import load, sync_poison

__all__ = ["decoder_unshuffle"]

load()
_ops = torch.ops.fastmae_ext


def _out_dtype(x, mask_token, pos_embed):
    dtype = torch.promote_types(x.dtype, mask_token.dtype)
    return dtype if pos_embed is None else torch.promote_types(dtype, pos_embed.dtype)


@torch.library.register_fake("fastmae_ext::decoder_unshuffle")
def _(x, ids_restore, mask_token, pos_embed):
    N, _, D = x.shape
    return x.new_empty((N, 1 + ids_restore.shape[1], D), dtype=_out_dtype(x, mask_token, pos_embed))


_autograd.register_decoder_unshuffle("fastmae_ext")


def decoder_unshuffle(x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                      pos_embed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`fastmae.reference.decoder_unshuffle`: (N, 1+len_keep, D) -> (N, 1+L, D), bit for bit."""
    sync_poison()
    return _ops.decoder_unshuffle(x, ids_restore, mask_token, pos_embed)
