"""Readers turn one raw record (a dict) into a normalized record of one data kind.

A reader is a plain function `record -> dict` (see messages.py for the shapes; a list of
messages stands for a conversation). It raises RecordError with a short reason for a record it
cannot convert; whatever it returns is validated afterwards, the same for built-in and user
readers. Built-ins are registered in READERS with the kind they produce; a user reader is named
"file.py:function", the file's path relative to conf/data/ (beside the data config naming it).
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftflow import paths
from ftflow.data.messages import RecordError

Reader = Callable[[dict], Any]
READERS_DIR = Path(paths.READERS)  # user reader files are resolved from here


def _str(record: dict, key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise RecordError("missing_field", f"no {key!r} field (keys: {sorted(record)})")
        return ""
    if not isinstance(value, str):
        raise RecordError("bad_field", f"{key!r} is {type(value).__name__}, not a string")
    return value


def _system(record: dict) -> list[dict]:
    system = _str(record, "system", required=False)
    return [{"role": "system", "content": system}] if system else []


def _turns(value: Any, key: str, role: str) -> list:
    """A prompt/answer field given as a plain string or as a list of (published) messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return [_published_message(m, f"{key}[{i}]") for i, m in enumerate(value)]
    if value is None:
        raise RecordError("missing_field", f"no {key!r} field")
    raise RecordError("bad_field", f"{key!r} is {type(value).__name__}, not a string or a message list")


# --- supervised conversations ---------------------------------------------------------------


def alpaca(record: dict) -> dict:
    """Alpaca: instruction (+ input) -> output, with optional system and [user, assistant] history."""
    instruction, extra = _str(record, "instruction"), _str(record, "input", required=False)
    messages = _system(record) if record.get("system") else []
    for turn in record.get("history") or ():
        if not (isinstance(turn, list) and len(turn) == 2):
            raise RecordError("bad_field", "each history item must be a [user, assistant] pair")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    messages.append({"role": "user", "content": f"{instruction}\n{extra}" if extra else instruction})
    messages.append({"role": "assistant", "content": _str(record, "output")})
    return {"messages": messages}


_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "function_call": "assistant", "observation": "tool",
                   "tool": "tool", "function": "tool"}  # fmt: skip


def _sharegpt_turn(turn: Any, where: str) -> dict:
    if not isinstance(turn, dict):
        raise RecordError("bad_message", f"{where} is {type(turn).__name__}, not a {{from, value}} object")
    role = _SHAREGPT_ROLES.get(turn.get("from"))
    if role is None:
        raise RecordError("bad_role", f"{where} has from={turn.get('from')!r}")
    value = turn.get("value")
    if turn["from"] != "function_call":
        return {"role": role, "content": value}
    # the call is JSON text: {"name": ..., "arguments": {...}} (or a list of them)
    try:
        calls = json.loads(value) if isinstance(value, str) else None
    except json.JSONDecodeError as err:
        raise RecordError("bad_tool_call", f"{where}: function_call value is not JSON ({err.msg})") from None
    if calls is None:
        raise RecordError("bad_tool_call", f"{where}: function_call value must be JSON text")
    return {"role": "assistant", "content": "", "tool_calls": calls if isinstance(calls, list) else [calls]}


def _sharegpt_list(turns: Any, key: str) -> list[dict]:
    if isinstance(turns, dict):  # a single {from, value} object (chosen/rejected in pair files)
        turns = [turns]
    if not isinstance(turns, list):
        raise RecordError("missing_field", f"no {key!r} list of {{from, value}} turns")
    return [_sharegpt_turn(t, f"{key}[{i}]") for i, t in enumerate(turns)]


def sharegpt(record: dict) -> dict:
    """ShareGPT: {"conversations": [{"from": "human"|"gpt"|"function_call"|"observation"|..., "value"}],
    "system"?, "tools"?}; a function_call turn becomes an assistant tool call."""
    messages = _system(record) + _sharegpt_list(record.get("conversations"), "conversations")
    return {"messages": messages, "tools": record.get("tools")}


def openai_messages(record: dict) -> dict:
    """Chat messages as OpenAI's fine-tuning format and LLaMA-Factory's v1 publish them:
    {"messages": [{"role", "content", ...}], "tools"?}, content a string or typed parts. OpenAI:
    text parts, tool_calls with ids, tool_call_id on tool results, weight 0|1 on assistant turns
    (and the deprecated function_call, "function" results and "functions" of its older files).
    LLaMA-Factory v1: parts {"type": "text"|"reasoning"|"tool_call", "value"}, loss_weight 0|1."""
    msgs = record.get("messages")
    if isinstance(msgs, list):
        msgs = [_published_message(m, f"messages[{i}]") for i, m in enumerate(msgs)]
    return {"messages": msgs, "tools": _published_tools(record)}


