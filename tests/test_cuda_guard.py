"""A faulting CUDA kernel ends its process's measurements, not the whole run's meaning.

After a kernel faults, every later CUDA call in the process fails with the same sticky
error. :func:`fastmae._timing.cuda_context_lost` tells such a context apart; the tests'
plugin (tests/_cuda_guard.py), ``benchmarks/bench_ops.py`` and ``fastmae validate`` stop
there and name the case that lost it. On the CPU the lost context is simulated by replacing
the probe; on a GPU a real device-side assert is raised in a subprocess.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastmae import _timing
from fastmae import validate as V

pytest_plugins = ("pytester",)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks import bench_ops  # noqa: E402

TESTS = Path(__file__).resolve().parent
STICKY = "AcceleratorError: CUDA error: an illegal memory access was encountered"


def test_probe_without_a_started_cuda_context_is_none():
    assert _timing.cuda_context_lost() is None
    assert _timing.cuda_context_lost("cpu") is None


@pytest.mark.gpu
def test_probe_sees_a_real_sticky_error():
    # a device-side assert (an out-of-range gather index) is sticky; in a subprocess, so this one's context lives
    code = textwrap.dedent("""
        import torch
        from fastmae import _timing
        x = torch.zeros(4, device="cuda")
        print("before:", _timing.cuda_context_lost(), flush=True)
        try:
            x[torch.tensor([1 << 20], device="cuda")].sum().item()
        except Exception as e:
            print("raised:", type(e).__name__, flush=True)
        print("after:", _timing.cuda_context_lost(), flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO).stdout
    lines = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    assert lines["before"] == "None", out
    assert "raised" in lines, out
    assert lines["after"] != "None" and "assert" in lines["after"].lower(), out


# ----------------------------------------------------------------------------- the pytest plugin
_INNER_CONFTEST = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
import _cuda_guard
from _cuda_guard import pytest_runtest_makereport  # noqa: F401

state = {{"lost": None}}
_cuda_guard.probe = lambda: state["lost"]
"""

_INNER_TESTS = """
import conftest

def test_a_before():
    assert conftest.state["lost"] is None

def test_b_plain_failure():
    raise AssertionError("an ordinary failure: the context is fine")

def test_c_faults():
    conftest.state["lost"] = "fake sticky error"
    raise RuntimeError("CUDA error: an illegal memory access was encountered")

def test_d_after():
    assert conftest.state["lost"] is None  # a fresh process: the sticky error is not inherited
