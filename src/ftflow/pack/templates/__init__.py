"""Plain-Python twins of the shipped chat templates (src/ftflow/pack/templates/*.jinja).

Each returns the rendered text and the character spans of its {% generation %} blocks, exactly
as transformers renders the Jinja file, at a fraction of the cost (no sandboxed attribute
lookups). pack checks a twin against the Jinja template on every chunk it renders, and
tests/pack/test_pack.py checks the tokens against apply_chat_template on every fixture conversation.
Edit a template and its twin together.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.resources import files


def _tojson(x) -> str:  # transformers' tojson filter
    return json.dumps(x, ensure_ascii=False)


def _trained(m: dict) -> bool:
    return m["role"] == "assistant" if m.get("train") is None else m["train"]


class _Out:
    """Text under construction, with the spans of the parts written as trained."""

    def __init__(self):
        self.parts: list[str] = []
        self.spans: list[tuple[int, int]] = []
        self.pos = 0

    def put(self, text: str, trained: bool = False) -> None:
        if trained:
            self.spans.append((self.pos, self.pos + len(text)))
        self.parts.append(text)
        self.pos += len(text)

    def result(self) -> tuple[str, list]:
        return "".join(self.parts), self.spans


def chatml(messages: list[dict], tools: list | None, bos_token: str = "") -> tuple[str, list]:
    out = _Out()
    if tools:
        system = messages[0]["content"] + "\n\n" if messages[0]["role"] == "system" else ""
        out.put("<|im_start|>system\n" + system + "# Tools\n\n<tools>" + "".join("\n" + _tojson(t) for t in tools)
                + "\n</tools><|im_end|>\n")  # fmt: skip
    for i, m in enumerate(messages):
        if tools and i == 0 and m["role"] == "system":
            continue
        body = m["content"]
        for call in m.get("tool_calls") or ():
            fn = call["function"]
            body += (
                ("\n" if body else "")
                + "<tool_call>\n"
                + _tojson({"name": fn["name"], "arguments": fn["arguments"]})
                + "\n</tool_call>"
            )
        out.put("<|im_start|>" + m["role"] + "\n")
        if _trained(m):
            out.put(body + "<|im_end|>", trained=True)
            out.put("\n")
        else:
            out.put(body + "<|im_end|>\n")
    return out.result()


def llama3(messages: list[dict], tools: list | None, bos_token: str = "") -> tuple[str, list]:
    out = _Out()
    out.put(bos_token)
    has_system = messages[0]["role"] == "system"
    if tools or has_system:
        text = "<|start_header_id|>system<|end_header_id|>\n\n" + (messages[0]["content"].strip() if has_system else "")
        if tools:
            text += ("\n\n" if has_system else "") + "You have access to the following functions:"
            text += "".join("\n\n" + _tojson(t) for t in tools)
        out.put(text + "<|eot_id|>")
    for m in messages:
        if m["role"] == "system":
            continue
        role = "ipython" if m["role"] == "tool" else m["role"]
        body = m["content"].strip()
        for call in m.get("tool_calls") or ():
            fn = call["function"]
            body += ("\n" if body else "") + _tojson({"name": fn["name"], "parameters": fn["arguments"]})
        out.put("<|start_header_id|>" + role + "<|end_header_id|>\n\n")
        out.put(body + "<|eot_id|>", trained=_trained(m))
    return out.result()


FAST = {"chatml": chatml, "llama3": llama3}


# --- the shipped templates: their Jinja files (beside this module) and marker tokens ---------


@dataclass(frozen=True)
class ChatTemplate:
    file: str
    markers: tuple[str, ...]  # special tokens the template writes (added to a vocabulary lacking them)
    bos: str | None = None


TEMPLATES = {
    "chatml": ChatTemplate("chatml.jinja", ("<|im_start|>", "<|im_end|>")),
    "llama3": ChatTemplate(
        "llama3.jinja",
        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        bos="<|begin_of_text|>",
    ),  # fmt: skip
}


def template_text(name: str) -> str:
    return files(__name__).joinpath(TEMPLATES[name].file).read_text()
