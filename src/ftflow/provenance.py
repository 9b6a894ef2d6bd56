"""Where a result came from: code version, config fingerprint, data manifest."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from ftflow import paths


def git_state(root: Path = Path(".")) -> dict:
    """The commit of the code, and whether the working tree had uncommitted changes."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True)
        except (OSError, subprocess.CalledProcessError):
            return None
        return out.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def manifest_digest(root: Path = Path(".")) -> str | None:
    path = root / paths.MANIFEST
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else None
