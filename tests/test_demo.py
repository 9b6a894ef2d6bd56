"""The demo as the README shows it: `ftflow run` on the embedded default trains the scratch
model on the word task, the validation loss falls beside the training loss, the tuned model
answers every held-out record exactly, and `ftflow chat` gets the right word from it, ending at
the template's end of turn."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from ftflow import paths
from ftflow.train import curve

from helpers import copy_repo, ftflow


@pytest.mark.slow
def test_the_demo_learns_its_task_and_answers_in_chat(tmp_path):
    root = copy_repo(tmp_path / "repo")
    ftflow("run", cwd=root)
    rows = curve.read(root / paths.TRAIN / "loss.csv")
    validation = curve.series(rows, "validation", "loss")
    assert [s for s, _ in validation][:3] == [50, 100, 150] and validation[-1][1] < validation[0][1] / 10, validation
    metrics = json.loads((root / paths.EVALUATE / "metrics.json").read_text())
    assert metrics["tuned/demo_words/exact_match"] == 1.0  # the README's table
    for prompt, word in (
        ("What is the last word?\nred cat sea", "sea"),
        ("What is the first word?\nplum star owl", "plum"),
    ):
        proc = ftflow("chat", "--prompt", prompt, cwd=root)
        assert proc.stdout == f"{word}\n" and re.search(r"\[\d+ tokens, ended at <\|im_end\|>\]", proc.stderr), proc
    shutil.rmtree(root)
