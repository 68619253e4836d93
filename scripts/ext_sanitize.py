"""A workload for compute-sanitizer: each CUDA kernel of the extension (backend "ext"), forward
and backward, at small shapes that reach its code paths.

    compute-sanitizer --tool memcheck --error-exitcode 1 python scripts/ext_sanitize.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python scripts/ext_sanitize.py

The tests compare results; this runs the kernels under a checker that sees what results do
not show: a read past a row's end that lands in the caching allocator's slack, a shared-memory
race that happens to resolve the same way, a misaligned vector access. Each op runs on its
vector and scalar paths (16-byte aligned and offset-by-one inputs, widths that are and are not
whole vectors), ragged tails (rows, tokens, keys not a multiple of a block), every attention
head dim and the fp16 / bf16 (mma.sync) and fp32 (SIMT) paths. Run it with
``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` (gpu_check.sh does) so that every tensor is its own
allocation and memcheck sees the end of each.

``--device cpu`` runs the same calls through the C++ twins: a test of this script on machines
without a GPU, nothing more. ``--device emu`` runs them through the CUDA kernels on the CPU
emulation of tests/_cuda_emu (csrc/README.md), and with it the checks a GPU is not needed for:

    scripts/emu_memcheck.sh    # the emulated kernels built with AddressSanitizer: memcheck on the CPU

(``--order descending`` / ``shuffled``: the emulation's thread order, for races). Prints one
line per case; exit 0 when every call returned.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fastmae import ops  # noqa: E402

f16, f32, bf16 = torch.float16, torch.float32, torch.bfloat16
EXT = {"backend": "ext"}
_NAME = {f16: "fp16", f32: "fp32", bf16: "bf16"}


def _offset(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in a tensor whose data starts one element past an allocation's start."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = flat[1:].view(t.shape)
    out.copy_(t)
    return out


def _backward(out, *leaves):
    outs = out if isinstance(out, tuple) else (out,)
    outs = [o for o in outs if o.requires_grad]
    torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])
    return [t.grad for t in leaves]


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def cases(dev):
    def randn(*shape, dtype=f32):
        return torch.randn(*shape, device=dev).to(dtype)

    # patchify / unpatchify: p = 16 (16-byte runs), p = 14 (scalar), an offset base (scalar)
    for dtype in (f32, bf16):
        for p, (H, W) in ((16, (32, 48)), (14, (28, 42))):
            imgs = randn(2, 3, H, W, dtype=dtype)
            for name, x in (("aligned", imgs), ("offset", _offset(imgs))):
                def patch(x=x, p=p, grid=(H // p, W // p)):
                    return ops.unpatchify(ops.patchify(x, p, **EXT), p, grid, **EXT)
                yield f"patchify {_NAME[dtype]} p={p} {name}", patch

    # random masking, encoder input: 49 and 197 tokens (not a power of two), widths 40 / 768 / 36
    for dtype, (N, L, D) in ((f32, (3, 49, 40)), (bf16, (2, 197, 768)), (f16, (2, 50, 36))):
        def enc(N=N, L=L, D=D, dtype=dtype):
            x = _leaf(randn(N, L, D, dtype=dtype))
            pos, cls = randn(1, 1 + L, D, dtype=dtype), randn(1, 1, D, dtype=dtype)
            noise = torch.rand(N, L, device=dev)
            ops.random_masking(x, 0.75, noise, **EXT)
            out, mask, ids = ops.encoder_input(x, pos, cls, 0.75, noise, **EXT)
            _backward(out, x)
            return ids
        yield f"encoder_input {_NAME[dtype]} {(N, L, D)}", enc

    # decoder unshuffle + backward: the forward's ids, D = 40 (16-byte) and 36 (scalar for fp32)
    for dtype, (N, L, D) in ((f32, (3, 49, 40)), (bf16, (2, 197, 512)), (f32, (2, 16, 36))):
        def dec(N=N, L=L, D=D, dtype=dtype):
            keep = max(1, int(L * 0.25))
            ids = torch.rand(N, L, device=dev).argsort(dim=1).argsort(dim=1)
            x, mt = _leaf(randn(N, 1 + keep, D, dtype=dtype)), _leaf(randn(1, 1, D, dtype=dtype))
            out = ops.decoder_unshuffle(x, ids, mt, randn(1, 1 + L, D, dtype=dtype), **EXT)
            return _backward(out, x, mt)
        yield f"decoder_unshuffle {_NAME[dtype]} {(N, L, D)}", dec

    # loss + backward: p = 16 (vector gather), 14 (scalar), an offset pred (scalar rows), both norms
    for dtype, p, (H, W) in ((f32, 16, (32, 48)), (bf16, 16, (32, 48)), (f32, 14, (28, 42))):
        for norm in (False, True):
            def loss(dtype=dtype, p=p, H=H, W=W, norm=norm):
                L = (H // p) * (W // p)
                imgs = randn(2, 3, H, W, dtype=dtype)
                mask = (torch.rand(2, L, device=dev).argsort(dim=1) >= max(1, L // 4)).float()
                for pred in (_leaf(randn(2, L, p * p * 3, dtype=dtype)), _leaf(_offset(randn(2, L, p * p * 3)))):
                    _backward(ops.mae_loss(imgs, pred, mask, p, norm, **EXT), pred)
            yield f"mae_loss {_NAME[dtype]} p={p} norm={norm}", loss

    # add + LayerNorm + backward: 37 rows; D = 40, 768 (16-byte, in registers), 1280 (re-read), 100 (scalar)
    for dtype in (f32, bf16):
        for D in (40, 100, 768, 1280):
            def ln(D=D, dtype=dtype):
                x, r = _leaf(randn(37, D, dtype=dtype)), _leaf(randn(37, D))
                w, b = _leaf(1 + 0.1 * randn(D)), _leaf(0.1 * randn(D))
                return _backward(ops.add_layer_norm(x, r, w, b, 1e-6, **EXT), x, r, w, b)
            yield f"add_layer_norm {_NAME[dtype]} D={D}", ln

    # bias + GELU + backward: 37 rows, H = 100 (scalar), 3072 (16-byte)
    for dtype in (f32, bf16):
        for Hd in (100, 3072):
            def gelu(Hd=Hd, dtype=dtype):
                x, b = _leaf(randn(37, Hd, dtype=dtype)), _leaf(randn(Hd, dtype=dtype))
                return _backward(ops.bias_gelu(x, b, **EXT), x, b)
            yield f"bias_gelu {_NAME[dtype]} H={Hd}", gelu

    # attention + backward: every head dim, N around the 16-key blocks and pairs-per-block steps
    for dtype, (B, N, H, D) in ((f16, (3, 17, 5, 80)), (f16, (3, 5, 5, 128)), (bf16, (2, 50, 3, 64)),
                                (bf16, (2, 197, 2, 32)), (f16, (1, 256, 2, 128)), (f32, (2, 33, 3, 32)),
                                (f32, (2, 17, 2, 80))):
        def att(B=B, N=N, H=H, D=D, dtype=dtype):
            qkv = _leaf(randn(B, N, 3, H, D, dtype=dtype))
            return _backward(ops.attention_qkvpacked(qkv, **EXT), qkv)
        yield f"attention {_NAME[dtype]} {(B, N, H, D)}", att


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="scripts/ext_sanitize.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu", "emu"),
                   help="cuda (default); cpu: the C++ twins (a test of this script); emu: the CUDA kernels "
                        "on the CPU emulation of tests/_cuda_emu")
    p.add_argument("--order", default="ascending", choices=("ascending", "descending", "shuffled"),
                   help="--device emu: the order the emulation resumes threads and runs blocks in")
    p.add_argument("--only", default=None, help="run only the cases whose name contains this text")
    args = p.parse_args(argv)
    dev = torch.device("cpu" if args.device == "emu" else args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("ext_sanitize: no CUDA device (use --device cpu to test the script)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    with contextlib.ExitStack() as stack:
        if args.device == "emu":
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
            import _cuda_emu

            stack.enter_context(_cuda_emu.emulated())
            _cuda_emu.set_order(args.order, seed=0)
        n = _run(dev, args.only, _cuda_emu.launches if args.device == "emu" else None)
    print(f"ext_sanitize: {n} cases on {args.device}")
    return 0 if n else 1


def _run(dev, only, launches=None) -> int:
    n = 0
    for name, fn in cases(dev):
        if only and only not in name:
            continue
        t0 = time.perf_counter()
        before = launches() if launches else 0
        fn()
        if launches and launches() == before:
            raise RuntimeError(f"ext_sanitize: {name} launched no emulated kernel")
        if dev.type == "cuda":
            torch.cuda.synchronize()
        print(f"ok  {name}  ({time.perf_counter() - t0:.2f} s)", flush=True)
        n += 1
    return n


if __name__ == "__main__":
    raise SystemExit(main())
