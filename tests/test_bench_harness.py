"""The measuring machinery: the FLOP count, the validate oracles, the timing helpers, the
micro-benchmark harness (a CPU smoke run) and the RESULTS.md generator.

No figure here is a performance claim: CPU times only show that the plumbing works.
"""

import io
import json
import mmap
import os
import random
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fastmae import _timing
from fastmae.bench import MODELS, build_model, flops_per_image, model_config, parse_mask_ratios
from fastmae.models.mae import Attention
from fastmae.validate import _exact, two_x_tolerance

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # benchmarks/ is not an installed package

from benchmarks import bench_cpu_twins, bench_ops, make_results  # noqa: E402


# ---------------------------------------------------------------------------- FLOPs
@pytest.mark.parametrize("model, gflop", [("vit_b16", 58.7), ("vit_l16", 124.5)])
def test_flops_match_the_baseline_doc(model, gflop):
    # /work/shared/baseline-h200.md: "Model FLOPs per image (forward + backward, 3x forward)" at mask 0.75.
    # The doc counts the prediction head on L rows, the model (and this count) on 1 + L: < 0.01% apart.
    got = flops_per_image(model_config(model), 0.75) / 1e9
    assert got == pytest.approx(gflop, rel=0.01)
    assert abs(got - gflop) < 0.05  # the doc rounds to 0.1 GFLOP


