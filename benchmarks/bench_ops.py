"""Kernel micro-benchmarks: every op of :mod:`fastmae.ops`, forward and forward + backward, per backend.

Run on a GPU::

    python -m benchmarks.bench_ops                 # all sections, record in benchmarks/results/
    python -m benchmarks.bench_ops --sections attention --out /tmp/rec

Sections:

``ops``        the data-path ops (patchify, unpatchify, random_masking, encoder_input,
               decoder_unshuffle, mae_loss with norm_pix_loss) at the ViT-B/16, ViT-L/16
               and ViT-H/14 shapes, batch 256, bf16 activations and parameters (images
               fp32 for the loss, as they come from the loader), mask ratio 0.75; backends
               torch (stock), triton, ext.
``attention``  ``attention_qkvpacked`` (the model's path) and ``attention`` at the issue-4
               shapes, (B, H, N, D) = (256, 12, 50, 64), (256, 16, 197, 32),
               (128, 16, 65, 80), bf16, for fastmae's backends (triton, ext, xformers) and
               SDPA restricted to each of its kernels (flash, efficient, cudnn, math) with
               ``torch.nn.attention.sdpa_kernel``.
``long``       the same at long sequences, N = 1024, 2048, 4096 with D = 64 and 128
               (B = 16384 / N, H = 2048 / D, the FlashAttention benchmark's sizes); SDPA's
               math kernel is left out there.
``norms``      (not in the default set: ``--sections norms``) ``add_layer_norm`` and
               ``layer_norm`` at the ViT-B encoder shape (12,800 x 768: 256 x 50 visible
               tokens) and the decoder's (50,432 x 512: 256 x 197), as the model uses them:
               activations in ``--dtype`` (bf16), the residual stream and the parameters in
               fp32; ``add_layer_norm(x, residual)`` gives y in bf16 and s in fp32,
               ``layer_norm`` takes the fp32 stream and gives y in bf16. Backends triton,
               ext and torch, which is the stock eager path at the stock dtypes: ``s = x +
               residual`` (fp32 by promotion), ``F.layer_norm(s)`` in fp32 and the cast of y to
               bf16 that autocast makes at the next matmul (see :func:`norm_op_bytes` for
               the floor).
``bias_gelu``  (not in the default set: ``--sections bias_gelu``) the MLP's fc1 bias + exact
               GELU at the ViT-B encoder shape (12,800 x 3072: 256 x 50 visible tokens) and
               the decoder's (50,432 x 2048: 256 x 197): ``bias_gelu`` forward and forward +
               backward, activations in ``--dtype`` (bf16), the bias the fp32 parameter,
               backends triton, ext and torch, which is the stock path ``F.gelu(x +
               bias.to(x.dtype))`` (see :func:`bias_gelu_bytes` for the floor); and
               ``linear_bias_gelu``, the forward of fc1 + bias + GELU from the block's
               input (12,800 x 768 -> 3072, 50,432 x 512 -> 2048), as a fraction of the
               matmul rate: ``F.linear(x, W)`` + fastmae's ``bias_gelu`` (triton, ext), the
               stock ``F.gelu(F.linear(x, W, b))`` (torch), cuBLASLt's bias + GELU epilogue
               ``torch._addmm_activation(b, x, W.t(), use_gelu=True)``
               (``torch:addmm_activation``; its GELU is the tanh approximation on CUDA, so
               it cannot serve the exact-GELU op: measured for the figure only) and the
               matmul with its bias epilogue alone, ``F.linear(x, W, b)`` (``torch:linear``).

Method: two times per case, side by side.

* *eager ms*: each timed call is bracketed by CUDA events and followed by a synchronize;
  the figure is the median of ``--reps`` calls after ``--warmup`` calls (the first of which
  compiles and autotunes). It includes the call's Python dispatch and kernel-launch latency
  (the GPU idles between the start event and the first kernel): what an eager user sees,
  and how the stock baseline (``/work/shared/baseline-h200.md``) was measured, so it is
  the like-for-like figure against that baseline.
* *graph ms*: the same callable, warmed up on a side stream, captured into a CUDA graph
  (``torch.cuda.CUDAGraph``) as whole rotations over the fixed input sets, enough calls
  for about 1 ms a replay (2 to 64), and replayed back to back (at least 15 replays)
  between CUDA events; the figure is the median replay time divided by the calls in it:
  kernel time, to put against the floors. A callable that cannot be captured (a host sync, say) is recorded as
  ``graph_status: "failed"`` with the reason, and the run goes on (``--no-graphs`` skips
  this timing; without CUDA it is skipped).

When one call's inputs fit in twice the L2 cache, several independent input sets are made
and the calls rotate through them, so no call finds its inputs in L2. Forward + backward is
one call (:func:`capture_safe_step`): the op, then ``torch.autograd.grad`` of its output(s)
with a fixed random gradient; the gradients are returned, never accumulated into ``.grad``.

Each time is put against a ceiling measured by this script on the same card in the same
run: the *memory-traffic floor* (the bytes the op must read and write, divided by the
device-to-device copy bandwidth, counted read + write) and, for attention, the *compute
fraction* (the op's FLOPs per second over the rate of an 8192^3 bf16 matmul). Floor bytes
count only what the result depends on: masking reads the kept rows only, the loss reads
only the removed patches, frozen parameters (pos_embed) get no gradient; forward +
backward is the sum of the two passes' floors, each pass reading its own inputs.
Attention FLOPs: forward ``4 B H N^2 D``, backward 2.5x the forward (the FlashAttention
convention, recomputation of the scores included).

Record fields (schema 2) of a measured row: ``ms`` = ``eager_ms``; ``graph_status``
(``ok``/``failed``/``skipped``), ``graph_reason``, ``graph_ms``, ``graph_calls_per_replay``,
``graph_replays``; ``x_floor`` = ``x_floor_eager`` (eager time over the floor) and
``x_floor_graph``; ``tflops``/``frac_matmul`` (eager) and ``tflops_graph``/``frac_matmul_graph``.

A measurement that fails is a row with ``status: "error"`` and its ``reason``; the run goes
on. When the failure left the CUDA context unusable (a kernel that faulted: an illegal or
misaligned address, a device-side assert; every later CUDA call in the process fails with
it), the reason says so, the record gets ``cuda_context_lost`` (the probe's error), and
every later measurement is a ``skipped`` row that names it, rather than a failure of its own.
Run a backend that has never run on the card in its own process (``--backends``) so that
the others' figures are safe from it.

The JSON record (``ops-<card>-<date>.json``) is rewritten after every measurement; a CPU run
(``--device cpu``, tiny shapes, for testing the harness) writes to ``./bench-out`` by
default and is never rendered into RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shlex
import sys
import time
from functools import partial

import torch

from fastmae import _timing, ops
from fastmae.backend import BackendUnavailableError, available_backends
from fastmae.bench import format_table, num

__all__ = ["main", "data_op_bytes", "attention_bytes", "attention_flops", "input_sets_needed", "capture_safe_step",
           "norm_op_bytes"]

MODEL_SHAPES = {
    "vit_b16": dict(img=224, p=16, D=768, Dd=512),
    "vit_l16": dict(img=224, p=16, D=1024, Dd=512),
    "vit_h14": dict(img=224, p=14, D=1280, Dd=512),
}
CPU_SHAPES = {"tiny": dict(img=32, p=4, D=64, Dd=32)}
DATA_OPS = ("patchify", "unpatchify", "random_masking", "encoder_input", "decoder_unshuffle", "mae_loss")
MASK_RATIO = 0.75
# issue 4: (B, H, N, D) as SDPA writes them; fastmae's ops take (B, N, H, D)
ATTENTION_SHAPES = [("encoder ViT-B visible", (256, 12, 50, 64)), ("decoder", (256, 16, 197, 32)),
                    ("encoder ViT-H visible", (128, 16, 65, 80))]
LONG_SHAPES = [(f"N={n} D={d}", (16384 // n, 2048 // d, n, d)) for d in (64, 128) for n in (1024, 2048, 4096)]
CPU_ATTENTION_SHAPES = [("tiny", (4, 2, 17, 16))]
CPU_LONG_SHAPES = [("tiny long", (1, 2, 256, 32))]
SDPA_KERNELS = ("flash", "efficient", "cudnn", "math")
# norms section: (label, rows M, D)
NORM_SHAPES = [("ViT-B encoder", 12800, 768), ("decoder", 50432, 512)]
CPU_NORM_SHAPES = [("tiny", 48, 64)]
NORM_OPS = ("add_layer_norm", "layer_norm")
# bias_gelu section: (label, rows M, fc1 input width K, hidden width H = 4 K)
MLP_SHAPES = [("ViT-B encoder fc1", 12800, 768, 3072), ("decoder fc1", 50432, 512, 2048)]
CPU_MLP_SHAPES = [("tiny", 48, 16, 64)]
MLP_OPS = ("bias_gelu", "linear_bias_gelu")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---------------------------------------------------------------------------- floors
def _dims(s: dict, batch: int) -> dict:
    h = s["img"] // s["p"]
    L = h * h
    return dict(s, N=batch, C=3, L=L, P=3 * s["p"] ** 2, K=int(L * (1 - MASK_RATIO)))


def data_op_bytes(op: str, d: dict, direction: str, es: int) -> int:
    """Bytes ``op`` must read + write at dims ``d`` (from ``_dims``) with ``es``-byte activations.

    ``direction``: ``"fwd"`` or ``"fwd+bwd"`` (the sum of both passes' floors).
    """
    N, C, L, K, D, Dd, P = d["N"], d["C"], d["L"], d["K"], d["D"], d["Dd"], d["P"]
    X = N * C * d["img"] ** 2  # image elements
    f32, i64 = 4, 8
    if op in ("patchify", "unpatchify"):
        fwd = bwd = 2 * X * es
    elif op == "random_masking":
        fwd = N * K * D * es * 2 + N * L * (f32 + i64)
        bwd = N * K * D * es + N * L * i64 + N * L * D * es
    elif op == "encoder_input":
        fwd = N * K * D * es + (1 + L) * D * es + D * es + N * (1 + K) * D * es + N * L * (f32 + i64)
        bwd = N * (1 + K) * D * es + N * L * i64 + N * L * D * es + D * es
    elif op == "decoder_unshuffle":
        fwd = N * (1 + K) * Dd * es + N * L * i64 + Dd * es + (1 + L) * Dd * es + N * (1 + L) * Dd * es
        bwd = N * (1 + L) * Dd * es + N * L * i64 + N * (1 + K) * Dd * es + Dd * es
    elif op == "mae_loss":
        removed = (L - K) / L
        read = int(removed * (X * f32 + N * L * P * es)) + N * L * f32
        fwd = read + f32
        bwd = read + N * L * P * es
    else:
        raise ValueError(op)
    return fwd if direction == "fwd" else fwd + bwd


def attention_bytes(B: int, N: int, H: int, D: int, direction: str, es: int) -> int:
    """Forward: read q, k, v, write o. Backward: read q, k, v, o, dO, write dq, dk, dv."""
    unit = B * N * H * D * es
    return 4 * unit if direction == "fwd" else 12 * unit


def attention_flops(B: int, N: int, H: int, D: int, direction: str) -> float:
    """``4 B H N^2 D`` forward; backward 2.5x forward (FlashAttention's convention)."""
    fwd = 4.0 * B * H * N * N * D
    return fwd if direction == "fwd" else 3.5 * fwd


def norm_op_bytes(op: str, M: int, D: int, direction: str, x_es: int = 2, r_es: int = 4, p_es: int = 4) -> int:
    """Bytes of ``add_layer_norm`` / ``layer_norm`` over ``M`` rows of ``D``: activations (x, y and
    their gradients) of ``x_es`` bytes, the residual stream (residual, s) of ``r_es``, weight and bias
    of ``p_es``; the per-row mean and rstd (fp32) saved for the backward are counted.

    add_layer_norm forward: read x, residual, weight, bias; write y, s, mean, rstd. Backward: read
    dy, ds (the stream's gradient), s, mean, rstd, weight; write dx, d residual, dW, dB.
    layer_norm (x is the fp32 stream, y an activation): forward read x, weight, bias; write y,
    mean, rstd. Backward: read dy, x, mean, rstd, weight; write dx, dW, dB. ``"fwd+bwd"`` is the sum.
    """
    MD, stats = M * D, 2 * M * 4
    if op == "add_layer_norm":
        fwd = MD * (x_es + r_es) + 2 * D * p_es + MD * (x_es + r_es) + stats
        bwd = MD * (x_es + 2 * r_es) + stats + D * p_es + MD * (x_es + r_es) + 2 * D * p_es
    elif op == "layer_norm":
        fwd = MD * r_es + 2 * D * p_es + MD * x_es + stats
        bwd = MD * (x_es + r_es) + stats + D * p_es + MD * r_es + 2 * D * p_es
    else:
        raise ValueError(op)
    return fwd if direction == "fwd" else fwd + bwd


def bias_gelu_bytes(M: int, H: int, direction: str, es: int = 2, bias_es: int = 4) -> int:
    """Bytes of ``bias_gelu`` over an (M, H) pre-activation of ``es``-byte elements and an (H,)
    bias of ``bias_es`` bytes. Forward: read x, bias; write y. Backward: read dy, x, bias; write
    dx, dbias (the kernel's float32 partial sums are overhead, not floor). ``"fwd+bwd"`` is the sum.
    """
    fwd = 2 * M * H * es + H * bias_es
    bwd = 3 * M * H * es + 2 * H * bias_es
    return fwd if direction == "fwd" else fwd + bwd


def linear_bias_gelu_flops(M: int, K: int, H: int) -> float:
    """The fc1 matmul's ``2 M K H`` (the bias and GELU are elementwise, not counted)."""
    return 2.0 * M * K * H


def input_sets_needed(nbytes: int, l2_bytes: int | None, max_sets: int = 16) -> int:
    """How many input sets to rotate through so that no call finds its inputs in L2."""
    if not l2_bytes or nbytes >= 2 * l2_bytes:
        return 1
    return min(max_sets, math.ceil(2 * l2_bytes / max(nbytes, 1)) + 1)


# ---------------------------------------------------------------------------- cases
def capture_safe_step(forward, wrt=(), grad_output: int | None = None, grad: bool = False):
    """The timed callable ``step(*args)`` built from ``forward(*args) -> output``.

    Forward only (``grad`` false): returns ``forward``'s output. Forward + backward: returns
    ``torch.autograd.grad(output, [args[i] for i in wrt], args[grad_output])`` (a fixed
    gradient among the inputs; None for a scalar loss). The gradients are returned, never
    accumulated into ``.grad``, so the step can be called any number of times, or captured
    into a CUDA graph and replayed, with the same result and no state carried between calls.
    """
    if not grad:
        def step(*args):
            return forward(*args)
    else:
        def step(*args):
            out = forward(*args)
            return torch.autograd.grad(out, [args[i] for i in wrt],
                                       None if grad_output is None else args[grad_output])
    return step


def _data_case(op: str, d: dict, direction: str, backend: str, device, dtype):
    """(make_inputs() -> args, step(*args)) for a data-path op (step: see :func:`capture_safe_step`)."""
    N, C, L, K, D, Dd, P, p = d["N"], d["C"], d["L"], d["K"], d["D"], d["Dd"], d["P"], d["p"]
    img = d["img"]
    grad = direction != "fwd"
    kw = dict(device=device, dtype=dtype)

    def leaf(t, rg=grad):
        return t.requires_grad_(rg)

    if op == "patchify":
        def make():
            return (leaf(torch.randn(N, C, img, img, **kw)), torch.randn(N, L, P, **kw))

        def forward(x, g):
            return ops.patchify(x, p, backend=backend)
        wrt, g_at = (0,), 1
    elif op == "unpatchify":
        def make():
            return (leaf(torch.randn(N, L, P, **kw)), torch.randn(N, C, img, img, **kw))

        def forward(x, g):
            return ops.unpatchify(x, p, backend=backend)
        wrt, g_at = (0,), 1
    elif op == "random_masking":
        def make():
            return (leaf(torch.randn(N, L, D, **kw)), torch.randn(N, K, D, **kw))

        def forward(x, g):
            return ops.random_masking(x, MASK_RATIO, backend=backend)[0]
        wrt, g_at = (0,), 1
    elif op == "encoder_input":
        def make():
            return (leaf(torch.randn(N, L, D, **kw)), torch.randn(1, 1 + L, D, **kw),
                    leaf(torch.randn(1, 1, D, **kw)), torch.randn(N, 1 + K, D, **kw))

        def forward(x, pos, cls, g):
            return ops.encoder_input(x, pos, cls, MASK_RATIO, backend=backend)[0]
        wrt, g_at = (0, 2), 3
    elif op == "decoder_unshuffle":
        def make():
            ids = torch.argsort(torch.argsort(torch.rand(N, L, device=device), 1), 1)
            return (leaf(torch.randn(N, 1 + K, Dd, **kw)), ids, leaf(torch.randn(1, 1, Dd, **kw)),
                    torch.randn(1, 1 + L, Dd, **kw), torch.randn(N, 1 + L, Dd, **kw))

        def forward(x, ids, mt, pos, g):
            return ops.decoder_unshuffle(x, ids, mt, pos, backend=backend)
        wrt, g_at = (0, 2), 4
    elif op == "mae_loss":
        def make():
            mask = (torch.argsort(torch.argsort(torch.rand(N, L, device=device), 1), 1) >= K).float()
            return (torch.randn(N, C, img, img, device=device), leaf(torch.randn(N, L, P, **kw)), mask)

        def forward(imgs, pred, mask):
            return ops.mae_loss(imgs, pred, mask, p, True, backend=backend)
        wrt, g_at = (1,), None  # a scalar loss: autograd.grad's implicit gradient of 1
    else:
        raise ValueError(op)
    return make, capture_safe_step(forward, wrt, g_at, grad)


def _sdpa_context(kernel: str | None):
    if kernel is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
          "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[kernel]
    return sdpa_kernel([be])


def _attention_case(op: str, shape, direction: str, backend: str, device, dtype):
    """(make_inputs() -> args, step(*args)) for an attention op; ``backend`` ``"sdpa:<kernel>"``
    restricts SDPA to one kernel (forward and backward)."""
    B, H, N, D = shape
    grad = direction != "fwd"
    sdpa_kernel = backend.split(":", 1)[1] if backend.startswith("sdpa:") else None
    b = "sdpa" if sdpa_kernel else backend
    kw = dict(device=device, dtype=dtype)

    if op == "attention_qkvpacked":
        def make():
            return (torch.randn(B, N, 3, H, D, **kw).requires_grad_(grad), torch.randn(B, N, H, D, **kw))

        def forward(qkv, g):
            return ops.attention_qkvpacked(qkv, backend=b)
        wrt, g_at = (0,), 1
    else:
        def make():
            return tuple(torch.randn(B, N, H, D, **kw).requires_grad_(grad) for _ in range(3)) + (
                torch.randn(B, N, H, D, **kw),)

        def forward(q, k, v, g):
            return ops.attention(q, k, v, backend=b)
        wrt, g_at = (0, 1, 2), 3
    inner = capture_safe_step(forward, wrt, g_at, grad)

    def step(*args):
        with _sdpa_context(sdpa_kernel):  # the backward runs inside it too
            return inner(*args)
    if sdpa_kernel:
        # Harness.measure enters the context once around all the timed calls instead of
        # once a call: entering and leaving costs ~20 us of host time, as much as some of
        # the kernels timed, and only the SDPA rows would pay it.
        step.hoisted = (lambda: _sdpa_context(sdpa_kernel), inner)
    return make, step


def _norm_case(op: str, M: int, D: int, direction: str, backend: str, device, dtype):
    """(make_inputs() -> args, step(*args)) for a norms-section op: x / y in ``dtype``, the stream and
    the parameters fp32. ``backend="torch"``: the stock eager path (x + residual, F.layer_norm in fp32,
    y cast to ``dtype``)."""
    grad = direction != "fwd"
    f32 = dict(device=device, dtype=torch.float32)

    def params():
        return (1 + torch.randn(D, **f32)).requires_grad_(grad), torch.randn(D, **f32).requires_grad_(grad)

    if op == "add_layer_norm":
        def make():
            return (torch.randn(M, D, device=device, dtype=dtype).requires_grad_(grad),
                    torch.randn(M, D, **f32).requires_grad_(grad), *params(),
                    torch.randn(M, D, device=device, dtype=dtype), torch.randn(M, D, **f32))

        def forward(x, r, w, b, gy, gs):
            if backend == "torch":
                s = x + r
                return torch.nn.functional.layer_norm(s, (D,), w, b, 1e-6).to(dtype), s
            return ops.add_layer_norm(x, r, w, b, 1e-6, out_dtype=dtype, backend=backend)

        def fwd_bwd(x, r, w, b, gy, gs):  # both outputs carry a gradient: y's and the stream's
            return torch.autograd.grad(forward(x, r, w, b, gy, gs), (x, r, w, b), (gy, gs))
    elif op == "layer_norm":
        def make():
            return (torch.randn(M, D, **f32).requires_grad_(grad), *params(),
                    torch.randn(M, D, device=device, dtype=dtype))

        def forward(x, w, b, gy):
            if backend == "torch":
                return torch.nn.functional.layer_norm(x, (D,), w, b, 1e-6).to(dtype)
            return ops.layer_norm(x, w, b, 1e-6, out_dtype=dtype, backend=backend)
        fwd_bwd = capture_safe_step(forward, (0, 1, 2), 3, True)
    else:
        raise ValueError(op)
    return make, (fwd_bwd if grad else capture_safe_step(forward))


def _mlp_case(op: str, M: int, K: int, H: int, direction: str, backend: str, device, dtype):
    """(make_inputs() -> args, step(*args)) for a bias_gelu-section op: activations and weights in
    ``dtype``, the bias an fp32 parameter (cast to ``dtype`` where the stock path casts it, as
    autocast does). ``linear_bias_gelu`` is forward only (``_addmm_activation`` has no derivative)."""
    gelu = torch.nn.functional.gelu
    kw = dict(device=device, dtype=dtype)
    if op == "bias_gelu":
        grad = direction != "fwd"

        def make():
            return (torch.randn(M, H, **kw).requires_grad_(grad), torch.randn(H, device=device).requires_grad_(grad),
                    torch.randn(M, H, **kw))

        def forward(x, b, g):
            if backend == "torch":
                return gelu(x + b.to(x.dtype))
            return ops.bias_gelu(x, b, backend=backend)
        return make, capture_safe_step(forward, (0, 1), 2, grad)
    if op == "linear_bias_gelu":
        if direction != "fwd":
            raise ValueError("linear_bias_gelu is measured forward only")

        def make():
            return torch.randn(M, K, **kw), torch.randn(H, K, **kw) * K**-0.5, torch.randn(H, device=device)

        def forward(x, w, b):
            if backend == "torch":
                return gelu(torch.nn.functional.linear(x, w, b.to(x.dtype)))
            if backend == "torch:addmm_activation":
                return torch._addmm_activation(b.to(x.dtype), x, w.t(), use_gelu=True)
            if backend == "torch:linear":
                return torch.nn.functional.linear(x, w, b.to(x.dtype))
            return ops.bias_gelu(torch.nn.functional.linear(x, w), b, backend=backend)
        return make, capture_safe_step(forward)
    raise ValueError(op)


def _nbytes(args) -> int:
    return sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))


