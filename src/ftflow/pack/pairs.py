"""Preference, unpaired and prompt data (DPO, KTO, GRPO): tokenized into the columns TRL's
trainers build for themselves (prompt_ids, chosen_ids, ...), not packed."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from ftflow.config.schema import Pack
from ftflow.pack.io import messages_of, piece_table, pieces, tools_of

PAIR_COLUMNS = {"preference": ("chosen", "rejected"), "unpaired": ("completion",), "prompt": ()}


def prompt_and_completions(prompt: list[dict], completions: list[list[dict]], tools, tok) -> list[list[int]]:
    """Token ids of the prompt (with the generation prompt) and of each completion, split as TRL's
    DPO trainer splits them: where the tokens of prompt and prompt + completion diverge."""
    from transformers.utils.chat_template_utils import render_jinja_template

    def text(conv, **kw):
        return render_jinja_template(conversations=[conv], tools=tools, chat_template=tok.chat_template,
                                     **kw, **tok.special_tokens_map)[0][0]  # fmt: skip

    texts = [text(prompt, add_generation_prompt=True)] + [text(prompt + c) for c in completions]
    prompt_ids, *full = [e.ids for e in tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    shared = min((common_prefix(prompt_ids, f) for f in full), default=len(prompt_ids))
    return [prompt_ids[:shared]] + [f[shared:] for f in full]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def pair_rows(parquet: Path, kind: str, tok, cfg: Pack) -> tuple[pa.Table, dict]:
    """Rows of prompt_ids + <completion>_ids (+ label / answer): the columns TRL's DPO and KTO
    trainers build for themselves, so they need not tokenize again. A prompt that fills
    max_length leaves nothing to learn from and is dropped, as TRL drops it."""
    fields = PAIR_COLUMNS[kind]
    extra = {"unpaired": ["label"], "prompt": ["answer"]}.get(kind, [])
    rows: dict[str, list] = {"prompt_ids": [], **{f"{f}_ids": [] for f in fields}, **{e: [] for e in extra}}
    counts, records = {"dropped_prompt_too_long": 0}, 0
    for piece in pieces(parquet):
        table = piece_table(parquet, piece, ["prompt", *fields, *extra, "tools"])
        columns = {f: messages_of(table.column(f)) for f in ("prompt", *fields)}
        for i, tools in enumerate(tools_of(table)):
            records += 1
            ids = prompt_and_completions(columns["prompt"][i], [columns[f][i] for f in fields], tools, tok)
            if len(ids[0]) >= cfg.max_length:
                counts["dropped_prompt_too_long"] += 1
                continue
            for name, value in zip(["prompt_ids", *(f"{f}_ids" for f in fields)], ids):
                rows[name].append(value)
            for e in extra:
                rows[e].append(table.column(e)[i].as_py())
    if not records:
        return pa.table({k: pa.array([], pa.list_(pa.int32())) for k in rows if k.endswith("_ids")}), {}
    tokens = sum(len(x) for k, v in rows.items() if k.endswith("_ids") for x in v)
    return pa.table(rows), {"records": records, "rows": len(rows["prompt_ids"]), "tokens": tokens, **counts}
