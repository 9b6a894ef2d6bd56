"""`ftflow config` and `ftflow <stage> --help`: every key with its type, value and description,
from the schema; the values printed are what compose gives."""

from __future__ import annotations

import re

import pytest
from pydantic import BaseModel

from ftflow.config.describe import describe, sections, shown
from ftflow.config.params import compose
from ftflow.config.schema import Config, model_of, validate

from helpers import REPO, ftflow

CONF = REPO / "conf"
ENTRY = re.compile(r"^  (\S+) \((.*)\) = (.*)$")  # `  train.learning_rate (float, > 0) = 0.001`


def fields(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        yield f"{prefix}{name}", field
        inner = model_of(field.annotation)
        if inner is not None:
            yield from fields(inner, f"{prefix}{name}.")


def test_every_schema_field_has_a_description():
    missing = [key for key, field in fields(Config) if key != "conf_digest" and not (field.description or "").strip()]
    assert not missing, f"fields without a description: {missing}"


def leaves(model: type[BaseModel], tree: dict, prefix: str) -> dict:
    """{dotted key: value as written} of a validated section, walked by the schema: a map of
    sections by key, a list of sections as key[].field -> [each item's value]."""
    out = {}
    for name, field in model.model_fields.items():
        key, value, inner = f"{prefix}.{name}", tree[name], model_of(field.annotation)
        if inner and isinstance(value, dict) and name == "jobs":
            out.update({k: v for job, item in value.items() for k, v in leaves(inner, item, f"{key}.{job}").items()})
        elif inner and isinstance(value, dict):
            out.update(leaves(inner, value, key))
        elif inner and isinstance(value, list):
            out.update(
                {f"{key}[].{f}": "[" + ", ".join(shown(item[f]) for item in value) + "]" for f in inner.model_fields}
            )
        else:
            out[key] = shown(value)
    return out


@pytest.mark.parametrize("overrides", [[], ["train=dpo", "peft=lora"], ["experiment=sms_spam"], ["train=grpo"]])
def test_the_listed_values_are_what_compose_gives(overrides):
    valid = validate(compose(overrides, CONF)).model_dump(mode="json")
    listed = {}
    for line in describe(valid, sections()).splitlines():
        found = ENTRY.match(line)
        if found:
            listed[found.group(1)] = found.group(3)
    expected = {
        k: v
        for name in sections()
        for k, v in leaves(model_of(Config.model_fields[name].annotation), valid[name], name).items()
    }
    assert listed == expected


def test_ftflow_config_train_prints_each_key_with_its_value_and_description():
    out = ftflow("config", "train", "train.learning_rate=3e-4", cwd=REPO).stdout
    assert "  train.learning_rate (float, > 0) = 0.0003\n      the optimizer's (AdamW's) peak learning rate\n" in out
    assert "  train.method (sft | dpo | kto | grpo) = sft\n" in out
    assert out.startswith("train: the trainer and its optimisation (conf/train/)\n") and "\nmodel:" not in out
    default = ftflow("config", "train", cwd=REPO).stdout
    assert f"train.learning_rate (float, > 0) = {compose([], CONF)['train']['learning_rate']}\n" in default


def test_a_stage_help_lists_the_keys_it_reads():
    out = ftflow("normalize", "--help", cwd=REPO).stdout
    assert out.startswith("ftflow normalize [overrides...]: run the normalize stage by hand")
    assert "  data.on_error (raise | skip) = raise\n" in out and "\n  train." not in out
    wrong = ftflow("config", "tran", cwd=REPO, check=False)
    assert wrong.returncode == 2 and "no config group tran (groups: data, model," in wrong.stderr
    assert wrong.stderr.rstrip().endswith("— did you mean train?")
