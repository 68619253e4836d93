"""``fastmae validate``: every op of every available backend against :mod:`fastmae.reference`.

Each op runs on fresh random inputs (a new seed every run, printed) at the model shapes on
a GPU (ViT-B/16, ViT-L/16, ViT-H/14 at ``--batch`` images; attention at the encoder's
visible-token, mask-token and decoder shapes) and at small shapes on the CPU, where the
Triton backend runs only under ``TRITON_INTERPRET=1`` (set before the first import of
triton; it is slow). Forward results and gradients are compared with the reference by
one of three oracles:

``exact``
    data movement and indices (patchify, unpatchify, masking, unshuffle, the gathered
    rows and their scattered gradients, the mask, ``ids_restore``): ``torch.equal``, same
    dtype. A pos-embed add is one rounding of the same fp32 sum, so it is exact too.
``2x``
    anything that sums (attention and its gradients, the batch-summed gradients of
    ``pos_embed`` / ``cls_token`` / ``mask_token``, the loss gradient): the FlashAttention
    rule. With ``ref64`` the reference evaluated in float64 and ``lowp`` PyTorch's own
    result in the tested dtype, pass iff
    ``max|out - ref64| <= 2 max|lowp - ref64| + floor`` with
    ``floor = max(2 max|r + s - s - r|, 1e-5 max|ref64|)``, ``r = ref64`` rounded to the
    tested dtype and ``s = 0.3 max|ref64|``. The first term is FlashAttention's rounding
    slack (the rounding error at 0.3; scaled by the tensor's magnitude so that it stays
    relative for small quantities such as the gradient of a mean loss); it dominates in
    bf16/fp16. The second is an fp32 accumulation floor, as in the kernel tests: sums of
    up to ~10^4 terms in another order differ by about ``sqrt(n) eps32`` ~ 6e-6 of their
    magnitude, so in fp32 two correct implementations can be more than 2x apart, while an
    indexing or scaling bug is off by 1e-3 or more. For attention
    ``lowp`` is the less accurate of PyTorch's two implementations, the reference (math)
    and SDPA: in bf16/fp16 that is the math path, as in FlashAttention's tests; in fp32,
    where accumulation order rather than rounding of intermediates dominates, SDPA's
    online softmax is up to ~4x less accurate than the math path, and an fp32 kernel is
    held to twice SDPA's error rather than to a bound SDPA itself would fail.
    For ``layer_norm`` / ``add_layer_norm`` ``lowp`` is the reference in the tested dtypes
    (float32 math, outputs and gradients rounded to their dtypes) and ``ref64`` the reference
    with every input and output in float64; ``s = x + residual`` is ``exact`` against the
    reference (one float32 addition, rounded once).
    For ``bias_gelu`` (``out``, ``grad x``, ``grad bias`` at the encoder's and the decoder's
    fc1 shapes, rows x 4D) ``lowp`` is the less accurate of the reference (float32 math) and
    the stock path ``F.gelu(x + bias.to(x.dtype))`` (the bias added in x's dtype).
``rel``
    the loss value: ``|loss - ref32| / |ref32| <= 1e-5`` with ``ref32`` the fp32
    reference on the same inputs. Both sum ``N L`` patch losses of ``P`` squares in fp32;
    two summation orders differ by about ``log2(N L P) eps32`` ~ 2e-6 in practice, while a
    wrong mask, normalisation or mean moves the loss by O(1).

Random masking with ``noise=None`` (each backend draws its own noise) is checked by exact
structural invariants instead: ``ids_restore`` is a permutation, ``mask`` has
``L - len_keep`` ones exactly where ``ids_restore >= len_keep``, and the kept rows are
the rows of ``x`` at ``argsort(ids_restore)[:len_keep]``.

A backend that cannot run is listed as ``skip`` with the reason. The exit status is 1
when any check fails, else 0.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

from . import _timing, ops, reference
from .backend import ATTENTION_BACKENDS, BACKENDS, RENAMED, BackendUnavailableError

__all__ = ["OPS", "Check", "validate", "add_arguments", "run", "two_x_tolerance"]

OPS = ("patchify", "unpatchify", "random_masking", "encoder_input", "decoder_unshuffle", "mae_loss",
       "attention", "attention_qkvpacked", "layer_norm", "add_layer_norm", "bias_gelu")
_ATTENTION_OPS = ("attention", "attention_qkvpacked")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MASK_RATIO = 0.75
LOSS_RTOL = 1e-5
FP32_ACCUMULATION_FLOOR = 1e-5  # relative to max|ref64|: see the module doc


@dataclass
class Check:
    """One compared quantity."""

    op: str
    backend: str
    dtype: str
    shape: str
    quantity: str
    # exact | 2x | rel | invariants | error; skip (backend cannot run) | not run (time budget
    # spent, or the CUDA context lost)
    oracle: str
    err: float
    tol: float
    passed: bool
    detail: str = ""
    cuda_context_lost_here: bool = False  # this case's failure left the CUDA context unusable


class _Skip(Exception):
    pass


# ---------------------------------------------------------------------------- oracles
def _maxabs(a: torch.Tensor, b: torch.Tensor) -> float:
    d = (a.detach().double() - b.detach().double()).abs()
    if d.numel() == 0:
        return 0.0
    d = torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d)
    return float(d.max())


def _exact(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, bool, str]:
    if out is None or ref is None:
        return float("inf"), 0.0, out is ref, "missing gradient" if out is not ref else ""
    if out.dtype != ref.dtype:
        return float("inf"), 0.0, False, f"dtype {out.dtype} != reference {ref.dtype}"
    if out.shape != ref.shape:
        return float("inf"), 0.0, False, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    ok = torch.equal(out, ref)
    err = 0.0 if ok else _maxabs(out, ref)
    if not ok and err == 0.0:  # equal values but torch.equal false: NaNs, or -0.0 vs 0.0 is equal anyway
        err = float("inf")
    return err, 0.0, ok, ""


def two_x_tolerance(ref64: torch.Tensor, lowp, dtype: torch.dtype) -> float:
    """``2 max|lowp - ref64| + floor``: the FlashAttention rule with its rounding floor (see module doc).

    ``lowp``: PyTorch's result in ``dtype``, or a list of them (the largest error counts).
    """
    lowps = lowp if isinstance(lowp, (list, tuple)) else [lowp]
    r = ref64.detach().to(dtype)
    m = float(ref64.detach().abs().max()) if ref64.numel() else 0.0
    s = 0.3 * m
    rounding = float(((r + s) - s - r).abs().max()) if r.numel() else 0.0
    return 2.0 * max(_maxabs(t, ref64) for t in lowps) + max(2.0 * rounding, FP32_ACCUMULATION_FLOOR * m)


def _two_x(out, ref64, lowp, dtype) -> tuple[float, float, bool, str]:
    if out is None or ref64 is None:
        return float("inf"), 0.0, out is ref64, "missing gradient" if out is not ref64 else ""
    if out.shape != ref64.shape:
        return float("inf"), 0.0, False, f"shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    want_dtype = (lowp[0] if isinstance(lowp, (list, tuple)) else lowp).dtype
    if out.dtype != want_dtype:
        return float("inf"), 0.0, False, f"dtype {out.dtype} != reference {want_dtype}"
    err = _maxabs(out, ref64)
    tol = two_x_tolerance(ref64, lowp, dtype)
    if not math.isfinite(tol):  # PyTorch's own low-precision result is not finite: 2x of it bounds nothing
        return err, tol, False, "no oracle: PyTorch's own result in this dtype is not finite"
    return err, tol, err <= tol, ""


# ---------------------------------------------------------------------------- helpers
def _grad(outputs, inputs, grads):
    return torch.autograd.grad(outputs, inputs, grads, allow_unused=True)


def _call(fn, *args, **kwargs):
    """Run an op under test; a backend that cannot run becomes a skip."""
    try:
        return fn(*args, **kwargs)
    except (BackendUnavailableError, ImportError) as e:
        raise _Skip(str(e)) from e


def _leaf(t: torch.Tensor, grad: bool = True) -> torch.Tensor:
    return t.detach().clone().requires_grad_(grad)


def _name(dt: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}.get(dt, str(dt).replace("torch.", ""))


# ---------------------------------------------------------------------------- shapes
def shapes(device: torch.device, batch: int, quick: bool = False) -> tuple[list[dict], list[tuple]]:
    """(image/token shapes, attention (B, N, H, D) shapes) validated on ``device`` (``quick``: the first of each)."""
    if device.type == "cuda":
        img = [dict(name="vit_b16", N=batch, C=3, img=224, p=16, D=768, Dd=512),
               dict(name="vit_l16", N=batch, C=3, img=224, p=16, D=1024, Dd=512),
               dict(name="vit_h14", N=batch, C=3, img=224, p=14, D=1280, Dd=512)]
        att = [("vit_b16 enc visible", (batch, 50, 12, 64)), ("vit_l16 enc visible", (batch, 50, 16, 64)),
               ("vit_h14 enc visible", (batch, 65, 16, 80)), ("vit_b16 enc all", (batch, 197, 12, 64)),
               ("decoder p16", (batch, 197, 16, 32)), ("decoder p14", (batch, 257, 16, 32))]
    else:
        img = [dict(name="small", N=2, C=3, img=16, p=4, D=32, Dd=16),
               dict(name="odd", N=3, C=3, img=20, p=4, D=24, Dd=20)]
        # head dims every attention backend takes (the extension's kernels: 32, 64, 80, 128); 80 is not a
        # power of two (the Triton kernel pads it)
        att = [("small", (2, 17, 2, 32)), ("odd", (1, 37, 3, 80))]
    return (img[:1], att[:1]) if quick else (img, att)


def default_dtypes(device: torch.device, op: str) -> list[torch.dtype]:
    if device.type == "cuda":
        if op in _ATTENTION_OPS:
            return [torch.bfloat16, torch.float16, torch.float32]
        return [torch.float32, torch.bfloat16]
    # the interpreter cannot be trusted with bf16 dots; CPU checks use fp32 and fp16
    return [torch.float32, torch.float16]


def _derived(s: dict) -> dict:
    h = s["img"] // s["p"]
    L = h * h
    return dict(s, h=h, L=L, P=s["p"] * s["p"] * s["C"], K=reference.num_kept(L, MASK_RATIO))


def _shape_str(s: dict) -> str:
    return f"{s['name']} N{s['N']} {s['img']}px p{s['p']} D{s['D']}/{s['Dd']}"


# ---------------------------------------------------------------------------- cases
# Each case yields (quantity, oracle, (err, tol, passed, detail)) for one op, backend,
# dtype and shape; _Skip propagates when the backend cannot run.


def _case_patchify(b, dt, s, dev):
    imgs = torch.randn(s["N"], s["C"], s["img"], s["img"], device=dev, dtype=dt)
    x = _leaf(imgs)
    out = _call(ops.patchify, x, s["p"], backend=b)
    ref = reference.patchify(imgs, s["p"])
    yield "out", "exact", _exact(out, ref)
    g = torch.randn_like(ref)
    (gx,) = _grad([out], [x], [g])
    xr = _leaf(imgs)
    (gr,) = _grad([reference.patchify(xr, s["p"])], [xr], [g])
    yield "grad imgs", "exact", _exact(gx, gr)


def _case_unpatchify(b, dt, s, dev):
    t = torch.randn(s["N"], s["L"], s["P"], device=dev, dtype=dt)
    x = _leaf(t)
    out = _call(ops.unpatchify, x, s["p"], (s["h"], s["h"]), backend=b)
    ref = reference.unpatchify(t, s["p"], (s["h"], s["h"]))
    yield "out", "exact", _exact(out, ref)
    g = torch.randn_like(ref)
    (gx,) = _grad([out], [x], [g])
    xr = _leaf(t)
    (gr,) = _grad([reference.unpatchify(xr, s["p"], (s["h"], s["h"]))], [xr], [g])
    yield "grad x", "exact", _exact(gx, gr)


def _masking_invariants(x_rows, mask, ids_restore, K, L, expected_rows):
    """Exact checks of a masking result drawn from the backend's own noise."""
    problems = []
    if ids_restore.dtype != torch.int64:
        problems.append(f"ids_restore dtype {ids_restore.dtype}")
    elif not torch.equal(ids_restore.sort(dim=1).values,
                         torch.arange(L, device=ids_restore.device).expand_as(ids_restore)):
        problems.append("ids_restore is not a permutation")
    else:
        if mask.dtype != torch.float32 or not torch.equal(mask, (ids_restore >= K).float()):
            problems.append("mask != (ids_restore >= len_keep)")
        ids_keep = torch.argsort(ids_restore, dim=1)[:, :K]
        want = torch.gather(expected_rows, 1, ids_keep.unsqueeze(-1).expand(-1, -1, expected_rows.shape[2]))
        if x_rows.dtype != want.dtype or not torch.equal(x_rows, want):
            problems.append("kept rows != x[argsort(ids_restore)[:len_keep]]")
    return (0.0 if not problems else float("inf")), 0.0, not problems, "; ".join(problems)


