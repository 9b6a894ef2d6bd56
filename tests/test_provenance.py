"""Provenance's git state: a tree is dirty when tracked code or config a person changed differs
from the commit, not when a run rewrote its own state files (params.yaml, recorded in full)."""

from __future__ import annotations

import subprocess

from ftflow.provenance import git_diff, git_state


def git(root, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True,
                   capture_output=True)  # fmt: skip


def test_only_changes_a_person_made_make_the_tree_dirty(tmp_path):
    for name, text in (
        ("params.yaml", "a: 1\n"),
        ("data.dvc", "outs: []\n"),
        ("dvc.lock", "{}\n"),
        ("code.py", "x = 1\n"),
    ):
        (tmp_path / name).write_text(text)
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-qm", "first")
    for name in ("params.yaml", "data.dvc", "dvc.lock"):  # what `ftflow run` / `dvc repro` rewrite
        (tmp_path / name).write_text("changed: true\n")
    state = git_state(tmp_path)
    assert state["dirty"] is False and state["changed"] == [] and len(state["commit"]) == 40
    assert git_diff(tmp_path) == ""
    (tmp_path / "code.py").write_text("x = 2\n")
    state = git_state(tmp_path)
    assert state["dirty"] is True and state["changed"] == ["code.py"]
    assert "+x = 2" in git_diff(tmp_path) and "params.yaml" not in git_diff(tmp_path)

    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "mine.yaml").write_text("kind: conversation\n")  # never committed
    (tmp_path / "notes.txt").write_text("not code\n")
    assert git_state(tmp_path)["changed"] == ["code.py", "conf/mine.yaml"]
