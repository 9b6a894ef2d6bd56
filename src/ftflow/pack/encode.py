"""Conversations -> token ids and loss masks, exactly as `apply_chat_template(...,
return_assistant_tokens_mask=True)` gives them, for a chunk of conversations at once: the
template renders each conversation with its trained spans (a plain-Python twin for ftflow's own
templates, pack/spans.py's renderer for a model's), one Rust batch encode tokenizes the chunk,
and numpy turns token offsets and spans into masks. The mask audit counts what was trained."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ftflow.errors import PackError
from ftflow.pack.io import parquet_file, piece_table, read_piece
from ftflow.pack.spans import Renderer, Span, TemplateError, renderer, stop_tokens, trained_messages
from ftflow.pack.templates import template_text

IGNORE_INDEX = -100  # label value that the loss skips


@dataclass
class Encoded:
    """A chunk of conversations as flat token arrays: conversation i is [starts[i], +lengths[i])."""

    ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE_INDEX where not trained
    lengths: np.ndarray  # int64, per sequence (train_on=each_turn makes one per trained turn)
    audit: Counter = field(default_factory=Counter)  # the masking audit's counts (see mask_audit)
    conversations: int | None = None  # records encoded (None: one per sequence)

    @property
    def records(self) -> int:
        return len(self.lengths) if self.conversations is None else self.conversations


@dataclass
class Rendered:
    """A chunk's training sequences as text: sequence k belongs to conversation owners[k] and
    trains spans[k]; a per-turn sequence starts with its prompt (prompts[k] characters, rendered
    as inference renders it), a whole conversation has none (prompts[k] = 0)."""

    texts: list[str]
    spans: list[list[Span]]
    owners: list[int]
    prompts: list[int]
    audit: Counter = field(default_factory=Counter)  # sequences and conversations per mode

    def add(self, text: str, spans: list[Span], owner: int, prompt: int = 0) -> None:
        self.texts.append(text)
        self.spans.append(spans)
        self.owners.append(owner)
        self.prompts.append(prompt)


def encode(convs: list[list[dict]], tools: list, tok, train_on: str = "assistant", first: int = 0,
           name: str = "the data") -> Encoded:  # fmt: skip
    """What apply_chat_template(conv, tools=..., tokenize=True) gives for each conversation, as
    flat arrays, with the loss on the spans that `train_on` picks (assistant turns, the last of
    them, or every token); each_turn and auto give one sequence per trained turn where the
    whole conversation is not exact (see render_turns). `first` and `name` say where the chunk
    comes from, for errors."""
    r = render_turns(convs, tools, tok, train_on, first, name) if train_on in TURN_MODES else None
    if r is None:
        texts, spans = render_with_spans(convs, tools, tok, train_on, first, name)
        r = Rendered(
            texts, spans, list(range(len(texts))), [0] * len(texts), Counter({"conversations/whole": len(texts)})
        )
    encodings = tok.backend_tokenizer.encode_batch(r.texts, add_special_tokens=False)
    per_text = [np.array(e.ids, np.int32) for e in encodings]
    lengths = np.fromiter(map(len, per_text), np.int64, len(per_text))
    ids = np.concatenate(per_text) if per_text else np.zeros(0, np.int32)
    if train_on == "all":
        audit = Counter({"trained_tokens/all": len(ids)}) + reasoning_audit(convs, r)
        return Encoded(ids, ids.copy(), lengths, audit, len(convs))
    check_prompts(r, per_text, tok, first, name)
    offsets = token_offsets(encodings, r.texts, lengths)
    mask = overlap_mask(offsets, r.texts, [[(s.start, s.end) for s in conv] for conv in r.spans])
    audit = mask_audit(offsets, r, ids, tok, first, name) + reasoning_audit(convs, r) + r.audit
    return Encoded(ids, np.where(mask, ids, IGNORE_INDEX).astype(np.int32), lengths, audit, len(convs))


TURN_MODES = ("each_turn", "auto")


def render_turns(convs: list[list[dict]], tools: list, tok, train_on: str, first: int, name: str) -> Rendered | None:
    """each_turn: every trained turn is its own sequence, its prompt rendered as inference renders
    it and the turn as the template renders a final turn (spans.Renderer.each_turn). auto: the
    whole conversation where the template renders every trained turn exactly in it (prefix
    preserving), per turn where not; ftflow's own templates always are (None: whole mode)."""
    if train_on == "auto" and fast_renderer(tok) is not None:
        return None
    r = span_renderer(tok)
    out = Rendered([], [], [], [])
    for k, (conv, conv_tools) in enumerate(zip(convs, tools)):
        where = f"conversation {first + k} of {name}"
        if train_on == "auto":
            try:
                text, spans = r.guarded(where, r.whole, conv, conv_tools, where, k == 0)
            except TemplateError:
                pass
            else:
                out.add(text, spans, k)
                out.audit["conversations/whole"] += 1
                continue
        turns = r.render_turns(conv, conv_tools, where)
        for prompt, turn, role in turns:
            out.add(prompt + turn, [Span(len(prompt), len(prompt) + len(turn), role)], k, len(prompt))
        out.audit["conversations/each_turn"] += 1
        out.audit["sequences/each_turn"] += len(turns)
        # what the whole conversation would not repeat: every sequence but the last (which
        # holds the conversation up to its last trained turn)
        out.audit["repeated_chars/each_turn"] += sum(len(p) for p, _, _ in turns[1:])
    return out


