"""The normalized records: the project's message form, one fixed shape per data kind.

Every reader produces one of these plain dicts; every later stage reads only them.

    conversation  {"messages": [msg, ...], "tools": json|None}                   SFT
    preference    {"prompt": [msg], "chosen": [msg], "rejected": [msg], "tools"}  DPO
    unpaired      {"prompt": [msg], "completion": [msg], "label": bool, "tools"}  KTO
    prompt        {"prompt": [msg], "answer": str|None, "tools"}                  GRPO
    text          {"text": str}                                                   pre-training

    msg = {"role", "content", "train", "name", "tool_calls", "reasoning", "tool_call_id"}
          (unset keys may be left out; tool_call_id links a tool result to its call's id)

Validation happens here, once, on dicts (not objects: normalize checks millions of records and
dataclass construction would dominate its cost). A record that fails raises RecordError with a
short stable `reason`, which normalize reports with the source and record locator, or counts.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

ROLES = frozenset(("system", "user", "assistant", "tool"))
KINDS = ("conversation", "preference", "unpaired", "prompt", "text")
MESSAGE_KEYS = ("role", "content", "train", "name", "tool_calls", "reasoning", "tool_call_id")
# which list-of-messages fields each kind has (text has none)
MESSAGE_FIELDS = {
    "conversation": ("messages",),
    "preference": ("prompt", "chosen", "rejected"),
    "unpaired": ("prompt", "completion"),
    "prompt": ("prompt",),
    "text": (),
}


class RecordError(ValueError):
    """A raw record that cannot become a normalized one; `reason` is a short stable category."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail

    def __reduce__(self):  # crosses from normalize's worker processes
        return RecordError, (self.reason, self.detail)


@dataclass(frozen=True)
class Message:
    """Convenience for user readers; a reader may equally return plain dicts."""

    role: str
    content: str
    train: bool | None = None
    name: str | None = None
    tool_calls: list | None = None
    reasoning: str | None = None
    tool_call_id: str | None = None


# --- one message ----------------------------------------------------------------------------


def _text_of_parts(parts: list, where: str) -> str:
    """OpenAI content parts -> one string; only text parts can be trained on here."""
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise RecordError("unsupported_content", f"{where}: content part of type {kind!r} (only text parts)")
    return "".join(texts)


def _tool_call(call: Any, where: str) -> dict:
    """{"name", "arguments"} or OpenAI's {"id", "type": "function", "function": {...}} -> {"name",
    "arguments": JSON, "id"} (the id is what a tool result's tool_call_id refers to)."""
    call_id = call.get("id") if isinstance(call, dict) else None
    if call_id is not None and not isinstance(call_id, str):
        raise RecordError("bad_tool_call", f"{where}: id is {type(call_id).__name__}, not a string")
    if isinstance(call, dict) and isinstance(call.get("function"), dict):
        call = call["function"]
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        raise RecordError("bad_tool_call", f"{where}: a tool call needs a string 'name' (got {str(call)[:80]!r})")
    args = call.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as err:
            raise RecordError(
                "bad_tool_call", f"{where}: arguments of {call['name']!r} are not JSON ({err.msg})"
            ) from None
    if isinstance(args, str):  # seen in published files: json.dumps applied twice
        raise RecordError("bad_tool_call", f"{where}: arguments of {call['name']!r} are a JSON string holding "
                          f"{args[:60]!r}, not a JSON object (encoded twice?)")  # fmt: skip
    if not isinstance(args, dict):
        raise RecordError("bad_tool_call", f"{where}: arguments of {call['name']!r} must be a JSON object")
    return {"name": call["name"], "arguments": json.dumps(args, ensure_ascii=False), "id": call_id}


