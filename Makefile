# FoloVLLM: `make demo` runs the newest stage on the default model; `make test` runs the suite.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The stages come from bench/stages.py: the newest one present, and those that generate.
NEWEST = $(shell $(PYTHON) -m bench.stages --newest)
MILESTONES = $(shell $(PYTHON) -m bench.stages --milestones)

.PHONY: install demo test docs notebooks bench clean help

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install:  ## install the package (pins torch==2.13.0 CPU only if no torch is installed)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[dev]"

demo: install  ## install, then chat with the newest stage on the default model
	$(PYTHON) -m $(NEWEST).run --chat "What is the capital of France?" --stream

test: install  ## install, then run the tests and the notebooks (CPU; gpu tests skip without a GPU)
	$(PYTHON) -m pytest -q
	$(PYTHON) -m pytest -q --nbmake --nbmake-timeout=600 notebooks/

docs: install  ## install, then build the docs site into site/ (mkdocs build --strict, offline)
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs build --strict

notebooks: install  ## install, then run every notebook and save its outputs (what the docs show)
	$(PYTHON) tools/run_notebooks.py

bench: install  ## install, then compare every stage that generates and transformers (into bench/scratch/)
	$(PYTHON) bench/compare.py --milestones $(MILESTONES),hf

clean:  ## remove caches (keeps the default model in FOLOVLLM_HOME)
	rm -rf .pytest_cache .hypothesis site build *.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +
