#!/usr/bin/env bash
# scripts/gpu_check.sh OUT_DIR -- everything fastmae needs a GPU for, in one time-boxed run.
#
# Made for a short GPU lease (15 minutes in all, start-up included, no internet; torch and
# triton preinstalled): it runs fastmae from this checkout (PYTHONPATH; nothing is installed
# unless GPU_CHECK_INSTALL=1), each step under `timeout`, the whole within ~9.5 minutes
# (GPU_CHECK_BUDGET_S). One such call is what a lease allows, so by default it runs the steps
# that fit (most wanted first: correctness, then issue 12's open targets, then the model-level
# benchmark), each given a share of the budget that leaves the later ones theirs:
#   build_ext        the extension fastmae._C (backend "ext") for this card, sm_90 (CUDA kernels: checked)
#   ext_smoke        each of its CUDA kernels once (scripts/ext_sanitize.py), launches synchronised
#   gpu_tests        pytest -m gpu (the timing-sensitive harness tests apart); with the extension
#                    loading, FASTMAE_EXT_REQUIRED=1: its tests fail rather than skip
#   bench_ops_ext    kernel micro-benchmarks (benchmarks/bench_ops.py) of backend ext beside triton
#                    and SDPA at ViT-B (issue 12's targets; triton's figures come with them)
#   bench            `fastmae bench`, ViT-B/L/H, stock and Triton, eager and graphed (its time budget
#                    keeps what it measured: ViT-B first)
#   validate         `fastmae validate`, bf16, every backend (ext once its smoke test passed)
# and, only when named in GPU_CHECK_STEPS (a comma list; "all" for every step) on a later lease:
#   validate_ext     `fastmae validate` of backend ext alone
#   bench_compiled   `fastmae bench` under torch.compile, ViT-B/16
#   harness_tests    the CUDA-event and graph timing tests, alone on the GPU
#   bench_ops        the micro-benchmarks of every backend but ext at ViT-B and ViT-L, long sequences
#   sanitize_memcheck, sanitize_racecheck   backend ext's kernels under compute-sanitizer
#                    (scripts/ext_sanitize.py), when the machine has it
#   kernel_tests     the kernel test files on the GPU, fp32/fp16
#   bench_step, pretrain_step, pretrain_vs_bench   a `fastmae pretrain` step against bench's
#   data_transfer    a batch's pinned uint8 copy + normalisation against the official copy
# Steps that need the extension are skipped (and counted as failures) when it does not build
# with its CUDA kernels.
#
# The extension's CUDA kernels have never run before this script runs them. A kernel that
# faults leaves a sticky error: every later CUDA call in its process fails. So backend ext
# is measured and validated in processes of its own, after the others; the harnesses stop
# at a lost context and name the case (record field cuda_context_lost), and in the GPU tests
# the plugin tests/_cuda_guard.py replaces the pytest-xdist worker it happened in.
#
# Autotuning is most of the first minutes on a fresh machine (each attention shape
# compiles and times 6 to 50 configs): TRITON_CACHE_AUTOTUNING=1 keeps each choice on
# disk so a later step reuses it, the bench tunes alone (its choices are the ones timed),
# and the correctness tests run in parallel (pytest-xdist, when installed) so the
# compiles use the machine's cores.
#
# The device tool sends back at most 8 files from $OUT (16 MiB each), so the steps write
# into a work folder outside OUT_DIR (GPU_CHECK_WORK, default a new /tmp/fastmae-gpu-check.*):
#
#   WORK/env.txt          nvidia-smi, python, torch, triton
#   WORK/logs/<step>.log  the full output of each step
#   WORK/bench/           fastmae bench: JSON, CSV (and PNG when matplotlib is there)
#   WORK/ops/             bench_ops JSON record
#   WORK/validate/        fastmae validate JSON record
#   WORK/records/         copies of every JSON record
#   WORK/summary.txt      the step table and the summary
#
# and after every step `python -m benchmarks.gpu_pack WORK OUT_DIR` rewrites OUT_DIR's few
# files: records.tar.gz (all of WORK), summary.txt and the PNG plots, at most 8 in all, so a
# lease that ends mid-run still returns what the finished steps wrote. Unpack with
# `tar xzf OUT_DIR/records.tar.gz -C DIR`, copy DIR/records/*.json into benchmarks/results/
# and run `python -m benchmarks.make_results`.
#
# A summary table comes last. Exit status: 0 when every step passed, else 1.
# Records carry the git commit (git rev-parse); in a copied tree without .git pass it as
# FASTMAE_GIT_COMMIT=<hash>, or the records say "unknown".
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S (default 570 seconds),
# GPU_CHECK_WORKERS (pytest-xdist workers, default 8),
# GPU_CHECK_BENCH_ARGS (extra `fastmae bench` arguments; default the three models of the
# issues' tables, ViT-B/16, ViT-L/16 and ViT-H/14, at their default batch sizes, both
# encoder modes, eager and the whole step as one CUDA graph, 10 timed steps),
# GPU_CHECK_COMPILE_ARGS (the compiled bench that follows: default ViT-B/16, visible
# tokens, stock compiled against fastmae compiled),
# GPU_CHECK_VALIDATE_ARGS (extra `fastmae validate` arguments; default --dtypes bf16),
# GPU_CHECK_INSTALL=1 to pip-install the checkout first (editable, no deps; not needed:
# everything runs as `python -m ...` from the checkout), GPU_CHECK_STEPS (a comma list of
# the steps to run, e.g. `bench_compiled,bench_ops` on a later lease; "all" for every step;
# default the ones listed first above).
set -u