@pytest.mark.parametrize("mask_tokens_in_encoder", [False, True])
@pytest.mark.parametrize("mask_ratio", [0.5, 0.75, 0.9])
def test_flops_match_torch_flop_counter(mask_tokens_in_encoder, mask_ratio):
    """The analytic count against torch's FlopCounterMode on a real training step of the tiny model.

    Attention goes through the reference's matmuls (the counter has no formula for the CPU
    SDPA kernel). Every matmul's backward costs 2x its forward, except the patch embedding's:
    the images need no gradient, so its backward is the weight gradient alone (1x): the
    counter must see exactly one patch-embed forward less than the analytic 3x count.
    """
    cfg = model_config("tiny")
    model = build_model("tiny", "torch", mask_tokens_in_encoder, "cpu")
    for m in model.modules():
        if isinstance(m, Attention):
            m.backend = "torch"
    n = 3
    imgs = torch.randn(n, 3, cfg["img_size"], cfg["img_size"])
    with FlopCounterMode(display=False) as counter:
        loss, _, _ = model(imgs, mask_ratio=mask_ratio)
        loss.backward()
    L = (cfg["img_size"] // cfg["patch_size"]) ** 2
    patch_embed_fwd = 2 * L * 3 * cfg["patch_size"] ** 2 * cfg["embed_dim"]
    expected = n * (flops_per_image(cfg, mask_ratio, mask_tokens_in_encoder) - patch_embed_fwd)
    assert counter.get_total_flops() == expected


def test_mask_tokens_in_encoder_cost_more_flops():
    for name in MODELS:
        cfg = model_config(name)
        assert flops_per_image(cfg, 0.75, True) > flops_per_image(cfg, 0.75, False)
        assert flops_per_image(cfg, 0.9) < flops_per_image(cfg, 0.5)


def test_parse_mask_ratios():
    assert parse_mask_ratios("0.75") == [0.75]
    assert parse_mask_ratios("0.9,0.5, 0.75") == [0.5, 0.75, 0.9]
    assert parse_mask_ratios("0.5..0.9") == [0.5, 0.6, 0.7, 0.8, 0.9]
    assert parse_mask_ratios("0.5..0.6:0.05") == [0.5, 0.55, 0.6]
    for bad in ("0.49", "0.91", "", "x", "0.9..0.5"):
        with pytest.raises(ValueError):
            parse_mask_ratios(bad)


# ---------------------------------------------------------------------------- oracles
def test_two_x_tolerance_is_twice_pytorch_error_plus_rounding():
    ref64 = torch.randn(64, 32, dtype=torch.float64)
    lowp = (ref64 + 1e-3 * torch.randn_like(ref64)).to(torch.bfloat16)
    err_t = (lowp.double() - ref64).abs().max().item()
    tol = two_x_tolerance(ref64, lowp, torch.bfloat16)
    r = ref64.to(torch.bfloat16)
    s = 0.3 * ref64.abs().max().item()
    rounding = ((r + s) - s - r).abs().max().item()
    assert tol == pytest.approx(2 * err_t + 2 * rounding)  # bf16: the rounding slack dominates the floor
    assert rounding > 0
    # fp32, PyTorch exact: the fp32 accumulation floor, relative to the tensor's magnitude
    tol32 = two_x_tolerance(ref64 * 1e-7, (ref64 * 1e-7).float(), torch.float32)
    assert tol32 == pytest.approx(2 * ((ref64 * 1e-7).float().double() - ref64 * 1e-7).abs().max().item()
                                  + 1e-5 * 1e-7 * ref64.abs().max().item())
    # the largest error of several PyTorch implementations counts
    worse = (ref64 + 1e-2 * torch.randn_like(ref64)).to(torch.bfloat16)
    assert two_x_tolerance(ref64, [lowp, worse], torch.bfloat16) > tol


def test_two_x_oracle_without_a_finite_pytorch_error_fails():
    """PyTorch's own low-precision result overflowing (inf / NaN) makes 2x its error infinite: a
    bound nothing can exceed, so the check fails as 'no oracle' instead of passing anything."""
    from fastmae.validate import _two_x

    ref64 = torch.randn(16, 8, dtype=torch.float64)
    good = ref64.to(torch.float16)
    assert _two_x(good, ref64, good, torch.float16)[2]
    broken = good.clone()
    broken[3, 4] = float("nan")
    for lowp in (broken, torch.where(torch.arange(8) == 2, float("inf"), good).to(torch.float16)):
        err, tol, ok, detail = _two_x(good, ref64, lowp, torch.float16)
        assert not ok and tol == float("inf") and "no oracle" in detail


def test_exact_oracle():
    x = torch.randn(5, 7)
    assert _exact(x.clone(), x)[2]
    y = x.clone()
    y[2, 3] = torch.nextafter(y[2, 3], torch.tensor(float("inf")))
    err, _, ok, _ = _exact(y, x)
    assert not ok and err > 0
    assert not _exact(x.double(), x)[2]  # a different dtype is a failure even with equal values
    nan = x.clone()
    nan[0, 0] = float("nan")
    assert not _exact(nan, x)[2] and _exact(nan, x)[0] == float("inf")


# ---------------------------------------------------------------------------- timing
def test_time_calls_counts_warmup_and_rotates_inputs():
    seen = []
    times = _timing.time_calls(lambda a: seen.append(a), "cpu", iters=5, warmup=3, args_cycle=[(0,), (1,)])
    assert len(times) == 5 and all(t >= 0 for t in times)
    assert seen == [0, 1, 0, 1, 0, 1, 0, 1]


def test_ceilings_are_measured():
    mm = _timing.matmul_rate("cpu", torch.float32, n=128, iters=2)
    assert mm["n"] == 128 and mm["tflops"] > 0 and mm["ms"] > 0
    cp = _timing.copy_bandwidth("cpu", nbytes=1 << 20, iters=2)
    assert cp["bytes"] == 2 << 20 and cp["gbps"] > 0


def test_environment_and_slug():
    env = _timing.environment("cpu", command="fastmae bench")
    assert env["device"] == "cpu" and env["command"] == "fastmae bench" and env["torch"] == torch.__version__
    assert env["git_commit"] == "unknown" or len(env["git_commit"]) == 40
    assert env["card"].startswith("cpu: ")
    assert _timing.slug("NVIDIA H200") == "nvidia-h200"
    assert _timing.slug("cpu: Intel(R) Xeon(R) Processor (2 threads)") == "cpu-intel-xeon-processor"


def test_git_commit_without_git(monkeypatch):
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(_timing.subprocess, "run", no_git)
    monkeypatch.delenv("FASTMAE_GIT_COMMIT", raising=False)
    assert _timing.git_commit() == ("unknown", None)
    monkeypatch.setenv("FASTMAE_GIT_COMMIT", "a" * 40)
    assert _timing.git_commit() == ("a" * 40, None)


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_write_json_is_atomic(tmp_path):
    path = str(tmp_path / "r" / "rec.json")
    _timing.write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        _timing.write_json(path, {"a": 2, "b": object()})  # fails mid-write
    assert json.load(open(path)) == {"a": 1} and os.listdir(tmp_path / "r") == ["rec.json"]


def test_write_json_is_strict_json(tmp_path):
    """Non-finite floats (a NaN loss, an infinite error) are strings: strict parsers refuse NaN / Infinity."""
    path = str(tmp_path / "rec.json")
    _timing.write_json(path, {"loss": float("nan"), "rows": [{"err": float("inf")}, (float("-inf"), 1.5)], "n": 2})

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    rec = json.loads(open(path).read(), parse_constant=refuse)
    assert rec == {"loss": "nan", "rows": [{"err": "inf"}, ["-inf", 1.5]], "n": 2}


def test_bench_csv_is_written_atomically(tmp_path):
    from fastmae.bench import write_csv

    path = tmp_path / "bench.csv"
    good = {"config": dict(dtype="bf16", compile=False, steps=3, warmup=1), "ceilings": {"matmul": {"tflops": 1.0}},
            "env": {}, "results": [dict.fromkeys(["model", "batch_size", "mask_ratio", "backend", "mode", "encoder",
                                                  "status", "reason", "images_per_s", "ms_per_step", "peak_mem_gib",
                                                  "peak_reserved_gib", "gflop_per_image", "tflops", "mfu",
                                                  "first_step_s", "loss"], 1)] * 2}
    write_csv(good, str(path))
    before = path.read_text()
    assert len(before.splitlines()) == 3
    broken = dict(good, results=[good["results"][0], {"model": "x"}])  # the second row fails mid-write
    with pytest.raises(KeyError):
        write_csv(broken, str(path))
    assert path.read_text() == before and os.listdir(tmp_path) == ["bench.csv"]


def test_progress_bar():
    tty = _Tty()
    bar = _timing.ProgressBar(2, stream=tty)
    bar.start("first")
    bar.step("step 1/3")
    bar.finish_task()
    bar.close()
    assert "\r[" in tty.getvalue() and "step 1/3" in tty.getvalue() and "1/2" in tty.getvalue()
    log = io.StringIO()  # not a terminal: one plain line per task, no carriage returns
    bar = _timing.ProgressBar(2, stream=log)
    bar.start("first")
    bar.step("ignored")
    bar.finish_task()
    bar.start("second")
    assert log.getvalue() == "[1/2] first\n[2/2] second\n"


# ---------------------------------------------------------------------------- bench_ops
def test_memory_floors():
    d = bench_ops._dims(bench_ops.MODEL_SHAPES["vit_b16"], 256)
    assert (d["L"], d["K"], d["P"]) == (196, 49, 768)
    imgs = 256 * 3 * 224 * 224
    assert bench_ops.data_op_bytes("patchify", d, "fwd", 2) == 2 * imgs * 2
    assert bench_ops.data_op_bytes("patchify", d, "fwd+bwd", 2) == 4 * imgs * 2
    # masking reads only the kept rows: its floor is far below a full read of x
    assert bench_ops.data_op_bytes("random_masking", d, "fwd", 2) < 256 * 196 * 768 * 2
    for op in bench_ops.DATA_OPS:
        assert bench_ops.data_op_bytes(op, d, "fwd+bwd", 2) > bench_ops.data_op_bytes(op, d, "fwd", 2) > 0
    assert bench_ops.attention_bytes(2, 10, 3, 4, "fwd", 2) == 4 * 2 * 10 * 3 * 4 * 2
    assert bench_ops.attention_flops(2, 10, 3, 4, "fwd") == 4 * 2 * 3 * 10 * 10 * 4
    assert bench_ops.attention_flops(2, 10, 3, 4, "fwd+bwd") == 3.5 * 4 * 2 * 3 * 10 * 10 * 4


def test_input_rotation_only_when_inputs_fit_in_l2():
    l2 = 50 * 2**20
    assert bench_ops.input_sets_needed(200 * 2**20, l2) == 1
    assert bench_ops.input_sets_needed(2**20, None) == 1
    n = bench_ops.input_sets_needed(30 * 2**20, l2)
    assert n * 30 * 2**20 > 2 * l2
    assert bench_ops.input_sets_needed(1, l2) == 16  # capped


def test_bench_ops_cpu_smoke_run(tmp_path, capsys):
    rc = bench_ops.main(["--device", "cpu", "--out", str(tmp_path), "--quiet", "--reps", "2", "--warmup", "1"])
    assert rc == 0
    (path,) = tmp_path.glob("ops-*.json")
    rec = json.load(open(path))
    assert rec["kind"] == "ops" and rec["env"]["device"] == "cpu"
    ops_rows = [r for r in rec["results"] if r["section"] == "ops"]
    assert {(r["op"], r["direction"]) for r in ops_rows if r["status"] == "ok"} == {
        (op, d) for op in bench_ops.DATA_OPS for d in ("fwd", "fwd+bwd")}
    for r in ops_rows:
        assert r["x_floor"] == pytest.approx(r["ms"] / r["floor_ms"]) == r["x_floor_eager"]
        assert r["eager_ms"] == r["ms"]
        assert r["graph_status"] == "skipped" and "x_floor_graph" not in r  # no CUDA graphs on the CPU
    assert rec["schema"] == 2 and rec["config"]["graphs"] is True
    att = [r for r in rec["results"] if r["section"] == "attention"]
    assert {r["backend"] for r in att} == {"sdpa:flash", "sdpa:efficient", "sdpa:cudnn", "sdpa:math"}
    math_row = next(r for r in att if r["backend"] == "sdpa:math" and r["direction"] == "fwd")
    assert math_row["status"] == "ok" and 0 < math_row["frac_matmul"]
    out = capsys.readouterr().out
    assert "[ops]" in out and "graph ms" in out and "graph timing: 0 ok, 0 failed" in out


def test_cpu_twin_bench_counts_page_faults_per_call():
    def faulting():  # 16 fresh anonymous pages, each touched once: 16 minor faults a call
        m = mmap.mmap(-1, 16 * mmap.PAGESIZE)
        for i in range(16):
            m[i * mmap.PAGESIZE] = 1
        m.close()

    te, tr, fe, fr = bench_cpu_twins.measure(faulting, lambda: None, iters=20, warmup=1)
    assert te > 0 and tr > 0
    assert 16 <= fe < 20 and fr < 1


def test_cpu_twin_bench_smoke_run_pins_malloc(tmp_path):
    from _ext import require_ext

    require_ext()
    out = tmp_path / "twins.json"
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "bench_cpu_twins.py"), "--iters", "2", "--batch", "1",
           "--ops", "patchify,mae_loss fwd+bwd", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rec = json.load(open(out))
    assert rec["malloc"].startswith("pinned: mallopt")
    assert [r["op"] for r in rec["results"]] == ["patchify", "mae_loss fwd+bwd"]
    for r in rec["results"]:
        assert r["ext_ms"] > 0 and r["torch_ms"] > 0 and r["speedup"] == pytest.approx(r["torch_ms"] / r["ext_ms"])
        assert r["ext_faults_per_call"] >= 0 and r["torch_faults_per_call"] >= 0
    done = subprocess.run([*cmd[:-1], str(tmp_path / "d.json"), "--malloc", "default"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.load(open(tmp_path / "d.json"))["malloc"] == "default"


def test_bench_ops_refuses_to_guess_a_device(capsys):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert bench_ops.main(["--quiet"]) == 2
    assert "--device cpu" in capsys.readouterr().err


def _leaves(args):
    return [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


_STEP_CASES = [("data", op) for op in bench_ops.DATA_OPS] + [
    ("attention", "attention_qkvpacked"), ("attention", "attention")]


def _case(kind, op, direction):
    if kind == "data":
        return bench_ops._data_case(op, bench_ops._dims(bench_ops.CPU_SHAPES["tiny"], 3), direction, "torch",
                                    "cpu", torch.float32)
    return bench_ops._attention_case(op, (2, 2, 9, 8), direction, "sdpa:math" if op == "attention_qkvpacked"
                                     else "torch", "cpu", torch.float32)


@pytest.mark.parametrize("kind, op", _STEP_CASES)
def test_fwd_bwd_step_is_capture_safe(kind, op, monkeypatch):
    """The timed forward + backward callable returns its gradients (torch.autograd.grad with the
    fixed gradient among its inputs), never touches ``.grad`` and never calls ``.backward()``, so
    repeated calls (and CUDA-graph replays) give the same result and carry no state."""
    make, step = _case(kind, op, "fwd+bwd")
    _, forward = _case(kind, op, "fwd")  # the same op, forward only: the oracle below
    args = make()
    leaves = _leaves(args)
    assert leaves
    seed = torch.seed()

    def no_backward(*a, **k):
        raise AssertionError("the timed step must not call .backward()")

    with monkeypatch.context() as mp:
        mp.setattr(torch.Tensor, "backward", no_backward)
        torch.manual_seed(seed)  # random_masking and encoder_input draw their noise: the same in each call
        grads = step(*args)
        torch.manual_seed(seed)
        again = step(*args)
    assert isinstance(grads, tuple) and len(grads) == len(leaves)
    assert all(leaf.grad is None for leaf in leaves)
    # the oracle: .backward() on copies, with the same gradient (the last input, or 1 for the scalar loss)
    copies = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]
    torch.manual_seed(seed)
    out = forward(*copies)
    out.backward(None if out.dim() == 0 else copies[-1])
    for g, g2, c in zip(grads, again, _leaves(copies)):
        assert g.shape == c.shape
        # the same ops on the same inputs on the CPU: bitwise equal, and no accumulation between calls
        assert torch.equal(g, c.grad) and torch.equal(g2, g)


@pytest.mark.parametrize("kind, op", _STEP_CASES)
def test_fwd_step_returns_the_output_and_builds_no_graph(kind, op):
    make, step = _case(kind, op, "fwd")
    args = make()
    assert not _leaves(args)
    out = step(*args)
    assert isinstance(out, torch.Tensor) and not out.requires_grad


def test_graph_calls_are_whole_rotations():
    assert _timing.graph_calls(1, 0.01) == 64  # 1 ms of 10 us calls wants 100, capped at 64
    assert _timing.graph_calls(1, 0.1) == 10
    assert _timing.graph_calls(1, 5.0) == 2  # at least 2
    assert _timing.graph_calls(3, 0.1) == 12  # 10 rounded up to whole rotations of 3 sets
    assert _timing.graph_calls(16, 0.01) == 64
    assert _timing.graph_calls(16, 5.0) == 16  # one rotation even when it is longer than wanted
    assert _timing.graph_calls(80, 0.01) == 80
    assert _timing.graph_calls(2, None) == 64
    for n in range(1, 20):
        for est in (1e-3, 0.05, 0.3, 2.0, 40.0):
            c = _timing.graph_calls(n, est)
            assert c % n == 0 and c >= min(max(n, 2), 64) and c <= max(n, 64)


def test_time_graph_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(ValueError, match="CUDA"):
        _timing.time_graph(lambda: None, "cpu", replays=3)


class _FakeCapture:
    """Stands in for torch.cuda.graph: ``exit_error`` is what ending the capture raises."""

    exit_error = None

    def __init__(self, graph, pool=None, stream=None):
        self.pool = pool

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.exit_error is not None:
            raise self.exit_error


@pytest.mark.parametrize("body_error, exit_error, cleaned_up", [
    (RuntimeError("CUDA error: operation not permitted when stream is capturing"),
     RuntimeError("CUDA error: operation failed due to a previous error during capture"), True),
    (None, RuntimeError("CUDA error: operation failed due to a previous error during capture"), True),
    (ValueError("bad shape"), None, False),  # the capture itself ended: the graph releases its own pool
])
def test_a_failed_capture_leaves_the_allocator_clean(monkeypatch, body_error, exit_error, cleaned_up):
    """The control flow of _timing._capture, with torch's capture machinery faked (no GPU here):
    when ending the capture fails, the allocator is told to stop routing to the graph's pool and
    the pool is released (else every later empty_cache asserts); the message names the first error."""
    log = []
    pool = (0, random.randrange(1, 1000))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: pool)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "graph", type("G", (_FakeCapture,), {"exit_error": exit_error}))
    monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", lambda d, p: log.append(("end", d, p)), raising=False)
    monkeypatch.setattr(torch._C, "_cuda_releasePool", lambda d, p: log.append(("release", d, p)), raising=False)
    calls = []

    def fn(a):
        calls.append(a)
        if body_error is not None:
            raise body_error

    with pytest.raises(_timing.GraphCaptureError) as info:
        _timing._capture(object(), None, fn, [(1,), (2,)], 4)
    first = body_error or exit_error
    assert str(info.value) == f"capture failed: {type(first).__name__}: {first}"
    assert calls == ([1] if body_error else [1, 2, 1, 2])
    assert log == ([("end", 0, pool), ("release", 0, pool)] if cleaned_up else [])

    # the capture got past the allocator hand-off before failing: ending again fails, nothing is released
    def already_ended(d, p):
        raise RuntimeError("endAllocatePool: not currently recording to mempool_id")

    monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", already_ended, raising=False)
    log.clear()
    with pytest.raises(_timing.GraphCaptureError):
        _timing._capture(object(), None, fn, [(1,)], 1)
    assert log == []


