# Two set-up commands: `make demo` runs the whole pipeline on the embedded default,
# `make test` runs the tests. Each creates .venv and installs what it needs first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RECIPE ?= configs/demo/cpu.yaml

.PHONY: install test test-fast demo demo-fresh clean lint

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -n 2 --durations=15 tests

test-fast: install
	$(PY) -m pytest -n 2 -m "not slow" tests

demo: install
	$(PY) demo.py --recipe $(RECIPE)

demo-fresh: install
	$(PY) demo.py --recipe $(RECIPE) --fresh

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf out/demo data