def message(m: Any, field: str, i: int) -> dict:
    """Check one reader-produced message (`field`[i]) and bring it to the message shape. Keys
    left out mean None (to_table and the checks read them with .get)."""
    if type(m) is dict and len(m) == 2 and type(m.get("content")) is str and m.get("role") in ROLES:
        return m  # the common {"role", "content"} message: every check below would pass
    where = f"{field}[{i}]"
    if isinstance(m, Message):
        m = m.__dict__
    if not isinstance(m, dict):
        raise RecordError("bad_message", f"{where} is {type(m).__name__}, not a message dict")
    extra = set(m) - set(MESSAGE_KEYS)
    if extra:
        raise RecordError("bad_message", f"{where} has unknown keys {sorted(extra)}")
    role, content, tool_calls = m.get("role"), m.get("content"), m.get("tool_calls")
    if role not in ROLES:
        raise RecordError("bad_role", f"{where} has role {role!r}, not one of {sorted(ROLES)}")
    if isinstance(content, list):
        content = _text_of_parts(content, where)
    elif content is None and tool_calls:
        content = ""
    elif not isinstance(content, str):
        raise RecordError("bad_content", f"{where} content is {type(content).__name__}, not a string")
    if tool_calls is not None:
        if role != "assistant" or not isinstance(tool_calls, list):
            raise RecordError("bad_tool_call", f"{where}: tool_calls must be a list on an assistant message")
        tool_calls = [_tool_call(c, f"{where} tool call {j}") for j, c in enumerate(tool_calls)] or None
    for key in ("name", "reasoning", "tool_call_id"):
        if m.get(key) is not None and not isinstance(m[key], str):
            raise RecordError("bad_message", f"{where} {key} is {type(m[key]).__name__}, not a string")
    if m.get("tool_call_id") is not None and role != "tool":
        raise RecordError(
            "bad_message",
            f"{where}: tool_call_id belongs on a tool result, not on {'an' if role[0] in 'aeiou' else 'a'} {role} message",
        )
    train = m.get("train")
    if train is not None and not isinstance(train, bool):
        raise RecordError("bad_message", f"{where} train flag is {train!r}, not true/false")
    return {"role": role, "content": content, "train": train, "name": m.get("name"),
            "tool_calls": tool_calls, "reasoning": m.get("reasoning"), "tool_call_id": m.get("tool_call_id")}  # fmt: skip


# --- turn structure -------------------------------------------------------------------------


def check_turns(msgs: list[dict], field: str, *, first: int = 0) -> bool:
    """Sane order: system only first; no two user or two assistant turns in a row; a tool
    result only after an assistant tool call (or another tool result); no empty assistant turn.
    `first` is the index of msgs[0] in the whole conversation (for continuations). Returns
    whether any message is trained on. (Written for speed: it runs for every message.)"""
    any_trained, prev_role, prev_calls = False, None, None
    for i, m in enumerate(msgs):
        role, content, calls, train = m["role"], m["content"], m.get("tool_calls"), m.get("train")
        if role == "system":
            if i + first:
                raise RecordError("bad_order", f"{field}[{i}] is a system message; only the first message may be")
        elif role == prev_role and role != "tool":
            raise RecordError("bad_order", f"{field}[{i}]: two {role} messages in a row")
        elif role == "tool" and not (prev_calls or prev_role == "tool"):
            raise RecordError("bad_order", f"{field}[{i}]: a tool result with no assistant tool call before it")
        is_trained = role == "assistant" if train is None else train
        if (is_trained or role == "assistant") and not calls and (not content or content.isspace()):
            reason = "empty_assistant" if role == "assistant" else "empty_target"
            raise RecordError(
                reason, f"{field}[{i}]: a{' trained' if role != 'assistant' else 'n assistant'} message with no content"
            )
        any_trained = any_trained or is_trained
        prev_role, prev_calls = role, calls
    return any_trained


def _messages(record: dict, field: str, *, required: bool = True) -> list[dict]:
    msgs = record.get(field)
    if not isinstance(msgs, list) or (required and not msgs):
        got = (
            "missing"
            if msgs is None
            else f"{type(msgs).__name__} of length {len(msgs) if isinstance(msgs, list) else '-'}"
        )
        raise RecordError("missing_field", f"{field!r} must be a non-empty list of messages ({got})")
    return [message(m, field, i) for i, m in enumerate(msgs)]


def _tools(record: dict) -> str | None:
    """A `tools` field (list of JSON schemas, or its JSON text) -> canonical JSON text."""
    tools = record.get("tools")
    if tools in (None, "", []):
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            raise RecordError("bad_tools", f"'tools' is not JSON ({err.msg})") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RecordError("bad_tools", "'tools' must be a list of tool schemas (JSON objects)")
    return json.dumps(tools, ensure_ascii=False)


def _completion(prompt: list[dict], completion: list[dict], field: str) -> None:
    if prompt and prompt[-1]["role"] == "assistant":
        raise RecordError("bad_order", f"the prompt ends with an assistant message, before {field!r}")
    if completion[0]["role"] != "assistant":
        raise RecordError("bad_order", f"{field}[0] is a {completion[0]['role']} message, not assistant")
    check_turns(completion, field, first=len(prompt))


def _conversation(r: dict) -> dict:
    msgs = _messages(r, "messages")
    if not check_turns(msgs, "messages"):
        raise RecordError("no_target", "no message is trained on (no assistant turn)")
    return {"messages": msgs, "tools": _tools(r)}


def _prompt(r: dict) -> list[dict]:
    prompt = _messages(r, "prompt")
    check_turns(prompt, "prompt")
    return prompt


def _preference(r: dict) -> dict:
    prompt, chosen, rejected = _prompt(r), _messages(r, "chosen"), _messages(r, "rejected")
    _completion(prompt, chosen, "chosen")
    _completion(prompt, rejected, "rejected")
    if chosen == rejected:
        raise RecordError("identical_pair", "chosen and rejected are the same")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "tools": _tools(r)}


