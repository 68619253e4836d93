"""Autograd of the extension's ops beyond first derivatives: differentiating a backward (double
backward, create_graph=True) is an error naming the backward op, for every op whose backward is
an op of its own. Without an Autograd kernel on those ops, torch's fallback dropped their graph
with a warning: the second derivative came out None or zero (wrong), silently.

The patchify pair is the exception: each one's backward is the other, differentiable.
"""

import pytest
import torch
from _ext import require_ext

from fastmae import ops
from fastmae import reference as ref

require_ext()


def _leaf(*shape):
    return torch.randn(*shape, requires_grad=True)


def _ids(N, L):
    return torch.stack([torch.randperm(L) for _ in range(N)])


# op -> (the backward op that refuses, a function of fresh leaves -> (output, differentiated leaves))
CASES = {
    "attention": ("attention_bwd", lambda: (lambda q: (ops.attention_qkvpacked(q, backend="ext"), [q]))(
        _leaf(2, 9, 3, 2, 32))),
    "bias_gelu": ("bias_gelu_bwd", lambda: (lambda x, b: (ops.bias_gelu(x, b, backend="ext"), [x, b]))(
        _leaf(5, 24), _leaf(24))),
    "add_layer_norm": ("add_layer_norm_bwd", lambda: (lambda x, r, w, b: (
        ops.add_layer_norm(x, r, w, b, backend="ext")[0], [x, r, w, b]))(_leaf(2, 3, 40), _leaf(2, 3, 40), _leaf(40),
                                                                          _leaf(40))),
    "mae_loss": ("mae_loss_backward", lambda: (lambda p: (ops.mae_loss(
        torch.randn(2, 3, 8, 8), p, (torch.rand(2, 4) < 0.6).float(), 4, True, backend="ext"), [p]))(_leaf(2, 4, 48))),
    "random_masking": ("masked_tokens_backward", lambda: (lambda x: (
        ops.random_masking(x, 0.5, torch.rand(2, 16), backend="ext")[0], [x]))(_leaf(2, 16, 8))),
    "encoder_input": ("masked_tokens_backward", lambda: (lambda x, p, c: (
        ops.encoder_input(x, p, c, 0.75, torch.rand(2, 16), backend="ext")[0], [x, p, c]))(
        _leaf(2, 16, 8), _leaf(1, 17, 8), _leaf(1, 1, 8))),
    "decoder_unshuffle": ("decoder_unshuffle_backward", lambda: (lambda x, m, p: (
        ops.decoder_unshuffle(x, _ids(2, 16), m, p, backend="ext"), [x, m, p]))(
        _leaf(2, 5, 8), _leaf(1, 1, 8), _leaf(1, 17, 8))),
}


@pytest.mark.parametrize("op", CASES)
def test_double_backward_is_an_error(op):
    bwd_op, make = CASES[op]
    out, leaves = make()
    g = torch.randn_like(out, requires_grad=True)  # the second derivative is taken through g too
    first = torch.autograd.grad(out, leaves, g, create_graph=True, allow_unused=True)
    assert any(t is not None and t.requires_grad for t in first)  # the first derivatives are on the graph
    total = sum((t * torch.randn_like(t)).sum() for t in first if t is not None)
    with pytest.raises(RuntimeError, match=f"fastmae_ext::{bwd_op}"):
        torch.autograd.grad(total, [*leaves, g], allow_unused=True)


@pytest.mark.parametrize("op", CASES)
def test_first_derivatives_unchanged_under_create_graph(op):
    """create_graph=True alone (no second derivative taken) gives the same first derivatives."""
    bwd_op, make = CASES[op]
    torch.manual_seed(0)
    out, leaves = make()
    g = torch.randn_like(out)
    a = torch.autograd.grad(out, leaves, g, retain_graph=True, allow_unused=True)
    b = torch.autograd.grad(out, leaves, g, create_graph=True, allow_unused=True)
    for x, y in zip(a, b):
        assert (x is None and y is None) or torch.equal(x, y.detach())


def test_patchify_is_twice_differentiable():
    imgs = _leaf(2, 3, 8, 8)
    g = torch.randn(2, 4, 48, requires_grad=True)
    (gi,) = torch.autograd.grad(ops.patchify(imgs, 4, backend="ext"), imgs, g, create_graph=True)
    (gg,) = torch.autograd.grad((gi * imgs.detach()).sum(), g)
    assert torch.equal(gg, ref.patchify(imgs.detach(), 4))
