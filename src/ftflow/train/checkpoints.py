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
from ftflow.disk import free_bytes, mb
from ftflow.hashing import file_sha256, fingerprint
from ftflow.integrity import dvc_fix

log = logging.getLogger(__name__)

# marker in a checkpoint folder once every process has saved its part: the step, and the size
# (with train.checkpoint_verify=sha256 also the sha256) of every file in the folder
COMPLETE = "ftflow_complete"
# settings that do not shape the weights: a checkpoint resumes whatever their values
NOT_IN_KEY = {"train": ("checkpoint_verify", "resume"), "launcher": ("collective_timeout_s",)}

# small files that pin down the packed data: normalize's stats (sha256 of every normalized file)
# and pack's config and stats; pack is deterministic, so these identify its output without
# hashing gigabytes of rows
DATA_RECORDS = (f"{paths.NORMALIZE}/stats.json", f"{paths.PACK}/config.yaml", f"{paths.PACK}/stats.json")


def checkpoint_key(sections: dict, root: Path = Path(".")) -> str:
    """What a checkpoint belongs to: the config that shapes the weights (tracking does not) and
    the data it trains on. Another learning rate or another dataset never resumes it."""
    data = {name: file_sha256(root / name) for name in DATA_RECORDS if (root / name).exists()}
    config = {k: v for k, v in sections.items() if k != "tracking"}
    for section, names in NOT_IN_KEY.items():
        config[section] = {k: v for k, v in config[section].items() if k not in names}
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


def damage(folder: Path, verify: str = "size") -> tuple[str, str] | None:
    """The first file of a complete checkpoint that is not what it saved, and why (None: all
    are): missing, of another size, or (verify=sha256, when its hashes were recorded) of other
    content."""
    record = json.loads((folder / COMPLETE).read_text())
    for name, size in record.get("sizes", {}).items():  # (a marker of an earlier ftflow records none)
        path = folder / name
        if not path.exists():
            return name, f"{name} is missing"
        if path.stat().st_size != size:
            return name, f"{name} has {path.stat().st_size} bytes, {size} when it was saved"
    if verify == "sha256":
        for name, digest in record.get("sha256", {}).items():
            if file_sha256(folder / name) != digest:
                return name, f"{name} is not the file that was saved (its sha256 differs)"
    return None


def finished(checkpoint: Path) -> bool:
    """Whether a checkpoint is the end of training (its step is the last one)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return state["max_steps"] > 0 and state["global_step"] >= state["max_steps"]


def remove_partial(ckpt_dir: Path) -> dict[str, int]:
    """Drop checkpoint folders whose save never completed; returns their names and sizes."""
    removed = {}
    for partial in (p for p in checkpoints(ckpt_dir) if not (p / COMPLETE).exists()):
        log.warning("Removing %s: its save was interrupted", partial)
        removed[partial.name] = sum(p.stat().st_size for p in partial.rglob("*") if p.is_file())
        shutil.rmtree(partial, ignore_errors=True)
    return removed


def saved_bytes(folder: Path) -> int:
    """A complete checkpoint's size, as its marker recorded it."""
    return sum(json.loads((folder / COMPLETE).read_text()).get("sizes", {}).values())


def out_of_space(ckpt_dir: Path) -> str:
    """After a failed run: when a save was cut short for lack of room, remove its partial files
    and say how much a checkpoint takes and how much is free ("" otherwise). A checkpoint
    takes what the last complete one took (at least what the cut one had written); the
    trainer writes a new checkpoint before it removes the oldest (save_total_limit), so a
    save needs room for one whole checkpoint beside those kept."""
    if not ckpt_dir.is_dir():
        return ""
    free = free_bytes(ckpt_dir)  # before the partial files go: what the save had left
    cut = remove_partial(ckpt_dir)
    last = last_complete_checkpoint(ckpt_dir)
    needed = max([saved_bytes(last) if last else 0, *cut.values()])
    if not cut or free >= needed:
        return ""
    return (f"the file system holding {ckpt_dir} is full: saving {', '.join(cut)} stopped with {mb(free)} free; "
            f"a checkpoint takes {mb(needed)} (its partial files are removed). Free space there, lower "
            "train.save_total_limit, or put results/ on a larger file system")  # fmt: skip


def remove_unusable(ckpt_dir: Path, verify: str = "size") -> None:
    """Before the processes start (once per job): drop checkpoint folders whose save never
    completed, and, newest first until one is whole, complete ones whose files were damaged
    since, saying why: the run resumes from the newest whole checkpoint."""
    remove_partial(ckpt_dir)
    for folder in reversed(checkpoints(ckpt_dir)):
        found = damage(folder, verify)
        if found is None:
            return
        name, why = found
        older = [p.name for p in checkpoints(ckpt_dir) if p != folder]
        instead = f"resuming from {older[-1]}" if older else "no other checkpoint: training starts over"
        fix = dvc_fix(folder / name)  # (DVC restored the checkpoint as links into its cache)
        log.warning("%s is damaged: %s. Removed it; %s.%s", folder, why, instead, f" {fix}" if fix else "")
        shutil.rmtree(folder)


def start_afresh(ckpt_dir: Path) -> None:
    """train.resume=false: the checkpoints of this config are removed, so training starts at step 0."""
    found = checkpoints(ckpt_dir)
    if found:
        log.warning("train.resume=false: removing %d checkpoint(s) of this config (%s); training starts from step 0",
                    len(found), ", ".join(p.name for p in found))  # fmt: skip
    shutil.rmtree(ckpt_dir, ignore_errors=True)


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
