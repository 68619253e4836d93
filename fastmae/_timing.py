"""Timing helpers shared by ``fastmae bench``, ``fastmae validate`` and ``benchmarks/bench_ops.py``.

* :func:`time_calls`: per-call times in ms (CUDA events around each call, synchronised,
  on a GPU; ``time.perf_counter`` on the CPU), after a warm-up. On a GPU such a time
  includes the call's Python dispatch and launch latency (the GPU idles between the start
  event and the first kernel): what an eager user sees;
* :func:`time_graph`: the same calls captured into a CUDA graph and replayed: kernel time,
  without the host's share (the figure to put against a memory-traffic floor);
* :func:`matmul_rate` and :func:`copy_bandwidth`: the card's ceilings, measured in the
  same run as the figures they are compared with;
* :func:`environment`: what a record must carry to be reproducible (card, versions,
  git commit, date, command line);
* :class:`ProgressBar`: a dependency-free ``\\r`` bar on stderr;
* :func:`write_json`: records are rewritten after every measurement, atomically, so a
  run killed at its time limit leaves a readable record of what it measured;
* :func:`cuda_context_lost`: after a failure, whether the process's CUDA context is still
  usable. A kernel that faults (an illegal or misaligned address, a device-side assert)
  leaves a sticky error: every later CUDA call in the process fails with it, so the
  harnesses stop there and say why, rather than recording each later case as a failure.

Nothing here imports triton.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time

import torch

from ._library import interpreting

__all__ = [
    "interpreting",
    "ProgressBar",
    "synchronize",
    "time_calls",
    "time_graph",
    "graph_calls",
    "GraphCaptureError",
    "median",
    "matmul_rate",
    "copy_bandwidth",
    "card_name",
    "slug",
    "git_commit",
    "environment",
    "timestamp",
    "write_json",
    "cuda_context_lost",
]


# --------------------------------------------------------------------------- progress
class ProgressBar:
    """A one-line progress bar on ``stream`` (stderr), redrawn with ``\\r``.

    When the stream is not a terminal (a log file) it prints one plain line per
    :meth:`start` instead, so logs stay readable.
    """

    def __init__(self, total: int, stream=None, width: int = 24, enabled: bool = True):
        self.total = max(int(total), 1)
        self.done = 0
        self.stream = sys.stderr if stream is None else stream
        self.width = width
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._label = ""
        self._last = ""

    def start(self, label: str) -> None:
        """A new task begins (``label`` says what)."""
        self._label = label
        if not self.enabled:
            return
        if self.tty:
            self._draw("")
        else:
            print(f"[{self.done + 1}/{self.total}] {label}", file=self.stream, flush=True)

    def step(self, detail: str) -> None:
        """Progress inside the current task (e.g. ``"step 3/20"``); drawn on a terminal only."""
        if self.enabled and self.tty:
            self._draw(detail)

    def finish_task(self) -> None:
        self.done = min(self.done + 1, self.total)
        if self.enabled and self.tty:
            self._draw("")

    def close(self) -> None:
        if self.enabled and self.tty and self._last:
            self.stream.write("\r" + " " * len(self._last) + "\r")
            self.stream.flush()
            self._last = ""

    def _draw(self, detail: str) -> None:
        filled = int(self.width * self.done / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        line = f"[{bar}] {self.done}/{self.total} {self._label} {detail}".rstrip()
        pad = max(len(self._last) - len(line), 0)
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()
        self._last = line


# --------------------------------------------------------------------------- timing
def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device, iters: int, warmup: int = 0, args_cycle=None, on_call=None) -> list[float]:
    """Call ``fn`` ``warmup`` times, then time ``iters`` calls; returns each call's time in ms.

    On a CUDA device each call is bracketed by CUDA events and the device is synchronised
    after it, so a time is the GPU time of one whole call; on the CPU it is wall clock.
    ``args_cycle``: a list of argument tuples the calls rotate through (inputs rotated so
    that a small working set is not served from L2); ``fn()`` is called without arguments
    when it is None. ``on_call(i, n)`` is called after every call (progress bars).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    sets = args_cycle or [()]
    total = warmup + iters
    k = 0
    for i in range(warmup):
        fn(*sets[k % len(sets)])
        k += 1
        if on_call is not None:
            on_call(i + 1, total)
    synchronize(device)
    times = []
    for i in range(iters):
        args = sets[k % len(sets)]
        k += 1
        if cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - t0) * 1e3)
        if on_call is not None:
            on_call(warmup + i + 1, total)
    return times


