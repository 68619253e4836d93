"""The training loop of ``fastmae pretrain``: the official recipe without a host sync per step.

One *step* below is an optimizer update (``accum_iter`` data iterations); ``--log_every``,
``--ckpt_every_steps`` and ``--max_steps`` count steps. Per data iteration the loop

1. sets the learning rate at the start of each accumulation cycle (official
   ``lr_sched.adjust_learning_rate`` with ``data_iter_step / steps_per_epoch + epoch``);
2. moves the uint8 batch to the device and normalises it there (:func:`fastmae.data.to_device`);
3. runs forward under autocast (bf16 by default on CUDA; fp16 with a ``GradScaler``; fp32),
   backward of ``loss / accum_iter`` (DDP's ``no_sync`` on all but the last micro-batch),
   and on the last one the optimizer step (AdamW, betas 0.9/0.95, official weight-decay
   groups; fused on CUDA) and ``zero_grad``;
4. adds the detached loss to two device accumulators (this log window, this epoch).

Nothing there reads a value back: no ``.item()``, no all-reduce of a float, no
``cuda.synchronize``. The host learns the loss only at *log points* (every ``--log_every``
steps, at the end of each epoch, before every checkpoint): one all-reduce of the
accumulators (under DDP) and one transfer. A non-finite loss is therefore detected at the
first log point or checkpoint after the step that produced it (at most ``--log_every``
steps later); the run then stops with exit status 1 and writes nothing, so the last
checkpoint on disk is the last good one. At the end of each epoch and before every checkpoint
the parameters are also checked for finiteness on the device (a step can turn them non-finite
with a finite loss). An epoch's row goes into ``log.txt`` before its checkpoints are written.

Images/s at a log point come from the wall clock between two log points, each of which
ends with that one transfer (hence a completed device queue): an average over the
window, with no per-step timing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from . import checkpoint as ckpt_mod
from .args import PRECISIONS
from .checkpoint import CheckpointError
from .distributed import DistInfo, all_gather_objects, cleanup, init_distributed
from .lr_sched import absolute_lr, adjust_learning_rate, lr_at
from .sampler import ResumableDistributedSampler

__all__ = ["PretrainError", "TrainResult", "train", "run", "build_model", "param_groups_weight_decay",
           "SyntheticDataset", "MODEL_NAMES"]

MODEL_NAMES = (
    "mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14",
    "mae_vit_base_patch16_dec512d8b", "mae_vit_large_patch16_dec512d8b", "mae_vit_huge_patch14_dec512d8b",
    "mae_vit_tiny_patch8",
)
_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
DEMO_REPEATS = 8  # the demo's epoch: each embedded photograph 8 times, each time its own crop


class PretrainError(ValueError):
    """A configuration that cannot run; the message says why and what to do."""


@dataclass
class TrainResult:
    """What :func:`train` returns: the unwrapped model and where the run stopped."""
    model: nn.Module
    exit_code: int
    status: str  # "done" | "max_steps" | "non-finite"
    global_step: int
    next_epoch: int
    next_step: int
    output_dir: str | None


# ----------------------------------------------------------------------------- building blocks
def _model_factory(name: str):
    from ..models import mae

    if name not in MODEL_NAMES or not hasattr(mae, name):
        known = [n for n in MODEL_NAMES if hasattr(mae, n)]
        raise PretrainError(f"unknown --model {name!r}; choose from {', '.join(known)}")
    return getattr(mae, name)


def check_geometry(name: str, input_size: int, mask_ratio: float) -> int:
    """Raise :class:`PretrainError` unless ``--input_size`` is a multiple of ``--model``'s patch size and
    ``--mask_ratio`` leaves at least one visible and one masked patch of the ``L`` patches (official
    ``len_keep = int(L * (1 - mask_ratio))``); returns ``L``. Reads the patch size off a model built
    on the meta device (no memory, no random numbers drawn)."""
    with torch.device("meta"):
        patch = _model_factory(name)().patch_embed.patch_size[0]
    if input_size % patch:
        near = [n for n in (input_size // patch * patch, (input_size // patch + 1) * patch) if n]
        raise PretrainError(f"--input_size {input_size} is not a multiple of the patch size {patch} of --model "
                            f"{name}: use e.g. {' or '.join(map(str, near))}")
    L = (input_size // patch) ** 2
    len_keep = int(L * (1 - mask_ratio))
    if not 1 <= len_keep < L:
        raise PretrainError(f"--mask_ratio {mask_ratio} on the {L} patches of --input_size {input_size} (patch "
                            f"{patch}) keeps {len_keep} visible (int(L * (1 - mask_ratio))): at least one patch "
                            "must stay visible and at least one be masked (the loss is over the masked ones)")
    return L


def build_model(name: str, input_size: int, norm_pix_loss: bool, backend: str | None) -> nn.Module:
    """An MAE of fastmae's model zoo by its official name (``--model``)."""
    return _model_factory(name)(img_size=input_size, norm_pix_loss=norm_pix_loss, backend=backend)


