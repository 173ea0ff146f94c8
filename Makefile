# Two entry points for a fresh clone: `make demo` and `make test`.
# Both create .venv and install the pinned requirements on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdir/demo

.PHONY: demo test test-all lint

$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.txt
	$(VENV)/bin/pip install --quiet -r requirements-test.txt
	touch $@

demo: $(VENV)/.runtime
	$(PY) -m mmfm_jax.main --config=configs/mode_gmm.py --workdir=$(WORKDIR)

lint: $(VENV)/.test
	$(PY) -m ruff check .

test: $(VENV)/.test
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

test-all: $(VENV)/.test
	$(PY) -m pytest -q -m "slow or not slow" tests