def _published_tools(record: dict) -> Any:
    """ "tools", or the deprecated "functions" list of OpenAI's older fine-tuning files, each
    function given the {"type": "function", "function": ...} wrapper that "tools" has."""
    functions = record.get("functions")
    if record.get("tools") or not isinstance(functions, list) or not functions:
        return record.get("tools")
    return [{"type": "function", "function": f} for f in functions]


# a message's key for "train this turn or not", as each format spells it (0 or 1)
_WEIGHT_KEYS = ("weight", "loss_weight")
_REASONING_KEYS = ("reasoning_content", "thinking")


def _published_message(m: Any, where: str) -> Any:
    """One published message -> ftflow's message keys (validated afterwards, like any reader's)."""
    if not isinstance(m, dict):
        return m
    m = dict(m)
    # OpenAI's deprecated function calling: {"function_call": {name, arguments}} on the assistant,
    # the result as role "function" (named); the same as one tool call and a tool result
    if "function_call" in m:
        m["tool_calls"] = [*(m.get("tool_calls") or []), m.pop("function_call")]
    if m.get("role") == "function":
        m["role"] = "tool"
    # reasoning as chat templates name it: Qwen3's and DeepSeek's reasoning_content, gpt-oss's thinking
    for key in _REASONING_KEYS:
        if key in m:
            value = m.pop(key)
            if m.get("reasoning") not in (None, value):
                raise RecordError("bad_message", f"{where} has both 'reasoning' and {key!r}, and they differ")
            m["reasoning"] = value
    for key in _WEIGHT_KEYS:
        if key in m:
            weight = m.pop(key)
            if weight not in (0, 1) or isinstance(weight, str):
                raise RecordError("bad_field", f"{where} {key} is {weight!r}: a turn is trained (1) or not (0); "
                                  "ftflow has no fractional loss weights")  # fmt: skip
            m["train"] = bool(weight)
    content = m.get("content")
    if isinstance(content, list) and any(isinstance(p, dict) and "value" in p for p in content):
        m.update(_valued_parts(content, where, m.get("tool_calls")))
    return m


def _valued_parts(parts: list, where: str, tool_calls: list | None) -> dict:
    """LLaMA-Factory v1 content parts -> content, reasoning and tool calls."""
    text, reasoning, calls = [], [], list(tool_calls or [])
    for j, part in enumerate(parts):
        kind, value = (part.get("type"), part.get("value")) if isinstance(part, dict) else (None, None)
        if not isinstance(value, str):
            raise RecordError("bad_content", f"{where} content part {j} ({kind!r}) has no string 'value'")
        if kind == "text":
            text.append(value)
        elif kind == "reasoning":
            reasoning.append(value)
        elif kind == "tool_call":
            try:
                calls.append(json.loads(value))
            except json.JSONDecodeError as err:
                raise RecordError(
                    "bad_tool_call", f"{where} content part {j}: tool_call value is not JSON ({err.msg})"
                ) from None
        else:  # image_url, video_url, audio_url: no template here trains on them
            raise RecordError("unsupported_content", f"{where} content part {j} is of type {kind!r} (text, reasoning "
                              "and tool_call parts are read)")  # fmt: skip
    out = {"content": "".join(text), "tool_calls": calls or None}
    if reasoning:
        out["reasoning"] = "".join(reasoning)
    return out


def prompt_completion(record: dict) -> dict:
    """{"prompt", "completion"} as strings or message lists; the prompt is never trained on."""
    if "completion" not in record and "completions" in record:
        raise RecordError("missing_field", "'completions' and 'labels' are stepwise supervision (TRL's form for "
                          "process reward models), which ftflow does not train; a record needs one 'completion'")  # fmt: skip
    prompt = _system(record) + _turns(record.get("prompt"), "prompt", "user")
    return {"messages": prompt + _turns(record.get("completion"), "completion", "assistant")}


# --- function calling, as published ---------------------------------------------------------


def _json_text(record: dict, key: str) -> Any:
    """A field that holds JSON text (xLAM's tools and answers); a list or dict given parsed is taken as is."""
    value = record.get(key)
    if value is None:
        raise RecordError("missing_field", f"no {key!r} field (keys: {sorted(record)})")
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise RecordError("bad_field", f"{key!r} is not JSON ({err.msg})") from None


