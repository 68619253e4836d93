"""Bad input to the data-path ops: the same clear error (type and message) on backend="ext" as on
"torch" (and "triton" where it runs), because fastmae.ops validates before dispatching.

Runs whether or not fastmae._C is built: the validation comes first either way.
"""

import pytest
import torch

from fastmae import ops

x = torch.randn(2, 16, 8)
pos, cls = torch.randn(1, 17, 8), torch.randn(1, 1, 8)
imgs = torch.randn(2, 3, 16, 16)
pred = torch.randn(2, 16, 48)
mask = torch.ones(2, 16)
ids = torch.stack([torch.randperm(16) for _ in range(2)])
dec = torch.randn(2, 5, 8)
mt = torch.randn(1, 1, 8)

BAD = {
    "patchify: non-divisible": lambda b: ops.patchify(torch.randn(1, 3, 10, 16), 4, backend=b),
    "patchify: patch_size": lambda b: ops.patchify(imgs, 0, backend=b),
    "patchify: not a tensor": lambda b: ops.patchify(imgs.numpy(), 4, backend=b),
    "unpatchify: not square": lambda b: ops.unpatchify(torch.randn(1, 12, 48), 4, backend=b),
    "unpatchify: grid": lambda b: ops.unpatchify(torch.randn(1, 12, 48), 4, (3, 5), backend=b),
    "random_masking: ratio": lambda b: ops.random_masking(x, 1.0, backend=b),
    "random_masking: ratio type": lambda b: ops.random_masking(x, "0.5", backend=b),
    "random_masking: noise shape": lambda b: ops.random_masking(x, 0.5, torch.rand(2, 15), backend=b),
    "random_masking: noise dtype": lambda b: ops.random_masking(x, 0.5, torch.ones(2, 16, dtype=torch.long),
                                                                backend=b),
    "encoder_input: pos_embed": lambda b: ops.encoder_input(x, torch.randn(1, 16, 8), cls, 0.75, backend=b),
    "encoder_input: cls_token": lambda b: ops.encoder_input(x, pos, torch.randn(1, 1, 4), 0.75, backend=b),
    "encoder_input: too few kept": lambda b: ops.encoder_input(x, pos, cls, 0.99, backend=b),
    "decoder_unshuffle: ids dtype": lambda b: ops.decoder_unshuffle(dec, ids.float(), mt, backend=b),
    "decoder_unshuffle: batch": lambda b: ops.decoder_unshuffle(dec, ids[:1], mt, backend=b),
    "decoder_unshuffle: tokens": lambda b: ops.decoder_unshuffle(torch.randn(2, 18, 8), ids, mt, backend=b),
    "decoder_unshuffle: pos": lambda b: ops.decoder_unshuffle(dec, ids, mt, torch.randn(1, 16, 8), backend=b),
    "mae_loss: pred shape": lambda b: ops.mae_loss(imgs, pred[:, :15], mask, 4, backend=b),
    "mae_loss: mask shape": lambda b: ops.mae_loss(imgs, pred, mask[:, :8], 4, backend=b),
    "mae_loss: int imgs": lambda b: ops.mae_loss(imgs.to(torch.uint8), pred, mask, 4, backend=b),
    "mae_loss: int pred": lambda b: ops.mae_loss(imgs, pred.long(), mask, 4, backend=b),
}


def _error(fn, backend):
    with pytest.raises((ValueError, TypeError)) as info:
        fn(backend)
    return type(info.value), str(info.value)


@pytest.mark.parametrize("case", sorted(BAD))
def test_same_error_on_every_backend(case):
    want = _error(BAD[case], "torch")
    assert _error(BAD[case], "ext") == want
    assert _error(BAD[case], "auto") == want
    try:
        import triton  # noqa: F401
    except ImportError:
        return
    assert _error(BAD[case], "triton") == want