def _case_random_masking(b, dt, s, dev):
    N, L, D, K = s["N"], s["L"], s["D"], s["K"]
    xt = torch.randn(N, L, D, device=dev, dtype=dt)
    noise = torch.rand(N, L, device=dev)
    x = _leaf(xt)
    xm, mask, ids = _call(ops.random_masking, x, MASK_RATIO, noise, backend=b)
    rxm, rmask, rids = reference.random_masking(xt, MASK_RATIO, noise)
    yield "x_masked", "exact", _exact(xm, rxm)
    yield "mask", "exact", _exact(mask, rmask)
    yield "ids_restore", "exact", _exact(ids, rids)
    g = torch.randn_like(rxm)
    (gx,) = _grad([xm], [x], [g])
    xr = _leaf(xt)
    (gr,) = _grad([reference.random_masking(xr, MASK_RATIO, noise)[0]], [xr], [g])
    yield "grad x", "exact", _exact(gx, gr)
    with torch.no_grad():
        xm2, mask2, ids2 = _call(ops.random_masking, xt, MASK_RATIO, None, backend=b)
    yield "noise=None", "invariants", _masking_invariants(xm2, mask2, ids2, K, L, xt)


def _param_dtypes(dt):
    """Parameter dtypes to pair with activations in ``dt``: the same, and fp32 (the model under autocast)."""
    return [dt] if dt == torch.float32 else [dt, torch.float32]


