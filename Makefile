# Set-up is part of every target: a fresh clone needs only python3 (3.10+) and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The exact versions of every test and benchmark dependency the suite was last green on: a pip
# constraints file, so it pins without adding anything (see README, Development).
LOCK   := requirements/lock.txt
# The newest releases within pyproject's ranges (make test-latest), beside the locked .venv.
LATEST ?= .venv-latest
# The CPU build of torch is installed first so that pip does not pull a multi-GB
# CUDA build; on a machine with a GPU, `make TORCH=torch demo` takes PyPI's default.
TORCH  ?= torch==2.13.0

.PHONY: demo test test-latest lock bench clean

# A new lock rebuilds the venv from scratch: nothing of the previous set stays behind.
$(VENV)/.installed: pyproject.toml $(LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(LOCK) "$(TORCH)"
	$(BIN)/python -m pip install -q -c $(LOCK) -e ".[dev,bench]"
	touch $@

# The example has a fault to find: exit code 1 (findings) is its expected outcome.
demo: $(VENV)/.installed
	$(BIN)/gradscope inspect configs/faults/deep_sigmoid_mlp.yaml --json report.json || test $$? -eq 1

test: $(VENV)/.installed
	$(BIN)/ruff check gradscope tests scripts
	$(BIN)/ruff format --check gradscope tests scripts
	$(BIN)/python -m pytest

# Always resolved anew: new releases appear without a file here changing. torch stays at $(TORCH)
# (constrained, so nothing else can pull a newer one: on PyPI that is a multi-GB CUDA build).
$(LATEST)/.installed: pyproject.toml
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q "$(TORCH)"
	echo "$(TORCH)" > $(LATEST)/torch-constraint.txt
	$(LATEST)/bin/python -m pip install -q -c $(LATEST)/torch-constraint.txt -e ".[dev,bench]"
	$(LATEST)/bin/python -m pip freeze --exclude-editable > $(LATEST)/resolved.txt
	touch $@

# The same tests on the newest releases (lint stays with the locked ruff: a newer one's style is not a failure).
test-latest:
	rm -f $(LATEST)/.installed
	$(MAKE) $(LATEST)/.installed
	@grep -i -E '^(torch|transformers|accelerate|lightning|peft|diffusers|pytest)==' $(LATEST)/resolved.txt
	$(LATEST)/bin/python -m pytest

# Pin what the last `make test-latest` resolved (built now if there is none); then `make test` runs on it.
lock: $(LATEST)/.installed
	mkdir -p $(dir $(LOCK))
	{ echo "# The test and benchmark environment the suite was last green on: pip constraints,"; \
	  echo "# used as pip install -c $(LOCK). Written by make lock from $(LATEST) (make test-latest)."; \
	  echo "# torch carries no build tag (+cpu): the Makefile's TORCH picks the build."; \
	  sed -E 's/^(torch==[^+]+)\+.*/\1/' $(LATEST)/resolved.txt; } > $(LOCK)

bench: $(VENV)/.installed
	$(BIN)/python scripts/bench_overhead.py

clean:
	rm -rf $(VENV) $(LATEST) report.json
