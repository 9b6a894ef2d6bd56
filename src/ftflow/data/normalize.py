"""normalize: raw records of every source -> normalized records of one kind, a Parquet file per split.

Per source: read its files (formats.py), map columns, apply the reader, validate (messages.py),
add the system prompt, filter by length, drop exact duplicates, shuffle / limit, and apply the
mixture weight. Records in = records out + dropped, always: a bad record either stops the
stage with the source, the record's locator, the reader and the reason (on_error=raise), or is
counted per reason in stats.json (on_error=skip). Filters (length, duplicates, weight) drop and
count in both modes: they are what the user asked for, not errors.

The Parquet files have a fixed schema per kind and are byte-identical for the same inputs and
config; their sha256 is recorded in stats.json.
"""

from __future__ import annotations

import gc
import json
import logging
import multiprocessing
import os
import random
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from hashlib import blake2b
from itertools import chain, islice
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from ftflow import integrity, paths
from ftflow.config.params import write_stage_config
from ftflow.config.schema import Data, Source, StageConfig
from ftflow.data import carve, trees
from ftflow.data.formats import (
    FileFormatError,
    Item,
    Span,
    data_files,
    hub_data_files,
    is_blank,
    is_saved_dataset,
    iter_file,
    jsonl_spans,
    parse_json_line,
    saved_dataset_records,
)
from ftflow.data.messages import MESSAGE_FIELDS, RecordError, canonical, content_chars, schemas, to_table, validate
from ftflow.data.readers import READERS, READERS_DIR, check_media, check_tools, get_reader, read_columns
from ftflow.errors import StageError
from ftflow.hashing import file_sha256
from ftflow.parallel import ordered_map
from ftflow.paths import SPLITS

log = logging.getLogger(__name__)

# Every split is written, empty when no source feeds it: the stage's outputs do not depend on the
# config, so the Snakemake rule and its DVC stage have one fixed shape.


class NormalizeError(StageError):
    pass


def source_parts(source: Source, raw: Path, max_bytes: int) -> Iterator[tuple[str, Path | None, Iterator[Item]]]:
    """(label, file, records) for each part of a downloaded source, in a stable order."""
    if is_saved_dataset(raw):
        yield raw.name, None, saved_dataset_records(raw, source.from_split)
        return
    if source.hub or source.subset or source.from_split:
        files = hub_data_files(raw, source.subset, source.from_split)
    else:
        files = data_files(raw)
    top = raw.resolve()
    for f in files:
        label = f.resolve().relative_to(top).as_posix() if top in f.resolve().parents else f.name
        yield label, f, iter_file(f, max_bytes, source.sample_by, label)


BATCH = 2048  # records per unit of work handed to a worker process (a Span is one unit too)


@dataclass
class Batch:
    """What a worker made of a batch of raw records."""

    table: pa.Table  # the kept rows, in input order
    keys: list[bytes] | None  # their content digests, for duplicate removal (None: dedup off)
    dropped: Counter
    read: int
    error: tuple[str, RecordError] | None  # on_error=raise: the first bad record
    unread: Counter = field(default_factory=Counter)  # {column the reader does not read: records with content}


