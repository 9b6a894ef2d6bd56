"""The stages, one record each. Every list of stages derives from here: the CLI's commands,
each rule's params (config sections) and code inputs, which stages are Slurm jobs, dvc.yaml's
stages, and the order `ftflow sync` stamps outputs in.

The Snakefile's parse imports this module: it names each stage's entry as "module:function",
imported only when the stage runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Stage:
    name: str  # also its rule, script, module, config group (evaluate's is `eval`), output folder
    entry: str  # "module:function", called as function(params, root)
    # the config sections it reads: its rule's params, its DVC stage's params; a change
    # elsewhere in the tree does not rerun it
    sections: tuple[str, ...]
    # every ftflow module it runs (tests/test_stages.py derives them from the imports): its code
    # inputs, so editing one reruns it and what follows
    modules: tuple[str, ...]
    slurm_job: bool = True  # runs as a Slurm job under profiles/slurm
    dvc_stage: bool = True  # a stage of dvc.yaml
    # its Snakemake rules, when they are not one rule of its own name: rule -> entry
    rules: dict[str, str] = field(default_factory=dict)

    def rule_entries(self) -> dict[str, str]:
        return self.rules or {self.name: self.entry}

    def code(self) -> list[str]:
        return [f"src/ftflow/{m}.py" for m in self.modules]


STAGES = (
    # downloads run where Snakemake runs (login nodes have internet, compute nodes often not), one
    # job per source and per model; `dvc add data` versions what they bring, not a DVC stage
    Stage(
        "download",
        "ftflow.download:download",
        ("data", "model"),  # projected to where things come from: config.stage_params
        (
            "config",
            "download",
            "errors",
            "hashing",
            "inputs",
            "paths",
        ),
        slurm_job=False,
        dvc_stage=False,
        rules={
            "download_source": "ftflow.download:download_source",
            "download_model": "ftflow.download:download_model",
            "download": "ftflow.download:gather",
        },
    ),
    Stage(
        "normalize",
        "ftflow.normalize:normalize",
        ("data",),
        (
            "config",
            "errors",
            "formats",
            "hashing",
            "messages",
            "normalize",
            "parallel",
            "paths",
            "readers",
            "schema",
        ),
    ),  # fmt: skip
    Stage(
        "pack",
        "ftflow.pack:pack",
        ("model", "tokenizer", "template", "pack"),
        ("config", "errors", "pack", "parallel", "paths", "schema", "spans", "templates"),
    ),
    Stage(
        "train",
        "ftflow.train:launch",
        ("model", "train", "peft", "launcher", "tracking"),
        (
            "config",
            "errors",
            "hashing",
            "launcher",
            "messages",
            "paths",
            "progress",
            "provenance",
            "readers",
            "rewards",
            "schema",
            "tracking",
            "train",
            "trainers",
        ),
    ),  # fmt: skip
    Stage(
        "consolidate",
        "ftflow.consolidate:consolidate",
        ("model", "peft", "template", "consolidate"),
        (
            "config",
            "consolidate",
            "errors",
            "hashing",
            "paths",
            "provenance",
            "schema",
        ),
    ),
    Stage(
        "evaluate",
        "ftflow.evaluate:evaluate",
        ("model", "eval"),
        ("config", "errors", "evaluate", "paths", "schema"),
    ),
    # the report reads the stages' outputs (and the config.yaml each wrote), no config
    Stage("report", "ftflow.report:report", (), ("paths", "report"), slurm_job=False),
)

BY_NAME = {stage.name: stage for stage in STAGES}
NAMES = tuple(BY_NAME)
SLURM_JOBS = tuple(s.name for s in STAGES if s.slurm_job)
DVC_STAGES = tuple(s.name for s in STAGES if s.dvc_stage)
RULES = {rule: stage for stage in STAGES for rule in stage.rule_entries()}  # every rule, upstream first


def resolve(entry: str):
    module, _, function = entry.partition(":")
    return getattr(importlib.import_module(module), function)


def run(stage: str, params: dict, root: Path = Path(".")):
    """Run a stage on its params (its config sections): the CLI's `ftflow <stage>`."""
    if stage not in BY_NAME:
        raise ValueError(f"unknown stage {stage!r}: one of {NAMES}")
    return resolve(BY_NAME[stage].entry)(params, root)


def run_rule(rule: str, params: dict, root: Path = Path(".")):
    """Run a rule's part of its stage on the rule's params: the rule scripts' call."""
    return resolve(RULES[rule].rule_entries()[rule])(params, root)