def _case_encoder_input(b, dt, s, dev):
    N, L, D, K = s["N"], s["L"], s["D"], s["K"]
    for pdt in _param_dtypes(dt):
        tag = "" if pdt == dt else " (fp32 params)"
        xt = torch.randn(N, L, D, device=dev, dtype=dt)
        pos = torch.randn(1, 1 + L, D, device=dev, dtype=pdt)
        cls = torch.randn(1, 1, D, device=dev, dtype=pdt)
        noise = torch.rand(N, L, device=dev)
        x, p_, c_ = _leaf(xt), _leaf(pos), _leaf(cls)
        tok, mask, ids = _call(ops.encoder_input, x, p_, c_, MASK_RATIO, noise, backend=b)
        rtok, rmask, rids = reference.encoder_input(xt, pos, cls, MASK_RATIO, noise)
        yield "tokens" + tag, "exact", _exact(tok, rtok)
        yield "mask" + tag, "exact", _exact(mask, rmask)
        yield "ids_restore" + tag, "exact", _exact(ids, rids)
        g = torch.randn_like(rtok)
        gx, gp, gc = _grad([tok], [x, p_, c_], [g])
        xr, pr, cr = _leaf(xt), _leaf(pos), _leaf(cls)
        rx, rp, rc = _grad([reference.encoder_input(xr, pr, cr, MASK_RATIO, noise)[0]], [xr, pr, cr], [g])
        x6, p6, c6 = _leaf(xt.double()), _leaf(pos.double()), _leaf(cls.double())
        _, p64, c64 = _grad([reference.encoder_input(x6, p6, c6, MASK_RATIO, noise)[0]], [x6, p6, c6], [g.double()])
        yield "grad x" + tag, "exact", _exact(gx, rx)
        yield "grad pos_embed" + tag, "2x", _two_x(gp, p64, rp, pdt)
        yield "grad cls_token" + tag, "2x", _two_x(gc, c64, rc, pdt)
        with torch.no_grad():
            tok2, mask2, ids2 = _call(ops.encoder_input, xt, pos, cls, MASK_RATIO, None, backend=b)
            rows = xt + pos[:, 1:]
            cls_row = (cls + pos[:, :1]).to(rows.dtype).expand(N, -1, -1)
        err, tol, ok, detail = _masking_invariants(tok2[:, 1:], mask2, ids2, K, L, rows)
        if not torch.equal(tok2[:, :1], cls_row):
            ok, err, detail = False, float("inf"), (detail + "; " if detail else "") + "cls row != cls + pos[0]"
        yield "noise=None" + tag, "invariants", (err, tol, ok, detail)


