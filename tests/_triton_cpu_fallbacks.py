"""Run in a process of its own without TRITON_INTERPRET (tests/test_dispatch.py): every Triton op
on CPU tensors takes its registered CPU fallback (the reference); forward and gradients must be
the reference's. Prints "ok <op>" per op, and raises on the first that differs."""

import os

import torch

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0")

from fastmae import reference as ref  # noqa: E402
from fastmae.kernels import attention, bias_gelu, layer_norm, loss, masking, patchify, unshuffle  # noqa: E402


def check(name, kernel, reference, *inputs):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    twins = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out, want = kernel(*leaves), reference(*twins)
    out, want = (out if isinstance(out, tuple) else (out,)), (want if isinstance(want, tuple) else (want,))
    diff = [(o, w) for o, w in zip(out, want) if w.requires_grad]
    assert all(o.requires_grad for o, _ in diff), f"{name}: an output lost its gradient"
    for o, w in zip(out, want):
        torch.testing.assert_close(o, w, rtol=1e-6, atol=1e-6, msg=f"{name}: forward")
    gs = [torch.randn_like(o) for o, _ in diff]
    got = torch.autograd.grad([o for o, _ in diff], [t for t in leaves if t.requires_grad], gs, allow_unused=True)
    exp = torch.autograd.grad([w for _, w in diff], [t for t in twins if t.requires_grad], gs, allow_unused=True)
    for a, b in zip(got, exp):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name}: gradient")
    print("ok", name)


N, L, D = 2, 16, 8
imgs, x, noise = torch.randn(N, 3, 16, 16), torch.randn(N, L, D), torch.rand(N, L)
pos, cls, mt = torch.randn(1, 1 + L, D), torch.randn(1, 1, D), torch.randn(1, 1, D)
ids = torch.stack([torch.randperm(L) for _ in range(N)])
mask = (torch.rand(N, L) < 0.7).float()
check("patchify", lambda t: patchify.patchify(t, 4), lambda t: ref.patchify(t, 4), imgs)
check("unpatchify", lambda t: patchify.unpatchify(t, 4), lambda t: ref.unpatchify(t, 4), torch.randn(N, L, 48))
check("random_masking", lambda t: masking.random_masking(t, 0.75, noise), lambda t: ref.random_masking(t, 0.75, noise),
      x)
check("encoder_input", lambda t, p, c: masking.encoder_input(t, p, c, 0.75, noise),
      lambda t, p, c: ref.encoder_input(t, p, c, 0.75, noise), x, pos, cls)
check("decoder_unshuffle", lambda t, m, p: unshuffle.decoder_unshuffle(t, ids, m, p),
      lambda t, m, p: ref.decoder_unshuffle(t, ids, m, p), torch.randn(N, 5, D), mt, pos)
for norm in (False, True):
    check(f"mae_loss norm={norm}", lambda p, norm=norm: loss.mae_loss(imgs, p, mask, 4, norm),
          lambda p, norm=norm: ref.mae_loss(imgs, p, mask, 4, norm), torch.randn(N, L, 48))
check("attention", attention.attention, ref.attention, *(torch.randn(N, 9, 2, 16) for _ in range(3)))
check("attention_qkvpacked", attention.attention_qkvpacked, ref.attention_qkvpacked, torch.randn(N, 9, 3, 2, 16))
check("bias_gelu", bias_gelu.bias_gelu, ref.bias_gelu, torch.randn(5, 24), torch.randn(24))
check("add_layer_norm", lambda a, r, w, b: layer_norm.add_layer_norm(a, r, w, b, 1e-6),
      lambda a, r, w, b: ref.add_layer_norm(a, r, w, b, 1e-6), x, torch.randn(N, L, D), torch.randn(D), torch.randn(D))
check("layer_norm", lambda a, w, b: layer_norm.layer_norm(a, w, b, 1e-6), lambda a, w, b: ref.layer_norm(a, w, b, 1e-6),
      x, torch.randn(D), torch.randn(D))