def _quiet_harness(device="cpu", **kw):
    return bench_ops.Harness(device, warmup=1, reps=2, budget=None, progress=_timing.ProgressBar(1, enabled=False),
                             **kw)


def test_harness_skips_graphs_on_cpu_and_on_request():
    make, step = _case("data", "patchify", "fwd+bwd")
    m = _quiet_harness().measure(make, step)
    assert m["status"] == "ok" and m["eager_ms"] == m["ms"] > 0
    assert m["graph_status"] == "skipped" and m["graph_reason"] == "no CUDA device" and "graph_ms" not in m
    m = _quiet_harness(graphs=False).measure(make, step)
    assert m["graph_status"] == "skipped" and m["graph_reason"] == "--no-graphs"
    assert bench_ops.build_parser().parse_args(["--no-graphs"]).graphs is False
    assert bench_ops.build_parser().parse_args([]).graphs is True


def test_harness_enters_the_sdpa_kernel_context_once_not_per_call(monkeypatch):
    import contextlib

    entered = []

    @contextlib.contextmanager
    def counting(kernel):
        entered.append(kernel)
        yield

    monkeypatch.setattr(bench_ops, "_sdpa_context", counting)
    make, step = bench_ops._attention_case("attention_qkvpacked", (2, 2, 9, 8), "fwd+bwd", "sdpa:math", "cpu",
                                           torch.float32)
    m = _quiet_harness().measure(make, step)
    assert m["status"] == "ok" and entered == ["math"]
    step(*make())  # called on its own, the step still runs inside the context
    assert entered == ["math", "math"]
    make, step = bench_ops._attention_case("attention_qkvpacked", (2, 2, 9, 8), "fwd", "torch", "cpu",
                                           torch.float32)
    assert not hasattr(step, "hoisted")


