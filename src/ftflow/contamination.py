"""Contamination: which evaluation examples also occur in the training data.

A score on examples the model was trained on measures memory, not skill; it is the most common
reason a fine-tuning result looks better than it is. evaluate checks every task it scores whose
examples it can read (the holdout task, task YAMLs on local files, built-in tasks on the data
download fetched) against the training split as normalize wrote it, the way GPT-3's and
open-instruct's decontamination do, on words (lowercased, punctuation and spacing ignored):

- exact: the example's whole text occurs in a training record (a copy, possibly inside a longer one)
- ngram: the example shares a run of eval.contamination.ngram (13) words with a training record
  (an example shorter than that: its whole text is the run), which includes every exact one

It scales with the training data: the examples' runs (a few hundred thousand) are hashed once;
the training text is read a row group at a time, split into words and mapped onto the examples'
vocabulary by Arrow (a word no example has can sit in no shared run), and its runs are hashed
and looked up with numpy, so Python only sees the rare hits (each one then checked word by word).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

WORD_SEPARATORS = r"[^\pL\pN]+"  # a word: letters and digits of any script
_P = np.uint64(0x100000001B3)  # the rolling hash's multiplier (FNV's prime; wraps mod 2^64)
_BOOKKEEPING = ("id", "source", "tools")  # columns of a normalized file that are not its text
MAX_IDS = 20  # training record ids listed per example (the count is always whole)
BATCH = 65536  # training records split and hashed together


def words(texts: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Every word of every text, lowercased, and the index of the text it came from."""
    split = pc.split_pattern_regex(pc.utf8_lower(pc.fill_null(texts, "")), WORD_SEPARATORS)
    flat, parent = pc.list_flatten(split), pc.list_parent_indices(split)
    keep = pc.greater(pc.utf8_length(flat), 0)
    return flat.filter(keep), parent.filter(keep).to_numpy(zero_copy_only=False)