def check_prompts(r: Rendered, per_text: list[np.ndarray], tok, first: int, name: str) -> None:
    """A per-turn sequence's first tokens are exactly the prompt's own tokens (as inference
    tokenizes apply_chat_template(messages[:i], add_generation_prompt=True)): no token spans the
    prompt's end and the turn's start."""
    at = [k for k, n in enumerate(r.prompts) if n]
    if not at:
        return
    prompts = tok.backend_tokenizer.encode_batch([r.texts[k][: r.prompts[k]] for k in at], add_special_tokens=False)
    for k, enc in zip(at, prompts):
        n = len(enc.ids)
        if per_text[k][:n].tolist() != enc.ids:
            raise PackError(f"conversation {first + r.owners[k]} of {name}: a token spans the end of the prompt and "
                            f"the start of the turn ({r.texts[k][r.prompts[k] - 20 : r.prompts[k] + 20]!r}), so the "
                            "sequence is not the prompt's tokens followed by the turn's")  # fmt: skip


def reasoning_audit(convs: list[list[dict]], r: Rendered) -> Counter:
    """Messages that carry reasoning, and those whose reasoning the template left out of the
    text (ftflow's ChatML and Llama 3 have no place for it; models' own templates often drop it
    from turns before the last user message): that reasoning is not trained."""
    texts: dict[int, str] = {}
    for owner, text in zip(r.owners, r.texts):
        texts[owner] = texts.get(owner, "") + text
    out: Counter = Counter()
    for k, conv in enumerate(convs):
        for m in conv:
            reasoning = m.get("reasoning_content")
            if reasoning:
                out["reasoning/messages"] += 1
                out["reasoning/not_rendered"] += reasoning not in texts.get(k, "")
    return out


def encode_text(texts: list[str], tok) -> Encoded:
    """Raw text for continued pre-training: every token trained, the eos token closing each text."""
    encodings = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    per_text = [np.array([*e.ids, tok.eos_token_id], np.int32) for e in encodings]
    ids = np.concatenate(per_text) if per_text else np.zeros(0, np.int32)
    return Encoded(ids, ids.copy(), np.fromiter(map(len, per_text), np.int64, len(per_text)))


def encode_piece(parquet: Path, piece: tuple[int, int, int], kind: str, tok, train_on: str) -> Encoded:
    if kind == "text":
        return encode_text(piece_table(parquet, piece, ["text"]).column("text").to_pylist(), tok)
    first = sum(parquet_file(parquet).metadata.row_group(g).num_rows for g in range(piece[0])) + piece[1]
    return encode(*read_piece(parquet, piece), tok, train_on, first, str(parquet))