def _wrapped(functions: Any, key: str) -> list[dict]:
    """Function schemas in the {"type": "function", "function": ...} wrapper that `tools` has
    (chat templates read that form), each schema as published."""
    if not isinstance(functions, list) or not all(isinstance(f, dict) for f in functions):
        raise RecordError("bad_tools", f"{key!r} must be a list of function schemas (JSON objects)")
    return [f if f.get("type") == "function" else {"type": "function", "function": f} for f in functions]


def xlam(record: dict) -> dict:
    """Salesforce's xLAM function-calling-60k (APIGen): "query", and "tools" and "answers" as JSON
    text. The query is the user's turn; the answers, a list of {"name", "arguments"}, are one
    assistant turn of tool calls; the tools become the record's tools. An optional "system"."""
    query = _str(record, "query")
    calls = _json_text(record, "answers")
    if not isinstance(calls, list):
        raise RecordError("bad_tool_call", f"'answers' must be a list of calls (got {type(calls).__name__})")
    tools = _wrapped(_json_text(record, "tools"), "tools")
    messages = _system(record) + [
        {"role": "user", "content": query},
        {"role": "assistant", "content": "", "tool_calls": calls},
    ]
    return {"messages": messages, "tools": tools}


_GLAIVE_TURN = re.compile(r"^(USER|ASSISTANT|FUNCTION RESPONSE): ?", re.MULTILINE)
_GLAIVE_ROLES = {"USER": "user", "ASSISTANT": "assistant", "FUNCTION RESPONSE": "tool"}
_GLAIVE_END = "<|endoftext|>"
# a call as glaive writes it: {"name": "...", "arguments": '{...}'} (the arguments in single quotes)
_GLAIVE_CALL = re.compile(
    r'\{\s*"name"\s*:\s*"(?P<name>[^"]+)"\s*,\s*"arguments"\s*:\s*\'(?P<arguments>.*)\'\s*\}\s*$', re.DOTALL
)


def glaive(record: dict) -> dict:
    """glaive-function-calling-v2: "system" ("SYSTEM: <prose> -" then the function schemas as JSON
    objects, or no functions) and "chat", a transcript of "USER: ", "ASSISTANT: " and "FUNCTION
    RESPONSE: " turns; an assistant turn ends with <|endoftext|>, and "<functioncall> {...}" in it
    is a tool call (its arguments as JSON text in single quotes). The schemas become the record's
    tools and the prose its system message; a function response is a tool result."""
    system, tools = _glaive_system(_str(record, "system", required=False))
    chat = _str(record, "chat")
    parts = _GLAIVE_TURN.split(chat)
    if parts[0].strip():
        raise RecordError("bad_message", f"'chat' starts with {parts[0][:40]!r}, not a 'USER: ' turn")
    messages = [{"role": "system", "content": system}] if system else []
    for label, text in zip(parts[1::2], parts[2::2]):
        role, text = _GLAIVE_ROLES[label], text.strip()
        if role == "assistant":
            messages.append(_glaive_assistant(text.removesuffix(_GLAIVE_END).strip(), len(messages)))
        else:
            messages.append({"role": role, "content": text})
    return {"messages": messages, "tools": tools or None}


def _glaive_system(text: str) -> tuple[str, list[dict]]:
    """The system prose and the function schemas that follow it."""
    text = text.removeprefix("SYSTEM:").strip()
    start = text.find("{")
    if start < 0:
        return text, []
    prose, rest, functions = text[:start].strip(), text[start:], []
    decoder = json.JSONDecoder()
    while rest.strip():
        try:
            schema, end = decoder.raw_decode(rest.strip())
        except json.JSONDecodeError as err:
            raise RecordError("bad_tools", f"'system' holds a function schema that is not JSON ({err.msg})") from None
        functions.append(schema)
        rest = rest.strip()[end:]
    return prose, _wrapped(functions, "system")


def _glaive_assistant(text: str, i: int) -> dict:
    if "<functioncall>" not in text:
        return {"role": "assistant", "content": text}
    content, call = (part.strip() for part in text.split("<functioncall>", 1))
    match = _GLAIVE_CALL.match(call)
    try:
        parsed = {"name": match["name"], "arguments": match["arguments"]} if match else json.loads(call)
    except json.JSONDecodeError as err:
        raise RecordError(
            "bad_tool_call", f"messages[{i}]: <functioncall> is not a call ({err.msg}): {call[:60]!r}"
        ) from None
    return {"role": "assistant", "content": content, "tool_calls": [parsed]}


_OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


def oasst(record: dict) -> dict:
    """A thread of OpenAssistant message rows ({"messages": [row, ...]}, as data/trees.py makes
    them from the trees): prompter rows are user turns, assistant rows assistant turns, each its
    `text`."""
    messages = []
    for i, row in enumerate(record.get("messages") or []):
        role = _OASST_ROLES.get(row.get("role"))
        if role is None:
            raise RecordError("bad_role", f"messages[{i}] has role={row.get('role')!r} (prompter or assistant)")
        messages.append({"role": role, "content": row.get("text")})
    return {"messages": messages}


# --- preference pairs -----------------------------------------------------------------------


def sharegpt_preference(record: dict) -> dict:
    """ShareGPT conversations as the prompt + "chosen"/"rejected" {from, value} objects (or lists)."""
    return {
        "prompt": _system(record) + _sharegpt_list(record.get("conversations"), "conversations"),
        "chosen": _sharegpt_list(record.get("chosen"), "chosen"),
        "rejected": _sharegpt_list(record.get("rejected"), "rejected"),
        "tools": record.get("tools"),
    }


def messages_preference(record: dict) -> dict:
    """ "chosen"/"rejected" as whole conversations that share their prompt; the shared leading
    messages become the prompt. Each is a message list (TRL's conversational form; LLaMA-Factory
    v1's "chosen_messages"/"rejected_messages"), an Anthropic HH transcript string
    ("\n\nHuman: ...\n\nAssistant: ..."), or plain text (TRL's standard implicit-prompt form: the
    shared leading text is the prompt). A "prompt" list is taken as is; a "prompt" string beside
    whole conversations (UltraFeedback's layout) must be their last user message."""
    chosen = record.get("chosen", record.get("chosen_messages"))
    rejected = record.get("rejected", record.get("rejected_messages"))
    if isinstance(chosen, str) and isinstance(rejected, str):
        if _HH_TURN.search(chosen) or _HH_TURN.search(rejected):  # a transcript, well-formed or not
            chosen, rejected = _hh_transcript(chosen, "chosen"), _hh_transcript(rejected, "rejected")
        else:
            return _split_text_pair(chosen, rejected)
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise RecordError("missing_field", "'chosen' and 'rejected' must be message lists, HH transcripts or "
                          f"texts (got {type(chosen).__name__} and {type(rejected).__name__})")  # fmt: skip
    chosen = [_published_message(m, f"chosen[{i}]") for i, m in enumerate(chosen)]
    rejected = [_published_message(m, f"rejected[{i}]") for i, m in enumerate(rejected)]
    prompt = record.get("prompt")
    if prompt is not None and (not isinstance(prompt, str) or _role(chosen[0] if chosen else None) == "assistant"):
        return {"prompt": _turns(prompt, "prompt", "user"), "chosen": chosen, "rejected": rejected,
                "tools": record.get("tools")}  # fmt: skip
    shared = _shared_prompt(chosen, rejected)
    if isinstance(prompt, str):
        last_user = next((m.get("content") for m in reversed(chosen[:shared]) if _role(m) == "user"), None)
        if last_user != prompt:
            raise RecordError("bad_pair", "'prompt' is not the last user message that 'chosen' and 'rejected' share "
                              f"(prompt {prompt[:60]!r}, shared user message {str(last_user)[:60]!r})")  # fmt: skip
    return {"prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:],
            "tools": record.get("tools")}  # fmt: skip


def _role(m: Any) -> Any:
    return m.get("role") if isinstance(m, dict) else None


