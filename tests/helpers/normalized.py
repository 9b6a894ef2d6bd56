"""normalize run on fixture files, for the tests of normalize and of the templates."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq

from ftflow import paths, runner

from helpers import REPO

FORMATS = REPO / "examples" / "formats"  # copies of ../shared/fixtures/formats (CI has no ../shared)


def stage(root: Path, sources: list[dict], kind="conversation", on_error="raise", **data) -> dict:
    """Run normalize in `root` on sources whose raw files are already in data/raw/<name>/."""
    for s in sources:
        s.setdefault("path", "unused")  # download already placed the files
        (root / paths.RAW / s["name"]).mkdir(parents=True, exist_ok=True)
    return runner.run("normalize", {"data": {"kind": kind, "sources": sources, "on_error": on_error, **data}}, root)


def place(root: Path, name: str, *files: Path) -> None:
    dest = root / paths.RAW / name
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy(f, dest)


def rows(root: Path, split="train") -> list[dict]:
    return pq.read_table(root / paths.NORMALIZE / f"{split}.parquet").to_pylist()


def roles(msgs):
    return [m["role"] for m in msgs]


def raw_records(file: str) -> list:
    """A fixture file's records, read with nothing but json (and gzip)."""
    path = FORMATS / file
    text = gzip.decompress(path.read_bytes()).decode() if file.endswith(".gz") else path.read_text()
    return [json.loads(line) for line in text.splitlines()] if ".jsonl" in file else json.loads(text)


def fixture(
    tmp_path: Path, file: str, reader: str, kind="conversation", on_error="raise"
) -> tuple[list, list[dict], dict]:
    """A fixture file's raw records, and what normalize made of them with `reader` (and stats)."""
    place(tmp_path, "f", FORMATS / file)
    stats = stage(tmp_path, [{"name": "f", "reader": reader}], kind=kind, on_error=on_error)["splits"]["train"]
    return raw_records(file), rows(tmp_path), stats