class GraphCaptureError(RuntimeError):
    """A callable could not be captured into a CUDA graph; the message says why."""


def graph_calls(n_sets: int, est_ms: float | None, target_ms: float = 1.0, min_calls: int = 2,
                max_calls: int = 64) -> int:
    """How many calls one graph replay should hold: whole rotations of the ``n_sets`` input sets.

    Enough calls that a replay lasts about ``target_ms`` (``est_ms``: one call's time, e.g.
    the eager median, an upper bound on its GPU time), so the graph's own launch latency is
    amortised and the host stays ahead of the GPU; at least ``min_calls`` (rounded up to
    whole rotations), at most ``max_calls`` (or one rotation, when that is longer).
    """
    n_sets = max(int(n_sets), 1)
    want = max_calls if not est_ms or est_ms <= 0 else max(min_calls, math.ceil(target_ms / est_ms))
    want = min(want, max_calls)
    rotations = math.ceil(want / n_sets)
    if n_sets * rotations > max_calls:
        rotations = max(1, max_calls // n_sets)
    return n_sets * rotations


def cuda_context_lost(device=None) -> str | None:
    """``None`` while CUDA in this process still works (or was never started), else the
    error a trivial synchronised CUDA operation now raises (its first line).

    Meant for after a failure: a sticky error (an illegal or misaligned address, an illegal
    instruction, a device-side assert) stays with the context, and every later call fails
    with it, whatever it is. The probe synchronises ``device`` (default: the current one)
    and runs one tiny kernel. ``device`` of another type than cuda: ``None``.
    """
    if device is not None and torch.device(device).type != "cuda":
        return None
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    try:
        dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        torch.cuda.synchronize(dev)
        probe = torch.ones(2, device=dev)
        if float((probe + probe).sum().item()) != 4.0:
            return "a trivial CUDA sum (2 x ones(2)) gave a wrong result"
        return None
    except Exception as e:  # noqa: BLE001 - any failure here means the context is unusable
        return _first_line(e)


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300]}" if msg else type(e).__name__


def _end_failed_capture(pool) -> None:
    """Undo what a failed capture left in PyTorch's caching allocator.

    ``CUDAGraph.capture_end`` raises on an invalidated capture (a host sync inside it, say)
    before it tells the allocator to stop routing allocations to the graph's memory pool.
    Left so, every later ``torch.cuda.empty_cache()`` (``torch.cuda.graph`` calls it when a
    capture begins) fails an internal assert, and every later capture with it. So: stop
    allocating to ``pool`` and release it, as ``torch.cuda.use_mem_pool`` does on exit. When
    the capture got past that point, ending fails and the graph releases its pool itself.
    """
    end = getattr(torch._C, "_cuda_endAllocateToPool", None) or getattr(
        torch._C, "_cuda_endAllocateCurrentStreamToPool", None)  # the name before torch 2.8
    release = getattr(torch._C, "_cuda_releasePool", None)
    if end is None:
        return
    device = torch.cuda.current_device()
    try:
        end(device, pool)
    except Exception:
        return
    if release is not None:
        try:
            release(device, pool)
        except Exception:
            pass


