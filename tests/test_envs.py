"""The lock and the conda envs (envs/, one per stage family) agree with pyproject.toml, the envs
pin what their stages import as the lock pins it, and every rule uses its family's env. Text only
(no env is built): well under a second."""

from __future__ import annotations

import ast
import hashlib
import re
import shutil
import subprocess
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from helpers import BIN, REPO
from helpers.imports import path as module_path
from helpers.imports import reachable

ENVS = REPO / "envs"
EDITABLE = "-e .."  # ftflow itself, from the checkout (relative to envs/)

# family -> its rules (and the modules those rules run)
RULES = {
    "data": {"download_source", "download_model", "download_eval", "download", "normalize", "pack", "report"},
    "train": {"train", "consolidate"},
    "eval": {"evaluate"},
}
MODULES = {
    "data": ("data.download", "data.normalize", "pack.stage", "report"),
    "train": ("train.stage", "train.__main__", "consolidate"),
    "eval": ("evaluate",),
}
# what ftflow needs wherever it is installed: its config (`ftflow <stage>` composes conf/), and the
# Snakemake and DVC front ends of its CLI (run, dispatch, dvc-yaml, sync, pull)
COMMON = ("config.params", "config.schema", "workflow.dvcyaml", "workflow.sync")
# needed although no ftflow module imports them: train runs under `python -m accelerate...`;
# lm-eval's HF backend imports transformers and accelerate (its hf extra, not requested)
UNIMPORTED = {"train": {"accelerate"}, "eval": {"transformers", "accelerate"}}
ACTIONS = ("script", "shell", "run", "wrapper", "notebook", "cwl")


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
DEPS = {canon(r.name): r for r in map(Requirement, PROJECT["dependencies"])}
EXTRAS = {canon(r.name): r for reqs in PROJECT["optional-dependencies"].values() for r in map(Requirement, reqs)}
TORCH = re.search(r"^TORCH\s*\?=\s*(\S+)", (REPO / "Makefile").read_text(), re.M).group(1)  # the lock's torch build
LOCK = {
    canon(name): Version(v)
    for name, v in re.findall(r"^([\w.-]+)==(\S+) \\$", (REPO / "requirements.lock").read_text(), re.M)
}


def env(family: str) -> tuple[list[str], list[str]]:
    """An env file's conda entries and pip entries, in order."""
    deps = yaml.safe_load((ENVS / f"{family}.yaml").read_text())["dependencies"]
    pips = [d["pip"] for d in deps if isinstance(d, dict)]
    assert len(pips) == 1, f"{family}.yaml: one pip: list"
    return [d for d in deps if isinstance(d, str)], pips[0]


def listed(family: str) -> dict[str, Requirement]:
    """The packages an env names (conda or pip), torch and ftflow's own line aside."""
    conda, pip = env(family)
    reqs = [Requirement(c) for c in conda if canon(re.match(r"[\w.-]+", c).group()) in DEPS | EXTRAS]
    reqs += [Requirement(p) for p in pip if p != EDITABLE]
    names = [canon(r.name) for r in reqs]
    assert len(names) == len(set(names)), f"{family}.yaml lists a package twice: {names}"
    return {n: r for n, r in zip(names, reqs) if n != "torch"}


def test_one_env_file_per_family():
    assert sorted(p.name for p in ENVS.iterdir()) == sorted(f"{f}.yaml" for f in RULES)


def test_the_lock_pins_every_dependency_within_pyprojects_specifiers():
    """requirements.lock (make lock) pins each dependency of pyproject.toml and its dev extra, at
    a version its specifier admits, torch as the Makefile's build, and nothing twice."""
    dev = {canon(r.name): r for r in map(Requirement, PROJECT["optional-dependencies"]["dev"])}
    for name, req in (DEPS | dev).items():
        assert name in LOCK, f"requirements.lock has no {name}: run make lock"
        assert req.specifier.contains(LOCK[name], prereleases=True), f"lock {name}=={LOCK[name]}, pyproject {req}"
    assert LOCK["torch"] == Version(TORCH)


@pytest.mark.parametrize("family", RULES)
def test_packages_carry_the_locks_pins(family):
    for name, req in listed(family).items():
        assert name in DEPS or name in EXTRAS, f"{family}.yaml: {req} is not a pyproject.toml dependency"
        if name in EXTRAS and name not in LOCK:  # the gpu extra: not in the CPU lock, pyproject's specifier
            assert (req.specifier, req.extras) == (EXTRAS[name].specifier, EXTRAS[name].extras), f"{family}.yaml: {req}"
            continue
        assert str(req.specifier) == f"=={LOCK[name]}" and not req.marker, f"{family}.yaml: {req}, lock: =={LOCK[name]}"


@pytest.mark.parametrize("family", RULES)
def test_torch_pinned_first_and_ftflow_installed_from_the_checkout(family):
    conda, pip = env(family)
    # pinned before anything that requires it, or pip resolves a torch of its own choosing: the
    # lock's version, its build (+cpu, or a CUDA one on GPU nodes) left to the node
    torch = f"torch=={Version(TORCH).public}"
    assert pip[0] == torch, f"{family}.yaml: pip list starts with {pip[0]!r}, not {torch}"
    assert pip.count(EDITABLE) == 1 and pip.index(EDITABLE) > 0
    root = (ENVS / EDITABLE.split()[1]).resolve()
    assert tomllib.loads((root / "pyproject.toml").read_text())["project"]["name"] == "ftflow"
    python = [c for c in conda if re.match(r"python\b", c)]
    assert python == ["python=3.11"] and "pip" in conda
    assert Version("3.11") in SpecifierSet(PROJECT["requires-python"])


