"""scripts/gpu_check.sh returns everything in at most 8 files (the device tool's limit).

The packer (benchmarks/gpu_pack.py) is tested on a synthetic work folder shaped like a full
run's (every step's log, every record kind, the bench's CSV and plots, one oversized log);
the script itself is run on the CPU for its cheapest step (a tiny-model bench), which goes
through the same packing.
"""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks import gpu_pack  # noqa: E402

STEPS = ("bench", "gpu_tests", "harness_tests", "bench_ops", "validate", "kernel_tests", "build_ext", "pack")


def _full_run_work(work: Path, pngs: int = 9) -> set[str]:
    """A work folder with what a full gpu_check run leaves (more PNGs than can be returned)."""
    names = set()

    def put(rel, data):
        p = work / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
        names.add(rel)

    put("env.txt", "torch 2.11\n")
    for s in STEPS:
        put(f"logs/{s}.log", f"{s} output {os.urandom(8).hex()}\n" * 50)
    for kind, sub in (("bench", "bench"), ("ops", "ops"), ("validate", "validate")):
        rec = json.dumps({"kind": kind, "nonce": os.urandom(8).hex()})
        put(f"{sub}/{kind}-h200-20261201.json", rec)
        put(f"records/{kind}-h200-20261201.json", rec)
    put("bench/bench-h200-20261201.csv", "a,b\n1,2\n")
    for i in range(pngs):
        put(f"bench/plot{i}.png", b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    put("summary.txt", "step table\n")
    return names


def _returned(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.is_file()]


def test_pack_returns_at_most_8_files_holding_everything(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    names = _full_run_work(work)
    big = work / "logs" / "huge.log"
    big.write_bytes(b"x" * (gpu_pack.MAX_LOG_BYTES * 3))
    names.add("logs/huge.log")
    written = gpu_pack.pack(str(work), str(out))
    files = _returned(out)
    assert 1 <= len(files) <= gpu_pack.MAX_FILES == 8
    assert sorted(p.name for p in files) == sorted(written)
    assert all(p.parent == out for p in files)  # nothing in sub-folders
    assert all(p.stat().st_size <= gpu_pack.MAX_FILE_BYTES for p in files)
    assert (out / "summary.txt").read_text() == "step table\n"
    with tarfile.open(out / "records.tar.gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == names
        # records and logs arrive byte for byte; the oversized log is cut to head + tail
        for rel in names - {"logs/huge.log"}:
            assert tar.extractfile(members[rel]).read() == (work / rel).read_bytes(), rel
        huge = tar.extractfile(members["logs/huge.log"]).read()
    assert len(huge) < gpu_pack.MAX_LOG_BYTES + 100 and b"bytes cut" in huge
    assert sum(p.suffix == ".png" for p in files) == gpu_pack.MAX_PNGS


def test_pack_is_rerunnable_and_refuses_a_work_folder_inside_out(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    _full_run_work(work, pngs=1)
    first = gpu_pack.pack(str(work), str(out))
    (work / "records" / "late.json").write_text("{}")
    second = gpu_pack.pack(str(work), str(out))  # after a later step: rewritten, not added to
    assert first == second and len(_returned(out)) == len(second) <= 8
    with tarfile.open(out / "records.tar.gz") as tar:
        assert "records/late.json" in tar.getnames()
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    (out / "inner").mkdir()
    with pytest.raises(ValueError, match="outside"):
        gpu_pack.pack(str(out / "inner"), str(out))
    with pytest.raises(ValueError, match="does not exist"):
        gpu_pack.pack(str(tmp_path / "missing"), str(out))


def test_gpu_check_script_leaves_at_most_8_files(tmp_path):
    """The real script, its cheapest step only (tiny-model bench on the CPU), then the summary."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_STEPS="bench", GPU_CHECK_BENCH_ARGS="--models tiny",
               GPU_CHECK_WORK=str(work), GPU_CHECK_BUDGET_S="200", TRITON_CACHE_DIR=str(tmp_path / "triton"))
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(out)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = _returned(out)
    assert len(files) <= 8 and all(p.parent == out for p in files), [str(p) for p in files]
    assert {"records.tar.gz", "summary.txt"} <= {p.name for p in files}
    with tarfile.open(out / "records.tar.gz") as tar:
        got = tar.getnames()
    assert "env.txt" in got and "logs/bench.log" in got and "summary.txt" in got
    assert any(n.startswith("records/bench-") and n.endswith(".json") for n in got)
    assert "not asked for" in (out / "summary.txt").read_text()


def test_ext_sanitize_workload_runs_on_the_cpu_twins(capsys):
    """scripts/ext_sanitize.py (the compute-sanitizer workload of gpu_check.sh) through the C++ twins:
    every case runs, and each op of the extension has cases."""
    from _ext import require_ext

    require_ext()
    sys.path.insert(0, str(REPO / "scripts"))
    import ext_sanitize

    assert ext_sanitize.main(["--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    ran = [line.split()[1] for line in lines if line.startswith("ok  ")]
    assert set(ran) == {"patchify", "encoder_input", "decoder_unshuffle", "mae_loss", "add_layer_norm", "bias_gelu",
                        "attention"}
    assert lines[-1] == f"ext_sanitize: {len(ran)} cases on cpu"
    assert ext_sanitize.main(["--device", "cpu", "--only", "no such case"]) == 1


def test_gpu_check_refuses_a_work_folder_inside_out(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_WORK=str(out / "w"))
    r = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(out)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "outside OUT_DIR" in r.stderr


def test_summary_and_results_show_the_block_ops_sections():
    """bench_ops' norms and bias_gelu sections reach the summary and RESULTS.md, not only ops/attention."""
    from benchmarks import gpu_summary, make_results

    rows = []
    for section, op, label in (("norms", "add_layer_norm", "ViT-B encoder"), ("bias_gelu", "bias_gelu", "decoder fc1"),
                               ("ops", "patchify", "vit_l16")):
        xf = round(1 + int.from_bytes(os.urandom(2), "little") / 65536, 3)
        rows.append({"section": section, "op": op, "shape_label": label, "shape": [12800, 768], "backend": "triton",
                     "direction": "fwd+bwd", "status": "ok", "ms": 0.5, "x_floor": xf, "floor_ms": 0.5 / xf,
                     "graph_status": "skipped"})
    ceilings = {"copy": {"gbps": 4000.0}, "matmul": {"tflops": 700.0, "dtype": "bf16", "n": 8192}}
    rec = {"kind": "ops", "ceilings": ceilings,
           "config": {"dtype": "bf16", "reps": 20, "warmup": 5},
           "env": {"card": "Synthetic GPU", "date": "2026-12-01", "command": "bench_ops", "commit": "abc"},
           "results": rows, "_file": "ops-x.json"}
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "ops-x.json"), "w") as f:
            json.dump(rec, f)
        text = gpu_summary.summarize(d)
    for r in rows[:2]:
        assert f"{r['op']} {r['shape_label']}" in text and f"{r['x_floor']:6.1f}x floor" in text
    assert "patchify" not in text  # data-path ops are summarised at ViT-B/16 only
    md = make_results._render_ops(rec)
    assert "### LayerNorm and add + LayerNorm" in md and "### Bias + GELU" in md and "### Data-path ops" in md
    assert f"{rows[0]['x_floor']:.1f}x" in md and f"{rows[1]['x_floor']:.1f}x" in md


def _fake_python(tmp_path, ext_loads: bool, seconds: int) -> Path:
    """A stand-in for the GPU machine's python: the script's own helpers (-c checks, the packer and
    the summary) run for real; every step's command sleeps ``seconds`` and succeeds."""
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
case "$*" in
    *has_cuda_kernels*) exit {0 if ext_loads else 1} ;;
    "-c "*|"-m benchmarks.gpu_pack "*|"-m benchmarks.gpu_summary "*) exec {sys.executable} "$@" ;;
    *) sleep {seconds}; echo "ran: $*"; exit 0 ;;
