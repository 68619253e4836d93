"""One CUDA graph per MAE training step: forward, backward and AdamW, captured once, replayed.

A training step of an MAE launches some hundreds of kernels (a few thousand for ViT-H);
eager PyTorch pays the host's dispatch for every one. :class:`CUDAGraphStep` captures
the whole step (autocast forward with the masking noise drawn on the device, backward,
the optimizer's update) into one CUDA graph, so a step costs one input copy and one
graph launch::

    import fastmae
    from fastmae.graph import CUDAGraphStep, adamw

    model = fastmae.mae_vit_base_patch16(norm_pix_loss=True).cuda()
    opt = adamw(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
    step = CUDAGraphStep(model, opt, (256, 3, 224, 224), mask_ratio=0.75)
    for it, (imgs, _) in enumerate(loader):         # drop_last=True: every batch the same shape
        step.set_lr(lr_schedule(it))                # in place: no recapture
        loss = step(imgs)                           # a device tensor; no host sync
        total += loss                               # (read it back, e.g. .item(), only now and then)

What the graph holds, and what that asks of the caller:

* **Static shapes.** The images are copied into a static input buffer of ``imgs_shape``
  (any float dtype and device: a pinned CPU batch is copied asynchronously); another shape
  is a ``ValueError`` (build one ``CUDAGraphStep`` per shape, or drop the last batch).
* **Masking noise** is drawn inside the graph with torch's default CUDA generator, which
  CUDA graphs register: every replay draws fresh noise, and ``torch.manual_seed`` before
  construction reproduces the sequence an eager loop would draw.
* **The optimizer** is ``torch.optim.AdamW`` or ``Adam`` built with ``capturable=True``
  (:func:`adamw` makes one, fused). Each param group's ``lr`` is turned into its own
  one-element device tensor that the graph reads, and :meth:`CUDAGraphStep.set_lr` updates
  in place (times the group's ``lr_scale`` when it has one, as the official
  ``util/lr_sched.py`` does): a learning-rate schedule works without recapture (assigning
  ``group["lr"]`` yourself is caught at the next step, not silently ignored). Other
  hyper-parameters (betas, weight decay) are baked into the graph.
* **Warm-up, and the state it leaves.** Construction runs ``warmup_steps`` eager steps on
  a side stream (lazy initialisation, Triton autotuning, the optimizer's state all happen
  there, as PyTorch's CUDA-graph notes require), captures one step, then puts the
  parameters, the optimizer's state and the CUDA generator back as they were before
  construction: the first :meth:`step` is the model's next training step, exactly as if
  the warm-up had never run.
* **Checkpoints.** Load the optimizer's state before construction (its tensors are what the
  graph updates; ``optimizer.load_state_dict`` afterwards is caught at the next step).
  ``model.load_state_dict`` copies in place and is fine at any time; the model's and the
  optimizer's ``state_dict()`` are read as usual (``lr`` is then a one-element tensor).
* **Outputs are static.** :meth:`step` returns the graph's loss tensor (fp32, 0-dim),
  overwritten by the next step: ``clone()`` it to keep it. The gradients after a step are
  in the parameters' ``.grad`` (also static; each step overwrites them, it does not
  accumulate). Not captured: gradient clipping, gradient accumulation over several
  batches, a ``GradScaler``; fp16 autocast (which needs loss scaling) is therefore refused:
  use bf16 (the default) or fp32 (``amp_dtype=None``).

Only CUDA: without a CUDA device construction raises ``RuntimeError``.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings

import torch

from . import _timing

__all__ = ["CUDAGraphStep", "adamw"]


def adamw(params, lr: float, *, betas=(0.9, 0.95), weight_decay: float = 0.05, eps: float = 1e-8,
          fused: bool = True) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` ready for :class:`CUDAGraphStep`: ``capturable=True`` (and fused).

    ``params``: parameters or param groups (e.g. with and without weight decay, as the
    official ``main_pretrain.py``); the parameters must already be on the CUDA device.
    """
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps,
                             capturable=True, fused=fused)