def test_every_dependency_is_in_an_env():
    names = set().union(*(listed(f) for f in RULES)) | {"torch"}
    assert set(DEPS) - names == set()


def imported_modules(roots: tuple[str, ...]) -> set[str]:
    """Top-level modules that these ftflow modules, and the ftflow modules they import, import
    (inside functions too: most heavy imports are deferred)."""
    ftflow = set().union(*(reachable(root, every=True) for root in roots))
    found = set()
    for mod in ftflow:
        for node in ast.walk(ast.parse(module_path(mod).read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            found |= {name.split(".")[0] for name in names if name.split(".")[0] != "ftflow"}
    return found


@pytest.mark.parametrize("family", RULES)
def test_env_lists_what_its_stages_import(family):
    dists = packages_distributions()
    needed = {canon(d) for m in imported_modules(COMMON + MODULES[family]) for d in dists.get(m, [])}
    needed = (needed | UNIMPORTED.get(family, set())) & set(DEPS)
    assert needed - set(listed(family)) - {"torch"} == set()


def rule_envs() -> dict[str, str | None]:
    """Each rule's `conda:` value (None: none), from the rule files' text: parsing them through
    Snakemake runs common.smk (the config, the stage modules), seconds. Rules without an action
    (`all`) are left out."""
    found = {}
    for smk in [*sorted((REPO / "rules").glob("*.smk")), REPO / "workflow" / "Snakefile"]:
        lines = smk.read_text().splitlines()
        for i, line in enumerate(lines):
            m = re.match(r"rule (\w+):", line)
            if not m:
                continue
            body = []
            for nxt in lines[i + 1 :]:
                if nxt.strip() and not nxt.startswith(" "):
                    break
                body.append(nxt)
            directives = {}
            for j, b in enumerate(body):
                if d := re.match(r" {4}(\w+):", b):
                    directives[d[1]] = j
            if not directives.keys() & set(ACTIONS):
                continue
            assert m[1] not in found, f"rule {m[1]} defined twice"
            value = None
            if "conda" in directives:
                j = directives["conda"]
                inline = body[j].split(":", 1)[1].strip()
                value = ast.literal_eval(inline or body[j + 1].strip())
                value = str((smk.parent / value).resolve())  # relative to the rule's own file
            found[m[1]] = value
    return found


def test_every_rule_uses_its_familys_env():
    envs = rule_envs()
    assert all(envs.values()), f"rules without a conda env: {[r for r, e in envs.items() if not e]}"
    by_family = {}
    for rule, path in envs.items():
        path = Path(path)
        assert path.parent == ENVS and path.exists(), f"rule {rule}: {path}"
        by_family.setdefault(path.stem, set()).add(rule)
    assert by_family == RULES


def test_provenance_says_whether_the_environment_is_the_locks(tmp_path):
    """The test environment is the lock's (make setup installs exactly it); an environment with
    another version of a pinned package is named in provenance and in the report's note."""
    from ftflow.provenance import environment
    from ftflow.report import environment_note

    text = (REPO / "requirements.lock").read_text()
    env = environment(REPO)
    assert env["lock_sha256"] == hashlib.sha256(text.encode()).hexdigest() and env["differs"] == {}, env["differs"]
    assert environment_note(env).startswith("The environment is exactly requirements.lock")
    installed = re.search(r"^pyyaml==(\S+) \\$", text, re.M).group(1)
    (tmp_path / "requirements.lock").write_text(text.replace(f"pyyaml=={installed} \\", "pyyaml==0.1 \\"))
    env = environment(tmp_path)
    assert env["differs"] == {"pyyaml": {"lock": "0.1", "installed": installed}}
    assert "DIFFERS from requirements.lock" in environment_note(
        env
    ) and f"pyyaml {installed} (lock 0.1)" in environment_note(env)
    assert environment(tmp_path / "elsewhere") == {"lock": None, "differs": None}


def test_make_lock_keeps_the_lock_as_it_is(tmp_path):
    """`make lock` with pyproject.toml unchanged gives the same lock: make's command, run on a
    copy with the same relative paths (they appear in the lock's comments). uv prefers the pins
    it finds in its output file, so a new release on the index changes nothing."""
    make = (REPO / "Makefile").read_text()
    assert "printf 'torch==$(TORCH)\\n' > $(VENV)/torch-override.txt" in make and "-o requirements.lock" in make
    for name in ("pyproject.toml", "requirements.lock"):
        shutil.copy(REPO / name, tmp_path / name)
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "torch-override.txt").write_text(f"torch=={TORCH}\n")
    wheels = ["--find-links", "/opt/wheels"] if list(Path("/opt/wheels").glob("torch-*")) else [
        "--extra-index-url", "https://download.pytorch.org/whl/cpu"]  # fmt: skip
    subprocess.run([str(BIN / "uv"), "pip", "compile", "-q", "pyproject.toml", "--extra", "dev", "--generate-hashes",
                    "--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_28",
                    "--override", ".venv/torch-override.txt", *wheels, "--custom-compile-command", "make lock",
                    "-o", "requirements.lock"], check=True, cwd=tmp_path)  # fmt: skip
    assert (tmp_path / "requirements.lock").read_text() == (REPO / "requirements.lock").read_text()
