# fastmae developer entry points. `make bench` and `make test` set up .venv on first use.
#
# TORCH is the torch requirement installed into the venv. The default is the CPU build
# (torch==2.13.0, on local disk on the project's machines); an unpinned `torch` pulls a
# multi-GB CUDA build. On a GPU machine: make TORCH=torch test (or any CUDA build you have).
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin

.PHONY: setup test lint bench validate clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/fastmae bench

validate: setup
	$(BIN)/fastmae validate

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
