"""Experiment tracking: a wandb run per training run, offline unless a key is configured.

Only the process of rank 0 talks to wandb. The run carries the resolved stage config and the
provenance record (git commit, dirty flag, package versions, input hashes); git.diff is saved
with it. Secrets never reach it: wandb's own git probing (which records the remote URL, where
tokens hide) is off, and nothing from the environment is logged.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path

from ftflow.config.schema import Tracking

log = logging.getLogger(__name__)


def wandb_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(cfg: Tracking) -> str:
    if cfg.mode != "auto":
        return cfg.mode
    return "online" if wandb_key_configured() else "offline"


def start(cfg: Tracking, run_id: str, name: str, config: dict, files: list[Path], folder: Path) -> list[str]:
    """Start the run (rank 0 only) and return the trainer's `report_to`."""
    if cfg.backend == "none" or wandb_mode(cfg) == "disabled":
        return []
    import wandb

    mode = wandb_mode(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=cfg.project,
        group=cfg.group or os.environ.get("DVC_EXP_NAME"),  # `dvc exp run` names the experiment
        name=cfg.name or name,
        tags=cfg.tags,
        id=run_id,  # a resumed training continues its run
        resume="allow",
        mode=mode,
        dir=str(folder),
        config={"ftflow": config},
        settings=wandb.Settings(disable_git=True, save_code=False, console="off", x_disable_stats=True),
    )
    for path in files:
        if path.exists():
            run.save(str(path), base_path=str(path.parent), policy="now")
    log.info("wandb run %s (%s) in %s", run.id, mode, folder)
    return ["wandb"]


def finish() -> None:
    import sys

    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()