class RecordMaker:
    """Raw records of one source -> rows: parse, map columns, read, validate, filter.

    Runs in normalize's worker processes: it pickles as its config and reloads the reader
    (which may be user code from a file) on the other side."""

    def __init__(self, source: Source, data: Data, root: Path):
        self.source, self.kind, self.on_error = source, data.kind, data.on_error
        self.max_chars = int(data.max_record_mb * 1e6)
        self.readers_dir = root / READERS_DIR
        self.builtin = source.reader in READERS  # a user reader decides about media and tools itself
        self.read_columns = read_columns(source.reader, source.columns)
        self.unread: Counter = Counter()
        try:
            self.reader = get_reader(source.reader, self.readers_dir)
        except ValueError as err:
            raise NormalizeError(f"source {source.name!r}: {err}") from None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "reader"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.reader = get_reader(self.source.reader, self.readers_dir)

    def make(self, payload) -> tuple[dict, int]:
        """One validated record and its length in characters; RecordError says why not."""
        if isinstance(payload, RecordError):
            raise payload
        raw = parse_json_line(payload) if isinstance(payload, bytes) else payload
        if not isinstance(raw, dict):
            raise RecordError("not_an_object", f"record is a {type(raw).__name__}, not an object")
        if self.read_columns is not None:
            self.unread.update(k for k, v in raw.items() if k not in self.read_columns and v not in EMPTY_VALUES)
        if self.source.columns:  # reader field <- source column
            raw = mapped_columns(raw, self.source.columns)
        if self.builtin:
            check_media(raw)
            check_tools(raw, self.source.reader)
        try:
            out = self.reader(raw)
        except RecordError:
            raise
        except Exception as err:  # user code: reported like any bad record, with the reader's name
            raise RecordError("reader_failed", f"{type(err).__name__}: {err}") from None
        record = validate(out, self.kind)
        if self.source.system and self.kind != "text":
            first = MESSAGE_FIELDS[self.kind][0]  # the field the conversation starts with
            if not record[first] or record[first][0]["role"] != "system":
                record[first] = [system_message(self.source.system), *record[first]]
        chars = content_chars(record, self.kind)
        if chars > self.max_chars:
            raise RecordError(
                "record_too_large", f"{chars / 1e6:.1f} MB of text, over data.max_record_mb={self.max_chars / 1e6:g}"
            )
        return record, chars

    def process(self, task: list[Item] | Span) -> Batch:
        self.unread = Counter()  # counted per batch, as the batch's own (workers send it back)
        with gc_paused():
            batch = self._process(task.items(self.max_chars) if isinstance(task, Span) else task)
        batch.unread = self.unread
        return batch

    def _process(self, items: list[Item]) -> Batch:
        s, kind, records, ids, keys, dropped = self.source, self.kind, [], [], [], Counter()
        for locator, payload in items:
            try:
                record, chars = self.make(payload)
            except RecordError as err:
                if self.on_error == "raise":
                    return Batch(to_table([], kind), None, dropped, len(items), (locator, err))
                dropped[err.reason] += 1
                continue
            if s.min_chars is not None and chars < s.min_chars:
                dropped["too_short"] += 1
            elif s.max_chars is not None and chars > s.max_chars:
                dropped["too_long"] += 1
            else:
                records.append(record)
                ids.append(f"{s.name}/{locator}")
        if s.dedup:
            keys = [blake2b(orjson.dumps(canonical(r, kind), option=orjson.OPT_SORT_KEYS), digest_size=16).digest()
                    for r in records]  # fmt: skip
        return Batch(to_table(records, kind, ids, s.name), keys if s.dedup else None, dropped, len(items), None)