def _case_decoder_unshuffle(b, dt, s, dev):
    N, L, Dd, K = s["N"], s["L"], s["Dd"], s["K"]
    for pdt in _param_dtypes(dt):
        tag = "" if pdt == dt else " (fp32 params)"
        xt = torch.randn(N, 1 + K, Dd, device=dev, dtype=dt)
        ids_restore = torch.argsort(torch.argsort(torch.rand(N, L, device=dev), dim=1), dim=1)
        mt = torch.randn(1, 1, Dd, device=dev, dtype=pdt)
        pos = torch.randn(1, 1 + L, Dd, device=dev, dtype=pdt)
        for with_pos in (True, False):
            ptag = tag + ("" if with_pos else " (no pos_embed)")
            x, m_, p_ = _leaf(xt), _leaf(mt), _leaf(pos)
            out = _call(ops.decoder_unshuffle, x, ids_restore, m_, p_ if with_pos else None, backend=b)
            ref = reference.decoder_unshuffle(xt, ids_restore, mt, pos if with_pos else None)
            yield "out" + ptag, "exact", _exact(out, ref)
            g = torch.randn_like(ref)
            ins = [x, m_] + ([p_] if with_pos else [])
            got = _grad([out], ins, [g])
            xr, mr, pr = _leaf(xt), _leaf(mt), _leaf(pos)
            rins = [xr, mr] + ([pr] if with_pos else [])
            want = _grad([reference.decoder_unshuffle(xr, ids_restore, mr, pr if with_pos else None)], rins, [g])
            x6, m6, p6 = _leaf(xt.double()), _leaf(mt.double()), _leaf(pos.double())
            ins6 = [x6, m6] + ([p6] if with_pos else [])
            out6 = reference.decoder_unshuffle(x6, ids_restore, m6, p6 if with_pos else None)
            want64 = _grad([out6], ins6, [g.double()])
            yield "grad x" + ptag, "exact", _exact(got[0], want[0])
            yield "grad mask_token" + ptag, "2x", _two_x(got[1], want64[1], want[1], pdt)
            if with_pos:
                yield "grad pos_embed" + ptag, "2x", _two_x(got[2], want64[2], want[2], pdt)


def _mae_loss_f64(imgs, pred, mask, p, norm_pix):
    """:func:`fastmae.reference.mae_loss` transcribed in float64 (the reference itself computes in fp32)."""
    target = reference.patchify(imgs, p).double()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred.double() - target) ** 2).mean(dim=-1)
    mask = mask.double()
    return (loss * mask).sum() / mask.sum()


def _case_mae_loss(b, dt, s, dev):
    N, L, P, K = s["N"], s["L"], s["P"], s["K"]
    imgs = torch.randn(N, s["C"], s["img"], s["img"], device=dev)  # images arrive in fp32 from the loader
    pt = torch.randn(N, L, P, device=dev, dtype=dt)
    mask = (torch.argsort(torch.argsort(torch.rand(N, L, device=dev), 1), 1) >= K).float()
    for norm_pix in (True, False):
        tag = " (norm_pix)" if norm_pix else ""
        pred = _leaf(pt)
        loss = _call(ops.mae_loss, imgs, pred, mask, s["p"], norm_pix, backend=b)
        pr = _leaf(pt)
        ref32 = reference.mae_loss(imgs, pr, mask, s["p"], norm_pix)
        if loss.dtype != torch.float32 or loss.shape != ref32.shape:
            yield "loss" + tag, "rel", (float("inf"), LOSS_RTOL, False,
                                        f"loss {loss.dtype} {tuple(loss.shape)}, reference float32 scalar")
        else:
            rel = abs(float(loss.detach()) - float(ref32.detach())) / max(abs(float(ref32.detach())), 1e-30)
            rel = float("inf") if rel != rel else rel
            yield "loss" + tag, "rel", (rel, LOSS_RTOL, rel <= LOSS_RTOL, "")
        g = torch.rand((), device=dev) + 0.5
        (gp,) = _grad([loss], [pred], [g])
        (rp,) = _grad([ref32], [pr], [g])
        p6 = _leaf(pt.double())
        (g64,) = _grad([_mae_loss_f64(imgs.double(), p6, mask, s["p"], norm_pix)], [p6], [g.double()])
        yield "grad pred" + tag, "2x", _two_x(gp, g64, rp, dt)


