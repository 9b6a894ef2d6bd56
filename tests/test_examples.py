"""The shipped real task (examples/sms_spam): the published file, the splits derived from it,
and the experiment that trains on it (README "A real model on a real task")."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

from ftflow.config.params import compose

from helpers import REPO

SMS = REPO / "examples/sms_spam"


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_sms_splits_are_made_from_the_published_file_byte_for_byte(tmp_path):
    work = tmp_path / "sms_spam"
    shutil.copytree(SMS, work, ignore=shutil.ignore_patterns("*.jsonl"))
    subprocess.run([sys.executable, str(work / "make_data.py")], check=True, capture_output=True)
    for name in ("train.jsonl", "test.jsonl"):
        assert (work / name).read_bytes() == (SMS / name).read_bytes(), name

    published = (SMS / "SMSSpamCollection").read_bytes()
    assert hashlib.sha256(published).hexdigest() in (SMS / "README.md").read_text()
    messages = {line.split(b"\t", 1)[1].decode() for line in published.splitlines()}
    train, test = records(SMS / "train.jsonl"), records(SMS / "test.jsonl")
    assert len(train) + len(test) == len(messages) == 5171  # every distinct message, once
    assert not {r["input"] for r in train} & {r["input"] for r in test}
    assert sorted(r["output"] for r in test) == ["no"] * 100 + ["yes"] * 100


def test_sms_experiment_trains_smollm2_with_its_own_template_on_the_shipped_task():
    tree = compose(["experiment=sms_spam"], REPO / "conf")
    assert (tree["model"]["name"], tree["tokenizer"]["source"], tree["template"]["name"], tree["peft"]["method"]) == (
        "smollm2", "model", "model", "lora")  # fmt: skip
    assert [s["path"] for s in tree["data"]["sources"]] == [
        "examples/sms_spam/train.jsonl",
        "examples/sms_spam/test.jsonl",
    ]
    assert tree["eval"]["tasks"] == ["sms_spam", "sms_spam_choice"]
    for task in tree["eval"]["tasks"]:  # the eval tasks read the held-out file the data config names
        assert "examples/sms_spam/test.jsonl" in (REPO / "conf/eval/tasks" / f"{task}.yaml").read_text()
