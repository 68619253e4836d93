"""The drop-in model: official state_dict, initialisation, forward semantics, training, errors."""

import math

import pytest
import torch
import torch.nn as nn

import fastmae
from fastmae import reference as ref
from fastmae.models import mae as mae_mod


def _official_state_dict_shapes(patch_size, embed_dim, depth, num_heads, img_size=224, in_chans=3,
                                decoder_embed_dim=512, decoder_depth=8, mlp_ratio=4):
    """Keys and shapes of the official model, written from models_mae.py and timm's ViT Block
    (PatchEmbed.proj Conv2d; Block = norm1, attn.qkv (fused, bias), attn.proj, norm2, mlp.fc1, mlp.fc2)."""
    L = (img_size // patch_size) ** 2
    d = {
        "cls_token": (1, 1, embed_dim),
        "pos_embed": (1, L + 1, embed_dim),
        "patch_embed.proj.weight": (embed_dim, in_chans, patch_size, patch_size),
        "patch_embed.proj.bias": (embed_dim,),
    }

    def block(prefix, dim):
        hidden = int(dim * mlp_ratio)
        return {
            f"{prefix}.norm1.weight": (dim,), f"{prefix}.norm1.bias": (dim,),
            f"{prefix}.attn.qkv.weight": (3 * dim, dim), f"{prefix}.attn.qkv.bias": (3 * dim,),
            f"{prefix}.attn.proj.weight": (dim, dim), f"{prefix}.attn.proj.bias": (dim,),
            f"{prefix}.norm2.weight": (dim,), f"{prefix}.norm2.bias": (dim,),
            f"{prefix}.mlp.fc1.weight": (hidden, dim), f"{prefix}.mlp.fc1.bias": (hidden,),
            f"{prefix}.mlp.fc2.weight": (dim, hidden), f"{prefix}.mlp.fc2.bias": (dim,),
        }

    for i in range(depth):
        d.update(block(f"blocks.{i}", embed_dim))
    d.update({"norm.weight": (embed_dim,), "norm.bias": (embed_dim,),
              "mask_token": (1, 1, decoder_embed_dim),
              "decoder_pos_embed": (1, L + 1, decoder_embed_dim),
              "decoder_embed.weight": (decoder_embed_dim, embed_dim), "decoder_embed.bias": (decoder_embed_dim,)})
    for i in range(decoder_depth):
        d.update(block(f"decoder_blocks.{i}", decoder_embed_dim))
    d.update({"decoder_norm.weight": (decoder_embed_dim,), "decoder_norm.bias": (decoder_embed_dim,),
              "decoder_pred.weight": (patch_size**2 * in_chans, decoder_embed_dim),
              "decoder_pred.bias": (patch_size**2 * in_chans,)})
    return d


OFFICIAL = {  # factory name -> (patch_size, embed_dim, depth, num_heads), from models_mae.py
    "mae_vit_base_patch16_dec512d8b": (16, 768, 12, 12),
    "mae_vit_large_patch16_dec512d8b": (16, 1024, 24, 16),
    "mae_vit_huge_patch14_dec512d8b": (14, 1280, 32, 16),
}
ALIASES = {"mae_vit_base_patch16": "mae_vit_base_patch16_dec512d8b",
           "mae_vit_large_patch16": "mae_vit_large_patch16_dec512d8b",
           "mae_vit_huge_patch14": "mae_vit_huge_patch14_dec512d8b"}


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_factory_state_dict_matches_official(name):
    with torch.device("meta"):
        model = getattr(fastmae, name)()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = _official_state_dict_shapes(*OFFICIAL[name])
    assert list(got) == list(want) or set(got) == set(want)
    assert got == want
    assert getattr(fastmae.models, name) is getattr(fastmae, name)
    # official checkpoints load strictly: a state_dict with exactly those keys and shapes
    sd = {k: torch.empty(s, device="meta") for k, s in want.items()}
    model.load_state_dict(sd, strict=True, assign=True)


def test_aliases():
    for alias, full in ALIASES.items():
        assert getattr(fastmae, alias) is getattr(fastmae, full)
        assert getattr(fastmae.models, alias) is getattr(fastmae.models, full)


def test_layernorm_eps_and_frozen_pos_embed():
    with torch.device("meta"):
        m = fastmae.mae_vit_base_patch16()
    lns = [x for x in m.modules() if isinstance(x, nn.LayerNorm)]
    assert len(lns) == 2 * 12 + 1 + 2 * 8 + 1 and all(ln.eps == 1e-6 for ln in lns)
    assert isinstance(m.pos_embed, nn.Parameter) and not m.pos_embed.requires_grad
    assert isinstance(m.decoder_pos_embed, nn.Parameter) and not m.decoder_pos_embed.requires_grad
    assert "pos_embed" not in dict(m.named_buffers())


def tiny(**kw):
    cfg = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=4,
               decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=3, mlp_ratio=2.0,
               norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6))
    cfg.update(kw)
    return fastmae.MaskedAutoencoderViT(**cfg)