def _shared_prompt(chosen: list, rejected: list) -> int:
    """How many leading messages the two conversations share, short of an assistant turn that
    begins a completion (shared trailing assistant turns go back to the completions)."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared and _role(chosen[shared - 1]) == "assistant":
        shared -= 1
    return shared


def _split_text_pair(chosen: str, rejected: str) -> dict:
    """TRL's standard implicit-prompt pair ("Beautiful is better than ugly." / "... the moon."):
    the shared leading text is the prompt, the space before the first difference goes with the
    completions, as TRL's extract_prompt splits it."""
    cut = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
    if cut and chosen[cut - 1] == " ":
        cut -= 1
    if not chosen[:cut].strip():
        raise RecordError("bad_pair", "'chosen' and 'rejected' are texts with no shared prompt (nor HH transcripts "
                          "'\\n\\nHuman: ...\\n\\nAssistant: ...')")  # fmt: skip
    return {"prompt": [{"role": "user", "content": chosen[:cut]}],
            "chosen": [{"role": "assistant", "content": chosen[cut:]}],
            "rejected": [{"role": "assistant", "content": rejected[cut:]}]}  # fmt: skip


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def _hh_transcript(text: str, key: str) -> list[dict]:
    """Anthropic HH's transcript string -> messages: turns start at "\n\nHuman:" or
    "\n\nAssistant:" (the published files put one before the first turn too)."""
    pieces = _HH_TURN.split(text)
    if len(pieces) < 3 or pieces[0].strip():
        raise RecordError("bad_field", f"{key!r} is not a whole HH transcript ('\\n\\nHuman: ...\\n\\nAssistant: ...'): "
                          f"{'it has no turn' if len(pieces) < 3 else repr(pieces[0][:40]) + ' comes before its first turn'}")  # fmt: skip
    return [{"role": _HH_ROLES[who], "content": said} for who, said in zip(pieces[1::2], pieces[2::2])]


def prompt_preference(record: dict) -> dict:
    """A shared "prompt" with "chosen" and "rejected" answers, each a string (TRL's standard form)."""
    return {
        "prompt": _system(record) + _turns(record.get("prompt"), "prompt", "user"),
        "chosen": _turns(record.get("chosen"), "chosen", "assistant"),
        "rejected": _turns(record.get("rejected"), "rejected", "assistant"),
    }


def unpaired_preference(record: dict) -> dict:
    """KTO: "messages" whose last assistant turn is judged by a boolean "label" (or "prompt" and
    "completion" as strings / message lists, with "label")."""
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise RecordError("missing_field", "'messages' must be a non-empty message list")
        msgs = [_published_message(m, f"messages[{i}]") for i, m in enumerate(msgs)]
        prompt, completion = msgs[:-1], msgs[-1:]
    else:
        prompt = _turns(record.get("prompt"), "prompt", "user")
        completion = _turns(record.get("completion"), "completion", "assistant")
    return {"prompt": _system(record) + prompt, "completion": completion, "label": record.get("label"),
            "tools": record.get("tools")}  # fmt: skip


# --- prompts (GRPO) and raw text ------------------------------------------------------------

_ANSWER_KEYS = ("answer", "solution", "reference")


def prompt_answer(record: dict) -> dict:
    """A "prompt" (string or messages) with an optional reference "answer" (or "solution")."""
    answer = next((record[k] for k in _ANSWER_KEYS if record.get(k) is not None), None)
    return {"prompt": _system(record) + _turns(record.get("prompt"), "prompt", "user"), "answer": answer}


def text(record: dict) -> dict:
    """Raw text for continued pre-training: {"text": ...}."""
    return {"text": record.get("text")}


READERS: dict[str, tuple[Reader, str]] = {
    "alpaca": (alpaca, "conversation"),
    "sharegpt": (sharegpt, "conversation"),
    "messages": (openai_messages, "conversation"),
    "prompt_completion": (prompt_completion, "conversation"),
    "xlam": (xlam, "conversation"),
    "glaive": (glaive, "conversation"),
    "oasst": (oasst, "conversation"),  # a thread that data/trees.py assembled from the rows
    "oasst_threads": (oasst, "conversation"),
    "sharegpt_preference": (sharegpt_preference, "preference"),
    "messages_preference": (messages_preference, "preference"),
    "prompt_preference": (prompt_preference, "preference"),
    "unpaired_preference": (unpaired_preference, "unpaired"),
    "prompt_answer": (prompt_answer, "prompt"),
    "text": (text, "text"),
}


# The raw fields each built-in reader reads: `columns` may map only these.
READER_FIELDS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "sharegpt": ("conversations", "system", "tools"),
    "messages": ("messages", "tools", "functions"),
    "prompt_completion": ("prompt", "completion", "system"),
    "xlam": ("query", "tools", "answers", "system"),
    "glaive": ("system", "chat"),
    "oasst": ("messages",),
    "oasst_threads": ("messages",),
    "sharegpt_preference": ("conversations", "chosen", "rejected", "system", "tools"),
    "messages_preference": ("chosen", "rejected", "chosen_messages", "rejected_messages", "prompt", "tools"),
    "prompt_preference": ("prompt", "chosen", "rejected", "system"),
    "unpaired_preference": ("messages", "prompt", "completion", "label", "system", "tools"),
    "prompt_answer": ("prompt", *_ANSWER_KEYS, "system"),
    "text": ("text",),
}
# Fields of published multimodal records (LLaMA-Factory, ms-swift): no built-in reader or
# template here trains on media, and dropping them silently would train on text that refers to them.
MEDIA_FIELDS = ("images", "videos", "audios")


