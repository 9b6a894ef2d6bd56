"""Running a stage: `ftflow <stage>`, every rule script (cli.run_rule) and the tests come in here.
The one place a stage's config sections are validated: its entry function gets them as a typed
StageConfig (config/schema.py) and never validates them again.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ftflow.stages import BY_NAME, NAMES, RULES, Stage


def resolve(entry: str):
    """The function of a registry entry, "module:function" (imported now, not at the parse)."""
    module, _, function = entry.partition(":")
    return getattr(importlib.import_module(module), function)


def run(stage: str, params: dict, root: Path = Path(".")):
    """Run a whole stage on its params (its config sections)."""
    if stage not in BY_NAME:
        raise ValueError(f"unknown stage {stage!r}: one of {NAMES}")
    return _call(BY_NAME[stage], BY_NAME[stage].entry, params, root)


def run_rule(rule: str, params: dict, root: Path = Path(".")):
    """Run a rule's part of its stage on the rule's params (download has a rule per source), with
    the sections its rule leaves out of them (Stage.read_at_run) from params.yaml."""
    stage = RULES[rule]
    if stage.read_at_run:
        from ftflow.config.params import PARAMS_FILE, read_params

        tree, params = read_params(root / PARAMS_FILE)[0], dict(params)
        for entry in stage.read_at_run:
            section, _, key = entry.partition(".")
            if not key:
                params[section] = tree[section]
            elif key in tree.get(section, {}):
                params[section] = {**params[section], key: tree[section][key]}
    return _call(stage, stage.rule_entries()[rule], params, root)


def _call(stage: Stage, entry: str, params: dict, root: Path):
    if stage.typed:
        from ftflow.config.schema import stage_config

        params = stage_config(stage.name, params)
    return resolve(entry)(params, root)
