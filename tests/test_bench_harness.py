"""The measuring machinery: the FLOP count, the validate oracles, the timing helpers, the
micro-benchmark harness (a CPU smoke run) and the RESULTS.md generator.

No figure here is a performance claim: CPU times only show that the plumbing works.
"""

import io
import json
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

from benchmarks import bench_ops, make_results  # noqa: E402


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
        assert r["x_floor"] == pytest.approx(r["ms"] / r["floor_ms"])
    att = [r for r in rec["results"] if r["section"] == "attention"]
    assert {r["backend"] for r in att} == {"sdpa:flash", "sdpa:efficient", "sdpa:cudnn", "sdpa:math"}
    math_row = next(r for r in att if r["backend"] == "sdpa:math" and r["direction"] == "fwd")
    assert math_row["status"] == "ok" and 0 < math_row["frac_matmul"]
    assert "[ops]" in capsys.readouterr().out


def test_bench_ops_refuses_to_guess_a_device(capsys):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert bench_ops.main(["--quiet"]) == 2
    assert "--device cpu" in capsys.readouterr().err


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
