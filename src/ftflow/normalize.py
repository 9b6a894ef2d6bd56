"""normalize: raw records of every source -> chat conversations, one Parquet file per split.

Records in = records out + dropped, always: a bad record either stops the stage with the
source, the record's locator and the reason (on_error=raise), or is counted per reason in
stats.json (on_error=skip).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ftflow import paths
from ftflow.config import Data, write_stage_config
from ftflow.messages import RecordError, to_rows, validate_conversation
from ftflow.readers import data_files, get_reader, iter_records

log = logging.getLogger(__name__)

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string()), ("train", pa.bool_())])
SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("messages", pa.list_(MESSAGE_TYPE))])
# Every split is written, empty when no source feeds it: the stage's outputs do not depend on the
# config, so the Snakemake rule and its DVC stage have one fixed shape.
SPLITS = ("train", "validation", "test")


class NormalizeError(ValueError):
    pass


def normalize_source(source, root: Path, on_error: str) -> tuple[list[dict], dict]:
    """Read one source's raw files; returns its rows and its stats (in, out, dropped by reason)."""
    reader = get_reader(source.reader)
    rows, dropped, seen = [], Counter(), 0
    for file in data_files(root):
        for locator, record, parse_error in iter_records(file):
            if source.limit is not None and seen >= source.limit:
                break
            seen += 1
            try:
                if parse_error:
                    raise RecordError("invalid_json", parse_error)
                if not isinstance(record, dict):
                    raise RecordError("not_an_object", f"record is {type(record).__name__}")
                messages = validate_conversation(reader(record))
            except RecordError as err:
                if on_error == "raise":
                    raise NormalizeError(
                        f"source {source.name!r}, record {locator}: {err} "
                        f"(set data.on_error=skip to drop such records and count them)"
                    ) from None
                dropped[err.reason] += 1
                continue
            rows.append({"id": f"{source.name}/{locator}", "source": source.name, "messages": to_rows(messages)})
    stats = {"records_in": seen, "records_out": len(rows), "dropped": dict(dropped)}
    assert stats["records_in"] == stats["records_out"] + sum(dropped.values())
    return rows, stats


def normalize(cfg: dict, root: Path = Path(".")) -> dict:
    """Run the stage; `cfg` is the stage's params ({"data": ...})."""
    data = Data.model_validate(cfg["data"])
    out_dir = root / paths.NORMALIZE
    out_dir.mkdir(parents=True, exist_ok=True)
    by_split: dict[str, list[dict]] = {}
    stats: dict = {"sources": {}, "splits": {}}
    for source in data.sources:
        log.info("Normalizing source <%s> (reader=%s, split=%s)", source.name, source.reader, source.split)
        rows, source_stats = normalize_source(source, root / paths.RAW / source.name, data.on_error)
        stats["sources"][source.name] = source_stats
        by_split.setdefault(source.split, []).extend(rows)
    for split in SPLITS:
        rows = by_split.get(split, [])
        if split in by_split and not rows:
            raise NormalizeError(f"split {split!r}: every record was dropped; see the reasons in stats")
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), out_dir / f"{split}.parquet")
        stats["splits"][split] = {"conversations": len(rows)}
        log.info("Wrote %d conversations to %s/%s.parquet", len(rows), out_dir, split)
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2))
    write_stage_config(cfg, out_dir)
    return stats
