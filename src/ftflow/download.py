"""download: bring every data source and the base model into data/, and record what was taken.

A local rule: login nodes have internet, compute nodes often do not. Hub sources go through
`huggingface_hub.snapshot_download` with a pinned revision; the manifest records the resolved
commit sha and a sha256 of every file, so a later run can prove it used the same bytes.
Offline (HF_HUB_OFFLINE=1) the same call resolves from the local hub cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from ftflow import paths

log = logging.getLogger(__name__)


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_hashes(root: Path) -> dict[str, str]:
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and ".cache" not in p.parts)
    return {str(p.relative_to(root) if p != root else p.name): sha256(p) for p in files}


def fetch_hub(repo_id: str, revision: str | None, repo_type: str, dest: Path, allow_patterns=None) -> str:
    """Snapshot a hub repo into dest; returns the resolved commit sha."""
    from huggingface_hub import snapshot_download

    # snapshot_download resolves the revision to a commit (online: via the API; offline: via the
    # cache's refs/), fetches into the cache, and returns snapshots/<sha>/, whose name is the sha.
    snapshot = Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision, allow_patterns=allow_patterns))
    copy_tree(snapshot, dest)
    return snapshot.name


def copy_tree(src: Path, dest: Path) -> None:
    """Replace dest with a copy of src (a file or a directory); symlinks are dereferenced."""
    if dest.exists():
        shutil.rmtree(dest)
    if src.is_file():
        dest.mkdir(parents=True)
        shutil.copy2(src, dest / src.name)
    else:
        shutil.copytree(src, dest, symlinks=False)


def fetch_local(path: str, dest: Path, files: list[str] | None = None) -> str | None:
    src = Path(path)
    if not src.exists():
        raise FileNotFoundError(f"local path {path} does not exist")
    if files and src.is_dir():
        if dest.exists():
            shutil.rmtree(dest)
        for pattern in files:
            for p in sorted(src.glob(pattern)):
                (dest / p.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, dest / p.relative_to(src))
    else:
        copy_tree(src, dest)
    return None  # a local path has no revision; the file hashes pin it


def download_source(source: dict, root: Path) -> dict:
    dest = root / paths.RAW / source["name"]
    if source.get("hub"):
        log.info("Downloading dataset <%s@%s> into %s", source["hub"], source.get("revision"), dest)
        rev = fetch_hub(source["hub"], source.get("revision"), "dataset", dest, source.get("files"))
        uri = f"hf://datasets/{source['hub']}"
    else:
        log.info("Copying dataset <%s> into %s", source["path"], dest)
        rev = fetch_local(source["path"], dest, source.get("files"))
        uri = str(Path(source["path"]))
    return {"uri": uri, "requested_revision": source.get("revision"), "revision": rev, "files": file_hashes(dest)}


def download_model(model: dict, root: Path) -> dict | None:
    if model["source"] == "scratch":
        return None  # initialised by train from model.architecture
    dest = root / paths.MODELS / model["name"]
    if model["source"] == "hub":
        log.info("Downloading model <%s@%s> into %s", model["hub_id"], model.get("revision"), dest)
        rev = fetch_hub(model["hub_id"], model.get("revision"), "model", dest)
        uri = f"hf://{model['hub_id']}"
    else:
        log.info("Copying model <%s> into %s", model["path"], dest)
        rev, uri = fetch_local(model["path"], dest), str(Path(model["path"]))
    return {"uri": uri, "requested_revision": model.get("revision"), "revision": rev, "files": file_hashes(dest)}


def download(cfg: dict, root: Path = Path(".")) -> dict:
    """Run the stage; `cfg` is the stage's params (source locations and the model location)."""
    # the stage's resolved config rides in the manifest: data/ holds only what was downloaded
    manifest = {"config": cfg, "sources": {}, "models": {}}
    for source in cfg["data"]["sources"]:
        manifest["sources"][source["name"]] = download_source(source, root)
    model = download_model(cfg["model"], root)
    if model:
        manifest["models"][cfg["model"]["name"]] = model
    out = root / paths.MANIFEST
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest
