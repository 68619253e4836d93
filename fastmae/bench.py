"""``fastmae bench``: throughput of whole MAE pretraining steps, stock against fastmae.

One *step* is what a training loop does per batch: forward under autocast, backward,
an AdamW step (betas 0.9/0.95, weight decay 0.05, lr 1.5e-4; ``fused=True`` on CUDA) and
``zero_grad``. A configuration is (model, batch, mask ratio, backend, encoder mode):

* backend ``torch``: the stock model (reference data path, attention through SDPA);
  ``triton``: fastmae's Triton kernels; ``ext``: the compiled extension where it is built.
  A backend that cannot run is reported as ``unavailable: <reason>``, never as a number.
* encoder mode ``visible``: the encoder runs on the visible tokens only (MAE);
  ``mask tokens``: the paper's baseline with mask tokens in the encoder
  (``mask_tokens_in_encoder=True``). Their step-time ratio is the *encoder-only speedup*.
* execution mode (``--modes``; ``--compile`` and ``--cuda-graph`` are shorthands):
  ``eager``; ``compiled``, the model under ``torch.compile`` (default mode), the step
  otherwise the same; ``graphed``, the whole step (forward, backward, AdamW with
  ``capturable=True``) captured as one CUDA graph by :class:`fastmae.graph.CUDAGraphStep`
  and replayed (GPU only; elsewhere the rows say why not). Every backend runs in every
  mode asked for, so stock and fastmae are compared mode by mode and against stock eager.

Per configuration: ms/step (median of the timed steps after warm-up; each step timed with
CUDA events and a synchronize on a GPU, wall clock on the CPU), images/s, peak memory
(``torch.cuda.max_memory_allocated`` over the timed steps; for graphed rows the memory
*reserved* instead, since the graph's activations live in its private pool, which the
allocated count does not see; n/a on the CPU), model TFLOP/s and MFU. The FLOPs are
counted analytically (:func:`flops_per_image`) and are the matmul FLOPs the configuration
actually executes: with mask tokens in the encoder that is the encoder on all ``1 + L``
tokens, so its FLOPs per image are larger (ViT-B/16: 138.0 vs 58.7 GFLOP at mask 0.75) and
its MFU is not a measure of useful work; compare the two encoder modes by images/s. MFU
divides by the matmul rate measured in the same run (an ``8192^3`` product in the autocast
dtype on a GPU, ``1024^3`` on the CPU).

Results go to the terminal (a table), and to ``--out`` as a JSON record, a CSV and, when
matplotlib is installed, a PNG of throughput and encoder-only speedup against the mask
ratio. The JSON and CSV are rewritten after every configuration, so a run cut short by a
timeout still leaves its finished measurements.
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import math
import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn

from . import _timing
from .backend import RENAMED, BackendUnavailableError, available_backends, resolve
from .graph import CUDAGraphStep, adamw
from .models import CONFIGS, MaskedAutoencoderViT

__all__ = [
    "MODELS",
    "DEFAULT_BATCH",
    "model_config",
    "build_model",
    "flops_per_image",
    "parse_mask_ratios",
    "run",
    "add_arguments",
    "format_table",
]

# ---------------------------------------------------------------------------- models
_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
MODELS = {
    # a tiny ViT for CPU smoke runs: seconds per configuration on two cores
    "tiny": dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4,
                 decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4),
    "vit_b16": dict(img_size=224, **CONFIGS["base"], **_DECODER),
    "vit_l16": dict(img_size=224, **CONFIGS["large"], **_DECODER),
    "vit_h14": dict(img_size=224, **CONFIGS["huge"], **_DECODER),
}
for _cfg in MODELS.values():
    _cfg.update(in_chans=3, mlp_ratio=4.0)
DEFAULT_BATCH = {"tiny": 4, "vit_b16": 256, "vit_l16": 128, "vit_h14": 64}

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MASK_RATIO_RANGE = (0.5, 0.9)
MODES = ("eager", "compiled", "graphed")
# the order configurations run in: cheapest first, so that a --time-budget cut drops compiles
# (a minute or more each at ViT size) before it drops any eager or graphed row
_RUN_ORDER = ("eager", "graphed", "compiled")


def model_config(name: str) -> dict:
    """The constructor arguments of model ``name`` (one of :data:`MODELS`)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return dict(MODELS[name])