"""


def _inner(pytester, monkeypatch):
    # the inner run is a plain session (or its own xdist run), not a worker of this one's
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    pytester.makeconftest(_INNER_CONFTEST)
    pytester.makepyfile(test_inner=_INNER_TESTS)


def test_plugin_stops_a_plain_session_at_the_lost_context(pytester, monkeypatch):
    _inner(pytester, monkeypatch)
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:xdist")
    res.assert_outcomes(passed=1, failed=2)  # test_d never runs
    out = res.stdout.str()
    assert "CUDA context lost in test_inner.py::test_c_faults (call): fake sticky error" in out
    assert "1 passed" in out and "2 failed" in out


def test_plugin_replaces_the_xdist_worker_and_runs_the_rest(pytester, monkeypatch):
    pytest.importorskip("xdist")
    _inner(pytester, monkeypatch)
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "1")
    out = res.stdout.str() + res.stderr.str()
    # test_c crashed its worker (reported as a failure naming it); test_d ran on a fresh worker and passed
    res.assert_outcomes(passed=2, failed=2)
    assert "test_c_faults" in out and "crashed" in out
    assert "CUDA context lost in test_inner.py::test_c_faults" in out


# ----------------------------------------------------------------------------- bench_ops
def test_bench_ops_harness_skips_after_a_lost_context(monkeypatch):
    lost = {"now": None}
    monkeypatch.setattr(_timing, "cuda_context_lost", lambda device=None: lost["now"])
    h = bench_ops.Harness("cpu", warmup=0, reps=2, budget=None, progress=_timing.ProgressBar(1, enabled=False),
                          graphs=False)
    make = lambda: (torch.randn(8),)  # noqa: E731

    def plain_failure(x):
        raise RuntimeError("an ordinary error")

    m = h.measure(make, plain_failure)
    assert m["status"] == "error" and m["reason"] == "an ordinary error" and h.lost is None
    assert h.measure(make, lambda x: x + 1)["status"] == "ok"  # an ordinary error does not stop the run

    def faults(x):
        lost["now"] = STICKY
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    m = h.measure(make, faults)
    assert m["status"] == "error" and h.lost == STICKY
    assert "then the CUDA context was lost" in m["reason"] and STICKY in m["reason"]
    calls = []
    m = h.measure(lambda: calls.append("make") or (torch.randn(8),), lambda x: calls.append("fn"))
    assert m == {"status": "skipped", "reason": f"CUDA context lost earlier in this run ({STICKY})"}
    assert calls == []  # nothing of the later case ran


# ----------------------------------------------------------------------------- validate
def test_validate_marks_the_cases_after_a_lost_context_not_run(monkeypatch):
    lost = {"now": None}
    monkeypatch.setattr(_timing, "cuda_context_lost", lambda device=None: lost["now"])
    ran = []

    def case(b, dt, s, device):
        ran.append(b)
        if b == "triton":
            raise RuntimeError("an ordinary error")
        if b == "ext":
            lost["now"] = STICKY
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        yield "out", "exact", (0.0, 0.0, True, "")

    op = "patchify"
    monkeypatch.setitem(V._CASES, op, case)
    one_shape = V.shapes(torch.device("cpu"), 2, quick=True)[0][:1]
    monkeypatch.setattr(V, "shapes", lambda device, batch, quick: (one_shape, []))
    checks = V.validate("cpu", [op], ["torch", "triton", "ext"], [torch.float32, torch.float16])
    by = [(c.backend, c.dtype, c.oracle, c.passed) for c in checks]
    # torch ran in both dtypes; triton's ordinary error did not stop it; ext lost the context in fp32
    assert by == [("torch", "fp32", "exact", True), ("torch", "fp16", "exact", True),
                  ("triton", "fp32", "error", False), ("triton", "fp16", "error", False),
                  ("ext", "fp32", "error", False), ("ext", "fp16", "not run", True)], by
    assert ran == ["torch", "torch", "triton", "triton", "ext"]
    assert "then the CUDA context was lost" in checks[4].detail
    assert [c.cuda_context_lost_here for c in checks] == [False] * 4 + [True, False]
    assert checks[5].detail.startswith(f"CUDA context lost after {op} ext fp32 ") and STICKY in checks[5].detail


def test_validate_record_names_the_case_that_lost_the_context(monkeypatch, tmp_path):
    import json

    from fastmae.cli import main

    lost = {"now": None}

    def case(b, dt, s, device):
        if b == "ext":
            lost["now"] = STICKY
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        yield "out", "exact", (0.0, 0.0, True, "")

    path = tmp_path / "v.json"
    with monkeypatch.context() as mp:  # undone before the suite's own context check after the test
        mp.setattr(_timing, "cuda_context_lost", lambda device=None: lost["now"])
        mp.setitem(V._CASES, "patchify", case)
        assert main(["validate", "--quick", "--quiet", "--device", "cpu", "--ops", "patchify,unpatchify",
                     "--backends", "torch,ext", "--json", str(path)]) == 1
    rec = json.load(open(path))
    assert rec["cuda_context_lost"].startswith("patchify ext fp32 ") and STICKY in rec["cuda_context_lost"]
    marked = [c for c in rec["checks"] if c["cuda_context_lost_here"]]
    assert len(marked) == 1 and (marked[0]["op"], marked[0]["backend"]) == ("patchify", "ext")
    assert {c["oracle"] for c in rec["checks"] if c["op"] == "unpatchify"} == {"not run"}