def test_initialisation_is_official():
    m = tiny(embed_dim=64, decoder_embed_dim=48, num_heads=4, decoder_num_heads=4)
    L, g = 16, 4
    want_pos = torch.from_numpy(ref.get_2d_sincos_pos_embed(64, g, cls_token=True)).float()
    assert torch.equal(m.pos_embed[0], want_pos)
    assert torch.equal(m.decoder_pos_embed[0], torch.from_numpy(ref.get_2d_sincos_pos_embed(48, g, True)).float())
    assert m.pos_embed.shape == (1, 1 + L, 64)
    for name, mod in m.named_modules():
        if isinstance(mod, nn.Linear):
            bound = math.sqrt(6.0 / (mod.in_features + mod.out_features))  # xavier_uniform
            assert mod.weight.abs().max() <= bound and mod.weight.abs().max() > 0.5 * bound, name
            assert not mod.bias.any(), name
        if isinstance(mod, nn.LayerNorm):
            assert torch.equal(mod.weight, torch.ones_like(mod.weight)) and not mod.bias.any()
    w = m.patch_embed.proj.weight
    bound = math.sqrt(6.0 / (w.shape[0] + w[0].numel()))  # xavier on the flattened (D, C*p*p) weight
    assert w.abs().max() <= bound and w.abs().max() > 0.5 * bound
    # the official code leaves the conv bias at nn.Conv2d's default U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert m.patch_embed.proj.bias.abs().max() <= 1 / math.sqrt(w[0].numel())
    big = fastmae.MaskedAutoencoderViT(img_size=32, patch_size=4, embed_dim=256, depth=0, num_heads=4,
                                       decoder_embed_dim=256, decoder_depth=0)
    assert abs(big.cls_token.std().item() - 0.02) < 0.006 and abs(big.mask_token.std().item() - 0.02) < 0.006


def _official_forward(m, imgs, mask_ratio, noise):
    """The official forward written out with plain torch on the model's own weights, with
    attention as in timm's Attention (explicit softmax)."""
    def block(blk, x):
        B, N, C = x.shape
        h = blk.norm1(x)
        qkv = blk.attn.qkv(h).reshape(B, N, 3, blk.attn.num_heads, C // blk.attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * blk.attn.scale).softmax(dim=-1)
        h = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = x + blk.attn.proj(h)
        return x + blk.mlp.fc2(nn.functional.gelu(blk.mlp.fc1(blk.norm2(x))))

    x = m.patch_embed.proj(imgs).flatten(2).transpose(1, 2)
    x = x + m.pos_embed[:, 1:, :]
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :len_keep].unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones(N, L)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    cls = (m.cls_token + m.pos_embed[:, :1, :]).expand(N, -1, -1)
    x = torch.cat((cls, x), dim=1)
    for blk in m.blocks:
        x = block(blk, x)
    x = m.decoder_embed(m.norm(x))
    mask_tokens = m.mask_token.repeat(N, L + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1) + m.decoder_pos_embed
    for blk in m.decoder_blocks:
        x = block(blk, x)
    pred = m.decoder_pred(m.decoder_norm(x))[:, 1:, :]
    target = m.patchify(imgs)
    if m.norm_pix_loss:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum(), pred, mask