def _capture(graph, stream, fn, sets, calls: int, what: str = "capture"):
    """Capture ``calls`` calls of ``fn`` over ``sets`` into ``graph`` on ``stream``; returns the
    last call's output (the graph's static output).

    An error raised by ``fn`` itself (e.g. a host synchronisation, not allowed while
    capturing) is reported (``"<what> failed: ..."``) rather than the less telling "capture
    invalidated" error that ending the capture raises after it; a failed capture is undone in
    the caching allocator (:func:`_end_failed_capture`).
    """
    pool = torch.cuda.graph_pool_handle()  # known to us, so a failed capture can be cleaned up
    body_error, out = None, None
    try:
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            try:
                for i in range(calls):
                    r = fn(*sets[i % len(sets)])
                    out = r if i == calls - 1 else None  # earlier outputs dropped: the next call reuses them
                    del r
            except Exception as e:
                body_error = _first_line(e)
    except Exception as e:
        _end_failed_capture(pool)
        raise GraphCaptureError(f"{what} failed: {body_error or _first_line(e)}") from None
    if body_error is not None:  # the capture itself ended cleanly: the graph owns its pool
        raise GraphCaptureError(f"{what} failed: {body_error}")
    return out


def time_graph(fn, device, replays: int, args_cycle=None, calls_per_replay: int | None = None,
               warmup: int = 3) -> list[float]:
    """Per-call times in ms of ``fn`` captured into a CUDA graph: one figure per replay.

    ``fn`` is first called ``warmup`` times (and at least once on every input set) on a side
    stream, as PyTorch's CUDA-graph docs require (lazy initialisation, Triton compilation
    and autotuning all happen there, never inside the capture); then ``calls_per_replay``
    calls (default: one rotation, a multiple of ``len(args_cycle)``) rotating through the
    fixed input sets of ``args_cycle`` are captured into one graph. The graph is replayed
    once (upload), then ``replays`` times back to back, each replay bracketed by CUDA
    events; each figure is a replay's time divided by ``calls_per_replay``.

    ``fn`` must be capture-safe: no host synchronisation, no ``.grad`` accumulation (use
    ``torch.autograd.grad``). Raises :class:`GraphCaptureError` when the capture fails and
    ``ValueError`` without a CUDA device.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError("CUDA graphs need a CUDA device")
    sets = list(args_cycle or [()])
    calls = calls_per_replay or len(sets)
    if calls % len(sets):
        raise ValueError(f"calls_per_replay={calls} is not a whole number of rotations of {len(sets)} input sets")
    with torch.cuda.device(device):
        caller = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(caller)
        graph = torch.cuda.CUDAGraph()
        try:
            # the outer context restores the caller's stream even when a failed capture leaves
            # torch.cuda.graph's own stream context unexited
            with torch.cuda.stream(side):
                for i in range(max(warmup, len(sets))):
                    fn(*sets[i % len(sets)])
                side.synchronize()
                _capture(graph, side, fn, sets, calls)
            caller.wait_stream(side)
            graph.replay()  # the first replay uploads the graph
            torch.cuda.synchronize(device)
            pairs = []
            for _ in range(replays):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                graph.replay()
                end.record()
                pairs.append((start, end))
            torch.cuda.synchronize(device)
            return [s.elapsed_time(e) / calls for s, e in pairs]
        finally:
            del graph


def median(xs) -> float:
    return float(statistics.median(xs))


# --------------------------------------------------------------------------- ceilings
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def matmul_rate(device, dtype: torch.dtype = torch.bfloat16, n: int | None = None, iters: int = 10) -> dict:
    """Measured dense matmul rate: an ``n x n x n`` product in ``dtype`` (median of ``iters``).

    Default ``n``: 8192 on a GPU (the size whose rate is quoted as the card's ceiling),
    1024 on the CPU (seconds, not minutes). Returns ``{"tflops", "n", "dtype", "ms"}``.
    """
    device = torch.device(device)
    if n is None:
        n = 8192 if device.type == "cuda" else 1024
    if device.type == "cpu" and dtype is torch.float16:
        dtype = torch.float32  # CPU fp16 matmul is emulated: not a ceiling worth quoting
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = median(time_calls(lambda: torch.mm(a, b), device, iters=iters if device.type == "cuda" else 3, warmup=2))
    return {"tflops": 2 * n**3 / (ms * 1e-3) / 1e12, "n": n, "dtype": str(dtype).replace("torch.", ""), "ms": ms}


def copy_bandwidth(device, nbytes: int | None = None, iters: int = 10) -> dict:
    """Device-to-device copy bandwidth, counting bytes read + written (median of ``iters``).

    Default buffer: 2 GiB on a GPU (far beyond any L2), 64 MiB on the CPU.
    Returns ``{"gbps", "bytes", "ms"}``.
    """
    device = torch.device(device)
    if nbytes is None:
        nbytes = 2 * 2**30 if device.type == "cuda" else 64 * 2**20
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    b = torch.empty_like(a)
    ms = median(time_calls(lambda: b.copy_(a), device, iters=iters, warmup=2))
    return {"gbps": 2 * nbytes / (ms * 1e-3) / 1e9, "bytes": 2 * nbytes, "ms": ms}


# --------------------------------------------------------------------------- environment
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def card_name(device) -> str:
    """``"NVIDIA H200"`` for a GPU, ``"cpu: <model>"`` for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {_cpu_model()} ({os.cpu_count()} threads)"


def strict_json(obj):
    """``obj`` with every non-finite float as a string (``"nan"``, ``"inf"``, ``"-inf"``): strict
    JSON has no NaN or Infinity, and other tools' parsers refuse them."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def cli_device(name: str | None, prog: str):
    """The ``--device`` of a command: ``torch.device(name)`` (default cuda when there is one), or
    None after printing why not to stderr (a name torch does not know, cuda without a device, a
    device type other than cpu and cuda): the command then exits with status 2."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError) as e:
        print(f"{prog}: --device {name!r} is not a device name (use cuda, cuda:N or cpu): "
              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return None
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"{prog}: --device cuda but no CUDA device is available", file=sys.stderr)
        return None
    if device.type not in ("cpu", "cuda"):
        print(f"{prog}: --device {name!r}: runs on cpu or cuda", file=sys.stderr)
        return None
    return device


def write_json(path: str, obj) -> None:
    """Write ``obj`` as strict JSON (:func:`strict_json`) to ``path`` through a temporary file and a
    rename: a process killed mid-write leaves the previous version, never a truncated file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(strict_json(obj), f, indent=1, allow_nan=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def slug(text: str) -> str:
    """A file-name-safe lower-case form of ``text`` (``"NVIDIA H200"`` -> ``"nvidia-h200"``)."""
    text = re.sub(r"\(.*?\)", "", text)
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:48] or "unknown"


def git_commit() -> tuple[str, bool | None]:
    """``(commit, dirty)`` of the checkout fastmae is imported from.

    Without git (e.g. a copied tree with no ``.git``) the commit is ``$FASTMAE_GIT_COMMIT``
    when set, else ``"unknown"``, and ``dirty`` is None.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, timeout=10, check=True,
        ).stdout
        if commit:
            return commit, bool(status.strip())
    except Exception:
        pass
    return os.environ.get("FASTMAE_GIT_COMMIT", "").strip() or "unknown", None


def timestamp(now: datetime.datetime | None = None) -> str:
    """UTC time as used in record file names: ``20261128T073138Z``."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%SZ")


def environment(device, command: str | None = None) -> dict:
    """Everything a record needs to say where and how it was measured.

    ``command``: the command line that produced the record (default: ``sys.argv``).
    """
    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except Exception as e:  # not installed, or broken: say which
        triton_version = f"unavailable ({type(e).__name__})"
    commit, dirty = git_commit()
    now = datetime.datetime.now(datetime.timezone.utc)
    env = {
        "card": card_name(device),
        "device": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": commit,
        "git_dirty": dirty,
        "date": now.isoformat(timespec="seconds"),
        "timestamp": timestamp(now),
        "command": command if command is not None else shlex.join(sys.argv),
        "triton_interpret": interpreting(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["sm_count"] = props.multi_processor_count
        env["capability"] = f"{props.major}.{props.minor}"
        env["memory_gib"] = round(props.total_memory / 2**30, 1)
        env["l2_bytes"] = getattr(props, "L2_cache_size", None)
    return env


def isfinite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