esac
""")
    fake.chmod(0o755)
    return fake


def _summary_rows(text: str) -> dict[str, str]:
    rows = {}
    for line in text.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0].replace("_", "").isalpha() and parts[0] != "step":
            rows[parts[0]] = parts[1].rsplit(None, 1)[0].strip()
    return rows


DEFAULT = ["build_ext", "ext_smoke", "gpu_tests", "bench_ops_ext", "bench", "validate"]
OPTIONAL = ["validate_ext", "bench_compiled", "harness_tests", "bench_ops", "kernel_tests", "bench_step",
            "pretrain_step", "pretrain_vs_bench", "data_transfer"]


@pytest.mark.parametrize("ext_loads", [True, False])
def test_default_plan_runs_the_wanted_steps_and_names_the_rest(tmp_path, ext_loads):
    """The default call runs the steps one lease allows, every one of them started; the others are
    'not asked for' (not failures). Without a CUDA build the extension's steps are skipped as
    failures instead of measuring nothing and reporting ok."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, PYTHON=str(_fake_python(tmp_path, ext_loads, 1)), GPU_CHECK_WORK=str(work))
    env.pop("GPU_CHECK_STEPS", None)
    r = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(out)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    rows = _summary_rows((out / "summary.txt").read_text())
    ext_steps = {"ext_smoke", "bench_ops_ext"}
    for name in DEFAULT:
        want = "skipped (no CUDA extension)" if name in ext_steps and not ext_loads else "ok"
        assert rows.get(name) == want, (name, rows)
    for name in OPTIONAL:
        assert rows.get(name) == "not asked for (GPU_CHECK_STEPS)", (name, rows)
    assert r.returncode == (0 if ext_loads else 1), r.stdout[-2000:]


