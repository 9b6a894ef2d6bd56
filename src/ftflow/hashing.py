"""sha256 of files, folders and JSON-able values: the download manifest's file hashes, normalize's
record of its inputs, provenance, the checkpoint key. One helper, so the same bytes always give
the same digest wherever they are recorded."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def file_sha256(path: Path) -> str:
    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()  # read in chunks: weights need not fit in memory


def tree_sha256(folder: Path) -> str:
    """Over a folder's files: each one's path (relative, in name order) and bytes."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def fingerprint(obj) -> str:
    """A short stable hash of a JSON-able object (keys a checkpoint to one config)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]
