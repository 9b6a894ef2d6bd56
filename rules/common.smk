# Config loading, paths and input functions shared by the rules.
#
# Inputs name the outputs they read by path (ftflow.paths), not by reference to the producing
# step's output object: Snakemake follows such a reference even under --allowed-rules, so
# `ftflow dispatch` (a DVC stage's command, exactly one step) would rerun an upstream step
# whose outputs DVC relinked to an older cached copy. tests/workflow/test_dvc.py checks it.
import os
from pathlib import Path

from ftflow.config import params as ftparams
from ftflow import paths
from ftflow.workflow import inputs
from ftflow.workflow import slurm as ftslurm
from ftflow import stages as ftstages
from ftflow.paths import PACKED_SPLITS, SPLITS

# Validated, and checked against a fresh composition of conf/ (stale params.yaml is an error).
# PARAMS is params.yaml as written (the stages' config); VALID has the schema's defaults too.
PARAMS, VALID = ftparams.load_checked(ftparams.PARAMS_FILE)
MODEL = PARAMS["model"]
SCRATCH = MODEL["source"] == "scratch"

# The compute stages' `threads`: every core, which Snakemake scales down to --cores (in a Slurm
# job, the job's CPUs). Snakemake sets OMP_NUM_THREADS, MKL_NUM_THREADS... to a job's threads, 1
# where a step declares none: torch would then use one core however many the job has.
ALL_CORES = os.cpu_count() or 1


def params_of(stage):
    """The config sections a stage reads (but those it reads as it starts, which change nothing it
    writes: ftflow.stages.Stage.read_at_run): a change elsewhere does not rerun it."""
    return ftparams.rule_params(PARAMS, stage)


def slurm_resources(stage):
    """The stage's Slurm job (conf/slurm/, and launcher for train's GPUs and nodes)."""
    return ftslurm.resources(VALID, stage)


def code(stage):
    """A stage's modules (ftflow.stages), as inputs: editing its logic reruns it and what follows."""
    return ftstages.BY_NAME[stage].code()


def source_params(name):
    """One source's download params (where it comes from): a change reruns its job alone."""
    return next(s for s in params_of("download")["data"]["sources"] if s["name"] == name)


def eval_datasets():
    """{key: download params} of the built-in eval tasks' datasets (key: openai--gsm8k--main)."""
    return {paths.eval_dataset_key(d["hub"], d.get("name")): d for d in params_of("download")["eval"]["datasets"]}


def eval_dataset_params(key):
    """One eval dataset's download params: a change reruns its job alone."""
    return eval_datasets()[key]


def sources_and_model():
    """data/manifest.json's config: where the training data and the base model come from."""
    return {k: v for k, v in params_of("download").items() if k != "eval"}


def eval_manifests():
    """The manifests of the built-in eval tasks' datasets: evaluate runs after their download."""
    return [paths.eval_manifest(key) for key in eval_datasets()]


def local_source(wildcards):
    """A local source's files (a glob's matches): editing them reruns its download."""
    path = source_params(wildcards.source).get("path")
    return [str(f) for f in inputs.local_files(path)] if path else []


def local_model():
    """A local model's directory or GGUF file: a changed one reruns download."""
    return inputs.model_files(MODEL)


def user_readers():
    """User reader files ("file.py:function", under conf/data/): editing one reruns normalize."""
    return inputs.user_files([s.get("reader") or "" for s in PARAMS["data"]["sources"]], Path(paths.READERS))


def reward_files(train):
    """User GRPO reward files ("file.py:function", under conf/train/): editing one reruns train."""
    rewards = (train.get("grpo") or {}).get("rewards") or []
    return inputs.user_files([r["name"] for r in rewards], Path(paths.REWARDS))


def raw_dirs():
    return [f"{paths.RAW}/{s['name']}" for s in PARAMS["data"]["sources"]]


def templates():
    """The shipped chat templates (pack renders with the configured one)."""
    return sorted(str(p) for p in Path("src/ftflow/pack/templates").glob("*.jinja"))


def base_model():
    """The base weights: downloaded (hub/local) or initialised by train (scratch)."""
    return paths.base_model_dir(MODEL)


def packed_dirs():
    return [directory(f"{paths.PACK}/{s}") for s in PACKED_SPLITS]


def report_file(name):
    """One of the report's files (ftflow.paths.REPORT_FILES: what the report stage writes)."""
    return f"{paths.REPORT}/{paths.REPORT_FILES[name]}"
