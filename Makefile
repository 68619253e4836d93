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

.PHONY: setup test test-device-triton lint bench validate clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q
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
	rm -rf $(VENV) $(DEVICE_TRITON_DIR) build *.egg-info .pytest_cache .ruff_cache
