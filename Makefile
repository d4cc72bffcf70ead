# The two commands of the README:
#   make demo   run a real pruning job over HTTP on the embedded default (SQLite + in-process worker)
#   make test   the whole test suite (the service tests need PostgreSQL and Redis: .ci/run starts them)
# Both bootstrap .venv on first use: CPU torch first (a newer pick would pull a multi-GB CUDA build), then the
# package with its service and dev extras.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo serve test test-service test-reliability lint venv clean-venv

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[service,dev]'
	touch $@

demo: venv
	$(VENV)/bin/lorashear demo

serve: venv
	$(VENV)/bin/lorashear serve

test: venv
	$(PY) -m pytest --timeout=1500 -q --ignore=tests/reliability $(PYTEST_ARGS)
	$(MAKE) test-reliability

# Faults under a real stack (private PostgreSQL/Redis on their own ports); prints its figures. About 8 minutes.
test-reliability: venv
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest --timeout=900 -q -p no:cacheprovider tests/reliability $(PYTEST_ARGS)

test-service: venv
	$(PY) -m pytest --timeout=1500 -q -m service tests/service $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check lorashear jobs api worker migrations tests bench scripts
	$(VENV)/bin/mypy lorashear jobs api worker
	$(VENV)/bin/mypy bench/*.py

clean-venv:
	rm -rf $(VENV)
