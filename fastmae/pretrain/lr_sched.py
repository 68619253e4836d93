"""The official learning-rate recipe (facebookresearch/mae ``util/lr_sched.py``, ``main_pretrain.py``).

* :func:`absolute_lr`: ``lr = blr * eff_batch / 256`` when ``--lr`` is not given, with
  ``eff_batch = batch_size * accum_iter * world_size``;
* :func:`lr_at`: per-iteration linear warmup from 0 over ``warmup_epochs``, then a
  half-cycle cosine from ``lr`` down to ``min_lr`` at ``epochs``. ``epoch`` is fractional:
  the training loop calls it with ``data_iter_step / steps_per_epoch + epoch`` at the start
  of every accumulation cycle, as the official loop does;
* :func:`adjust_learning_rate`: sets it on every param group (scaled by ``lr_scale`` where
  a group has one).

Plain Python floats: setting them costs no device work and no host sync.
"""

from __future__ import annotations

import math

__all__ = ["absolute_lr", "lr_at", "adjust_learning_rate"]


def absolute_lr(lr: float | None, blr: float, eff_batch_size: int) -> float:
    """``lr`` when given, else ``blr * eff_batch_size / 256`` (the official rule)."""
    return float(lr) if lr is not None else blr * eff_batch_size / 256


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """The learning rate at fractional ``epoch``: linear warmup, then half-cycle cosine."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def adjust_learning_rate(optimizer, epoch: float, args) -> float:
    """Set the learning rate of ``optimizer`` for fractional ``epoch`` (official signature); returns it."""
    lr = lr_at(epoch, args.lr, args.min_lr, args.warmup_epochs, args.epochs)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr
    return lr