def render_with_spans(convs: list[list[dict]], tools: list, tok, train_on: str = "assistant", first: int = 0,
                      name: str = "the data") -> tuple[list[str], list[list[Span]]]:  # fmt: skip
    """Rendered texts and trained spans. ftflow's own templates have a plain-Python twin
    (templates.py), ~20x faster than Jinja's sandbox: the first conversation of every chunk is
    rendered both ways and must agree. Any other template goes through spans.Renderer, which
    verifies the spans of every conversation (and derives the chunk's first from prefixes)."""
    fast = fast_renderer(tok)
    if fast is None:
        r = span_renderer(tok)
        out = [r.render(c, t, train_on, f"conversation {first + k} of {name}", check=k == 0)
               for k, (c, t) in enumerate(zip(convs, tools))]  # fmt: skip
        return [t for t, _ in out], [s for _, s in out]
    out = [fast(c, t, tok.bos_token or "") for c, t in zip(convs, tools)]
    if out and out[0] != (expected := jinja_render(convs[0], tools[0], tok)):
        raise PackError(f"the fast renderer of this template disagrees with its Jinja text: {out[0]!r} != {expected!r}")
    texts, spans = [t for t, _ in out], []
    for conv, (text, conv_spans) in zip(convs, out):
        roles = [conv[i]["role"] for i in sorted(trained_messages(conv, "assistant"))]
        if len(roles) != len(conv_spans):  # one block per trained message is how ftflow's templates are written
            raise PackError(f"{len(conv_spans)} trained blocks for {len(roles)} trained messages in {text[:80]!r}")
        conv_spans = [Span(a, b, role) for (a, b), role in zip(conv_spans, roles)]
        spans.append(conv_spans[-1:] if train_on == "last_assistant" else conv_spans)
    if train_on == "all":
        spans = [[Span(0, len(t), "all")] for t in texts]
    return texts, spans


def jinja_render(conv: list[dict], tools, tok) -> tuple[str, list]:
    """transformers' own rendering: the text and the {% generation %} character spans."""
    from transformers.utils.chat_template_utils import render_jinja_template

    text, spans = render_jinja_template(conversations=[conv], tools=tools, chat_template=tok.chat_template,
                                        return_assistant_tokens_mask=True, **tok.special_tokens_map)  # fmt: skip
    return text[0], [tuple(s) for s in spans[0]]


def fast_renderer(tok):
    from ftflow.pack import templates

    for name, render_fn in templates.FAST.items():
        if tok.chat_template == template_text(name):
            return render_fn
    return None


_RENDERERS: dict[int, tuple] = {}


def span_renderer(tok) -> Renderer:
    """One spans.Renderer per tokenizer (and process): its method is decided once."""
    if id(tok) not in _RENDERERS:
        _RENDERERS[id(tok)] = (tok, renderer(tok))  # the tokenizer is kept, so its id stays its own
    return _RENDERERS[id(tok)][1]


def span_method(tok) -> str:
    return "ftflow" if fast_renderer(tok) else span_renderer(tok).method


def token_offsets(encodings, texts: list[str], lengths: np.ndarray) -> np.ndarray:
    """Every token's (start, end) characters on one axis: the chunk's texts one after another."""
    offsets = np.concatenate(
        [np.array(e.offsets, np.int64).reshape(-1, 2) for e in encodings] or [np.zeros((0, 2), np.int64)]
    )
    return offsets + np.repeat(text_starts(texts), lengths)[:, None]


def text_starts(texts: list[str]) -> np.ndarray:
    return np.cumsum([0] + [len(t) for t in texts[:-1]]).astype(np.int64)


def overlap_mask(offsets: np.ndarray, texts: list[str], spans: list[list]) -> np.ndarray:
    """A token is trained when its characters overlap a span, as in transformers' assistant mask
    (so a span cut by truncation keeps its tokens). Done for the whole chunk at once: offsets and
    spans on one character axis (text after text), where spans stay sorted and a token can only
    overlap spans of its own text."""
    span_arr = np.array([(a + s, b + s) for s, conv_spans in zip(text_starts(texts), spans) for a, b in conv_spans],
                        dtype=np.int64).reshape(-1, 2)  # fmt: skip
    if not len(span_arr):
        return np.zeros(len(offsets), bool)
    first_open = np.searchsorted(
        span_arr[:, 1], offsets[:, 0], side="right"
    )  # first span ending after the token starts
    inside = first_open < len(span_arr)
    starts = span_arr[np.minimum(first_open, len(span_arr) - 1), 0]
    return inside & (offsets[:, 1] > starts)


