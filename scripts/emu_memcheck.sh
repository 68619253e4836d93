#!/usr/bin/env bash
# A memcheck of the extension's CUDA kernels without a GPU: scripts/ext_sanitize.py's cases (every
# kernel, forward and backward, its vector and scalar paths and ragged tails) on the CPU emulation
# of tests/_cuda_emu, built with AddressSanitizer (FASTMAE_EMU_ASAN=1, build/cuda_emu_asan), under
# Python with libasan preloaded: a read or write past the end of a tensor's allocation stops the
# run with the kernel's stack ("heap-buffer-overflow"). Extra arguments go to ext_sanitize.py
# (--only NAME, --order descending|shuffled). Exit 0 when every case ran clean.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
ASAN_LIB=$("${CXX:-c++}" -print-file-name=libasan.so)
if [ ! -f "$ASAN_LIB" ]; then
    echo "emu_memcheck: ${CXX:-c++} has no libasan.so (install the compiler's AddressSanitizer runtime)" >&2
    exit 2
fi
export FASTMAE_EMU_ASAN=1 ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0:detect_stack_use_after_return=0}"
LD_PRELOAD="$ASAN_LIB" exec "$PY" scripts/ext_sanitize.py --device emu "$@"
