"""Raw records out of the files users bring: json, jsonl, csv, parquet and txt (each optionally
gzip-compressed), datasets saved with `save_to_disk`, and hub repos in their usual layouts.

Each record comes with a locator (`train.jsonl:12`, `data.json[3]`) so an error can name it.
A record is a dict, or for JSON lines the line's bytes (parsed later, in parallel, by
parse_json_line); one that cannot be read (an oversized line) is yielded as a RecordError in
place of the record, for normalize to raise or count; a file that cannot be read at all raises
FileFormatError.

Bytes as files come: a UTF-8 byte order mark (Windows tools write one) is not part of the first
record; invalid UTF-8 spoils only the record that holds it (reason invalid_utf8, at its line or
index), in every format; a damaged compressed file names itself.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from ftflow.data.messages import RecordError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes
Item = tuple[str, "dict | bytes | RecordError"]


class FileFormatError(ValueError):
    """A file that cannot be read at all (as opposed to one bad record in it)."""


def base_suffix(path: Path) -> str:
    """.jsonl for train.jsonl and train.jsonl.gz."""
    suffixes = path.suffixes
    return suffixes[-2] if suffixes and suffixes[-1] == ".gz" and len(suffixes) > 1 else path.suffix


def is_data_file(path: Path) -> bool:
    return base_suffix(path) in SUFFIXES and path.is_file()


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def parse_json_line(raw: bytes) -> dict:
    """One JSON line -> its value; RecordError says whether the bytes or the JSON are at fault."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as bad:
            raise RecordError("invalid_utf8", f"invalid UTF-8 at byte {bad.start}") from None
        raise RecordError("invalid_json", str(err)) from None


def _lines(lines, label: str, first_line: int, max_bytes: int) -> Iterator[Item]:
    for lineno, raw in enumerate(lines, first_line):
        if lineno == 1:
            raw = raw.removeprefix(codecs.BOM_UTF8)
        if not raw or raw.isspace():
            continue
        if len(raw) > max_bytes:  # checked before parsing: a runaway line costs nothing
            yield (
                f"{label}:{lineno}",
                RecordError("record_too_large", f"line of {len(raw) / 1e6:.1f} MB, over data.max_record_mb"),
            )
        else:
            yield f"{label}:{lineno}", raw


def _jsonl(path: Path, label: str, max_bytes: int) -> Iterator[Item]:
    """Lines as bytes: parsing is left to parse_json_line, in normalize's worker processes."""
    with _open(path) as f:
        yield from _lines(f, label, 1, max_bytes)


@dataclass(frozen=True)
class Span:
    """Whole lines of a JSON-lines file, as a byte range: a unit of work that a worker reads
    itself, so that the parent process never touches the records of a large file."""

    path: Path
    label: str
    start: int
    end: int
    first_line: int

    def items(self, max_bytes: int) -> list[Item]:
        with self.path.open("rb") as f:
            f.seek(self.start)
            data = f.read(self.end - self.start)
        return list(_lines(data.split(b"\n"), self.label, self.first_line, max_bytes))


def jsonl_spans(path: Path, label: str, size: int = 4 << 20) -> Iterator[Span]:
    """A plain (not gzipped) JSON-lines file cut into Spans of about `size` bytes."""
    total = path.stat().st_size
    with path.open("rb") as f:
        start, line = 0, 1
        while start < total:
            chunk = f.read(size)
            if start + len(chunk) < total:
                chunk += f.readline()  # to the end of the line
            yield Span(path, label, start, start + len(chunk), line)
            line += chunk.count(b"\n")
            start += len(chunk)


def is_blank(path: Path) -> bool:
    """No record in the file: nothing but whitespace and a byte order mark (read until the first
    other byte)."""
    with _open(path) as f:
        block = f.read(1 << 16).removeprefix(codecs.BOM_UTF8)
        while block:
            if not block.isspace():
                return False
            block = f.read(1 << 16)
    return True


# Undecodable bytes are kept as lone surrogates (U+DC80..U+DCFF, which valid UTF-8 never
# decodes to), so that the rest of the file is read and the record holding them is named.
UNDECODABLE = "surrogateescape"
_SURROGATE = re.compile("[\udc80-\udcff]")


def _undecodable(value) -> bool:
    """Whether a decoded value (str, or lists and dicts of them) holds undecodable bytes."""
    if isinstance(value, str):
        return not value.isascii() and _SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_undecodable(k) or _undecodable(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_undecodable(v) for v in value)
    return False


def _checked(locator: str, record, suspect: bool = True) -> Item:
    """The record, or invalid_utf8 in its place; `suspect=False` (the whole decoded text holds no
    undecodable byte, searched once) skips the walk through the record."""
    if suspect and _undecodable(record):
        return locator, RecordError("invalid_utf8", "invalid UTF-8 in this record")
    return locator, record


