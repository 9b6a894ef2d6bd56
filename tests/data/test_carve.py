"""Validation and test splits carved from the training records (data.validation_size/test_size)."""

from __future__ import annotations

import json

import pytest

from ftflow import paths
from ftflow.config.schema import validate
from ftflow.data.normalize import NormalizeError
from ftflow.errors import ConfigError

from helpers.normalized import rows, stage


def conversations(n: int, start: int = 0) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}
            for i in range(start, start + n)]  # fmt: skip


def write(root, records: list[dict]) -> None:
    raw = root / paths.RAW / "mine"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def split_of(root) -> dict[str, str]:
    """The user turn's text -> the split its record landed in."""
    return {r["messages"][0]["content"]: split for split in paths.SPLITS for r in rows(root, split)}


def carve(root, records, **sizes) -> dict:
    write(root, records)
    return stage(root, [{"name": "mine", "reader": "messages"}], **sizes)["splits"]


def test_fractions_carve_disjoint_splits_that_keep_their_records_when_more_arrive(tmp_path):
    stats = carve(tmp_path / "a", conversations(300), validation_size=0.1, test_size=0.2)
    first = split_of(tmp_path / "a")
    counts = {split: stats[split]["rows"] for split in paths.SPLITS}
    assert sum(counts.values()) == 300 and len(first) == 300  # every record in exactly one split
    assert 15 <= counts["validation"] <= 45 and 35 <= counts["test"] <= 85, counts
    assert stats["test"]["carved"] == {"from": "train", "data.test_size": 0.2, "how": stats["test"]["carved"]["how"]}
    assert stats["train"]["carved_out"] == {"validation": counts["validation"], "test": counts["test"]}
    assert stats["train"]["records_in"] == stats["train"]["records_out"] == 300  # before carving: nothing dropped

    again = carve(tmp_path / "b", conversations(300), validation_size=0.1, test_size=0.2)
    assert {s: again[s]["sha256"] for s in paths.SPLITS} == {s: stats[s]["sha256"] for s in paths.SPLITS}

    carve(tmp_path / "c", conversations(300) + conversations(200, start=300), validation_size=0.1, test_size=0.2)
    grown = split_of(tmp_path / "c")
    assert {text: grown[text] for text in first} == first  # no old record changed its split


def test_exact_duplicates_land_in_one_split(tmp_path):
    records = conversations(100)
    carve(tmp_path, records + records[:50], test_size=0.3)  # 50 conversations twice, no dedup
    by_text: dict[str, set] = {}
    for split in paths.SPLITS:
        for r in rows(tmp_path, split):
            by_text.setdefault(r["messages"][0]["content"], set()).add(split)
    assert all(len(splits) == 1 for splits in by_text.values())
    assert sum(len(rows(tmp_path, s)) for s in paths.SPLITS) == 150


def test_a_count_carves_exactly_that_many(tmp_path):
    stats = carve(tmp_path, conversations(30), validation_size=3, test_size=4)
    assert (stats["validation"]["rows"], stats["test"]["rows"], stats["train"]["rows"]) == (3, 4, 23)


def test_a_fraction_that_carves_nothing_is_an_error_naming_it(tmp_path):
    with pytest.raises(NormalizeError, match=r"data.test_size=0.001 carved no record from 5 training records"):
        carve(tmp_path, conversations(5), test_size=0.001)


def test_a_carved_split_with_its_own_source_is_refused():
    base = {
        "kind": "conversation",
        "sources": [{"name": "a", "path": "x"}, {"name": "b", "path": "y", "split": "test"}],
    }
    with pytest.raises(ConfigError, match="data.test_size carves a test split .* source 'b' feeds test already"):
        validate({"data": {**base, "test_size": 0.1}})
    with pytest.raises(ConfigError, match="leaves no training record"):
        validate({"data": {"sources": base["sources"][:1], "validation_size": 0.5, "test_size": 0.5}})


def test_each_split_is_the_same_whether_or_not_the_other_is_carved(tmp_path):
    """test takes the lowest hashes, validation the highest: switching one on or off never moves
    records in or out of the other (validation losses stay comparable across such runs)."""
    carve(tmp_path / "both", conversations(300), validation_size=0.1, test_size=0.2)
    both = split_of(tmp_path / "both")
    carve(tmp_path / "val", conversations(300), validation_size=0.1)
    carve(tmp_path / "test", conversations(300), test_size=0.2)
    alone = {**split_of(tmp_path / "val"), **{t: s for t, s in split_of(tmp_path / "test").items() if s == "test"}}
    assert {t for t, s in both.items() if s == "validation"} == {t for t, s in alone.items() if s == "validation"}
    assert {t for t, s in both.items() if s == "test"} == {t for t, s in alone.items() if s == "test"}
    for size in (5, 12):  # counts too
        carve(tmp_path / f"c{size}", conversations(300), validation_size=size, test_size=7)
        carve(tmp_path / f"v{size}", conversations(300), validation_size=size)
        pick = {t for t, s in split_of(tmp_path / f"c{size}").items() if s == "validation"}
        assert (
            pick == {t for t, s in split_of(tmp_path / f"v{size}").items() if s == "validation"} and len(pick) == size
        )


def test_splits_that_take_every_record_name_the_sizes(tmp_path):
    with pytest.raises(NormalizeError, match=r"data.validation_size=30 and data.test_size=20 took all 40 training "
                                             r"records: none is left to train on"):  # fmt: skip
        carve(tmp_path, conversations(40), validation_size=30, test_size=20)
