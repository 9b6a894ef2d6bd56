"""The DVC view of the Snakemake DAG.

Snakemake is the one place a stage's inputs, outputs, command, resources and environment are
defined. `dvc.yaml` is rendered from the parsed rules (`ftflow dvc-yaml`), and each DVC stage's
command hands the work back to Snakemake for exactly that rule (`ftflow dispatch <rule>`), so
`SNAKEMAKE_PROFILE=profiles/slurm dvc repro` runs on Slurm. When DVC runs a stage, the
Snakefile checks that dvc.yaml still matches the DAG of the current config (a config that
changes the DAG's shape, such as a hub model instead of a scratch one, needs `ftflow dvc-yaml`).

Where the two tools differ on purpose:
  - download is not a DVC stage: `data/` (raw datasets, base models) is tracked by data.dvc.
  - results/train/checkpoints is a DVC output (persist: survives DVC's deletion of outputs
    before a run) but not a Snakemake output (Snakemake deletes a failed job's outputs, and
    a rerun must resume from them).
  - folders whose contents depend on the config (one folder per data source or base model,
    one YAML per eval task, user reader files) are one DVC dependency each, so switching
    datasets, readers or tasks with `dvc exp run -S` does not change dvc.yaml.
  - the `compose` stage (no Snakemake rule) depends on conf/: after an edit of conf/ that was
    not recomposed into params.yaml, `dvc repro` fails with the stale-config message instead
    of silently reporting nothing to do.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from ftflow import paths
from ftflow.config.params import load_yaml
from ftflow.stages import BY_NAME, DVC_STAGES

DVC_YAML = "dvc.yaml"
COMPOSE_STAGE = {"cmd": "ftflow compose --check", "deps": ["conf"]}
PERSIST = {"train": [paths.CHECKPOINTS]}
METRICS = (f"{paths.TRAIN}/summary.json", f"{paths.EVALUATE}/metrics.json")
# Plots across experiments (`dvc plots diff exp-a exp-b`), with ftflow's templates in .dvc/plots/:
# loss on a log scale, one colour per experiment, train and validation lines; eval scores in a base and a tuned column, one bar
# per experiment for each score
PLOTS = {
    f"{paths.TRAIN}/loss.csv": {"title": "Loss", "x": "step", "y": "value", "template": "ftflow_loss"},
    f"{paths.EVALUATE}/comparison.json": {
        "title": "Evaluation: base vs tuned",
        "x": "value",
        "y": "score",
        "template": "ftflow_eval",
    },
}
# (the first that holds a path wins: normalize reads the sources' manifests only, not the model's)
COARSE_DEPS = (paths.RAW, paths.MODELS, f"{paths.MANIFESTS}/sources", paths.MANIFESTS, "conf/eval/tasks", "conf/data",
               "conf/train")  # fmt: skip
# Coarse deps that a stage has whatever the config, so that dvc.yaml keeps one shape: user
# reader files live in conf/data/ (beside the data configs), user GRPO rewards in conf/train/,
# and only some configs name one.
# evaluate: its task YAMLs (a suite of lm-eval built-in tasks has none), the download manifests
# (the eval datasets' among them, in data/manifests/eval/) and the test split (eval=holdout's)
FIXED_DEPS = {"normalize": ["conf/data"], "train": ["conf/train"],
              "evaluate": ["conf/eval/tasks", paths.MANIFESTS, paths.HOLDOUT_DATA]}  # fmt: skip
# DVC sets this while it runs a stage; the Snakefile then checks dvc.yaml against its DAG
STAGE_ENV = "FTFLOW_DVC_STAGE"


class DriftError(RuntimeError):
    """dvc.yaml and the Snakemake DAG disagree."""


def coarse(path: str) -> str:
    for folder in COARSE_DEPS:
        if path.startswith(folder + "/"):
            return folder
    return path


def rule_graph(rules, root: Path = Path(".")) -> dict[str, dict[str, list[str]]]:
    """{stage: {"deps": [...], "outs": [...]}} of the DVC stages, from Snakemake's parsed rules:
    deps are the rule's inputs (coarsened) plus its script; outs its outputs plus PERSIST."""
    graph = {}
    for rule in rules:
        if rule.name not in DVC_STAGES:
            continue
        script = os.path.normpath(os.path.join(str(rule.basedir), rule.script))
        deps = {coarse(str(f)) for f in rule.input} | {os.path.relpath(script, Path(root).resolve())}
        deps |= set(FIXED_DEPS.get(rule.name, []))
        outs = {str(f) for f in rule.output} | set(PERSIST.get(rule.name, []))
        graph[rule.name] = {"deps": sorted(deps), "outs": sorted(outs)}
    missing = set(DVC_STAGES) - set(graph)
    if missing:
        raise DriftError(f"the Snakefile has no rule for the DVC stage(s) {sorted(missing)}")
    return graph


