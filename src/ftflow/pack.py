"""pack: conversations -> chat template -> token ids + loss masks -> packed rows.

The tokenizer is the base model's, or (tokenizer.source=train, for scratch models) a byte-level
BPE trained here on the rendered training conversations. The template is the tokenizer's own
(template=model) or one shipped in ftflow/templates/ (chatml, llama3).

Tokens are exactly what `tokenizer.apply_chat_template(messages, tools=..., tokenize=True)`
gives, and the loss mask exactly its `return_assistant_tokens_mask` (the template's
{% generation %} spans), computed the same way (transformers' renderer, then the fast
tokenizer on the rendered text) but for many conversations at once: one Rust batch encode per
chunk, and the token/span overlap done with numpy on the whole chunk instead of a Python loop
per token. Rows are best-fit-decreasing bins of whole sequences (or one sequence per row with
pack.strategy=none); each row keeps `seq_lengths`, from which the collator rebuilds
per-sequence position ids, so attention never crosses a sequence boundary.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import shutil
from bisect import bisect_left, insort
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ftflow import paths
from ftflow.config import write_stage_config
from ftflow.errors import StageError
from ftflow.parallel import ordered_map
from ftflow.paths import PACKED_SPLITS
from ftflow.schema import Model, Pack, Template, Tokenizer
from ftflow.spans import Renderer, Span, end_tokens, renderer, trained_messages

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value that the loss skips
PAD_TOKEN = "<|endoftext|>"
CHUNK = 1024  # conversations rendered and encoded together (a unit of work for a worker)


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


class PackError(StageError):
    pass


def template_text(name: str) -> str:
    return files("ftflow").joinpath("templates", TEMPLATES[name].file).read_text()


# --- reading normalize's output -------------------------------------------------------------


def _template_message(m: dict) -> dict:
    """A normalized message as chat-template input: unset fields left out, tool calls in the
    {"type": "function", "function": {...}} form that chat templates expect."""
    out = {k: v for k, v in m.items() if v is not None}
    if "reasoning" in out:  # the key templates read: most reasoning_content, gpt-oss thinking
        out["reasoning_content"] = out["thinking"] = out.pop("reasoning")
    if "tool_calls" in out:
        out["tool_calls"] = [
            {**({"id": c["id"]} if c.get("id") is not None else {}),
             "type": "function", "function": {"name": c["name"], "arguments": json.loads(c["arguments"])}}
            for c in out["tool_calls"]
        ]  # fmt: skip
    return out


def data_kind(parquet: Path) -> str:
    """Which normalized kind a file holds, from its (fixed) schema."""
    names = set(pq.ParquetFile(parquet).schema_arrow.names)
    for kind, column in (("conversation", "messages"), ("preference", "chosen"), ("unpaired", "label"),
                         ("prompt", "answer"), ("text", "text")):  # fmt: skip
        if column in names:
            return kind
    raise PackError(f"{parquet}: not a normalized file (columns {sorted(names)})")


def read_chunks(parquet: Path, size: int = CHUNK):
    """(conversations, tools) in chunks of at most `size`, from a normalized conversation file."""
    for piece in pieces(parquet, size):
        yield read_piece(parquet, piece)


def pieces(parquet: Path, size: int = CHUNK) -> list[tuple[int, int, int]]:
    """(row group, first row, end row) slices of at most `size` rows: units of work that a
    worker reads itself (normalize writes row groups of ROW_GROUP rows, so usually whole ones)."""
    meta = parquet_file(parquet).metadata
    out = []
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        out += [(g, a, min(a + size, n)) for a in range(0, n, size)]
    return out


def parquet_file(path: Path) -> pq.ParquetFile:
    """Opened once per process and file version: the footer of a file with many row groups is
    costly to parse, and every piece would parse it again."""
    st = Path(path).stat()
    return _open_parquet(str(path), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=4)
def _open_parquet(path: str, mtime_ns: int, size: int) -> pq.ParquetFile:
    return pq.ParquetFile(path)


def piece_table(parquet: Path, piece: tuple[int, int, int], columns: list[str] | None) -> pa.Table:
    group, start, end = piece
    table = parquet_file(parquet).read_row_group(group, columns=columns)
    return table if (start, end) == (0, table.num_rows) else table.slice(start, end - start)


def read_piece(parquet: Path, piece: tuple[int, int, int]) -> tuple[list, list]:
    """A piece of a conversation file as chat-template input: (conversations, tools)."""
    table = piece_table(parquet, piece, ["messages", "tools"])
    return messages_of(table.column("messages")), tools_of(table)


def messages_of(column) -> list[list[dict]]:
    return [[_template_message(m) for m in row] for row in column.to_pylist()]


def tools_of(table: pa.Table) -> list:
    return [json.loads(t) if t else None for t in table.column("tools").to_pylist()]


def conversations(parquet: Path) -> list[list[dict]]:
    return [c for convs, _ in read_chunks(parquet) for c in convs]


# --- tokenizer ------------------------------------------------------------------------------


def train_tokenizer(
    texts: Iterable[str], cfg: Tokenizer, eos_token: str, markers=("<|im_start|>",)
) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style: no unknown tokens) trained on the rendered conversations."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    specials = list(dict.fromkeys([PAD_TOKEN, *markers, eos_token]))
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(map(cut_long_runs, texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=eos_token, pad_token=PAD_TOKEN)


LONG_RUN = re.compile(r"\S{256}")


def cut_long_runs(text: str) -> str:
    """The text as the tokenizer trainer sees it: a space after every 256 characters of an
    unbroken run. BPE training costs grow with the square of a word's length (a 200,000-character
    run took 17 s, a 1M one minutes); merges are learnt from words far shorter than 256."""
    return LONG_RUN.sub(r"\g<0> ", text) if len(text) > 256 else text


def render(convs: list[list[dict]], template: str, tools: list | None = None, **tokens) -> list[str]:
    """Rendered text, before a tokenizer exists (to train one): a shipped template's Python
    twin when there is one, else transformers' Jinja renderer."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from ftflow import templates

    tools = tools or [None] * len(convs)
    twin = next((fn for name, fn in templates.FAST.items() if template == template_text(name)), None)
    if twin is not None:
        return [twin(c, t, tokens.get("bos_token", ""))[0] for c, t in zip(convs, tools)]
    return [render_jinja_template(conversations=[c], tools=t, chat_template=template, **tokens)[0][0]
            for c, t in zip(convs, tools)]  # fmt: skip


