"""Readers turn one raw record (a dict) into a list of Messages.

A reader is a plain function `record -> list[Message]`; it raises RecordError with a short
reason for a record it cannot convert. Built-ins are registered in READERS; a user reader is
named as "path/to/file.py:function".
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow.parquet as pq

from ftflow.messages import Message, RecordError

Reader = Callable[[dict], list[Message]]


def _field(record: dict, key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise RecordError("missing_field", f"no {key!r} field (keys: {sorted(record)})")
        return ""
    if not isinstance(value, str):
        raise RecordError("bad_field", f"{key!r} is {type(value).__name__}, not str")
    return value


def alpaca(record: dict) -> list[Message]:
    """Alpaca: instruction (+ input) -> output, with optional system and history pairs."""
    instruction = _field(record, "instruction")
    extra = _field(record, "input", required=False)
    messages = []
    if record.get("system"):
        messages.append(Message("system", _field(record, "system")))
    for turn in record.get("history") or []:
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
            raise RecordError("bad_field", "each history item must be a [user, assistant] pair")
        messages += [Message("user", turn[0]), Message("assistant", turn[1])]
    prompt = f"{instruction}\n{extra}" if extra else instruction
    messages += [Message("user", prompt), Message("assistant", _field(record, "output"))]
    return messages


def openai_messages(record: dict) -> list[Message]:
    """OpenAI/HF chat format: {"messages": [{"role": ..., "content": ...}, ...]}."""
    turns = record.get("messages")
    if not isinstance(turns, list):
        raise RecordError("missing_field", f"no 'messages' list (keys: {sorted(record)})")
    return [Message(t.get("role"), t.get("content"), t.get("train")) for t in turns]


_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "function_call": "assistant", "observation": "tool"}


def sharegpt(record: dict) -> list[Message]:
    """ShareGPT: {"conversations": [{"from": "human"|"gpt"|..., "value": ...}]}."""
    turns = record.get("conversations")
    if not isinstance(turns, list):
        raise RecordError("missing_field", f"no 'conversations' list (keys: {sorted(record)})")
    out = [Message("system", record["system"])] if record.get("system") else []
    for i, t in enumerate(turns):
        role = _SHAREGPT_ROLES.get(t.get("from"))
        if role is None:
            raise RecordError("bad_role", f"turn {i} has from={t.get('from')!r}")
        out.append(Message(role, t.get("value")))
    return out


READERS: dict[str, Reader] = {"alpaca": alpaca, "messages": openai_messages, "sharegpt": sharegpt}


def get_reader(spec: str) -> Reader:
    """A built-in reader by name, or user code as "file.py:function"."""
    if spec in READERS:
        return READERS[spec]
    if ":" not in spec:
        raise ValueError(f"unknown reader {spec!r}: use one of {sorted(READERS)} or 'file.py:function'")
    file, func = spec.rsplit(":", 1)
    mod_spec = importlib.util.spec_from_file_location(Path(file).stem, file)
    if mod_spec is None or not Path(file).exists():
        raise ValueError(f"reader {spec!r}: file {file} not found")
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    if not callable(getattr(module, func, None)):
        raise ValueError(f"reader {spec!r}: {file} has no function {func!r}")
    return getattr(module, func)


DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def data_files(root: Path) -> list[Path]:
    """The record files of a downloaded source, in a stable order."""
    if root.is_file():
        return [root]
    files = sorted(p for p in root.rglob("*") if p.suffix in DATA_SUFFIXES and ".cache" not in p.parts)
    if not files:
        raise FileNotFoundError(f"{root}: no {'/'.join(DATA_SUFFIXES)} files")
    return files


def iter_records(path: Path) -> Iterator[tuple[str, dict | None, str | None]]:
    """Yield (locator, record, parse_error) with a locator like `file.jsonl:12` for messages."""
    if path.suffix == ".jsonl":
        with path.open() as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path.name}:{lineno}", json.loads(line), None
                except json.JSONDecodeError as err:
                    yield f"{path.name}:{lineno}", None, f"invalid JSON ({err.msg})"
    elif path.suffix == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
        for i, rec in enumerate(data):
            yield f"{path.name}[{i}]", rec, None
    elif path.suffix == ".parquet":
        for i, rec in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path.name}[{i}]", rec, None
    else:
        raise ValueError(f"{path}: unsupported file type (use {', '.join(DATA_SUFFIXES)})")
