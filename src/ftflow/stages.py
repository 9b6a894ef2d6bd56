"""The stages, one record each. Every list of stages derives from here: the CLI's commands,
each rule's params (config sections) and code inputs, which stages are Slurm jobs, dvc.yaml's
stages, and the order `ftflow sync` stamps outputs in.

The Snakefile's parse imports this module: it names each stage's entry as "module:function",
imported only when the stage runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SRC = Path(__file__).parent  # src/ftflow


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
    # modules its entry starts as processes (`python -m`), not by import: code it runs too
    processes: tuple[str, ...] = ()
    # gets its sections validated once, as a typed StageConfig (download gets the locations
    # config.params.stage_params projects out of them, report no config)
    typed: bool = True
    # sections (or section.key) it reads that never change what it writes (train: tracking,
    # where the curve is also sent; whether a rerun resumes): left out of its rule's params
    # (config.params.rule_params; a whole section out of its DVC stage's too), so changing them
    # reruns nothing; its job reads them from params.yaml as it starts (runner)
    read_at_run: tuple[str, ...] = ()

    def rule_entries(self) -> dict[str, str]:
        return self.rules or {self.name: self.entry}

    def code(self) -> list[str]:
        return [module_file(m) for m in self.modules]


def module_file(module: str) -> str:
    """A module's file: "train.worker" -> src/ftflow/train/worker.py, the package "config" ->
    src/ftflow/config/__init__.py."""
    base = SRC / module.replace(".", "/")
    path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    return str(path.relative_to(SRC.parents[1]))


STAGES = (
    # downloads run where Snakemake runs (login nodes have internet, compute nodes often not), one
    # job per source and per model; `dvc add data` versions what they bring, not a DVC stage
    Stage(
        "download",
        "ftflow.data.download:download",
        ("data", "model", "eval"),  # projected to where things come from: config.params.stage_params
        ("config", "config.locations", "data", "data.download", "errors", "hashing", "paths"),
        slurm_job=False,
        dvc_stage=False,
        rules={
            "download_source": "ftflow.data.download:download_source",
            "download_model": "ftflow.data.download:download_model",
            "download_eval": "ftflow.data.download:download_eval_dataset",
            "download": "ftflow.data.download:gather",
        },
        typed=False,
    ),
    Stage(
        "normalize",
        "ftflow.data.normalize:normalize",
        ("data",),
        (
            "config",
            "config.locations",
            "config.params",
            "config.schema",
            "data",
            "data.carve",
            "data.formats",
            "data.messages",
            "data.normalize",
            "data.readers",
            "data.trees",
            "errors",
            "hashing",
            "integrity",
            "parallel",
            "paths",
        ),
    ),  # fmt: skip
    Stage(
        "pack",
        "ftflow.pack.stage:pack",
        ("model", "tokenizer", "template", "pack"),
        (
            "config",
            "config.locations",
            "config.params",
            "config.schema",
            "disk",
            "errors",
            "hashing",
            "integrity",
            "pack",
            "pack.encode",
            "pack.inspect",
            "pack.io",
            "pack.packing",
            "pack.pairs",
            "pack.spans",
            "pack.stage",
            "pack.templates",
            "pack.tokenizer",
            "parallel",
            "paths",
        ),
    ),  # fmt: skip
    Stage(
        "train",
        "ftflow.train.stage:launch",
        ("model", "train", "peft", "launcher", "tracking"),
        (
            "config",
            "config.locations",
            "config.params",
            "config.schema",
            "data",
            "data.messages",
            "data.readers",
            "disk",
            "errors",
            "hashing",
            "integrity",
            "paths",
            "progress",
            "provenance",
            "train",
            "train.__main__",
            "train.callbacks",
            "train.checkpoints",
            "train.curve",
            "train.launcher",
            "train.probe",
            "train.quantization",
            "train.rewards",
            "train.stage",
            "train.tracking",
            "train.trainers",
            "train.worker",
            "train.workers",
        ),
        processes=("train.__main__",),  # accelerate launch -m ftflow.train: the workers
        # the weights are the same whichever tracker watched, and whether the run resumed or
        # how a resume checked the checkpoint (checkpoints.NOT_IN_KEY)
        read_at_run=("tracking", "train.resume", "train.checkpoint_verify"),
    ),  # fmt: skip
    Stage(
        "consolidate",
        "ftflow.consolidate:consolidate",
        ("model", "peft", "template", "consolidate"),
        (
            "config",
            "config.locations",
            "config.params",
            "config.schema",
            "consolidate",
            "disk",
            "errors",
            "hashing",
            "paths",
            "provenance",
            "train",
            "train.probe",
            "train.quantization",
        ),
    ),  # fmt: skip
    Stage(
        "evaluate",
        "ftflow.evaluate:evaluate",
        ("model", "eval"),
        (
            "chat",
            "contamination",
            "config",
            "config.locations",
            "config.params",
            "config.schema",
            "errors",
            "evaluate",
            "holdout",
            "pack",
            "pack.io",
            "paths",
        ),
    ),  # fmt: skip
    # the report reads the stages' outputs (and the config.yaml each wrote, which must be what
    # params.yaml gives each stage: freshness), no config of its own
    Stage(
        "report",
        "ftflow.report:report",
        (),
        (
            "config",
            "config.locations",
            "config.params",
            "errors",
            "freshness",
            "paths",
            "report",
            "train",
            "train.curve",
        ),
        slurm_job=False,
        typed=False,
    ),
)

BY_NAME = {stage.name: stage for stage in STAGES}
NAMES = tuple(BY_NAME)
SLURM_JOBS = tuple(s.name for s in STAGES if s.slurm_job)
DVC_STAGES = tuple(s.name for s in STAGES if s.dvc_stage)
RULES = {rule: stage for stage in STAGES for rule in stage.rule_entries()}  # every rule, upstream first