def snakemake_rules(root: Path = Path(".")):
    """The rules of workflow/Snakefile, parsed (for the current params.yaml) by Snakemake itself."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import OutputSettings, Quietness, ResourceSettings

    with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
        workflow = api.workflow(
            resource_settings=ResourceSettings(), snakefile=Path(root) / "workflow/Snakefile", workdir=Path(root)
        )
        # the API has no public accessor for parsed rules; snakemake is pinned <10 in pyproject
        return list(workflow._workflow.rules)


def render(graph: dict[str, dict[str, list[str]]]) -> dict:
    """dvc.yaml's content for a stage graph."""
    stages: dict[str, dict] = {"compose": dict(COMPOSE_STAGE)}
    for name in DVC_STAGES:
        outs = graph[name]["outs"]
        stage: dict = {"cmd": f"ftflow dispatch {name}", "deps": graph[name]["deps"]}
        # (a key read at run time, train.resume, stays: DVC's params name whole sections here)
        triggers = [s for s in BY_NAME[name].sections if s not in BY_NAME[name].read_at_run]
        if triggers:  # report reads no config
            stage["params"] = triggers
        plain = [o for o in outs if o not in METRICS and o not in PLOTS]
        stage["outs"] = [{o: {"persist": True}} if o in PERSIST.get(name, []) else o for o in plain]
        for key, kind in (("metrics", METRICS), ("plots", PLOTS)):
            found = [o for o in outs if o in kind]
            if found:
                stage[key] = found
        stages[name] = stage
    plots = [
        {spec["title"]: {"template": spec["template"], "x": spec["x"], "y": {path: spec["y"]}}}
        for path, spec in PLOTS.items()
    ]
    return {"stages": stages, "plots": plots}


HEADER = """\
# The DVC view of the Snakemake DAG, rendered from rules/*.smk by `ftflow dvc-yaml`: edit the
# rules, not this file (tests/workflow/test_dvc.py fails when the two disagree). Each stage's command
# runs exactly its rule through Snakemake, with the profile in $SNAKEMAKE_PROFILE
# (default profiles/local): `SNAKEMAKE_PROFILE=profiles/slurm dvc repro` runs on Slurm.
"""


def dump(content: dict) -> str:
    return HEADER + yaml.safe_dump(content, sort_keys=False, width=100)


def write(root: Path = Path(".")) -> Path:
    path = Path(root) / DVC_YAML
    path.write_text(dump(render(rule_graph(snakemake_rules(root), root))))
    return path


def declared_graph(content: dict) -> dict[str, dict[str, list[str]]]:
    """The stage graph that a dvc.yaml declares (same shape as rule_graph)."""

    def names(entries) -> list[str]:
        return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]

    graph = {}
    for name, stage in content.get("stages", {}).items():
        if name in DVC_STAGES:
            outs = names(stage.get("outs")) + names(stage.get("metrics")) + names(stage.get("plots"))
            graph[name] = {"deps": sorted(names(stage.get("deps"))), "outs": sorted(outs)}
    return graph


def output_times(root: Path = Path(".")) -> dict[Path, int]:
    """The modification time of every file of dvc.yaml's outputs. `dvc commit` links each output
    into DVC's cache, and an output identical to one cached before (a stage's config.yaml that
    another experiment shared) becomes a link to that older file: Snakemake, which compares
    times, would then rerun what follows. `ftflow run` puts these times back after committing."""
    outs = [
        o for stage in declared_graph(load_yaml((Path(root) / DVC_YAML).read_text())).values() for o in stage["outs"]
    ]
    times = {}
    for out in outs:
        path = Path(root) / out
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path] if path.is_file() else []
        times.update({f: f.stat().st_mtime_ns for f in files})
    return times


def differences(expected: dict, declared: dict) -> list[str]:
    """Human-readable differences between two stage graphs; empty when they agree."""
    lines = []
    for stage in sorted(set(expected) | set(declared)):
        if stage not in declared:
            lines.append(f"{stage}: a Snakemake rule with no DVC stage")
            continue
        if stage not in expected:
            lines.append(f"{stage}: a DVC stage with no Snakemake rule")
            continue
        for key in ("deps", "outs"):
            extra = sorted(set(declared[stage][key]) - set(expected[stage][key]))
            lacking = sorted(set(expected[stage][key]) - set(declared[stage][key]))
            if extra:
                lines.append(f"{stage}.{key}: in dvc.yaml only: {extra}")
            if lacking:
                lines.append(f"{stage}.{key}: in the Snakemake rule only: {lacking}")
    return lines


def check(rules, root: Path = Path(".")) -> None:
    """Raise DriftError if dvc.yaml does not describe the DAG of these rules."""
    path = Path(root) / DVC_YAML
    found = differences(rule_graph(rules, root), declared_graph(load_yaml(path.read_text())))
    if found:
        raise DriftError(
            f"{path} does not match the Snakemake DAG of the current config:\n  "
            + "\n  ".join(found)
            + "\nRender it again with `ftflow dvc-yaml` (and commit it)."
        )
