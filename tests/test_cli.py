"""The ``fastmae`` command on the CPU: ``bench`` with no arguments, ``validate``, and their failure paths.

Everything runs in-process through :func:`fastmae.cli.main` (one subprocess checks
``python -m fastmae``). Under the test suite TRITON_INTERPRET=1 is set (conftest), so
``validate`` includes the Triton kernels through the interpreter; shapes are kept small.
"""

import csv
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

import fastmae.ext
import fastmae.ops
from fastmae import reference
from fastmae.backend import BackendUnavailableError
from fastmae.cli import main
from fastmae.validate import OPS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one(pattern):
    files = glob.glob(pattern)
    assert len(files) == 1, files
    return files[0]


# ---------------------------------------------------------------------------- bench
def test_bench_no_arguments_on_cpu_writes_json_csv_png(tmp_path, monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("the no-argument run is the GPU configuration here (minutes)")
    monkeypatch.chdir(tmp_path)
    assert main(["bench"]) == 0
    out = capsys.readouterr().out
    # the table, the encoder-only speedup and the CPU note are on the terminal
    assert "img/s" in out and "encoder-only speedup" in out and "stock backend only" in out

    rec = json.load(open(_one(str(tmp_path / "bench-out" / "bench-*.json"))))
    assert rec["kind"] == "bench" and rec["env"]["device"] == "cpu"
    for key in ("card", "torch", "triton", "git_commit", "date", "command"):
        assert rec["env"][key], key
    assert rec["env"]["command"] == "fastmae bench"
    assert rec["config"]["models"] == ["tiny"] and rec["config"]["backends"] == ["torch"]
    assert rec["config"]["dtype"] == "fp32"
    res = rec["results"]
    assert {(r["backend"], r["encoder"]) for r in res} == {("torch", "visible"), ("torch", "mask_tokens")}
    for r in res:
        assert r["status"] == "ok", r
        assert len(r["ms_all"]) == rec["config"]["steps"]
        assert r["ms_per_step"] > 0 and r["images_per_s"] == pytest.approx(r["batch_size"] / r["ms_per_step"] * 1e3)
        assert r["peak_mem_gib"] is None  # n/a on the CPU
        assert r["mfu"] == pytest.approx(r["tflops"] / rec["ceilings"]["matmul"]["tflops"])
        assert r["loss"] == r["loss"]  # finite loss, not NaN
    vis, mt = sorted(res, key=lambda r: r["encoder"] != "visible")
    assert mt["gflop_per_image"] > vis["gflop_per_image"]  # the mask-token encoder runs on all tokens
    (enc,) = rec["encoder_only_speedup"]
    assert enc["encoder_only_speedup"] == pytest.approx(mt["ms_per_step"] / vis["ms_per_step"])

    with open(_one(str(tmp_path / "bench-out" / "bench-*.csv"))) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {r["status"] for r in rows} == {"ok"}
    assert all(r["git_commit"] == rec["env"]["git_commit"] and r["card"] == rec["env"]["card"] for r in rows)
    pngs = glob.glob(str(tmp_path / "bench-out" / "bench-*.png"))
    try:
        import matplotlib  # noqa: F401

        assert len(pngs) == 1 and open(pngs[0], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    except ImportError:
        assert not pngs and "matplotlib is not installed" in out


def _small_bench(tmp_path, *extra):
    return main(["bench", "--out", str(tmp_path), "--steps", "1", "--warmup", "1", "--no-plot", "--quiet", *extra])


def test_bench_reports_unavailable_backends(tmp_path, monkeypatch, capsys):
    # the CUDA extension is not built; a Triton kernel module that does not import is the other case
    impls = dict(fastmae.ops._IMPLS)
    impls["encoder_input"] = {"triton": "fastmae.kernels.no_such_module:encoder_input"}
    monkeypatch.setattr(fastmae.ops, "_IMPLS", impls)
    # as if the extension were not built (backend="ext" runs on CPU tensors when it is)
    monkeypatch.setattr(fastmae.ext, "problem", lambda: "fastmae's compiled extension fastmae._C is not built")
    rc = _small_bench(tmp_path, "--device", "cpu", "--backends", "torch,triton,ext", "--encoder", "visible")
    assert rc == 0
    out = capsys.readouterr().out
    rec = json.load(open(_one(str(tmp_path / "bench-*.json"))))
    status = {r["backend"]: (r["status"], r["reason"]) for r in rec["results"]}
    assert status["torch"][0] == "ok"
    assert status["ext"][0] == "unavailable" and "fastmae._C" in status["ext"][1]
    assert status["triton"][0] == "unavailable"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        assert "no_such_module" in status["triton"][1]
    assert "unavailable" in out and "fastmae._C" in out


def test_bench_error_in_a_configuration_is_reported_and_fails(tmp_path, monkeypatch, capsys):
    import fastmae.bench

    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(fastmae.bench, "build_model", broken)
    assert _small_bench(tmp_path, "--device", "cpu", "--encoder", "visible") == 1
    rec = json.load(open(_one(str(tmp_path / "bench-*.json"))))
    (r,) = rec["results"]
    assert r["status"] == "error" and "kernel exploded" in r["reason"] and r["ms_per_step"] is None
    out = capsys.readouterr().out
    assert "error" in out and "RuntimeError: kernel exploded" in out


def test_bench_nan_loss_is_an_error_not_a_throughput(tmp_path, monkeypatch):
    import fastmae.bench

    real = fastmae.bench.build_model

    def nan_model(*args, **kwargs):
        model = real(*args, **kwargs)
        forward = model.forward

        def poisoned(*a, **k):
            loss, pred, mask = forward(*a, **k)
            return loss * float("nan"), pred, mask

        model.forward = poisoned
        return model

    monkeypatch.setattr(fastmae.bench, "build_model", nan_model)
    assert _small_bench(tmp_path, "--device", "cpu", "--encoder", "visible") == 1
    (r,) = json.load(open(_one(str(tmp_path / "bench-*.json"))))["results"]
    assert r["status"] == "error" and "not finite" in r["reason"]


def test_bench_records_a_configuration_before_running_it(tmp_path, monkeypatch):
    # A run killed inside a configuration (time limit, kernel fault) leaves it on record
    # as "incomplete"; once it finishes, its result replaces that row.
    import fastmae.bench

    seen = []
    real = fastmae.bench._run_config

    def spy(cfg, *args, **kwargs):
        rec = json.load(open(_one(str(tmp_path / "bench-*.json"))))
        seen.append([(r["encoder"], r["status"]) for r in rec["results"]])
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(fastmae.bench, "_run_config", spy)
    assert _small_bench(tmp_path, "--device", "cpu") == 0
    assert seen == [[("visible", "incomplete")], [("visible", "ok"), ("mask_tokens", "incomplete")]]
    rec = json.load(open(_one(str(tmp_path / "bench-*.json"))))
    assert [(r["encoder"], r["status"]) for r in rec["results"]] == [("visible", "ok"), ("mask_tokens", "ok")]
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.parametrize("ratios", ["0.95", "0.3", "0.5..0.95", "abc"])
def test_bench_rejects_bad_mask_ratios(tmp_path, ratios, capsys):
    assert _small_bench(tmp_path, "--mask-ratios", ratios) == 2
    assert "mask ratio" in capsys.readouterr().err


def test_bench_rejects_unknown_model_and_backend(tmp_path, capsys):
    assert _small_bench(tmp_path, "--models", "vit_x") == 2
    assert _small_bench(tmp_path, "--backends", "torch,tpu") == 2
    err = capsys.readouterr().err
    assert "vit_x" in err and "tpu" in err


def test_bench_time_budget_skips_the_rest(tmp_path):
    assert _small_bench(tmp_path, "--device", "cpu", "--time-budget", "0") == 0
    rec = json.load(open(_one(str(tmp_path / "bench-*.json"))))
    assert {r["status"] for r in rec["results"]} == {"skipped"}


def _spy_compile(monkeypatch):
    # torch.compile of even the tiny model takes a minute on these cores: the argument
    # handling is what is tested here (tests/test_fused_block.py compiles the model itself)
    calls = []

    def fake_compile(model, **kwargs):
        calls.append(kwargs)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    return calls


def test_bench_compile_measures_eager_and_compiled_side_by_side(tmp_path, monkeypatch, capsys):
    calls = _spy_compile(monkeypatch)
    assert _small_bench(tmp_path, "--device", "cpu", "--encoder", "visible", "--compile") == 0
    rec = json.load(open(_one(str(tmp_path / "bench-*.json"))))
    assert rec["config"]["modes"] == ["eager", "compiled"] and rec["config"]["compile"] is True
    assert [(r["backend"], r["mode"], r["status"]) for r in rec["results"]] == [
        ("torch", "eager", "ok"), ("torch", "compiled", "ok")]
    assert len(calls) == 1  # the compiled row's model, and only it
    (sp,) = rec["speedup_vs_stock_modes"]
    assert sp["mode"] == "compiled" and sp["vs_stock_eager"] == pytest.approx(
        rec["results"][0]["ms_per_step"] / rec["results"][1]["ms_per_step"])
    out = capsys.readouterr().out
    assert "compiled" in out and "vs stock eager" in out
    with open(_one(str(tmp_path / "bench-*.csv"))) as f:
        assert [r["mode"] for r in csv.DictReader(f)] == ["eager", "compiled"]


def test_bench_cuda_graph_on_cpu_reports_graphed_rows_unavailable(tmp_path, monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the graphed rows run")
    _spy_compile(monkeypatch)
    rc = _small_bench(tmp_path, "--device", "cpu", "--encoder", "visible", "--cuda-graph")
    assert rc == 0  # unavailable is not a failure
    rec = json.load(open(_one(str(tmp_path / "bench-*.json"))))
    assert rec["config"]["modes"] == ["eager", "compiled", "graphed"]
    by_mode = {r["mode"]: r for r in rec["results"]}
    assert by_mode["eager"]["status"] == by_mode["compiled"]["status"] == "ok"
    assert by_mode["graphed"]["status"] == "unavailable" and "CUDA" in by_mode["graphed"]["reason"]
    assert by_mode["graphed"]["ms_per_step"] is None
    # run cheapest first (a time budget drops compiles first), shown eager, compiled, graphed
    assert [r["mode"] for r in rec["results"]] == ["eager", "graphed", "compiled"]
    out = capsys.readouterr().out
    assert "graphed" in out and "needs a CUDA device" in out
    table = [line.split()[4] for line in out.splitlines() if line.startswith("tiny ")][:3]
    assert table == ["eager", "compiled", "graphed"], out


def test_bench_modes_option(tmp_path, monkeypatch, capsys):
    _spy_compile(monkeypatch)
    assert _small_bench(tmp_path, "--modes", "eager,warp") == 2
    assert "warp" in capsys.readouterr().err
    # --modes overrides the shorthands, and runs in the order eager, compiled, graphed
    assert _small_bench(tmp_path, "--device", "cpu", "--encoder", "visible", "--modes", "compiled,eager",
                        "--cuda-graph") == 0
    rec = json.load(open(_one(str(tmp_path / "bench-*.json"))))
    assert [r["mode"] for r in rec["results"]] == ["eager", "compiled"]


# ---------------------------------------------------------------------------- validate
def test_validate_on_cpu_exits_0_and_lists_every_op(tmp_path, capsys):
    path = tmp_path / "v.json"
    assert main(["validate", "--quick", "--quiet", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    for op in OPS:
        assert op in out
    rec = json.load(open(path))
    assert rec["kind"] == "validate" and rec["passed"] is True
    checks = rec["checks"]
    by = {(c["op"], c["backend"]) for c in checks if c["oracle"] != "skip"}
    for op in OPS:
        assert (op, "torch") in by  # the reference backend always runs
    assert ("attention", "sdpa") in by
    # backends that cannot run are listed as skipped with a reason, not silently dropped
    skipped = {(c["op"], c["backend"]): c["detail"] for c in checks if c["oracle"] == "skip"}
    for op in OPS:  # the extension's C++ kernels ran (where it has the op), or say why not
        assert (op, "ext") in by or skipped[(op, "ext")]
    for op in OPS:  # the Triton kernels (through the interpreter here) ran, or say why not
        assert (op, "triton") in by or skipped[(op, "triton")]
    assert all(c["passed"] for c in checks)
    oracles = {c["op"]: set() for c in checks}
    for c in checks:
        if c["oracle"] != "skip":
            oracles[c["op"]].add(c["oracle"])
    assert oracles["patchify"] == {"exact"}
    assert "invariants" in oracles["random_masking"]
    assert oracles["attention"] == {"2x"}
    assert "rel" in oracles["mae_loss"]


def _fake_triton(monkeypatch, impls):
    """Route backend="triton" of the ops in ``impls`` to the given functions."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
        pytest.skip("the triton backend cannot run here")
    pytest.importorskip("triton")
    real = fastmae.ops._impl
    monkeypatch.setattr(fastmae.ops, "_impl", lambda op, b: impls[op] if op in impls else real(op, b))


def test_validate_rewrites_its_record_after_every_case(tmp_path, monkeypatch):
    # a run killed at its time limit keeps the record of what it checked
    from fastmae import _timing

    writes = []
    real = _timing.write_json

    def spy(path, obj):
        writes.append((obj["complete"], len(obj["checks"])))
        real(path, obj)

    monkeypatch.setattr(_timing, "write_json", spy)
    path = tmp_path / "v.json"
    assert main(["validate", "--quick", "--quiet", "--ops", "patchify,mae_loss", "--backends", "torch",
                 "--json", str(path)]) == 0
    assert len(writes) >= 3 and [c for c, _ in writes] == [False] * (len(writes) - 1) + [True]
    assert [n for _, n in writes] == sorted(n for _, n in writes) and writes[0][1] > 0
    rec = json.load(open(path))
    assert rec["complete"] and rec["passed"] and len(rec["checks"]) == writes[-1][1]


def test_validate_fails_on_a_wrong_forward(monkeypatch, capsys):
    _fake_triton(monkeypatch, {"patchify": lambda imgs, p: reference.patchify(imgs, p).roll(1, dims=-1)})
    assert main(["validate", "--quick", "--quiet", "--ops", "patchify", "--backends", "triton"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "patchify [triton" in out and "out: exact" in out


def test_validate_fails_on_a_wrong_gradient(monkeypatch, capsys):
    def grad_off_by_a_thousandth(imgs, p):
        x = reference.patchify(imgs, p)
        return x + (x * 1e-3 - (x * 1e-3).detach())  # forward bit-exact, gradient scaled by 1.001

    _fake_triton(monkeypatch, {"patchify": grad_off_by_a_thousandth})
    assert main(["validate", "--quick", "--quiet", "--ops", "patchify", "--backends", "triton"]) == 1
    out = capsys.readouterr().out
    assert "grad imgs: exact" in out and "out: exact" not in out


def test_validate_fails_on_inaccurate_attention(monkeypatch, capsys):
    def noisy(qkv, scale=None):
        out = reference.attention_qkvpacked(qkv, scale)
        return out + 1e-3 * torch.randn_like(out)  # fp32: far above 2x PyTorch's own error

    _fake_triton(monkeypatch, {"attention_qkvpacked": noisy})
    assert main(["validate", "--quick", "--quiet", "--ops", "attention_qkvpacked", "--backends", "triton"]) == 1
    assert "out: 2x" in capsys.readouterr().out


def test_validate_skips_an_unavailable_backend(monkeypatch, capsys):
    from fastmae import ext

    monkeypatch.setattr(ext, "problem", lambda: "fastmae._C is not built (simulated)")
    assert main(["validate", "--quick", "--quiet", "--ops", "mae_loss", "--backends", "torch,ext"]) == 0
    out = capsys.readouterr().out
    assert "skip" in out and "fastmae._C is not built (simulated)" in out


def test_validate_fails_a_backend_that_runs_here_but_does_not_import(monkeypatch, capsys, tmp_path):
    """A kernel module that fails to import (an API an older triton lacks, say) while its backend
    runs here is a failure, not a skip: the backend is there, the op is broken."""
    def broken(*args, **kwargs):
        raise BackendUnavailableError("backend='triton' for mae_loss: cannot import fastmae.kernels.loss "
                                      "(AttributeError: module 'triton.language' has no attribute 'nope')")

    _fake_triton(monkeypatch, {"mae_loss": broken})
    path = tmp_path / "v.json"
    assert main(["validate", "--quick", "--quiet", "--ops", "mae_loss", "--backends", "torch,triton",
                 "--json", str(path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "unavailable although backend 'triton' runs on cpu and implements mae_loss" in out
    rec = json.load(open(path))
    assert rec["passed"] is False and rec["cuda_context_lost"] is None
    assert not any(c["oracle"] == "skip" for c in rec["checks"])


def test_validate_that_checks_nothing_is_not_a_pass(tmp_path, capsys):
    path = tmp_path / "v.json"
    assert main(["validate", "--quiet", "--ops", "patchify", "--time-budget", "0", "--json", str(path)]) == 1
    assert "nothing was checked" in capsys.readouterr().err
    rec = json.load(open(path))
    assert rec["passed"] is False and rec["checks"] and all(c["oracle"] == "not run" for c in rec["checks"])


def test_validate_rejects_unknown_names(capsys):
    assert main(["validate", "--ops", "nope"]) == 2
    assert main(["validate", "--backends", "tpu"]) == 2
    assert main(["validate", "--dtypes", "fp8"]) == 2


def test_python_m_fastmae(tmp_path):
    """``python -m fastmae`` is the same command (and its exit status comes through)."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-m", "fastmae", "validate", "--quick", "--quiet", "--ops", "patchify",
                        "--backends", "torch", "--device", "cpu"], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "patchify" in r.stdout and "pass" in r.stdout
    r = subprocess.run([sys.executable, "-m", "fastmae"], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=120)
    assert r.returncode == 2 and "bench" in r.stdout and "validate" in r.stdout


# ---------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
def test_bench_on_gpu_stock_and_triton(tmp_path):
    """The GPU path: CUDA-event timing, peak memory, fused AdamW, bf16 autocast, both backends."""
    rc = main(["bench", "--models", "tiny", "--backends", "torch,triton", "--batch-size", "32", "--steps", "3",
               "--warmup", "2", "--out", str(tmp_path), "--no-plot", "--quiet"])
    rec = json.load(open(_one(str(tmp_path / "bench-*.json"))))
    assert rc == 0, [(r["backend"], r["status"], r["reason"]) for r in rec["results"]]
    assert rec["env"]["device"] == "cuda" and rec["config"]["dtype"] == "bf16"
    assert rec["ceilings"]["matmul"]["n"] == 8192 and rec["ceilings"]["copy"]["gbps"] > 0
    assert len(rec["results"]) == 4
    for r in rec["results"]:
        assert r["status"] == "ok" and r["peak_mem_gib"] > 0 and 0 < r["mfu"] < 1
        assert r["loss"] == r["loss"]
    assert len(rec["encoder_only_speedup"]) == 2 and len(rec["speedup_vs_stock"]) == 2


@pytest.mark.gpu
def test_validate_on_gpu_quick(capsys):
    rc = main(["validate", "--quick", "--quiet", "--batch", "4"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for op in OPS:
        assert op in out