def _torch_attention(ins, packed: bool, go, sdpa: bool):
    """PyTorch's attention (the reference's math, or SDPA) on fresh leaves: (out, grads)."""
    leaves = [_leaf(t) for t in ins]
    if packed:
        qkv = leaves[0]
        out = (reference.sdpa_attention(*qkv.unbind(2)) if sdpa else reference.attention_qkvpacked(qkv))
    else:
        out = reference.sdpa_attention(*leaves) if sdpa else reference.attention(*leaves)
    grads = _grad([out], leaves, [go.to(out.dtype)])
    return out, grads


def _case_attention(b, dt, shape, dev, packed: bool):
    B, Nt, H, D = shape
    if packed:
        ins = [torch.randn(B, Nt, 3, H, D, device=dev, dtype=dt)]
    else:
        ins = [torch.randn(B, Nt, H, D, device=dev, dtype=dt) for _ in range(3)]
    leaves = [_leaf(t) for t in ins]
    out = _call(ops.attention_qkvpacked, *leaves, backend=b) if packed else _call(ops.attention, *leaves, backend=b)
    go = torch.randn(B, Nt, H, D, device=dev, dtype=dt)
    got = _grad([out], leaves, [go])
    lowp = [_torch_attention(ins, packed, go, sdpa) for sdpa in (False, True)]
    ref64, want64 = _torch_attention([t.double() for t in ins], packed, go.double(), sdpa=False)
    yield "out", "2x", _two_x(out, ref64, [o for o, _ in lowp], dt)
    if packed:  # one (B, N, 3, H, D) gradient: judge q, k and v apart, each on its own scale
        for i, n in enumerate("qkv"):
            yield f"grad {n}", "2x", _two_x(got[0][:, :, i], want64[0][:, :, i], [g[0][:, :, i] for _, g in lowp], dt)
    else:
        for i, n in enumerate("qkv"):
            yield f"grad {n}", "2x", _two_x(got[i], want64[i], [g[i] for _, g in lowp], dt)


def _case_norm(b, dt, s, dev, add: bool):
    """(add_)layer_norm at the encoder's visible-token rows (N (1+K), D) and the decoder's (N (1+L), Dd):
    activations (x, y) in ``dt``; the residual stream (residual, s; layer_norm's input) and the
    parameters in ``dt`` and, for low-precision ``dt``, in fp32 (the model under autocast). ``s``
    (one fp32 addition rounded once) is exact; y and every gradient (from random gradients of y
    and s) are held to the 2x rule against the float64 reference."""
    eps = 1e-6
    for label, M, D in (("encoder", s["N"] * (1 + s["K"]), s["D"]), ("decoder", s["N"] * (1 + s["L"]), s["Dd"])):
        for pdt in _param_dtypes(dt):
            tag = f" {label}" + ("" if pdt == dt else " (fp32 stream, params)")
            x = (0.7 * torch.randn(M, D, device=dev) + 0.3).to(dt if add else pdt)
            res = (2 * torch.randn(M, D, device=dev) - 0.5).to(pdt) if add else None
            w = (1 + 0.5 * torch.randn(D, device=dev)).to(pdt)
            bias = (0.3 * torch.randn(D, device=dev)).to(pdt)
            gy = torch.randn(M, D, device=dev, dtype=dt)
            gs = torch.randn(M, D, device=dev, dtype=pdt) if add else None
            ins = [x, res, w, bias] if add else [x, w, bias]

            def run(fn, ins, out_dtype, res_dtype, gy=gy, gs=gs):
                leaves = [_leaf(t) for t in ins]
                outs = fn(*leaves, out_dtype, res_dtype)
                outs = outs if isinstance(outs, tuple) else (outs,)
                grads = _grad(list(outs), leaves, [gy, gs][: len(outs)])
                return [o.detach() for o in outs], grads

            if add:
                def op(x, r, w, b_, o, rd):
                    return _call(ops.add_layer_norm, x, r, w, b_, eps, out_dtype=o, residual_dtype=rd, backend=b)

                def ref(x, r, w, b_, o, rd):
                    return reference.add_layer_norm(x, r, w, b_, eps, o, rd)
            else:
                def op(x, w, b_, o, rd):
                    return _call(ops.layer_norm, x, w, b_, eps, out_dtype=o, backend=b)

                def ref(x, w, b_, o, rd):
                    return reference.layer_norm(x, w, b_, eps, o)
            got, g_got = run(op, ins, dt, None)
            low, g_low = run(ref, ins, dt, None)
            ex, g_ex = run(ref, [t.double() for t in ins], torch.float64, torch.float64,
                           gy=gy.double(), gs=None if gs is None else gs.double())
            yield "y" + tag, "2x", _two_x(got[0], ex[0], low[0], dt)
            if add:
                yield "s" + tag, "exact", _exact(got[1], low[1])
            names = ("x", "residual", "weight", "bias") if add else ("x", "weight", "bias")
            for name, g, gl, ge, t in zip(names, g_got, g_low, g_ex, ins):
                yield f"grad {name}" + tag, "2x", _two_x(g, ge, gl, t.dtype)