@contextmanager
def gc_paused():
    """The cyclic GC finds nothing in a batch (records hold no cycles) but rescans every live
    object each time it runs; pausing it for a batch is worth ~15% of normalize's time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


_WORKER: RecordMaker | None = None


def _init_worker(maker: RecordMaker) -> None:
    global _WORKER
    _WORKER = maker


def _process_in_worker(task: list[Item] | Span) -> Batch:
    return _WORKER.process(task)


def pool_context():
    """Workers forked from a fork server that has imported this module: cheap to start, and
    not forked from this process, whose threads (pyarrow's pools) fork would copy mid-lock."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def batched(items: Iterator, n: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(islice(it, n)):
        yield chunk


class SourceRun:
    """One source through the RecordMaker, in parallel; holds its table and its counts."""

    def __init__(self, source: Source, data: Data, root: Path):
        self.source, self.on_error = source, data.on_error
        self.maker = RecordMaker(source, data, root)
        self.num_proc = data.num_proc or len(os.sched_getaffinity(0))
        self.dropped: Counter = Counter()
        self.unread: Counter = Counter()
        self.tree_counts: Counter = Counter()  # message-tree readers: rows read, rows left out
        self.read = self.rows = self.empty_files = self.repeats = 0
        self._seen: set[bytes] = set()

    def units(self, raw: Path) -> Iterator[Item | Span]:
        """The source's records, or Spans of them where workers can read the file themselves;
        for a message-tree reader, the threads of the whole source's rows (data/trees.py)."""
        if self.source.reader in trees.TREE_READERS:
            rows = chain.from_iterable(part for _, _, part in source_parts(self.source, raw, self.maker.max_chars))
            yield from trees.threads(rows, self.source.reader == "oasst_threads", self.tree_counts)
            return
        spans_ok = not (self.source.shuffle or self.source.limit)  # both need the records here
        for label, path, part in source_parts(self.source, raw, self.maker.max_chars):
            if spans_ok and path is not None and path.suffix == ".jsonl":
                if is_blank(path):
                    self.empty_file(label)
                yield from jsonl_spans(path, label)
                continue
            count = 0
            for item in part:
                count += 1
                yield item
            if count == 0:
                self.empty_file(label)

    def empty_file(self, label: str) -> None:
        if self.on_error == "raise":
            raise NormalizeError(f"source {self.source.name!r}: file {label} holds no records "
                                 "(set data.on_error=skip to count empty files instead)")  # fmt: skip
        self.empty_files += 1

    def tasks(self, raw: Path) -> Iterator[list[Item] | Span]:
        """Units of work in input order: Spans, and the other records in batches of BATCH."""
        units = self.units(raw)
        if self.source.shuffle:
            units = list(units)
            random.Random(self.source.seed).shuffle(units)
        batch: list[Item] = []
        for unit in islice(units, self.source.limit):
            if isinstance(unit, Span):
                if batch:
                    yield batch
                    batch = []
                yield unit
            else:
                batch.append(unit)
                if len(batch) == BATCH:
                    yield batch
                    batch = []
        if batch:
            yield batch

    def batches(self, raw: Path) -> Iterator[Batch]:
        """Tasks processed in order: in this process for a small source, else by a pool."""
        tasks = self.tasks(raw)
        head = list(islice(tasks, 2))
        if len(head) < 2 or self.num_proc == 1:
            yield from map(self.maker.process, chain(head, tasks))
            return
        with ProcessPoolExecutor(self.num_proc, mp_context=pool_context(), initializer=_init_worker,
                                 initargs=(self.maker,)) as pool:  # fmt: skip
            yield from ordered_map(pool, _process_in_worker, chain(head, tasks), 2 * self.num_proc)

    def tables(self, raw: Path) -> Iterator[pa.Table]:
        """The source's rows, batch by batch as the workers finish them (so that writing them
        overlaps the work); a mixture weight needs them all first, so then one table at the end."""
        kept = []
        for batch in self.batches(raw):
            if batch.error:
                locator, err = batch.error
                raise NormalizeError(
                    f"source {self.source.name!r}, record {locator} (reader {self.source.reader!r}): {err} "
                    "(set data.on_error=skip to drop such records and count them)"
                )
            self.read += batch.read
            self.dropped.update(batch.dropped)
            self.unread.update(batch.unread)
            table = self.without_duplicates(batch)
            self.rows += table.num_rows
            if self.source.weight == 1:
                yield table
            else:
                kept.append(table)
        if self.source.weight != 1:
            yield self.weighted(pa.concat_tables(kept) if kept else to_table([], self.maker.kind))

    def without_duplicates(self, batch: Batch) -> pa.Table:
        if batch.keys is None:
            return batch.table
        keep = []
        for key in batch.keys:
            keep.append(key not in self._seen)
            self._seen.add(key)
        self.dropped["duplicate"] += keep.count(False)
        return batch.table.filter(pa.array(keep, pa.bool_()))

    def weighted(self, table: pa.Table) -> pa.Table:
        """weight < 1 keeps a seeded sample (the rest counted as dropped); > 1 adds repeats."""
        w, n = self.source.weight, table.num_rows
        whole, frac = int(w), w - int(w)
        extra = sorted(random.Random(self.source.seed).sample(range(n), round(n * frac))) if frac else []
        if whole == 0:
            self.dropped["mixture_weight"] += n - len(extra)
            self.rows = len(extra)
            return table.take(extra)
        parts = [table] + [repeat(table, k) for k in range(1, whole)]
        if extra:
            parts.append(repeat(table.take(extra), whole))
        self.repeats = sum(p.num_rows for p in parts) - n
        return pa.concat_tables(parts)

    def stats(self) -> dict:
        out = {
            "split": self.source.split,
            "reader": self.source.reader,
            "records_in": self.read,
            "records_out": self.rows,
            "dropped": dict(sorted(self.dropped.items())),
        }
        if self.repeats:
            out["repeats"] = self.repeats  # extra copies from weight > 1, not counted in records_out
        if self.empty_files:
            out["empty_files"] = self.empty_files
        if self.unread:
            out["unread_columns"] = dict(sorted(self.unread.items()))
        if self.tree_counts:  # records_in counts threads; these, the rows they were made of
            out["trees"] = dict(sorted(self.tree_counts.items()))
        assert out["records_in"] == out["records_out"] + sum(self.dropped.values())
        return out


def repeat(table: pa.Table, k: int) -> pa.Table:
    """A copy of the rows for mixture weights, ids suffixed #k so that every row id stays unique."""
    ids = pc.binary_join_element_wise(table.column("id"), pa.scalar(f"#{k}"), "")
    return table.set_column(0, "id", ids)


def system_message(content: str) -> dict:
    return {"role": "system", "content": content, "train": None, "name": None, "tool_calls": None, "reasoning": None,
            "tool_call_id": None}  # fmt: skip


ROW_GROUP = 1024  # rows per Parquet row group: the unit of work pack hands its worker processes


class SplitWriter:
    """One split's Parquet file, written table by table on a background thread (pyarrow encodes
    and compresses without the GIL, so this overlaps the work). The file appears under its
    name only when complete; its bytes depend only on the rows and their batching."""

    def __init__(self, path: Path, kind: str):
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.writer = pq.ParquetWriter(self.tmp, schemas()[kind])
        self.thread = ThreadPoolExecutor(1)
        self.pending: list = []
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self.rows += table.num_rows
            self.pending.append(self.thread.submit(self.writer.write_table, table, ROW_GROUP))

    def close(self) -> str:
        """Finish the file; returns its sha256."""
        for future in self.pending:
            future.result()
        self.thread.shutdown()
        self.writer.close()
        os.replace(self.tmp, self.path)
        return file_sha256(self.path)

    def abort(self) -> None:
        self.thread.shutdown(cancel_futures=True)
        self.writer.close()
        self.tmp.unlink(missing_ok=True)


def mapped_columns(raw: dict, columns: dict[str, str]) -> dict:
    """The record with each reader field taken from its mapped column; a mapped column the
    record does not have is an error naming it (the field would silently come out empty)."""
    for name, column in columns.items():
        if column not in raw:
            raise RecordError("missing_column", f"no column {column!r} (columns maps it to the reader's {name!r}; "
                              f"the record has {sorted(raw)[:12]})")  # fmt: skip
    return {**raw, **{name: raw[column] for name, column in columns.items()}}


def nothing_left(runs: list[SourceRun]) -> str:
    """Why a split has no record, per source: what was read and what was dropped for which reason
    (the stage ends without stats.json, so the error carries its counts)."""
    parts = []
    for run in runs:
        st = run.stats()
        dropped = ", ".join(f"{n} {reason}" for reason, n in st["dropped"].items()) or "none dropped"
        empty = f", {st['empty_files']} empty file(s)" if st.get("empty_files") else ""
        parts.append(f"source {run.source.name!r} read {st['records_in']} record(s) ({dropped}{empty})")
    return "; ".join(parts)


EMPTY_VALUES = (None, "", [], {})  # a column holding one of these in a record has nothing to lose there


def warn_unread(run: SourceRun) -> None:
    """Say which columns the reader leaves out while most records have content in them (stats.json
    lists every unread column with its count): a Dolly `context`, xLAM's `tools`."""
    for column, n in run.unread.items():
        if n * 2 > run.read:
            log.warning("Source <%s>: column %r has content in %d of %d records and reader %r does not read it: it is "
                        "not trained on (map it to a reader field with `columns:`, or use a reader that reads it)",
                        run.source.name, column, n, run.read, run.source.reader)  # fmt: skip


def downloaded_files(source: Source, root: Path) -> dict[Path, str]:
    """The source's files and the sha256 download recorded of each ({} for files put in
    data/raw/ by hand: no record to check against)."""
    entry = root / paths.source_manifest(source.name)
    if not entry.exists():
        return {}
    raw = root / paths.RAW / source.name
    return {raw / name: digest for name, digest in json.loads(entry.read_text())["files"].items()}


def normalize_source(source: Source, data: Data, root: Path, writer: SplitWriter) -> SourceRun:
    run = SourceRun(source, data, root)
    try:
        integrity.check(downloaded_files(source, root), "download", "Download it again (`ftflow download`).")
        with tqdm(total=source.limit, desc=f"normalize {source.name}", unit="records") as bar:
            for table in run.tables(root / paths.RAW / source.name):
                writer.write(table)
                bar.update(run.read - bar.n)
    except (FileFormatError, FileNotFoundError, integrity.DamagedInput) as err:
        raw = root / paths.RAW / source.name
        empty = not raw.is_dir() or not any(raw.iterdir())  # (files put there by hand have no manifest either)
        never = empty and not (root / paths.source_manifest(source.name)).exists()
        hint = (
            " (it was never downloaded: run `ftflow download`, or `ftflow run`, which downloads first)" if never else ""
        )
        raise NormalizeError(f"source {source.name!r}: {err}{hint}") from None
    return run


def normalize(cfg: StageConfig, root: Path = Path(".")) -> dict:
    """Run the stage on its config (data)."""
    data = cfg.data
    out_dir = root / paths.NORMALIZE
    out_dir.mkdir(parents=True, exist_ok=True)
    writers = {split: SplitWriter(out_dir / f"{split}.parquet", data.kind) for split in SPLITS}
    by_split: dict[str, list[SourceRun]] = {split: [] for split in SPLITS}
    try:
        for source in data.sources:
            log.info("Normalizing source <%s> (reader=%s, split=%s)", source.name, source.reader, source.split)
            run = normalize_source(source, data, root, writers[source.split])
            log.info("Source <%s>: %s", source.name, json.dumps(run.stats()))
            warn_unread(run)
            by_split[source.split].append(run)
        for split, runs in by_split.items():
            if runs and not writers[split].rows:
                raise NormalizeError(f"split {split!r}: no record left: {nothing_left(runs)}")
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    stats: dict = {"kind": data.kind, "splits": {}}
    for split, runs in by_split.items():
        stats["splits"][split] = split_stats(runs, writers[split].rows, writers[split].close())
    if data.carved():
        carve_splits(out_dir, data, stats["splits"])
    for split, s in stats["splits"].items():
        log.info("Wrote %d %s records to %s/%s.parquet", s["rows"], data.kind, out_dir, split)
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2))
    write_stage_config(cfg.sections, out_dir)
    return stats


def carve_splits(out_dir: Path, data: Data, splits: dict) -> None:
    """Move the carved splits' records out of train.parquet into their own files (data/carve.py
    decides which), rewriting all three; `splits` (stats.json's) says how each was made."""
    sizes, train = data.carved(), out_dir / "train.parquet"
    keys = carve.file_keys(train)
    ranges = carve.cut_points(keys, sizes)
    names = ["train", *ranges]
    writers = [SplitWriter(out_dir / f"{name}.parquet", data.kind) for name in names]
    try:
        where, start, f = carve.assign(keys, ranges), 0, pq.ParquetFile(train)
        for i in range(f.num_row_groups):
            table = f.read_row_group(i)
            part = where[start : start + table.num_rows]
            start += table.num_rows
            for index, writer in enumerate(writers):
                writer.write(table.filter(pa.array(part == index)))
        for name, writer in zip(names, writers):
            if not writer.rows:
                raise NormalizeError(empty_carve(name, sizes, len(keys)))
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    for name, writer in zip(names, writers):
        splits[name]["sha256"], splits[name]["rows"] = writer.close(), writer.rows
    for name, size in sizes.items():
        splits[name]["carved"] = {"from": "train", f"data.{name}_size": size, "how": carve.HOW}
        log.info("Carved %d %s records from train (data.%s_size=%s)", splits[name]["rows"], name, name, size)
    splits["train"]["carved_out"] = {name: splits[name]["rows"] for name in sizes}


def empty_carve(split: str, sizes: dict, records: int) -> str:
    if split == "train":
        asked = " and ".join(f"data.{name}_size={size}" for name, size in sizes.items())
        return f"{asked} took all {records} training records: none is left to train on; lower them"
    size = sizes.get(split)
    return (f"data.{split}_size={size} carved no record from {records} training records (with a fraction each "
            "record's hash decides, so a small fraction of a few records can come out empty): raise it or give "
            "a count")  # fmt: skip


def split_stats(runs: list[SourceRun], rows: int, digest: str) -> dict:
    sources = {run.source.name: run.stats() for run in runs}
    dropped: Counter = Counter()
    for s in sources.values():
        dropped.update(s["dropped"])
    return {
        "records_in": sum(s["records_in"] for s in sources.values()),
        "records_out": sum(s["records_out"] for s in sources.values()),
        "dropped": dict(sorted(dropped.items())),
        "rows": rows,  # records_out plus repeats from mixture weights
        "sha256": digest,
        "sources": sources,
    }