# ---------------------------------------------------------------------------- driver
class Harness:
    def __init__(self, device, warmup: int, reps: int, budget: float | None, progress, graphs: bool = True):
        self.device = torch.device(device)
        self.warmup, self.reps, self.budget = warmup, reps, budget
        self.graphs = graphs
        self.t0 = time.perf_counter()
        self.progress = progress
        # the sticky CUDA error that ended this run's measurements (a kernel that faulted):
        # every later CUDA call in the process fails with it, so later measurements are skipped
        self.lost: str | None = None
        self.l2 = None
        if self.device.type == "cuda":
            self.l2 = getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", None) or 50 * 2**20

    def over_budget(self) -> bool:
        return self.budget is not None and time.perf_counter() - self.t0 > self.budget

    def measure(self, make, fn, reps: int | None = None) -> dict:
        """Time ``fn`` on rotated input sets from ``make``, eagerly then as a CUDA graph.

        Returns {"status", "ms" (= "eager_ms"), "ms_min", "sets", "graph_status", ...} or
        {"status", "reason"} when the eager measurement could not be made. A failed graph
        measurement never fails the row: it is recorded as ``graph_status: "failed"`` with
        ``graph_reason``. A ``fn`` with a ``hoisted = (context, inner)`` attribute is timed
        as ``inner`` inside one ``context()`` (see :func:`_attention_case`).
        """
        hoisted = getattr(fn, "hoisted", None)
        if hoisted is not None:
            context, inner = hoisted
            with context():
                return self._measure(make, inner, reps)
        return self._measure(make, fn, reps)

    def context_check(self, reason: str) -> str:
        """``reason`` of a failed measurement, extended when the failure left the CUDA context
        unusable (then :attr:`lost` is set and later measurements are skipped)."""
        if self.lost is not None:
            return reason
        lost = _timing.cuda_context_lost(self.device)
        if lost is None:
            return reason
        self.lost = lost
        return f"{reason}; then the CUDA context was lost ({lost}): the later measurements of this run are skipped"

    def _skip_reason(self) -> str | None:
        if self.lost is not None:
            return f"CUDA context lost earlier in this run ({self.lost})"
        if self.over_budget():
            return f"time budget of {self.budget:g} s spent"
        return None

    def _measure(self, make, fn, reps: int | None) -> dict:
        skip = self._skip_reason()
        if skip is not None:
            return {"status": "skipped", "reason": skip}
        sets = []
        reps = reps or self.reps
        try:
            first = make()
            n = input_sets_needed(_nbytes(first), self.l2)
            sets = [first] + [make() for _ in range(n - 1)]
            times = _timing.time_calls(fn, self.device, iters=reps, warmup=self.warmup, args_cycle=sets)
            ms = _timing.median(times)
            m = {"status": "ok", "ms": ms, "eager_ms": ms, "ms_min": min(times), "sets": len(sets)}
        except (BackendUnavailableError, ImportError) as e:
            return {"status": "unavailable", "reason": str(e)}
        except torch.OutOfMemoryError as e:
            return {"status": "oom", "reason": str(e).splitlines()[0][:200]}
        except RuntimeError as e:
            msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            low = str(e).lower()
            status = "unsupported" if ("no available kernel" in low or "no viable backend" in low) else "error"
            return {"status": status, "reason": self.context_check(msg)}
        except Exception as e:
            msg = str(e).splitlines()[0][:300] if str(e) else ""
            return {"status": "error", "reason": self.context_check(f"{type(e).__name__}: {msg}")}
        finally:
            self.free_cache()
        try:
            m.update(self.measure_graph(fn, sets, ms, reps))
        finally:
            del sets
            self.free_cache()
        return m

    def free_cache(self) -> None:
        """Return cached blocks to the device between measurements; a failure here must not stop the run."""
        if self.device.type == "cuda":
            try:
                torch.cuda.empty_cache()
            except Exception:
                pass

    def measure_graph(self, fn, sets, eager_ms: float, reps: int) -> dict:
        """``fn`` over ``sets`` captured into a CUDA graph: {"graph_status", "graph_ms", ...}; never raises."""
        if not self.graphs:
            return {"graph_status": "skipped", "graph_reason": "--no-graphs"}
        if self.device.type != "cuda":
            return {"graph_status": "skipped", "graph_reason": "no CUDA device"}
        skip = self._skip_reason()
        if skip is not None:
            return {"graph_status": "skipped", "graph_reason": skip}
        try:
            calls = _timing.graph_calls(len(sets), eager_ms)
            replays = max(15, math.ceil(reps / calls))
            self.progress.step(f"graph ({calls} calls x {replays} replays)")
            times = _timing.time_graph(fn, self.device, replays, args_cycle=sets, calls_per_replay=calls)
            return {"graph_status": "ok", "graph_ms": _timing.median(times), "graph_ms_min": min(times),
                    "graph_calls_per_replay": calls, "graph_replays": replays}
        except Exception as e:  # a capture failure (or anything else) must not stop the run
            # is the device still usable? say so in the record if not
            return {"graph_status": "failed", "graph_reason": self.context_check(_timing._first_line(e))}