def _torch_bias_gelu(x, bias, g, stock: bool):
    """(y, dx, dbias) of PyTorch's path on fresh leaves: the reference, or the stock ``F.gelu(x + bias)``
    with the bias added in x's dtype (as the stock Linear's epilogue adds it)."""
    xl, bl = _leaf(x), _leaf(bias)
    y = torch.nn.functional.gelu(xl + bl.to(xl.dtype)) if stock else reference.bias_gelu(xl, bl)
    return (y, *_grad([y], [xl, bl], [g.to(y.dtype)]))


def _case_bias_gelu(b, dt, s, dev):
    fc1 = (("enc fc1", s["N"] * (1 + s["K"]), 4 * s["D"]), ("dec fc1", s["N"] * (1 + s["L"]), 4 * s["Dd"]))
    for label, M, H in fc1:
        for pdt in _param_dtypes(dt):
            tag = f" {label}" + ("" if pdt == dt else " (fp32 bias)")
            xt = (torch.randn(M, H, device=dev) * 1.5).to(dt)
            bt = (torch.randn(H, device=dev) * 0.7).to(pdt)
            x, bias = _leaf(xt), _leaf(bt)
            out = _call(ops.bias_gelu, x, bias, backend=b)
            g = torch.randn(M, H, device=dev, dtype=dt)
            gx, gb = _grad([out], [x, bias], [g])
            ref64 = _torch_bias_gelu(xt.double(), bt.double(), g.double(), stock=False)
            lowp = [_torch_bias_gelu(xt, bt, g, stock) for stock in (False, True)]
            yield "out" + tag, "2x", _two_x(out, ref64[0], [lp[0] for lp in lowp], dt)
            yield "grad x" + tag, "2x", _two_x(gx, ref64[1], [lp[1] for lp in lowp], dt)
            yield "grad bias" + tag, "2x", _two_x(gb, ref64[2], [lp[2] for lp in lowp], pdt)


_CASES = {
    "patchify": _case_patchify,
    "unpatchify": _case_unpatchify,
    "random_masking": _case_random_masking,
    "encoder_input": _case_encoder_input,
    "decoder_unshuffle": _case_decoder_unshuffle,
    "mae_loss": _case_mae_loss,
    "attention": lambda b, dt, s, dev: _case_attention(b, dt, s, dev, packed=False),
    "attention_qkvpacked": lambda b, dt, s, dev: _case_attention(b, dt, s, dev, packed=True),
    "layer_norm": lambda b, dt, s, dev: _case_norm(b, dt, s, dev, add=False),
    "add_layer_norm": lambda b, dt, s, dev: _case_norm(b, dt, s, dev, add=True),
    "bias_gelu": _case_bias_gelu,
}


# ---------------------------------------------------------------------------- driver
def _runs_here(op: str, backend: str, device: torch.device) -> bool:
    """Whether ``backend`` can run on ``device`` and implements ``op``: then a BackendUnavailableError
    or ImportError from it (a kernel module that fails to import) is a failure, not a skip."""
    from . import ops as ops_mod
    from .backend import _problem

    implemented = backend in ("torch", "sdpa") or backend in ops_mod._IMPLS.get(op, {}) or (
        backend == "xformers" and op in _ATTENTION_OPS)
    return implemented and _problem(backend, device) is None


