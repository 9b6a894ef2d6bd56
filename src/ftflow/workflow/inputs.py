"""The files a rule depends on besides its upstream stage's outputs (the input functions of
rules/*.smk), and the figures the report's first page shows.

Snakemake parses the Snakefile for every dry run, every DVC stage and every Slurm job step, so
what it imports must stay light: this module, ftflow.config (the schema) and ftflow.paths, and
no stage module nor any library a stage needs (tests/workflow/test_workflow.py checks it). The stages
find these files the same way, through the functions here.
"""

from __future__ import annotations

from pathlib import Path

from ftflow import paths
from ftflow.config.locations import PKG, local_files, package_file  # noqa: F401 (the rules' input functions)
from ftflow.config.locations import task_data_files as task_data_files_of
from ftflow.config.params import load_yaml


def model_files(model: dict) -> list[str]:
    """The local files a model is made from, as the download rule's inputs (a changed file
    reruns it): a local model's directory, a GGUF file (pkg: resolved). One that cannot be
    found is left to download to report."""
    if model["source"] == "local":
        return [model["path"]]
    if model["source"] == "gguf":
        path = model["path"]
        found = package_file(path) if path.startswith(PKG) else Path(path)
        return [str(found)] if found is not None and found.is_file() else []
    return []


def user_files(specs: list[str], base: Path) -> list[str]:
    """The files of user code named "file.py:function" (readers under conf/data/, rewards under
    conf/train/); a built-in's name has no colon."""
    return sorted({str(base / spec.rsplit(":", 1)[0]) for spec in specs if ":" in spec})


def task_files(names: list[str], root: Path = Path(".")) -> list[str]:
    """The task YAMLs of conf/eval/tasks/ among the configured tasks; a name without one is an
    lm-eval built-in task (its data: eval.datasets, downloaded)."""
    return [f"{paths.TASKS}/{name}.yaml" for name in names if (root / paths.TASKS / f"{name}.yaml").exists()]


def task_data_files(names: list[str], root: Path = Path(".")) -> list[str]:
    """The local data files the tasks read (the evaluate rule's inputs), repository-relative:
    the holdout task's is normalize's test split."""
    out = [paths.HOLDOUT_DATA] if paths.HOLDOUT in names else []
    for name in names:
        out += [f for f in task_data_files_of(name, root / "conf") if not Path(f).is_absolute()]
    return sorted(set(out))


def report_headline(root: Path = Path(".")) -> dict:
    """The report stage's summary.yaml, for the report's first page (workflow/report/workflow.rst
    reads it from Snakemake's `config`, the one thing that page can read); {} before the report
    stage ran. Not --report-metadata: Snakemake 9 garbles its text values."""
    path = root / paths.REPORT / paths.REPORT_FILES["summary"]
    return load_yaml(path.read_text()) if path.exists() else {}


def missing_downloads(tree: dict, stage: str, root: Path = Path(".")) -> list[str]:
    """What a stage reads that the download rules bring and is not in data/: DVC's pipeline has
    no download stage (login nodes download; `dvc add data` versions what they brought), so a
    DVC stage checks for it before Snakemake would fail on a missing input file."""
    missing = []
    if stage == "normalize":
        for s in tree["data"]["sources"]:
            if not (root / paths.source_manifest(s["name"])).exists():
                missing.append(f"data source {s['name']!r} ({s.get('path') or s.get('hub')}): {paths.RAW}/{s['name']}/")
    if stage in ("pack", "train", "consolidate", "evaluate") and tree["model"]["source"] != "scratch":
        if not (root / paths.model_manifest(tree["model"]["name"])).exists():
            missing.append(f"model {tree['model']['name']!r}: {paths.base_model_dir(tree['model'])}/")
    if stage == "evaluate":
        for d in tree["eval"].get("datasets") or []:
            key = paths.eval_dataset_key(d["hub"], d.get("name"))
            if not (root / paths.eval_manifest(key)).exists():
                missing.append(f"eval dataset {d['hub']}: {paths.eval_manifest(key)}")
    return missing
