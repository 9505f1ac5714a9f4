# Every target sets itself up: a fresh clone needs only `make demo` or `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
EVAL_STAMP := $(VENV)/.installed-eval

.PHONY: test demo eval lint bench clean setup

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch is pinned to the CPU wheel on this machine; installing it first keeps pip from
# resolving a multi-GB CUDA build for the range in pyproject.toml.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

# lm-evaluation-harness (the `eval` extra): for `make test` and `make eval`, not `make demo`.
$(EVAL_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e ".[dev,eval]" torch==2.13.0
	touch $(EVAL_STAMP)

setup: $(STAMP)

test: $(EVAL_STAMP)
	$(BIN)/python -m pytest tests

demo: $(STAMP)
	$(BIN)/python -m widemoe.demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python benchmarks/moe_layer.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