def validate(device, ops_=None, backends=None, dtypes=None, batch: int = 32, progress=None,
             quick: bool = False, time_budget: float | None = None, on_case=None) -> list[Check]:
    """Run the checks; returns every :class:`Check` (skips and errors included).

    ``on_case``: called with the checks so far after each (op, backend, dtype, shape) case
    (``fastmae validate`` rewrites its JSON record there).

    ``quick``: the first shape of each kind and, unless ``dtypes`` is given, the first dtype only.
    ``time_budget``: seconds after which no new (op, backend, dtype, shape) is started; those
    left are recorded as oracle ``not run`` (neither passed nor failed).

    A case that fails with an exception is a failed ``run`` check. When that failure left
    the CUDA context unusable (a kernel that faulted; see :func:`fastmae._timing.cuda_context_lost`),
    the check says so and every later case is ``not run``, naming the case that lost it:
    in that process each would fail with the same sticky error, whatever its own kernel does.
    """
    device = torch.device(device)
    t0 = time.perf_counter()
    lost = None  # (the case, the probe's error) once the CUDA context is unusable
    img_shapes, att_shapes = shapes(device, batch, quick)
    checks: list[Check] = []
    for op in ops_ or OPS:
        attention = op in _ATTENTION_OPS
        names = [b for b in (ATTENTION_BACKENDS if attention else BACKENDS) if b != "auto"]
        for b in names:
            if backends is not None and b not in backends:
                continue
            for dt in dtypes or default_dtypes(device, op)[: 1 if quick else None]:
                cases = att_shapes if attention else [(_shape_str(_derived(s)), _derived(s)) for s in img_shapes]
                for label, s in cases:
                    shape = f"{label} {s}" if attention else label
                    if progress is not None:
                        progress.start(f"{op} {b} {_name(dt)} {label}")
                    late = None
                    if lost is not None:
                        late = f"CUDA context lost after {lost[0]} ({lost[1]})"
                    elif time_budget is not None and time.perf_counter() - t0 > time_budget:
                        late = f"time budget of {time_budget:g} s spent"
                    if late is not None:
                        checks.append(Check(op, b, _name(dt), shape, "-", "not run", 0.0, 0.0, True, late))
                        if progress is not None:
                            progress.finish_task()
                        continue
                    skipped = None
                    try:
                        for quantity, oracle, (err, tol, ok, detail) in _CASES[op](b, dt, s, device):
                            checks.append(Check(op, b, _name(dt), shape, quantity, oracle, err, tol, ok, detail))
                    except _Skip as e:
                        if _runs_here(op, b, device):  # it can run here and has the op: its module is broken
                            checks.append(Check(op, b, _name(dt), shape, "run", "error", float("inf"), 0.0, False,
                                                f"unavailable although backend {b!r} runs on {device.type} "
                                                f"and implements {op}: {e}"))
                        else:
                            skipped = str(e)
                    except Exception as e:  # a crashing kernel is a failure, not the end of the run
                        msg = str(e).splitlines()[0][:300] if str(e) else ""
                        detail = f"{type(e).__name__}: {msg}"
                        gone = _timing.cuda_context_lost(device)
                        if gone is not None:
                            lost = (f"{op} {b} {_name(dt)} {shape}", gone)
                            detail += f"; then the CUDA context was lost ({gone}): later cases not run"
                        checks.append(Check(op, b, _name(dt), shape, "run", "error", float("inf"), 0.0, False,
                                            detail, cuda_context_lost_here=gone is not None))
                    if progress is not None:
                        progress.finish_task()
                    if on_case is not None:
                        on_case(checks)
                    if skipped is not None:
                        checks.append(Check(op, b, "-", "-", "-", "skip", 0.0, 0.0, True, skipped))
                        break
                else:
                    continue
                break  # skipped: the backend cannot run this op at all
    return checks


def _fmt(x: float) -> str:
    return "inf" if x == float("inf") else f"{x:.2e}"


def render(checks: list[Check]) -> tuple[str, bool]:
    """(the pass/fail table, all passed)."""
    from .bench import format_table

    groups: dict[tuple, list[Check]] = {}
    for c in checks:
        groups.setdefault((c.op, c.backend, c.dtype), []).append(c)
    rows = []
    reasons: dict[str, int] = {}
    for (op, b, dt), cs in groups.items():
        if all(c.oracle == "not run" for c in cs):
            rows.append([op, b, dt, len(cs), "not run", "", "", cs[0].detail])
            continue
        late = sum(c.oracle == "not run" for c in cs)
        cs = [c for c in cs if c.oracle != "not run"]
        if cs[0].oracle == "skip":
            reasons.setdefault(cs[0].detail, len(reasons) + 1)
            rows.append([op, b, "", "", "skip", "", "", f"cannot run here [{reasons[cs[0].detail]}]"])
            continue
        failed = [c for c in cs if not c.passed]
        oracles = sorted({c.oracle for c in cs}, key=["exact", "invariants", "2x", "rel", "error"].index)
        graded = [c for c in cs if c.oracle in ("2x", "rel")]
        worst = max(graded, key=lambda c: c.err / c.tol if c.tol > 0 else float("inf")) if graded else None
        exact_bad = [c for c in cs if c.oracle in ("exact", "invariants", "error") and not c.passed]
        err = _fmt(worst.err) if worst else ("0" if not exact_bad else "mismatch")
        tol = _fmt(worst.tol) if worst else "0"
        shapes_n = len({c.shape for c in cs})
        rows.append([op, b, dt, shapes_n, "FAIL" if failed else "pass", ", ".join(oracles), f"{err} / {tol}",
                     (f"{len(failed)} of {len(cs)} checks failed" if failed else f"{len(cs)} checks")
                     + (f"; {late} shape(s) not run" if late else "")])
    table = format_table(["op", "backend", "dtype", "shapes", "result", "oracle", "max err / tol (graded)", "notes"],
                         rows, right={3})
    lines = [table]
    if reasons:
        lines += [""] + [f"[{i}] {r}" for r, i in reasons.items()]
    bad = [c for c in checks if not c.passed]
    if bad:
        lines += ["", "failures:"]
        for c in bad:
            lines.append(f"  {c.op} [{c.backend}, {c.dtype}, {c.shape}] {c.quantity}: {c.oracle} "
                         f"err {_fmt(c.err)} tol {_fmt(c.tol)} {c.detail}".rstrip())
    return "\n".join(lines), not bad


