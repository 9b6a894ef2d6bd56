"""Two runs at once on one workspace: the second is refused at once, naming the first, and the
first finishes unharmed (DVC's side: tests/workflow/test_dvc.py)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftflow.workflow.workspace import LOCK

from helpers import BIN, copy_repo, env, ftflow, planned_jobs, run


def start(root: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "ftflow"), *args], cwd=root, env=env(), text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip


def wait_for_holder(root: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (root / LOCK).exists() and f'"pid": {proc.pid}' in (root / LOCK).read_text():
            return
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.1)
    raise AssertionError(f"{root / LOCK} names no holder after {timeout} s")


@pytest.mark.slow
def test_a_second_run_is_refused_naming_the_first(tmp_path):
    root = copy_repo(tmp_path / "repo")
    first = start(root, "run", "experiment=smoke")
    wait_for_holder(root, first)
    holder = rf"in use by `ftflow run experiment=smoke` \(pid {first.pid} on [\w.-]+, since [\d:]+\)"
    second = [
        [str(BIN / "ftflow"), "run", "experiment=smoke"],
        [str(BIN / "ftflow"), "train", "experiment=smoke"],
        [str(BIN / "ftflow"), "compose", "experiment=demo_lora"],  # would change params.yaml under it
        [str(BIN / "snakemake"), "--profile", "profiles/local"],  # refused before its first job
    ]
    for cmd in second:
        began = time.time()
        proc = run(cmd, root, check=False)
        assert proc.returncode != 0 and re.search(holder, proc.stderr + proc.stdout), (cmd, proc.stderr[-2000:])
        assert time.time() - began < 20, cmd  # at once: before any work (snakemake: after its DAG)
        assert first.poll() is None, "the first run ended before the refusals were all tried"
    assert run([str(BIN / "snakemake"), "--profile", "profiles/local", "-n"], root).returncode == 0  # reading is fine
    assert first.wait(timeout=600) == 0, first.stderr.read()[-3000:]
    first.stderr.close()
    # the first run's outputs are whole, and the workspace is free again: the hold went with it
    assert planned_jobs(root) == {}
    ftflow("compose", "experiment=smoke", cwd=root)
    assert planned_jobs(root) == {}


def test_the_holder_named_is_the_command_past_the_shells_that_ran_it():
    """DVC runs `ftflow dispatch` through `/bin/sh -c`, which does not always exec it: the lock
    must name the `dvc ...` command, not the shell (seen in CI with a shell that stayed)."""
    script = "from ftflow.workflow.workspace import launcher; import os; print(launcher(os.getpid()))"
    # two shells that cannot exec (`; true` follows), under a Python that stands in for dvc
    shells = f"""bash -c "{BIN / "python"} -c '{script}'; true"; true"""
    parent = [sys.executable, "-c", f"import subprocess; subprocess.call(['sh', '-c', {shells!r}])"]
    out = subprocess.run(parent, text=True, capture_output=True, check=True).stdout.strip()
    assert out == " ".join(parent), out
