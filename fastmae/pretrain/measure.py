"""``python -m fastmae.pretrain.measure``: a pretraining step against ``fastmae bench``'s bare step.

The issue's number: "``fastmae pretrain`` steps are within 3% of ``fastmae bench``'s bare step
at the same configuration". Run both on the same GPU (the commands below use ViT-B/16, batch
256, bf16, the Triton backend, eager), then compare::

    fastmae bench --models vit_b16 --batch-size 256 --backends triton --encoder visible \\
        --dtype bf16 --modes eager --out WORK/bench-step
    fastmae pretrain --synthetic --model mae_vit_base_patch16 --batch_size 256 --norm_pix_loss \\
        --backend triton --precision bf16 --epochs 1 --warmup_epochs 0 --max_steps 60 --log_every 10 \\
        --output_dir '' --log_dir WORK/pretrain-step --num_workers 8 --no_progress
    python -m fastmae.pretrain.measure --bench WORK/bench-step/bench-*.json \\
        --log WORK/pretrain-step/log_steps.txt --model mae_vit_base_patch16 --batch_size 256 \\
        --backend triton --mode eager --out WORK/pretrain-vs-bench.json

``--synthetic`` feeds in-memory uint8 images through the real loader (workers, pinned uint8
batches, device normalisation), so the comparison is of the training step and its input
path, without JPEG decoding. The pretraining step time is the median of ``step_ms`` over the
log windows after the first (which holds autotuning and the loader's start); each window is
timed on the wall clock between two log points, each ending with the one host read of the
window, so it covers the device's work. The bench's is its ``ms_per_step`` (median of
per-step CUDA-event times). ``--mode`` is the bench's execution mode: ``eager`` for a plain
run, ``compiled`` with ``--compile``, ``graphed`` with ``--cuda_graph``.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys

__all__ = ["BENCH_MODEL", "pretrain_step_ms", "bench_step_ms", "compare", "main"]

BENCH_MODEL = {"mae_vit_base_patch16": "vit_b16", "mae_vit_large_patch16": "vit_l16",
               "mae_vit_huge_patch14": "vit_h14", "mae_vit_base_patch16_dec512d8b": "vit_b16",
               "mae_vit_large_patch16_dec512d8b": "vit_l16", "mae_vit_huge_patch14_dec512d8b": "vit_h14"}
TARGET = 0.03


def pretrain_step_ms(rows: list[dict], skip: int = 1) -> float:
    """Median ``step_ms`` of the log windows after the first ``skip``."""
    ms = [r["step_ms"] for r in rows[skip:] if r.get("step_ms")]
    if not ms:
        raise ValueError(f"no log window after the first {skip} has a step time ({len(rows)} rows): run more "
                         "steps (--max_steps) or log more often (--log_every)")
    return statistics.median(ms)


def bench_step_ms(record: dict, model: str, batch_size: int, backend: str, mode: str = "eager",
                  mask_ratio: float = 0.75) -> float:
    """``ms_per_step`` of the bench row at this configuration (encoder on visible tokens)."""
    name = BENCH_MODEL.get(model, model)
    for r in record["results"]:
        if (r["model"], r["batch_size"], r["backend"], r.get("mode", "eager"), r["encoder"]) == \
                (name, batch_size, backend, mode, "visible") and abs(r["mask_ratio"] - mask_ratio) < 1e-9:
            if r["status"] != "ok":
                raise ValueError(f"the bench row {name} b{batch_size} {backend} {mode} is {r['status']}: {r['reason']}")
            return r["ms_per_step"]
    raise ValueError(f"no bench row for {name} batch {batch_size} backend {backend} mode {mode} mask {mask_ratio} "
                     "(visible encoder)")


def compare(record: dict, rows: list[dict], model: str, batch_size: int, backend: str, mode: str = "eager",
            mask_ratio: float = 0.75) -> dict:
    p = pretrain_step_ms(rows)
    b = bench_step_ms(record, model, batch_size, backend, mode, mask_ratio)
    over = p / b - 1.0
    return {"kind": "pretrain_vs_bench", "model": model, "batch_size": batch_size, "backend": backend, "mode": mode,
            "mask_ratio": mask_ratio, "pretrain_ms_per_step": p, "bench_ms_per_step": b, "overhead": over,
            "target": TARGET, "within_target": over <= TARGET, "windows": len(rows) - 1,
            "card": record.get("env", {}).get("card")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastmae.pretrain.measure", description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", required=True, help="fastmae bench JSON record (a glob is fine)")
    p.add_argument("--log", required=True, help="log_steps.txt of the fastmae pretrain run")
    p.add_argument("--model", default="mae_vit_base_patch16")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--backend", default="triton")
    p.add_argument("--mode", default="eager", choices=("eager", "compiled", "graphed"))
    p.add_argument("--mask_ratio", type=float, default=0.75)
    p.add_argument("--out", default=None, help="write the comparison as JSON here")
    a = p.parse_args(argv)
    paths = sorted(glob.glob(a.bench))
    if not paths:
        print(f"measure: no bench record matches {a.bench!r}", file=sys.stderr)
        return 2
    record = json.load(open(paths[-1]))
    rows = [json.loads(line) for line in open(a.log) if line.strip()]
    try:
        res = compare(record, rows, a.model, a.batch_size, a.backend, a.mode, a.mask_ratio)
    except ValueError as e:
        print(f"measure: {e}", file=sys.stderr)
        return 2
    print(f"fastmae pretrain {res['pretrain_ms_per_step']:.3f} ms/step vs fastmae bench {res['bench_ms_per_step']:.3f}"
          f" ms/step ({a.model}, batch {a.batch_size}, {a.backend}, {a.mode}): {100 * res['overhead']:+.2f}% "
          f"({'within' if res['within_target'] else 'NOT within'} {100 * TARGET:.0f}%)")
    if a.out:
        from .checkpoint import atomic_write

        atomic_write(a.out, lambda f: f.write(json.dumps(res, indent=1).encode()))
    return 0 if res["within_target"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
