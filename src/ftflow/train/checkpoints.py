"""Where a training run's checkpoints live, which one a run resumes from, and what is removed.

Checkpoints live in results/train/checkpoints/<key>/, the key a fingerprint of the stage config
and of the data: a checkpoint belongs to one config and one dataset (resuming a run from
another learning rate's or another dataset's checkpoint would be wrong), and it is
outside the rule's declared outputs so Snakemake does not delete it when a job fails; a rerun
with the same config resumes from the last complete one.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from ftflow import paths
from ftflow.hashing import file_sha256, fingerprint

log = logging.getLogger(__name__)

# marker in a checkpoint folder once every process has saved its part: the step, and the size
# (with train.checkpoint_verify=sha256 also the sha256) of every file in the folder
COMPLETE = "ftflow_complete"
# train settings that do not shape the weights: a checkpoint resumes whatever their values
NOT_IN_KEY = ("checkpoint_verify",)

# small files that pin down the packed data: normalize's stats (sha256 of every normalized file)
# and pack's config and stats; pack is deterministic, so these identify its output without
# hashing gigabytes of rows
DATA_RECORDS = (f"{paths.NORMALIZE}/stats.json", f"{paths.PACK}/config.yaml", f"{paths.PACK}/stats.json")


def checkpoint_key(sections: dict, root: Path = Path(".")) -> str:
    """What a checkpoint belongs to: the config that shapes the weights (tracking does not) and
    the data it trains on. Another learning rate or another dataset never resumes it."""
    data = {name: file_sha256(root / name) for name in DATA_RECORDS if (root / name).exists()}
    config = {k: v for k, v in sections.items() if k != "tracking"}
    config["train"] = {k: v for k, v in config["train"].items() if k not in NOT_IN_KEY}
    return fingerprint({"config": config, "data": data})


def checkpoints(ckpt_dir: Path) -> list[Path]:
    found = ckpt_dir.glob("checkpoint-*") if ckpt_dir.is_dir() else []
    return sorted((p for p in found if p.name.split("-")[-1].isdigit()), key=lambda p: int(p.name.split("-")[-1]))


def last_complete_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint every process finished writing (a process killed while saving
    leaves a folder without the marker: never resumed from)."""
    complete = [p for p in checkpoints(ckpt_dir) if (p / COMPLETE).exists()]
    return complete[-1] if complete else None


def mark_complete(folder: Path, step: int, sha256: bool = False) -> None:
    """Mark a checkpoint complete, recording its files (written last, atomically: a folder
    with the marker is a whole checkpoint)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE)
    record = {"step": step, "sizes": {str(p.relative_to(folder)): p.stat().st_size for p in files}}
    if sha256:
        record["sha256"] = {str(p.relative_to(folder)): file_sha256(p) for p in files}
    tmp = folder / f".{COMPLETE}.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(folder / COMPLETE)


def damage(folder: Path, verify: str = "size") -> str | None:
    """Why a complete checkpoint's files are not those it saved (None: they are): a file
    missing, of another size, or (verify=sha256, when its hashes were recorded) of other content."""
    record = json.loads((folder / COMPLETE).read_text())
    for name, size in record.get("sizes", {}).items():  # (a marker of an earlier ftflow records none)
        path = folder / name
        if not path.exists():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} when it was saved"
    if verify == "sha256":
        for name, digest in record.get("sha256", {}).items():
            if file_sha256(folder / name) != digest:
                return f"{name} is not the file that was saved (its sha256 differs)"
    return None


def dvc_hint(folder: Path) -> str:
    """What restores a damaged checkpoint that DVC restored as links into its cache."""
    if any(p.is_symlink() or p.stat().st_nlink > 1 for p in folder.rglob("*") if p.is_file()):
        return (" Its files are links into DVC's cache, so the cached copy is damaged too: "
                "`dvc fetch` (from a remote) and `dvc checkout --relink` restore it.")  # fmt: skip
    return ""


def finished(checkpoint: Path) -> bool:
    """Whether a checkpoint is the end of training (its step is the last one)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return state["max_steps"] > 0 and state["global_step"] >= state["max_steps"]


def remove_unusable(ckpt_dir: Path, verify: str = "size") -> None:
    """Before the processes start (once per job): drop checkpoint folders whose save never
    completed, and, newest first until one is whole, complete ones whose files were damaged
    since, saying why: the run resumes from the newest whole checkpoint."""
    for partial in (p for p in checkpoints(ckpt_dir) if not (p / COMPLETE).exists()):
        log.warning("Removing %s: its save was interrupted", partial)
        shutil.rmtree(partial, ignore_errors=True)
    for folder in reversed(checkpoints(ckpt_dir)):
        why = damage(folder, verify)
        if why is None:
            return
        older = [p.name for p in checkpoints(ckpt_dir) if p != folder]
        instead = f"resuming from {older[-1]}" if older else "no other checkpoint: training starts over"
        log.warning("%s is damaged: %s. Removed it; %s.%s", folder, why, instead, dvc_hint(folder))
        shutil.rmtree(folder)


def own_files(ckpt_dir: Path) -> None:
    """Make the files the trainer rewrites on resume (those beside the checkpoint-<step>
    folders, such as the model card) private copies. DVC restores a persisted checkpoint
    folder as links into its cache, and writing through a link would change the cache itself;
    checkpoint-<step> folders are only ever written new, so their (large) files stay linked."""
    if not ckpt_dir.is_dir():
        return
    for path in ckpt_dir.iterdir():
        if path.is_file() and (path.is_symlink() or path.stat().st_nlink > 1):
            data = path.read_bytes()
            path.unlink()
            path.write_bytes(data)


def prune_other_configs(keep: Path) -> None:
    """Once a run has finished, drop the checkpoints of other configs: they can never be resumed
    by this config, and DVC versions the checkpoints folder as one output, so each experiment's
    version holds only its own (multi-GB) checkpoints."""
    for other in keep.parent.iterdir():
        if other != keep and other.is_dir():
            log.info("Removing checkpoints of another config: %s", other)
            shutil.rmtree(other)
