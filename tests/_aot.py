"""Compile fastmae's Triton kernels for NVIDIA GPUs ahead of time, on a machine without one.

The CPU tests run the kernels through the Triton interpreter, which accepts code that the
GPU compiler rejects (non-constexpr block shapes, ``tl.dot`` shape or dtype limits, bad
casts, loop-carried type changes, pointer arithmetic type mix-ups, ...). Triton compiles
for any NVIDIA target without a device: ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))`` runs the whole pipeline down to a cubin with the
``ptxas`` bundled in the wheel. This module does that for every kernel launch fastmae's
ops make, in steps that run in separate processes, because the interpreter is a
process-wide switch read when a kernel is decorated:

1. ``capture`` (``TRITON_INTERPRET=1``): run each op forward and backward on CPU tensors
   over its code paths (dtypes, layouts, MAE shapes). Launches are *recorded, not run*,
   so MAE-sized shapes cost nothing. The host side is put in its GPU state: the kernel
   modules' ``interpreting()`` answers False (block-size heuristics) and their plain
   module constants take the values of a non-interpreter import (e.g. a block size that
   is smaller under the interpreter). A launch is recorded as the kernel, each argument
   (a tensor as its dtype and whether its address is 16-byte aligned, a scalar as its
   value) and, for an autotuned kernel, which autotuner launched it (its interpreter
   config is dropped: the GPU configs replace it in step 2).
2. ``plan`` (interpreter off, so the autotuners hold their GPU configs): expand each
   autotuned launch over its autotuner's ``configs`` and bind the arguments with Triton's
   own JIT binder for the target, which gives exactly the signature, constexprs and
   specialisation (``tt.divisibility`` of pointers and ints, ints equal to 1 made
   constants) that a real launch with these arguments compiles; dedupe on that key. By
   default the jobs are thinned to a covering set (see :func:`_select`); ``full`` keeps
   them all.
3. ``compile`` (interpreter off, a pool of processes): ``triton.compile`` each job for
   its targets (sm_90; one job a kernel also for sm_80) and read registers, spills and
   serialised wgmma from ptxas' verbose log and shared memory from the kernel's metadata.

``python tests/_aot.py report [--full] [--json out.json]`` runs them all and prints a
table; ``tests/test_sm90_compile.py`` runs them under pytest, one test per job.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Every module of fastmae/kernels: a new kernel there that no scenario below launches
# fails test_every_kernel_is_captured.
KERNEL_MODULES = sorted(f"fastmae.kernels.{p.stem}" for p in (REPO / "fastmae" / "kernels").glob("*.py")
                        if p.stem != "__init__")  # fmt: skip

# capability -> name: sm_90 is H100/H200, sm_80 A100.
TARGETS = {90: "sm90", 80: "sm80"}
# Opt-in dynamic shared memory per block (bytes): 227 KiB on sm_90, 163 KiB on sm_80. A
# kernel above it compiles but fails to launch (an autotuner skips such a config).
MAX_SHARED = {90: 232448, 80: 166912}

# MAE attention shapes: encoder N = 1 + 49 (ViT-B/L at mask 0.75) or 1 + 64 (ViT-H/14),
# decoder N = 197 or 257 (224 px, patch 16 or 14), and a long sequence beyond the one-tile
# paths; head dims of ViT-S/B/L/H, the decoders, the tiny bench model (8, 16) and others
# up to fastmae.ops.TRITON_ATTENTION_MAX_HEAD_DIM.
ATTN_N = (50, 65, 197, 257, 1024)
ATTN_D = (8, 16, 32, 64, 80, 96, 128)
ATTN_DTYPES = ("float32", "float16", "bfloat16")


def _subprocess_env(interpret: bool) -> dict:
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1" if interpret else "0"
    # The GPU machine's Triton fuses multiply-adds by default; say so (silences 3.9's warning).
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def source_hash(full: bool) -> str:
    """Key of a plan: the kernels' and ops' sources, this file, triton's and torch's versions."""
    h = hashlib.sha256()
    for path in sorted((REPO / "fastmae").rglob("*.py")) + [Path(__file__).resolve()]:
        h.update(str(path.relative_to(REPO)).encode())
        h.update(path.read_bytes())
    try:  # the imported modules' versions (a triton on PYTHONPATH shadows the venv's, see the Makefile)
        import torch
        import triton

        h.update(f"triton={triton.__version__} torch={torch.__version__}".encode())
    except Exception:
        pass
    h.update(b"full" if full else b"core")
    return h.hexdigest()


# =========================================================================== 1. capture
def _encode(v):
    import torch

    if isinstance(v, torch.Tensor):
        return {"tensor": str(v.dtype).removeprefix("torch."), "align16": v.data_ptr() % 16 == 0,
                "shape": list(v.shape), "stride": list(v.stride())}  # fmt: skip
    if v is None or isinstance(v, (bool, int, float, str)):
        return {"value": v}
    raise TypeError(f"cannot record a kernel argument of type {type(v).__name__}: {v!r}")


def _owner_name(obj) -> tuple[str, str]:
    """(module, attribute) under which a kernel module holds ``obj``."""
    for mod in KERNEL_MODULES:
        for name, val in vars(sys.modules[mod]).items():
            if val is obj:
                return mod, name
    raise LookupError(f"{obj!r} is not a module-level object of {KERNEL_MODULES}")


def _is_simple(v) -> bool:
    if isinstance(v, (tuple, list)):
        return all(_is_simple(x) for x in v)
    return v is None or isinstance(v, (bool, int, float, str))


def module_constants() -> dict:
    """{module: {name: value}}: the plain module-level values (ints, strings, ...) of the
    kernel modules as imported here. Some differ under the interpreter (e.g. a block size
    chosen for CPU speed); capture takes the GPU ones from a process without it."""
    out = {}
    for mod in KERNEL_MODULES:
        m = importlib.import_module(mod)
        out[mod] = {k: v for k, v in vars(m).items() if not k.startswith("__") and _is_simple(v)}
    return out


@contextlib.contextmanager
def recording(records: list, gpu_constants: dict | None = None):
    """Within this context (interpreter on) kernel launches are appended to ``records``, not run."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction

    tuners = []  # (autotuner, kwargs its caller passed)
    tag = {"scenario": None}
    orig_tuner_run, orig_fn_run = Autotuner.run, InterpretedFunction.run

    def tuner_run(self, *args, **kwargs):
        tuners.append((self, set(kwargs)))
        try:
            return orig_tuner_run(self, *args, **kwargs)
        finally:
            tuners.pop()

    def fn_run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return None
        tuner = None
        if tuners:
            t, caller_kwargs = tuners[-1]
            inner = t.fn
            while not isinstance(inner, InterpretedFunction):
                inner = inner.fn
            if inner is self:
                tuner = _owner_name(t)[1]
                # drop what the (interpreter's) config added: the GPU configs replace it
                kwargs = {k: v for k, v in kwargs.items() if k in caller_kwargs}
        names = self.arg_names
        params = {n: _encode(a) for n, a in zip(names, args)}
        params.update({k: _encode(v) for k, v in kwargs.items() if k in names})
        options = {k: v for k, v in kwargs.items() if k not in names}
        records.append({
            "kernel": f"{self.fn.__module__}:{self.fn.__name__}",
            "tuner": tuner,
            "params": params,
            "positional": len(args),  # the autotuner's prune hook sees these as named_args
            "options": options,
            "scenario": tag["scenario"],
        })
        return None

    Autotuner.run, InterpretedFunction.run = tuner_run, fn_run
    # Host-side heuristics (block sizes) take their GPU branch, module constants their GPU values.
    patched = []
    for mod in KERNEL_MODULES:
        m = importlib.import_module(mod)
        if hasattr(m, "interpreting"):
            patched.append((m, "interpreting", m.interpreting))
            m.interpreting = lambda: False
        for name, value in (gpu_constants or {}).get(mod, {}).items():
            old = getattr(m, name, None)
            if _is_simple(old) and old != value and not (isinstance(old, (list, tuple)) and list(old) == value):
                patched.append((m, name, old))
                setattr(m, name, value)
                tag.setdefault("overridden", []).append(f"{mod}.{name}: {old!r} -> {value!r}")
    try:
        yield tag
    finally:
        Autotuner.run, InterpretedFunction.run = orig_tuner_run, orig_fn_run
        for m, name, old in patched:
            setattr(m, name, old)


