# Entry points of sar_backbones: `make install`, `make test`, `make demo`.
#
# Everything runs from the project's virtual environment, which lives outside
# the repository (default ~/.cache/sar_backbones/venv, or $SAR_VENV) so that a
# fresh clone reuses the expensive mmcv build.  `install` is idempotent: it is
# a no-op once scripts/install.sh has stamped the environment, so `test` and
# `demo` can depend on it without cost.

SHELL := /bin/bash
.DEFAULT_GOAL := help

CACHE_HOME ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)
VENV ?= $(or $(SAR_VENV),$(CACHE_HOME)/sar_backbones/venv)
PYTHON := $(VENV)/bin/python

# Parallel test workers and the per-test time limit (seconds; pytest-timeout).
PYTEST_WORKERS ?= 2
PYTEST_TIMEOUT ?= 900
PYTEST_ARGS ?=
DEMO_WORK_DIR ?= work_dirs/demo

.PHONY: help install test demo lint

help:
	@echo 'make install  build/refresh the environment in $(VENV) (scripts/install.sh)'
	@echo 'make test     install, then run the test suite (tests/)'
	@echo 'make demo     install, then run tools/demo.py into $(DEMO_WORK_DIR)'
	@echo 'make lint     flake8 and isort (setup.cfg) over the package, tools, tests and configs'

install:
	SAR_VENV='$(VENV)' bash scripts/install.sh

# One BLAS/OpenMP thread per pytest worker: two workers with two threads each
# on two cores oversubscribe the CPU and slow convolutions down by 10-50x.
test: install
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PYTHON) -m pytest tests -n $(PYTEST_WORKERS) --timeout=$(PYTEST_TIMEOUT) -ra $(PYTEST_ARGS)

# The work dir is the demo's own: a second `make demo` replaces it (--overwrite).
demo: install
	$(PYTHON) tools/demo.py --work-dir $(DEMO_WORK_DIR) --overwrite

lint: install
	$(PYTHON) -m flake8 sar_backbones tools tests benchmarks configs
	$(PYTHON) -m isort --check-only --diff sar_backbones tools tests benchmarks
