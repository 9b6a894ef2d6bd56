"""normalize on the real sample formats, on every file type, and on a corpus of broken input.

Expected values are read from the raw records themselves (field by field), never recomputed by
calling the reader under test.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ftflow import paths
from ftflow.data.messages import RecordError, validate
from ftflow.data.normalize import NormalizeError
from ftflow.data.readers import reader_kind
from ftflow.report import normalize_table

from helpers import REPO
from helpers.normalized import FORMATS, fixture, place, raw_records, roles, rows, stage

BAD = REPO / "tests" / "bad_inputs"


# --- every fixture format with its built-in reader -------------------------------------------


def test_alpaca_fixture(tmp_path):
    raw, out, stats = fixture(tmp_path, "alpaca_en_demo.json", "alpaca")
    assert stats["records_in"] == len(raw) == len(out) == 999
    for rec, row in zip(raw, out):
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert user["content"].startswith(rec["instruction"]) and user["content"].endswith(rec["input"])
        assert assistant["content"] == rec["output"]


SHAREGPT_ROLE = {"human": "user", "gpt": "assistant", "function_call": "assistant", "observation": "tool"}


def test_sharegpt_toolcall_fixture(tmp_path):
    raw, out, _ = fixture(tmp_path, "glaive_toolcall_en_demo.json", "sharegpt")
    assert len(out) == len(raw) == 300
    calls = 0
    for rec, row in zip(raw, out):
        assert json.loads(row["tools"]) == json.loads(rec["tools"])
        assert roles(row["messages"]) == [SHAREGPT_ROLE[t["from"]] for t in rec["conversations"]]
        for turn, msg in zip(rec["conversations"], row["messages"]):
            if turn["from"] == "function_call":
                call = json.loads(turn["value"])
                assert msg["content"] == "" and msg["tool_calls"][0]["name"] == call["name"]
                assert json.loads(msg["tool_calls"][0]["arguments"]) == call["arguments"]
                calls += 1
            else:
                assert msg["content"] == turn["value"] and msg["tool_calls"] is None
    assert calls == 211  # every function_call turn of the sample


def test_sharegpt_preference_fixture(tmp_path):
    raw, out, _ = fixture(tmp_path, "dpo_en_demo.json", "sharegpt_preference", kind="preference")
    assert len(out) == len(raw) == 300
    for rec, row in zip(raw, out):
        assert [m["content"] for m in row["prompt"]] == [t["value"] for t in rec["conversations"]]
        assert roles(row["prompt"]) == [{"human": "user", "system": "system", "gpt": "assistant"}[t["from"]]
                                        for t in rec["conversations"]]  # fmt: skip
        assert [(m["role"], m["content"]) for m in row["chosen"]] == [("assistant", rec["chosen"]["value"])]
        assert [(m["role"], m["content"]) for m in row["rejected"]] == [("assistant", rec["rejected"]["value"])]


def test_unpaired_preference_fixture(tmp_path):
    raw, out, _ = fixture(tmp_path, "kto_en_demo.json", "unpaired_preference", kind="unpaired")
    assert len(out) == len(raw) == 300
    assert sum(r["label"] for r in out) == sum(r["label"] for r in raw) > 0
    for rec, row in zip(raw, out):
        whole = row["prompt"] + row["completion"]
        assert [(m["role"], m["content"]) for m in whole] == [(m["role"], m["content"]) for m in rec["messages"]]
        assert row["label"] is rec["label"] and len(row["completion"]) == 1


def test_raw_text_fixture(tmp_path):
    raw, out, _ = fixture(tmp_path, "c4_demo.jsonl", "text", kind="text")
    assert [r["text"] for r in out] == [r["text"] for r in raw] and len(out) == 300
    assert out[2]["id"] == "f/c4_demo.jsonl:3"  # the locator is the line number


# --- formats as their publishers write them (examples/formats/README.md names each source) ---


def pairs(msgs: list[dict]) -> list[tuple]:
    return [(m["role"], m["content"]) for m in msgs]


def test_fastchat_sharegpt_fixture(tmp_path):
    """FastChat's Vicuna-style ShareGPT file: an id and human / gpt turns."""
    raw, out, stats = fixture(tmp_path, "fastchat_dummy_conversation.json", "sharegpt")
    assert stats["records_in"] == len(out) == len(raw) == 24
    for rec, row in zip(raw, out):
        assert pairs(row["messages"]) == [(SHAREGPT_ROLE[t["from"]], t["value"]) for t in rec["conversations"]]