def training_texts(parquet: Path, template: str, bos: str) -> Iterator[str]:
    """What a tokenizer trained for this data should see, piece by piece (memory stays bounded):
    the rendered conversations (for preference and prompt data, the prompt and its first
    completion), or the raw text."""
    kind = data_kind(parquet)
    first = {"preference": "chosen", "unpaired": "completion"}.get(kind)
    for piece in pieces(parquet):
        if kind == "text":
            yield from piece_table(parquet, piece, ["text"]).column("text").to_pylist()
            continue
        table = piece_table(parquet, piece, None)
        if kind == "conversation":
            convs = messages_of(table.column("messages"))
        else:
            convs = messages_of(table.column("prompt"))
            if first:
                convs = [p + c for p, c in zip(convs, messages_of(table.column(first)))]
        yield from render(convs, template, tools_of(table), bos_token=bos)


def build_tokenizer(model: Model, tok_cfg: Tokenizer, tpl: Template, parquet: Path, root: Path):
    """The tokenizer every later stage uses, with the chat template set on it."""
    named = TEMPLATES.get(tpl.name)
    if tok_cfg.source == "train":
        texts = training_texts(parquet, template_text(tpl.name), named.bos or "")
        log.info("Training a byte-level BPE tokenizer <vocab_size=%d> on the training split", tok_cfg.vocab_size)
        tok = train_tokenizer(texts, tok_cfg, tpl.eos_token, named.markers)
    else:
        src = root / paths.base_model_dir(model.model_dump())
        log.info("Loading the tokenizer of <%s>", src)
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=model.trust_remote_code)
    if named is not None:
        tok.chat_template = template_text(tpl.name)
        missing = [t for t in named.markers if t not in tok.get_vocab()]
        if missing:  # the base vocabulary lacks the template's markers; train resizes the embeddings
            tok.add_special_tokens({"additional_special_tokens": missing})
        if named.bos:
            tok.bos_token = named.bos
        tok.eos_token = tpl.eos_token
    else:  # the model's own template, unchanged: its spans are found and verified (spans.py)
        log.info("Chat template of <%s>: trained spans by %s", tok.name_or_path, span_method(tok))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# --- tokens and masks -----------------------------------------------------------------------


