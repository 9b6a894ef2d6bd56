"""Validation and test splits carved from the training records (data.validation_size, test_size).

A record's place is decided by a hash of its normalized content (its id and source left out), read
as a number u in [0, 1): the test split takes the lowest u, validation the highest, train the
rest. So exact duplicates always land together (the same conversation is never in two splits),
the result does not depend on the order or the number of workers, each split does not depend on
whether the other is carved, and with fractions a record keeps its split when others are added
(its u and the cut points stay where they are). A count takes the N lowest (test) or highest
(validation) distinct hashes: a new record can then push an older one back into train.
"""

from __future__ import annotations

from hashlib import blake2b
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

HOW = "by a blake2b hash of each normalized record (duplicates kept together)"
_NOT_CONTENT = ("id", "source")  # a row's bookkeeping columns: not part of what it says
_SPAN = float(2**64)
_END = 2**64  # one past the largest hash


def row_keys(table: pa.Table) -> np.ndarray:
    """A uint64 per row from the hash of its content columns."""
    content = table.drop_columns([c for c in _NOT_CONTENT if c in table.column_names])
    out = np.empty(content.num_rows, np.uint64)
    for i, row in enumerate(content.to_pylist()):
        digest = blake2b(orjson.dumps(row, option=orjson.OPT_SORT_KEYS), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "big")
    return out


def file_keys(path: Path) -> np.ndarray:
    f = pq.ParquetFile(path)
    return np.concatenate([row_keys(f.read_row_group(i)) for i in range(f.num_row_groups)] or [np.empty(0, np.uint64)])


def cut_points(keys: np.ndarray, sizes: dict[str, int | float]) -> dict[str, tuple[int, int]]:
    """{split: [low, high)} ranges of hash values: test from the bottom of the hash range,
    validation from the top. A fraction f takes that share of the range (fixed cuts: a record's
    split never moves when others are added); a count N the N distinct hashes nearest its end."""
    distinct = np.unique(keys)  # sorted
    ranges = {}
    if "test" in sizes:
        size = sizes["test"]
        high = int(size * _SPAN) if isinstance(size, float) else int(distinct[size]) if size < len(distinct) else _END
        ranges["test"] = (0, high)
    if "validation" in sizes:
        size = sizes["validation"]
        if isinstance(size, float):
            low = _END - int(size * _SPAN)
        else:
            low = int(distinct[-size]) if size <= len(distinct) else 0
        ranges["validation"] = (low, _END)
    return ranges


def assign(keys: np.ndarray, ranges: dict[str, tuple[int, int]]) -> np.ndarray:
    """Each row's split as an index: 0 train, then 1 + the position of its split in ranges
    (test first: where both claim a row, a count larger than the data, the test split has it)."""
    out = np.zeros(len(keys), np.int8)
    for i, (low, high) in reversed(list(enumerate(ranges.values(), start=1))):
        inside = keys >= np.uint64(low) if low > 0 else np.ones(len(keys), bool)
        if high < _END:
            inside &= keys < np.uint64(high)
        out[inside] = i
    return out