def build_model(name: str, backend: str, mask_tokens_in_encoder: bool, device) -> MaskedAutoencoderViT:
    """Model ``name`` with ``norm_pix_loss=True`` (as in the paper's pretraining) on ``device``."""
    cfg = model_config(name)
    with torch.device(device):
        return MaskedAutoencoderViT(**cfg, norm_layer=partial(nn.LayerNorm, eps=1e-6), norm_pix_loss=True,
                                    backend=backend, mask_tokens_in_encoder=mask_tokens_in_encoder)


def flops_per_image(cfg: dict, mask_ratio: float, mask_tokens_in_encoder: bool = False) -> float:
    """Matmul FLOPs per image of one training step (forward + backward), counted analytically.

    With ``L = (img/p)^2`` patches, ``P = C p^2`` values per patch, encoder width ``D``,
    decoder width ``Dd``, MLP ratio ``r``, ``K = int(L (1 - mask_ratio))`` kept tokens,
    ``Te = 1 + K`` encoder tokens (``1 + L`` with mask tokens in the encoder) and
    ``Td = 1 + L`` decoder tokens, the forward pass multiplies

    ============== ======================================================
    patch embed    ``2 L P D``               (the stride-p conv as a matmul)
    encoder        ``depth (2 Te D^2 (4 + 2r) + 4 Te^2 D)``
    decoder_embed  ``2 Te D Dd``
    decoder        ``dec_depth (2 Td Dd^2 (4 + 2r) + 4 Td^2 Dd)``
    decoder_pred   ``2 Td Dd P``             (the model predicts the cls row too, then drops it)
    ============== ======================================================

    where a block's ``2 T D^2 (4 + 2r)`` is qkv (3), proj (1) and the two MLP layers
    (``r`` each), i.e. ``24 T D^2`` at ``r = 4``, and ``4 T^2 D`` is ``Q K^T`` plus ``P V``.
    Backward costs twice the forward (gradients of inputs and of weights), so a step is
    ``3x`` the forward. Norms, GELU, softmax, the loss and the optimizer are not matmuls
    and are not counted (they are memory-bound).

    ``/work/shared/baseline-h200.md`` quotes 58.7 (ViT-B/16) and 124.5 (ViT-L/16) GFLOP at
    mask 0.75; its script counts the prediction head on ``L`` rows instead of ``1 + L``,
    ``3 * 2 Dd P`` = 2.4 MFLOP less (< 0.01%); otherwise the two counts are identical.
    """
    p, C = cfg["patch_size"], cfg.get("in_chans", 3)
    img = cfg["img_size"]
    L = (img // p) ** 2
    P = C * p * p
    D, Dd, r = cfg["embed_dim"], cfg["decoder_embed_dim"], cfg.get("mlp_ratio", 4.0)
    K = L if mask_tokens_in_encoder else int(L * (1 - mask_ratio))
    Te, Td = 1 + K, 1 + L
    block = lambda T, d: 2 * T * d * d * (4 + 2 * r) + 4 * T * T * d
    fwd = (2 * L * P * D
           + cfg["depth"] * block(Te, D)
           + 2 * Te * D * Dd
           + cfg["decoder_depth"] * block(Td, Dd)
           + 2 * Td * Dd * P)
    return 3.0 * fwd


def parse_mask_ratios(text: str) -> list[float]:
    """``"0.75"``, ``"0.5,0.75,0.9"`` or a range ``"0.5..0.9"`` (step 0.1; ``"0.5..0.9:0.05"``).

    Every ratio, and both ends of a range, must lie in [0.5, 0.9], the range MAE is trained in.
    """
    lo_ok, hi_ok = MASK_RATIO_RANGE

    def check(r: float) -> float:
        if not lo_ok <= r <= hi_ok:
            raise ValueError(f"mask ratio {r} is outside [{lo_ok}, {hi_ok}]")
        return round(r, 4)

    ratios: list[float] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if ".." in part:
                lo_s, hi_s = part.split("..", 1)
                hi_s, _, step_s = hi_s.partition(":")
                lo, hi, step = float(lo_s), float(hi_s), float(step_s or 0.1)
                bad = step <= 0 or hi < lo
            else:
                lo = hi = float(part)
                step, bad = 1.0, False
        except ValueError:
            bad = True
        if bad:
            raise ValueError(f"cannot read mask ratio(s) {part!r}: use 0.75, 0.5,0.75 or 0.5..0.9")
        check(lo)
        check(hi)
        n = int(round((hi - lo) / step))
        ratios += [check(lo + i * step) for i in range(n + 1) if lo + i * step <= hi + 1e-9]
    if not ratios:
        raise ValueError("no mask ratio given")
    return sorted(set(ratios))


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


# ---------------------------------------------------------------------------- configs
@dataclass
class Config:
    model: str
    batch_size: int
    mask_ratio: float
    backend: str
    mask_tokens_in_encoder: bool
    mode: str = "eager"  # eager | compiled | graphed

    @property
    def encoder(self) -> str:
        return "mask tokens" if self.mask_tokens_in_encoder else "visible"

    def label(self) -> str:
        return f"{self.model} b{self.batch_size} r{self.mask_ratio:g} {self.backend} {self.mode} {self.encoder}"


@dataclass
class Result:
    config: Config
    status: str = "ok"  # ok | unavailable | error | oom | skipped | incomplete
    reason: str = ""
    ms: list[float] = field(default_factory=list)
    peak_mem_gib: float | None = None
    peak_reserved_gib: float | None = None
    first_step_s: float | None = None
    loss: float | None = None
    gflop_per_image: float = 0.0

    @property
    def ms_per_step(self) -> float | None:
        return _timing.median(self.ms) if self.ms else None

    def images_per_s(self) -> float | None:
        ms = self.ms_per_step
        return self.config.batch_size / (ms * 1e-3) if ms else None

    def tflops(self) -> float | None:
        ips = self.images_per_s()
        return ips * self.gflop_per_image / 1e3 if ips else None

    def as_dict(self, peak_tflops: float | None) -> dict:
        c = self.config
        tf = self.tflops()
        return {
            "model": c.model,
            "batch_size": c.batch_size,
            "mask_ratio": c.mask_ratio,
            "backend": c.backend,
            "mode": c.mode,
            "encoder": "mask_tokens" if c.mask_tokens_in_encoder else "visible",
            "mask_tokens_in_encoder": c.mask_tokens_in_encoder,
            "status": self.status,
            "reason": self.reason,
            "ms_per_step": self.ms_per_step,
            "ms_all": [round(x, 4) for x in self.ms],
            "images_per_s": self.images_per_s(),
            "peak_mem_gib": self.peak_mem_gib,
            "peak_reserved_gib": self.peak_reserved_gib,
            "gflop_per_image": self.gflop_per_image,
            "tflops": tf,
            "mfu": tf / peak_tflops if tf and peak_tflops else None,
            "first_step_s": self.first_step_s,
            "loss": self.loss,
        }


def _unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device`` (None when it can, as far as can be told up front)."""
    if backend in available_backends(device):
        return None
    try:
        resolve(backend, device)
    except (BackendUnavailableError, ValueError) as e:
        return str(e)
    return f"backend {backend!r} is not available on {device}"


def _gflop_per_image(cfg: Config) -> float:
    return flops_per_image(model_config(cfg.model), cfg.mask_ratio, cfg.mask_tokens_in_encoder) / 1e9


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.empty_cache()
        except Exception as e:  # a kernel fault leaves the CUDA context broken; say so, keep the record
            print(f"fastmae bench: freeing GPU memory failed ({type(e).__name__}: {e}); "
                  "later configurations will likely fail too", file=sys.stderr)


def _mode_unavailable(mode: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why execution ``mode`` cannot run here (None when it can)."""
    if mode == "graphed":
        if device.type != "cuda":
            return f"the graphed step is one CUDA graph and needs a CUDA device; this run is on {device}"
        if dtype == torch.float16:
            return "fp16 autocast needs loss scaling (GradScaler), which the graphed step does not capture; use bf16"
    return None


def _run_config(cfg: Config, device: torch.device, dtype: torch.dtype, steps: int, warmup: int,
                progress: _timing.ProgressBar) -> Result:
    res = Result(cfg, gflop_per_image=_gflop_per_image(cfg))
    reason = _unavailable_reason(cfg.backend, device) or _mode_unavailable(cfg.mode, device, dtype)
    if reason is not None:
        res.status, res.reason = "unavailable", reason
        return res
    try:
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.backend, cfg.mask_tokens_in_encoder, device)
        mc = model_config(cfg.model)
        imgs = torch.randn(cfg.batch_size, mc["in_chans"], mc["img_size"], mc["img_size"], device=device)
        autocast = dtype != torch.float32
        last = []
        t0 = time.perf_counter()
        if cfg.mode == "graphed":
            # warm-up steps (autotuning included) and the capture happen in the constructor
            opt = adamw(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
            graphed = CUDAGraphStep(model, opt, tuple(imgs.shape), mask_ratio=cfg.mask_ratio,
                                    amp_dtype=dtype if autocast else None, warmup_steps=max(warmup, 1))

            def step():
                last[:] = [graphed.step(imgs)]
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05,
                                    fused=device.type == "cuda")
            fwd = torch.compile(model) if cfg.mode == "compiled" else model

            def step():
                with torch.autocast(device.type, dtype=dtype, enabled=autocast):
                    loss, _, _ = fwd(imgs, mask_ratio=cfg.mask_ratio)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                last[:] = [loss.detach()]

        # the first step compiles / autotunes (graphed: the warm-up and capture): timed apart,
        # counted as a warm-up step
        step()
        _timing.synchronize(device)
        res.first_step_s = time.perf_counter() - t0
        progress.step(f"warm-up 1/{warmup + steps}")
        if device.type == "cuda":
            if cfg.mode == "graphed":
                _free(device)  # what stays reserved is the graph's pool and the model's state
            torch.cuda.reset_peak_memory_stats(device)
        res.ms = _timing.time_calls(
            step, device, iters=steps, warmup=max(warmup - 1, 0),
            on_call=lambda i, n: progress.step(f"step {i + 1}/{n + 1}"),
        )
        if device.type == "cuda":
            res.peak_reserved_gib = torch.cuda.max_memory_reserved(device) / 2**30
            res.peak_mem_gib = (res.peak_reserved_gib if cfg.mode == "graphed"
                                else torch.cuda.max_memory_allocated(device) / 2**30)
        res.loss = float(last[0]) if last else None
        if res.loss is not None and not math.isfinite(res.loss):
            # timed, but a wrong result: not a throughput figure to compare
            res.status, res.reason = "error", f"the loss is {res.loss} (not finite)"
    except (BackendUnavailableError, ImportError) as e:
        res.status, res.reason = "unavailable", f"{type(e).__name__}: {e}"
        res.ms = []
    except torch.cuda.OutOfMemoryError as e:
        res.status, res.reason = "oom", str(e).splitlines()[0][:200]
        res.ms = []
    except Exception as e:  # a broken kernel must not stop the other measurements
        res.status, res.reason = "error", f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        res.ms = []
    return res  # the caller frees the model's memory once this frame is gone


