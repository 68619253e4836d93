"""The short summary ``scripts/gpu_check.sh`` prints last, from the JSON records it collected.

    python -m benchmarks.gpu_summary RECORDS_DIR

One block per record: ``fastmae validate`` (checks run, failures, cases not run),
``benchmarks/bench_ops.py`` (the ceilings, the ViT-B/16 data-path ops forward+backward as
multiples of their memory floor, and attention forward+backward against the fastest SDPA
kernel at each shape) and ``fastmae bench`` (img/s per configuration, the encoder-only
speedups and fastmae against stock). Rows that did not measure say why. The full tables
are in the step logs and in ``benchmarks/RESULTS.md`` once the records are committed.
"""

from __future__ import annotations

import glob
import json
import os
import sys


def _validate(r: dict) -> list[str]:
    checks = r.get("checks", [])
    ran = [c for c in checks if c.get("oracle") not in ("skip", "not run")]
    bad = [c for c in ran if not c.get("passed")]
    out = [f"validate: {len(ran)} checks, {len(bad)} failed"]
    out += [f"  FAIL {c['op']} {c['backend']} {c['dtype']} {c['shape']} {c['quantity']} {c['detail']}"
            for c in bad[:10]]
    late = [c.get("detail", "") for c in checks if c.get("oracle") == "not run"]
    for why in dict.fromkeys(late):  # the time budget, or the CUDA context lost after a case
        out.append(f"  {late.count(why)} cases not run: {why}")
    if not r.get("complete", True):
        out.append("  record incomplete: validate was stopped before it finished")
    return out


def _ms(x: dict) -> tuple[float, str]:
    """The kernel time of a bench_ops row: the CUDA-graph time when there is one, else eager."""
    if x.get("graph_status") == "ok":
        return x["graph_ms"], "graph"
    return x["ms"], "eager"


def _ops(r: dict) -> list[str]:
    res = r.get("results", [])
    ok = [x for x in res if x.get("status") == "ok"]
    cei = r["ceilings"]
    backends = ",".join(r.get("config", {}).get("backends") or ["?"])
    out = [f"bench_ops: {len(ok)} of {len(res)} measurements ok (copy {cei['copy']['gbps']:.0f} GB/s, "
           f"matmul {cei['matmul']['tflops']:.0f} TFLOP/s; backends {backends})"]
    if r.get("cuda_context_lost"):
        first = next((x for x in res if x.get("cuda_context_lost_here")), None)
        where = f" at {first['section']} {first['op']} {first['backend']} {first['direction']}" if first else ""
        out.append(f"  CUDA CONTEXT LOST{where}: {r['cuda_context_lost']}; the later measurements were skipped")
    for x in ok:
        # the data-path ops at ViT-B/16, and the block ops (norms, bias_gelu) at every shape
        if x["direction"] == "fwd+bwd" and "x_floor" in x and (
                (x["section"] == "ops" and x["shape_label"] == "vit_b16") or x["section"] in ("norms", "bias_gelu")):
            g = (f"graph {x['graph_ms']:8.3f} ms {x['x_floor_graph']:6.1f}x floor"
                 if x.get("graph_status") == "ok" else f"graph {x.get('graph_status', 'n/a')}")
            label = "" if x["section"] == "ops" else f" {x['shape_label']}"
            out.append(f"  {x['op'] + label:18s} {x['backend']:7s} fwd+bwd eager {x['ms']:8.3f} ms "
                       f"{x['x_floor']:6.1f}x floor | {g}")
    # attention: fastmae's kernels against the fastest SDPA kernel, per shape, forward+backward
    shapes: dict[tuple, dict] = {}
    for x in ok:
        if x["section"] in ("attention", "long") and x["op"] == "attention_qkvpacked" and x["direction"] == "fwd+bwd":
            shapes.setdefault((x["section"], x["shape_label"], tuple(x["shape"])), {})[x["backend"]] = x
    for (_section, label, shape), rows in shapes.items():
        sdpa = {b: _ms(x) for b, x in rows.items() if b.startswith("sdpa:")}
        best = min(sdpa.items(), key=lambda kv: kv[1][0]) if sdpa else None
        for b, x in rows.items():
            if b.startswith("sdpa:"):
                continue
            ms, kind = _ms(x)
            vs = (f"fastest SDPA {best[0]} {best[1][0]:.3f} ms ({best[1][1]}), speedup {best[1][0] / ms:.2f}x"
                  if best else "no SDPA kernel measured")
            out.append(f"  attention {label} {shape} {b} fwd+bwd {ms:.3f} ms ({kind}) | {vs}")
    return out