@contextlib.contextmanager
def _undone(optimizer: torch.optim.Optimizer, device: torch.device):
    """Undo, on exit, what the block did to the optimizer's parameters, its state and the RNG.

    Parameters and pre-existing state tensors are copied back in place (the graph keeps
    pointing at them); state the block created is zeroed, which is Adam's initial state
    (step 0, zero moments); the default generator of ``device`` (CUDA, or the CPU's) gets
    its state back.
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    saved_params = [p.detach().clone() for p in params]
    saved_state = {id(p): {k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v)}
                   for p in params if p in optimizer.state}
    cuda = device.type == "cuda"
    rng = torch.cuda.get_rng_state(device) if cuda else torch.get_rng_state()
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved_params):
                p.copy_(s)
            for p in params:
                before = saved_state.get(id(p), {})
                for k, v in optimizer.state.get(p, {}).items():
                    if not torch.is_tensor(v):
                        continue
                    if k in before:
                        v.copy_(before[k])
                    else:
                        v.zero_()
        if cuda:
            torch.cuda.set_rng_state(rng, device)
        else:
            torch.set_rng_state(rng)


def _check_shape(imgs_shape) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in imgs_shape)
    except (TypeError, ValueError):
        raise TypeError(f"imgs_shape must be a shape (N, C, H, W), got {imgs_shape!r}") from None
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"imgs_shape must be (N, C, H, W) with every size >= 1, got {shape}")
    return shape


class CUDAGraphStep:
    """A whole MAE training step captured as one CUDA graph; see the module docstring.

    Args:
        model: a :class:`fastmae.MaskedAutoencoderViT` (any backend) on a CUDA device; its
            ``norm_pix_loss`` is the loss the graph computes.
        optimizer: ``torch.optim.AdamW`` / ``Adam`` over the model's parameters, built with
            ``capturable=True`` (see :func:`adamw`).
        imgs_shape: ``(N, C, H, W)`` of every batch.
        mask_ratio: the fraction of patches removed (fixed in the graph).
        amp_dtype: the autocast dtype of the forward, ``torch.bfloat16`` (default) or
            ``None`` for fp32 without autocast.
        warmup_steps: eager steps run on a side stream before the capture (undone after).

    Call :meth:`step` (or the object itself) with a batch; :meth:`set_lr` between steps.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, imgs_shape, *,
                 mask_ratio: float = 0.75, amp_dtype: torch.dtype | None = torch.bfloat16, warmup_steps: int = 3):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDAGraphStep captures a training step as a CUDA graph and needs a CUDA device; "
                               "none is available here (train eagerly, or with torch.compile, on the CPU)")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        params = list(model.parameters())
        devices = {p.device for p in params}
        if len(devices) != 1 or next(iter(devices)).type != "cuda":
            raise ValueError(f"model's parameters must all be on one CUDA device, got {sorted(map(str, devices))}; "
                             "move the model with .cuda() before building the optimizer and CUDAGraphStep")
        self.device = next(iter(devices))
        if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            raise TypeError(f"optimizer must be torch.optim.AdamW or Adam, got {type(optimizer).__name__}")
        if not all(g.get("capturable", False) for g in optimizer.param_groups):
            raise ValueError("optimizer must be built with capturable=True to be captured in a CUDA graph, "
                             "e.g. fastmae.graph.adamw(model.parameters(), lr=...)")
        if any(g.get("differentiable", False) for g in optimizer.param_groups):
            raise ValueError("optimizer must not be differentiable=True")
        mine = {id(p) for p in params}
        if any(id(p) not in mine for g in optimizer.param_groups for p in g["params"]):
            raise ValueError("optimizer holds parameters that are not the model's")
        if amp_dtype not in (torch.bfloat16, None):
            raise ValueError(f"amp_dtype must be torch.bfloat16 or None (fp32), got {amp_dtype}: fp16 autocast "
                             "needs loss scaling (GradScaler), which this step does not capture")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps must be an int >= 1, got {warmup_steps!r}")
        self.imgs_shape = _check_shape(imgs_shape)
        self.model, self.optimizer = model, optimizer
        self.mask_ratio, self.amp_dtype = mask_ratio, amp_dtype
        # warm-up images from a private generator: the default one is left to the masking noise
        gen = torch.Generator(device=self.device).manual_seed(0)
        self.static_imgs = torch.randn(self.imgs_shape, device=self.device, generator=gen)
        check = getattr(model, "_check_imgs", None)
        if check is not None:
            check(self.static_imgs)  # channels and image size against the model's
        # every group reads its own device lr: set_lr updates it in place, no recapture. One already
        # there (another CUDAGraphStep's on this optimizer, for another shape) is kept: both graphs
        # read it, and set_lr on either sets both
        for g in optimizer.param_groups:
            lr = g["lr"]
            if not (torch.is_tensor(lr) and lr.device == self.device and lr.dtype == torch.float32 and lr.dim() == 0):
                g["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=self.device)
        self._lrs = [g["lr"] for g in optimizer.param_groups]
        self.graph = torch.cuda.CUDAGraph()
        self.loss = self._capture(warmup_steps)
        self._state = optimizer.state  # replaced by optimizer.load_state_dict: caught in step()

    # ------------------------------------------------------------------ capture
    def _forward_backward_step(self) -> torch.Tensor:
        amp = contextlib.nullcontext() if self.amp_dtype is None else torch.autocast("cuda", dtype=self.amp_dtype)
        with amp:
            loss, _, _ = self.model(self.static_imgs, self.mask_ratio)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def _capture(self, warmup_steps: int) -> torch.Tensor:
        opt = self.optimizer
        with torch.cuda.device(self.device), _undone(opt, self.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), warnings.catch_warnings():
                # "capturable=True but step() runs without capture": only the warm-up does
                warnings.filterwarnings("ignore", message=".*capturable=True.*")
                for _ in range(warmup_steps):
                    opt.zero_grad(set_to_none=True)
                    self._forward_backward_step()
            torch.cuda.current_stream().wait_stream(side)
            # grads None: the captured backward allocates them from the graph's pool and
            # every replay overwrites them
            opt.zero_grad(set_to_none=True)
            # a failed capture is undone in the allocator and reports the step's own error
            loss = _timing._capture(self.graph, None, self._forward_backward_step, [()], 1,
                                    what="capturing the training step")
            # the capture ran nothing; leaving _undone puts back what the warm-up changed
        torch.cuda.synchronize(self.device)
        return loss

    # ------------------------------------------------------------------ use
    def set_lr(self, lr: float) -> None:
        """Set every param group's learning rate to ``lr`` (times its ``lr_scale``, if any), in place."""
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr < 0:
            raise ValueError(f"lr must be a finite float >= 0, got {lr!r}")
        for g, t in zip(self.optimizer.param_groups, self._lrs):  # the tensors the graph reads
            t.fill_(float(lr) * float(g.get("lr_scale", 1.0)))

    def step(self, imgs: torch.Tensor) -> torch.Tensor:
        """One training step on ``imgs``; returns the loss as the graph's static device tensor."""
        if not isinstance(imgs, torch.Tensor):
            raise TypeError(f"imgs must be a torch.Tensor, got {type(imgs).__name__}")
        if tuple(imgs.shape) != self.imgs_shape:
            raise ValueError(f"imgs has shape {tuple(imgs.shape)} but this CUDAGraphStep was captured for "
                             f"{self.imgs_shape}; CUDA graphs have static shapes: build one per shape "
                             "(or drop the last, smaller batch)")
        if not imgs.is_floating_point():
            raise TypeError(f"imgs must be a floating-point tensor, got {imgs.dtype}")
        if self.optimizer.state is not self._state:
            raise RuntimeError("the optimizer's state was replaced after capture (optimizer.load_state_dict?); the "
                               "graph updates the tensors it was captured with: load checkpoints before building "
                               "the CUDAGraphStep (model.load_state_dict after it is fine: it copies in place)")
        if any(g["lr"] is not t for g, t in zip(self.optimizer.param_groups, self._lrs)):
            raise RuntimeError("a param group's 'lr' was replaced after capture; the graph reads the tensor it "
                               "was captured with: change the learning rate with set_lr()")
        self.static_imgs.copy_(imgs, non_blocking=True)
        self.graph.replay()
        return self.loss

    __call__ = step
