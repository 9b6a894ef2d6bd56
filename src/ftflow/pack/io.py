"""Reading normalize's output for pack: which kind a file holds, and its conversations in
pieces (row-group slices) that worker processes read themselves; writing rows as a dataset."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ftflow.errors import PackError

CHUNK = 1024  # conversations rendered and encoded together (a unit of work for a worker)


def template_message(m: dict) -> dict:
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
    return [[template_message(m) for m in row] for row in column.to_pylist()]


def tools_of(table: pa.Table) -> list:
    return [json.loads(t) if t else None for t in table.column("tools").to_pylist()]


def conversations(parquet: Path) -> list[list[dict]]:
    return [c for convs, _ in read_chunks(parquet) for c in convs]


def save_rows(table: pa.Table, out: Path) -> None:
    import datasets

    datasets.Dataset(datasets.table.InMemoryTable(table)).save_to_disk(str(out))
