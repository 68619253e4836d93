#!/usr/bin/env bash
# scripts/gpu_check.sh OUT_DIR -- everything fastmae needs a GPU for, in one time-boxed run.
#
# Made for a short GPU lease (15 minutes, no internet; torch and triton preinstalled): it
# runs fastmae from this checkout (PYTHONPATH; nothing is installed unless
# GPU_CHECK_INSTALL=1): `fastmae bench` (ViT-B/L/H), the GPU tests (pytest -m gpu; the
# timing-sensitive harness tests apart and alone), the kernel micro-benchmarks
# (benchmarks/bench_ops.py), `fastmae validate` and the kernel test files, in that order
# (most wanted first), each under `timeout`, the whole within ~9.5 minutes.
#
# Autotuning is most of the first minutes on a fresh machine (each attention shape
# compiles and times 6 to 50 configs): TRITON_CACHE_AUTOTUNING=1 keeps each choice on
# disk so a later step reuses it, the bench tunes alone (its choices are the ones timed),
# and the correctness tests run in parallel (pytest-xdist, when installed) so the
# compiles use the machine's cores. Everything is written under OUT_DIR:
#
#   OUT_DIR/env.txt          nvidia-smi, python, torch, triton
#   OUT_DIR/logs/<step>.log  the full output of each step
#   OUT_DIR/bench/           fastmae bench: JSON, CSV (and PNG when matplotlib is there)
#   OUT_DIR/ops/             bench_ops JSON record
#   OUT_DIR/validate/        fastmae validate JSON record
#   OUT_DIR/records/         copies of every JSON record: copy these into benchmarks/results/
#                            and run `python -m benchmarks.make_results`
#
# A summary table comes last. Exit status: 0 when every step passed, else 1.
# Records carry the git commit (git rev-parse); in a copied tree without .git pass it as
# FASTMAE_GIT_COMMIT=<hash>, or the records say "unknown".
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S (default 570 seconds),
# GPU_CHECK_WORKERS (pytest-xdist workers, default 8),
# GPU_CHECK_BENCH_ARGS (extra `fastmae bench` arguments; default the three models of the
# issue's table, ViT-B/16, ViT-L/16 and ViT-H/14, at their default batch sizes),
# GPU_CHECK_VALIDATE_ARGS (extra `fastmae validate` arguments; default --dtypes bf16),
# GPU_CHECK_INSTALL=1 to pip-install the checkout first (editable, no deps; not needed:
# everything runs as `python -m ...` from the checkout).
set -u

if [ $# -ne 1 ]; then
    echo "usage: scripts/gpu_check.sh OUT_DIR" >&2
    exit 2
fi
PY=${PYTHON:-python3}
BENCH_ARGS=${GPU_CHECK_BENCH_ARGS:---models vit_b16,vit_l16,vit_h14}
VALIDATE_ARGS=${GPU_CHECK_VALIDATE_ARGS:---dtypes bf16}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
mkdir -p "$OUT/logs" "$OUT/bench" "$OUT/ops" "$OUT/validate" "$OUT/records"
cd "$REPO" || exit 2
# fastmae imports from the checkout; nothing needs it installed
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TRITON_CACHE_AUTOTUNING=1
# compiled kernels and autotune choices: shared by the steps, outside OUT_DIR (not sent back)
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/fastmae-triton-cache}

START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_BUDGET_S:-570}))
RESERVE=15            # seconds kept for collecting records and the summary
SUMMARY=()
FAILED=0

left() { echo $((DEADLINE - $(date +%s) - RESERVE)); }

# step NAME MAX_SECONDS CMD... : run CMD under timeout (MAX_SECONDS, or less when the
# deadline is nearer), log to OUT/logs/NAME.log, show its tail, record the outcome.
step() {
    local name=$1 max=$2
    shift 2
    local t
    t=$(left)
    ((t > max)) && t=$max
    if ((t < 10)); then
        echo "== $name: skipped, no time left"
        SUMMARY+=("$name|skipped (no time left)|0")
        FAILED=1
        return
    fi
    echo "== $name (timeout ${t}s): $*"
    local t0 rc status
    t0=$(date +%s)
    timeout -k 5 "$t" "$@" >"$OUT/logs/$name.log" 2>&1
    rc=$?
    if ((rc == 0)); then
        status=ok
    elif ((rc == 124 || rc == 137)); then
        status="TIMEOUT after ${t}s"
        FAILED=1
    else
        status="FAILED (exit $rc)"
        FAILED=1
    fi
    tail -n 30 "$OUT/logs/$name.log"
    SUMMARY+=("$name|$status|$(($(date +%s) - t0))")
}

