# Set-up is part of every target: a fresh clone needs only python3 (3.10+) and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch is installed first so that pip does not pull a multi-GB
# CUDA build; on a machine with a GPU, `make TORCH=torch demo` takes PyPI's default.
TORCH  ?= torch==2.13.0

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,bench]"
	touch $@

# The example has a fault to find: exit code 1 (findings) is its expected outcome.
demo: $(VENV)/.installed
	$(BIN)/gradscope inspect configs/faults/deep_sigmoid_mlp.yaml --json report.json || test $$? -eq 1

test: $(VENV)/.installed
	$(BIN)/ruff check gradscope tests scripts
	$(BIN)/ruff format --check gradscope tests scripts
	$(BIN)/python -m pytest

bench: $(VENV)/.installed
	$(BIN)/python scripts/bench_overhead.py

clean:
	rm -rf $(VENV) report.json
