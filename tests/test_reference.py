"""The reference ops against independent formulations (loops, F.unfold, closed forms)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastmae import ops
from fastmae import reference as ref


def _imgs(N, C, H, W, dtype=torch.float32):
    return (torch.randn(N, C, H, W) + 0.5).to(dtype)


# ----------------------------------------------------------------------------- patchify
@pytest.mark.parametrize("N,C,H,W,p", [(1, 3, 14, 14, 2), (3, 3, 28, 28, 2), (2, 1, 32, 32, 2), (2, 3, 32, 48, 4),
                                       (1, 3, 224, 224, 16), (2, 2, 10, 6, 1)])
def test_patchify_matches_unfold(N, C, H, W, p):
    imgs = _imgs(N, C, H, W)
    cols = F.unfold(imgs, kernel_size=p, stride=p)  # (N, C*p*p, L), (c, row, col) order
    L = cols.shape[-1]
    want = cols.transpose(1, 2).reshape(N, L, C, p, p).permute(0, 1, 3, 4, 2).reshape(N, L, p * p * C)
    assert torch.equal(ref.patchify(imgs, p), want)


def test_patchify_matches_loops():
    N, C, H, W, p = 2, 3, 12, 8, 4
    imgs = _imgs(N, C, H, W)
    out = ref.patchify(imgs, p)
    w = W // p
    for n in range(N):
        for i in range(H // p):
            for j in range(w):
                for r in range(p):
                    for c in range(p):
                        for ch in range(C):
                            assert out[n, i * w + j, (r * p + c) * C + ch] == imgs[n, ch, i * p + r, j * p + c]


@pytest.mark.parametrize("L", [1, 49, 196, 256])
def test_unpatchify_inverts_patchify(L):
    g = math.isqrt(L)
    imgs = _imgs(2, 3, 2 * g, 2 * g)
    assert torch.equal(ref.unpatchify(ref.patchify(imgs, 2), 2), imgs)


def test_unpatchify_rectangular_grid():
    imgs = _imgs(2, 3, 8, 20)
    assert torch.equal(ref.unpatchify(ref.patchify(imgs, 4), 4, grid_size=(2, 5)), imgs)
    with pytest.raises(ValueError, match="square"):
        ref.unpatchify(ref.patchify(imgs, 4), 4)
    with pytest.raises(ValueError, match="grid_size"):
        ref.unpatchify(ref.patchify(imgs, 4), 4, grid_size=(3, 3))


def test_patchify_bad_input():
    with pytest.raises(ValueError, match="patch_size"):
        ref.patchify(_imgs(1, 3, 30, 32), 4)
    with pytest.raises(ValueError, match="imgs"):
        ref.patchify(torch.randn(3, 32, 32), 4)
    with pytest.raises(ValueError, match="patch_size"):
        ref.patchify(_imgs(1, 3, 32, 32), 0)


# ----------------------------------------------------------------------------- masking
def _loop_masking(x, mask_ratio, noise):
    N, L, D = x.shape
    keep = int(L * (1 - mask_ratio))
    xm = torch.empty(N, keep, D, dtype=x.dtype)
    mask = torch.empty(N, L)
    restore = torch.empty(N, L, dtype=torch.int64)
    for n in range(N):
        order = sorted(range(L), key=lambda i: (noise[n, i].item(), i))  # stable ascending
        for j, i in enumerate(order):
            restore[n, i] = j
            mask[n, i] = 0.0 if j < keep else 1.0
            if j < keep:
                xm[n, j] = x[n, i]
    return xm, mask, restore


@pytest.mark.parametrize("N,L,D", [(1, 49, 40), (3, 196, 24), (2, 256, 8), (2, 1, 5)])
@pytest.mark.parametrize("mask_ratio", [0.0, 0.5, 0.75, 0.9])
def test_random_masking_matches_loops(N, L, D, mask_ratio):
    if int(L * (1 - mask_ratio)) < 1:
        with pytest.raises(ValueError, match="mask_ratio"):
            ref.random_masking(torch.randn(N, L, D), mask_ratio)
        return
    x = torch.randn(N, L, D)
    noise = torch.rand(N, L)
    got = ref.random_masking(x, mask_ratio, noise)
    want = _loop_masking(x, mask_ratio, noise)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)


def test_random_masking_ties_are_stable():
    x = torch.randn(3, 50, 4)
    noise = torch.randint(0, 4, (3, 50)).float() / 4  # many ties
    for g, w in zip(ref.random_masking(x, 0.6, noise), _loop_masking(x, 0.6, noise)):
        assert torch.equal(g, w)


def test_random_masking_without_noise_is_seeded():
    x = torch.randn(2, 49, 8)
    torch.manual_seed(5)
    a = ref.random_masking(x, 0.75)
    torch.manual_seed(5)
    b = ref.random_masking(x, 0.75)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert torch.equal(a[1].sum(1), torch.full((2,), 49.0 - 12))


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_mask_ratio_out_of_range(bad):
    with pytest.raises(ValueError, match="mask_ratio"):
        ref.random_masking(torch.randn(1, 16, 4), bad)


@pytest.mark.parametrize("ratio", [np.float32(0.75), np.float64(0.75), torch.tensor(0.75), torch.tensor(0.75).double(),
                                   3 / 4])
def test_mask_ratio_as_the_official_code_takes_it(ratio):
    """NumPy scalars and 0-dim float tensors are mask ratios too (the official int(L * (1 - r))
    takes them): every path masks as with the Python float; other types are a TypeError naming it."""
    x, noise = torch.randn(2, 16, 4), torch.rand(2, 16)
    want = ref.random_masking(x, 0.75, noise)
    for got in (ref.random_masking(x, ratio, noise), ops.random_masking(x, ratio, noise),
                ops.random_masking(x, ratio, noise, backend="torch")):
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert ref.num_kept(16, ratio) == 4


@pytest.mark.parametrize("bad", ["0.75", True, torch.tensor([0.75]), torch.tensor(1), np.array([0.75]), None])
def test_mask_ratio_of_another_type(bad):
    with pytest.raises(TypeError, match="mask_ratio must be a float"):
        ref.random_masking(torch.randn(1, 16, 4), bad)
    with pytest.raises(TypeError, match="mask_ratio must be a float"):
        ops.random_masking(torch.randn(1, 16, 4), bad)


def test_noise_wrong_shape():
    with pytest.raises(ValueError, match="noise"):
        ref.random_masking(torch.randn(2, 16, 4), 0.5, torch.rand(2, 15))
    with pytest.raises(TypeError, match="noise"):
        ref.random_masking(torch.randn(2, 16, 4), 0.5, torch.ones(2, 16, dtype=torch.int64))


def test_encoder_input_is_the_official_composition():
    N, L, D = 3, 49, 40
    x, pos, cls = torch.randn(N, L, D), torch.randn(1, 1 + L, D), torch.randn(1, 1, D)
    noise = torch.rand(N, L)
    tokens, mask, restore = ref.encoder_input(x, pos, cls, 0.75, noise)
    xm, mask2, restore2 = _loop_masking(x + pos[:, 1:], 0.75, noise)
    assert torch.equal(mask, mask2) and torch.equal(restore, restore2)
    assert tokens.shape == (N, 1 + 12, D)
    assert torch.equal(tokens[:, 1:], xm)
    assert torch.equal(tokens[:, 0], (cls + pos[:, :1])[0].expand(N, D))


# ----------------------------------------------------------------------------- unshuffle
@pytest.mark.parametrize("N,L,D,keep", [(1, 49, 40, 12), (3, 196, 24, 49), (2, 256, 8, 64), (2, 4, 3, 4)])
def test_decoder_unshuffle_matches_loops(N, L, D, keep):
    x = torch.randn(N, 1 + keep, D)
    restore = torch.stack([torch.randperm(L) for _ in range(N)])
    tok = torch.randn(1, 1, D)
    pos = torch.randn(1, 1 + L, D)
    out = ref.decoder_unshuffle(x, restore, tok, pos)
    assert out.shape == (N, 1 + L, D)
    for n in range(N):
        assert torch.equal(out[n, 0], x[n, 0] + pos[0, 0])
        for l in range(L):
            j = restore[n, l].item()
            src = x[n, 1 + j] if j < keep else tok[0, 0]
            assert torch.equal(out[n, 1 + l], src + pos[0, 1 + l])


def test_masking_then_unshuffle_restores_visible_tokens():
    x = torch.randn(2, 196, 16)
    xm, mask, restore = ref.random_masking(x, 0.75)
    tok = torch.randn(1, 1, 16)
    cls = torch.randn(2, 1, 16)
    out = ref.decoder_unshuffle(torch.cat([cls, xm], 1), restore, tok)
    keep = mask == 0
    assert torch.equal(out[:, 1:][keep], x[keep])
    assert torch.equal(out[:, 1:][~keep], tok[0, 0].expand(int((~keep).sum()), 16))


def test_decoder_unshuffle_bad_input():
    with pytest.raises(ValueError, match="mask_token"):
        ref.decoder_unshuffle(torch.randn(2, 5, 8), torch.randperm(16).expand(2, 16), torch.randn(1, 1, 7))
    with pytest.raises(TypeError, match="ids_restore"):
        ref.decoder_unshuffle(torch.randn(2, 5, 8), torch.rand(2, 16), torch.randn(1, 1, 8))


# ----------------------------------------------------------------------------- loss
def _loop_loss(imgs, pred, mask, p, norm):
    target = ref.patchify(imgs.double(), p).numpy()
    pred = pred.double().numpy()
    num = den = 0.0
    N, L, P = target.shape
    for n in range(N):
        for l in range(L):
            t = target[n, l]
            if norm:
                mu = t.sum() / P
                var = ((t - mu) ** 2).sum() / (P - 1)
                t = (t - mu) / math.sqrt(var + 1e-6)
            err = ((pred[n, l] - t) ** 2).sum() / P
            num += err * mask[n, l].item()
            den += mask[n, l].item()
    return num / den


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("N,C,S,p", [(1, 3, 14, 2), (3, 3, 28, 4), (2, 1, 16, 2)])
def test_loss_matches_loops(norm, N, C, S, p):
    imgs = _imgs(N, C, S, S)
    L = (S // p) ** 2
    pred = torch.randn(N, L, p * p * C)
    mask = (torch.rand(N, L) < 0.75).float()
    mask[0, 0] = 1.0
    got = ref.mae_loss(imgs, pred, mask, p, norm)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert abs(got.item() - _loop_loss(imgs, pred, mask, p, norm)) <= 1e-5 * abs(got.item())


def test_loss_bad_input():
    imgs = _imgs(2, 3, 8, 8)
    with pytest.raises(TypeError, match="imgs"):
        ref.mae_loss(imgs.to(torch.uint8), torch.randn(2, 4, 48), torch.ones(2, 4), 4)
    with pytest.raises(ValueError, match="pred"):
        ref.mae_loss(imgs, torch.randn(2, 4, 47), torch.ones(2, 4), 4)
    with pytest.raises(ValueError, match="mask"):
        ref.mae_loss(imgs, torch.randn(2, 4, 48), torch.ones(2, 5), 4)


# ----------------------------------------------------------------------------- pos embed
@pytest.mark.parametrize("D,g", [(16, 7), (768, 14), (512, 16), (40, 2)])
def test_pos_embed_closed_form(D, g):
    emb = ref.get_2d_sincos_pos_embed(D, g, cls_token=True)
    assert emb.shape == (1 + g * g, D) and emb.dtype == np.float64
    assert not emb[0].any()
    q = D // 4
    for i in range(g):  # row
        for j in range(g):  # column
            row = emb[1 + i * g + j]
            for k in range(q):
                omega = 1.0 / 10000 ** (k / q)
                # first half: the column (w) coordinate; second half: the row; [sin, cos] each
                want = (math.sin(j * omega), math.cos(j * omega), math.sin(i * omega), math.cos(i * omega))
                got = (row[k], row[q + k], row[2 * q + k], row[3 * q + k])
                assert np.allclose(got, want, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- attention
@pytest.mark.parametrize("B,N,H,D", [(2, 1, 3, 8), (1, 50, 2, 64), (2, 65, 1, 80), (1, 197, 2, 32)])
def test_attention_matches_softmax_formula(B, N, H, D):
    q, k, v = (torch.randn(B, N, H, D, dtype=torch.float64) for _ in range(3))
    out = ref.attention(q, k, v)
    for b in range(B):
        for h in range(H):
            s = q[b, :, h] @ k[b, :, h].T / math.sqrt(D)
            p = torch.exp(s - s.max(1, keepdim=True).values)
            want = (p / p.sum(1, keepdim=True)) @ v[b, :, h]
            torch.testing.assert_close(out[b, :, h], want, rtol=1e-12, atol=1e-12)
    qkv = torch.stack([q, k, v], dim=2)
    assert torch.equal(ref.attention_qkvpacked(qkv, 0.3), ref.attention(q, k, v, 0.3))
    torch.testing.assert_close(ref.sdpa_attention(q, k, v), out, rtol=1e-10, atol=1e-10)
