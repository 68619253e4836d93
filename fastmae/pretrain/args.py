"""The ``fastmae pretrain`` command line: the official ``main_pretrain.py`` flags, plus fastmae's.

The official flags keep their names and defaults (facebookresearch/mae, ``main_pretrain.py``),
so an existing launch command works once the program name is changed. Two defaults differ,
both where the official one cannot run:

* ``--data_path`` has no default (the official one is a path on Meta's cluster). Without it,
  ``fastmae pretrain`` with **no arguments at all**, or with ``--demo``, runs the embedded
  demo (:data:`DEMO`): a tiny model on the photographs shipped inside scikit-image /
  matplotlib; anything else asks for ``--data_path``.
* ``--device`` defaults to ``cuda`` when there is a CUDA device and to ``cpu`` otherwise
  (official: ``cuda`` always). ``--device cuda`` without one is a clear error.
"""

from __future__ import annotations

import argparse

__all__ = ["get_args_parser", "parse_args", "DEMO", "PRECISIONS"]

PRECISIONS = ("bf16", "fp16", "fp32")

# The embedded demo: sized to finish in well under a minute on 2 CPU cores (~30 s of CPU time measured here),
# lr = 3e-2 * 8 / 256 ~ 9.4e-4 (the official blr is for batches of 4096; this is 200 steps of 8 images).
DEMO = dict(
    model="mae_vit_tiny_patch8", input_size=64, batch_size=8, epochs=20, warmup_epochs=2,
    blr=3e-2, norm_pix_loss=True, num_workers=1, log_every=5, save_every_epochs=20,
    ckpt_every_steps=50,
)


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _non_negative(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def get_args_parser(demo: bool = False, add_help: bool = True,
                    prog: str = "fastmae pretrain") -> argparse.ArgumentParser:
    """The parser; ``demo=True`` makes :data:`DEMO` the defaults (what ``--demo`` does)."""
    p = argparse.ArgumentParser(
        prog=prog, add_help=add_help,
        description="MAE pretraining with the official recipe (main_pretrain.py flags and defaults) on fastmae's "
                    "model and data pipeline; runs under torchrun. With no arguments: a tiny demo on embedded "
                    "photographs, written to ./output_dir.")
    p.add_argument("--batch_size", default=64, type=_positive,
                   help="batch size per GPU (effective batch size is batch_size * accum_iter * # gpus)")
    p.add_argument("--epochs", default=400, type=_positive)
    p.add_argument("--accum_iter", default=1, type=_positive,
                   help="accumulate gradient iterations (to increase the effective batch size under memory limits)")
    p.add_argument("--model", default="mae_vit_large_patch16", type=str, metavar="MODEL", help="name of model to train")
    p.add_argument("--input_size", default=224, type=_positive, help="images input size")
    p.add_argument("--mask_ratio", default=0.75, type=float, help="masking ratio (fraction of removed patches)")
    p.add_argument("--norm_pix_loss", action="store_true",
                   help="use (per-patch) normalized pixels as targets for computing loss")
    p.set_defaults(norm_pix_loss=False)
    # optimizer
    p.add_argument("--weight_decay", type=float, default=0.05, help="weight decay (default: 0.05)")
    p.add_argument("--lr", type=float, default=None, metavar="LR", help="learning rate (absolute lr)")
    p.add_argument("--blr", type=float, default=1e-3, metavar="LR",
                   help="base learning rate: absolute_lr = base_lr * total_batch_size / 256")
    p.add_argument("--min_lr", type=float, default=0.0, metavar="LR",
                   help="lower lr bound for cyclic schedulers that hit 0")
    p.add_argument("--warmup_epochs", type=_non_negative, default=40, metavar="N", help="epochs to warmup LR")
    # data and outputs
    p.add_argument("--data_path", default=None, type=str,
                   help="ImageNet-style folder (<data_path>/train/<class>/*.JPEG), a folder of class folders or "
                        "a flat folder of images. No default: without it, --demo runs on embedded photographs")
    p.add_argument("--output_dir", default="./output_dir", help="where checkpoints and log.txt go, empty for no saving")
    p.add_argument("--log_dir", default="./output_dir", help="where the per-step log (log_steps.txt) goes")
    p.add_argument("--device", default=None,
                   help="cuda or cpu (default: cuda when there is a CUDA device, else cpu; under torchrun each "
                        "process takes cuda:LOCAL_RANK)")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--resume", default="", help="resume from checkpoint (fastmae's or an official one; a path, or "
                                                "an https:// URL fetched into torch.hub's cache, as officially)")
    p.add_argument("--start_epoch", default=0, type=_non_negative, metavar="N", help="start epoch")
    p.add_argument("--num_workers", default=10, type=_non_negative)
    p.add_argument("--pin_mem", action="store_true",
                   help="pin CPU memory in DataLoader for more efficient (sometimes) transfer to GPU")
    p.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    p.set_defaults(pin_mem=True)
    # distributed: torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) decides;
    # these are accepted for compatibility with the official launch commands
    p.add_argument("--world_size", default=1, type=int,
                   help="number of distributed processes (torchrun's WORLD_SIZE decides)")
    p.add_argument("--local_rank", default=-1, type=int)
    p.add_argument("--dist_on_itp", action="store_true")
    p.add_argument("--dist_url", default="env://", help="url used to set up distributed training")

    g = p.add_argument_group("fastmae")
    g.add_argument("--demo", action="store_true",
                   help="the embedded demo's settings as defaults (what no arguments at all runs): "
                        + ", ".join(f"{k}={v}" for k, v in DEMO.items()))
    g.add_argument("--backend", default=None,
                   help="fastmae ops backend for the model: auto, torch (stock), triton, ext (default: the process "
                        "default, see fastmae.set_backend)")
    g.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="bf16: bf16 autocast (default on CUDA); fp16: fp16 autocast with a GradScaler; "
                        "fp32: no autocast (default on the CPU, where it is also what exact resume is tested with)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--cuda_graph", action="store_true",
                   help="capture the whole step (forward, backward, AdamW) in a CUDA graph (fastmae.graph); "
                        "CUDA only, accum_iter 1, one process")
    g.add_argument("--dist_backend", choices=("auto", "nccl", "gloo"), default="auto",
                   help="torch.distributed backend (auto: nccl on CUDA, gloo on the CPU)")
    g.add_argument("--log_every", default=20, type=_positive,
                   help="optimizer steps between log points: the only places the loss is read back to the host")
    g.add_argument("--ckpt_every_steps", default=1000, type=_non_negative,
                   help="optimizer steps between rolling checkpoint-last.pth writes (0: only at epoch ends)")
    g.add_argument("--save_every_epochs", default=20, type=_positive,
                   help="checkpoint-<epoch>.pth every N epochs and at the last epoch (official: 20)")
    g.add_argument("--on_corrupt", choices=("skip", "raise"), default="skip",
                   help="unreadable images: skip with a warning and count them, or stop with an error")
    g.add_argument("--max_steps", default=None, type=_positive,
                   help="stop after this many optimizer steps in total (smoke runs, tests); the state is saved "
                        "to checkpoint-last.pth so --resume continues exactly")
    g.add_argument("--synthetic", action="store_true",
                   help="random uint8 images generated in memory instead of --data_path: no decode, for measuring "
                        "the training step against fastmae bench (not for training)")
    g.add_argument("--synthetic_size", default=100_000, type=_positive,
                   help="images per epoch of the --synthetic dataset (64 distinct ones, cycled; default 100000)")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    g.add_argument("--no_plot", action="store_true", help="no loss-curve PNG at the end")
    g.add_argument("--sync_debug", choices=("off", "warn", "error"), default="off",
                   help="CUDA: torch.cuda.set_sync_debug_mode around the steps between log points, to prove "
                        "that no step syncs the host")
    if demo:
        p.set_defaults(**DEMO)
    return p


def parse_args(argv) -> argparse.Namespace:
    """Parse ``argv``; no arguments at all, or ``--demo``, give the demo's defaults."""
    argv = list(argv)
    demo = not argv or "--demo" in argv
    args = get_args_parser(demo=demo).parse_args(argv)
    args.demo = demo
    return args
