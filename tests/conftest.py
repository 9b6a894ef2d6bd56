"""Shared fixtures (the helpers they use, and the tests and benchmarks too, are in helpers/)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import SMOLLM2_GGUF, copy_repo, ftflow


def pytest_collection_modifyitems(config, items):
    """A `gpu` test runs only where CUDA is; elsewhere it is reported as not run (pytest -ra)."""
    gpu = [item for item in items if "gpu" in item.keywords]
    if gpu:
        import torch

        if not torch.cuda.is_available():
            for item in gpu:
                item.add_marker(pytest.mark.skip(reason="not run: needs a CUDA GPU"))


@pytest.fixture(scope="session")
def finished(tmp_path_factory) -> Path:
    """A repository copy in which `ftflow run experiment=smoke` has completed (on this machine).
    Tests that change it put it back as it was."""
    root = copy_repo(tmp_path_factory.mktemp("wf") / "repo")
    ftflow("run", "experiment=smoke", cwd=root)
    return root


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real two-node Slurm cluster on this host (tests/helpers/slurm_cluster.py), for the
    session. Without the Slurm packages this fails with the install command: CI must never skip it."""
    from helpers.slurm_cluster import LocalSlurm

    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def repo(tmp_path: Path, monkeypatch) -> Path:
    """A copy of the workflow in a temporary directory, which is also the working directory."""
    root = copy_repo(tmp_path / "repo")
    monkeypatch.chdir(root)
    return root


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain HF directory (float32 safetensors, tokenizer with its
    chat template, generation config), converted by download's own function once per machine
    and reused after that (the cache is keyed by the GGUF's sha256: ~/.cache/ftflow/gguf/, or
    $FTFLOW_CACHE/gguf/). Read-only for tests: copy it to change it. Without the package this
    fails with the install command: a test of the real path is never skipped."""
    from ftflow.data.download import DownloadError, convert_gguf, resolve_path

    try:
        gguf = resolve_path(SMOLLM2_GGUF)
    except DownloadError as err:
        pytest.fail(f"the offline real model is missing: {err}", pytrace=False)
    return convert_gguf(gguf)[0]
