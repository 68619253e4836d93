"""How often fp32 attention fails the FlashAttention oracle of tests/test_ext_attention.py at
logits spread over hundreds (its softmax-underflow case), for PyTorch itself and the C++ twin.

For seeds 0..N-1 (CPU) this draws the test's inputs, q, k, v (2, 40, 2 heads, 32) and dO, scale
1, and runs attention forward and backward in float64 (the exact answer), with PyTorch in fp32
(the base of the oracle), with PyTorch in fp32 on q and k with their head dim permuted (the
same exact logits, another rounding order), and with the extension's CPU twin in each of its
builds (``avx2``, ``baseline``: the cpu_isa cap of tests/conftest.py). Each is held to the
oracle ``max|got - exact| <= 2 max|torch fp32 - exact| + floor`` for out, dq, dk, dv; the
script prints, per run, how many seeds failed, the median and the worst seed's ratio
``err / bound``. ``--logits normal``: q, k ~ 6 N(0, 1), whose fp32 logits round; ``int``:
q, k small integers, whose logits are exact in fp32 in any summation order.

    python scripts/attention_oracle_spread.py [--seeds 200] [--logits normal,int]
"""

import argparse
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import torch  # noqa: E402

from fastmae import ext, ops  # noqa: E402
from fastmae import reference as ref  # noqa: E402

if ext.problem() is None:
    import test_ext_attention as T  # noqa: E402  (the test's own helpers: _packed_grads, _floor)


def inputs(kind: str):
    qkv = torch.randn(2, 40, 3, 2, 32)
    if kind == "int":
        qkv[:, :, :2] = torch.randint(-6, 7, qkv[:, :, :2].shape).float()
    else:
        qkv = qkv * 6
    return qkv, torch.randn(2, 40, 2, 32)


def run(fn, qkv, dout):
    """(out, dq, dk, dv) of fn(qkv)."""
    out, g = T._packed_grads(fn, qkv, dout)
    return [out, *g.unbind(2)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=200)
    ap.add_argument("--logits", default="normal,int")
    args = ap.parse_args(argv)
    if ext.problem() is not None:
        print(f"attention_oracle_spread: {ext.problem()}", file=sys.stderr)
        return 2
    ext.load()
    cap = torch.ops.fastmae_ext._cpu_isa_cap
    builds = [(name, level) for name, level in (("avx2", 1), ("baseline", 0)) if level <= cap(2)]
    for kind in args.logits.split(","):
        ratios = {name: [] for name in ("torch, head dim permuted", *(f"ext {b}" for b, _ in builds))}
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            qkv, dout = inputs(kind)
            perm = torch.randperm(32)
            exact = run(lambda t: ref.attention_qkvpacked(t, 1.0), qkv.double(), dout.double())
            base = run(lambda t: ref.attention_qkvpacked(t, 1.0), qkv, dout)

            def permuted(t, perm=perm):
                q, k, v = t.unbind(2)
                return ref.attention(q[..., perm], k[..., perm], v, 1.0)

            got = {"torch, head dim permuted": run(permuted, qkv, dout)}
            for name, level in builds:
                cap(level)
                try:
                    got[f"ext {name}"] = run(lambda t: ops.attention_qkvpacked(t, scale=1.0, backend="ext"), qkv, dout)
                finally:
                    cap(2)
            bounds = [2 * (b.double() - e).abs().max().item() + T._floor(e, torch.float32) for b, e in zip(base, exact)]
            for name, parts in got.items():
                ratios[name].append(max((g.double() - e).abs().max().item() / bound
                                        for g, e, bound in zip(parts, exact, bounds)))
        print(f"logits {kind}, {args.seeds} seeds:")
        for name, r in ratios.items():
            fails = sum(x > 1 for x in r)
            print(f"  {name:26} fails {fails:4d}   median {statistics.median(r):.2f}   worst {max(r):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