def test_bench_ops_runs_sections_in_the_order_given(tmp_path):
    assert bench_ops.main(["--device", "cpu", "--out", str(tmp_path), "--quiet", "--reps", "2", "--warmup", "1",
                           "--sections", "attention,ops", "--backends", "torch,sdpa"]) == 0
    (path,) = tmp_path.glob("ops-*.json")
    sections = [r["section"] for r in json.load(open(path))["results"]]
    first_ops = sections.index("ops")
    assert set(sections[:first_ops]) == {"attention"} and set(sections[first_ops:]) == {"ops"}


def test_the_measurement_that_lost_the_cuda_context_is_marked(tmp_path, monkeypatch):
    # the record names the row after whose measurement the context was unusable (a key, not the
    # reason's wording), and gpu_summary reports that row
    from benchmarks import gpu_summary

    sticky = "AcceleratorError: CUDA error: an illegal memory access was encountered"
    orig, calls = bench_ops.Harness._measure, []
    lose_at = random.randint(2, 4)

    def losing(self, make, fn, reps):  # the lose_at-th measurement fails and takes the context with it
        calls.append(1)
        if len(calls) == lose_at:
            return {"status": "error", "reason": self.context_check("boom")}
        return orig(self, make, fn, reps)

    with monkeypatch.context() as m:  # undone before the suite's own check of the context (conftest.py)
        m.setattr(bench_ops.Harness, "_measure", losing)
        m.setattr(_timing, "cuda_context_lost", lambda device=None: sticky)
        rc = bench_ops.main(["--device", "cpu", "--out", str(tmp_path), "--quiet", "--reps", "2", "--warmup", "1",
                             "--sections", "ops", "--backends", "torch"])
    assert rc == 1  # a lost context is a failed run
    (path,) = tmp_path.glob("ops-*.json")
    record = json.load(open(path))
    marked = [i for i, r in enumerate(record["results"]) if r.get("cuda_context_lost_here")]
    assert record["cuda_context_lost"] == sticky and len(marked) == 1
    x = record["results"][marked[0]]
    assert x["status"] == "error" and all(r["status"] == "skipped" for r in record["results"][marked[0] + 1:])
    assert (f"CUDA CONTEXT LOST at {x['section']} {x['op']} {x['backend']} {x['direction']}: {sticky}"
            in gpu_summary.summarize(str(tmp_path)))