def n_checked(checks: list[Check]) -> int:
    """The checks that compared something (skips and cases not run aside)."""
    return sum(c.oracle not in ("skip", "not run") for c in checks)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ops", default=None, help=f"comma-separated, from {', '.join(OPS)} (default: all)")
    p.add_argument("--backends", default=None,
                   help="comma-separated, from torch, triton, ext, sdpa, xformers (default: all; "
                        "those that cannot run are listed as skipped)")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated from fp32, fp16, bf16 (default: fp32,bf16 and bf16,fp16,fp32 for attention "
                        "on a GPU; fp32,fp16 on CPU)")
    p.add_argument("--batch", type=int, default=32, help="images per batch for the GPU model shapes (default 32)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, printed)")
    p.add_argument("--json", default=None, help="also write the checks as a JSON record to this file")
    p.add_argument("--out", default=None,
                   help="also write the JSON record into this folder, named validate-<card>-<date>.json")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; cases not started by then are listed as not run")
    p.add_argument("--quick", action="store_true", help="one shape of each kind and (without --dtypes) one dtype")
    p.add_argument("--verbose", action="store_true", help="print every check")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace, command: str | None = None) -> int:
    """Run ``fastmae validate`` with parsed ``args``; returns the exit status."""
    device = _timing.cli_device(args.device, "fastmae validate")
    if device is None:
        return 2
    sel_ops = [o.strip() for o in args.ops.split(",")] if args.ops else list(OPS)
    unknown = [o for o in sel_ops if o not in OPS]
    sel_b = [b.strip() for b in args.backends.split(",")] if args.backends else None
    for b in sel_b or []:
        if b in RENAMED:
            print(f"fastmae validate: backend {b!r} is now called {RENAMED[b]!r}", file=sys.stderr)
            return 2
    unknown += [b for b in sel_b or [] if b not in ATTENTION_BACKENDS or b == "auto"]
    try:
        sel_dt = [_DTYPES[d.strip()] for d in args.dtypes.split(",")] if args.dtypes else None
    except KeyError as e:
        unknown.append(str(e))
    if unknown:
        print(f"fastmae validate: unknown op/backend/dtype {unknown}", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    env = _timing.environment(device, command)
    print(f"fastmae validate on {env['card']} | torch {env['torch']} | triton {env['triton']} | seed {seed}"
          + (" | TRITON_INTERPRET=1" if env["triton_interpret"] else ""))
    if device.type == "cpu" and not env["triton_interpret"]:
        print("note: on CPU the triton backend runs only under TRITON_INTERPRET=1 (set before triton is imported)")
    n_tasks = 0
    img_shapes, att_shapes = shapes(device, args.batch, args.quick)
    for op in sel_ops:
        names = [b for b in (ATTENTION_BACKENDS if op in _ATTENTION_OPS else BACKENDS) if b != "auto"]
        names = [b for b in names if sel_b is None or b in sel_b]
        n_tasks += len(names) * len(sel_dt or default_dtypes(device, op)[: 1 if args.quick else None]) * (
            len(att_shapes) if op in _ATTENTION_OPS else len(img_shapes))
    paths = [args.json] if args.json else []
    if args.out:
        paths.append(os.path.join(args.out, f"validate-{_timing.slug(env['card'])}-{env['timestamp']}.json"))

    def save(checks: list[Check], complete: bool) -> None:
        # rewritten after every case: a run killed at its time limit keeps what it checked
        lost_at = next((c for c in checks if c.cuda_context_lost_here), None)
        record = {"kind": "validate", "schema": 1, "env": env, "seed": seed,
                  "passed": all(c.passed for c in checks) and n_checked(checks) > 0, "complete": complete,
                  "cuda_context_lost": None if lost_at is None else (
                      f"{lost_at.op} {lost_at.backend} {lost_at.dtype} {lost_at.shape}: {lost_at.detail}"),
                  "config": {"ops": sel_ops, "backends": sel_b, "dtypes": args.dtypes, "batch": args.batch,
                             "quick": args.quick},
                  "checks": [asdict(c) for c in checks]}  # infinite errors as strings: write_json's strict JSON
        for path in paths:
            _timing.write_json(path, record)

    progress = _timing.ProgressBar(n_tasks, enabled=not args.quiet)
    t0 = time.perf_counter()
    checks = validate(device, sel_ops, sel_b, sel_dt, batch=args.batch, progress=progress, quick=args.quick,
                      time_budget=args.time_budget, on_case=lambda c: save(c, complete=False))
    progress.close()
    table, ok = render(checks)
    print(table)
    if args.verbose:
        print()
        from .bench import format_table

        print(format_table(["op", "backend", "dtype", "shape", "quantity", "oracle", "err", "tol", "result"],
                           [[c.op, c.backend, c.dtype, c.shape, c.quantity, c.oracle, _fmt(c.err), _fmt(c.tol),
                             "pass" if c.passed else "FAIL"] for c in checks]))
    n_fail = sum(not c.passed for c in checks)
    n_run = n_checked(checks)
    late = [c for c in checks if c.oracle == "not run"]
    print(f"\n{n_run} checks, {n_fail} failed, {sum(c.oracle == 'skip' for c in checks)} op/backend pairs skipped "
          f"({time.perf_counter() - t0:.1f} s)")
    for why in dict.fromkeys(c.detail for c in late):
        print(f"warning: {sum(c.detail == why for c in late)} op/backend/dtype/shape cases not run: {why}")
    save(checks, complete=True)
    for path in paths:
        print(f"wrote {path}")
    if ok and not n_run:
        print("fastmae validate: nothing was checked (every case skipped or not run): not a pass", file=sys.stderr)
        return 1
    return 0 if ok else 1