@dataclass
class Encoded:
    """A chunk of conversations as flat token arrays: conversation i is [starts[i], +lengths[i])."""

    ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE_INDEX where not trained
    lengths: np.ndarray  # int64
    audit: Counter = field(default_factory=Counter)  # the masking audit's counts (see mask_audit)


def encode(convs: list[list[dict]], tools: list, tok, train_on: str = "assistant", first: int = 0,
           name: str = "the data") -> Encoded:  # fmt: skip
    """What apply_chat_template(conv, tools=..., tokenize=True) gives for each conversation, as
    flat arrays, with the loss on the spans that `train_on` picks (assistant turns, the last of
    them, or every token); `first` and `name` say where the chunk comes from, for errors."""
    texts, spans = render_with_spans(convs, tools, tok, train_on, first, name)
    encodings = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    per_text = [np.array(e.ids, np.int32) for e in encodings]
    lengths = np.fromiter(map(len, per_text), np.int64, len(per_text))
    ids = np.concatenate(per_text) if per_text else np.zeros(0, np.int32)
    if train_on == "all":
        audit = Counter({"trained_tokens/all": len(ids)}) + reasoning_audit(convs, texts)
        return Encoded(ids, ids.copy(), lengths, audit)
    offsets = token_offsets(encodings, texts, lengths)
    mask = overlap_mask(offsets, texts, [[(s.start, s.end) for s in conv] for conv in spans])
    audit = mask_audit(offsets, texts, spans, ids, tok, first, name) + reasoning_audit(convs, texts)
    return Encoded(ids, np.where(mask, ids, IGNORE_INDEX).astype(np.int32), lengths, audit)


def reasoning_audit(convs: list[list[dict]], texts: list[str]) -> Counter:
    """Messages that carry reasoning, and those whose reasoning the template left out of the
    text (ftflow's ChatML and Llama 3 have no place for it; models' own templates often drop it
    from turns before the last user message): that reasoning is not trained."""
    out: Counter = Counter()
    for conv, text in zip(convs, texts):
        for m in conv:
            reasoning = m.get("reasoning_content")
            if reasoning:
                out["reasoning/messages"] += 1
                out["reasoning/not_rendered"] += reasoning not in text
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
    from ftflow import templates

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


def mask_audit(offsets: np.ndarray, texts: list[str], spans: list[list[Span]], ids: np.ndarray, tok, first: int,
               name: str) -> Counter:  # fmt: skip
    """Counts for pack's masking audit: trained tokens per role, trained turns, and those whose
    last trained token is an end-of-turn (special) token. A trained turn that does not end on
    one would teach the model never to stop: that fails the stage, naming the conversation."""
    audit = Counter()
    for role in {s.role for conv in spans for s in conv}:
        only = [[(s.start, s.end) for s in conv if s.role == role] for conv in spans]
        audit[f"trained_tokens/{role}"] += int(overlap_mask(offsets, texts, only).sum())
    special = special_ids(tok)
    token_ends = offsets[:, 1]
    for k, (start, conv) in enumerate(zip(text_starts(texts), spans)):
        for s in conv:
            last = int(np.searchsorted(token_ends, start + s.end, side="left"))
            if last == len(ids) or token_ends[last] != start + s.end or int(ids[last]) not in special:
                raise PackError(f"conversation {first + k} of {name}: the trained {s.role} turn "
                                f"{texts[k][s.start:s.end][-60:]!r} does not end on an end-of-turn token")  # fmt: skip
            audit["trained_turns"] += 1
            audit[f"trained_turns/{s.role}"] += 1
    audit["conversations_without_trained_token"] += sum(not conv for conv in spans)
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
    }


LOST_TOKENS_WARNING = 0.05  # share of a split's tokens cut off by the overflow policy


def warn_lost_tokens(split: str, stats: dict, max_length: int) -> None:
    lost = stats.get("tokens_lost_to_overflow", 0)
    before = stats.get("tokens", 0) + lost
    if before and lost / before > LOST_TOKENS_WARNING:
        log.warning("%s: pack.overflow=%s threw away %d of %d tokens (%.0f%%; %d of them trained) in %d sequences "
                    "over max_length=%s: raise max_length or set pack.overflow=split", split, stats["overflow"],
                    lost, before, 100 * lost / before, stats.get("trained_tokens_lost_to_overflow", 0),
                    stats.get("over_max_length", 0), max_length)  # fmt: skip