def test_a_failed_capture_is_recorded_not_raised(monkeypatch):
    calls = []

    def failing(fn, device, replays, args_cycle=None, calls_per_replay=None, warmup=3):
        calls.append((device, replays, len(args_cycle), calls_per_replay))
        raise _timing.GraphCaptureError("capture failed: RuntimeError: operation not permitted when stream is "
                                        "capturing\nsecond line")

    h = _quiet_harness()
    h.device = torch.device("cuda")  # as if on a GPU: only the graph path looks at the device here
    monkeypatch.setattr(_timing, "time_graph", failing)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    m = h.measure_graph(lambda: None, [()], eager_ms=0.05, reps=30)
    assert m == {"graph_status": "failed", "graph_reason": "GraphCaptureError: capture failed: RuntimeError: "
                                                           "operation not permitted when stream is capturing"}
    assert calls == [(torch.device("cuda"), 15, 1, 20)]  # 1 ms of 50 us calls; at least 15 replays

    assert h.lost is None  # the probe found the context usable (no CUDA here: None)
    h.budget, h.t0 = 1.0, time.perf_counter() - 2
    assert h.measure_graph(lambda: None, [()], 0.05, 30) == {"graph_status": "skipped",
                                                              "graph_reason": "time budget of 1 s spent"}
    h.budget = None

    # a failure that left the CUDA context unusable: said in the row, and the later measurements are skipped
    sticky = "AcceleratorError: CUDA error: an illegal memory access was encountered"
    monkeypatch.setattr(_timing, "cuda_context_lost", lambda device=None: sticky)
    m = h.measure_graph(lambda: None, [()], eager_ms=0.05, reps=30)
    assert m == {"graph_status": "failed", "graph_reason": "GraphCaptureError: capture failed: RuntimeError: "
                 f"operation not permitted when stream is capturing; then the CUDA context was lost ({sticky}): "
                 "the later measurements of this run are skipped"}
    assert h.lost == sticky
    assert h.measure_graph(lambda: None, [()], 0.05, 30) == {
        "graph_status": "skipped", "graph_reason": f"CUDA context lost earlier in this run ({sticky})"}


