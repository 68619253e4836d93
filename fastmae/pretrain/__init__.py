"""``fastmae pretrain``: MAE pretraining with the official recipe, on one process or under torchrun.

The flags and defaults of the official ``main_pretrain.py`` (facebookresearch/mae), so an
existing launch command works once the program name is changed::

    fastmae pretrain --batch_size 64 --model mae_vit_large_patch16 --norm_pix_loss --mask_ratio 0.75 \\
        --epochs 800 --warmup_epochs 40 --blr 1.5e-4 --weight_decay 0.05 --data_path /data/imagenet
    torchrun --nproc_per_node 8 -m fastmae pretrain ...        # DDP: NCCL on GPUs, gloo on the CPU
    fastmae pretrain                                            # no arguments: the embedded demo

* :mod:`.args`: the command line; :mod:`.engine`: the loop (no host sync per step, see
  its docstring); :mod:`.checkpoint`: atomic checkpoints in the official layout plus the
  state for exact resume; :mod:`.sampler`: a DistributedSampler that resumes mid-epoch;
  :mod:`.lr_sched`: the official warmup + half-cycle cosine; :mod:`.distributed`:
  torchrun's environment.

In Python: ``fastmae.pretrain.main(["--data_path", "/data/imagenet", ...])`` returns the
exit status; ``fastmae.pretrain.train(parse_args([...]))`` returns the trained model too.
"""

from __future__ import annotations

import sys

from .args import DEMO, get_args_parser, parse_args
from .checkpoint import CheckpointError
from .engine import PretrainError, TrainResult, run, train

__all__ = ["main", "parse_args", "get_args_parser", "train", "run", "TrainResult", "PretrainError",
           "CheckpointError", "DEMO"]


def main(argv=None) -> int:
    """``fastmae pretrain`` (``argv`` without the program and subcommand names); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return run(parse_args(argv))