def warn_unrendered_reasoning(split: str, audit: dict, template: str) -> None:
    left_out = audit.get("reasoning_not_in_rendered_text", 0)
    if left_out:
        log.warning("%s: the chat template (%s) leaves out the reasoning of %d of the %d messages that carry "
                    "some: it is not trained (stats.json mask_audit; template=model for a model whose template "
                    "renders reasoning)", split, template, left_out, audit["messages_with_reasoning"])  # fmt: skip


def special_ids(tok) -> frozenset:
    return frozenset(tok.convert_tokens_to_ids(list(end_tokens(tok))))


# --- sequences: overflow policy -------------------------------------------------------------


@dataclass
class Sequences:
    """Views into flat token arrays: sequence k is [starts[k], starts[k] + lengths[k])."""

    starts: np.ndarray
    lengths: np.ndarray


def fit(enc: Encoded, cfg: Pack, counts: dict) -> Sequences:
    """Apply pack.overflow to sequences longer than max_length (drop, truncate keeping the start,
    or split into max_length pieces), then drop sequences with no trained token; all counted."""
    starts = np.concatenate([[0], np.cumsum(enc.lengths)[:-1]]).astype(np.int64)
    lengths, cap = enc.lengths, cfg.max_length
    over = lengths > cap
    counts["over_max_length"] = counts.get("over_max_length", 0) + int(over.sum())
    if cfg.overflow != "split":  # what truncate cuts off, or drop throws away: tokens, and trained ones
        kept = np.minimum(lengths, cap) if cfg.overflow == "truncate" else np.where(over, 0, lengths)
        lost, trained_lost = lengths - kept, trained_tokens(enc.labels, starts + kept, lengths - kept)
        counts["tokens_lost_to_overflow"] = counts.get("tokens_lost_to_overflow", 0) + int(lost.sum())
        counts["trained_tokens_lost_to_overflow"] = counts.get("trained_tokens_lost_to_overflow", 0) + int(
            trained_lost.sum()
        )
    if cfg.overflow == "drop":
        starts, lengths = starts[~over], lengths[~over]
        counts["dropped_too_long"] = counts.get("dropped_too_long", 0) + int(over.sum())
    elif cfg.overflow == "truncate":
        lengths = np.minimum(lengths, cap)
    else:  # split: pieces of cap tokens, the last one shorter
        pieces = -(-lengths // cap)
        first = np.repeat(starts, pieces)
        k = np.arange(len(first)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        starts = first + k * cap
        lengths = np.minimum(np.repeat(lengths, pieces) - k * cap, cap)
    keep = trained_tokens(enc.labels, starts, lengths) > 0
    counts["dropped_no_target"] = counts.get("dropped_no_target", 0) + int((~keep).sum())
    return Sequences(starts[keep], lengths[keep])


def trained_tokens(labels: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """How many trained tokens each sequence [start, start + length) holds."""
    so_far = np.concatenate([[0], np.cumsum(labels != IGNORE_INDEX)])
    return so_far[starts + lengths] - so_far[starts]


# --- packing --------------------------------------------------------------------------------


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins of sequence indices, each summing to at most `capacity`: longest first, each into the
    fullest bin it fits in. Deterministic (stable sort; ties go to the lower bin index)."""
    order = np.argsort(-lengths, kind="stable")
    smallest = int(lengths.min()) if len(lengths) else 0
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted; only bins that can still take one
    for i in order.tolist():
        n = int(lengths[i])
        k = bisect_left(free, (n, -1))
        if k == len(free):
            bins.append([i])
            room, b = capacity - n, len(bins) - 1
        else:
            room, b = free.pop(k)
            bins[b].append(i)
            room -= n
        if room >= smallest:
            insort(free, (room, b))
    return bins


def rows_table(ids: np.ndarray, labels: np.ndarray, seqs: Sequences, bins: list[list[int]]) -> pa.Table:
    """Rows of concatenated sequences (input_ids, labels, seq_lengths), gathered with one index."""
    order = np.fromiter((i for b in bins for i in b), np.int64, sum(map(len, bins)))
    lens = seqs.lengths[order]
    out_start = np.cumsum(lens) - lens
    gather = np.repeat(seqs.starts[order] - out_start, lens) + np.arange(int(lens.sum()))
    per_row = np.fromiter((len(b) for b in bins), np.int64, len(bins))
    seq_offsets = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32)
    tok_offsets = np.concatenate([[0], np.cumsum(lens)])[seq_offsets].astype(np.int32)
    column = lambda values, offsets: pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))  # noqa: E731
    return pa.table({
        "input_ids": column(ids[gather], tok_offsets),
        "labels": column(labels[gather], tok_offsets),
        "seq_lengths": column(lens.astype(np.int32), seq_offsets),
    })  # fmt: skip


_WORKER: dict = {}


def _init_worker(tok, train_on: str) -> None:
    # the pool is the parallelism: one tokenizer thread per worker
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER.update(tok=tok, train_on=train_on)


def _encode_in_worker(task: tuple[Path, tuple[int, int, int], str]) -> Encoded:
    return encode_piece(*task, _WORKER["tok"], _WORKER["train_on"])


def encoded_chunks(parquet: Path, kind: str, tok, cfg: Pack, num_proc: int):
    """Encoded chunks in order: here, or by worker processes that load the saved tokenizer
    (rendering is Python, so the template work only scales with processes)."""
    work = pieces(parquet)
    if num_proc == 1 or len(work) < 2:
        yield from (encode_piece(parquet, p, kind, tok, cfg.train_on) for p in work)
        return
    # fork: workers start in milliseconds with the tokenizer already loaded (as datasets.map
    # with num_proc does); the tokenizers library turns its own threads off in forked children
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(num_proc, mp_context=ctx, initializer=_init_worker,
                             initargs=(tok, cfg.train_on)) as pool:  # fmt: skip
        yield from ordered_map(pool, _encode_in_worker, ((parquet, p, kind) for p in work), 2 * num_proc)


def pack_split(parquet: Path, tok, cfg: Pack, out: Path) -> dict:
    """Conversations or raw text -> packed rows; preference and prompt data -> their own rows.
    Writes the split's dataset to `out` and returns its stats ({} when no source feeds it)."""
    kind = data_kind(parquet)
    if kind not in ("conversation", "text"):
        table, stats = pair_rows(parquet, kind, tok, cfg)
        save_rows(table, out)
        return stats
    if cfg.overflow == "auto":
        cfg = cfg.model_copy(update={"overflow": "split" if kind == "text" else "truncate"})
    shards = ShardWriter(out, cfg.max_length)
    counts: dict = {"overflow": cfg.overflow}
    num_proc = cfg.num_proc or len(os.sched_getaffinity(0))
    total = parquet_file(parquet).metadata.num_rows
    with tqdm(total=total, desc=f"pack {parquet.stem}", unit="conversations") as bar:
        for enc in encoded_chunks(parquet, kind, tok, cfg, num_proc):
            shards.add(enc, fit(enc, cfg, counts), cfg.strategy)
            bar.update(len(enc.lengths))
    return shards.close(cfg.strategy, counts)


SHARD_TOKENS = 1 << 26  # tokens packed at a time (~1 GB of working memory), whatever the data's size


class ShardWriter:
    """Packed rows, written shard by shard: each shard holds the sequences of consecutive chunks
    up to SHARD_TOKENS and is packed on its own, so memory stays bounded for any number of
    records (packing efficiency barely changes: bins are nearly full long before a shard ends).
    The shards become one dataset at the end."""

    def __init__(self, out: Path, max_length: int):
        self.out, self.max_length = out, max_length
        self.tmp = out.with_name(out.name + ".shards")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.pending: list[tuple[Encoded, Sequences]] = []
        self.shards: list[Path] = []
        self.audit: Counter = Counter()
        self.stats = {"conversations": 0, "sequences": 0, "rows": 0, "tokens": 0, "trained_tokens": 0}

    def add(self, enc: Encoded, seqs: Sequences, strategy: str) -> None:
        self.stats["conversations"] += len(enc.lengths)
        self.audit.update(enc.audit)
        self.pending.append((enc, seqs))
        if sum(len(e.ids) for e, _ in self.pending) >= SHARD_TOKENS:
            self.flush(strategy)

    def flush(self, strategy: str) -> None:
        if not self.pending:
            return
        offsets = np.cumsum([0] + [len(e.ids) for e, _ in self.pending[:-1]])
        ids = np.concatenate([e.ids for e, _ in self.pending])
        labels = np.concatenate([e.labels for e, _ in self.pending])
        seqs = Sequences(np.concatenate([s.starts + o for (_, s), o in zip(self.pending, offsets)]),
                         np.concatenate([s.lengths for _, s in self.pending]))  # fmt: skip
        self.pending = []
        if not len(seqs.lengths):
            return
        if strategy == "bfd":
            bins = best_fit_decreasing(seqs.lengths, self.max_length)
        else:  # one sequence per row, padded by the collator
            bins = [[i] for i in range(len(seqs.lengths))]
        shard = self.tmp / f"{len(self.shards):05d}"
        save_rows(rows_table(ids, labels, seqs, bins), shard)
        self.shards.append(shard)
        self.stats["sequences"] += len(seqs.lengths)
        self.stats["rows"] += len(bins)
        self.stats["tokens"] += int(seqs.lengths.sum())
        self.stats["trained_tokens"] += int(trained_tokens(labels, seqs.starts, seqs.lengths).sum())

    def close(self, strategy: str, counts: dict) -> dict:
        import datasets

        self.flush(strategy)
        if not self.stats["conversations"]:  # no source feeds this split: an empty dataset
            empty = np.zeros(0, np.int32)
            save_rows(rows_table(empty, empty, Sequences(empty.astype(np.int64), empty.astype(np.int64)), []), self.out)
            return {}
        if not self.shards:
            raise PackError(f"no sequence left after tokenization ({json.dumps(counts)}); raise pack.max_length")
        shutil.rmtree(self.out, ignore_errors=True)
        if len(self.shards) == 1:
            os.replace(self.shards[0], self.out)
        else:  # memory-mapped shards, rewritten as one dataset
            parts = [datasets.load_from_disk(str(s)) for s in self.shards]
            datasets.concatenate_datasets(parts).save_to_disk(str(self.out))
        shutil.rmtree(self.tmp, ignore_errors=True)
        # non-pad share of the token slots the trainer will see
        efficiency = round(self.stats["tokens"] / (self.stats["rows"] * self.max_length), 4)
        return {**self.stats, "packing_efficiency": efficiency, **counts, "mask_audit": audit_figures(self.audit)}


# --- preference, unpaired and prompt data: tokenized, not packed -----------------------------

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


def save_rows(table: pa.Table, out: Path) -> None:
    import datasets

    datasets.Dataset(datasets.table.InMemoryTable(table)).save_to_disk(str(out))


def pack(cfg: dict, root: Path = Path(".")) -> dict:
    """Run the stage; `cfg` is the stage's params (model, tokenizer, template, pack)."""
    model, tok_cfg = Model.model_validate(cfg["model"]), Tokenizer.model_validate(cfg["tokenizer"])
    tpl, pack_cfg = Template.model_validate(cfg["template"]), Pack.model_validate(cfg["pack"])
    in_dir, out_dir = root / paths.NORMALIZE, root / paths.PACK
    tok = build_tokenizer(model, tok_cfg, tpl, in_dir / "train.parquet", root)
    tok.save_pretrained(out_dir / "tokenizer")
    # how the loss masks were made (the audit per split counts what they trained, before max_length)
    masks = {"method": span_method(tok), "train_on": pack_cfg.train_on, "template_of": str(tok.name_or_path)}
    stats = {"vocab_size": len(tok), "max_length": pack_cfg.max_length, "masks": masks, "splits": {}}
    for split in PACKED_SPLITS:
        log.info("Tokenizing and packing <%s>", split)
        # written even with no rows: the stage's outputs are fixed
        split_stats = pack_split(in_dir / f"{split}.parquet", tok, pack_cfg, out_dir / split)
        if split_stats:
            stats["splits"][split] = split_stats
            log.info("Packed %s: %s", split, json.dumps(split_stats))
            warn_unrendered_reasoning(split, split_stats.get("mask_audit") or {}, masks["template_of"])
            warn_lost_tokens(split, split_stats, pack_cfg.max_length)
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2))
    write_stage_config(cfg, out_dir)
    return stats
