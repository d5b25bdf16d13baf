# `make demo` and `make test` work on a fresh machine with only Python: they create .venv and
# install torch first (the CPU build on these machines), then the package.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,plot,hf]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/hybrid-attention demo

test: $(STAMP)
	$(BIN)/ruff check hybrid_attention tests benchmarks
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_prefill.py

clean:
	rm -rf $(VENV) build *.egg-info