def test_render_shows_eager_and_graph_side_by_side():
    env = {"card": "Synthetic GPU 9000", "torch": "9.9", "triton": "9.9", "git_commit": "f" * 40,
           "date": "2031-01-02T03:04:05+00:00"}
    base = {"section": "ops", "op": "patchify", "shape_label": "vit_b16", "shape": [256, 224, 16, 768, 512],
            "backend": "triton", "direction": "fwd", "status": "ok", "ms": 0.09, "eager_ms": 0.09,
            "floor_ms": 0.03, "x_floor": 3.0, "x_floor_eager": 3.0}
    rows = [dict(base, graph_status="ok", graph_ms=0.045, x_floor_graph=1.5),
            dict(base, direction="fwd+bwd", graph_status="failed", graph_reason="GraphCaptureError: capture failed: x"),
            dict(base, backend="cuda", status="unavailable", reason="fastmae._C is not built")]
    rec = {"env": env, "ceilings": {"copy": {"gbps": 4000.0}, "matmul": {"tflops": 700.0, "dtype": "bf16", "n": 8192}},
           "config": {"reps": 30, "warmup": 5}, "results": rows}
    text = bench_ops.render(rec)
    head = next(line for line in text.splitlines() if line.startswith("op "))
    assert head.index("eager ms") < head.index("graph ms") < head.index("x floor graph") < head.index("x floor eager")
    ok = next(line for line in text.splitlines() if "triton" in line and " fwd " in line)
    assert " 0.09 " in ok and " 0.045 " in ok and " 1.5x " in ok and " 3.0x" in ok
    failed = next(line for line in text.splitlines() if "fwd+bwd" in line)
    assert "failed" in failed and "graph failed: GraphCaptureError: capture failed: x" in failed
    assert "fastmae._C is not built" in text


# ---------------------------------------------------------------------------- RESULTS.md
def _make_results(results, out, *extra):
    return subprocess.run([sys.executable, "-m", "benchmarks.make_results", "--results", str(results),
                           "--out", str(out), *extra], capture_output=True, text=True, cwd=REPO, timeout=60)


def _synthetic_bench_record(rng, device="cuda"):
    """A made-up record, used only inside a test's tmp dir: numbers random, structure real."""
    ips = round(rng.uniform(1000, 5000), 1)
    ms = round(256 / ips * 1e3, 3)
    env = {"card": "Synthetic GPU 9000", "device": device, "torch": "9.9", "triton": "9.9", "cuda": "99",
           "git_commit": "f" * 40, "git_dirty": False, "date": "2031-01-02T03:04:05+00:00",
           "timestamp": "20310102T030405Z", "command": "fastmae bench --models vit_b16"}
    row = {"model": "vit_b16", "batch_size": 256, "mask_ratio": 0.75, "backend": "triton", "encoder": "visible",
           "mask_tokens_in_encoder": False, "status": "ok", "reason": "", "ms_per_step": ms, "ms_all": [ms],
           "images_per_s": ips, "peak_mem_gib": 12.5, "gflop_per_image": 58.7, "tflops": ips * 58.7 / 1e3,
           "mfu": 0.3, "first_step_s": 1.0, "loss": 1.0}
    unavailable = dict(row, backend="cuda", status="unavailable", reason="fastmae._C is not built",
                       ms_per_step=None, images_per_s=None, tflops=None, mfu=None)
    return {"kind": "bench", "schema": 1, "env": env,
            "config": {"dtype": "bf16", "steps": 20, "warmup": 5, "compile": False, "optimizer": "AdamW"},
            "ceilings": {"matmul": {"tflops": 700.0, "n": 8192, "dtype": "bfloat16"}, "copy": {"gbps": 4000.0}},
            "notes": [], "results": [row, unavailable], "encoder_only_speedup": [], "speedup_vs_stock": []}


