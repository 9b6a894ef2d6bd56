"""evaluate's task loading and metric flattening (the lm-eval run itself is in test_workflow)."""

from __future__ import annotations

import pytest

from ftflow.evaluate import flat_scores, task_config

from conftest import REPO


def test_shipped_task_resolves_its_data_files_against_the_root(tmp_path):
    task = task_config("demo_words", REPO)
    assert task["task"] == "demo_words" and task["output_type"] == "generate_until"
    assert task["dataset_kwargs"]["data_files"]["test"] == str(REPO / "results/normalize/test.parquet")


def test_unknown_task_lists_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match=r"eval task 'nope'.*shipped tasks: \['demo_words'\]"):
        task_config("nope", REPO)


def test_flat_scores_drop_stderr_and_bookkeeping():
    results = {"results": {"t": {"alias": "t", "exact_match,none": 0.5, "exact_match_stderr,none": 0.1, "sample_len": 8}}}
    assert flat_scores("tuned", results) == {"tuned/t/exact_match": 0.5}