@pytest.mark.parametrize("norm_pix_loss", [False, True])
@pytest.mark.parametrize("backend", ["torch", None, "sdpa"])  # sdpa: attention only, the data ops on the default
def test_forward_matches_official_code(norm_pix_loss, backend):
    m = tiny(norm_pix_loss=norm_pix_loss, backend=backend)
    imgs = torch.randn(3, 3, 16, 16)
    noise = torch.rand(3, 16)
    loss, pred, mask = m(imgs, mask_ratio=0.75, noise=noise)
    want_loss, want_pred, want_mask = _official_forward(m, imgs, 0.75, noise)
    assert torch.equal(mask, want_mask)
    # only the attention's summation order differs (SDPA vs explicit softmax): fp32 rounding
    torch.testing.assert_close(pred, want_pred, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert pred.shape == (3, 16, 48) and mask.shape == (3, 16)


def test_attention_only_backends_leave_the_data_ops_to_the_default():
    """backend="xformers" names attention's backend only: the data ops run (they were refused:
    "is for attention only"), and attention asks for xformers itself (CUDA only)."""
    from fastmae.backend import BackendUnavailableError

    m = tiny(backend="xformers")
    imgs = torch.randn(2, 3, 16, 16)
    assert torch.equal(m.unpatchify(m.patchify(imgs)), imgs)
    noise = torch.rand(2, 16)
    xm, mask, _ = m.random_masking(torch.randn(2, 16, 32), 0.75, noise)
    assert xm.shape == (2, 4, 32) and torch.equal(mask.sum(1), torch.full((2,), 12.0))
    with pytest.raises(BackendUnavailableError, match="xformers"):
        m(imgs, 0.75, noise)


def test_patchify_methods_and_noise_reproducibility():
    m = tiny()
    imgs = torch.randn(2, 3, 16, 16)
    assert torch.equal(m.unpatchify(m.patchify(imgs)), imgs)
    noise = torch.rand(2, 16)
    a = m(imgs, 0.5, noise)
    b = m(imgs, 0.5, noise)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    xm, mask, restore = m.random_masking(torch.randn(2, 16, 32), 0.5, noise)
    assert xm.shape == (2, 8, 32) and torch.equal(mask.sum(1), torch.full((2,), 8.0))


def test_mask_tokens_in_encoder_baseline():
    m = tiny(mask_tokens_in_encoder=True)
    assert "encoder_mask_token" in m.state_dict()
    assert "encoder_mask_token" not in tiny().state_dict()
    imgs = torch.randn(2, 3, 16, 16)
    noise = torch.rand(2, 16)
    latent, mask, restore = m.forward_encoder(imgs, 0.75, noise)
    assert latent.shape == (2, 1 + 16, 32)  # the encoder sees every token
    loss, pred, mask2 = m(imgs, 0.75, noise)
    assert torch.equal(mask, mask2) and pred.shape == (2, 16, 48)
    loss.backward()
    assert m.encoder_mask_token.grad is not None and m.encoder_mask_token.grad.abs().sum() > 0
    # removed tokens carry no information about their pixels: changing them leaves the loss
    imgs2 = imgs.clone()
    removed = mask[0].nonzero()[0].item()
    r, c = divmod(removed, 4)
    imgs2[0, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 1.0
    latent2, _, _ = m.forward_encoder(imgs2, 0.75, noise)
    assert torch.equal(latent2, latent)


def test_tiny_model_trains_and_loss_falls():
    torch.manual_seed(0)
    m = tiny(norm_pix_loss=True, backend="torch")
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.05)
    imgs = torch.randn(8, 3, 16, 16)
    imgs = imgs + imgs.roll(1, -1) + imgs.roll(1, -2)  # some spatial structure to learn
    losses = []
    for _ in range(20):
        loss, _, _ = m(imgs, 0.75)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


@pytest.mark.parametrize("make,err,match", [
    (lambda: torch.randn(2, 3, 32, 32), ValueError, "img_size"),
    (lambda: torch.randn(2, 1, 16, 16), ValueError, "in_chans"),
    (lambda: torch.randint(0, 255, (2, 3, 16, 16), dtype=torch.uint8), TypeError, "imgs"),
    (lambda: torch.randn(3, 16, 16), ValueError, "imgs"),
])
def test_bad_images(make, err, match):
    with pytest.raises(err, match=match):
        tiny()(make())


def test_bad_mask_ratio_and_noise():
    m = tiny()
    imgs = torch.randn(2, 3, 16, 16)
    for bad in (1.0, -0.5, 0.99):
        with pytest.raises(ValueError, match="mask_ratio"):
            m(imgs, bad)
    with pytest.raises(ValueError, match="noise"):
        m(imgs, 0.75, torch.rand(2, 15))


def test_bad_constructor_args():
    with pytest.raises(ValueError, match="patch_size"):
        tiny(img_size=18)
    with pytest.raises(ValueError, match="num_heads"):
        tiny(num_heads=5)
    with pytest.raises(ValueError, match="backend"):
        tiny(backend="nope")


def test_configs_table():
    assert set(mae_mod.CONFIGS) == {"base", "large", "huge"}
