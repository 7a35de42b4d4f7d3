# FoloVLLM: `make demo` runs the newest stage on the default model; `make test` runs the suite.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The versions the suite last passed with (tools/freeze_constraints.py). FOLOVLLM_LATEST=1
# installs the newest releases instead (see test-latest).
LATEST := $(filter 1,$(FOLOVLLM_LATEST))
CONSTRAINTS := $(if $(LATEST),,-c constraints.txt)
# torch (CPU build) and the triton it was tested with (the newest with FOLOVLLM_LATEST=1),
# installed only where no torch is: a GPU user's CUDA build stays as it is.
TORCH ?= torch==2.13.0 $(if $(LATEST),,triton==3.9.0)
# The stages come from bench/stages.py: the newest one present, and those that generate.
NEWEST = $(shell $(PYTHON) -m bench.stages --newest)
MILESTONES = $(shell $(PYTHON) -m bench.stages --milestones)
# Extra bench/compare.py options for `make bench`, e.g. a CPU-sized run:
#   make bench BENCH_ARGS="--model dummy:tiny-llama --workload latency --num-prompts 2"
BENCH_ARGS ?=
LATEST_VENV ?= .venv-latest

.PHONY: install demo test test-latest constraints docs notebooks bench clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

install:  ## install the package at the tested versions (constraints.txt; torch only if none)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH)
	$(PIP) install $(CONSTRAINTS) -e ".[dev]"

demo: install  ## install, then chat with the newest stage on the default model
	$(PYTHON) -m $(NEWEST).run --chat "What is the capital of France?" --stream

test: install  ## install, then run the tests and the notebooks (CPU; gpu tests skip without a GPU)
	$(PYTHON) -m pytest -q
	$(PYTHON) -m pytest -q --nbmake --nbmake-timeout=600 notebooks/

test-latest:  ## the suite on the newest releases, in a new virtual environment (.venv-latest)
	rm -rf $(LATEST_VENV) && $(PYTHON) -m venv $(LATEST_VENV)
	$(MAKE) test PYTHON=$(abspath $(LATEST_VENV))/bin/python FOLOVLLM_LATEST=1
	@echo "green on the newest releases: 'make constraints PYTHON=$(LATEST_VENV)/bin/python' records them"

constraints:  ## write constraints.txt from this environment's versions (after a green run)
	$(PYTHON) tools/freeze_constraints.py

docs: install  ## install, then build the docs site into site/ (mkdocs build --strict, offline)
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs build --strict

notebooks: install  ## install, then run every notebook and save its outputs (what the docs show)
	$(PYTHON) tools/run_notebooks.py

bench: install  ## install, then compare every stage that generates and transformers (into bench/scratch/)
	$(PYTHON) bench/compare.py --milestones $(MILESTONES),hf $(BENCH_ARGS)

clean:  ## remove caches (keeps the default model in FOLOVLLM_HOME)
	rm -rf .pytest_cache .hypothesis site build *.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +
