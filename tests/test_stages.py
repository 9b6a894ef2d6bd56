"""The stage registry (ftflow.stages) against what it describes: each stage's code inputs are the
modules it really imports, and each stage has a rule, a script, config sections, a DVC stage and
an output folder of its own name."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ftflow import paths, stages
from ftflow.schema import Config

from helpers import REPO
from helpers.imports import circles, reachable

# The registry itself reaches a stage as its rule's params and inputs, which Snakemake compares
# on their own: an edit to it is not an edit to what a stage runs.
REGISTRY = {"stages"}


@pytest.mark.parametrize("stage", stages.STAGES, ids=stages.NAMES)
def test_a_stage_lists_exactly_the_modules_it_runs(stage):
    """Its code inputs: a module it imports but does not list would not rerun it when edited
    (normalize once missed download.py, consolidate provenance.py); one it lists but does not
    import would rerun it for nothing."""
    runs = set()
    for entry in stage.rule_entries().values():
        runs |= reachable(entry.split(":")[0].removeprefix("ftflow."))
    missing, extra = runs - REGISTRY - set(stage.modules), set(stage.modules) - runs
    assert not missing and not extra, (
        f"runs but does not list {sorted(missing)}; lists but does not run {sorted(extra)}"
    )


def test_no_module_imports_itself_back():
    """No import circle in src/ (launcher and train once imported each other)."""
    assert circles() == set()


def test_an_unknown_stage_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown stage 'trian': one of \('download', 'normalize'"):
        stages.run("trian", {})


@pytest.fixture(scope="module")
def rules(tmp_path_factory):
    from ftflow import dvcyaml

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
        assert stages.resolve(entry)  # the entry exists
        if stage.name != "download":  # a download rule gets one source's or the model's location
            assert sorted(rule.params.cfg) == sorted(stage.sections), name
    assert (REPO / "scripts" / f"{stage.name}.py").exists()
    assert set(stage.sections) <= set(Config.model_fields)  # sections of the schema
    assert (stage.name in dvc) == stage.dvc_stage
    if stage.dvc_stage:
        assert dvc[stage.name]["cmd"] == f"ftflow dispatch {stage.name}"
    assert (stage.name in stages.SLURM_JOBS) == (
        "slurm_resources" in (REPO / "rules" / f"{stage.name}.smk").read_text()
    )
