"""The contamination check: evaluation examples that also occur in the training data, counted
exactly (planted copies and one planted 13-word run found with their record ids, a 12-word run
not), and zero on the demo's data, whose splits are disjoint by construction."""

from __future__ import annotations

import json
import shutil

import pytest

from ftflow import paths
from ftflow.config.schema import Eval
from ftflow.evaluate import check_contamination, load_tasks, offline_hub_data, task_index, task_specs

from helpers import REPO
from helpers.normalized import stage

WORDS = ("amber basalt cedar dune ember fjord garnet heron iris juniper kelp lichen moss nectar onyx pine quartz "
         "reed sage tundra umber violet willow xenon yarrow zinc").split()  # fmt: skip


def sentence(i: int, n: int) -> str:
    """n words, different for every i (a run of 13 of them occurs in no other sentence)."""
    return " ".join(f"{WORDS[(i * 7 + k) % len(WORDS)]}{i}x{k}" for k in range(n))


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write(root, name: str, records: list[dict]) -> None:
    raw = root / paths.RAW / name
    raw.mkdir(parents=True, exist_ok=True)
    (raw / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_planted_copies_and_a_shared_13_word_run_are_found_with_their_training_records(tmp_path):
    test = [chat(sentence(i, 20), sentence(100 + i, 5)) for i in range(10)]
    train = [chat(sentence(200 + i, 20), sentence(300 + i, 5)) for i in range(50)]
    planted = {
        50: test[0],  # copies of test conversations
        51: test[1],
        52: chat(
            "Please answer: " + test[2]["messages"][0]["content"].upper() + "!", test[2]["messages"][1]["content"]
        ),
        53: chat(" ".join(test[3]["messages"][0]["content"].split()[4:17]) + " and more", "ok"),  # 13 words shared
        54: chat(" ".join(test[4]["messages"][0]["content"].split()[4:16]) + " and more", "ok"),  # 12: not a run
    }
    train += [planted[i] for i in sorted(planted)]
    write(tmp_path, "mine", train)
    write(tmp_path, "held", test)
    stage(tmp_path, [{"name": "mine", "reader": "messages"}, {"name": "held", "reader": "messages", "split": "test"}])

    out = tmp_path / paths.EVALUATE
    check_contamination(Eval(tasks=["holdout"]), {}, tmp_path, out)
    found = json.loads((out / "contamination.json").read_text())
    assert found["tasks"] == {"holdout": {"examples": 10, "exact": 3, "ngram": 4, "share": 0.4, "flagged": True}}
    assert found["train_records"] == 55 and found["checked"]
    lines = [json.loads(line) for line in (out / "contamination.jsonl").read_text().splitlines()]
    ids = {line["example"]: (line["exact_ids"], line["ngram_ids"]) for line in lines}
    record, example = "mine/mine.jsonl:{}".format, "held/held.jsonl:{}".format  # normalize's ids: source/file:line
    assert ids == {example(1): ([record(51)], [record(51)]), example(2): ([record(52)], [record(52)]),
                   example(3): ([record(53)], [record(53)]), example(4): ([], [record(54)])}  # fmt: skip

    check_contamination(Eval(tasks=["holdout"], contamination={"ngram": 12, "flag_above": 0.5}), {}, tmp_path, out)
    found = json.loads((out / "contamination.json").read_text())["tasks"]["holdout"]
    assert (found["ngram"], found["flagged"]) == (5, False)  # the 12-word run counts now; 50% is not above 0.5


def test_the_demos_splits_share_nothing_with_its_training_data(tmp_path):
    """The demo's held-out records, as the holdout task and as lm-eval's demo_words reads them."""
    for name in ("demo_train", "demo_test"):
        raw = tmp_path / paths.RAW / name
        raw.mkdir(parents=True)
        shutil.copy(REPO / f"examples/demo/{name.removeprefix('demo_')}.jsonl", raw)
    stage(tmp_path, [{"name": "demo_train", "reader": "alpaca"},
                     {"name": "demo_test", "reader": "alpaca", "split": "test"}])  # fmt: skip
    cfg, leaves = Eval(tasks=["holdout", "demo_words"]), {}
    with offline_hub_data(tmp_path) as cache:
        specs = task_specs(["demo_words"], REPO)
        load_tasks(["demo_words"], specs, cfg, task_index(specs), cache, REPO, leaves)
        check_contamination(cfg, leaves, tmp_path, tmp_path / "out")
    found = json.loads((tmp_path / "out/contamination.json").read_text())
    assert found["train_records"] == 3000
    assert found["tasks"] == {task: {"examples": 200, "exact": 0, "ngram": 0, "share": 0.0, "flagged": False}
                              for task in ("holdout", "demo_words")}  # fmt: skip


@pytest.mark.parametrize("text", ["", "!!", "..."])
def test_an_example_without_words_is_counted_but_never_found(tmp_path, text):
    from ftflow.contamination import check

    write(tmp_path, "mine", [chat("a b c", "d")])
    stage(tmp_path, [{"name": "mine", "reader": "messages"}])
    summary, lines = check({"t": [text, "a b c d"]}, tmp_path / paths.NORMALIZE / "train.parquet", 13, 0.0)
    assert summary["tasks"]["t"] == {"examples": 2, "exact": 1, "ngram": 1, "share": 0.5, "flagged": True}
    assert [line["example"] for line in lines] == [1]
