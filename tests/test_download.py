"""download: local copies and the hub path, against a local stand-in of the hub cache."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ftflow import paths
from ftflow.download import download

from conftest import ftflow

SHA = "0123456789abcdef0123456789abcdef01234567"


def test_local_source_is_copied_and_hashed(tmp_path):
    src = tmp_path / "in" / "train.jsonl"
    src.parent.mkdir()
    src.write_text('{"instruction": "a", "output": "b"}\n')
    cfg = {"data": {"sources": [{"name": "mine", "path": str(src)}]}, "model": {"name": "m", "source": "scratch"}}
    manifest = download(cfg, tmp_path)
    copied = tmp_path / paths.RAW / "mine" / "train.jsonl"
    assert copied.read_text() == src.read_text()
    entry = manifest["sources"]["mine"]
    assert entry["files"] == {"train.jsonl": hashlib.sha256(src.read_bytes()).hexdigest()}
    assert entry["revision"] is None and entry["uri"] == str(src)
    assert json.loads((tmp_path / paths.MANIFEST).read_text()) == manifest


def fake_hub_repo(cache: Path, kind: str, repo_id: str, files: dict[str, str]) -> None:
    """A repo in huggingface_hub's cache layout: refs/main -> <sha>, snapshots/<sha>/files."""
    repo = cache / f"{kind}s--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    for name, text in files.items():
        path = repo / "snapshots" / SHA / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_hub_dataset_and_model_resolve_the_pinned_revision(repo, tmp_path):
    cache = tmp_path / "hub"
    fake_hub_repo(cache, "dataset", "org/words", {"data/train.jsonl": '{"instruction": "a", "output": "b"}\n'})
    fake_hub_repo(cache, "model", "org/tiny", {"config.json": "{}", "model.safetensors": "weights"})
    (repo / "conf" / "data" / "hub_words.yaml").write_text(
        "sources:\n  - {name: words, hub: org/words, revision: main, split: train}\n"
    )
    os.environ["HF_HUB_CACHE"] = str(cache)  # read by the ftflow subprocess (HF_HUB_OFFLINE=1 there)
    try:
        ftflow("download", "data=hub_words", "model=hub", "model.hub_id=org/tiny", f"model.revision={SHA}",
               "tokenizer=model", cwd=repo)  # fmt: skip
    finally:
        del os.environ["HF_HUB_CACHE"]
    manifest = json.loads((repo / paths.MANIFEST).read_text())
    words = manifest["sources"]["words"]
    assert words["uri"] == "hf://datasets/org/words"
    assert (words["requested_revision"], words["revision"]) == ("main", SHA)  # the branch resolved to its commit
    assert set(words["files"]) == {"data/train.jsonl"}
    model = manifest["models"]["hub_model"]
    assert model["revision"] == SHA and (repo / paths.MODELS / "hub_model" / "model.safetensors").read_text() == "weights"


def test_hub_revision_missing_offline_fails(repo, tmp_path):
    cache = tmp_path / "hub"
    fake_hub_repo(cache, "model", "org/tiny", {"config.json": "{}"})
    os.environ["HF_HUB_CACHE"] = str(cache)
    try:
        proc = ftflow("download", "model=hub", "model.hub_id=org/tiny", "model.revision=v9", "tokenizer=model",
                      cwd=repo, check=False)  # fmt: skip
    finally:
        del os.environ["HF_HUB_CACHE"]
    assert proc.returncode != 0
    assert not (repo / paths.MANIFEST).exists()  # nothing that looks complete