def test_default_plan_leaves_each_later_step_its_share(tmp_path):
    """Every step using its whole allowance (a simulated clock: `timeout` advances it by its limit
    and fails), the 570 s budget still reaches the last default step with a useful share (the old
    plan gave bench and its compiled run most of it, and the later steps 20 s or none)."""
    out, work, bin_dir = tmp_path / "out", tmp_path / "work", tmp_path / "bin"
    bin_dir.mkdir()
    clock = tmp_path / "clock"
    clock.write_text("1000000\n")
    (bin_dir / "date").write_text(f"""#!/usr/bin/env bash
if [ "$1" = "+%s" ]; then cat {clock}; else exec /bin/date "$@"; fi
""")
    (bin_dir / "timeout").write_text(f"""#!/usr/bin/env bash
[ "$1" = "-k" ] && shift 2
echo "limit $1" >> {tmp_path / "limits"}
echo $(( $(cat {clock}) + $1 )) > {clock}
exit 124
""")
    for f in ("date", "timeout"):
        (bin_dir / f).chmod(0o755)
    env = dict(os.environ, PYTHON=str(_fake_python(tmp_path, True, 0)), GPU_CHECK_WORK=str(work),
               GPU_CHECK_BUDGET_S="570", PATH=f"{bin_dir}:{os.environ['PATH']}")
    env.pop("GPU_CHECK_STEPS", None)
    r = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(out)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    limits = {line.split("== ")[1].split(" (timeout ")[0]: int(line.split("(timeout ")[1].split("s)")[0])
              for line in r.stdout.splitlines() if line.startswith("== ") and "(timeout " in line}
    assert list(limits) == DEFAULT, (limits, r.stdout[-2000:])
    assert sum(limits.values()) <= 570 - 15, limits  # the reserve for packing and the summary
    assert all(t >= 30 for t in limits.values()), limits
    assert limits["gpu_tests"] >= 100 and limits["bench_ops_ext"] >= 100 and limits["bench"] >= 80, limits
    assert limits["validate"] >= 40 and limits["build_ext"] >= 180, limits
    assert r.returncode == 1  # every step timed out


def test_summary_shows_the_pretrain_vs_bench_comparison(tmp_path):
    from benchmarks import gpu_summary
    from fastmae.pretrain import measure

    bench = {"env": {"card": "Synthetic GPU"}, "results": [
        {"model": measure.BENCH_MODEL.get("mae_vit_base_patch16", "mae_vit_base_patch16"), "batch_size": 256,
         "backend": "triton", "mode": "eager", "encoder": "visible", "mask_ratio": 0.75, "status": "ok",
         "reason": "", "ms_per_step": 100.0}]}
    step_ms = 100.0 + int.from_bytes(os.urandom(1), "little") / 64  # up to 4% over
    rows = [{"step_ms": 999.0}] + [{"step_ms": step_ms}] * 3
    rec = measure.compare(bench, rows, "mae_vit_base_patch16", 256, "triton")
    (tmp_path / "pretrain-vs-bench.json").write_text(json.dumps(rec))
    text = gpu_summary.summarize(str(tmp_path))
    assert "unknown record kind" not in text
    assert f"{step_ms:.3f} vs 100.000 ms/step" in text
    assert ("NOT within 3%" in text) == (step_ms > 103.0)