def raw_calls(m: dict) -> list[tuple]:
    """A published OpenAI message's calls as (id, name, arguments): tool_calls, or the older
    function_call."""
    calls = m.get("tool_calls") or ([{"function": m["function_call"]}] if "function_call" in m else [])
    return [(c.get("id"), c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


@pytest.mark.parametrize("file", ["azure_openai_multi_turn_weights.jsonl", "azure_openai_tool_calling.jsonl"])
def test_openai_chat_fine_tuning_fixtures(tmp_path, file):
    """OpenAI's chat fine-tuning lines as Azure's docs print them: weight 0/1 on assistant turns,
    tool calls with ids and results naming them, and the older function_call / functions form."""
    raw, out, _ = fixture(tmp_path, file, "messages")
    assert len(out) == len(raw) > 0
    for rec, row in zip(raw, out):
        for m, n in zip(rec["messages"], row["messages"], strict=True):
            assert (n["role"], n["content"]) == (
                "tool" if m["role"] == "function" else m["role"],
                m.get("content") or "",
            )
            assert n["train"] == (bool(m["weight"]) if "weight" in m else None)
            assert (n["tool_call_id"], n["name"]) == (m.get("tool_call_id"), m.get("name"))
            assert [(c["id"], c["name"], json.loads(c["arguments"])) for c in n["tool_calls"] or []] == raw_calls(m)
        tools = rec.get("tools") or [{"type": "function", "function": f} for f in rec.get("functions", [])] or None
        assert (json.loads(row["tools"]) if row["tools"] else None) == tools
    trained = [n["train"] for row in out for n in row["messages"] if n["train"] is not None]
    assert trained == ([False, True] * 3 if "weights" in file else [])


def test_openai_cookbook_function_calling_fixture(tmp_path):
    """The cookbook's drone file: 16 tools per record and a call per answer; from its third line
    on, the arguments are encoded twice (a JSON string holding JSON), which is refused by name."""
    file = "openai_cookbook_drone_training.jsonl"
    with pytest.raises(NormalizeError, match=rf"record {file}:3 \(reader 'messages'\): bad_tool_call: messages\[2\] tool call 0: "
                                             r"arguments of 'land_drone' are a JSON string holding '\{\"location\": "
                                             r"\"current\"\}', not a JSON object \(encoded twice\?\)"):  # fmt: skip
        fixture(tmp_path / "raise", file, "messages")
    raw, out, stats = fixture(tmp_path / "skip", file, "messages", on_error="skip")
    assert (stats["records_in"], stats["records_out"], stats["dropped"]) == (4, 2, {"bad_tool_call": 2})
    for rec, row in zip(raw, out):
        for m, n in zip(rec["messages"], row["messages"], strict=True):
            assert (n["role"], n["content"]) == (m["role"], m.get("content") or "")
            assert [(c["id"], c["name"], json.loads(c["arguments"])) for c in n["tool_calls"] or []] == raw_calls(m)
        assert json.loads(row["tools"]) == rec["tools"] and len(rec["tools"]) == 16


def hh_transcript(msgs: list[dict]) -> str:
    return "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in msgs)


def test_glaive_function_calling_v2_fixture(tmp_path):
    """glaive-function-calling-v2 as published: the system prose and the schemas after it, the
    transcript's turns in order, each <functioncall> a tool call with its arguments (JSON text in
    single quotes) parsed, each FUNCTION RESPONSE a tool result."""
    raw, out, stats = fixture(tmp_path, "glaive_function_calling_v2.json", "glaive")
    assert stats["records_in"] == len(raw) == len(out) == 5 and stats["dropped"] == {}
    roles_of = {"USER": "user", "ASSISTANT": "assistant", "FUNCTION RESPONSE": "tool"}
    calls_seen = 0
    for rec, row in zip(raw, out):
        system, chat = rec["system"], rec["chat"]
        msgs = row["messages"]
        assert (
            msgs[0]["role"] == "system" and msgs[0]["content"] == system.removeprefix("SYSTEM:").split("{")[0].strip()
        )
        labels = re.findall(r"^(USER|ASSISTANT|FUNCTION RESPONSE): ", chat, re.M)
        assert roles(msgs[1:]) == [roles_of[label] for label in labels]
        schemas = [json.loads(t) for t in re.findall(r"^\{\n.*?^\}", system, re.M | re.S)]
        assert [t["function"] for t in json.loads(row["tools"])] == schemas and schemas
        calls = re.findall(r"<functioncall> (.*?) <\|endoftext\|>", chat, re.S)
        made = [c for m in msgs if m["tool_calls"] for c in m["tool_calls"]]
        assert len(made) == len(calls)
        for call, c in zip(calls, made):
            assert c["name"] == re.match(r'\{"name": "([^"]+)"', call)[1]
            assert json.loads(c["arguments"]) == json.loads(call.split("'")[1])
        results = re.findall(r"^FUNCTION RESPONSE: (.*?)\n\n\n", chat, re.M | re.S)
        assert [m["content"] for m in msgs if m["role"] == "tool"] == [r.strip() for r in results]
        for m in msgs:
            if m["role"] in ("user", "assistant") and m["content"]:
                assert m["content"] in chat and "<|endoftext|>" not in m["content"]
        calls_seen += len(calls)
    assert calls_seen == 5


def test_oasst_message_trees_become_their_threads(tmp_path):
    """oasst1 rows as published (three whole trees): `oasst` takes each tree's top-ranked thread
    (from the prompt, always the reply of rank 0), `oasst_threads` every thread to a leaf; the
    same threads when the rows of a tree are spread over the file; a deleted reply is left out
    with its subtree, and counted."""
    raw = raw_records("oasst1_trees.jsonl")
    kids = {}
    for r in raw:
        kids.setdefault(r["parent_id"], []).append(r)
    prompts = kids[None]

    def best(row):
        path = [row]
        while kids.get(path[-1]["message_id"]):
            path.append(min(kids[path[-1]["message_id"]], key=lambda r: r["rank"]))
        return path

    def texts(path):
        return [("user" if r["role"] == "prompter" else "assistant", r["text"]) for r in path]

    place(tmp_path, "t", FORMATS / "oasst1_trees.jsonl")
    stats = stage(tmp_path, [{"name": "t", "reader": "oasst"}])["splits"]["train"]
    assert [[(m["role"], m["content"]) for m in row["messages"]] for row in rows(tmp_path)] == [
        texts(best(p)) for p in prompts
    ]
    assert stats["sources"]["t"]["trees"] == {"tree_rows": 21} and stats["records_in"] == len(prompts) == 3
    assert len(best(prompts[0])) == 4  # prompt, best reply, its best follow-up, the best answer to it

    leaves = [r for r in raw if r["message_id"] not in kids]
    stats = stage(tmp_path, [{"name": "t", "reader": "oasst_threads"}])["splits"]["train"]
    out = rows(tmp_path)
    assert stats["records_in"] == len(out) == len(leaves) and len(leaves) > 10
    assert {row["messages"][-1]["content"] for row in out} == {r["text"] for r in leaves}
    assert all(row["messages"][0]["content"] in {p["text"] for p in prompts} for row in out)

    # the rows of a tree spread over the file, and a deleted reply (the best one of the first tree)
    spread = list(reversed(raw))
    deleted = best(prompts[0])[1]
    spread = [{**r, "deleted": True} if r["message_id"] == deleted["message_id"] else r for r in spread]
    (tmp_path / paths.RAW / "t" / "oasst1_trees.jsonl").write_text("".join(json.dumps(r) + "\n" for r in spread))
    stats = stage(tmp_path, [{"name": "t", "reader": "oasst"}])["splits"]["train"]
    below = sum(1 for r in raw if r["parent_id"] == deleted["message_id"])
    assert stats["sources"]["t"]["trees"]["tree_rows_deleted"] > below >= 1
    first = rows(tmp_path)[[p["message_id"] for p in reversed(prompts)].index(prompts[0]["message_id"])]
    assert first["messages"][1]["content"] != deleted["text"]
    assert first["messages"][1]["content"] == min((r for r in kids[prompts[0]["message_id"]] if r is not deleted),
                                                 key=lambda r: r["rank"])["text"]  # fmt: skip


def test_xlam_records_in_their_published_layout(tmp_path):
    """xLAM function-calling-60k's layout (the dataset is gated; these records are typed in it):
    the query is the user turn, the answers one assistant turn of calls, the tools the schemas as
    given, each in the {"type": "function"} wrapper."""
    second = {"id": 1, "query": "What is 5 factorial, and the weather in Paris?",
              "answers": json.dumps([{"name": "factorial", "arguments": {"n": 5}},
                                     {"name": "weather", "arguments": {"city": "Paris"}}]),
              "tools": json.dumps([{"name": "factorial", "description": "n!", "parameters": {"n": {"type": "int"}}},
                                   {"name": "weather", "description": "Now.", "parameters": {"city": {"type": "str"}}}])}  # fmt: skip
    (tmp_path / paths.RAW / "x").mkdir(parents=True)
    (tmp_path / paths.RAW / "x" / "xlam.json").write_text(json.dumps([XLAM, second]))
    stats = stage(tmp_path, [{"name": "x", "reader": "xlam"}])["splits"]["train"]
    assert stats["sources"]["x"]["unread_columns"] == {"id": 2}  # an id of 0 is content too
    for rec, row in zip([XLAM, second], rows(tmp_path)):
        user, assistant = row["messages"]
        assert (user["role"], user["content"]) == ("user", rec["query"])
        assert assistant["role"] == "assistant" and not assistant["content"]
        answers = json.loads(rec["answers"])
        assert [(c["name"], json.loads(c["arguments"])) for c in assistant["tool_calls"]] == [
            (a["name"], a["arguments"]) for a in answers
        ]
        assert json.loads(row["tools"]) == [{"type": "function", "function": t} for t in json.loads(rec["tools"])]


def test_anthropic_hh_fixture(tmp_path):
    """hh-rlhf as published (gzipped transcript strings): the prompt and each completion, joined
    back, are the raw string byte for byte; the one transcript whose "Human:" lost its blank line
    (so two assistant turns follow each other) is refused by name."""
    file = "hh_rlhf_harmless_base_test.jsonl.gz"
    with pytest.raises(NormalizeError, match=rf"record {re.escape(file)}:17 \(reader 'messages_preference'\): bad_order: "
                                             r"chosen\[1\]"):  # fmt: skip
        fixture(tmp_path / "raise", file, "messages_preference", kind="preference")
    raw, out, stats = fixture(tmp_path / "skip", file, "messages_preference", kind="preference", on_error="skip")
    assert (stats["records_in"], stats["records_out"], stats["dropped"]) == (17, 16, {"bad_order": 1})
    for rec, row in zip(raw, out):
        assert hh_transcript(row["prompt"] + row["chosen"]) == rec["chosen"]
        assert hh_transcript(row["prompt"] + row["rejected"]) == rec["rejected"]
        assert row["prompt"][-1]["role"] == "user" and len(row["chosen"]) == len(row["rejected"]) == 1


def v1_parts(m: dict, kind: str) -> str:
    return "".join(p["value"] for p in m["content"] if p["type"] == kind)


def test_llamafactory_v1_fixtures(tmp_path):
    """LLaMA-Factory v1's documented samples: typed parts, loss_weight, tool_call parts, tools as
    JSON text; DPO as chosen_messages / rejected_messages."""
    raw, out, _ = fixture(tmp_path / "sft", "llamafactory_v1_sft.jsonl", "messages")
    for rec, row in zip(raw, out, strict=True):
        for m, n in zip(rec["messages"], row["messages"], strict=True):
            assert (n["role"], n["content"]) == (m["role"], v1_parts(m, "text"))
            assert n["reasoning"] == (v1_parts(m, "reasoning") or None)
            assert n["train"] == (bool(m["loss_weight"]) if "loss_weight" in m else None)
            calls = [json.loads(p["value"]) for p in m["content"] if p["type"] == "tool_call"]
            assert [(c["name"], json.loads(c["arguments"])) for c in n["tool_calls"] or []] == [
                (c["name"], c["arguments"]) for c in calls
            ]
        assert (json.loads(row["tools"]) if row["tools"] else None) == (
            json.loads(rec["tools"]) if "tools" in rec else None
        )
    assert sum(n["tool_calls"] is not None for row in out for n in row["messages"]) == 1
    raw, out, _ = fixture(tmp_path / "dpo", "llamafactory_v1_dpo.jsonl", "messages_preference", kind="preference")
    for rec, row in zip(raw, out, strict=True):
        for side in ("chosen", "rejected"):
            assert pairs(row["prompt"] + row[side]) == [
                (m["role"], v1_parts(m, "text")) for m in rec[f"{side}_messages"]
            ]
            assert [n["train"] for n in row[side]] == [True]


# trl-internal-testing/zen, built by TRL's scripts/generate_zen_dataset.py: every dataset type
# TRL's trainers take, in its standard (strings) and conversational (messages) forms
TRL_FORMS = {  # config -> reader (the reader says the kind)
    "standard_language_modeling": "text",
    "standard_prompt_only": "prompt_answer",
    "standard_prompt_completion": "prompt_completion",
    "standard_preference": "prompt_preference",
    "standard_implicit_prompt_preference": "messages_preference",
    "standard_unpaired_preference": "unpaired_preference",
    "conversational_language_modeling": "messages",
    "conversational_prompt_only": "prompt_answer",
    "conversational_prompt_completion": "prompt_completion",
    "conversational_preference": "messages_preference",
    "conversational_implicit_prompt_preference": "messages_preference",
    "conversational_unpaired_preference": "unpaired_preference",
}


def as_pairs(value, role: str) -> list[tuple]:
    """A TRL field as (role, content) pairs: a string is one message of `role`."""
    return [(role, value)] if isinstance(value, str) else pairs(value)


@pytest.mark.parametrize("config", TRL_FORMS)
def test_trl_dataset_forms(tmp_path, config):
    reader = TRL_FORMS[config]
    kind = reader_kind(reader)
    raw, out, _ = fixture(tmp_path, f"trl_zen/{config}.jsonl", reader, kind=kind)
    assert len(out) == len(raw) == 17
    for rec, row in zip(raw, out):
        if kind == "text":
            assert row["text"] == rec["text"]
        elif "messages" in rec:
            assert pairs(row["messages"]) == pairs(rec["messages"])
        elif kind == "conversation":
            assert pairs(row["messages"]) == as_pairs(rec["prompt"], "user") + as_pairs(rec["completion"], "assistant")
        elif kind == "prompt":
            assert pairs(row["prompt"]) == as_pairs(rec["prompt"], "user") and row["answer"] is None
        elif kind == "unpaired":
            assert pairs(row["prompt"]) == as_pairs(rec["prompt"], "user") and row["label"] is rec["label"]
            assert pairs(row["completion"]) == as_pairs(rec["completion"], "assistant")
        elif "prompt" in rec:
            assert pairs(row["prompt"]) == as_pairs(rec["prompt"], "user")
            for side in ("chosen", "rejected"):
                assert pairs(row[side]) == as_pairs(rec[side], "assistant")
        else:  # implicit prompt: the shared start of chosen and rejected
            for side in ("chosen", "rejected"):
                if isinstance(rec[side], str):
                    (prompt,), (completion,) = row["prompt"], row[side]
                    assert (prompt["role"], completion["role"]) == ("user", "assistant")
                    assert prompt["content"] + completion["content"] == rec[side] and completion["content"]
                else:
                    assert pairs(row["prompt"] + row[side]) == pairs(rec[side])


def test_trl_stepwise_supervision_is_refused_with_its_reason(tmp_path):
    with pytest.raises(NormalizeError, match="missing_field: 'completions' and 'labels' are stepwise supervision"):
        fixture(tmp_path, "trl_zen/standard_stepwise_supervision.jsonl", "prompt_completion")


@pytest.mark.parametrize("config,reader,kind", [("language_modeling", "messages", "conversation"),
                                                ("prompt_completion", "prompt_completion", "conversation"),
                                                ("preference", "messages_preference", "preference")])  # fmt: skip
def test_trl_harmony_thinking_becomes_reasoning(tmp_path, config, reader, kind):
    """TRL's harmony set (gpt-oss style): an assistant message's "thinking" is its reasoning."""
    raw, out, _ = fixture(tmp_path, f"trl_harmony/{config}.jsonl", reader, kind=kind)
    assert len(out) == len(raw) > 0
    for rec, row in zip(raw, out):
        sides = [("messages",)] if "messages" in rec else [("prompt", "completion")] if kind == "conversation" else [
            ("prompt", "chosen"), ("prompt", "rejected")]  # fmt: skip
        for fields in sides:
            published = [m for f in fields for m in rec[f]]
            normalized = row["messages"] if kind == "conversation" else [m for f in fields for m in row[f]]
            assert [(n["role"], n["content"], n["reasoning"]) for n in normalized] == [
                (m["role"], m["content"], m.get("thinking")) for m in published]  # fmt: skip
            assert any(m.get("thinking") for m in published)


# --- the other record shapes -----------------------------------------------------------------

SHAPES = [
    ("messages", "conversation", {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Oslo?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "content": "-3C"},
        {"role": "assistant", "content": "Cold: -3C."}]},
     {"messages": [("system", "Be brief."), ("user", "Weather in Oslo?"), ("assistant", ""), ("tool", "-3C"),
                   ("assistant", "Cold: -3C.")]}),
    ("prompt_completion", "conversation", {"prompt": "2+2?", "completion": "4"},
     {"messages": [("user", "2+2?"), ("assistant", "4")]}),
    ("messages_preference", "preference", {
        "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]},
     {"prompt": [("user", "Hi")], "chosen": [("assistant", "Hello!")], "rejected": [("assistant", "Go away.")]}),
    ("prompt_preference", "preference", {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
     {"prompt": [("user", "Capital of France?")], "chosen": [("assistant", "Paris.")],
      "rejected": [("assistant", "Lyon.")]}),
    ("unpaired_preference", "unpaired", {"prompt": "1+1?", "completion": "3", "label": False},
     {"prompt": [("user", "1+1?")], "completion": [("assistant", "3")]}),
    ("prompt_answer", "prompt", {"prompt": "What is 6*7?", "solution": "42"},
     {"prompt": [("user", "What is 6*7?")]}),
]  # fmt: skip


@pytest.mark.parametrize("reader,kind,record,expected", SHAPES, ids=[s[0] for s in SHAPES])
def test_record_shapes(tmp_path, reader, kind, record, expected):
    (tmp_path / paths.RAW / "s").mkdir(parents=True)
    (tmp_path / paths.RAW / "s" / "data.jsonl").write_text(json.dumps(record) + "\n")
    stage(tmp_path, [{"name": "s", "reader": reader}], kind=kind)
    (row,) = rows(tmp_path)
    for field, msgs in expected.items():
        assert [(m["role"], m["content"]) for m in row[field]] == msgs
    if reader == "messages":
        call = row["messages"][2]["tool_calls"][0]
        assert (call["name"], json.loads(call["arguments"])) == ("weather", {"city": "Oslo"})
    if kind == "prompt":
        assert row["answer"] == "42"
    if kind == "unpaired":
        assert row["label"] is False


# --- formats as their publishers write them --------------------------------------------------

# OpenAI's chat fine-tuning format (platform.openai.com/docs/guides/fine-tuning): tool calls with
# ids, tool results naming them, `weight` 0 on an assistant turn that is context, not a target
OPENAI_FINE_TUNING = {
    "messages": [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "call_a1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_a1", "content": "-3C"},
        {"role": "assistant", "content": "It is -3C.", "weight": 0},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You are welcome.", "weight": 1},
    ],
    "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
    "parallel_tool_calls": False,
}
# LLaMA-Factory v1's messages (src/llamafactory/v1/utils/types.py): typed parts with `value`,
# reasoning and tool calls as parts, loss_weight per message, tools as JSON text
LLAMAFACTORY_V1 = {
    "messages": [
        {"role": "user", "content": [{"type": "text", "value": "Weather in Oslo?"}], "loss_weight": 0.0},
        {
            "role": "assistant",
            "content": [
                {"type": "reasoning", "value": "Need the tool."},
                {"type": "tool_call", "value": '{"name": "weather", "arguments": {"city": "Oslo"}}'},
            ],
            "loss_weight": 1.0,
        },
        {"role": "tool", "content": [{"type": "text", "value": "-3C"}], "loss_weight": 0.0},
        {
            "role": "assistant",
            "content": [{"type": "text", "value": "It is "}, {"type": "text", "value": "-3C."}],
            "loss_weight": 1.0,
        },
    ],
    "tools": '[{"name": "weather", "parameters": {"type": "object"}}]',
}
# Anthropic HH-RLHF (github.com/anthropics/hh-rlhf): chosen and rejected as transcript strings
HH = {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: 6.",
      "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: Why do you ask?"}  # fmt: skip


def normalized(tmp_path, reader: str, kind: str, record: dict) -> dict:
    (tmp_path / paths.RAW / "p").mkdir(parents=True, exist_ok=True)
    (tmp_path / paths.RAW / "p" / "data.jsonl").write_text(json.dumps(record) + "\n")
    stage(tmp_path, [{"name": "p", "reader": reader}], kind=kind)
    (row,) = rows(tmp_path)
    return row


def test_openai_fine_tuning_records_keep_ids_and_weights(tmp_path):
    row = normalized(tmp_path, "messages", "conversation", OPENAI_FINE_TUNING)
    msgs = row["messages"]
    assert [(m["role"], m["content"], m["train"]) for m in msgs] == [
        ("system", "You are a weather bot.", None), ("user", "Weather in Oslo?", None), ("assistant", "", None),
        ("tool", "-3C", None), ("assistant", "It is -3C.", False), ("user", "Thanks!", None),
        ("assistant", "You are welcome.", True)]  # fmt: skip
    (call,) = msgs[2]["tool_calls"]
    assert (call["id"], call["name"], json.loads(call["arguments"])) == ("call_a1", "weather", {"city": "Oslo"})
    assert msgs[3]["tool_call_id"] == "call_a1"
    assert json.loads(row["tools"]) == OPENAI_FINE_TUNING["tools"]


def test_llamafactory_v1_parts_become_content_reasoning_and_tool_calls(tmp_path):
    row = normalized(tmp_path, "messages", "conversation", LLAMAFACTORY_V1)
    msgs = row["messages"]
    assert [(m["role"], m["content"], m["train"]) for m in msgs] == [
        ("user", "Weather in Oslo?", False), ("assistant", "", True), ("tool", "-3C", False),
        ("assistant", "It is -3C.", True)]  # fmt: skip
    assert msgs[1]["reasoning"] == "Need the tool."
    (call,) = msgs[1]["tool_calls"]
    assert (call["name"], json.loads(call["arguments"]), call["id"]) == ("weather", {"city": "Oslo"}, None)
    assert json.loads(row["tools"]) == json.loads(LLAMAFACTORY_V1["tools"])


def test_anthropic_hh_transcripts_become_prompt_and_completions(tmp_path):
    row = normalized(tmp_path, "messages_preference", "preference", HH)
    pairs = {f: [(m["role"], m["content"]) for m in row[f]] for f in ("prompt", "chosen", "rejected")}
    assert pairs == {"prompt": [("user", "What is 2+2?"), ("assistant", "4."), ("user", "And 3+3?")],
                     "chosen": [("assistant", "6.")], "rejected": [("assistant", "Why do you ask?")]}  # fmt: skip


def test_a_prompt_string_beside_whole_conversations_is_their_shared_prompt(tmp_path):
    """UltraFeedback's layout (HuggingFaceH4/ultrafeedback_binarized): "prompt" is a string and
    "chosen" / "rejected" are whole conversations that include it."""
    conv = lambda answer: [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": answer}]  # noqa: E731
    record = {"prompt": "2+2?", "prompt_id": "a1", "chosen": conv("4"), "rejected": conv("5"), "score_chosen": 9.0}
    row = normalized(tmp_path / "ok", "messages_preference", "preference", record)
    assert {f: pairs(row[f]) for f in ("prompt", "chosen", "rejected")} == {
        "prompt": [("user", "2+2?")], "chosen": [("assistant", "4")], "rejected": [("assistant", "5")]}  # fmt: skip
    with pytest.raises(NormalizeError, match=r"bad_pair: 'prompt' is not the last user message that 'chosen' and "
                                             r"'rejected' share \(prompt '3\+3\?', shared user message '2\+2\?'\)"):  # fmt: skip
        normalized(tmp_path / "bad", "messages_preference", "preference", {**record, "prompt": "3+3?"})


def test_a_mapped_column_the_record_lacks_is_named(tmp_path):
    (tmp_path / paths.RAW / "c").mkdir(parents=True)
    (tmp_path / paths.RAW / "c" / "data.jsonl").write_text(json.dumps({"q": "Hi", "a": "Yo", "sys": "Be nice."}) + "\n"
                                                          + json.dumps({"q": "Hi", "a": "Yo"}) + "\n")  # fmt: skip
    source = {"name": "c", "reader": "alpaca", "columns": {"instruction": "q", "output": "a", "system": "sys"}}
    with pytest.raises(NormalizeError, match=r"record data.jsonl:2 \(reader 'alpaca'\): missing_column: no column 'sys' "
                                             r"\(columns maps it to the reader's 'system'"):  # fmt: skip
        stage(tmp_path, [source])
    stats = stage(tmp_path, [source], on_error="skip")["splits"]["train"]
    assert (stats["records_out"], stats["dropped"]) == (1, {"missing_column": 1})


# xLAM function-calling-60k's layout: query, and tools / answers as JSON text
XLAM = {"id": 0, "query": "Where can I find live giveaways for beta access?",
        "answers": json.dumps([{"name": "live_giveaways_by_type", "arguments": {"type": "beta"}}]),
        "tools": json.dumps([{"name": "live_giveaways_by_type", "description": "Retrieve live giveaways by type.",
                              "parameters": {"type": {"description": "beta, game or loot", "type": "str"}}}])}  # fmt: skip


def test_tools_a_reader_has_no_place_for_are_refused_not_trained_as_text(tmp_path):
    """Read with prompt_completion (columns: prompt <- query, completion <- answers), xLAM's calls
    would be trained as plain assistant text with the tools they call dropped: refused, named."""
    (tmp_path / paths.RAW / "x").mkdir(parents=True)
    plain = {"query": "What is 2 + 2?", "answers": "4", "tools": ""}  # an empty tools column loses nothing
    (tmp_path / paths.RAW / "x" / "data.jsonl").write_text(json.dumps(plain) + "\n" + json.dumps(XLAM) + "\n")
    source = {"name": "x", "reader": "prompt_completion", "columns": {"prompt": "query", "completion": "answers"}}
    with pytest.raises(NormalizeError, match=r"record data.jsonl:2 \(reader 'prompt_completion'\): tools_not_read: the "
                                             r"record has 'tools' \(tool schemas\) and reader 'prompt_completion' has no "
                                             r"place for them.*use a reader that keeps them \(messages, "):  # fmt: skip
        stage(tmp_path, [source])
    stats = stage(tmp_path, [source], on_error="skip")["splits"]["train"]
    assert (stats["records_out"], stats["dropped"]) == (1, {"tools_not_read": 1})


def test_columns_no_reader_reads_are_counted_and_said(tmp_path, caplog):
    """Dolly (instruction, context, response, category) with only `output` mapped: its context and
    category are not trained on; stats.json counts the records with content in each, and the
    columns with content in most records are warned about. A mapped column is read; `id` too is
    counted (nothing is exempt)."""
    dolly = [{"instruction": "When was Tomoaki Komorida born?", "context": "Komorida was born on 10 July 1981.",
              "response": "10 July 1981", "category": "closed_qa", "id": 1},
             {"instruction": "Name a primary color.", "context": "", "response": "Red", "category": "open_qa", "id": 2},
             {"instruction": "Which is a fish?", "context": None, "response": "Tope", "category": "classification",
              "id": 3}]  # fmt: skip
    (tmp_path / paths.RAW / "d").mkdir(parents=True)
    (tmp_path / paths.RAW / "d" / "dolly.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dolly))
    source = {"name": "d", "reader": "alpaca", "columns": {"output": "response"}}
    with caplog.at_level("WARNING"):
        stats = stage(tmp_path, [source])["splits"]["train"]
    assert stats["sources"]["d"]["unread_columns"] == {"category": 3, "context": 1, "id": 3}
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert [w.split(" has content")[0] for w in warned] == ["Source <d>: column 'category'", "Source <d>: column 'id'"]
    assert "in 3 of 3 records and reader 'alpaca' does not read it" in warned[0]
    note = normalize_table(json.loads((tmp_path / paths.NORMALIZE / "stats.json").read_text())).note
    assert "Not read by alpaca in source d (not trained on): category (3 of 3), context (1 of 3), id (3 of 3)." in note
    # mapped, the context is read: no longer counted
    source["columns"]["input"] = "context"
    stats = stage(tmp_path, [source])["splits"]["train"]
    assert stats["sources"]["d"]["unread_columns"] == {"category": 3, "id": 3}
    assert [r["messages"][0]["content"] for r in rows(tmp_path)][0].endswith("Komorida was born on 10 July 1981.")


@pytest.mark.parametrize("media", [{"images": ["cat.png"]}, {"videos": ["a.mp4"]}, {"audios": ["a.wav"]}])
def test_records_with_media_are_refused_not_trained_as_text(tmp_path, media):
    # LLaMA-Factory's multimodal sharegpt: the text refers to the image by a placeholder
    record = {"conversations": [{"from": "human", "value": "<image>What is this?"}, {"from": "gpt", "value": "A cat."}],
              **media}  # fmt: skip
    (tmp_path / paths.RAW / "m").mkdir(parents=True)
    (tmp_path / paths.RAW / "m" / "data.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(NormalizeError, match=f"unsupported_content: the record has '{next(iter(media))}'"):
        stage(tmp_path, [{"name": "m", "reader": "sharegpt"}])


@pytest.mark.parametrize(
    "record,reason,detail",
    [
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo", "weight": 0.5}]},
         "bad_field", "messages[1] weight is 0.5: a turn is trained (1) or not (0)"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "value": "cat.png"}]},
                       {"role": "assistant", "content": "A cat."}]},
         "unsupported_content", "messages[0] content part 0 is of type 'image_url'"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                       {"role": "assistant", "content": "A cat."}]},
         "unsupported_content", "content part of type 'image_url'"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo", "tool_call_id": "c1"}]},
         "bad_message", "tool_call_id belongs on a tool result"),
    ],
)  # fmt: skip
def test_what_cannot_be_trained_as_published_is_refused_with_its_reason(tmp_path, record, reason, detail):
    (tmp_path / paths.RAW / "p").mkdir(parents=True)
    (tmp_path / paths.RAW / "p" / "data.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(NormalizeError) as err:
        stage(tmp_path, [{"name": "p", "reader": "messages"}])
    assert f"(reader 'messages'): {reason}: " in str(err.value) and detail in str(err.value), str(err.value)


# --- file types, sources and per-source options ----------------------------------------------

RECORDS = [{"instruction": f"Say {w}.", "output": w} for w in ("red", "green", "blue", "red")]


def write_all_types(dest: Path) -> None:
    """The same four records as jsonl.gz, json, csv, parquet (one file each)."""
    dest.mkdir(parents=True)
    with gzip.open(dest / "a.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in RECORDS)
    (dest / "b.json").write_text(json.dumps(RECORDS))
    (dest / "c.csv").write_text(
        "instruction,output\n" + "".join(f'"{r["instruction"]}",{r["output"]}\n' for r in RECORDS)
    )
    pq.write_table(pa.Table.from_pylist(RECORDS), dest / "d.parquet")


def test_every_file_type_reads_the_same_records(tmp_path):
    write_all_types(tmp_path / paths.RAW / "all")
    stats = stage(tmp_path, [{"name": "all", "reader": "alpaca"}])
    out = rows(tmp_path)
    assert stats["splits"]["train"]["records_out"] == 16
    assert [r["messages"][1]["content"] for r in out] == [r["output"] for r in RECORDS] * 4
    assert [r["id"] for r in out[::4]] == ["all/a.jsonl.gz:1", "all/b.json[0]", "all/c.csv:2", "all/d.parquet[0]"]


def test_txt_sample_by(tmp_path):
    (tmp_path / paths.RAW / "t").mkdir(parents=True)
    (tmp_path / paths.RAW / "t" / "doc.txt").write_text("one\ntwo\n\nthree\n")
    stage(tmp_path, [{"name": "t", "reader": "text", "sample_by": "paragraph"}], kind="text")
    assert [r["text"] for r in rows(tmp_path)] == ["one\ntwo", "three\n"]
    stage(tmp_path, [{"name": "t", "reader": "text"}], kind="text")
    assert [r["text"] for r in rows(tmp_path)] == ["one", "two", "three"]


def test_saved_dataset_dict_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS[:3]),
                               "test": datasets.Dataset.from_list(RECORDS[3:])})  # fmt: skip
    dd.save_to_disk(str(tmp_path / paths.RAW / "saved"))
    stage(tmp_path, [{"name": "saved", "reader": "alpaca", "from_split": "test"}])
    assert [r["messages"][1]["content"] for r in rows(tmp_path)] == ["red"]
    with pytest.raises(NormalizeError, match="splits \\['test', 'train'\\]; set from_split"):
        stage(tmp_path, [{"name": "saved", "reader": "alpaca", "from_split": "dev"}])