def _unpaired(r: dict) -> dict:
    prompt, completion = _prompt(r), _messages(r, "completion")
    _completion(prompt, completion, "completion")
    if not isinstance(r.get("label"), bool):
        raise RecordError("bad_label", f"'label' must be true or false (got {r.get('label')!r})")
    return {"prompt": prompt, "completion": completion, "label": r["label"], "tools": _tools(r)}


def _prompt_only(r: dict) -> dict:
    prompt = _prompt(r)
    if prompt[-1]["role"] not in ("user", "tool"):
        raise RecordError("bad_order", f"a prompt must end with a user message, not {prompt[-1]['role']}")
    answer = r.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise RecordError("bad_field", f"'answer' is {type(answer).__name__}, not a string")
    return {"prompt": prompt, "answer": answer, "tools": _tools(r)}


def _text(r: dict) -> dict:
    text = r.get("text")
    if not isinstance(text, str):
        raise RecordError(
            "missing_field" if text is None else "bad_field", f"'text' must be a string (got {type(text).__name__})"
        )
    if not text.strip():
        raise RecordError("empty_text", "'text' is empty")
    return {"text": text}


_CHECKS = {"conversation": _conversation, "preference": _preference, "unpaired": _unpaired,
           "prompt": _prompt_only, "text": _text}  # fmt: skip


def validate(record: Any, kind: str) -> dict:
    """A reader's output -> the fixed record of `kind` (a list of messages is a conversation)."""
    if isinstance(record, list):
        record = {"messages": record}
    if not isinstance(record, dict):
        raise RecordError("bad_reader_output", f"got {type(record).__name__}, not a record dict or message list")
    expected = set(MESSAGE_FIELDS[kind]) | ({"text"} if kind == "text" else set())
    if not expected <= set(record):
        raise RecordError("wrong_kind", f"a {kind} record needs {sorted(expected)}; got keys {sorted(record)}")
    return _CHECKS[kind](record)


def content_chars(record: dict, kind: str) -> int:
    """Characters of text in a validated record (for the length filters and the size guard)."""
    if kind == "text":
        return len(record["text"])
    total = 0
    for field in MESSAGE_FIELDS[kind]:
        for m in record[field]:
            total += len(m["content"])
            for call in m.get("tool_calls") or ():
                total += len(call["arguments"])
    return total


# --- Arrow schema per kind ------------------------------------------------------------------


@functools.cache
def schemas() -> dict[str, pa.Schema]:
    """The Arrow schema of each kind. Built on first use: the rules import this module (through
    the readers) when Snakemake parses the workflow, which must not load pyarrow."""
    import pyarrow as pa

    tool_call = pa.struct([("name", pa.string()), ("arguments", pa.string()), ("id", pa.string())])
    msgs = pa.list_(pa.struct([
        ("role", pa.string()), ("content", pa.string()), ("train", pa.bool_()), ("name", pa.string()),
        ("tool_calls", pa.list_(tool_call)), ("reasoning", pa.string()), ("tool_call_id", pa.string()),
    ]))  # fmt: skip
    ids = [("id", pa.string()), ("source", pa.string())]
    return {
        "conversation": pa.schema([*ids, ("messages", msgs), ("tools", pa.string())]),
        "preference": pa.schema([*ids, ("prompt", msgs), ("chosen", msgs), ("rejected", msgs), ("tools", pa.string())]),
        "unpaired": pa.schema(
            [*ids, ("prompt", msgs), ("completion", msgs), ("label", pa.bool_()), ("tools", pa.string())]
        ),
        "prompt": pa.schema([*ids, ("prompt", msgs), ("answer", pa.string()), ("tools", pa.string())]),
        "text": pa.schema([*ids, ("text", pa.string())]),
    }


def to_table(records: list[dict], kind: str, ids: list[str] = (), source: str = "") -> pa.Table:
    """Validated records as an Arrow table with the kind's fixed schema, `ids` and `source`
    filling the id and source columns."""
    import pyarrow as pa

    schema = schemas()[kind]
    columns = [pa.array(ids, pa.string()), pa.array([source] * len(records), pa.string())]
    for f in list(schema)[2:]:  # pa.array converts nested lists of dicts in C++, left-out keys as null
        columns.append(pa.array([r.get(f.name) for r in records], f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def canonical(record: dict, kind: str) -> dict:
    """The record with every message key spelt out (left-out keys are None), for comparisons."""
    out = dict(record)
    for field in MESSAGE_FIELDS[kind]:
        out[field] = [{k: m.get(k) for k in MESSAGE_KEYS} for m in record[field]]
    return out