def test_results_md_without_gpu_records(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    # a CPU record is not a result
    json.dump(_synthetic_bench_record(random.Random(0), device="cpu"), open(results / "bench-cpu.json", "w"))
    out = tmp_path / "RESULTS.md"
    r = _make_results(results, out)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert "No GPU run has been recorded yet" in text
    assert "Synthetic GPU 9000" not in text
    assert _make_results(results, out, "--check").returncode == 0


def test_results_md_from_a_synthetic_gpu_record(tmp_path):
    rng = random.Random()
    rec = _synthetic_bench_record(rng)
    results = tmp_path / "results"
    results.mkdir()
    json.dump(rec, open(results / "bench-synthetic-gpu-9000-20310102T030405Z.json", "w"))
    (results / "broken.json").write_text("{not json")
    out = tmp_path / "RESULTS.md"
    r = _make_results(results, out)
    assert r.returncode == 0 and "broken.json" in r.stderr
    text = out.read_text()
    row = rec["results"][0]
    assert "Synthetic GPU 9000" in text and "f" * 40 in text and rec["env"]["command"] in text
    assert make_results._num(row["images_per_s"]) in text and make_results._num(row["ms_per_step"]) in text
    assert "| vit_b16 | 256 | 0.75 | triton | visible |" in text
    assert "unavailable: fastmae._C is not built" in text
    assert "No GPU run has been recorded" not in text
    # idempotent: the output depends on the records only
    assert _make_results(results, out, "--check").returncode == 0
    out.write_text(text + "hand edit\n")
    assert _make_results(results, out, "--check").returncode == 1


def test_committed_results_md_is_generated_from_the_committed_records():
    r = _make_results(os.path.join(REPO, "benchmarks", "results"), os.path.join(REPO, "benchmarks", "RESULTS.md"),
                      "--check")
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
def test_cuda_event_times_agree_with_wall_clock():
    a = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    times = _timing.time_calls(lambda: a @ a, "cuda", iters=10, warmup=2)
    wall = (time.perf_counter() - t0) * 1e3
    assert len(times) == 10 and all(t > 0 for t in times)
    assert sum(times) <= wall  # each event pair brackets GPU time inside the wall-clock window
    assert _timing.median(times) > 0.2 * wall / 12  # and is not a launch-time artefact


@pytest.mark.gpu
def test_bench_ops_gpu_quick(tmp_path):
    rc = bench_ops.main(["--out", str(tmp_path), "--quiet", "--sections", "ops,attention", "--models", "vit_b16",
                         "--batch", "8", "--attention-batch", "2", "--reps", "3", "--warmup", "1",
                         "--backends", "torch,triton,sdpa"])
    (path,) = tmp_path.glob("ops-*.json")
    rec = json.load(open(path))
    assert rc == 0, [(r["op"], r["backend"], r["reason"]) for r in rec["results"] if r["status"] != "ok"]
    assert rec["env"]["device"] == "cuda" and rec["ceilings"]["copy"]["gbps"] > 0
    ok = {(r["op"], r["backend"], r["direction"]) for r in rec["results"] if r["status"] == "ok"}
    for op in bench_ops.DATA_OPS:
        for b in ("torch", "triton"):
            assert (op, b, "fwd+bwd") in ok
    assert ("attention_qkvpacked", "triton", "fwd+bwd") in ok
    assert ("attention_qkvpacked", "sdpa:math", "fwd+bwd") in ok
    # every eager measurement has a graph verdict, and fastmae's own ops capture
    rows = [r for r in rec["results"] if r["status"] == "ok"]
    assert all(r["graph_status"] in ("ok", "failed") for r in rows)
    graphed = {(r["op"], r["backend"], r["direction"]) for r in rows if r["graph_status"] == "ok"}
    for op in bench_ops.DATA_OPS:
        for b in ("torch", "triton"):
            for d in ("fwd", "fwd+bwd"):
                why = [r.get("graph_reason") for r in rows if (r["op"], r["backend"]) == (op, b)]
                assert (op, b, d) in graphed, why
    assert ("attention_qkvpacked", "triton", "fwd+bwd") in graphed
    for r in rows:
        if r["graph_status"] == "ok":
            assert r["graph_ms"] > 0 and r["x_floor_graph"] == pytest.approx(r["graph_ms"] / r["floor_ms"])
            assert r["graph_calls_per_replay"] % r["sets"] == 0


@pytest.mark.gpu
def test_graph_time_of_a_large_copy_agrees_with_eager():
    # 2 x 512 MiB: ~0.3 ms of DRAM traffic, so the eager call's launch latency is a few percent of it
    a = torch.empty(2**28, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    eager = _timing.median(_timing.time_calls(lambda: b.copy_(a), "cuda", iters=10, warmup=2))
    calls = _timing.graph_calls(1, eager)
    graph = _timing.time_graph(lambda: b.copy_(a), "cuda", replays=10, calls_per_replay=calls)
    assert len(graph) == 10 and all(t > 0 for t in graph)
    assert 0.7 < _timing.median(graph) / eager < 1.1
    assert torch.equal(b, a)


@pytest.mark.gpu
def test_graph_time_excludes_launch_latency_and_replays_really_run():
    x = torch.zeros(1024, device="cuda")
    fn = lambda: x.add_(1)
    eager = _timing.median(_timing.time_calls(fn, "cuda", iters=20, warmup=3))
    before = x[0].item()
    calls = _timing.graph_calls(1, eager)
    graph = _timing.time_graph(fn, "cuda", replays=12, calls_per_replay=calls, warmup=3)
    # a one-element-per-thread kernel: the eager time is mostly launch latency, the graph's is not
    assert _timing.median(graph) < eager
    # 3 warm-up calls, nothing during the capture, then 1 + 12 replays of `calls` calls each
    assert x[0].item() == before + 3 + 13 * calls
    assert torch.cuda.current_stream() == torch.cuda.default_stream()


@pytest.mark.gpu
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
def test_graph_timing_of_triton_ops(direction):
    d = bench_ops._dims(bench_ops.MODEL_SHAPES["vit_b16"], 8)
    h = _quiet_harness("cuda")
    for op in ("patchify", "random_masking", "mae_loss"):
        make, step = bench_ops._data_case(op, d, direction, "triton", "cuda", torch.bfloat16)
        m = h.measure(make, step)
        assert m["status"] == "ok", m
        assert m["graph_status"] == "ok", m.get("graph_reason")
        assert 0 < m["graph_ms"] and m["graph_replays"] >= 15
    make, step = bench_ops._attention_case("attention_qkvpacked", (2, 4, 50, 64), direction, "triton", "cuda",
                                           torch.bfloat16)
    m = h.measure(make, step)
    assert m["status"] == "ok" and m["graph_status"] == "ok", m


@pytest.mark.gpu
def test_graph_replay_computes_what_the_eager_step_computes():
    # a captured fwd+bwd step replayed on its fixed inputs gives the eager step's gradients
    d = bench_ops._dims(bench_ops.MODEL_SHAPES["vit_b16"], 4)
    make, step = bench_ops._data_case("patchify", d, "fwd+bwd", "triton", "cuda", torch.float32)
    args = make()
    want = step(*args)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step(*args)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        got = step(*args)
    args[1].normal_()  # a new fixed gradient, read by the replay
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(got[0], bench_ops._data_case("patchify", d, "fwd+bwd", "torch", "cuda", torch.float32)[1](
        *args)[0])
    assert not torch.equal(got[0], want[0]) and args[0].grad is None


@pytest.mark.gpu
def test_a_capture_failure_is_recorded_and_the_device_stays_usable():
    h = _quiet_harness("cuda")
    x = torch.randn(1000, device="cuda")
    m = h.measure(lambda: (x,), lambda t: t.sum().item())  # a host sync: cannot be captured
    assert m["status"] == "ok" and m["graph_status"] == "failed", m
    assert "capture" in m["graph_reason"].lower() and "synchronise" not in m["graph_reason"]
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    torch.cuda.empty_cache()  # asserts inside the allocator if the failed capture's pool was left routed to
    y = torch.randn(1000, device="cuda")
    m = h.measure(lambda: (y,), lambda t: t.mul(2))
    assert m["status"] == "ok" and m["graph_status"] == "ok", m


# ---------------------------------------------------------------------------- gpu_check summary
def test_gpu_summary_of_every_record_kind(tmp_path):
    from benchmarks import gpu_summary

    rng = random.Random()
    bench = _synthetic_bench_record(rng)
    bench["results"].append(dict(bench["results"][0], model="vit_h14", status="incomplete", images_per_s=None,
                                 ms_per_step=None, reason="started but did not finish: the process was killed"))
    json.dump(bench, open(tmp_path / "bench-x.json", "w"))
    tri, sdpa_ms = round(rng.uniform(0.1, 1.0), 3), {"sdpa:flash": 0.9, "sdpa:efficient": 0.7, "sdpa:cudnn": 0.8}
    att = {"section": "attention", "op": "attention_qkvpacked", "shape_label": "vit_b16 enc",
           "shape": [256, 12, 50, 64], "direction": "fwd+bwd", "status": "ok", "ms": 9.0, "graph_status": "ok"}
    rows = [dict(att, backend="triton", graph_ms=tri)] + [dict(att, backend=b, graph_ms=m) for b, m in sdpa_ms.items()]
    rows += [dict(att, backend="sdpa:math", status="unsupported", reason="no kernel"),
             {"section": "ops", "op": "mae_loss", "shape_label": "vit_b16", "shape": [1], "backend": "triton",
              "direction": "fwd+bwd", "status": "ok", "ms": 0.2, "x_floor": 2.0, "graph_status": "failed"}]
    json.dump({"kind": "ops", "ceilings": {"copy": {"gbps": 4000.0}, "matmul": {"tflops": 700.0}}, "results": rows},
              open(tmp_path / "ops-x.json", "w"))
    sticky = "AcceleratorError: CUDA error: an illegal memory access was encountered"
    lost_row = dict(att, backend="ext", status="error", cuda_context_lost_here=True,
                    reason=f"boom; then the CUDA context was lost ({sticky}): the later measurements of this run are "
                           "skipped")
    json.dump({"kind": "ops", "ceilings": {"copy": {"gbps": 4000.0}, "matmul": {"tflops": 700.0}},
               "config": {"backends": ["ext", "sdpa"]}, "cuda_context_lost": sticky,
               "results": [lost_row, dict(att, backend="sdpa:flash", status="skipped", reason="lost")]},
              open(tmp_path / "ops-y.json", "w"))
    lost = f"CUDA context lost after patchify ext bf16 s ({sticky})"
    checks = [{"op": "patchify", "backend": "triton", "dtype": "bf16", "shape": "s", "quantity": "out",
               "oracle": "exact", "passed": False, "detail": "mismatch"},
              {"op": "patchify", "backend": "triton", "dtype": "bf16", "shape": "t", "quantity": "-",
               "oracle": "not run", "passed": True, "detail": "time budget of 5 s spent"},
              *({"op": "mae_loss", "backend": "ext", "dtype": "bf16", "shape": sh, "quantity": "-",
                 "oracle": "not run", "passed": True, "detail": lost} for sh in ("s", "t"))]
    json.dump({"kind": "validate", "complete": False, "checks": checks}, open(tmp_path / "validate-x.json", "w"))
    (tmp_path / "zz-broken.json").write_text("{not json")

    text = gpu_summary.summarize(str(tmp_path))
    assert "bench on Synthetic GPU 9000 (bf16)" in text and "incomplete: started but did not finish" in text
    assert f"attention vit_b16 enc (256, 12, 50, 64) triton fwd+bwd {tri:.3f} ms (graph)" in text
    assert f"fastest SDPA sdpa:efficient 0.700 ms (graph), speedup {0.7 / tri:.2f}x" in text
    assert "mae_loss" in text and "graph failed" in text
    assert "validate: 1 checks, 1 failed" in text and "record incomplete" in text
    assert "1 cases not run: time budget of 5 s spent" in text and f"2 cases not run: {lost}" in text
    assert "backends ext,sdpa)" in text and "backends ?)" in text
    assert (f"CUDA CONTEXT LOST at attention attention_qkvpacked ext fwd+bwd: {sticky}; the later measurements "
            "were skipped") in text
    assert "zz-broken.json: unreadable record" in text
    assert gpu_summary.summarize(str(tmp_path / "none")).startswith("no records")
