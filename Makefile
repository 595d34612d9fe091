# `make demo` and `make test` do all set-up on a fresh clone: a .venv with the CPU
# build of torch (pinned: an unpinned torch pulls gigabytes of CUDA) and the
# package in editable mode with the versions in constraints.txt.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check
export PATH := $(BIN):$(PATH)

.PHONY: install demo test bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -c constraints.txt -e ".[workflow,test,judge,tracking]"
	touch $@

demo: install
	snakemake --cores all
	@echo
	@echo "Results: $(CURDIR)/results/demo   (logs/demo, benchmarks/demo)"
	@echo "Audit:   $(CURDIR)/results/demo/audit.tsv"
	@echo
	iteralign audit results/demo

test: install
	python -m pytest

# TRL, for scripts/bench_training.py only: pinned, and constrained so that torch stays 2.13.0.
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP) scripts/bench-requirements.txt
	$(PIP) -c constraints.txt -r scripts/bench-requirements.txt
	python -c "import torch; assert torch.__version__.startswith('2.13.0'), f'torch {torch.__version__}'"
	touch $@

# Every scripts/bench_*.py prints its figures (docs/benchmarks.md records them).
bench: install $(BENCH_STAMP)
	@for script in scripts/bench_*.py; do [ -e "$$script" ] || continue; echo "== $$script"; python $$script || exit 1; done

lint: install
	ruff check src tests
	snakemake --lint

clean:
	rm -rf results logs benchmarks .snakemake