def _unavailable(backend: str, device) -> str | None:
    base = backend.split(":", 1)[0]
    if base in ("torch", "sdpa"):
        return None
    if base in available_backends(device, attention=True):
        return None
    from fastmae.backend import resolve

    try:
        resolve(base, torch.device(device), attention=True)
    except Exception as e:
        return str(e)
    return f"{base} is not available"


def run_sections(args, device, dtype, ceilings, record, save, progress):
    gpu = torch.device(device).type == "cuda"
    h = Harness(device, args.warmup, args.reps, args.time_budget, progress, graphs=args.graphs)
    bw = ceilings["copy"]["gbps"] * 1e9
    peak = ceilings["matmul"]["tflops"] * 1e12
    es = torch.empty((), dtype=dtype).element_size()
    backends = args.backends

    def row(section, op, label, shape, backend, direction, m, floor_bytes=None, flops=None):
        r = {"section": section, "op": op, "shape_label": label, "shape": list(shape), "dtype": args.dtype,
             "backend": backend, "direction": direction, **m}
        if floor_bytes is not None:
            r["floor_bytes"] = floor_bytes
            r["floor_ms"] = floor_bytes / bw * 1e3
        if flops is not None:
            r["flops"] = flops
        # "x_floor", "tflops", "frac_matmul": from the eager time (what the baseline doc compares);
        # the "_graph" figures from the CUDA-graph time (kernel time, no launch latency)
        for suffix, key in (("", "ms"), ("_eager", "ms"), ("_graph", "graph_ms")):
            if m.get("status") != "ok" or not m.get(key):
                continue
            if floor_bytes is not None:
                r["x_floor" + suffix] = m[key] / r["floor_ms"]
            if flops is not None and suffix != "_eager":
                r["tflops" + suffix] = flops / (m[key] * 1e-3) / 1e12
                r["frac_matmul" + suffix] = flops / (m[key] * 1e-3) / peak
        record["results"].append(r)
        if h.lost is not None and "cuda_context_lost" not in record:
            # this row's measurement left the context unusable: marked, for gpu_summary to name it
            record["cuda_context_lost"] = h.lost
            r["cuda_context_lost_here"] = True
        save()  # after every measurement: a run cut short by a timeout keeps what it measured

    def measure(backend, case, **kw) -> dict:
        """``h.measure`` of the (make, fn) that ``case()`` builds, or why ``backend`` cannot run."""
        why = _unavailable(backend, device)
        return {"status": "unavailable", "reason": why} if why else h.measure(*case(), **kw)

    def ops_section():
        shapes = {m: (MODEL_SHAPES if gpu else CPU_SHAPES)[m] for m in args.models}
        for model, s in shapes.items():
            d = _dims(s, args.batch)
            for op in DATA_OPS:
                for backend in [b for b in backends if b in ("torch", "triton", "ext")]:
                    for direction in ("fwd", "fwd+bwd"):
                        progress.start(f"ops {model} {op} {backend} {direction}")
                        m = measure(backend, partial(_data_case, op, d, direction, backend, device, dtype))
                        shape = (d["N"], d["img"], d["p"], d["D"], d["Dd"])
                        row("ops", op, model, shape, backend, direction, m,
                            floor_bytes=data_op_bytes(op, d, direction, es))
                        progress.finish_task()

    att_backends = [b for b in backends if b in ("triton", "ext", "xformers")]

    def attention_section(section, shape_list, kernels):
        sdpa = [f"sdpa:{k}" for k in kernels] if "sdpa" in backends else []
        for label, shape in shape_list:
            B, H, N, D = shape
            if args.attention_batch:
                B = args.attention_batch
            shape = (B, H, N, D)
            for op, names in (("attention_qkvpacked", att_backends + sdpa), ("attention", att_backends)):
                for backend in names:
                    for direction in ("fwd", "fwd+bwd"):
                        progress.start(f"{section} {label} {op} {backend} {direction}")
                        m = measure(backend, partial(_attention_case, op, shape, direction, backend, device, dtype),
                                    reps=None if N <= 1024 else max(args.reps // 2, 5))
                        row(section, op, label, shape, backend, direction, m,
                            floor_bytes=attention_bytes(B, N, H, D, direction, es),
                            flops=attention_flops(B, N, H, D, direction))
                        progress.finish_task()

    def norms_section():
        for label, M, D in NORM_SHAPES if gpu else CPU_NORM_SHAPES:
            for op in NORM_OPS:
                for backend in [b for b in backends if b in ("torch", "triton", "ext")]:
                    for direction in ("fwd", "fwd+bwd"):
                        progress.start(f"norms {label} {op} {backend} {direction}")
                        m = measure(backend, partial(_norm_case, op, M, D, direction, backend, device, dtype))
                        row("norms", op, label, (M, D), backend, direction, m,
                            floor_bytes=norm_op_bytes(op, M, D, direction, x_es=es))
                        progress.finish_task()

    def mlp_section():
        for label, M, K, H in MLP_SHAPES if gpu else CPU_MLP_SHAPES:
            ours = [b for b in backends if b in ("torch", "triton", "ext")]
            for backend in ours:
                for direction in ("fwd", "fwd+bwd"):
                    progress.start(f"bias_gelu {label} {backend} {direction}")
                    m = measure(backend, partial(_mlp_case, "bias_gelu", M, K, H, direction, backend, device, dtype))
                    row("bias_gelu", "bias_gelu", label, (M, H), backend, direction, m,
                        floor_bytes=bias_gelu_bytes(M, H, direction, es))
                    progress.finish_task()
            for backend in ours + (["torch:addmm_activation", "torch:linear"] if "torch" in backends else []):
                progress.start(f"linear_bias_gelu {label} {backend} fwd")
                m = measure(backend, partial(_mlp_case, "linear_bias_gelu", M, K, H, "fwd", backend, device, dtype))
                row("bias_gelu", "linear_bias_gelu", label, (M, K, H), backend, "fwd", m,
                    flops=linear_bias_gelu_flops(M, K, H))
                progress.finish_task()

    sections = {
        "ops": ops_section,
        "bias_gelu": mlp_section,
        "norms": norms_section,
        "attention": partial(attention_section, "attention", ATTENTION_SHAPES if gpu else CPU_ATTENTION_SHAPES,
                             SDPA_KERNELS),
        "long": partial(attention_section, "long", LONG_SHAPES if gpu else CPU_LONG_SHAPES,
                        tuple(k for k in SDPA_KERNELS if k != "math")),
    }
    for section in args.sections:  # in the order given: the first gets the time budget first
        sections[section]()


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def _times(x) -> str:
    return "" if x is None else f"{x:.1f}x"


def render(record: dict) -> str:
    env, cei, cfg = record["env"], record["ceilings"], record["config"]
    out = [f"fastmae bench_ops on {env['card']} | torch {env['torch']} | triton {env['triton']} | "
           f"commit {env['git_commit'][:12]} | {env['date']}",
           f"ceilings measured in this run: copy {num(cei['copy']['gbps'])} GB/s (read + write), "
           f"matmul {num(cei['matmul']['tflops'])} TFLOP/s ({cei['matmul']['dtype']} {cei['matmul']['n']}^3)",
           f"eager ms: median of {cfg['reps']} calls after {cfg['warmup']} warm-up, each between CUDA events and "
           f"synchronised (wall clock on the CPU), dispatch and launch latency included as in the stock baseline;",
           "graph ms: the same calls captured into a CUDA graph, median over replays (kernel time); "
           "'x floor' = time / memory-traffic floor"]
    for section in ("ops", "attention", "long", "norms", "bias_gelu"):
        rows = [r for r in record["results"] if r["section"] == section]
        if not rows:
            continue
        out += ["", f"[{section}]"]
        table = []
        for r in rows:
            shape = r["shape_label"] + ("" if section == "ops" else f" {tuple(r['shape'])}")
            if r["status"] == "ok":
                gs = r.get("graph_status", "skipped")
                graph = num(r.get("graph_ms")) if gs == "ok" else gs
                why = r.get("graph_reason", "")
                note = "" if gs == "ok" or why == "no CUDA device" else f"graph {gs}: {why}"[:100]
                table.append([r["op"], shape, r["backend"], r["direction"], num(r.get("eager_ms", r["ms"])), graph,
                              num(r.get("floor_ms")), _times(r.get("x_floor_graph")), _times(r.get("x_floor")),
                              num(r.get("tflops_graph"), na=""), num(r.get("tflops"), na=""),
                              _pct(r.get("frac_matmul_graph")), note])
            else:
                table.append([r["op"], shape, r["backend"], r["direction"], r["status"], "", "", "", "", "", "", "",
                              r["reason"][:100]])
        out.append(format_table(["op", "shape", "backend", "direction", "eager ms", "graph ms", "floor ms",
                                 "x floor graph", "x floor eager", "TFLOP/s graph", "TFLOP/s eager",
                                 "of matmul graph", "note"], table, right=set(range(4, 12))))
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_ops", description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", default="ops,attention,long",
                   help="comma-separated from ops, attention, long, norms, bias_gelu, run in the order given "
                        "(default: ops,attention,long)")
    p.add_argument("--models", default=None, help="for the ops section (default vit_b16,vit_l16,vit_h14; tiny on CPU)")
    p.add_argument("--batch", type=int, default=None,
                   help="images per batch for the ops section (default 256; 8 on CPU)")
    p.add_argument("--attention-batch", type=int, default=None, help="override B of the attention shapes")
    p.add_argument("--backends", default=None,
                   help="comma-separated from torch, triton, ext, xformers, sdpa (default: all on a GPU, "
                        "torch,sdpa on CPU)")
    p.add_argument("--dtype", choices=tuple(_DTYPES), default="bf16")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 5; 2 on CPU)")
    p.add_argument("--reps", type=int, default=None, help="timed calls, median reported (default 30; 5 on CPU)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds; later measurements are skipped")
    p.add_argument("--no-graphs", dest="graphs", action="store_false",
                   help="skip the CUDA-graph timing (eager times only)")
    p.add_argument("--device", default=None, help="cuda (default) or cpu (tiny shapes: a test of the harness)")
    p.add_argument("--out", default=None, help="folder for the JSON record (default benchmarks/results on a GPU, "
                                               "./bench-out on CPU)")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    if gpu and not torch.cuda.is_available():
        print("bench_ops: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if not gpu and args.device is None:
        print("bench_ops: no CUDA device; this is a GPU harness. Run with --device cpu for a smoke test of the "
              "harness at tiny shapes (its times mean nothing).", file=sys.stderr)
        return 2
    args.sections = list(dict.fromkeys(s.strip() for s in args.sections.split(",") if s.strip()))
    args.models = [m.strip() for m in args.models.split(",")] if args.models else list(
        MODEL_SHAPES if gpu else CPU_SHAPES)
    table = MODEL_SHAPES if gpu else CPU_SHAPES
    bad = [s for s in args.sections if s not in ("ops", "attention", "long", "norms", "bias_gelu")] + [
        m for m in args.models if m not in table]
    args.backends = [b.strip() for b in args.backends.split(",")] if args.backends else (
        ["torch", "triton", "ext", "xformers", "sdpa"] if gpu else ["torch", "sdpa"])
    bad += [f"{b} (now called 'ext')" if b == "cuda" else b
            for b in args.backends if b not in ("torch", "triton", "ext", "xformers", "sdpa")]
    if bad:
        print(f"bench_ops: unknown section/model/backend {bad}", file=sys.stderr)
        return 2
    args.batch = args.batch or (256 if gpu else 8)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 2)
    args.reps = args.reps if args.reps is not None else (30 if gpu else 5)
    out_dir = args.out or (os.path.join(os.path.dirname(os.path.abspath(__file__)), "results") if gpu else "bench-out")
    dtype = _DTYPES[args.dtype]

    env = _timing.environment(device, shlex.join(["python", "-m", "benchmarks.bench_ops", *argv]))
    ceilings = {"copy": _timing.copy_bandwidth(device), "matmul": _timing.matmul_rate(device, torch.bfloat16)}
    record = {"kind": "ops", "schema": 2, "env": env, "ceilings": ceilings,
              "config": {"sections": args.sections, "models": args.models, "batch": args.batch,
                         "dtype": args.dtype, "warmup": args.warmup, "reps": args.reps, "backends": args.backends,
                         "mask_ratio": MASK_RATIO, "time_budget": args.time_budget, "graphs": args.graphs},
              "results": []}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"ops-{_timing.slug(env['card'])}-{env['timestamp']}.json")

    def save():
        _timing.write_json(path, record)

    progress = _timing.ProgressBar(_count_tasks(args, gpu), enabled=not args.quiet)
    run_sections(args, device, dtype, ceilings, record, save, progress)
    progress.close()
    save()
    print(render(record))
    measured = [r for r in record["results"] if r["status"] == "ok"]
    counts = {k: sum(r.get("graph_status") == k for r in measured) for k in ("ok", "failed", "skipped")}
    print(f"\ngraph timing: {counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped "
          f"of {len(measured)} eager measurements")
    if record.get("cuda_context_lost"):
        print(f"bench_ops: the CUDA context was lost ({record['cuda_context_lost']}); the measurements after the "
              "first failure were skipped (see its row)", file=sys.stderr)
    print(f"wrote {path}")
    return 1 if any(r["status"] in ("error", "oom") for r in record["results"]) else 0


