"""How often PyTorch fails the model-level oracle of tests/test_patching.py against itself.

For seeds 0..N-1 (CPU; the patched model's kernels on Triton's interpreter) this runs the tiny
HF ViTMAE and official MAE models of the tests in float64 (the exact answer) and in fp32 as:
stock on its two attention paths (sdpa, eager), stock with the batch's two images in the other
order (sdpa_sw; the exact answer does not depend on the order, the fp32 rounding of every batch
sum does), and patched with ``backend="triton"``. Each fp32 run is then held to the oracle
``err <= 2 * max(err of the bases) + floor`` per tensor (loss, prediction, each gradient),
with errors measured as the largest element error (``max``) or the Euclidean norm (``norm``),
and the script prints, per pairing, how many seeds failed, the median and the worst seed's
ratio ``err / bound``.

    python scripts/oracle_spread.py [--seeds 150] [--models hf,official]
"""

import argparse
import copy
import math
import os
import statistics
import sys
from unittest import mock

os.environ.setdefault("TRITON_INTERPRET", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import official_mae  # noqa: E402
import test_patching as T  # noqa: E402
import torch  # noqa: E402

from fastmae.patching import apply_fastmae  # noqa: E402

PAIRINGS = (("eager", ("sdpa",)), ("sdpa_sw", ("sdpa", "eager")), ("patched", ("sdpa", "eager")))


def _run(which, model, imgs, noise):
    if which == "hf":
        return T._hf_run(model, imgs, noise)
    # the official forward draws its noise with torch.rand: hand it this one
    with mock.patch.object(torch, "rand", lambda *a, **k: noise.to(imgs.dtype)):
        return T._official_run(model, imgs, 0)


def _errors(which, seed):
    """{tensor name: {run: (max error, error norm)}, plus its 'floor' and 'n'} for one seed."""
    torch.manual_seed(seed)
    stock = T._hf_tiny(num_hidden_layers=1) if which == "hf" else official_mae.tiny(depth=1)
    imgs, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    swap = torch.tensor([1, 0])
    runs = {
        "sdpa": _run(which, stock, imgs, noise),
        "eager": _run(which, T._eager_attention(stock), imgs, noise),
        "patched": _run(which, apply_fastmae(copy.deepcopy(stock), backend="triton"), imgs, noise),
    }
    sw = _run(which, stock, imgs[swap], noise[swap])
    runs["sdpa_sw"] = (sw[0], sw[1][swap], sw[2][swap], sw[3])
    exact = _run(which, copy.deepcopy(stock).double(), imgs.double(), noise.double())
    scale = T._module_scales(exact[3])
    pairs = [("loss", 0, 0.0), ("pred", 1, 0.0)] + [(n, n, scale[n]) for n in exact[3]]
    out = {}
    for name, key, sc in pairs:
        pick = (lambda r, i=key: r[i]) if isinstance(key, int) else (lambda r, n=key: r[3][n])
        e = pick(exact).double()
        rec = {"floor": T._floor(e, sc), "n": e.numel()}
        for run, r in runs.items():
            d = pick(r).double() - e
            rec[run] = (d.abs().max().item(), d.norm().item())
        out[name] = rec
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=150)
    ap.add_argument("--models", default="hf,official")
    args = ap.parse_args()
    for which in args.models.split(","):
        if which not in ("hf", "official"):
            raise SystemExit(f"--models: unknown model {which!r} (hf, official)")
        recs = [_errors(which, s) for s in range(args.seeds)]
        print(f"{which}: {args.seeds} seeds")
        for m, metric in enumerate(("max", "norm")):
            for got, bases in PAIRINGS:
                worst = []
                for rec in recs:
                    w = 0.0
                    for r in rec.values():
                        floor = r["floor"] * (1.0 if m == 0 else math.sqrt(r["n"]))
                        w = max(w, r[got][m] / (2 * max(r[b][m] for b in bases) + floor))
                    worst.append(w)
                fails = sum(w > 1 for w in worst)
                print(f"  {metric:4s} {got:8s} vs {'+'.join(bases):10s} failed {fails:3d}  "
                      f"median {statistics.median(worst):.2f}  worst {max(worst):.2f}")


if __name__ == "__main__":
    main()
