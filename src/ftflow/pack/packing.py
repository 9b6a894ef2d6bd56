"""Sequences -> fixed-length rows: the overflow policy (truncate, split, drop) at max_length,
best-fit-decreasing bins of whole sequences, written shard by shard so memory stays bounded;
the workers that encode chunks in parallel."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from bisect import bisect_left, insort
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from ftflow.config.schema import Pack
from ftflow.disk import room_for
from ftflow.errors import PackError
from ftflow.pack.encode import IGNORE_INDEX, Encoded, audit_figures, encode_piece
from ftflow.pack.io import data_kind, parquet_file, pieces, save_rows
from ftflow.pack.pairs import pair_rows
from ftflow.parallel import ordered_map


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
        with room_for(f"pack {parquet.stem}", [out], needed=lambda written: max(written, table.nbytes)):
            save_rows(table, out)
        return stats
    if cfg.overflow == "auto":
        cfg = cfg.model_copy(update={"overflow": "split" if kind == "text" else "truncate"})
    shards = ShardWriter(out, cfg.max_length)
    counts: dict = {"overflow": cfg.overflow}
    num_proc = cfg.num_proc or len(os.sched_getaffinity(0))
    total = parquet_file(parquet).metadata.num_rows

    def needed(written: int) -> int:  # what was written, scaled up to all conversations
        return written * total // max(shards.stats["conversations"], 1)

    with room_for(f"pack {parquet.stem}", [out, shards.tmp], needed):
        with tqdm(total=total, desc=f"pack {parquet.stem}", unit="conversations") as bar:
            for enc in encoded_chunks(parquet, kind, tok, cfg, num_proc):
                shards.add(enc, fit(enc, cfg, counts), cfg.strategy)
                bar.update(enc.records)
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
        self.stats["conversations"] += enc.records
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