def _json(path: Path, label: str, max_bytes: int) -> Iterator[Item]:
    with _open(path) as f:
        raw = f.read().removeprefix(codecs.BOM_UTF8)
    text = raw.decode("utf-8", UNDECODABLE)
    suspect = _SURROGATE.search(text) is not None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # JSON lines under a .json name, as datasets also accepts
            yield from _jsonl(path, label, max_bytes)
            return
        raise FileFormatError(f"{label}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise FileFormatError(f"{label}: expected a JSON array of records, got {type(data).__name__}")
    for i, rec in enumerate(data):
        yield _checked(f"{label}[{i}]", rec, suspect)


def _csv(path: Path, label: str, max_bytes: int) -> Iterator[Item]:
    with _open(path) as f:
        # utf-8-sig: a byte order mark would otherwise stick to the first column's name
        text = io.TextIOWrapper(f, encoding="utf-8-sig", errors=UNDECODABLE, newline="")
        reader = csv.DictReader(text)
        try:
            if reader.fieldnames and _undecodable(reader.fieldnames):
                raise FileFormatError(f"{label}:1: invalid UTF-8 in the header row")
            for row in reader:
                yield _checked(f"{label}:{reader.line_num}", row)
        except csv.Error as err:
            raise FileFormatError(f"{label}:{reader.line_num}: {err}") from None


def _parquet(path: Path, label: str, max_bytes: int) -> Iterator[Item]:
    import pyarrow.parquet as pq

    if path.suffix == ".gz":
        raise FileFormatError(f"{label}: Parquet compresses its own pages; do not gzip it")
    i = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for rec in batch.to_pylist():
            yield f"{label}[{i}]", rec
            i += 1


def _txt(path: Path, label: str, max_bytes: int, sample_by: str = "line") -> Iterator[Item]:
    """Raw text: one record per line, per blank-line-separated paragraph, or per file."""
    with _open(path) as f:
        text = f.read().removeprefix(codecs.BOM_UTF8).decode("utf-8", UNDECODABLE)
    suspect = _SURROGATE.search(text) is not None
    if sample_by == "document":
        if text.strip():
            yield _checked(label, {"text": text}, suspect)
        return
    sep = "\n\n" if sample_by == "paragraph" else "\n"
    line = 1
    for chunk in text.split(sep):
        if chunk.strip():
            yield _checked(f"{label}:{line}", {"text": chunk}, suspect)
        line += chunk.count("\n") + sep.count("\n")


_READERS = {".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet, ".txt": _txt}


def iter_file(path: Path, max_bytes: int, sample_by: str = "line", label: str | None = None) -> Iterator[Item]:
    """The records of one file; `label` (default: the file name) starts each locator."""
    suffix, label = base_suffix(path), label or path.name
    if suffix not in _READERS:
        raise FileFormatError(f"{label}: unsupported file type (use {', '.join(SUFFIXES)}, optionally .gz)")
    if suffix == ".txt":
        items = _txt(path, label, max_bytes, sample_by)
    else:
        items = _READERS[suffix](path, label, max_bytes)
    return _decompressed(items, label) if path.suffix == ".gz" else items


def _decompressed(items: Iterator[Item], label: str) -> Iterator[Item]:
    """A truncated or corrupt .gz fails in the middle of reading it: say which file."""
    try:
        yield from items
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise FileFormatError(f"{label}: damaged gzip file ({err})") from None


# --- which files make up a source -----------------------------------------------------------


def data_files(root: Path, patterns: list[str] | None = None) -> list[Path]:
    """The record files under a downloaded source, in a stable order (optionally by glob)."""
    if root.is_file():
        return [root]
    if patterns:
        found = {p for pattern in patterns for p in root.glob(pattern) if is_data_file(p)}
    else:
        found = {p for p in root.rglob("*") if is_data_file(p) and ".cache" not in p.parts}
    if not found:
        what = f"matching {patterns}" if patterns else f"of type {'/'.join(SUFFIXES)}"
        raise FileFormatError(f"{root}: no data files {what}")
    return sorted(found)


def is_saved_dataset(root: Path) -> bool:
    return root.is_dir() and any((root / m).exists() for m in SAVED_MARKERS)


def saved_dataset_records(root: Path, split: str | None) -> Iterator[Item]:
    """Rows of a `save_to_disk` directory (a Dataset, or one split of a DatasetDict)."""
    import datasets

    ds = datasets.load_from_disk(str(root))
    if isinstance(ds, datasets.DatasetDict):
        split = split or ("train" if "train" in ds else None)
        if split not in ds:
            raise FileFormatError(f"{root.name}: saved DatasetDict has splits {sorted(ds)}; set from_split")
        ds = ds[split]
    name = f"{split}" if split else "dataset"
    for i, rec in enumerate(ds):
        yield f"{name}[{i}]", rec


def hub_data_files(root: Path, subset: str | None, split: str | None) -> list[Path]:
    """The files of one subset/split of a dataset repo snapshot, resolved the way `datasets`
    resolves them (the README's `configs:` metadata, or the file naming conventions)."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(str(root), name=subset)
    except (ValueError, FileNotFoundError) as err:
        raise FileFormatError(f"{root.name}: cannot resolve subset {subset!r}: {err}") from None
    files = builder.config.data_files or {}
    split = split or ("train" if "train" in files else None)
    if split not in files:
        raise FileFormatError(f"{root.name}: subset {subset!r} has splits {sorted(files)}, not {split!r}")
    return sorted(Path(f) for f in files[split])