def _scenarios():
    """Yield (name, thunk): each thunk runs ops forward and backward on CPU tensors.

    The launches are recorded, not run, so outputs are garbage and shapes can be the real ones.
    """
    import torch

    from fastmae import ops, reference
    from fastmae.kernels import patchify as kp

    f32, f16, bf16, f64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
    T = "triton"

    def rnd(*shape, dtype=f32, grad=True):  # values are never read: no kernel runs
        return torch.empty(shape, dtype=dtype).requires_grad_(grad)

    def backward(*outs):
        outs = [o for o in outs if o.requires_grad]
        torch.autograd.backward(outs, [torch.empty_like(o) for o in outs])

    # ---------------------------------------------------------------- patchify / unpatchify
    # 224 px images: the real strides, hence the real divisibility specialisation.
    for p, hw in ((16, 224), (14, 224)):
        for dt in (f32, f16, bf16, f64):

            def run(p=p, hw=hw, dt=dt):
                backward(ops.patchify(rnd(2, 3, hw, hw, dtype=dt), p, backend=T))
                backward(ops.unpatchify(rnd(2, (hw // p) ** 2, p * p * 3, dtype=dt), p, backend=T))

            yield f"patchify p={p} {dt}", run

    def channels_last():
        imgs = rnd(2, 3, 224, 224, grad=False).to(memory_format=torch.channels_last).requires_grad_(True)
        backward(ops.patchify(imgs, 16, backend=T))

    yield "patchify channels_last", channels_last
    for src, dst in ((f32, bf16), (f32, f16), (bf16, f32), (f16, f32)):

        def run(src=src, dst=dst):
            backward(kp.patchify(rnd(2, 3, 224, 224, dtype=src), 16, out_dtype=dst))
            backward(kp.unpatchify(rnd(2, 196, 768, dtype=src), 16, out_dtype=dst))

        yield f"patchify out_dtype {src}->{dst}", run

    # ------------------------------------------------------------------------ mae_loss
    def mae_mask(N, L, kind=f32):
        m = (torch.rand(N, L).argsort(1) >= L // 4).float()
        return m.bool() if kind is torch.bool else m

    loss_dtypes = ((f32, f32), (f32, f16), (f32, bf16), (f16, f16), (bf16, bf16), (f64, f64))
    for p, hw in ((16, 224), (14, 224)):
        for norm in (False, True):
            for imgs_dt, pred_dt in loss_dtypes:

                def run(p=p, hw=hw, norm=norm, imgs_dt=imgs_dt, pred_dt=pred_dt):
                    L = (hw // p) ** 2
                    imgs = rnd(2, 3, hw, hw, dtype=imgs_dt, grad=False)
                    pred = rnd(2, L, p * p * 3, dtype=pred_dt)
                    backward(ops.mae_loss(imgs, pred, mae_mask(2, L), p, norm, backend=T))

                yield f"mae_loss p={p} norm={norm} imgs={imgs_dt} pred={pred_dt}", run

    def loss_bool_mask_channels_last():
        imgs = rnd(2, 3, 224, 224, grad=False).to(memory_format=torch.channels_last)
        backward(ops.mae_loss(imgs, rnd(2, 196, 768), mae_mask(2, 196, torch.bool), 16, True, backend=T))

    yield "mae_loss bool mask, channels_last imgs", loss_bool_mask_channels_last

    # ------------------------------------------------- random_masking / encoder_input
    for L in (196, 256):
        for dt in (f32, f16, bf16, f64):
            for noise_dt in (None, f32, f16, bf16, f64):

                def run(L=L, dt=dt, noise_dt=noise_dt):
                    noise = None if noise_dt is None else torch.rand(2, L).to(noise_dt)
                    x, _, _ = ops.random_masking(rnd(2, L, 768, dtype=dt), 0.75, noise, backend=T)
                    backward(x)

                yield f"random_masking L={L} x={dt} noise={noise_dt}", run
        encoder_dtypes = (
            (f32, f32, f32), (f16, f16, f16), (bf16, bf16, bf16), (f64, f64, f64),
            (f16, f32, f32), (bf16, f32, f32), (f32, f16, f16), (f16, f16, f32),
        )  # fmt: skip
        for x_dt, p_dt, c_dt in encoder_dtypes:
            for noise in (False, True):

                def run(L=L, x_dt=x_dt, p_dt=p_dt, c_dt=c_dt, noise=noise):
                    x, pos, cls = rnd(2, L, 768, dtype=x_dt), rnd(1, 1 + L, 768, dtype=p_dt), rnd(1, 1, 768, dtype=c_dt)
                    n = torch.rand(2, L) if noise else None
                    out, _, _ = ops.encoder_input(x, pos, cls, 0.75, n, backend=T)
                    backward(out)

                yield f"encoder_input L={L} x={x_dt} pos={p_dt} cls={c_dt} noise={noise}", run

    # ------------------------------------------------------------- decoder_unshuffle
    unshuffle_dtypes = ((f32, f32, f32), (f16, f16, f16), (bf16, bf16, bf16), (f64, f64, f64), (bf16, f32, f32))
    for L in (196, 256):
        for x_dt, m_dt, p_dt in unshuffle_dtypes:
            for ids_dt in (torch.int64, torch.int32):
                for with_pos in (True, False):

                    def run(L=L, x_dt=x_dt, m_dt=m_dt, p_dt=p_dt, ids_dt=ids_dt, with_pos=with_pos):
                        _, _, ids = reference.random_masking(torch.randn(2, L, 1), 0.75)
                        keep = reference.num_kept(L, 0.75)
                        x, mt = rnd(2, 1 + keep, 512, dtype=x_dt), rnd(1, 1, 512, dtype=m_dt)
                        pos = rnd(1, 1 + L, 512, dtype=p_dt) if with_pos else None
                        backward(ops.decoder_unshuffle(x, ids.to(ids_dt), mt, pos, backend=T))

                    pos_dt = p_dt if with_pos else None
                    yield f"decoder_unshuffle L={L} x={x_dt} mask={m_dt} pos={pos_dt} ids={ids_dt}", run

    # ------------------------------------------------------------------- attention
    for dt_name in ATTN_DTYPES:
        dt = getattr(torch, dt_name)
        for N in ATTN_N:
            for D in ATTN_D:
                for packed in (True, False):

                    def run(dt=dt, N=N, D=D, packed=packed):
                        B, H = 2, 4
                        if packed:
                            backward(ops.attention_qkvpacked(rnd(B, N, 3, H, D, dtype=dt), backend=T))
                        else:
                            q, k, v = (rnd(B, N, H, D, dtype=dt) for _ in range(3))
                            backward(ops.attention(q, k, v, backend=T))

                    yield f"attention{'_qkvpacked' if packed else ''} N={N} D={D} {dt_name}", run

    # ------------------------------------------------------------------- bias + GELU
    # MLP fc1 outputs, rows x 4D at batch 256: ViT-B encoder (256 x 50 visible tokens, 3072),
    # the decoder (256 x 197, 2048), ViT-L / ViT-H encoders (4096, 5120 at 256 x 65), the
    # bench's tiny model and odd widths; the model under autocast (bf16 / fp16 activations,
    # fp32 bias), one dtype throughout, an fp32 activation with an fp16 bias.
    bg_shapes = ((12800, 3072), (50432, 2048), (12800, 4096), (16640, 5120), (18, 256), (197, 100), (3, 40), (1, 8))
    bg_dtypes = ((bf16, f32), (f16, f32), (f32, f32), (bf16, bf16), (f16, f16), (f32, f16))
    for M, H in bg_shapes:
        for x_dt, b_dt in bg_dtypes:

            def run(M=M, H=H, x_dt=x_dt, b_dt=b_dt):
                backward(ops.bias_gelu(rnd(M, H, dtype=x_dt), rnd(H, dtype=b_dt), backend=T))

            yield f"bias_gelu M={M} H={H} x={x_dt} bias={b_dt}", run

    def bg_layouts():
        # x with its last dim strided (a transposed view) and a row slice at an odd offset;
        # a stride-0 (expanded) gradient
        xt = rnd(3072, 256, dtype=bf16, grad=False).t().requires_grad_(True)
        backward(ops.bias_gelu(xt, rnd(3072), backend=T))
        xs = rnd(200, 2049, dtype=bf16, grad=False)[1:, 1:].requires_grad_(True)
        y = ops.bias_gelu(xs, rnd(2048), backend=T)
        torch.autograd.backward([y], [torch.empty((), dtype=bf16).expand(y.shape)])

    yield "bias_gelu strided x, expanded grad", bg_layouts

    # ------------------------------------------------------------ (add +) layer norm
    # MAE rows x D: ViT-B encoder (256 x 50 visible tokens, 768), decoder (256 x 197, 512),
    # ViT-L / ViT-H encoders (1024, 1280), the bench's tiny model, and the ends of the D range.
    ln_shapes = ((12800, 768), (50432, 512), (12800, 1024), (16640, 1280), (18, 64), (3, 8), (197, 2048), (7, 100))
    # (x, residual, weight/bias, out_dtype, residual_dtype): the model under autocast (bf16 / fp16
    # sublayer output, fp32 stream and parameters), one dtype throughout, an fp32 stream with y in
    # bf16, float64, residual None.
    ln_dtypes = ((bf16, f32, f32, bf16, f32), (f16, f32, f32, f16, f32), (f32, f32, f32, f32, f32),
                 (bf16, bf16, bf16, bf16, bf16), (f16, f16, f16, f16, f16), (f32, f32, f32, bf16, f32),
                 (f64, f64, f64, f64, f64), (bf16, None, f32, bf16, f32), (f32, None, f32, bf16, f32))  # fmt: skip
    for M, D in ln_shapes:
        for x_dt, r_dt, w_dt, out_dt, res_dt in ln_dtypes:

            def run(M=M, D=D, x_dt=x_dt, r_dt=r_dt, w_dt=w_dt, out_dt=out_dt, res_dt=res_dt):
                x, w, b = rnd(M, D, dtype=x_dt), rnd(D, dtype=w_dt), rnd(D, dtype=w_dt)
                r = None if r_dt is None else rnd(M, D, dtype=r_dt)
                backward(*ops.add_layer_norm(x, r, w, b, out_dtype=out_dt, residual_dtype=res_dt, backend=T))
                backward(ops.layer_norm(rnd(M, D, dtype=res_dt), w, b, out_dtype=out_dt, backend=T))

            yield f"add_layer_norm M={M} D={D} x={x_dt} res={r_dt} w={w_dt} out={out_dt} s={res_dt}", run

    def ln_layouts():
        # strided rows and last dim, no weight / bias, only y's gradient
        x = rnd(4, 60, 1536, dtype=bf16, grad=False)[:, 1:, ::2].requires_grad_(True)
        r = rnd(60, 4, 768, grad=False).transpose(0, 1)[:, 1:].requires_grad_(True)
        y, s = ops.add_layer_norm(x, r, None, None, backend=T)
        backward(y)
        backward(ops.layer_norm(x, rnd(768), None, backend=T))

    yield "add_layer_norm strided, no weight/bias", ln_layouts

    # ------------------------------------------------------------ image normalisation
    # uint8 batches from fastmae.data (256 x 3 x 224 x 224, contiguous after the pinned copy),
    # every output dtype; channels-last, a crop view at an odd offset, 1 and 4 channels.
    def u8(*shape):
        return torch.empty(shape, dtype=torch.uint8)

    mean3, std3 = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for out_dt in (f32, bf16, f16, f64):

        def run(out_dt=out_dt):
            ops.normalize_images(u8(256, 3, 224, 224), mean3, std3, out_dtype=out_dt, backend=T)

        yield f"normalize_images 256x3x224x224 out={out_dt}", run

    def norm_layouts():
        ops.normalize_images(u8(8, 3, 224, 224).to(memory_format=torch.channels_last), mean3, std3, backend=T)
        ops.normalize_images(u8(8, 3, 227, 229)[:, :, 1:, 3:], mean3, std3, out_dtype=bf16, backend=T)
        ops.normalize_images(u8(8, 1, 64, 64), (0.5,), (0.25,), backend=T)
        ops.normalize_images(u8(8, 4, 64, 64), (0.5,) * 4, (0.25,) * 4, out_dtype=f16, backend=T)

    yield "normalize_images channels_last, crop view, 1 and 4 channels", norm_layouts


def capture(gpu_constants: dict | None = None) -> tuple[list[dict], list[str]]:
    """(every launch the scenarios make, the module constants overridden with their GPU
    values); this process must run the interpreter."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError("capture needs TRITON_INTERPRET=1 set before triton is imported")
    import torch

    torch.manual_seed(0)
    records: list = []
    with recording(records, gpu_constants) as tag:
        for name, run in _scenarios():
            tag["scenario"] = name
            run()
    return records, tag.get("overridden", [])


# ============================================================================= 2. plan
class _FakeTensor:
    """A recorded tensor argument: what Triton's JIT binder reads of it (dtype, address
    alignment) and what an autotuner's prune hook may (shape, strides)."""

    def __init__(self, dtype: str, align16: bool, shape=(), stride=()):
        import torch

        self.dtype = getattr(torch, dtype)
        self._ptr = 1 << 20 if align16 else (1 << 20) + 8
        self.shape = torch.Size(shape)
        self._stride = tuple(stride)

    def data_ptr(self) -> int:
        return self._ptr

    def stride(self, dim=None):
        return self._stride if dim is None else self._stride[dim]

    def element_size(self) -> int:
        return self.dtype.itemsize

    def dim(self) -> int:
        return len(self.shape)


def _kernel(name: str):
    mod, attr = name.split(":")
    return getattr(importlib.import_module(mod), attr)


def _decode(params: dict) -> dict:
    return {k: _FakeTensor(v["tensor"], v["align16"], v.get("shape", ()), v.get("stride", ())) if "tensor" in v
            else v["value"] for k, v in params.items()}  # fmt: skip


_BINDERS: dict = {}


def _specialize(kernel_name: str, params: dict, options: dict, capability: int):
    """Triton's JIT binder run on these arguments for ``sm_<capability>``:
    ``(fn, backend, kwargs, bound args, specialisation, options)``."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _kernel(kernel_name)
    if (kernel_name, capability) not in _BINDERS:
        backend = make_backend(GPUTarget("cuda", capability, 32))
        _BINDERS[kernel_name, capability] = backend, create_function_from_signature(fn.signature, fn.params, backend)
    backend, binder = _BINDERS[kernel_name, capability]
    kwargs = dict(_decode(params), **options)
    # as JITFunction.run does
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):  # triton >= 3.7; 3.6 (the GPU machine's) lacks it
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    bound, spec, opts = binder(**kwargs)
    return fn, backend, kwargs, bound, spec, opts


def bind(kernel_name: str, params: dict, options: dict, capability: int):
    """What ``JITFunction.run`` would compile for these arguments on ``sm_<capability>``:
    ``(fn, signature, constexprs, attrs, options)``."""
    fn, backend, kwargs, bound, spec, opts = _specialize(kernel_name, params, options, capability)
    options_, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    return fn, signature, constexprs, attrs, options_


def _job_key(kernel_name: str, params: dict, options: dict) -> tuple[str, list]:
    """(dedupe key: the JIT cache key on sm_90, specialisation of each runtime argument)."""
    fn, _, _, _, spec, opts = _specialize(kernel_name, params, options, 90)
    pattern = [[p.name, str(s)] for p, s in zip(fn.params, spec) if not p.is_constexpr]
    return f"{kernel_name}|{spec}|{sorted(opts.items())}", pattern


def _short_dtype(name: str) -> str:
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int64": "i64",
            "int32": "i32", "uint8": "u8", "bool": "i1"}.get(name, name)  # fmt: skip


def _label(kernel: str, params: dict, options: dict) -> str:
    """Readable job name: kernel, pointer dtypes, constexpr arguments, warps/stages."""
    fn = _kernel(kernel)
    dtypes = [_short_dtype(params[p.name]["tensor"]) for p in fn.params if "tensor" in params.get(p.name, {})]
    dts = dtypes[0] if len(set(dtypes)) == 1 else ",".join(dtypes)
    consts = [f"{p.name}={params[p.name]['value']}" for p in fn.params if p.is_constexpr and p.name in params]
    ws = f"w{options.get('num_warps', 4)}s{options.get('num_stages', 3)}"
    return "-".join([kernel.split(":")[1], dts, *consts, ws])


def _config_kwargs(cfg) -> tuple[dict, dict]:
    """(constexpr kwargs, launch options) of a triton.Config."""
    kw = cfg.all_kwargs()
    consts = dict(cfg.kwargs)
    return consts, {k: v for k, v in kw.items() if k not in consts}


def _est_seconds(job: dict) -> float:
    """Rough compile time on this class of machine (ordering and thinning only)."""
    p = {k: v.get("value") for k, v in job["params"].items()}
    if "DOT_PRECISION" not in p:
        return 0.35
    bm, bn, bd = p.get("BLOCK_M") or p.get("BLOCK_N") or 64, p.get("BLOCK_N") or 64, p.get("BLOCK_D") or 64
    k = 20.0 if p.get("DOT_PRECISION") == "ieee" else 3.0  # fp32: fma dots, unrolled
    return 0.5 + k * bm * bn * bd / 2**20


def _features(job: dict) -> set:
    fn = _kernel(job["kernel"])
    f = {("dt", _label(job["kernel"], job["params"], {}).split("-")[1])}
    f |= {("spec", name, s) for name, s in job["pattern"]}
    params = job["params"]
    f |= {("const", p.name, params[p.name]["value"]) for p in fn.params if p.is_constexpr and p.name in params}
    f |= {("opt", k, job["options"].get(k)) for k in ("num_warps", "num_stages")}
    if "config" in job:
        f.add(("cfg", job["config"]))
    return f


def _head_dim(job: dict) -> int:
    return job["params"].get("HEAD_DIM", {}).get("value") or 0


def _greedy_cover(cands: list[dict], reqs: dict) -> list[dict]:
    """A small subset of ``cands`` meeting every requirement in ``reqs`` (job key -> set).

    Greedy: among jobs estimated under 3 s, the one meeting most new requirements (ties:
    the widest head dim, then the cheapest); then, for what only slow jobs meet (fp32
    attention), the most new requirements per estimated second."""
    todo = set().union(*reqs.values()) if reqs else set()
    chosen = []

    def pick(pool, score):
        while todo and pool:
            best = max(pool, key=score)
            if not reqs[best["key"]] & todo:
                return
            chosen.append(best)
            todo.difference_update(reqs[best["key"]])

    pick([j for j in cands if _est_seconds(j) < 3.0],
         lambda j: (len(reqs[j["key"]] & todo), _head_dim(j), -_est_seconds(j)))  # fmt: skip
    pick(cands, lambda j: len(reqs[j["key"]] & todo) / _est_seconds(j))
    return chosen


def _select(group: list[dict]) -> tuple[list[dict], list[dict]]:
    """(core jobs, the sm_80 subset of them) of one kernel's (or one autotuner's) jobs.

    core: every value of every feature at least once (pointer dtypes, each constexpr,
    warps, stages, each argument's specialisation, each autotune config), and the pairs
    (pointer dtypes, launch constexpr) -- for an autotuned kernel only the tile shapes
    (``BLOCK_*``) -- that a job under 3 s has: fp32 attention compiles its dots as
    unrolled FMAs, 3-25 s a config, so it gets one job per autotuner here and the rest in
    ``full``. sm_80: one job, the cheapest.
    """
    feats = {j["key"]: _features(j) for j in group}
    cfg_names = {n for j in group for n in j.get("cfg_consts", ())}
    tuned = bool(cfg_names) or any("config" in j for j in group)
    reqs = {}
    for j in group:
        f = feats[j["key"]]
        r = set(f)
        if _est_seconds(j) < 3.0:
            dt = next(x for x in f if x[0] == "dt")
            r |= {(dt, x) for x in f if x[0] == "const" and x[1] not in cfg_names
                  and (not tuned or x[1].startswith("BLOCK_"))}  # fmt: skip
        reqs[j["key"]] = r
    core = _greedy_cover(group, reqs)
    return core, [min(core, key=_est_seconds)]


def launchable_kernels() -> list[str]:
    """The module-level ``@triton.jit`` functions of the kernel modules that no other one
    calls: the kernels (the rest are device-side helpers)."""
    import inspect

    from triton.runtime.jit import JITFunction

    fns = {}
    for mod in KERNEL_MODULES:
        for v in vars(importlib.import_module(mod)).values():
            if isinstance(v, JITFunction) and v.fn.__module__ == mod:
                fns[f"{mod}:{v.fn.__name__}"] = inspect.getsource(v.fn)
    called = {k for k in fns for other, s in fns.items() if other != k and re.search(rf"\b{k.split(':')[1]}\s*\(", s)}
    return sorted(set(fns) - called)


def _tuned_configs(tuner, rec: dict) -> list:
    """[(index in tuner.configs, config)] that ``tuner.run`` would benchmark for this launch:
    all of them, less what its ``prune_configs_by`` hooks drop."""
    configs = list(enumerate(tuner.configs))
    if len(configs) > 1 and (getattr(tuner, "early_config_prune", None) or getattr(tuner, "perf_model", None)):
        args = _decode(rec["params"])
        names = list(rec["params"])
        tuner.nargs = {n: args[n] for n in names[: rec["positional"]]}
        try:
            kept = tuner.prune_configs({n: args[n] for n in names[rec["positional"] :]})
        finally:
            tuner.nargs = None
        configs = [(i, c) for i, c in configs if any(c is k for k in kept)]
    return configs


def plan(records: list[dict], full: bool = False) -> list[dict]:
    """Compile jobs for ``records`` (this process must not run the interpreter)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("plan needs the interpreter off (TRITON_INTERPRET=0)")
    jobs: dict[str, dict] = {}  # dedupe key -> job

    def add(kernel, params, options, scenario, extra=None):
        key, pattern = _job_key(kernel, params, options)
        job = jobs.get(key)
        if job is None:
            job = jobs[key] = {"kernel": kernel, "params": params, "options": options, "key": key,
                               "pattern": pattern, "scenarios": [], **(extra or {})}  # fmt: skip
        if scenario not in job["scenarios"] and len(job["scenarios"]) < 6:
            job["scenarios"].append(scenario)

    for rec in records:
        kernel, params, options = rec["kernel"], rec["params"], rec["options"]
        if rec["tuner"] is None:
            add(kernel, params, options, rec["scenario"])
            continue
        tuner = getattr(importlib.import_module(kernel.split(":")[0]), rec["tuner"])
        shape = None  # the launch itself, whatever the config: its key under its first config
        tuned = _tuned_configs(tuner, rec)
        for i, cfg in tuned:
            consts, cfg_opts = _config_kwargs(cfg)
            p = dict(params, **{k: {"value": v} for k, v in consts.items()})
            o = dict(options, **cfg_opts)
            shape = shape or hashlib.sha1(_job_key(kernel, p, o)[0].encode()).hexdigest()[:12]
            extra = {"tuner": rec["tuner"], "config": i, "n_configs": len(tuned), "cfg_consts": sorted(consts)}
            add(kernel, p, o, rec["scenario"], dict(extra, shape=shape))

    groups: dict = {}
    for job in jobs.values():
        groups.setdefault((job["kernel"], job.get("tuner")), []).append(job)
    for group in groups.values():
        group.sort(key=lambda j: j["key"])
        core, sm80 = _select(group)
        core_keys, sm80_keys = {j["key"] for j in core}, {j["key"] for j in sm80}
        for j in group:
            j["tier"] = "core" if j["key"] in core_keys else "full"
            j["targets"] = [90, 80] if j["key"] in sm80_keys else [90]

    out = []
    seen: dict[str, int] = {}
    for key in sorted(jobs, key=lambda k: (jobs[k]["kernel"], k)):
        job = jobs[key]
        if not full and job["tier"] != "core":
            continue
        label = _label(job["kernel"], job["params"], job["options"])
        n = seen[label] = seen.get(label, 0) + 1
        # launches differing only in specialisation (alignment, ints == 1 or % 16) share a label
        job["id"] = label if n == 1 else f"{label}-{hashlib.sha1(key.encode()).hexdigest()[:6]}"
        out.append(job)
    return out


# ========================================================================== 3. compile
def triton_api_missing() -> list[str]:
    """The Triton internals this module uses that the installed triton lacks (checked
    against 3.9 and 3.6; other versions may name them differently)."""
    needed = {
        "triton.runtime.jit": ["create_function_from_signature", "JITFunction._pack_args"],
        "triton.runtime.interpreter": ["InterpretedFunction.run"],
        "triton.runtime.autotuner": ["Autotuner.run", "Config.all_kwargs"],
        "triton.backends.compiler": ["GPUTarget"],
        "triton.backends.nvidia.compiler": ["get_ptxas"],
        "triton.compiler": ["ASTSource", "make_backend"],
        "triton": ["compile", "knobs.compilation.listener"],
    }
    missing = []
    for mod, names in needed.items():
        try:
            m = importlib.import_module(mod)
        except Exception:  # noqa: BLE001
            missing.append(mod)
            continue
        for name in names:
            obj = m
            try:
                for part in name.split("."):
                    obj = getattr(obj, part)
            except AttributeError:
                missing.append(f"{mod}.{name}")
    return missing


def ptxas_available() -> tuple[bool, str]:
    """(whether triton's NVIDIA backend can assemble cubins here, why not)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        for cc in TARGETS:
            subprocess.run([get_ptxas(cc).path, "--version"], check=True, capture_output=True)
        return True, ""
    except Exception as e:  # noqa: BLE001
        return False, f"triton's NVIDIA backend cannot run ptxas here: {e!r}"


_PTXAS_RE = {
    "regs": r"Used (\d+) registers",
    "stack": r"(\d+) bytes stack frame",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
}


def _parse_ptxas_log(log: str) -> dict:
    """Registers, stack frame and spills per thread from ``ptxas -v``; ``wgmma_serialized``:
    ptxas had to serialise the sm_90 warpgroup MMAs for want of registers (C7512)."""
    out = {k: int(m[1]) for k, rx in _PTXAS_RE.items() if (m := re.search(rx, log))}
    out["wgmma_serialized"] = "wgmma.mma_async instructions are serialized" in log
    return out


def _ptxas_usage(kernel, capability: int, fresh_log: str) -> dict:
    """ptxas' resource report of ``kernel``: the log of this compile when it ran ptxas, else
    the one kept from when it did (keyed by the kernel's hash), else ptxas run again on the
    PTX with the flags that matter to register allocation."""
    from triton import knobs
    from triton.backends.nvidia.compiler import get_ptxas

    store = Path(knobs.cache.dir).parent / "fastmae_ptxas_logs" / f"{kernel.hash}-sm{capability}.log"
    log = fresh_log if "Used " in fresh_log else (store.read_text() if store.exists() else "")
    if "Used " not in log:
        with tempfile.TemporaryDirectory() as d:
            ptx = Path(d) / "k.ptx"
            ptx.write_text(kernel.asm["ptx"])
            arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
            cmd = [get_ptxas(capability).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", str(ptx),
                   "-o", str(Path(d) / "k.o")]  # fmt: skip
            log = subprocess.run(cmd, capture_output=True, text=True).stderr
    if "Used " in log and not store.exists():
        with contextlib.suppress(OSError):
            store.parent.mkdir(parents=True, exist_ok=True)
            store.write_text(log)
    return _parse_ptxas_log(log)


def _init_worker():
    import warnings

    warnings.filterwarnings("ignore")
    for mod in KERNEL_MODULES:
        importlib.import_module(mod)


def _format_signature(fn, signature, constexprs, attrs) -> str:
    """``name: type`` of each runtime argument (``%16``: specialised as divisible by 16;
    ``= v``: specialised to the constant v), as the JIT compiles them."""
    out = []
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            continue
        if signature[p.name] == "constexpr":
            out.append(f"{p.name} = {constexprs.get((i,))!r}")
            continue
        div = any(a[0] == "tt.divisibility" for a in attrs.get((i,), []))
        out.append(f"{p.name}: {signature[p.name]}{' %16' if div else ''}")
    return ", ".join(out)


def compile_job(job: dict, capability: int) -> dict:
    """Compile one job for ``sm_<capability>``; never raises."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res = {"id": job["id"], "arch": capability}
    hits = []
    t0 = time.perf_counter()
    try:
        fn, signature, constexprs, attrs, options = bind(job["kernel"], job["params"], job["options"], capability)
        res["signature"] = _format_signature(fn, signature, constexprs, attrs)
        prev = knobs.compilation.listener, knobs.nvidia.dump_ptxas_log
        knobs.compilation.listener = lambda **kw: hits.append(kw.get("cache_hit"))
        knobs.nvidia.dump_ptxas_log = True  # printed: caught here
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):
                k = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                   target=GPUTarget("cuda", capability, 32), options=options.__dict__)  # fmt: skip
        finally:
            knobs.compilation.listener, knobs.nvidia.dump_ptxas_log = prev
        res.update(ok=True, shared=int(k.metadata.shared), num_warps=k.metadata.num_warps,
                   num_stages=k.metadata.num_stages, **_ptxas_usage(k, capability, log.getvalue()))  # fmt: skip
    except Exception as e:  # noqa: BLE001
        msg = "".join(traceback.format_exception_only(type(e), e))
        res.update(ok=False, error=msg[-6000:], traceback=traceback.format_exc()[-6000:])
    res["seconds"] = round(time.perf_counter() - t0, 3)
    res["cache_hit"] = bool(hits and all(hits))
    return res




def compile_all(jobs: list[dict], workers: int = 2, archs=(90, 80)) -> list[dict]:
    tasks = [(job, cc) for job in sorted(jobs, key=lambda j: -_est_seconds(j)) for cc in job["targets"] if cc in archs]
    if workers <= 1:
        _init_worker()
        return [compile_job(j, cc) for j, cc in tasks]
    import multiprocessing as mp

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker) as pool:
        return list(pool.map(compile_job, *zip(*tasks), chunksize=1)) if tasks else []


# ============================================================================ drivers
def _wait_for(path: Path, timeout: float, proc=None) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the process that writes {path.name} exited (rc={proc.returncode})")
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{path} did not appear within {timeout:.0f} s")
        time.sleep(0.05)


def _write(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)  # atomic: a waiting process never reads half a file


def _popen(args: list[str], interpret: bool, log: Path):
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    f = open(log, "w")  # closed by _finish
    proc = subprocess.Popen(cmd, env=_subprocess_env(interpret), cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    proc.log, proc.logfile = log, f
    return proc


def _finish(proc, timeout: float, what: str) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    finally:
        proc.logfile.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (rc={proc.returncode}):\n{proc.log.read_text()[-10000:]}")


def make_plan(full: bool = False, timeout: float = 600) -> dict:
    """Capture (interpreter) and plan (no interpreter) in two subprocesses started together:
    the planner first writes the kernel modules' GPU-side constants, which the capture
    applies, then plans what the capture recorded. Returns ``{"jobs": [...], "kernels":
    [all kernels], "captured": [launched kernels], "launches": n, "overridden": [...]}``."""
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        planner = _popen(["plan", str(d)] + (["--full"] if full else []), False, d / "plan.log")
        capturer = _popen(["capture", str(d)], True, d / "capture.log")
        t0 = time.monotonic()
        while capturer.poll() is None and time.monotonic() - t0 < timeout:
            if planner.poll() not in (None, 0):  # the planner died: the capture waits in vain
                capturer.kill()
                _finish(planner, timeout, "plan (tests/_aot.py plan, TRITON_INTERPRET=0)")
            time.sleep(0.05)
        try:
            _finish(capturer, 1, "capture (tests/_aot.py capture, TRITON_INTERPRET=1)")
        except BaseException:
            planner.kill()
            planner.wait()
            planner.logfile.close()
            raise
        _finish(planner, timeout, "plan (tests/_aot.py plan, TRITON_INTERPRET=0)")
        return json.loads((d / "plan.json").read_text())


def run_compile(jobs: list[dict], workers: int = 2, timeout: float = 1200, archs=(90, 80)) -> list[dict]:
    """Compile ``jobs`` in a subprocess (interpreter off) with a pool of ``workers``."""
    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "jobs.json", Path(d) / "results.json"
        src.write_text(json.dumps(jobs))
        args = ["compile", str(src), str(dst), "--workers", str(workers), "--archs", *map(str, archs)]
        _finish(_popen(args, False, Path(d) / "compile.log"), timeout, "compile (tests/_aot.py compile)")
        return json.loads(dst.read_text())


def _flags(r: dict) -> str:
    flags = []
    if r.get("spill_stores"):
        flags.append("SPILLS")
    if r.get("wgmma_serialized"):
        flags.append("WGMMA-SERIALIZED")
    if r["shared"] > MAX_SHARED[r["arch"]]:
        flags.append("OVER-SMEM")
    return " ".join(flags)


def format_table(jobs: list[dict], results: list[dict]) -> str:
    """Registers, spills, shared memory and compile time per job and target."""
    by_id = {j["id"]: j for j in jobs}
    rows = []
    for r in sorted(results, key=lambda r: (by_id[r["id"]]["kernel"], r["id"], -r["arch"])):
        tuner = by_id[r["id"]].get("tuner") or ""
        if r["ok"]:
            spills = f"{r.get('spill_stores', '?')}/{r.get('spill_loads', '?')}"
            hit = "c" if r["cache_hit"] else " "
            rows.append(f"sm{r['arch']}  {r.get('regs', '?'):>4}  {spills:>11}  {r['shared']:>7}  "
                        f"{r['seconds']:>6.2f}{hit}  {tuner:<22} {r['id']}  {_flags(r)}")
        else:
            last = r["error"].strip().splitlines()[-1][:100] if r["error"].strip() else "?"
            rows.append(f"sm{r['arch']}  FAILED {last}  {r['id']}")
    head = (f"arch  regs  spill(st/ld)  smem(B)  time(s)  {'autotuner':<22} job  flags\n"
            "  per thread: registers, bytes of register spill stores/loads (ptxas -v); smem: shared memory a block;\n"
            "  c: triton cache hit; WGMMA-SERIALIZED: ptxas serialised the wgmma MMAs for want of registers;\n"
            f"  OVER-SMEM: above the block limit ({MAX_SHARED})")  # fmt: skip
    return head + "\n" + "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capture", help="(interpreter) wait for DIR/constants.json, write DIR/launches.json")
    c.add_argument("dir")
    p = sub.add_parser("plan", help="write DIR/constants.json, wait for DIR/launches.json, write DIR/plan.json")
    p.add_argument("dir")
    p.add_argument("--full", action="store_true")
    k = sub.add_parser("compile")
    k.add_argument("jobs")
    k.add_argument("out")
    k.add_argument("--workers", type=int, default=2)
    k.add_argument("--archs", type=int, nargs="+", default=[90, 80])
    r = sub.add_parser("report", help="capture, plan and compile; print the registers/spills table")
    r.add_argument("--full", action="store_true", help="every autotune config at every shape")
    r.add_argument("--workers", type=int, default=2)
    r.add_argument("--archs", type=int, nargs="+", default=[90, 80])
    r.add_argument("--match", help="only the jobs whose id matches this regular expression")
    r.add_argument("--every-arch", action="store_true", help="every job for every --archs (default: sm_80 for a few)")
    r.add_argument("--json", help="write jobs and results here")
    a = ap.parse_args(argv)
    if a.cmd == "capture":
        d = Path(a.dir)
        _wait_for(d / "constants.json", 300)
        recs, overridden = capture(json.loads((d / "constants.json").read_text()))
        _write(d / "launches.json", {"launches": recs, "overridden": overridden})
    elif a.cmd == "plan":
        d = Path(a.dir)
        _write(d / "constants.json", module_constants())
        _wait_for(d / "launches.json", 600)
        cap = json.loads((d / "launches.json").read_text())
        recs = cap["launches"]
        out = {"jobs": plan(recs, full=a.full), "kernels": launchable_kernels(), "launches": len(recs),
               "captured": sorted({r["kernel"] for r in recs}), "overridden": cap["overridden"]}  # fmt: skip
        _write(d / "plan.json", out)
    elif a.cmd == "compile":
        jobs = json.loads(Path(a.jobs).read_text())
        Path(a.out).write_text(json.dumps(compile_all(jobs, a.workers, tuple(a.archs))))
    elif a.cmd == "report":
        t0 = time.perf_counter()
        jobs = [j for j in make_plan(a.full)["jobs"] if not a.match or re.search(a.match, j["id"])]
        for j in jobs if a.every_arch else ():
            j["targets"] = list(a.archs)
        t1 = time.perf_counter()
        results = run_compile(jobs, a.workers, timeout=24 * 3600, archs=tuple(a.archs))
        t2 = time.perf_counter()
        print(format_table(jobs, results))
        print(f"\n{len(jobs)} jobs, {len(results)} compiles, {sum(not r['ok'] for r in results)} failed; "
              f"plan {t1 - t0:.1f}s, compile {t2 - t1:.1f}s")  # fmt: skip
        if a.json:
            Path(a.json).write_text(json.dumps({"jobs": jobs, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
