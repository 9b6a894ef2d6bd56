"""Where a result came from: code version (+ uncommitted diff), config, packages, input data."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from ftflow import paths
from ftflow.hashing import file_sha256, tree_sha256

PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "deepspeed", "datasets", "tokenizers",
            "flash-attn", "bitsandbytes", "wandb", "lm-eval", "snakemake", "dvc", "ftflow")  # fmt: skip


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout


# tracked files that every run rewrites, recorded in full elsewhere: the composed config (the
# provenance's `config`), DVC's record of the data (`inputs`: the manifest's and the packed
# splits' hashes) and of the pipeline. A change to them alone is not a dirty tree.
RUN_STATE = ("params.yaml", "data.dvc", "dvc.lock")
# where a file not yet committed changes what a run does (elsewhere: data, results, notes)
UNCOMMITTED_MATTERS = ("conf", "src", "rules", "scripts", "workflow", "profiles")


def git_state(root: Path = Path(".")) -> dict:
    """The commit of the code, and the tracked files that differ from it (code or config a
    person changed; not RUN_STATE): `dirty` when there are any. (No remote URL: those can
    carry credentials.)"""
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    if status is None:
        return {"commit": commit.strip() if commit else None, "dirty": None, "changed": None}
    changed = {line[3:].split(" -> ")[-1] for line in status.splitlines() if line.strip()} - set(RUN_STATE)
    # code and config not committed at all (a data config or reader of your own in conf/)
    untracked = _git(root, "ls-files", "--others", "--exclude-standard", "--", *UNCOMMITTED_MATTERS) or ""
    changed = sorted(changed | set(untracked.split()))
    return {"commit": commit.strip() if commit else None, "dirty": bool(changed), "changed": changed}


def git_diff(root: Path = Path(".")) -> str:
    """The uncommitted changes to tracked files (what `dirty` means), as a patch."""
    return _git(root, "diff", "HEAD", "--no-color", "--", ".", *(f":(exclude){f}" for f in RUN_STATE)) or ""


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


LOCK_FILE = "requirements.lock"  # what `make setup` installs (README: Environment)


def environment(root: Path = Path(".")) -> dict:
    """The lock the environment is meant to be (its sha256), and the installed packages whose
    version is not the lock's: a run in another environment says so (report: Packages)."""
    lock = root / LOCK_FILE
    if not lock.exists():
        return {"lock": None, "differs": None}
    text = lock.read_text()
    canon = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
    installed = {canon(d.metadata["Name"]): d.version for d in metadata.distributions()}
    differs = {
        name: {"lock": pinned, "installed": installed.get(canon(name))}
        for name, pinned in re.findall(r"^([\w.-]+)==(\S+) \\$", text, re.M)
        if installed.get(canon(name)) != pinned
    }
    return {"lock": LOCK_FILE, "lock_sha256": hashlib.sha256(text.encode()).hexdigest(), "differs": differs}


def manifest_digest(root: Path = Path(".")) -> str | None:
    path = root / paths.MANIFEST
    return file_sha256(path)[:16] if path.exists() else None


def tree_digest(folder: Path) -> str | None:
    """sha256 over a folder's files (names and bytes, in name order)."""
    return tree_sha256(folder) if folder.exists() else None


def input_hashes(root: Path = Path(".")) -> dict:
    """The data a training run read: the download manifest and the packed splits, hashed."""
    out: dict[str, str | None] = {"data/manifest.json": manifest_digest(root)}
    pack = root / paths.PACK
    if pack.exists():
        for d in sorted(p for p in pack.iterdir() if p.is_dir()):
            out[f"{paths.PACK}/{d.name}"] = tree_digest(d)
    return out


def provenance(cfg: dict, root: Path = Path(".")) -> dict:
    return {"config": cfg, "git": git_state(root), "packages": package_versions(), "environment": environment(root),
            "inputs": input_hashes(root)}  # fmt: skip


def write_provenance(record: dict, diff: str, folder: Path) -> None:
    """provenance.json (+ git.diff when the tree had uncommitted changes) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "provenance.json").write_text(json.dumps(record, indent=2, sort_keys=True))
    if diff:
        (folder / "git.diff").write_text(diff)