def runs(ids: np.ndarray, parent: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(hash, start) of every run of m words that lies within one text and has no unknown word
    (id -1): a polynomial hash of the ids, the same here and for the examples."""
    n = len(ids) - m + 1
    if n <= 0:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    unknown = np.concatenate([[0], np.cumsum(ids < 0)])
    ok = (unknown[m : m + n] == unknown[:n]) & (parent[:n] == parent[m - 1 : m - 1 + n])
    h = np.zeros(n, np.uint64)
    with np.errstate(over="ignore"):
        for k in range(m):
            h = h * _P + (ids[k : k + n].astype(np.uint64) + np.uint64(1))
    start = np.nonzero(ok)[0]
    return h[start], start


@dataclass
class Examples:
    """The evaluation examples, as word ids over their own vocabulary, and their runs."""

    tasks: list[str]  # per example: its task
    ids: list[np.ndarray]  # per example: its words' ids
    vocab: pa.Array
    ngram: int
    runs: dict[int, tuple[np.ndarray, list[list[int]]]] = field(default_factory=dict)  # m -> (sorted hashes, owners)

    @classmethod
    def of(cls, texts: dict[str, list[str]], ngram: int) -> Examples:
        tasks = [task for task, items in texts.items() for _ in items]
        flat, parent = words(pa.array([t for items in texts.values() for t in items], pa.large_string()))
        vocab = pc.unique(flat)
        all_ids = pc.index_in(flat, value_set=vocab).to_numpy(zero_copy_only=False).astype(np.int64)
        bounds = np.searchsorted(parent, np.arange(len(tasks) + 1))
        ids = [all_ids[bounds[i] : bounds[i + 1]] for i in range(len(tasks))]
        self = cls(tasks, ids, vocab, ngram)
        owners: dict[int, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
        for i, x in enumerate(ids):
            m = min(ngram, len(x))
            if m == 0:
                continue
            for h in np.unique(runs(x, np.zeros(len(x), np.int64), m)[0]):
                owners[m][int(h)].append(i)
        for m, by_hash in owners.items():
            keys = np.array(sorted(by_hash), np.uint64)
            self.runs[m] = (keys, [by_hash[int(k)] for k in keys])
        return self


def record_texts(table: pa.Table) -> pa.Array:
    """Each normalized record's text: its messages' contents (and reasoning) and its text fields."""
    parts = []
    for name in table.column_names:
        if name in _BOOKKEEPING:
            continue
        col = table.column(name).combine_chunks()
        if pa.types.is_list(col.type) and pa.types.is_struct(col.type.value_type):
            for key in ("content", "reasoning"):
                values = pc.fill_null(pc.struct_field(col.values, key), "")
                parts.append(pc.binary_join(pa.ListArray.from_arrays(col.offsets, values), " "))
        elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            parts.append(pc.fill_null(col, ""))
    text = parts[0] if parts else pa.array([""] * table.num_rows)
    for part in parts[1:]:
        text = pc.binary_join_element_wise(text, part, " ")
    return text


@dataclass
class Found:
    exact: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))  # example -> record ids
    ngram: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))


def scan(train: Path, ex: Examples, found: Found) -> int:
    """Look for the examples' runs in every training record; returns the records read."""
    records = 0
    for batch in pq.ParquetFile(train).iter_batches(batch_size=BATCH):
        table = pa.Table.from_batches([batch])
        records += table.num_rows
        flat, parent = words(record_texts(table))
        ids = pc.fill_null(pc.index_in(flat, value_set=ex.vocab), -1).to_numpy(zero_copy_only=False).astype(np.int64)
        pairs = set()
        for m, (keys, owners) in ex.runs.items():
            h, start = runs(ids, parent, m)
            at = np.minimum(np.searchsorted(keys, h), len(keys) - 1)
            for j in np.nonzero(keys[at] == h)[0]:
                pairs.update((e, int(parent[start[j]])) for e in owners[at[j]])
        bounds = np.searchsorted(parent, np.arange(table.num_rows + 1))
        record_ids = table.column("id")
        for e, r in sorted(pairs):
            text = ids[bounds[r] : bounds[r + 1]]
            if not shares_run(ex.ids[e], text, min(ex.ngram, len(ex.ids[e]))):
                continue  # a hash collision
            rid = record_ids[r].as_py()
            found.ngram[e].append(rid)
            if contains(text, ex.ids[e]):
                found.exact[e].append(rid)
    return records


def shares_run(a: np.ndarray, b: np.ndarray, m: int) -> bool:
    grams = {a[i : i + m].tobytes() for i in range(len(a) - m + 1)}
    return any(b[i : i + m].tobytes() in grams for i in range(len(b) - m + 1))


def contains(text: np.ndarray, part: np.ndarray) -> bool:
    """Whether the word ids `part` occur in `text` as a contiguous run."""
    hay, needle, width = text.tobytes(), part.tobytes(), text.itemsize
    at = hay.find(needle)
    while at >= 0 and at % width:
        at = hay.find(needle, at + 1)
    return at >= 0


def check(texts: dict[str, list[str]], train: Path, ngram: int, flag_above: float,
          ids: dict[str, list] | None = None) -> tuple[dict, list[dict]]:  # fmt: skip
    """({summary per task}, [one line per example found in the training data]); `ids`: each
    task's example ids (the holdout task's record ids, an lm-eval task's doc ids), for the lines."""
    texts = {task: items for task, items in texts.items() if items}
    summary = {"ngram": ngram, "flag_above": flag_above, "train": str(train), "tasks": {}}
    if not texts:
        return summary, []
    ex, found = Examples.of(texts, ngram), Found()
    summary["train_records"] = scan(train, ex, found)
    lines, start = [], 0
    for task, items in texts.items():
        index = range(start, start + len(items))
        hit = [e for e in index if found.ngram.get(e)]
        share = len(hit) / len(items)
        summary["tasks"][task] = {"examples": len(items), "exact": sum(bool(found.exact.get(e)) for e in index),
                                  "ngram": len(hit), "share": share, "flagged": share > flag_above}  # fmt: skip
        for e in hit:
            example = (ids or {}).get(task, range(len(items)))[e - start]
            lines.append({"task": task, "example": example, "exact": len(found.exact.get(e, [])),
                          "ngram": len(found.ngram[e]), "exact_ids": found.exact.get(e, [])[:MAX_IDS],
                          "ngram_ids": found.ngram[e][:MAX_IDS]})  # fmt: skip
        start += len(items)
    return summary, lines
