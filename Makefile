# Every target sets itself up: a fresh clone needs only `make demo` or `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
EVAL_STAMP := $(VENV)/.installed-eval

.PHONY: test demo eval experiment experiment-quick lint bench clean setup

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

# `make eval`: the demo run's newest checkpoint next to the same model at initialisation on widemoe's
# held-out lm-eval tasks (`widemoe eval`, results in runs/demo/eval/, shown by `widemoe report`). The demo
# trains first unless it has finished (summary.json is written last; an interrupted one continues).
DEMO_RUN := runs/demo
eval: $(EVAL_STAMP)
	test -f $(DEMO_RUN)/summary.json || $(BIN)/python -m widemoe.demo --run-dir $(DEMO_RUN)
	$(BIN)/widemoe eval $(DEMO_RUN) --init
	$(BIN)/widemoe eval $(DEMO_RUN)

# `make experiment`: the seed-claims suite (issue 14; about 70-90 min on 2 cores, two runs at a time;
# interrupted, it continues where it stopped) and its report (experiments/seed-claims/report.md).
# `make experiment-quick`: the same suite's smoke test (under 10 min), not evidence.
experiment: $(STAMP)
	$(BIN)/widemoe experiment seed-claims --jobs 2 --out experiments/seed-claims
	$(BIN)/widemoe experiment report experiments/seed-claims

experiment-quick: $(STAMP)
	$(BIN)/widemoe experiment seed-claims --quick --jobs 2 --out experiments/seed-claims-quick
	$(BIN)/widemoe experiment report experiments/seed-claims-quick

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python benchmarks/moe_layer.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
