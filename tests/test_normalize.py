"""Readers and the normalize stage on real sample data and on deliberately broken records."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

from ftflow import paths
from ftflow.messages import Message, RecordError, validate_conversation
from ftflow.normalize import NormalizeError, normalize
from ftflow.readers import alpaca, get_reader, openai_messages, sharegpt

from conftest import REPO

ALPACA_FIXTURE = REPO / "examples" / "formats" / "alpaca_en_demo.json"


def test_alpaca_joins_instruction_and_input():
    msgs = alpaca({"instruction": "Add.", "input": "2 3", "output": "5", "system": "Be terse."})
    assert [(m.role, m.content) for m in msgs] == [("system", "Be terse."), ("user", "Add.\n2 3"), ("assistant", "5")]


def test_alpaca_history_becomes_turns():
    msgs = alpaca({"instruction": "and 3?", "output": "9", "history": [["square 2?", "4"]]})
    assert [m.role for m in msgs] == ["user", "assistant", "user", "assistant"]


def test_messages_and_sharegpt_readers():
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "train": False}]}
    assert openai_messages(rec)[1].train is False
    conv = sharegpt({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})
    assert [m.role for m in conv] == ["user", "assistant"]


@pytest.mark.parametrize(
    "messages,reason,detail",
    [
        ([], "empty", "no messages"),
        ([Message("user", "a"), Message("user", "b"), Message("assistant", "c")], "bad_order", "index 1"),
        ([Message("user", "a"), Message("system", "b"), Message("assistant", "c")], "bad_order", "index 1"),
        ([Message("user", "a")], "no_target", "no assistant"),
        ([Message("user", "a"), Message("assistant", " ")], "empty_target", "empty"),
    ],
)
def test_conversation_checks_name_the_problem(messages, reason, detail):
    with pytest.raises(RecordError) as err:
        validate_conversation(messages)
    assert err.value.reason == reason and detail in str(err.value)


def test_unknown_role_is_rejected():
    with pytest.raises(RecordError, match="bad_role"):
        Message("robot", "x")


def test_user_reader_from_file(tmp_path):
    (tmp_path / "mine.py").write_text(
        "from ftflow.messages import Message\n"
        "def qa(r):\n    return [Message('user', r['q']), Message('assistant', r['a'])]\n"
    )
    reader = get_reader(f"{tmp_path / 'mine.py'}:qa")
    assert reader({"q": "1+1", "a": "2"})[1].content == "2"
    with pytest.raises(ValueError, match="no function 'nope'"):
        get_reader(f"{tmp_path / 'mine.py'}:nope")
    with pytest.raises(ValueError, match="unknown reader 'alpacca'"):
        get_reader("alpacca")


def _stage(tmp_path, sources, on_error="raise"):
    for s in sources:
        (tmp_path / paths.RAW / s["name"]).mkdir(parents=True, exist_ok=True)
    return {"data": {"sources": sources, "on_error": on_error}}


def test_normalize_real_alpaca_sample(tmp_path):
    cfg = _stage(tmp_path, [{"name": "alpaca", "path": "x", "split": "train", "reader": "alpaca", "limit": 300}])
    shutil.copy(ALPACA_FIXTURE, tmp_path / paths.RAW / "alpaca")
    stats = normalize(cfg, tmp_path)
    table = pq.read_table(tmp_path / paths.NORMALIZE / "train.parquet").to_pylist()
    assert stats["sources"]["alpaca"] == {"records_in": 300, "records_out": 300, "dropped": {}}
    assert len(table) == 300
    raw0 = json.loads(ALPACA_FIXTURE.read_text())[0]
    assert table[0]["id"] == "alpaca/alpaca_en_demo.json[0]"
    assert table[0]["messages"][-1]["content"] == raw0["output"]
    assert (tmp_path / paths.NORMALIZE / "config.yaml").exists()
    for split in ("validation", "test"):  # fed by no source: written empty, so the outputs are fixed
        assert pq.read_table(tmp_path / paths.NORMALIZE / f"{split}.parquet").num_rows == 0


BAD_LINES = [
    '{"instruction": "a", "output": "b"}',
    "{not json",
    '{"instruction": "a"}',
    '{"instruction": "a", "output": "   "}',
    '["a list"]',
    '{"instruction": 3, "output": "x"}',
    '{"instruction": "c", "input": "d", "output": "e"}',
]


def _bad_source(tmp_path):
    cfg = _stage(tmp_path, [{"name": "mixed", "path": "x", "split": "train", "reader": "alpaca"}])
    (tmp_path / paths.RAW / "mixed" / "data.jsonl").write_text("\n".join(BAD_LINES) + "\n")
    return cfg


def test_bad_record_raises_with_source_line_and_reason(tmp_path):
    with pytest.raises(NormalizeError) as err:
        normalize(_bad_source(tmp_path), tmp_path)
    msg = str(err.value)
    assert "source 'mixed', record data.jsonl:2" in msg and "invalid_json" in msg and "on_error=skip" in msg


def test_skip_counts_every_dropped_record_by_reason(tmp_path):
    cfg = _bad_source(tmp_path)
    cfg["data"]["on_error"] = "skip"
    stats = normalize(cfg, tmp_path)["sources"]["mixed"]
    assert stats["records_in"] == len(BAD_LINES)
    assert stats["records_out"] == 2
    assert stats["dropped"] == {
        "invalid_json": 1, "missing_field": 1, "empty_target": 1, "not_an_object": 1, "bad_field": 1
    }  # fmt: skip
    assert stats["records_in"] == stats["records_out"] + sum(stats["dropped"].values())
