# fastmae developer entry points. `make bench` and `make test` set up .venv on first use.
#
# TORCH is the torch requirement installed into the venv. The default is the CUDA 13.0 build
# of torch 2.14.1 with torchvision 0.29.1 (on local disk on the project's machines; it runs on the CPU too, and builds the CUDA extension); an unpinned `torch` pulls a
# multi-GB CUDA build. On a GPU machine: make TORCH=torch test (or any CUDA build you have).
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.14.1 torchvision==0.29.1
BIN     = $(VENV)/bin
# The triton of the GPU machines fastmae is measured on (older than the venv's): every
# kernel must also compile with it, see test-device-triton.
DEVICE_TRITON ?= triton==3.6.0
DEVICE_TRITON_DIR = .triton-device

# The compiled extension fastmae._C (csrc/, backend="ext"), built in place by setup.py with
# ninja: CUDA kernels for TORCH_CUDA_ARCH_LIST when torch has CUDA and nvcc is found (the
# default torch here is a CUDA build, so CI compiles them for sm_80 and sm_90 with warnings as
# errors, and runs the C++ CPU twins), else the C++ kernels only. FASTMAE_BUILD_EXT=1 (the
# default here) fails when it cannot build. ninja keeps its objects in build/temp.<platform>-<kind>
# (cuda or cpp, one directory each) and recompiles only what changed (a clean clone has no
# build/: a full build).
MAX_JOBS ?= 2
FASTMAE_BUILD_EXT ?= 1
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0

.PHONY: setup ext test test-device-triton lint bench validate clean

setup: $(VENV)/.installed

# --no-build-isolation: setup.py needs the venv's torch to build the extension; the editable
# install itself builds nothing (FASTMAE_BUILD_EXT=0), `make ext` does, incrementally.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q "setuptools>=64" wheel
	FASTMAE_BUILD_EXT=0 $(BIN)/python -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

ext: setup
	MAX_JOBS=$(MAX_JOBS) FASTMAE_BUILD_EXT=$(FASTMAE_BUILD_EXT) TORCH_CUDA_ARCH_LIST="$(TORCH_CUDA_ARCH_LIST)" \
		$(BIN)/python setup.py -q build_ext --inplace

# FASTMAE_EXT_REQUIRED=1: the extension's tests fail, rather than skip, when it is missing.
test: setup ext
	$(BIN)/ruff check .
	FASTMAE_EXT_REQUIRED=1 $(BIN)/python -m pytest -q
	$(MAKE) test-device-triton

# Compile every kernel launch for sm_90/sm_80 (tests/test_sm90_compile.py) with
# $(DEVICE_TRITON) instead of the venv's triton: its frontend and ptxas are what the GPU
# machine runs, and an API the newer triton added fails here rather than on the GPU. It is
# installed on its own (no deps) into $(DEVICE_TRITON_DIR) and shadows the venv's through
# PYTHONPATH; only the ahead-of-time compile runs with it.
$(DEVICE_TRITON_DIR)/.installed-$(DEVICE_TRITON): | setup
	rm -rf $(DEVICE_TRITON_DIR)
	$(BIN)/python -m pip install -q --no-deps --target $(DEVICE_TRITON_DIR) "$(DEVICE_TRITON)"
	touch "$@"

test-device-triton: setup $(DEVICE_TRITON_DIR)/.installed-$(DEVICE_TRITON)
	PYTHONPATH="$(CURDIR)/$(DEVICE_TRITON_DIR)" $(BIN)/python -c 'import triton; print("device triton", triton.__version__, triton.__file__)'
	FASTMAE_AOT_REQUIRED=1 PYTHONPATH="$(CURDIR)/$(DEVICE_TRITON_DIR)" $(BIN)/python -m pytest -q tests/test_sm90_compile.py

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/fastmae bench

validate: setup
	$(BIN)/fastmae validate

clean:
	rm -rf $(VENV) $(DEVICE_TRITON_DIR) build *.egg-info .pytest_cache .ruff_cache fastmae/_C*.so fastmae/_C_build.json