# --------------------------------------------------------------------------- environment
{
    date -u
    nvidia-smi 2>&1 | head -20
    "$PY" -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)' 2>&1
    "$PY" -c 'import triton; print("triton", triton.__version__)' 2>&1
    "$PY" -c 'import pytest; print("pytest", pytest.__version__)' 2>&1
    "$PY" -c 'import matplotlib; print("matplotlib", matplotlib.__version__)' 2>&1
    echo "commit: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo "${FASTMAE_GIT_COMMIT:-unknown} (no git)")"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# --------------------------------------------------------------------------- steps
if [ -n "${GPU_CHECK_INSTALL:-}" ]; then
    step install 60 "$PY" -m pip install -e . --no-deps --no-build-isolation --no-input
fi

HAVE_PYTEST=0
"$PY" -c 'import pytest' 2>/dev/null && HAVE_PYTEST=1
# addopts is cleared: it names pytest-benchmark's --benchmark-disable, which may not be installed here
PYTEST=("$PY" -m pytest -o addopts= -p no:cacheprovider -ra --durations=8 -q)
PARALLEL=()
"$PY" -c 'import xdist' 2>/dev/null && PARALLEL=(-n "${GPU_CHECK_WORKERS:-8}")

# budget NAME RESERVE_FOR_LATER MAX: a step's own time budget (seconds)
budget() {
    local b=$(($(left) - $1))
    ((b > $2)) && b=$2
    ((b < 20)) && b=20
    echo $b
}

# The harnesses stop starting new measurements at their budget and keep what they measured.
B=$(budget 330 190)
# shellcheck disable=SC2086  # word-split on purpose
step bench $((B + 30)) "$PY" -m fastmae bench --quiet --out "$OUT/bench" --time-budget "$B" $BENCH_ARGS

if ((HAVE_PYTEST)); then
    step gpu_tests 120 "${PYTEST[@]}" "${PARALLEL[@]}" -m gpu tests --ignore=tests/test_bench_harness.py --ignore=tests/test_sm90_compile.py
    # CUDA-event and graph timing checks: alone on the GPU
    step harness_tests 40 "${PYTEST[@]}" -m gpu tests/test_bench_harness.py
else
    SUMMARY+=("gpu_tests|skipped (pytest not installed)|0")
    FAILED=1
fi

B=$(budget 100 80)
# attention first (the issue-4 shapes against SDPA's kernels), then the data-path ops at ViT-B/L
step bench_ops $((B + 20)) "$PY" -m benchmarks.bench_ops --quiet --out "$OUT/ops" --time-budget "$B" \
    --sections attention,ops,long --models vit_b16,vit_l16

B=$(budget 60 60)
# bf16 only: the dtype the CPU interpreter cannot check (fp32/fp16 on the GPU: kernel_tests below)
# shellcheck disable=SC2086
step validate $((B + 20)) "$PY" -m fastmae validate --quiet --out "$OUT/validate" --time-budget "$B" $VALIDATE_ARGS

if ((HAVE_PYTEST)); then
    mapfile -t KERNEL_TESTS < <(ls tests/test_kernel_*.py 2>/dev/null)
    if ((${#KERNEL_TESTS[@]})); then
        step kernel_tests 120 "${PYTEST[@]}" "${PARALLEL[@]}" -m "not gpu" "${KERNEL_TESTS[@]}"
    else
        SUMMARY+=("kernel_tests|skipped (no tests/test_kernel_*.py)|0")
    fi
else
    SUMMARY+=("kernel_tests|skipped (pytest not installed)|0")
fi

# --------------------------------------------------------------------------- records
cp "$OUT"/bench/*.json "$OUT"/ops/*.json "$OUT"/validate/*.json "$OUT/records/" 2>/dev/null

# --------------------------------------------------------------------------- summary
echo
echo "================ gpu_check summary ($(($(date +%s) - START)) s, records in $OUT/records) ================"
printf '%-14s %-28s %6s\n' step result seconds
for row in "${SUMMARY[@]}"; do
    IFS='|' read -r name status secs <<<"$row"
    printf '%-14s %-28s %6s\n' "$name" "$status" "$secs"
done
echo
"$PY" -m benchmarks.gpu_summary "$OUT/records" 2>&1
exit $FAILED
