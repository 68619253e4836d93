"""The extension's C++ CPU kernels ("twins", backend="ext") against the reference ops, on CPU.

ViT-B shapes at batch 8 (224x224 RGB, p = 16: L = 196, P = 768; encoder D = 768, decoder
D = 512, mask ratio 0.75, norm-pix loss), fp32, and the row-wise ops (LayerNorm, bias + GELU,
attention) also with bf16 / fp16 activations (the rows so named). Both sides run in one
process, interleaved call by call (ext, reference, ext, ...) so that load from other processes
hits both alike; the median of each. Before timing, every pair is checked to agree (exactly
for data movement, 1e-6 relative for the loss), so a fast wrong kernel cannot be reported.

The allocator. Both sides return fresh tensors, and glibc's malloc hands back to the kernel
the free memory at the top of its heap once it exceeds a threshold that itself moves with the
process's history (``M_TRIM_THRESHOLD``, doubled each time a large block is freed). An op that
frees two 1.2 MB outputs can then page-fault on every page of its next outputs: measured here,
the ext add_layer_norm took 0.1 ms or 0.9 ms per call (about 400 minor faults a call)
depending only on which ops the process had run before. That is the operating system's cost,
not either kernel's, and it lands on one side or the other by chance. So, by default
(``--malloc pinned``), the benchmark fixes glibc's thresholds before it allocates anything
(``mallopt``: mmap above 32 MiB, never trim); ``--malloc default`` leaves them alone. Either
way every row records the minor page faults per call of each side, and the record names the
mode.

Targets (issue 12): data movement and encoder_input >= 3x the reference, the loss >= 2x.
``fastmae.ops.EXT_CPU_AUTO`` (the ops ``backend="auto"`` sends to the C++ kernel on CPU)
lists the ops measured faster than the reference here.

    .venv/bin/python -m benchmarks.bench_cpu_twins [--iters 30] [--out benchmarks/results/cpu_twins.json]

(or ``python benchmarks/bench_cpu_twins.py``: either way it measures the fastmae of the checkout it
sits in, not whichever one an editable install points at.)
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime
import os
import resource
import statistics
import sys
import time

if __package__ in (None, ""):  # run as a script: sys.path[0] is benchmarks/, not the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from fastmae import ops  # noqa: E402
from fastmae import reference as ref  # noqa: E402
from fastmae._timing import _cpu_model, write_json  # noqa: E402

TARGETS = {"patchify": 3.0, "unpatchify": 3.0, "random_masking": 3.0, "encoder_input": 3.0,
           "decoder_unshuffle": 3.0, "mae_loss": 2.0, "mae_loss fwd+bwd": 2.0}
# LayerNorm >= 2x (issue 12); bias + GELU and attention have no CPU target (> 1x: worth taking on auto)
TARGETS.update({"add_layer_norm": 2.0, "add_layer_norm fwd+bwd": 2.0, "add_layer_norm dec fwd+bwd": 2.0,
                "bias_gelu": 1.0, "bias_gelu fwd+bwd": 1.0, "attention": 1.0, "attention fwd+bwd": 1.0,
                "attention dec fwd+bwd": 1.0})
for _tag in ("bf16", "fp16"):  # the same targets in the low-precision dtypes (low_precision_cases)
    TARGETS.update({f"{name} {_tag}": TARGETS[name] for name in (
        "add_layer_norm", "add_layer_norm fwd+bwd", "bias_gelu", "bias_gelu fwd+bwd", "attention fwd+bwd",
        "attention dec fwd+bwd")})


def cases(batch: int = 8):
    """name -> (ext call, reference call, equal(a, b))."""
    g = torch.Generator().manual_seed(0)
    N, C, H, p, D, Dd = batch, 3, 224, 16, 768, 512
    L = (H // p) ** 2
    imgs = torch.randn(N, C, H, H, generator=g)
    tokens = torch.randn(N, L, D, generator=g)
    patches = torch.randn(N, L, p * p * C, generator=g)
    pos = torch.randn(1, 1 + L, D, generator=g)
    cls = torch.randn(1, 1, D, generator=g)
    noise = torch.rand(N, L, generator=g)
    len_keep = ref.num_kept(L, 0.75)
    _, mask, ids_restore = ref.random_masking(tokens, 0.75, noise)
    dec = torch.randn(N, 1 + len_keep, Dd, generator=g)
    mask_token = torch.randn(1, 1, Dd, generator=g)
    dpos = torch.randn(1, 1 + L, Dd, generator=g)
    pred = torch.randn(N, L, p * p * C, generator=g)
    pred_g = pred.clone().requires_grad_()

    def eq(a, b):
        if isinstance(a, tuple):
            return all(eq(x, y) for x, y in zip(a, b))
        return torch.equal(a, b)

    def close(a, b):
        return bool(((a - b).abs() <= 1e-6 * b.abs()).all())

    def loss_fb(backend):
        def run():
            loss = ops.mae_loss(imgs, pred_g, mask, p, True, backend=backend)
            return torch.autograd.grad(loss, pred_g)[0]
        return run

    def grads_close(a, b):
        return bool(((a - b).abs() <= 1e-5 * b.abs().max()).all())

    # LayerNorm, bias + GELU, attention (fp32 math both sides, different summation orders):
    # agreement within 1e-4 of the reference's magnitude
    def near(a, b):
        if isinstance(a, (tuple, list)):
            return all(near(x, y) for x, y in zip(a, b))
        return bool((a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-6)

    def grads(fn, *inputs):
        def run():
            leaves = [t.detach().requires_grad_(True) for t in inputs]
            out = fn(*leaves)
            out = out if isinstance(out, tuple) else (out,)
            return torch.autograd.grad(out, leaves, [torch.ones_like(o) for o in out])
        return run

    enc = N * (1 + len_keep)  # encoder tokens (cls + kept) of the batch
    x_enc, r_enc = torch.randn(enc, D, generator=g), torch.randn(enc, D, generator=g)
    x_dec, r_dec = torch.randn(N * (1 + L), Dd, generator=g), torch.randn(N * (1 + L), Dd, generator=g)
    w, b, wd, bd = (torch.randn(n, generator=g) for n in (D, D, Dd, Dd))
    h_enc, fc_b = torch.randn(enc, 4 * D, generator=g), torch.randn(4 * D, generator=g)
    qkv_enc = torch.randn(N, 1 + len_keep, 3, 12, 64, generator=g)
    qkv_dec = torch.randn(N, 1 + L, 3, 16, 32, generator=g)
    return {
        "patchify": (lambda: ops.patchify(imgs, p, backend="ext"), lambda: ref.patchify(imgs, p), eq),
        "unpatchify": (lambda: ops.unpatchify(patches, p, backend="ext"), lambda: ref.unpatchify(patches, p), eq),
        "random_masking": (lambda: ops.random_masking(tokens, 0.75, noise, backend="ext"),
                           lambda: ref.random_masking(tokens, 0.75, noise), eq),
        "encoder_input": (lambda: ops.encoder_input(tokens, pos, cls, 0.75, noise, backend="ext"),
                          lambda: ref.encoder_input(tokens, pos, cls, 0.75, noise), eq),
        "decoder_unshuffle": (lambda: ops.decoder_unshuffle(dec, ids_restore, mask_token, dpos, backend="ext"),
                              lambda: ref.decoder_unshuffle(dec, ids_restore, mask_token, dpos), eq),
        "mae_loss": (lambda: ops.mae_loss(imgs, pred, mask, p, True, backend="ext"),
                     lambda: ref.mae_loss(imgs, pred, mask, p, True), close),
        "mae_loss fwd+bwd": (loss_fb("ext"), loss_fb("torch"), grads_close),
        "add_layer_norm": (lambda: ops.add_layer_norm(x_enc, r_enc, w, b, 1e-6, backend="ext"),
                           lambda: ref.add_layer_norm(x_enc, r_enc, w, b, 1e-6), near),
        "add_layer_norm fwd+bwd": (grads(lambda *t: ops.add_layer_norm(*t, 1e-6, backend="ext"), x_enc, r_enc, w, b),
                                   grads(lambda *t: ref.add_layer_norm(*t, 1e-6), x_enc, r_enc, w, b), near),
        "add_layer_norm dec fwd+bwd": (
            grads(lambda *t: ops.add_layer_norm(*t, 1e-6, backend="ext"), x_dec, r_dec, wd, bd),
            grads(lambda *t: ref.add_layer_norm(*t, 1e-6), x_dec, r_dec, wd, bd), near),
        "bias_gelu": (lambda: ops.bias_gelu(h_enc, fc_b, backend="ext"), lambda: ref.bias_gelu(h_enc, fc_b), near),
        "bias_gelu fwd+bwd": (grads(lambda *t: ops.bias_gelu(*t, backend="ext"), h_enc, fc_b),
                              grads(ref.bias_gelu, h_enc, fc_b), near),
        "attention": (lambda: ops.attention_qkvpacked(qkv_enc, backend="ext"),
                      lambda: ref.attention_qkvpacked(qkv_enc), near),
        "attention fwd+bwd": (grads(lambda t: ops.attention_qkvpacked(t, backend="ext"), qkv_enc),
                              grads(ref.attention_qkvpacked, qkv_enc), near),
        "attention dec fwd+bwd": (grads(lambda t: ops.attention_qkvpacked(t, backend="ext"), qkv_dec),
                                  grads(ref.attention_qkvpacked, qkv_dec), near),
        **{f"{name} {tag}": case for tag, dt in LOW_DTYPES.items()
           for name, case in low_precision_cases(dt, grads, x_enc, r_enc, w, b, h_enc, fc_b, qkv_enc, qkv_dec).items()},
    }


# The row-wise ops in the activations' low-precision dtypes, as autocast runs the fused block
# (activations in bf16 / fp16, LayerNorm's and fc1's parameters in fp32): "auto" sends every
# dtype of an op to the same backend, so an op joins EXT_CPU_AUTO only when it is faster in each.
LOW_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_LOW_TOL = {torch.bfloat16: 2 * 2.0**-8, torch.float16: 2 * 2.0**-11}  # two ulps at 1.0


def low_precision_cases(dt, grads, x_enc, r_enc, w, b, h_enc, fc_b, qkv_enc, qkv_dec):
    """name -> (ext call, reference call, agree) for LayerNorm, bias + GELU and attention in ``dt``."""
    x, r, h, qe, qd = (t.to(dt) for t in (x_enc, r_enc, h_enc, qkv_enc, qkv_dec))

    def near(a, c):  # both round fp32 math to dt: within two of its ulps at the reference's magnitude
        if isinstance(a, (tuple, list)):
            return all(near(u, v) for u, v in zip(a, c))
        return bool((a.float() - c.float()).abs().max() <= _LOW_TOL[dt] * c.float().abs().max() + 1e-6)

    return {
        "add_layer_norm": (lambda: ops.add_layer_norm(x, r, w, b, 1e-6, backend="ext"),
                           lambda: ref.add_layer_norm(x, r, w, b, 1e-6), near),
        "add_layer_norm fwd+bwd": (grads(lambda *t: ops.add_layer_norm(*t, 1e-6, backend="ext"), x, r, w, b),
                                   grads(lambda *t: ref.add_layer_norm(*t, 1e-6), x, r, w, b), near),
        "bias_gelu": (lambda: ops.bias_gelu(h, fc_b, backend="ext"), lambda: ref.bias_gelu(h, fc_b), near),
        "bias_gelu fwd+bwd": (grads(lambda *t: ops.bias_gelu(*t, backend="ext"), h, fc_b),
                              grads(ref.bias_gelu, h, fc_b), near),
        "attention fwd+bwd": (grads(lambda t: ops.attention_qkvpacked(t, backend="ext"), qe),
                              grads(ref.attention_qkvpacked, qe), near),
        "attention dec fwd+bwd": (grads(lambda t: ops.attention_qkvpacked(t, backend="ext"), qd),
                                  grads(ref.attention_qkvpacked, qd), near),
    }


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc malloc.h


def pin_malloc() -> str:
    """Fix glibc's trim and mmap thresholds (see the module docstring); returns the mode the
    record names: ``"pinned"``, or why it could not be (not glibc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "default (no glibc mallopt)"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    return "pinned: mallopt M_MMAP_THRESHOLD=32 MiB, M_TRIM_THRESHOLD=2 GiB" if ok else "default (mallopt refused)"


def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(ext_fn, ref_fn, iters: int, warmup: int = 3):
    """Median seconds per call of each side, interleaved call by call, and each side's minor
    page faults per call."""
    for _ in range(warmup):
        ext_fn()
        ref_fn()
    t_ext, t_ref, faults = [], [], [0, 0]
    for _ in range(iters):
        for k, (fn, out) in enumerate(((ext_fn, t_ext), (ref_fn, t_ref))):
            f0 = _minflt()
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
            faults[k] += _minflt() - f0
    return statistics.median(t_ext), statistics.median(t_ref), faults[0] / iters, faults[1] / iters


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ops", default=None, help="comma-separated subset of " + ", ".join(TARGETS))
    ap.add_argument("--out", default=None, help="results JSON (written atomically)")
    ap.add_argument("--malloc", choices=("pinned", "default"), default="pinned",
                    help="fix glibc's trim / mmap thresholds first (pinned, the default) or leave them")
    args = ap.parse_args(argv)
    malloc = pin_malloc() if args.malloc == "pinned" else "default"
    from fastmae import ext

    if ext.problem() is not None:
        print(f"bench_cpu_twins: {ext.problem()}", file=sys.stderr)
        return 2
    rows = []
    selected = None if args.ops is None else set(args.ops.split(","))
    print(f"malloc: {malloc}")
    print(f"{'op':<26} {'ext ms':>9} {'torch ms':>9} {'speedup':>8} {'target':>7} {'faults/call ext, torch':>23}")
    for name, (ext_fn, ref_fn, agree) in cases(args.batch).items():
        if selected is not None and name not in selected:
            continue
        if not agree(ext_fn(), ref_fn()):
            print(f"bench_cpu_twins: {name}: the C++ kernel disagrees with the reference", file=sys.stderr)
            return 1
        te, tr, fe, fr = measure(ext_fn, ref_fn, args.iters)
        dtype = str(LOW_DTYPES.get(name.rsplit(" ", 1)[-1], torch.float32)).removeprefix("torch.")
        row = dict(op=name, dtype=dtype, ext_ms=te * 1e3, torch_ms=tr * 1e3, speedup=tr / te, target=TARGETS[name],
                   ext_faults_per_call=fe, torch_faults_per_call=fr)
        rows.append(row)
        flag = "" if row["speedup"] >= row["target"] else "  (below target)"
        print(f"{name:<26} {te * 1e3:9.3f} {tr * 1e3:9.3f} {tr / te:7.2f}x {TARGETS[name]:6.1f}x "
              f"{fe:11.1f} {fr:11.1f}{flag}")
    record = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join([os.path.basename(sys.executable), *sys.argv]),
        cpu=_cpu_model(), threads=torch.get_num_threads(), torch=torch.__version__,
        batch=args.batch, iters=args.iters, load_avg=os.getloadavg(), malloc=malloc, results=rows,
    )
    if args.out:
        write_json(args.out, record)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