# ---------------------------------------------------------------------------- output
def format_table(headers: list[str], rows: list[list], right: set[int] | None = None) -> str:
    """A plain aligned text table; ``right``: the columns to right-align (numbers)."""
    right = right or set()
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def fmt(row):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    lines = [fmt(cells[0]), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in cells[1:]]
    return "\n".join(lines)


def num(x, na: str = "n/a") -> str:
    """A figure with sensible digits at any scale: 3,507 / 73.02 / 0.0123."""
    if x is None:
        return na
    ax = abs(x)
    if ax >= 100:
        return f"{x:,.0f}"
    if ax >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def _speedups(rows: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """Encoder-only speedups (mask-token step / visible step, per backend and mode), speedups over
    stock in the same mode, and every row's speedup over stock eager and stock compiled."""
    ok = {(r["model"], r["batch_size"], r["mask_ratio"], r["backend"], r.get("mode", "eager"), r["encoder"]): r
          for r in rows if r["status"] == "ok"}
    enc, stock, modes = [], [], []
    for (m, b, mr, be, mo, e), r in ok.items():
        ms = r["ms_per_step"]
        if e == "visible" and (m, b, mr, be, mo, "mask_tokens") in ok:
            other = ok[(m, b, mr, be, mo, "mask_tokens")]
            enc.append({"model": m, "batch_size": b, "mask_ratio": mr, "backend": be, "mode": mo,
                        "encoder_only_speedup": other["ms_per_step"] / ms})
        if be != "torch" and (m, b, mr, "torch", mo, e) in ok:
            base = ok[(m, b, mr, "torch", mo, e)]
            stock.append({"model": m, "batch_size": b, "mask_ratio": mr, "backend": be, "mode": mo, "encoder": e,
                          "speedup_vs_stock": base["ms_per_step"] / ms})
        if (be, mo) != ("torch", "eager"):
            vs = {f"vs_stock_{k}": ok[(m, b, mr, "torch", k, e)]["ms_per_step"] / ms
                  if (m, b, mr, "torch", k, e) in ok else None for k in ("eager", "compiled")}
            if any(v is not None for v in vs.values()):
                modes.append({"model": m, "batch_size": b, "mask_ratio": mr, "backend": be, "mode": mo,
                              "encoder": e, **vs})
    return enc, stock, modes


def render(record: dict) -> str:
    """The terminal report of a bench record."""
    env, cei = record["env"], record["ceilings"]
    c = record["config"]
    out = [
        f"fastmae bench on {env['card']} | torch {env['torch']} | triton {env['triton']} | "
        f"commit {env['git_commit'][:12]}{' (dirty)' if env.get('git_dirty') else ''} | {env['date']}",
        f"{c['dtype']}{' autocast' if c['dtype'] != 'fp32' else ''}, AdamW step, "
        f"{c['steps']} timed steps after {c['warmup']} warm-up (median), "
        f"modes: {', '.join(c.get('modes') or (['compiled'] if c['compile'] else ['eager']))}",
        f"ceilings measured in this run: matmul {num(cei['matmul']['tflops'])} TFLOP/s "
        f"({cei['matmul']['dtype']} {cei['matmul']['n']}^3)"
        + (f", copy {num(cei['copy']['gbps'])} GB/s (read + write)" if cei.get("copy") else ""),
    ]
    out += [f"note: {n}" for n in record["notes"]]
    out.append("")
    rows = []
    order = {m: i for i, m in enumerate(MODES)}  # shown model by model, whatever order they ran in
    models = record["config"].get("models") or []
    shown = sorted(record["results"], key=lambda r: (models.index(r["model"]) if r["model"] in models else 0,
                                                     order.get(r.get("mode", "eager"), 0)))
    for r in shown:
        if r["status"] == "ok":
            rows.append([r["model"], r["batch_size"], f"{r['mask_ratio']:g}", r["backend"], r.get("mode", "eager"),
                         r["encoder"].replace("_", " "), num(r["images_per_s"]), num(r["ms_per_step"]),
                         num(r["peak_mem_gib"]), num(r["gflop_per_image"]), num(r["tflops"]),
                         "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%", ""])
        else:
            rows.append([r["model"], r["batch_size"], f"{r['mask_ratio']:g}", r["backend"], r.get("mode", "eager"),
                         r["encoder"].replace("_", " "), r["status"], "", "", "", "", "", r["reason"]])
    out.append(format_table(["model", "batch", "mask", "backend", "mode", "encoder", "img/s", "ms/step", "peak GiB",
                             "GFLOP/img", "TFLOP/s", "MFU", "note"], rows, right={1, 2, 6, 7, 8, 9, 10, 11}))
    enc, stock = record["encoder_only_speedup"], record["speedup_vs_stock"]
    modes = record.get("speedup_vs_stock_modes", [])
    if enc:
        out += ["", "encoder-only speedup (step time with mask tokens in the encoder / visible tokens only):"]
        out.append(format_table(["model", "batch", "mask", "backend", "mode", "speedup"],
                                [[e["model"], e["batch_size"], f"{e['mask_ratio']:g}", e["backend"],
                                  e.get("mode", "eager"), f"{e['encoder_only_speedup']:.2f}x"] for e in enc],
                                right={1, 2, 5}))
    if stock or modes:
        x = lambda v: "n/a" if v is None else f"{v:.2f}x"  # noqa: E731
        same = {(s["model"], s["batch_size"], s["mask_ratio"], s["backend"], s.get("mode", "eager"), s["encoder"]):
                s["speedup_vs_stock"] for s in stock}
        rows = [[s["model"], s["batch_size"], f"{s['mask_ratio']:g}", s["encoder"].replace("_", " "), s["backend"],
                 s["mode"], x(same.get((s["model"], s["batch_size"], s["mask_ratio"], s["backend"], s["mode"],
                                        s["encoder"]))), x(s["vs_stock_eager"]), x(s["vs_stock_compiled"])]
                for s in modes]
        out += ["", "speedup over stock (stock step time / this step time), in the same mode, over stock eager "
                    "and over stock compiled:"]
        out.append(format_table(["model", "batch", "mask", "encoder", "backend", "mode", "vs stock same mode",
                                 "vs stock eager", "vs stock compiled"], rows, right={1, 2, 6, 7, 8}))
    return "\n".join(out)


_CSV_COLUMNS = ["model", "batch_size", "mask_ratio", "backend", "mode", "encoder", "status", "reason",
                "images_per_s", "ms_per_step", "peak_mem_gib", "peak_reserved_gib", "gflop_per_image", "tflops", "mfu",
                "first_step_s", "loss"]
_CSV_ENV = ["card", "torch", "triton", "cuda", "git_commit", "date", "command"]


def write_csv(record: dict, path: str) -> None:
    """The record's rows as CSV, written atomically (a failure or a kill mid-write keeps the previous file)."""
    from .pretrain.checkpoint import atomic_write

    c = record["config"]
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(_CSV_COLUMNS + ["dtype", "compile", "steps", "warmup", "matmul_tflops"] + _CSV_ENV)
    for r in record["results"]:
        w.writerow([r[k] for k in _CSV_COLUMNS]
                   + [c["dtype"], c["compile"], c["steps"], c["warmup"], record["ceilings"]["matmul"]["tflops"]]
                   + [record["env"].get(k) for k in _CSV_ENV])
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def write_plot(record: dict, path: str) -> str | None:
    """Throughput and encoder-only speedup against the mask ratio; returns a reason when skipped."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed: PNG skipped (pip install matplotlib)"
    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    series: dict = {}
    for r in record["results"]:
        if r["status"] == "ok":
            key = f"{r['model']} {r['backend']} {r.get('mode', 'eager')} {r['encoder'].replace('_', ' ')}"
            series.setdefault(key, []).append((r["mask_ratio"], r["images_per_s"]))
    for key, pts in sorted(series.items()):
        pts.sort()
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                 linestyle="--" if "mask tokens" in key else "-", label=key)
    ax1.set(xlabel="mask ratio", ylabel="images / s", title="training-step throughput")
    sp: dict = {}
    for e in record["encoder_only_speedup"]:
        key = f"{e['model']} {e['backend']} {e.get('mode', 'eager')}"
        sp.setdefault(key, []).append((e["mask_ratio"], e["encoder_only_speedup"]))
    for key, pts in sorted(sp.items()):
        pts.sort()
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
    ax2.set(xlabel="mask ratio", ylabel="x", title="encoder-only speedup")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    env = record["env"]
    fig.suptitle(f"fastmae bench, {env['card']}, {record['config']['dtype']}, {env['date']}", fontsize=9)
    fig.tight_layout()
    from .pretrain.checkpoint import atomic_write

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    return None


# ---------------------------------------------------------------------------- main
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default=None,
                   help=f"comma-separated, from {', '.join(MODELS)} (default: vit_b16,vit_l16 on a GPU, tiny on CPU)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per step for every model (default per model: "
                        + ", ".join(f"{k} {v}" for k, v in DEFAULT_BATCH.items()) + ")")
    p.add_argument("--mask-ratios", default="0.75", help="e.g. 0.75, 0.5,0.75,0.9 or 0.5..0.9 (each in [0.5, 0.9])")
    p.add_argument("--backends", default=None,
                   help="comma-separated from torch (stock), triton, ext "
                        "(default: torch,triton (+ext when built) on a GPU, torch on CPU)")
    p.add_argument("--encoder", choices=("both", "visible", "mask_tokens"), default="both",
                   help="encoder modes to run (default both: the encoder-only speedup needs both)")
    p.add_argument("--dtype", choices=tuple(_DTYPES), default=None,
                   help="autocast dtype (fp32: no autocast); default bf16 on a GPU, fp32 on CPU")
    p.add_argument("--modes", default=None,
                   help=f"comma-separated execution modes from {', '.join(MODES)} (default eager; graphed: the whole "
                        "step as one CUDA graph, GPU only)")
    p.add_argument("--compile", action="store_true",
                   help="shorthand for --modes eager,compiled: every backend eager and under torch.compile")
    p.add_argument("--cuda-graph", action="store_true",
                   help="shorthand for --modes eager,compiled,graphed: eager, compiled and the step as one CUDA graph")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on a GPU, 5 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps, the first included (default 5 / 2)")
    p.add_argument("--out", default="bench-out", help="folder for the JSON, CSV and PNG (default ./bench-out)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; configurations not started by then are recorded as skipped")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace, command: str | None = None) -> int:
    """Run ``fastmae bench`` with parsed ``args``; returns the exit status."""
    t_start = time.perf_counter()
    device = _timing.cli_device(args.device, "fastmae bench")
    if device is None:
        return 2
    gpu = device.type == "cuda"
    notes: list[str] = []
    try:
        models = _csv_list(args.models) if args.models else (["vit_b16", "vit_l16"] if gpu else ["tiny"])
        for m in models:
            model_config(m)
        ratios = parse_mask_ratios(args.mask_ratios)
    except ValueError as e:
        print(f"fastmae bench: {e}", file=sys.stderr)
        return 2
    if args.backends:
        backends = _csv_list(args.backends)
        renamed = [b for b in backends if b in RENAMED]
        if renamed:
            print(f"fastmae bench: backend {renamed[0]!r} is now called {RENAMED[renamed[0]]!r}", file=sys.stderr)
            return 2
        bad = [b for b in backends if b not in ("torch", "triton", "ext")]
        if bad:
            print(f"fastmae bench: unknown backend(s) {bad}; choose from torch, triton, ext", file=sys.stderr)
            return 2
    elif gpu:
        backends = ["torch", "triton"] + (["ext"] if "ext" in available_backends(device) else [])
    else:
        backends = ["torch"]
        notes.append("no CUDA device: the small CPU configuration, stock backend only. The triton backend runs "
                     "on CPU only through the Triton interpreter (TRITON_INTERPRET=1), far too slow to time; "
                     "ask for it with --backends torch,triton")
    if not gpu and "triton" in backends and _timing.interpreting():
        notes.append("the triton backend runs through the Triton interpreter here (TRITON_INTERPRET=1): "
                     "its times say nothing about the kernels")
    dtype_name = args.dtype or ("bf16" if gpu else "fp32")
    dtype = _DTYPES[dtype_name]
    steps = args.steps if args.steps is not None else (20 if gpu else 5)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 2)
    if steps < 1 or warmup < 1:
        print("fastmae bench: --steps and --warmup must be >= 1", file=sys.stderr)
        return 2
    if args.batch_size is not None and args.batch_size < 1:
        print("fastmae bench: --batch-size must be >= 1", file=sys.stderr)
        return 2
    modes = {"both": (False, True), "visible": (False,), "mask_tokens": (True,)}[args.encoder]
    if args.modes:
        exec_modes = _csv_list(args.modes)
        bad = [m for m in exec_modes if m not in MODES]
        if bad or not exec_modes:
            print(f"fastmae bench: unknown mode(s) {bad or args.modes!r}; choose from {', '.join(MODES)}",
                  file=sys.stderr)
            return 2
        exec_modes = [m for m in MODES if m in exec_modes]
    else:
        exec_modes = ["eager", "compiled", "graphed"] if args.cuda_graph else (["eager", "compiled"] if args.compile
                                                                               else ["eager"])
    if "graphed" in exec_modes:
        notes.append("graphed: the whole step (forward, backward, AdamW capturable+fused) is one CUDA graph "
                     "(fastmae.graph.CUDAGraphStep); its peak memory is the memory reserved (the graph's pool "
                     "included), the other rows' the memory allocated")
        if not gpu:
            notes.append("graphed rows need a CUDA device: reported as unavailable here")
    notes.append("TFLOP/s and MFU count the matmul FLOPs each configuration executes (encoder on all 1+L tokens "
                 "with mask tokens in the encoder), against the matmul rate measured in this run; compare the "
                 "encoder modes by img/s")
    if not gpu:
        notes.append("CPU: times are wall clock, peak GPU memory is n/a")

    configs = [Config(m, args.batch_size or DEFAULT_BATCH[m], r, b, mt, mo)
               for mo in _RUN_ORDER if mo in exec_modes
               for m in models for r in ratios for b in backends for mt in modes]

    env = _timing.environment(device, command)
    ceilings = {"matmul": _timing.matmul_rate(device, dtype)}
    if gpu:
        ceilings["copy"] = _timing.copy_bandwidth(device)
    record = {
        "kind": "bench",
        "schema": 1,
        "env": env,
        "config": {"models": models, "batch_sizes": {m: args.batch_size or DEFAULT_BATCH[m] for m in models},
                   "mask_ratios": ratios, "backends": backends, "encoder_modes": [("mask_tokens" if mt else "visible")
                                                                                  for mt in modes],
                   "dtype": dtype_name, "compile": "compiled" in exec_modes, "modes": exec_modes,
                   "steps": steps, "warmup": warmup,
                   "optimizer": "AdamW(lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05"
                                + (", fused=True)" if gpu else ")"),
                   "norm_pix_loss": True,
                   "model_configs": {m: model_config(m) for m in models}},
        "ceilings": ceilings,
        "notes": notes,
        "results": [],
        "encoder_only_speedup": [],
        "speedup_vs_stock": [],
        "speedup_vs_stock_modes": [],
    }
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"bench-{_timing.slug(env['card'])}-{env['timestamp']}")
    paths = {"json": base + ".json", "csv": base + ".csv"}

    def save():
        (record["encoder_only_speedup"], record["speedup_vs_stock"],
         record["speedup_vs_stock_modes"]) = _speedups(record["results"])
        _timing.write_json(paths["json"], record)
        write_csv(record, paths["csv"])

    progress = _timing.ProgressBar(len(configs), enabled=not args.quiet)
    peak = ceilings["matmul"]["tflops"]
    for cfg in configs:
        progress.start(cfg.label())
        if args.time_budget is not None and time.perf_counter() - t_start > args.time_budget:
            res = Result(cfg, status="skipped", reason=f"time budget of {args.time_budget:g} s spent",
                         gflop_per_image=_gflop_per_image(cfg))
        else:
            # on record before it starts: a run killed (time limit) or crashed (kernel fault)
            # in this configuration leaves this row, not a silently missing one
            record["results"].append(Result(
                cfg, status="incomplete", reason="started but did not finish: the process was killed or crashed",
                gflop_per_image=_gflop_per_image(cfg)).as_dict(peak))
            save()
            res = _run_config(cfg, device, dtype, steps, warmup, progress)
            record["results"].pop()
        record["results"].append(res.as_dict(peak))
        progress.finish_task()
        save()
        if res.status != "skipped":
            _free(device)
    progress.close()
    if device.type == "cpu":
        import resource

        record["cpu_max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    save()
    print(render(record))
    print()
    written = [paths["json"], paths["csv"]]
    if not args.no_plot:
        why = write_plot(record, base + ".png")
        if why:
            print(f"note: {why}")
        else:
            written.append(base + ".png")
    print("wrote " + ", ".join(written))
    failed = [r for r in record["results"] if r["status"] in ("error", "oom")]
    return 1 if failed else 0

