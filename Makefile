# The two commands of the README. Both create .venv on first use; torch is installed first,
# pinned to the CPU wheel, so that the rest of the requirements do not pull CUDA builds.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: setup demo test lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

## demo: compose the shipped config and run the whole DAG locally
demo: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/ftflow run

## test: the whole test suite (what CI runs)
test: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/pytest

lint: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/snakemake --lint -s workflow/Snakefile

clean:
	rm -rf results logs .snakemake