def param_groups_weight_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    """The official param groups (timm 0.3.2 ``add_weight_decay`` as called by main_pretrain.py):
    ``[{no decay: 1-D params and biases}, {decay: the rest}]``, frozen params left out, in
    ``named_parameters`` order, so an official optimizer state loads onto them."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


class SyntheticDataset(torch.utils.data.Dataset):
    """``--synthetic``: ``n`` items of random uint8 images ``(3, size, size)``, cycling through
    ``distinct`` images made once from ``seed`` (item ``i`` is ``(image i % distinct, 0)``). No file
    reading or decoding, but the same loader, pinned uint8 batches and device normalisation as
    real data: for measuring the training step against ``fastmae bench``, never for training."""

    def __init__(self, n: int, size: int, seed: int = 0, distinct: int = 64):
        g = torch.Generator().manual_seed(seed)
        self.n = int(n)
        self.images = torch.randint(0, 256, (min(distinct, self.n), 3, size, size), dtype=torch.uint8, generator=g)

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        pass

    def __getitem__(self, i):
        return self.images[i % len(self.images)], 0


def _demo_photos(folder: str, input_size: int) -> list[str]:
    """The embedded photographs, downscaled once (short side ``2 * input_size``, PNG) into
    ``folder``: the demo's crops at ``input_size`` lose nothing visible, and decoding drops from
    ~40 ms to ~1 ms per image on the CPU."""
    from PIL import Image

    from .. import data

    out = []
    for p in data.embedded_images():
        with Image.open(p) as im:
            im = im.convert("RGB")
            s = 2 * input_size / min(im.size)
            if s < 1:
                im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BICUBIC)
            dst = os.path.join(folder, os.path.splitext(os.path.basename(p))[0] + ".png")
            im.save(dst)
        out.append(dst)
    return out


def _fix_optimizer_flags(optimizer: torch.optim.Optimizer, flags: dict) -> None:
    """After ``load_state_dict``: this run's implementation flags (fused, foreach, capturable), not
    the saved ones, and ``step`` where this run's AdamW keeps it: on the parameter's device for
    fused / capturable, else on the CPU (load_state_dict placed it by the saved flags: a
    --cuda_graph checkpoint's on the GPU, which a plain AdamW would read back every step)."""
    for g in optimizer.param_groups:
        g.update(flags)
        on_device = bool(g.get("fused") or g.get("capturable"))
        for p in g["params"]:
            st = optimizer.state.get(p)
            if st and torch.is_tensor(st.get("step")):
                st["step"] = st["step"].to(device=p.device if on_device else "cpu", dtype=torch.float32)


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass  # a line cut by a kill
    except FileNotFoundError:
        pass
    return rows


def _rewrite_jsonl(path: str, rows: list[dict]) -> None:
    ckpt_mod.atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))