# Fields that carry tool schemas: a reader with no place for them (READER_FIELDS without "tools")
# would train the calls as plain text with the tools they call dropped.
TOOL_FIELDS = ("tools", "functions")


def check_media(record: dict) -> None:
    for key in MEDIA_FIELDS:
        if record.get(key):
            raise RecordError("unsupported_content", f"the record has {key!r}; ftflow trains on text only")


def check_tools(record: dict, reader: str) -> None:
    """A built-in reader without a place for tool schemas refuses a record that has some."""
    if "tools" in READER_FIELDS[reader]:
        return
    for key in TOOL_FIELDS:
        if record.get(key):
            keeps = sorted(r for r, fields in READER_FIELDS.items() if "tools" in fields)
            raise RecordError("tools_not_read", f"the record has {key!r} (tool schemas) and reader {reader!r} has "
                              f"no place for them: its calls would be trained as plain text without the tools; use "
                              f"a reader that keeps them ({', '.join(keeps)})")  # fmt: skip


def read_columns(reader: str, columns: dict[str, str] | None) -> frozenset[str] | None:
    """The raw columns a built-in reader reads: its fields, each taken from the column `columns`
    maps to it. None for a user reader (its code decides)."""
    if reader not in READER_FIELDS:
        return None
    columns = columns or {}
    return frozenset(columns.get(field, field) for field in READER_FIELDS[reader])


def reader_kind(spec: str) -> str | None:
    """The kind a built-in reader produces; None for a user reader (it must match data.kind)."""
    if spec in READERS:
        return READERS[spec][1]
    _refuse_unknown(spec)
    return None


def _refuse_unknown(spec: str) -> None:
    """A reader is a built-in's name or user code "file.py:function" (its file: inputs.user_files)."""
    if spec not in READERS and ":" not in spec:
        import difflib

        close = difflib.get_close_matches(spec, list(READERS), n=1)
        hint = f" — did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown reader {spec!r}: use one of {sorted(READERS)} or 'file.py:function'{hint}")


def get_reader(spec: str, base: Path = READERS_DIR) -> Reader:
    """A built-in reader by name, or user code as "file.py:function"."""
    if spec in READERS:
        return READERS[spec][0]
    if ":" not in spec:
        _refuse_unknown(spec)
    return load_function(spec, base, what="reader")


def user_file(spec: str, base: Path, what: str) -> tuple[Path, str]:
    """The file (relative to `base`, a conf/ folder) and function name of "file.py:function"."""
    if ":" not in spec:
        raise ValueError(f"{what} {spec!r}: not a built-in; user code is given as 'file.py:function'")
    name, func = spec.rsplit(":", 1)
    file = base / name
    if not file.is_file():
        raise ValueError(f"{what} {spec!r}: file {file} not found (user {what} files are relative to {base}/)")
    return file, func


def check_user_function(spec: str, base: Path, what: str) -> None:
    """Whether "file.py:function" names a file under `base` that defines `function` at its top
    level, read without running it (compose checks every user reader and reward this way, so a
    typo fails before any job rather than after download)."""
    import ast

    file, func = user_file(spec, base, what)
    try:
        tree = ast.parse(file.read_bytes(), filename=str(file))
    except SyntaxError as err:
        raise ValueError(f"{what} {spec!r}: {file} line {err.lineno}: {err.msg}") from None
    defined = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            defined.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined.update((a.asname or a.name).split(".")[0] for a in node.names)
    if func not in defined:
        raise ValueError(f"{what} {spec!r}: {file} defines no {func!r} at its top level")


def load_function(spec: str, base: Path, what: str) -> Callable:
    """User code given as "file.py:function", the file relative to `base` (a conf/ folder)."""
    file, func = user_file(spec, base, what)
    mod_spec = importlib.util.spec_from_file_location(f"ftflow_user_{what}_{file.stem}", file)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as err:  # the user's module failed at import: say which and why, not a traceback
        raise ValueError(f"{what} {spec!r}: importing {file} failed: {type(err).__name__}: {err}") from None
    if not callable(getattr(module, func, None)):
        raise ValueError(f"{what} {spec!r}: {file} has no function {func!r}")
    return getattr(module, func)