if [ $# -ne 1 ]; then
    echo "usage: scripts/gpu_check.sh OUT_DIR" >&2
    exit 2
fi
PY=${PYTHON:-python3}
BENCH_ARGS=${GPU_CHECK_BENCH_ARGS:---models vit_b16,vit_l16,vit_h14 --modes eager,graphed --steps 10 --warmup 3}
COMPILE_ARGS=${GPU_CHECK_COMPILE_ARGS:---models vit_b16 --encoder visible --modes compiled --steps 10 --warmup 3}
VALIDATE_ARGS=${GPU_CHECK_VALIDATE_ARGS:---dtypes bf16}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
WORK=${GPU_CHECK_WORK:-$(mktemp -d /tmp/fastmae-gpu-check.XXXXXX)}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
case "$WORK/" in "$OUT"/*)
    echo "GPU_CHECK_WORK ($WORK) must be outside OUT_DIR ($OUT): its files would count against the 8 returned" >&2
    exit 2 ;;
esac
mkdir -p "$WORK/logs" "$WORK/bench" "$WORK/ops" "$WORK/validate" "$WORK/records"
cd "$REPO" || exit 2
# fastmae imports from the checkout; nothing needs it installed
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# the extension (fastmae._C, backend "ext") is built for this card only; its build test compares
# the recorded archs with this variable, so it is set for every step
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export TRITON_CACHE_AUTOTUNING=1
# compiled kernels and autotune choices: shared by the steps, outside OUT_DIR (not sent back)
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/fastmae-triton-cache}

START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_BUDGET_S:-570}))
RESERVE=15            # seconds kept for collecting records and the summary
SUMMARY=()
FAILED=0

left() { echo $((DEADLINE - $(date +%s) - RESERVE)); }

# pack: copy the JSON records into WORK/records and rewrite OUT_DIR's files (benchmarks/gpu_pack.py)
pack() {
    cp "$WORK"/bench/*.json "$WORK"/ops/*.json "$WORK"/validate/*.json "$WORK/records/" 2>/dev/null
    "$PY" -m benchmarks.gpu_pack "$WORK" "$OUT" >/dev/null 2>>"$WORK/logs/pack.log" ||
        echo "gpu_pack failed, see $WORK/logs/pack.log" >&2
}
trap 'pack; exit 1' INT TERM

DEFAULT_STEPS=build_ext,ext_smoke,gpu_tests,bench_ops_ext,bench,validate
STEPS_ASKED=${GPU_CHECK_STEPS:-$DEFAULT_STEPS}
STEPS_ASKED=${STEPS_ASKED// /}
wanted() { [ "$STEPS_ASKED" = all ] || [[ ",${STEPS_ASKED}," == *",$1,"* ]]; }

# step NAME MAX_SECONDS CMD... : run CMD under timeout (MAX_SECONDS, or less when the
# deadline is nearer), log to WORK/logs/NAME.log, show its tail, record the outcome, pack.
step() {
    local name=$1 max=$2
    shift 2
    LAST_RC=1
    if ! wanted "$name"; then
        SUMMARY+=("$name|not asked for (GPU_CHECK_STEPS)|0")
        return
    fi
    local t
    t=$(left)
    ((t > max)) && t=$max
    if ((t < 20)); then  # below what any step needs to start up and do something
        echo "== $name: skipped, no time left"
        SUMMARY+=("$name|skipped (no time left)|0")
        FAILED=1
        return
    fi
    echo "== $name (timeout ${t}s): $*"
    local t0 rc status
    t0=$(date +%s)
    timeout -k 5 "$t" "$@" >"$WORK/logs/$name.log" 2>&1
    rc=$?
    LAST_RC=$rc
    if ((rc == 0)); then
        status=ok
    elif ((rc == 124 || rc == 137)); then
        status="TIMEOUT after ${t}s"
        FAILED=1
    else
        status="FAILED (exit $rc)"
        FAILED=1
    fi
    tail -n 30 "$WORK/logs/$name.log"
    SUMMARY+=("$name|$status|$(($(date +%s) - t0))")
    pack
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
} >"$WORK/env.txt" 2>&1
cat "$WORK/env.txt"
pack

# --------------------------------------------------------------------------- steps
if [ -n "${GPU_CHECK_INSTALL:-}" ]; then
    # the package only: the extension is build_ext's (setup.py's auto mode would build it here)
    step install 60 env FASTMAE_BUILD_EXT=0 "$PY" -m pip install -e . --no-deps --no-build-isolation --no-input
fi

HAVE_PYTEST=0
"$PY" -c 'import pytest' 2>/dev/null && HAVE_PYTEST=1
# addopts is cleared: it names pytest-benchmark's --benchmark-disable, which may not be installed here
PYTEST=("$PY" -m pytest -o addopts= -p no:cacheprovider -ra --durations=8 -q)
PYTEST_VERBOSE=("$PY" -m pytest -o addopts= -p no:cacheprovider -ra --durations=8 -v)  # each test named as it ends
PARALLEL=()
"$PY" -c 'import xdist' 2>/dev/null && PARALLEL=(-n "${GPU_CHECK_WORKERS:-8}")
# a test that hangs is named and failed, not the end of the step (pytest-timeout, when installed)
PER_TEST=()
"$PY" -c 'import pytest_timeout' 2>/dev/null && PER_TEST=(--timeout=60)

# budget NAME RESERVE_FOR_LATER MAX: a step's own time budget (seconds)
budget() {
    local b=$(($(left) - $1))
    ((b > $2)) && b=$2
    ((b < 20)) && b=20
    echo $b
}

# ext_step NAME MAX CMD...: a step of backend ext; skipped (a failure) when the extension does not
# load with its CUDA kernels, rather than measuring or testing nothing and reporting "ok"
ext_step() {
    if ((EXT_REQUIRED)) || ! wanted "$1"; then
        step "$@"
    else
        echo "== $1: skipped, the extension did not build with its CUDA kernels (see build_ext)"
        SUMMARY+=("$1|skipped (no CUDA extension)|0")
        FAILED=1
    fi
}

# the compiled extension, sm_90 only (TORCH_CUDA_ARCH_LIST above): its CUDA kernels have never run
# before this call; everything after it covers backend "ext" too
# (warnings shown, not errors: CI holds them as errors with its own compilers; this one may be newer)
step build_ext 180 env MAX_JOBS="${MAX_JOBS:-16}" FASTMAE_BUILD_EXT=1 FASTMAE_WERROR="${FASTMAE_WERROR:-0}" \
    "$PY" setup.py -q build_ext --inplace
wanted build_ext && "$PY" -c 'import fastmae.ext as e; print("ext:", e.build_info(), e.problem())' \
    >>"$WORK/logs/build_ext.log" 2>&1
# the extension loads with its CUDA kernels (built by this call or an earlier one): its tests must
# then run, not skip; a build without them (no nvcc found) is not a CUDA build
EXT_REQUIRED=0
"$PY" -c 'import sys, fastmae.ext as e; sys.exit(e.problem() is not None or not e.has_cuda_kernels())' \
    2>/dev/null && EXT_REQUIRED=1
if wanted build_ext && ((!EXT_REQUIRED)); then
    echo "build_ext: fastmae._C does not load with its CUDA kernels" | tee -a "$WORK/logs/build_ext.log"
    FAILED=1
fi
# every kernel of backend ext once, forward and backward, each launch synchronised: a kernel that
# faults is named here (the log lists each case as it passes), before the tests meet it
ext_step ext_smoke 30 env CUDA_LAUNCH_BLOCKING=1 "$PY" scripts/ext_sanitize.py
SMOKE_RC=$LAST_RC

if ((HAVE_PYTEST)); then
    # -v: each test named as it ends, so a timeout still says which ran; kept to what leaves the
    # later default steps their shares
    # the reserves below leave each later default step its share even when every step runs to its limit
    T=$(budget 245 150)
    step gpu_tests "$T" env FASTMAE_EXT_REQUIRED=$EXT_REQUIRED "${PYTEST_VERBOSE[@]}" "${PARALLEL[@]}" "${PER_TEST[@]}" \
        -m gpu tests --ignore=tests/test_bench_harness.py --ignore=tests/test_sm90_compile.py
else
    wanted gpu_tests && SUMMARY+=("gpu_tests|skipped (pytest not installed)|0") && FAILED=1
fi

# backend ext first in each case, with triton and SDPA beside it in the same run (its targets: the
# data path within 1.3x of the memory floor; attention at least as fast as triton and 2x cuDNN)
B=$(budget 150 110)
ext_step bench_ops_ext $((B + 20)) "$PY" -m benchmarks.bench_ops --quiet --out "$WORK/ops" --time-budget "$B" \
    --sections attention,ops,norms,bias_gelu --models vit_b16 --backends ext,triton,sdpa

# The harnesses stop starting new measurements at their budget and keep what they measured.
B=$(budget 70 120)
# shellcheck disable=SC2086  # word-split on purpose
step bench $((B + 30)) "$PY" -m fastmae bench --quiet --out "$WORK/bench" --time-budget "$B" $BENCH_ARGS

B=$(budget 15 60)
# bf16 only: the dtype the CPU interpreter cannot check (fp32/fp16 on the GPU: kernel_tests). Backend
# ext too once its smoke test passed (a kernel that faults would stop the process's later cases)
VAL_BACKENDS=torch,triton,sdpa,xformers
((EXT_REQUIRED && SMOKE_RC == 0)) && VAL_BACKENDS+=,ext
# shellcheck disable=SC2086
step validate $((B + 15)) "$PY" -m fastmae validate --quiet --out "$WORK/validate" --time-budget "$B" \
    --backends "$VAL_BACKENDS" $VALIDATE_ARGS

# ---- the steps run only when named (GPU_CHECK_STEPS): each in the time left
B=$(budget 0 60)
# shellcheck disable=SC2086
ext_step validate_ext $((B + 15)) "$PY" -m fastmae validate --quiet --out "$WORK/validate" --time-budget "$B" \
    --backends ext $VALIDATE_ARGS
# torch.compile of stock and fastmae: a compile already started runs past the budget, hence the margin
B=$(budget 90 200)
# shellcheck disable=SC2086
step bench_compiled $((B + 90)) "$PY" -m fastmae bench --quiet --no-plot --out "$WORK/bench" --time-budget "$B" \
    $COMPILE_ARGS
if ((HAVE_PYTEST)); then
    # CUDA-event and graph timing checks: alone on the GPU
    step harness_tests 60 "${PYTEST[@]}" "${PER_TEST[@]}" -m gpu tests/test_bench_harness.py
fi
B=$(budget 20 150)
# attention first (the issue-4 shapes against SDPA's kernels), then the data-path ops at ViT-B/L,
# the block ops (add + LayerNorm, bias + GELU at the ViT-B encoder and decoder shapes), long sequences
step bench_ops $((B + 20)) "$PY" -m benchmarks.bench_ops --quiet --out "$WORK/ops" --time-budget "$B" \
    --sections attention,ops,norms,bias_gelu,long --models vit_b16,vit_l16 --backends torch,triton,xformers,sdpa

# backend ext's kernels under compute-sanitizer: reads past a row's end, misaligned vectors and
# shared-memory races that results do not show (each tensor its own allocation, so memcheck sees its end)
SANITIZER=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer 2>/dev/null)
if [ -n "$SANITIZER" ]; then
    for tool in memcheck racecheck; do
        ext_step "sanitize_$tool" 120 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" \
            --error-exitcode 1 "$PY" scripts/ext_sanitize.py
    done
else
    for tool in memcheck racecheck; do
        wanted "sanitize_$tool" && SUMMARY+=("sanitize_$tool|skipped (no compute-sanitizer)|0")
    done
fi

if ((HAVE_PYTEST)); then
    mapfile -t KERNEL_TESTS < <(ls tests/test_kernel_*.py 2>/dev/null)
    if ((${#KERNEL_TESTS[@]})); then
        step kernel_tests 150 "${PYTEST[@]}" "${PARALLEL[@]}" "${PER_TEST[@]}" -m "not gpu" "${KERNEL_TESTS[@]}"
    else
        wanted kernel_tests && SUMMARY+=("kernel_tests|skipped (no tests/test_kernel_*.py)|0")
    fi
fi

# fastmae pretrain's step against fastmae bench's bare step, same configuration (issue 11: within 3%)
PRE=(--model mae_vit_base_patch16 --batch_size 256 --backend triton)
step bench_step 120 "$PY" -m fastmae bench --quiet --no-plot --models vit_b16 --batch-size 256 --backends triton \
    --encoder visible --dtype bf16 --modes eager --steps 10 --warmup 3 --out "$WORK/bench-step"
step pretrain_step 150 "$PY" -m fastmae pretrain --synthetic "${PRE[@]}" --norm_pix_loss --precision bf16 --epochs 1 \
    --warmup_epochs 0 --max_steps 60 --log_every 10 --output_dir '' --log_dir "$WORK/pretrain-step" \
    --num_workers 8 --no_progress
step pretrain_vs_bench 30 "$PY" -m fastmae.pretrain.measure --bench "$WORK/bench-step/bench-*.json" \
    --log "$WORK/pretrain-step/log_steps.txt" "${PRE[@]}" --mode eager --out "$WORK/records/pretrain-vs-bench.json"
# the batch's trip to the GPU: pinned uint8 copy + normalize_images against the official float32 copy
step data_transfer 90 "$PY" -m benchmarks.bench_data --images 64 --rounds 3 --device-transfer cuda --out "$WORK/data"

# --------------------------------------------------------------------------- summary
pack
{
    echo
    echo "================ gpu_check summary ($(($(date +%s) - START)) s, records in $WORK/records) ================"
    printf '%-18s %-32s %6s\n' step result seconds
    for row in "${SUMMARY[@]}"; do
        IFS='|' read -r name status secs <<<"$row"
        printf '%-18s %-32s %6s\n' "$name" "$status" "$secs"
    done
    echo
    "$PY" -m benchmarks.gpu_summary "$WORK/records" 2>&1
} | tee "$WORK/summary.txt"
pack
echo "returned files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $FAILED