def _count_tasks(args, gpu: bool) -> int:
    n = 0
    if "ops" in args.sections:
        n += len(args.models) * len(DATA_OPS) * 2 * len([b for b in args.backends if b in ("torch", "triton", "ext")])
    att = len([b for b in args.backends if b in ("triton", "ext", "xformers")])
    sd = "sdpa" in args.backends
    if "attention" in args.sections:
        n += len(ATTENTION_SHAPES if gpu else CPU_ATTENTION_SHAPES) * 2 * (2 * att + (4 if sd else 0))
    if "long" in args.sections:
        n += len(LONG_SHAPES if gpu else CPU_LONG_SHAPES) * 2 * (2 * att + (3 if sd else 0))
    if "norms" in args.sections:
        n += len(NORM_SHAPES if gpu else CPU_NORM_SHAPES) * len(NORM_OPS) * 2 * len(
            [b for b in args.backends if b in ("torch", "triton", "ext")])
    if "bias_gelu" in args.sections:
        nb = len([b for b in args.backends if b in ("torch", "triton", "ext")])
        n += len(MLP_SHAPES if gpu else CPU_MLP_SHAPES) * (3 * nb + (2 if "torch" in args.backends else 0))
    return max(n, 1)


if __name__ == "__main__":
    raise SystemExit(main())
