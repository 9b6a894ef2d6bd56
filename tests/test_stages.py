"""The stage registry (ftflow.stages) against what it describes: each stage's code inputs are the
modules it really imports, and each stage has a rule, a script, config sections, a DVC stage and
an output folder of its own name."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ftflow import paths, runner, stages
from ftflow.config.schema import Config

from helpers import REPO
from helpers.imports import circles, reachable

# The registry itself reaches a stage as its rule's params and inputs, which Snakemake compares
# on their own: an edit to it is not an edit to what a stage runs.
REGISTRY = frozenset({"stages"})


@pytest.mark.parametrize("stage", stages.STAGES, ids=stages.NAMES)
def test_a_stage_lists_exactly_the_modules_it_runs(stage):
    """Its code inputs: a module it imports but does not list would not rerun it when edited
    (normalize once missed download.py, consolidate provenance.py); one it lists but does not
    import would rerun it for nothing."""
    starts = [entry.split(":")[0].removeprefix("ftflow.") for entry in stage.rule_entries().values()]
    runs = set().union(*(reachable(m, skip=REGISTRY) for m in [*starts, *stage.processes]))
    if stage.typed:
        runs |= reachable("config.schema", skip=REGISTRY)  # runner.run_rule validates the sections with it
    missing, extra = runs - set(stage.modules), set(stage.modules) - runs
    assert not missing and not extra, (
        f"runs but does not list {sorted(missing)}; lists but does not run {sorted(extra)}"
    )


def test_no_module_imports_itself_back():
    """No import circle in src/ (launcher and train once imported each other)."""
    assert circles() == set()


def test_a_stage_gets_its_sections_validated_once(tmp_path):
    """runner.run hands a stage its sections as a typed config, and a bad value stops it before
    it starts, named by its dotted path in the stage's sections."""
    from ftflow.config.params import compose, stage_params
    from ftflow.config.schema import Eval, StageConfig, stage_config
    from ftflow.errors import ConfigError

    sections = stage_params(compose([], REPO / "conf"), "evaluate")
    cfg = stage_config("evaluate", sections)
    assert isinstance(cfg, StageConfig) and cfg.sections is sections
    assert cfg.eval == Eval.model_validate(sections["eval"])
    with pytest.raises(
        ConfigError, match=r"invalid evaluate config:\n  eval.batch_size: Input should be a valid integer"
    ):
        runner.run("evaluate", {**sections, "eval": {**sections["eval"], "batch_size": "many"}}, tmp_path)
    assert not (tmp_path / paths.EVALUATE).exists()  # stopped before the stage began


def test_an_unknown_stage_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown stage 'trian': one of \('download', 'normalize'"):
        runner.run("trian", {})


@pytest.fixture(scope="module")
def rules(tmp_path_factory):
    from ftflow.workflow import dvcyaml

    from helpers import copy_repo, ftflow

    root = copy_repo(tmp_path_factory.mktemp("stages") / "repo")
    ftflow("compose", cwd=root)
    return {rule.name: rule for rule in dvcyaml.snakemake_rules(root)}


@pytest.mark.parametrize("stage", stages.STAGES, ids=stages.NAMES)
def test_a_stage_has_its_rule_script_config_dvc_stage_and_output_folder(stage, rules):
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    folder = "data" if stage.name == "download" else getattr(paths, stage.name.upper())
    for name, entry in stage.rule_entries().items():
        rule = rules[name]
        assert Path(rule.script).name == f"{stage.name}.py", (name, rule.script)
        assert all(str(out).startswith(folder + "/") or str(out) == folder for out in rule.output), (name, folder)
        assert runner.resolve(entry)  # the entry exists
        if stage.name != "download":  # a download rule gets one source's or the model's location
            # its sections, but those it reads from params.yaml as it starts (a change reruns nothing)
            assert sorted(rule.params.cfg) == sorted(set(stage.sections) - set(stage.read_at_run)), name
    assert (REPO / "scripts" / f"{stage.name}.py").exists()
    # its code: the module or package of its name (download and normalize: in data/)
    entry_module = stage.entry.split(":")[0].split(".")
    assert stage.name in entry_module[-2:], stage.entry
    assert set(stage.sections) <= set(Config.model_fields)  # sections of the schema
    assert (stage.name in dvc) == stage.dvc_stage
    if stage.dvc_stage:
        assert dvc[stage.name]["cmd"] == f"ftflow dispatch {stage.name}"
    if stage.name == "report":  # the files the stage writes, each one an output of its rule
        assert {str(o) for o in rules["report"].output} == {f"{paths.REPORT}/{f}" for f in paths.REPORT_FILES.values()}
    assert (stage.name in stages.SLURM_JOBS) == (
        "slurm_resources" in (REPO / "rules" / f"{stage.name}.smk").read_text()
    )
