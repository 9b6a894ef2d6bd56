"""Make Snakemake agree with DVC after DVC put files in place (`dvc pull`, `dvc checkout`,
`dvc exp apply`).

DVC restores outputs by content and does not keep modification times, so Snakemake, which
compares mtimes, may see an output older than its input and want to rerun it; and Snakemake's
records in .snakemake/metadata may hold the params of whatever ran here before. DVC's lock is
the content-addressed truth, so `ftflow sync` asks DVC which stages are up to date and:

  - stamps the outputs of up-to-date stages in DAG order (upstream first), so Snakemake sees
    nothing to do there;
  - stamps the outputs of stages DVC wants to rerun as very old, so Snakemake reruns them too;
  - drops Snakemake's records for all of them (DVC's lock now speaks for them).

Directory outputs carry their time in `<dir>/.snakemake_timestamp` (Snakemake's own marker,
which .dvcignore keeps out of DVC so that it is never shared through the cache).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

from ftflow import stages
from ftflow.config import params
from ftflow.workflow import dvcyaml

log = logging.getLogger(__name__)

DOWNLOAD_RULES = tuple(stages.BY_NAME["download"].rule_entries())  # versioned by `dvc add data`
ORDER = tuple(stages.RULES)  # the DAG, upstream first
DATA_DVC = "data.dvc"
TIMESTAMP = ".snakemake_timestamp"
STALE_TIME = 0.0  # older than any input: Snakemake reruns the job


def stale_stages(root: Path) -> set[str]:
    """The rules whose outputs `dvc status` reports as changed (the download rules for data.dvc)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        changed = repo.status()
    names = {key.split(":")[-1] for key in changed}
    return (names - {DATA_DVC}) | (set(DOWNLOAD_RULES) if DATA_DVC in names else set())


def concrete_outputs(rule, tree: dict) -> list[str]:
    """A rule's outputs as paths; a download rule's {source} / {model} for each configured one."""
    values = {
        "source": [s["name"] for s in tree["data"]["sources"]],
        "model": [] if tree["model"]["source"] == "scratch" else [tree["model"]["name"]],
    }
    out = []
    for pattern in map(str, rule.output):
        wildcard = next((w for w in values if "{" + w + "}" in pattern), None)
        out += [pattern.replace("{" + wildcard + "}", v) for v in values[wildcard]] if wildcard else [pattern]
    return out


def stamp(path: Path, when: float) -> bool:
    """Set the time Snakemake reads for an output; False when it does not exist."""
    if path.is_dir() and not path.is_symlink():
        marker = path / TIMESTAMP
        marker.touch()
        os.utime(marker, (when, when))
    elif path.is_symlink() or path.exists():
        # a DVC symlink: Snakemake reads the link's own time for outputs
        os.utime(path, (when, when), follow_symlinks=False)
    else:
        return False
    return True


def drop_records(outputs: list[str], root: Path) -> None:
    """Forget Snakemake's records of these outputs. Snakemake deletes every record it has and
    exits non-zero naming those it had none of (a fresh clone has none): that is fine here."""
    snakemake = shutil.which("snakemake") or "snakemake"
    proc = subprocess.run([snakemake, "--cleanup-metadata", *outputs], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0 and "metadata was not present" not in proc.stdout + proc.stderr:
        raise RuntimeError(f"snakemake --cleanup-metadata failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")


def sync(root: Path = Path(".")) -> set[str]:
    """Align Snakemake's view with DVC's; returns the stages DVC (and now Snakemake) will rerun."""
    root = Path(root)
    rules = {rule.name: rule for rule in dvcyaml.snakemake_rules(root)}
    tree, _ = params.read_params(root / params.PARAMS_FILE)
    stale = stale_stages(root)
    now, stamped = time.time(), []
    for i, name in enumerate(ORDER):
        when = STALE_TIME if name in stale else now + 0.01 * i
        stamped += [f for f in concrete_outputs(rules[name], tree) if stamp(root / f, when)]
    if stamped:
        drop_records(stamped, root)
    log.info("Snakemake now agrees with DVC: %s", f"to rerun: {sorted(stale)}" if stale else "nothing to rerun")
    return stale