def test_source_options(tmp_path):
    recs = [{"q": f"Q{i}", "a": f"A{i % 50}" * (1 + i % 5)} for i in range(200)] + [{"q": "Q1", "a": "A1A1"}]
    (tmp_path / paths.RAW / "s").mkdir(parents=True)
    (tmp_path / paths.RAW / "s" / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    opts = {"name": "s", "reader": "alpaca", "columns": {"instruction": "q", "output": "a"}, "system": "Be nice."}
    stats = stage(tmp_path, [{**opts, "dedup": True, "min_chars": 14, "max_chars": 20}])["splits"]["train"]
    out = rows(tmp_path)
    # lengths count all content: system (8) + user (2-4) + answer; the last record duplicates the second
    assert stats["records_in"] == 201 and stats["dropped"]["duplicate"] == 1
    assert stats["records_out"] + sum(stats["dropped"].values()) == 201
    assert all(14 <= sum(len(m["content"]) for m in r["messages"]) <= 20 for r in out)
    assert stats["dropped"]["too_short"] > 0 and stats["dropped"]["too_long"] > 0
    assert all(r["messages"][0] == {**r["messages"][0], "role": "system", "content": "Be nice."} for r in out)

    first = lambda: [r["id"] for r in rows(tmp_path)]  # noqa: E731
    stage(tmp_path, [{**opts, "shuffle": True, "seed": 1, "limit": 10}])
    a = first()
    stage(tmp_path, [{**opts, "shuffle": True, "seed": 1, "limit": 10}])
    assert first() == a and len(a) == 10 and a != [f"s/qa.jsonl:{i}" for i in range(1, 11)]

    stats = stage(tmp_path, [{**opts, "weight": 0.25}])["splits"]["train"]
    assert stats["rows"] == 50 and stats["dropped"] == {"mixture_weight": 151}
    stats = stage(tmp_path, [{**opts, "weight": 2.5}])["splits"]["train"]
    assert stats["rows"] == 502 and stats["records_out"] == 201 and stats["sources"]["s"]["repeats"] == 301
    assert len({r["id"] for r in rows(tmp_path)}) == 502


def test_output_is_deterministic(tmp_path):
    place(tmp_path, "alpaca", FORMATS / "alpaca_en_demo.json")
    first = stage(tmp_path, [{"name": "alpaca", "reader": "alpaca"}])
    blob = (tmp_path / paths.NORMALIZE / "train.parquet").read_bytes()
    again = stage(tmp_path, [{"name": "alpaca", "reader": "alpaca"}])
    assert (tmp_path / paths.NORMALIZE / "train.parquet").read_bytes() == blob
    assert first["splits"]["train"]["sha256"] == again["splits"]["train"]["sha256"]


# --- the bad-input corpus --------------------------------------------------------------------

# file, reader, data kind, locator of the bad record, reason, good records in the file. The other
# bad inputs have tests of their own below: an oversized record, an empty file, a damaged .gz, a
# mapped column a record lacks, a user reader that fails.
CORPUS = [
    ("truncated_json.jsonl", "alpaca", "conversation", "truncated_json.jsonl:2", "invalid_json", 2),
    ("wrong_types.jsonl", "alpaca", "conversation", "wrong_types.jsonl:2", "bad_field", 2),
    ("missing_fields.jsonl", "alpaca", "conversation", "missing_fields.jsonl:3", "missing_field", 2),
    ("bad_history.jsonl", "alpaca", "conversation", "bad_history.jsonl:2", "bad_field", 2),
    ("empty_assistant.jsonl", "alpaca", "conversation", "empty_assistant.jsonl:3", "empty_assistant", 2),
    ("invalid_utf8.jsonl", "alpaca", "conversation", "invalid_utf8.jsonl:2", "invalid_utf8", 2),
    ("invalid_utf8.csv", "alpaca", "conversation", "invalid_utf8.csv:3", "invalid_utf8", 2),
    ("invalid_utf8.json", "alpaca", "conversation", "invalid_utf8.json[1]", "invalid_utf8", 2),
    ("invalid_utf8.txt", "text", "text", "invalid_utf8.txt:2", "invalid_utf8", 2),
    ("not_an_object.jsonl", "messages", "conversation", "not_an_object.jsonl:2", "not_an_object", 2),
    ("unknown_role.jsonl", "messages", "conversation", "unknown_role.jsonl:2", "bad_role", 1),
    ("unknown_key.jsonl", "messages", "conversation", "unknown_key.jsonl:2", "bad_message", 2),
    ("bad_content.jsonl", "messages", "conversation", "bad_content.jsonl:2", "bad_content", 2),
    ("bad_order.jsonl", "messages", "conversation", "bad_order.jsonl:2", "bad_order", 2),
    ("no_target.jsonl", "messages", "conversation", "no_target.jsonl:2", "no_target", 2),
    ("bad_tools.jsonl", "messages", "conversation", "bad_tools.jsonl:2", "bad_tools", 2),
    ("fractional_weight.jsonl", "messages", "conversation", "fractional_weight.jsonl:2", "bad_field", 2),
    (
        "tool_call_id_on_assistant.jsonl",
        "messages",
        "conversation",
        "tool_call_id_on_assistant.jsonl:2",
        "bad_message",
        2,
    ),
    ("image_part.jsonl", "messages", "conversation", "image_part.jsonl:2", "unsupported_content", 2),
    ("media_field.jsonl", "sharegpt", "conversation", "media_field.jsonl:2", "unsupported_content", 2),
    ("bad_tool_call.jsonl", "sharegpt", "conversation", "bad_tool_call.jsonl:2", "bad_tool_call", 2),
    ("identical_pair.jsonl", "prompt_preference", "preference", "identical_pair.jsonl:2", "identical_pair", 2),
    ("hh_broken_transcript.jsonl", "messages_preference", "preference", "hh_broken_transcript.jsonl:2", "bad_field", 2),
    (
        "text_pair_without_prompt.jsonl",
        "messages_preference",
        "preference",
        "text_pair_without_prompt.jsonl:2",
        "bad_pair",
        2,
    ),
    ("bad_label.jsonl", "unpaired_preference", "unpaired", "bad_label.jsonl:2", "bad_label", 2),
    ("empty_text.jsonl", "text", "text", "empty_text.jsonl:2", "empty_text", 2),
]
CORPUS_IDS = [c[0] for c in CORPUS]


@pytest.mark.parametrize("file,reader,kind,locator,reason,good", CORPUS, ids=CORPUS_IDS)
def test_bad_record_raises_naming_source_record_and_reason(tmp_path, file, reader, kind, locator, reason, good):
    place(tmp_path, "bad", BAD / file)
    with pytest.raises(NormalizeError) as err:
        stage(tmp_path, [{"name": "bad", "reader": reader}], kind=kind)
    assert f"source 'bad', record {locator} (reader '{reader}'): {reason}: " in str(err.value)
    assert "on_error=skip" in str(err.value)


@pytest.mark.parametrize("file,reader,kind,locator,reason,good", CORPUS, ids=CORPUS_IDS)
def test_bad_record_is_counted_when_skipping(tmp_path, file, reader, kind, locator, reason, good):
    place(tmp_path, "bad", BAD / file)
    stats = stage(tmp_path, [{"name": "bad", "reader": reader}], kind=kind, on_error="skip")["splits"]["train"]
    assert (stats["records_in"], stats["records_out"], stats["dropped"]) == (good + 1, good, {reason: 1})
    assert len(rows(tmp_path)) == good


def test_the_bad_input_table(tmp_path, capsys):
    """The README's table of the corpus: each kind's message under on_error=raise and its counts
    under skip, as normalize gives them."""
    lines = ["| file | reader | on_error=raise says | skip: in / out / dropped |", "|---|---|---|---|"]
    for k, (file, reader, kind, *_) in enumerate(CORPUS):
        root = tmp_path / str(k)
        place(root, "bad", BAD / file)
        with pytest.raises(NormalizeError) as err:
            stage(root, [{"name": "bad", "reader": reader}], kind=kind)
        said = str(err.value).split(f"(reader '{reader}'): ", 1)[1].split(" (set data.on_error", 1)[0]
        st = stage(root, [{"name": "bad", "reader": reader}], kind=kind, on_error="skip")["splits"]["train"]
        dropped = ", ".join(f"{n} {r}" for r, n in st["dropped"].items())
        lines.append(
            f"| `{file}` | {reader} | {said[:110].replace('|', chr(92) + '|')} | {st['records_in']} / {st['records_out']} / {dropped} |"
        )
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert len(lines) == len(CORPUS) + 2 >= 27  # 25 kinds at least


def test_oversized_record(tmp_path):
    big = json.dumps({"instruction": "Summarize.", "output": "x" * 20_000_000})  # a 20 MB single record
    (tmp_path / paths.RAW / "big").mkdir(parents=True)
    (tmp_path / paths.RAW / "big" / "big.jsonl").write_text(json.dumps(RECORDS[0]) + "\n" + big + "\n")
    (tmp_path / paths.RAW / "big" / "big.json").write_text(f"[{big}]")  # parsed whole: caught after the reader
    with pytest.raises(NormalizeError, match=r"record big.json\[0\] \(reader 'alpaca'\): record_too_large"):
        stage(tmp_path, [{"name": "big", "reader": "alpaca"}])
    stats = stage(tmp_path, [{"name": "big", "reader": "alpaca"}], on_error="skip")["splits"]["train"]
    assert stats["dropped"] == {"record_too_large": 2} and stats["records_out"] == 1
    stats = stage(tmp_path, [{"name": "big", "reader": "alpaca"}], max_record_mb=32)["splits"]["train"]
    assert stats["records_out"] == 3  # the guard is a setting


def test_a_source_never_downloaded_says_to_download_it(tmp_path):
    with pytest.raises(NormalizeError, match=r"source 'nothing': .*no data files.*\(it was never downloaded: run "
                                             r"`ftflow download`, or `ftflow run`, which downloads first\)"):  # fmt: skip
        stage(tmp_path, [{"name": "nothing", "reader": "alpaca"}])


def test_empty_file(tmp_path):
    place(tmp_path, "e", BAD / "empty.jsonl", BAD / "missing_fields.jsonl")
    with pytest.raises(NormalizeError, match="source 'e': file empty.jsonl holds no records"):
        stage(tmp_path, [{"name": "e", "reader": "alpaca"}])
    stats = stage(tmp_path, [{"name": "e", "reader": "alpaca"}], on_error="skip")["splits"]["train"]
    assert stats["sources"]["e"]["empty_files"] == 1 and stats["records_in"] == 3


def test_a_split_with_nothing_left_says_what_was_read_and_dropped(tmp_path):
    place(tmp_path, "e", BAD / "empty.jsonl")
    place(tmp_path, "bad", BAD / "truncated_json.jsonl")
    (tmp_path / paths.RAW / "bad" / "truncated_json.jsonl").write_text('{"instruction": "a", "outp\n')
    sources = [{"name": "e", "reader": "alpaca"}, {"name": "bad", "reader": "alpaca"}]
    with pytest.raises(NormalizeError) as err:
        stage(tmp_path, sources, on_error="skip")
    assert str(err.value) == ("split 'train': no record left: source 'e' read 0 record(s) (none dropped, 1 empty file(s)); "
                              "source 'bad' read 1 record(s) (1 invalid_json)")  # fmt: skip


def test_byte_order_marks_are_not_part_of_the_first_record(tmp_path):
    bom, records = b"\xef\xbb\xbf", RECORDS[:2]
    raw = tmp_path / paths.RAW / "bom"
    raw.mkdir(parents=True)
    (raw / "a.jsonl").write_bytes(bom + b"".join(json.dumps(r).encode() + b"\n" for r in records))
    (raw / "b.json").write_bytes(bom + json.dumps(records).encode())
    lines = ["instruction,output", *(f"{r['instruction']},{r['output']}" for r in records)]
    (raw / "c.csv").write_bytes(bom + "\n".join(lines).encode())
    stats = stage(tmp_path, [{"name": "bom", "reader": "alpaca"}])
    assert stats["splits"]["train"]["records_out"] == 6
    assert [r["messages"][0]["content"] for r in rows(tmp_path)] == [r["instruction"] for r in records] * 3
    (tmp_path / paths.RAW / "txt").mkdir()
    (tmp_path / paths.RAW / "txt" / "d.txt").write_bytes(bom + b"first line\nsecond line\n")
    stage(tmp_path, [{"name": "txt", "reader": "text"}], kind="text")
    assert [r["text"] for r in rows(tmp_path)] == ["first line", "second line"]


def test_invalid_utf8_in_text_spoils_only_its_line(tmp_path):
    (tmp_path / paths.RAW / "t").mkdir(parents=True)
    (tmp_path / paths.RAW / "t" / "a.txt").write_bytes(b"good one\nbad \xff one\ngood two\n")
    with pytest.raises(NormalizeError, match=r"record a.txt:2 \(reader 'text'\): invalid_utf8"):
        stage(tmp_path, [{"name": "t", "reader": "text"}], kind="text")
    stats = stage(tmp_path, [{"name": "t", "reader": "text"}], kind="text", on_error="skip")["splits"]["train"]
    assert (stats["records_out"], stats["dropped"]) == (2, {"invalid_utf8": 1})


def test_damaged_gzip_names_source_and_file(tmp_path):
    whole = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in RECORDS * 50))
    (tmp_path / paths.RAW / "z").mkdir(parents=True)
    (tmp_path / paths.RAW / "z" / "a.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    for on_error in ("raise", "skip"):
        with pytest.raises(NormalizeError, match=r"source 'z': a.jsonl.gz: damaged gzip file \(Compressed file ended"):
            stage(tmp_path, [{"name": "z", "reader": "alpaca"}], on_error=on_error)


def test_unreadable_file_names_source_and_file(tmp_path):
    (tmp_path / paths.RAW / "j").mkdir(parents=True)
    (tmp_path / paths.RAW / "j" / "cut.json").write_text('[{"instruction": "a", "output": "b"}, {"instr')
    with pytest.raises(NormalizeError, match=r"source 'j': cut.json: not valid JSON \(.* line 1 column"):
        stage(tmp_path, [{"name": "j", "reader": "alpaca"}], on_error="skip")


def test_validation_reasons():
    def reason(record, kind="conversation"):
        with pytest.raises(RecordError) as err:
            validate(record, kind)
        return err.value.reason

    u, a = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
    assert reason({"messages": [u, u, a]}) == "bad_order"
    assert reason({"messages": [u, {"role": "system", "content": "s"}, a]}) == "bad_order"
    assert reason({"messages": [u, {"role": "tool", "content": "r"}, a]}) == "bad_order"
    assert reason({"messages": [u]}) == "no_target"
    assert reason({"messages": [u, {**a, "content": 5}]}) == "bad_content"
    assert reason({"messages": [u, {**a, "tool_calls": [{"name": "f", "arguments": "{oops"}]}]}) == "bad_tool_call"
    assert reason({"messages": [u, a], "tools": "not json"}) == "bad_tools"
    assert reason({"messages": [u, {**a, "speaker": "bob"}]}) == "bad_message"
    assert reason({"text": "x"}) == "wrong_kind"
    assert reason({"prompt": [u], "completion": [a], "label": "yes"}, "unpaired") == "bad_label"
    assert reason({"prompt": [u], "chosen": [a], "rejected": [a]}, "preference") == "identical_pair"


# --- user readers ----------------------------------------------------------------------------

USER_READERS = """
from ftflow.data.messages import Message

def qa(record):
    return [Message("user", record["q"]), Message("assistant", record["a"].upper())]

def broken(record):
    return [{"role": "user", "content": record["q"]}, {"role": "assistant", "text": record["a"]}]
"""


def test_user_reader_from_a_file_beside_the_config(tmp_path):
    (tmp_path / "conf" / "data").mkdir(parents=True)
    (tmp_path / "conf" / "data" / "my_readers.py").write_text(USER_READERS)
    (tmp_path / paths.RAW / "u").mkdir(parents=True)
    (tmp_path / paths.RAW / "u" / "qa.jsonl").write_text('{"q": "hi", "a": "hello"}\n')
    stage(tmp_path, [{"name": "u", "reader": "my_readers.py:qa"}])
    assert [m["content"] for m in rows(tmp_path)[0]["messages"]] == ["hi", "HELLO"]
    with pytest.raises(NormalizeError) as err:
        stage(tmp_path, [{"name": "u", "reader": "my_readers.py:broken"}])
    assert (
        "record qa.jsonl:1 (reader 'my_readers.py:broken'): bad_message: messages[1] has unknown keys ['text']"
        in str(err.value)
    )
    with pytest.raises(NormalizeError, match="source 'u': reader 'my_readers.py:nope': .* has no function 'nope'"):
        stage(tmp_path, [{"name": "u", "reader": "my_readers.py:nope"}])


# --- parallel workers ------------------------------------------------------------------------


def test_workers_give_the_same_bytes_and_locate_errors(tmp_path):
    """A file big enough for several work units: 1 and 2 worker processes write the same bytes,
    and a bad line deep in the file is reported with its own line number."""
    base = json.loads((FORMATS / "alpaca_en_demo.json").read_text())
    lines = [json.dumps(base[i % len(base)]) for i in range(12_000)]  # ~10 MB: three 4 MB spans
    (tmp_path / paths.RAW / "big").mkdir(parents=True)
    (tmp_path / paths.RAW / "big" / "big.jsonl").write_text("\n".join(lines) + "\n")
    digests = [stage(tmp_path, [{"name": "big", "reader": "alpaca"}], num_proc=n)["splits"]["train"]["sha256"]
               for n in (1, 2)]  # fmt: skip
    assert digests[0] == digests[1] and len(rows(tmp_path)) == 12_000
    lines[9_999] = '{"instruction": "cut'
    (tmp_path / paths.RAW / "big" / "big.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(NormalizeError, match=r"record big.jsonl:10000 \(reader 'alpaca'\): invalid_json"):
        stage(tmp_path, [{"name": "big", "reader": "alpaca"}], num_proc=2)
    assert not (tmp_path / paths.NORMALIZE / "train.parquet.tmp").exists()  # nothing half-written left
