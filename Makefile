# The two commands a newcomer needs: `make demo` and `make test`. Both build the virtualenv first.
.PHONY: demo test test-unit run lint bench clean
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.runtime
STAMP := $(VENV)/.installed

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The demo needs only the service itself; tests, linters and benchmarks need the dev extras.
$(RUNTIME): pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet -e .
	touch $(RUNTIME)

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP) $(RUNTIME)

demo: $(RUNTIME)
	$(BIN)/orchestrator demo

test: $(STAMP)
	$(BIN)/ruff check orchestrator tests bench
	$(BIN)/mypy
	$(BIN)/pytest -q

test-unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

run: $(RUNTIME)
	$(BIN)/orchestrator run

lint: $(STAMP)
	$(BIN)/ruff check orchestrator tests bench
	$(BIN)/ruff format --check orchestrator tests bench
	$(BIN)/mypy

# Results go to var/bench/RESULTS.md (untracked); `make bench BENCH_OUT=bench/RESULTS.md` updates the record.
BENCH_OUT ?= var/bench/RESULTS.md
bench: $(STAMP)
	$(BIN)/python bench/run.py --out $(BENCH_OUT)

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