def mask_audit(offsets: np.ndarray, r: Rendered, ids: np.ndarray, tok, first: int, name: str) -> Counter:
    """Counts for pack's masking audit: trained tokens per role, trained turns, and those whose
    last trained token is an end-of-turn token, one the model stops on (spans.stop_tokens), ending
    exactly where the span ends. A trained turn that does not end on one would teach the model
    never to stop (or to start the next turn): that fails the stage, naming the conversation."""
    audit, texts, spans = Counter(), r.texts, r.spans
    for role in {s.role for conv in spans for s in conv}:
        only = [[(s.start, s.end) for s in conv if s.role == role] for conv in spans]
        audit[f"trained_tokens/{role}"] += int(overlap_mask(offsets, texts, only).sum())
    stops = stop_ids(tok)
    token_ends = offsets[:, 1]
    for k, (start, conv) in enumerate(zip(text_starts(texts), spans)):
        for s in conv:
            last = int(np.searchsorted(token_ends, start + s.end, side="left"))
            if last == len(ids) or token_ends[last] != start + s.end or int(ids[last]) not in stops:
                raise PackError(f"conversation {first + r.owners[k]} of {name}: the trained {s.role} turn "
                                f"{texts[k][s.start:s.end][-60:]!r} does not end on an end-of-turn token (one of "
                                f"{', '.join(stop_tokens(tok))}, the tokens the model stops on)")  # fmt: skip
            audit["trained_turns"] += 1
            audit[f"trained_turns/{s.role}"] += 1
    audit["conversations_without_trained_token"] += len(set(r.owners) - {o for o, conv in zip(r.owners, spans) if conv})
    return audit


def audit_figures(audit: Counter) -> dict:
    """The masking audit of a split: trained tokens and turns per role (each trained turn ends on
    its end-of-turn token, or pack has failed), and conversations that train nothing."""
    roles = {k.split("/", 1)[1]: v for k, v in audit.items() if k.startswith("trained_tokens/")}
    total = sum(roles.values())
    return {
        "trained_tokens_by_role": dict(sorted(roles.items())),
        "trained_token_share_by_role": {r: round(v / total, 4) for r, v in sorted(roles.items())} if total else {},
        "trained_turns_by_role": {
            k.split("/", 1)[1]: v for k, v in sorted(audit.items()) if k.startswith("trained_turns/")
        },
        "turns_ending_on_end_of_turn": audit["trained_turns"],
        "conversations_without_trained_token": audit["conversations_without_trained_token"],
        "messages_with_reasoning": audit["reasoning/messages"],
        "reasoning_not_in_rendered_text": audit["reasoning/not_rendered"],
        **turn_modes(audit),
    }


def turn_modes(audit: Counter) -> dict:
    """train_on each_turn / auto: how many conversations were trained whole and how many one
    sequence per turn, with the sequences that made and the characters of prompt they repeat."""
    if not (audit["conversations/whole"] or audit["conversations/each_turn"]):
        return {}
    return {
        "conversations_by_mode": {"whole": audit["conversations/whole"], "each_turn": audit["conversations/each_turn"]},
        "each_turn_sequences": audit["sequences/each_turn"],
        "each_turn_repeated_prompt_chars": audit["repeated_chars/each_turn"],
    }


_STOPS: dict[int, tuple] = {}


def stop_ids(tok) -> frozenset:
    """The ids of spans.stop_tokens, once per tokenizer (and process): they read the base's
    generation_config.json, which the audit of every chunk would read again."""
    if id(tok) not in _STOPS:
        _STOPS[id(tok)] = (tok, frozenset(tok.convert_tokens_to_ids(list(stop_tokens(tok)))))  # the tokenizer kept
    return _STOPS[id(tok)][1]