def _bench(r: dict) -> list[str]:
    out = [f"bench on {r['env']['card']} ({r['config']['dtype']}):",
           f"  {'model':8s} {'batch':>5s} {'mask':>5s} {'backend':8s} {'encoder':12s} {'img/s':>9s} "
           f"{'ms/step':>8s} {'GiB':>6s}"]
    for x in r.get("results", []):
        be = x["backend"] + ("" if x.get("mode", "eager") == "eager" else f"/{x['mode']}")  # fastmae bench --modes
        head = f"  {x['model']:8s} {x['batch_size']:5d} {x['mask_ratio']:5.2f} {be:8s} {x['encoder']:12s} "
        if x["status"] == "ok":
            out.append(head + f"{x['images_per_s']:9.1f} {x['ms_per_step']:8.2f} {x['peak_mem_gib'] or 0:6.1f}")
        else:
            out.append(head + f"{x['status']}: {x['reason'][:70]}")
    out += [f"  encoder-only speedup {e['model']} {e['backend']}: {e['encoder_only_speedup']:.2f}x"
            for e in r.get("encoder_only_speedup", [])]
    out += [f"  {s['backend']} vs stock {s['model']} {s['encoder']}: {s['speedup_vs_stock']:.2f}x"
            for s in r.get("speedup_vs_stock", []) if s.get("mode", "eager") == "eager"]
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}x"  # noqa: E731
    out += [f"  {s['backend']} {s['mode']} {s['model']} {s['encoder']}: vs stock eager {fmt(s['vs_stock_eager'])}, "
            f"vs stock compiled {fmt(s['vs_stock_compiled'])}" for s in r.get("speedup_vs_stock_modes", [])]
    return out


def _pretrain_vs_bench(r: dict) -> list[str]:
    """fastmae.pretrain.measure's comparison (issue 11: the pretrain step within 3% of bench's)."""
    verdict = "within" if r["within_target"] else "NOT within"
    return [f"pretrain vs bench ({r['model']}, batch {r['batch_size']}, {r['backend']}, {r['mode']}): "
            f"{r['pretrain_ms_per_step']:.3f} vs {r['bench_ms_per_step']:.3f} ms/step, "
            f"{100 * r['overhead']:+.2f}% ({verdict} {100 * r['target']:.0f}%)"]


_KINDS = {"validate": _validate, "ops": _ops, "bench": _bench, "pretrain_vs_bench": _pretrain_vs_bench}


def summarize(records_dir: str) -> str:
    blocks = []
    for path in sorted(glob.glob(os.path.join(records_dir, "*.json"))):
        try:
            with open(path) as f:
                r = json.load(f)
            fn = _KINDS.get(r.get("kind"))
            blocks.append(fn(r) if fn else [f"{os.path.basename(path)}: unknown record kind {r.get('kind')!r}"])
        except Exception as e:  # one bad record must not hide the others
            blocks.append([f"{os.path.basename(path)}: unreadable record ({type(e).__name__}: {e})"])
    if not blocks:
        return f"no records in {records_dir}"
    return "\n\n".join("\n".join(b) for b in blocks)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.gpu_summary RECORDS_DIR", file=sys.stderr)
        return 2
    print(summarize(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