def _append_jsonl(path: str, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def write_loss_plot(rows: list[dict], path: str, title: str = "fastmae pretrain") -> str | None:
    """Loss (and lr) against the step, from the per-step log rows; returns a reason when skipped."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed: loss plot skipped (pip install matplotlib)"
    rows = [r for r in rows if "loss" in r and r["loss"] is not None and math.isfinite(r["loss"])]
    if not rows:
        return "no logged steps: loss plot skipped"
    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker="." if len(rows) < 60 else None,
            color="tab:blue", label="loss (mean over the log window)")
    ax.set(xlabel="optimizer step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in rows], [r["lr"] for r in rows], color="tab:orange", alpha=0.6, label="lr")
    ax2.set_ylabel("learning rate")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper right")
    fig.tight_layout()
    ckpt_mod.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    return None


# ----------------------------------------------------------------------------- the run
class _Run:
    """State of one training run (one process)."""

    def __init__(self, args: argparse.Namespace, info: DistInfo, device: torch.device):
        self.args, self.info, self.device = args, info, device
        self.main = info.is_main
        self.out = args.output_dir or None
        self.log_dir = args.log_dir or self.out

    def say(self, msg: str) -> None:
        if self.main:
            print(f"fastmae pretrain: {msg}", flush=True)


def _resolve_device(args) -> torch.device:
    if args.device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(args.device)
    except RuntimeError as e:
        raise PretrainError(f"--device {args.device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PretrainError("--device cuda but no CUDA device is available (use --device cpu)")
    return dev


def _check_args(args) -> None:
    if args.precision is not None and args.precision not in PRECISIONS:
        raise PretrainError(f"--precision must be one of {PRECISIONS}")
    if not 0.0 < args.mask_ratio < 1.0:
        raise PretrainError(f"--mask_ratio must be in (0, 1), got {args.mask_ratio}")
    check_geometry(args.model, args.input_size, args.mask_ratio)
    if args.backend is not None:
        from ..backend import check_name

        try:
            check_name(args.backend, attention=True)
        except ValueError as e:
            raise PretrainError(f"--backend: {e}") from None


def train(args: argparse.Namespace) -> TrainResult:
    """Run pretraining with parsed ``args`` (see :func:`fastmae.pretrain.args.get_args_parser`)."""
    args = argparse.Namespace(**vars(args))  # the caller's namespace is left alone
    _check_args(args)
    device = _resolve_device(args)
    info = init_distributed(args, device.type)
    try:
        if info.distributed and device.type == "cuda":
            device = torch.device("cuda", info.local_rank)
        with tempfile.TemporaryDirectory(prefix="fastmae-demo-") as tmp:
            return _train(_Run(args, info, device), tmp)
    finally:
        cleanup(info)


def _train(run: _Run, tmpdir: str) -> TrainResult:  # noqa: C901 - one loop, read top to bottom
    from .. import data

    args, info, device = run.args, run.info, run.device
    args.world_size, args.rank, args.distributed = info.world_size, info.rank, info.distributed
    args.device = str(device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    args.precision = precision
    amp_dtype = _AMP[precision]

    if args.cuda_graph:
        try:
            from .. import graph
        except ImportError as e:
            raise PretrainError(f"--cuda_graph needs fastmae.graph, which is not available ({e})") from None
        if device.type != "cuda":
            raise PretrainError("--cuda_graph captures the step as a CUDA graph and needs --device cuda")
        if args.accum_iter != 1:
            raise PretrainError("--cuda_graph captures one whole step per batch: use --accum_iter 1")
        if precision == "fp16":
            raise PretrainError("--cuda_graph does not capture a GradScaler: use --precision bf16 or fp32")
        if info.distributed:
            raise PretrainError("--cuda_graph runs in one process (its step has no DDP all-reduce); "
                                "drop it under torchrun")
        if args.compile:
            raise PretrainError("--cuda_graph and --compile: choose one")

    # fix the seed for reproducibility (official: seed + rank, torch and numpy; python's too)
    seed = args.seed + info.rank
    torch.manual_seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - official seeds numpy's global RNG
    random.seed(seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    elif args.demo and not os.environ.get("OMP_NUM_THREADS"):
        # the demo on the CPU: leave a core per loader worker (on 2 cores, 2 compute threads beside a
        # decoding worker spin-wait for each other and run many times slower)
        torch.set_num_threads(max(1, torch.get_num_threads() - args.num_workers))

    # ---------------------------------------------------------------- data
    if args.synthetic:
        dataset = SyntheticDataset(args.synthetic_size, args.input_size, seed=args.seed)
        source = (f"{len(dataset)} synthetic uint8 images per epoch ({len(dataset.images)} distinct; no decode: for "
                  "measuring the step only)")
    elif args.data_path:
        root = data.find_train_root(args.data_path)
        dataset = data.PretrainDataset(root, input_size=args.input_size, seed=args.seed, on_error=args.on_corrupt)
        source = f"{len(dataset)} images under {root}"
    elif args.demo:
        photos = _demo_photos(tmpdir, args.input_size)
        dataset = data.PretrainDataset(photos * DEMO_REPEATS, input_size=args.input_size, seed=args.seed,
                                       on_error=args.on_corrupt)
        source = (f"the {len(photos)} photographs shipped in scikit-image/matplotlib, each {DEMO_REPEATS}x per "
                  "epoch with its own crop")
    else:
        raise PretrainError("--data_path is required (an ImageNet-style folder); run `fastmae pretrain` with no "
                            "arguments, or add --demo, for the demo on embedded photographs")
    sampler = ResumableDistributedSampler(len(dataset), info.world_size, info.rank, shuffle=True, seed=args.seed)
    steps_per_epoch = len(sampler) // args.batch_size  # drop_last, as official
    if steps_per_epoch == 0:
        raise PretrainError(f"the dataset has {len(dataset)} images: fewer than one batch of {args.batch_size} "
                            f"per process ({info.world_size} process(es)); lower --batch_size")
    if steps_per_epoch < args.accum_iter:
        raise PretrainError(f"an epoch has {steps_per_epoch} batches per process, fewer than --accum_iter "
                            f"{args.accum_iter}: no optimizer step would ever run")

    # ---------------------------------------------------------------- model and optimizer
    with torch.device(device):
        model = build_model(args.model, args.input_size, args.norm_pix_loss, args.backend)
    model_without_ddp = model
    eff_batch_size = args.batch_size * args.accum_iter * info.world_size
    args.lr = absolute_lr(args.lr, args.blr, eff_batch_size)
    groups = param_groups_weight_decay(model_without_ddp, args.weight_decay)
    if args.cuda_graph:
        optimizer = graph.adamw(groups, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
        flags = {"fused": True, "capturable": True}
    else:
        fused = device.type == "cuda"
        optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=fused or None)
        flags = {"fused": fused or None, "capturable": False}  # a --cuda_graph checkpoint's True is not this run's
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    # what a checkpoint holds when no scaler is used: a fresh enabled one's state, which the official
    # util/misc.py load_model hands to its (always enabled) GradScaler; an empty dict would fail there
    default_scaler_state = torch.amp.GradScaler("cpu", enabled=True).state_dict()

    # ---------------------------------------------------------------- output and resume
    if run.main and run.out:
        os.makedirs(run.out, exist_ok=True)
        stale = ckpt_mod.remove_stale_temp_files(run.out)
        if stale:
            run.say(f"removed {len(stale)} temporary file(s) of a run killed while writing a checkpoint: "
                    f"{', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''}")
    if run.main and run.log_dir:
        os.makedirs(run.log_dir, exist_ok=True)
    start_epoch, start_step, global_step = args.start_epoch, 0, 0
    meters = None  # per-rank device accumulators restored from a checkpoint
    host = {"epoch_lr_sum": 0.0, "epoch_n": 0, "window_n": 0}
    rng_state = None
    last_good = None  # the newest checkpoint known good
    if args.resume:
        ck = ckpt_mod.load_checkpoint(args.resume)
        ckpt_mod.check_model_state(model_without_ddp, ck["model"], args.resume)
        has_opt = "optimizer" in ck and "epoch" in ck
        if has_opt:
            ckpt_mod.check_optimizer_state(optimizer, ck["optimizer"], args.resume)
        fm = ck.get("fastmae")
        if fm is not None:
            _check_resume_fits(fm, args, info, len(dataset), steps_per_epoch)
        # everything checked: now load (nothing partial)
        model_without_ddp.load_state_dict(ck["model"], strict=True)
        last_good = args.resume if ckpt_mod.is_url(args.resume) else os.path.abspath(args.resume)
        if has_opt:
            optimizer.load_state_dict(ck["optimizer"])
            _fix_optimizer_flags(optimizer, flags)
            if scaler.is_enabled() and ck.get("scaler"):
                scaler.load_state_dict(ck["scaler"])
            if fm is not None:
                start_epoch, start_step, global_step = fm["next_epoch"], fm["next_step"], fm["global_step"]
                host = dict(fm["host"])
                if fm["world_size"] == info.world_size:
                    rng_state = fm["rng"][info.rank]
                    meters = fm["meters"][info.rank]
                else:
                    run.say(f"warning: the checkpoint was written by {fm['world_size']} process(es), this run has "
                            f"{info.world_size}: RNG states are re-seeded, so the continuation is not bitwise the "
                            "one an unchanged run would take")
                run.say(f"resumed {args.resume}: epoch {start_epoch}, step {start_step}/{steps_per_epoch} of it, "
                        f"{global_step} optimizer steps done")
            else:
                start_epoch = ck["epoch"] + 1
                global_step = start_epoch * (steps_per_epoch // args.accum_iter)
                run.say(f"resumed {args.resume} (official checkpoint: model, optimizer, scaler): continuing at "
                        f"epoch {start_epoch}")
        else:
            run.say(f"loaded the model of {args.resume} (no optimizer state in it): training from epoch "
                    f"{start_epoch} with a fresh optimizer")
        _check_start(args, start_epoch, start_step, steps_per_epoch, resumed=has_opt)
        if run.main:
            _truncate_logs(run, global_step, start_epoch)
    else:
        _check_start(args, start_epoch, start_step, steps_per_epoch, resumed=False)

    if info.distributed:
        ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
        model = nn.parallel.DistributedDataParallel(model, **ddp_kwargs)  # no find_unused_parameters
    fwd = torch.compile(model) if args.compile else model
    graph_step = None
    if args.cuda_graph:
        graph_step = graph.CUDAGraphStep(model_without_ddp, optimizer,
                                         (args.batch_size, 3, args.input_size, args.input_size),
                                         mask_ratio=args.mask_ratio, amp_dtype=amp_dtype)
    if rng_state is not None:  # last, after everything that draws random numbers at set-up
        ckpt_mod.restore_rng(rng_state, device)

    acc_dtype = torch.float32 if device.type == "mps" else torch.float64
    epoch_sum = torch.zeros((), dtype=acc_dtype, device=device)
    window_sum = torch.zeros((), dtype=acc_dtype, device=device)
    if meters is not None:
        epoch_sum.copy_(meters["epoch_loss_sum"])
        window_sum.copy_(meters["window_loss_sum"])

    # ---------------------------------------------------------------- announce
    steps_per_update = steps_per_epoch // args.accum_iter
    total_steps = steps_per_update * (args.epochs - start_epoch) - start_step // args.accum_iter
    if args.max_steps is not None:
        total_steps = max(0, min(total_steps, args.max_steps - global_step))
    if args.demo:
        run.say(f"no --data_path: the demo. A tiny MAE ({args.model}, {args.input_size}px) on {source}, "
                f"{args.epochs} epochs on {device}")
    else:
        run.say(f"data: {source}")
    run.say(f"writing checkpoints and log.txt to {os.path.abspath(run.out)}" if run.out
            else "no --output_dir: nothing is saved")
    run.say(f"model {args.model} ({sum(p.numel() for p in model_without_ddp.parameters()) / 1e6:.2f} M params), "
            f"{precision}{' autocast' if amp_dtype else ''}{', torch.compile' if args.compile else ''}"
            f"{', CUDA graph' if graph_step else ''}, {info.world_size} process(es)"
            f"{' (' + info.backend + ')' if info.distributed else ''}")
    run.say(f"base lr: {args.lr * 256 / eff_batch_size:.2e}  actual lr: {args.lr:.2e}  accumulate grad iterations: "
            f"{args.accum_iter}  effective batch size: {eff_batch_size}")
    run.say(f"{steps_per_epoch} batches per epoch per process; {total_steps} optimizer steps to run")

    bar = None
    if run.main and not args.no_progress and total_steps > 0 and sys.stderr.isatty():
        try:
            from tqdm import tqdm

            bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True, file=sys.stderr)
        except ImportError:
            bar = None

    sync_debug = args.sync_debug != "off" and device.type == "cuda"

    def sync_debug_mode(on: bool):
        """--sync_debug: flag host syncs in the steps between log points, from the first log point
        on (the first steps autotune kernels and benchmark cuDNN, which synchronise)."""
        if sync_debug:
            torch.cuda.set_sync_debug_mode(args.sync_debug if on and state["warm"] else 0)

    # ---------------------------------------------------------------- log points and checkpoints
    state = {"t_last": time.perf_counter(), "images_last": 0, "images": 0, "lr": float("nan"),
             "global_step": global_step, "last_good": last_good, "warm": False}
    steps_log = os.path.join(run.log_dir, "log_steps.txt") if run.log_dir else None
    epoch_log = os.path.join(run.out, "log.txt") if run.out else None

    def reduce_(*tensors) -> list[float]:
        """The mean over processes of each (device) accumulator: one all-reduce, one transfer."""
        v = torch.stack([t.to(acc_dtype) for t in tensors])
        if info.distributed:
            torch.distributed.all_reduce(v)
            v = v / info.world_size
        return v.tolist()

    def stop_non_finite(what: str, epoch: int) -> TrainResult:
        keep = (f"the last good checkpoint, {state['last_good']}, is kept" if state["last_good"]
                else "no checkpoint had been written")
        run.say(f"error: {what} (epoch {epoch}, optimizer step {state['global_step']}); stopping. The loss is read "
                f"back only at log points (every --log_every={args.log_every} steps) and before checkpoints, so it "
                f"went bad within the last {args.log_every} steps. Nothing was saved after it: {keep}. "
                "Lower --blr, raise --warmup_epochs, or try --precision fp32.")
        if bar is not None:
            bar.close()
        return TrainResult(model_without_ddp, 1, "non-finite", state["global_step"], epoch, 0, run.out)

    def log_point(epoch: int, epoch_step: int) -> float:
        """Read the window's mean loss back (the one transfer) and write its row; returns it."""
        n = host["window_n"]
        if n == 0:
            return 0.0
        (s,) = reduce_(window_sum)
        loss = s / n
        now = time.perf_counter()
        dt = now - state["t_last"]
        imgs = (state["images"] - state["images_last"]) * info.world_size
        state["t_last"], state["images_last"] = now, state["images"]
        window_sum.zero_()
        host["window_n"] = 0
        state["warm"] = True
        if not math.isfinite(loss):
            return loss
        ips = imgs / dt if dt > 0 and imgs else None
        row = {"epoch": epoch, "step": state["global_step"], "epoch_step": epoch_step, "loss": loss,
               "lr": state["lr"], "images_per_s": ips,
               "step_ms": dt * 1e3 * args.accum_iter * args.batch_size * info.world_size / imgs if imgs else None,
               "window_steps": n // args.accum_iter, "time": time.time()}
        if run.main:
            if steps_log:
                _append_jsonl(steps_log, row)
            ips_s = f"{ips:,.1f}" if ips else "n/a"
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{state['lr']:.2e}", img_s=ips_s, refresh=False)
            elif not args.no_progress:
                print(f"  epoch {epoch}  step {state['global_step']}  loss {loss:.4f}  lr {state['lr']:.3e}  "
                      f"{ips_s} img/s", flush=True)
        return loss

    def check_finite() -> tuple[float, str | None]:
        """(the epoch's loss sum, why it or the parameters are not finite, else None): one transfer."""
        finite = torch.stack([torch.isfinite(p).all() for p in model_without_ddp.parameters()]).all()
        es, ok = reduce_(epoch_sum, finite.to(acc_dtype))
        if not math.isfinite(es):
            return es, f"the loss is {es} (not finite)"
        if ok != 1.0:
            return es, "the parameters are not finite (a step overflowed with a finite loss)"
        return es, None

    def save(name: str, next_epoch: int, next_step: int, checked: bool = False) -> str | None:
        """Checkpoint ``name`` once the epoch's losses and the parameters are known finite (``checked``: the
        caller has just made sure with :func:`check_finite`); else why not."""
        if not checked:
            why = check_finite()[1]
            if why:
                return why
        rng = all_gather_objects(info, ckpt_mod.capture_rng(device))
        meters_all = all_gather_objects(info, {"epoch_loss_sum": epoch_sum.detach().cpu(),
                                               "window_loss_sum": window_sum.detach().cpu()})
        if run.main and run.out:
            to_save = {
                "model": model_without_ddp.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": next_epoch - 1,
                "scaler": scaler.state_dict() if scaler.is_enabled() else default_scaler_state,
                "args": ckpt_mod.plain_args(args),
                "fastmae": {
                    "format": ckpt_mod.FORMAT_VERSION, "next_epoch": next_epoch, "next_step": next_step,
                    "global_step": state["global_step"], "steps_per_epoch": steps_per_epoch,
                    "world_size": info.world_size, "batch_size": args.batch_size, "accum_iter": args.accum_iter,
                    "data_seed": args.seed, "dataset_len": len(dataset),
                    "sampler": {"epoch": next_epoch, "start": next_step * args.batch_size,
                                "seed": args.seed, "num_replicas": info.world_size},
                    "rng": rng, "meters": meters_all, "host": dict(host),
                },
            }
            path = os.path.join(run.out, name)
            ckpt_mod.atomic_save(to_save, path)
            state["last_good"] = path
        return None

    # ---------------------------------------------------------------- the loop
    # One loader for the run: the sampler runs in this process (its epoch and start are read when
    # each epoch's iterator starts) and the dataset's epoch reaches persistent workers (fastmae.data)
    loader = data.make_loader(dataset, args.batch_size, sampler=sampler, num_workers=args.num_workers,
                              pin_memory=args.pin_mem and device.type == "cuda",
                              persistent_workers=args.num_workers > 0, drop_last=True)
    # Position: (epoch, data_iter_step) of the next batch to train on.
    status, pos = "done", (start_epoch, start_step)
    t0 = time.perf_counter()
    if total_steps == 0:
        run.say("nothing to do: the run is already complete" if args.max_steps is None or global_step < args.max_steps
                else f"nothing to do: --max_steps {args.max_steps} already reached")
    for epoch in range(start_epoch, args.epochs):
        if args.max_steps is not None and state["global_step"] >= args.max_steps:
            status = "max_steps"
            break
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        s0 = start_step if epoch == start_epoch else 0
        if s0:  # mid-epoch resume: the epoch's accumulators came with the checkpoint
            sampler.set_start(s0 * args.batch_size)
        else:
            host.update(epoch_lr_sum=0.0, epoch_n=0)
            epoch_sum.zero_()
        rng = torch.get_rng_state()
        it = iter(loader)  # the loader draws its base seed from torch's RNG: keep that out of the model's stream
        torch.set_rng_state(rng)
        if graph_step is None:  # a captured step's gradients live in its graph's pool: left as they are
            optimizer.zero_grad(set_to_none=True)
        stopped_mid_epoch = False
        sync_debug_mode(True)
        for data_iter_step in range(s0, steps_per_epoch):
            samples, _ = next(it)
            if data_iter_step % args.accum_iter == 0:  # per-iteration lr, as official
                if graph_step is not None:
                    lr = lr_at(data_iter_step / steps_per_epoch + epoch, args.lr, args.min_lr, args.warmup_epochs,
                               args.epochs)
                    graph_step.set_lr(lr)
                else:
                    lr = adjust_learning_rate(optimizer, data_iter_step / steps_per_epoch + epoch, args)
                state["lr"] = lr
            imgs = data.to_device(samples, device)
            update = (data_iter_step + 1) % args.accum_iter == 0
            if graph_step is not None:
                loss = graph_step.step(imgs)
            else:
                no_sync = model.no_sync() if info.distributed and not update else contextlib.nullcontext()
                with no_sync:
                    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                        loss, _, _ = fwd(imgs, mask_ratio=args.mask_ratio)
                    scaler.scale(loss / args.accum_iter).backward()
                if update:
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
            loss = loss.detach()
            epoch_sum.add_(loss)  # device adds: nothing is read back here
            window_sum.add_(loss)
            host["window_n"] += 1
            host["epoch_n"] += 1
            host["epoch_lr_sum"] += state["lr"]
            state["images"] += args.batch_size
            pos = (epoch, data_iter_step + 1)
            if not update:
                continue
            state["global_step"] += 1
            if bar is not None:
                bar.update(1)
            mid_epoch = data_iter_step + 1 < steps_per_epoch
            at_max = args.max_steps is not None and state["global_step"] >= args.max_steps
            if state["global_step"] % args.log_every == 0 or at_max:
                sync_debug_mode(False)
                loss_v = log_point(epoch, data_iter_step + 1)
                if not math.isfinite(loss_v):
                    return stop_non_finite(f"the loss is {loss_v} (not finite) in the log window", epoch)
                sync_debug_mode(True)
            if mid_epoch and ((args.ckpt_every_steps and state["global_step"] % args.ckpt_every_steps == 0)
                              or at_max):
                sync_debug_mode(False)
                why = save("checkpoint-last.pth", epoch, data_iter_step + 1)
                if why:
                    return stop_non_finite(why + ", checked before writing checkpoint-last.pth", epoch)
                sync_debug_mode(True)
            if at_max:
                status, stopped_mid_epoch = "max_steps", mid_epoch
                break
        sync_debug_mode(False)
        del it
        if stopped_mid_epoch:
            break
        # ------------------------------------------------------------ end of epoch
        loss_v = log_point(epoch, steps_per_epoch)
        if not math.isfinite(loss_v):
            return stop_non_finite(f"the loss is {loss_v} (not finite) in the log window", epoch)
        pos = (epoch + 1, 0)
        # The epoch's row goes into log.txt before its checkpoints: killed in between, the run resumes from
        # the previous checkpoint, whose next_epoch makes _truncate_logs drop the row (never a lost row)
        es, why = check_finite()
        if why:
            return stop_non_finite(why + ", checked before writing the epoch's log row and checkpoints", epoch)
        n = host["epoch_n"]
        if run.main and epoch_log:
            _append_jsonl(epoch_log, {"train_lr": host["epoch_lr_sum"] / n if n else None,
                                      "train_loss": es / n if n else None, "epoch": epoch})
        if run.out:
            if epoch % args.save_every_epochs == 0 or epoch + 1 == args.epochs:
                save(f"checkpoint-{epoch}.pth", epoch + 1, 0, checked=True)
            save("checkpoint-last.pth", epoch + 1, 0, checked=True)
        if status == "max_steps":
            break
    if bar is not None:
        bar.close()
    global_step = state["global_step"]
    run.say(f"{status}: {global_step} optimizer steps in {time.perf_counter() - t0:.1f} s"
            + (f"; last checkpoint {state['last_good']}" if state["last_good"] else ""))
    if run.main and run.out and not args.no_plot and steps_log:
        png = os.path.join(run.out, "loss.png")
        why = write_loss_plot(_read_jsonl(steps_log), png, title=f"fastmae pretrain: {args.model}")
        run.say(f"loss curve: {png}" if why is None else why)
    if run.main and run.out and args.demo and args.synthetic:
        run.say("reconstruction skipped: --synthetic trains on random noise (for measuring the step), and a "
                "reconstruction of noise shows nothing; drop --synthetic for the demo's figure")
    elif run.main and run.out and args.demo:
        from ..visualize import save_reconstruction

        png = os.path.join(run.out, "reconstruction.png")
        model_without_ddp.eval()
        save_reconstruction(model_without_ddp, dataset.samples[0][0], png, mask_ratio=args.mask_ratio, seed=args.seed)
        model_without_ddp.train()
        run.say(f"reconstruction: {png}")
    return TrainResult(model_without_ddp, 0, status, global_step, pos[0], pos[1], run.out)


def _check_resume_fits(fm: dict, args, info: DistInfo, dataset_len: int, steps_per_epoch: int) -> None:
    """A mid-epoch state continues exactly only with the same data order and batches."""
    if fm["next_step"] == 0:
        return
    diffs = []
    for key, now in (("world_size", info.world_size), ("batch_size", args.batch_size),
                     ("accum_iter", args.accum_iter), ("data_seed", args.seed), ("dataset_len", dataset_len),
                     ("steps_per_epoch", steps_per_epoch)):
        if fm[key] != now:
            diffs.append(f"{key} {fm[key]} -> {now}")
    if diffs:
        raise CheckpointError(f"--resume {args.resume}: a mid-epoch checkpoint (epoch {fm['next_epoch']}, step "
                              f"{fm['next_step']}) continues only with the same data order, but " + ", ".join(diffs)
                              + ". Resume from an epoch checkpoint (checkpoint-<epoch>.pth) instead")


def _check_start(args, start_epoch: int, start_step: int, steps_per_epoch: int, resumed: bool) -> None:
    """The run starts at (``start_epoch``, ``start_step``), from ``--start_epoch`` or (``resumed``) from the
    checkpoint: an error unless that is within ``--epochs`` (``start_epoch == --epochs`` at an epoch boundary is
    a complete run: nothing to do)."""
    if start_epoch < args.epochs or (start_epoch == args.epochs and start_step == 0):
        return
    if not resumed:
        raise PretrainError(f"--start_epoch {start_epoch} is past --epochs {args.epochs}: nothing would run; "
                            "lower --start_epoch or raise --epochs")
    if start_step:
        raise PretrainError(f"--resume {args.resume} continues epoch {start_epoch} at step {start_step}/"
                            f"{steps_per_epoch}, but --epochs {args.epochs} ends the run before that epoch: raise "
                            f"--epochs to at least {start_epoch + 1}, or resume from an epoch checkpoint")
    raise PretrainError(f"--resume {args.resume} has {start_epoch} epochs done, more than --epochs {args.epochs}: "
                        f"raise --epochs above {start_epoch} to train on")


def _truncate_logs(run: _Run, global_step: int, next_epoch: int) -> None:
    """Drop log rows the interrupted run wrote after the checkpoint it is resumed from."""
    if run.log_dir:
        p = os.path.join(run.log_dir, "log_steps.txt")
        rows = _read_jsonl(p)
        if os.path.exists(p):  # also drops a line cut short by a kill
            _rewrite_jsonl(p, [r for r in rows if r.get("step", 0) <= global_step])
    if run.out:
        p = os.path.join(run.out, "log.txt")
        rows = _read_jsonl(p)
        if os.path.exists(p):
            _rewrite_jsonl(p, [r for r in rows if r.get("epoch", -1) < next_epoch])


def run(args: argparse.Namespace, command: str | None = None) -> int:
    """``fastmae pretrain`` with parsed ``args``; returns the exit status (2: a configuration error)."""
    from ..backend import BackendUnavailableError

    try:
        return train(args).exit_code
    except (PretrainError, CheckpointError, FileNotFoundError, BackendUnavailableError) as e:
        print(f"fastmae pretrain: error: {e}", file=sys.stderr)
        return 2
