"""The GPU benchmark's run (benchmarks/gpu/bench.py), prepared here: the wheels it carries
(benchmarks/gpu/wheels.txt) are fetched one for each listed distribution and fit beside the
working tree; their requirements are met by each other or by the machine
(benchmarks/gpu/machine.txt); and the script's --cpu mode, run with only those distributions
importable and every Python process's imports recorded, runs every section, and imports nothing
that is neither on the machine nor carried. About four minutes on 2 cores, most of it the run.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import sysconfig
import warnings
import zipfile
from dataclasses import dataclass
from email.parser import HeaderParser
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from helpers import BIN, REPO

GPU = REPO / "benchmarks/gpu"
BENCH = GPU / "bench.py"
# The run whose imports are checked: the GPU benchmark on CPU ({out}: a temporary folder). It
# imports what the GPU run imports but GPU_ONLY_IMPORTS, a set bench.py defines (read here as
# text: bench.py is not imported), which are checked as well.
COMMAND = "python benchmarks/gpu/bench.py --cpu --out {out}"
RUN_TIMEOUT_S = 600

_spec = importlib.util.spec_from_file_location("fetch_wheels", GPU / "fetch_wheels.py")
fetch_wheels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fetch_wheels)
canonical = fetch_wheels.canonical
PACKAGES = metadata.packages_distributions()  # this environment's {top-level module: its distributions}


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory) -> Path:
    """The listed wheels, fetched as `make gpu-wheels` fetches them (into a temporary folder)."""
    dest = tmp_path_factory.mktemp("whl")
    cmd = [sys.executable, str(GPU / "fetch_wheels.py"), "--dest", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return dest


def wheel_metadata(wheel: Path):
    """A wheel's METADATA (email headers)."""
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
        return HeaderParser().parsestr(z.read(name).decode())


def wheel_modules(wheel: Path) -> set[str]:
    """The top-level modules a wheel installs."""
    with zipfile.ZipFile(wheel) as z:
        tops = {n.split("/")[0] for n in z.namelist()}
    tops = {t for t in tops if not t.endswith((".dist-info", ".data"))}
    return {t.split(".")[0] if t.endswith((".py", ".so")) else t for t in tops}


def carried(wheel_dir: Path) -> dict[str, tuple[str, object, set[str]]]:
    """{distribution: (version, METADATA, top-level modules)} of the fetched wheels."""
    found = {}
    for wheel in sorted(wheel_dir.glob("*.whl")):
        meta = wheel_metadata(wheel)
        found[canonical(meta["Name"])] = (meta["Version"], meta, wheel_modules(wheel))
    return found


def test_one_wheel_for_each_listed_distribution_within_the_carry_limit(wheel_dir):
    listed = fetch_wheels.read_wheels()
    names = [fetch_wheels.wheel_name(w.name)[0] for w in wheel_dir.glob("*.whl")]
    counts = {n: names.count(n) for n in listed}
    assert all(c == 1 for c in counts.values()), f"wheels per listed distribution: {counts}"
    assert set(names) == set(listed), f"wheels of unlisted distributions: {sorted(set(names) - set(listed))}"
    lock, wheels = fetch_wheels.read_lock(), carried(wheel_dir)
    for name, pin in listed.items():  # the lock's version, or the list's for a name the lock lacks
        assert wheels[name][0] == (pin or lock[name][0]), name
    folder, tree = fetch_wheels.folder_size(wheel_dir), fetch_wheels.tree_size()
    mib = fetch_wheels.mib
    assert folder + tree < fetch_wheels.LIMIT, (
        f"wheels {mib(folder)} + working tree {mib(tree)} = {mib(folder + tree)}: over {mib(fetch_wheels.LIMIT)}"
    )
    print(f"wheels {mib(folder)} + working tree {mib(tree)} = {mib(folder + tree)} of {mib(fetch_wheels.LIMIT)}")


def marker_environment(python: str) -> dict[str, str]:
    """PEP 508 marker values of the machine's interpreter (CPython on x86-64 Linux); no extra."""
    return {"implementation_name": "cpython", "implementation_version": python, "os_name": "posix",
            "platform_machine": "x86_64", "platform_python_implementation": "CPython", "platform_release": "",
            "platform_system": "Linux", "platform_version": "", "python_full_version": python,
            "python_version": ".".join(python.split(".")[:2]), "sys_platform": "linux", "extra": ""}  # fmt: skip


def test_carried_wheels_requirements_are_met_there(wheel_dir):
    """Each carried wheel's Requires-Dist (for the machine's Python, extras aside) is met by
    another carried wheel or by the machine's version; where machine.txt records no version,
    its presence is taken (and those requirements are reported as a warning)."""
    wheels, machine = carried(wheel_dir), fetch_wheels.read_machine()
    env = marker_environment(fetch_wheels.machine_python())
    unmet, unverified = [], []
    for name, (version, meta, _) in wheels.items():
        for line in meta.get_all("Requires-Dist") or []:
            req = Requirement(line)
            if req.marker and not req.marker.evaluate(env):
                continue
            dep, who = canonical(req.name), f"{name} {version} requires {req}"
            if dep in wheels:
                have, where = wheels[dep][0], "carried"
            elif dep in machine and machine[dep] is None:
                if req.specifier:
                    unverified.append(f"{who}: on the machine, version not recorded")
                continue
            elif dep in machine:
                have, where = machine[dep], "the machine has"
            else:
                unmet.append(f"{who}: neither carried nor on the machine")
                continue
            if not req.specifier.contains(have, prereleases=True):
                unmet.append(f"{who}: {where} {have}")
    if unverified:
        warnings.warn("GPU machine versions to check (python3 -m pip show NAME there):\n" + "\n".join(unverified))
    assert not unmet, "requirements of carried wheels not met on the GPU machine:\n" + "\n".join(unmet)


# Put on PYTHONPATH as sitecustomize.py, so that every Python process of the run loads it, the
# workers `accelerate launch` starts and forked children (which leave through os._exit) included.
RECORDER = '''"""tests/test_gpu_run.py's import recorder (a temporary file).

At the exit of this process (os._exit and os.exec* too), appends to $IMPORT_RECORD_DIR/<pid>.tsv
the top-level modules in sys.modules (in a namespace package, those inside it), each with its
file and the module that first looked its top-level name up, and the top-level names looked up
but found nowhere. With $IMPORT_VIEW set, imports see the folder there in place of
site-packages ($IMPORT_SITE): only some distributions' files.
"""

import os
import sys

_DIR = os.environ.get("IMPORT_RECORD_DIR")
_seen, _missing, _done = {}, {}, []


def _importer():
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__") or ""
        if not name.startswith(("importlib", "_frozen_importlib", "sitecustomize")):
            return name
        frame = frame.f_back
    return ""


class _First:
    """First in sys.meta_path: notes who looks a top-level name up first; finds nothing."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if path is None and name not in _seen:
            _seen[name] = _importer()


class _Last:
    """Last in sys.meta_path: reached only when no finder has the module."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if path is None and name not in _missing:
            _missing[name] = _importer()


def _file(module):
    try:
        return getattr(module, "__file__", None) or ""
    except Exception:
        return ""


def _record():
    if _done:
        return
    _done.append(True)
    lines = ["argv\\t" + " ".join(sys.argv)]
    modules = dict(sys.modules)
    # the top-level modules; in a namespace package (no file: several distributions may share
    # it), the modules inside it
    namespaces = {n for n, m in modules.items() if "." not in n and not _file(m) and hasattr(m, "__path__")}
    for name, module in modules.items():
        top, dot, rest = name.partition(".")
        if not dot or (top in namespaces and "." not in rest):
            lines.append(f"loaded\\t{name}\\t{_file(module)}\\t{_seen.get(top, '')}")
    lines += [f"missing\\t{name}\\t{who}" for name, who in _missing.items()]
    with open(os.path.join(_DIR, f"{os.getpid()}.tsv"), "a") as f:
        f.write("\\n".join(lines) + "\\n")


def _recording(func):
    def wrapper(*args, **kwargs):
        _record()
        return func(*args, **kwargs)

    return wrapper


if _DIR:
    import atexit

    atexit.register(_record)
    os._exit = _recording(os._exit)
    os.execv = _recording(os.execv)
    os.execve = _recording(os.execve)
    sys.meta_path.insert(0, _First)
    sys.meta_path.append(_Last)
    _view, _site = os.environ.get("IMPORT_VIEW"), os.environ.get("IMPORT_SITE")
    if _view and _site:
        _site = os.path.realpath(_site)
        sys.path[:] = [_view if os.path.realpath(p) == _site else p for p in sys.path]
'''


def site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def installed() -> dict[str, metadata.Distribution]:
    return {canonical(d.metadata["Name"]): d for d in metadata.distributions(path=[str(site_packages())])}


def support(machine: set[str], allowed: set[str]) -> dict[str, str]:
    """{distribution: the one requiring it} of what the machine's distributions need as installed
    here, not as they are there (huggingface-hub 2.4 here imports httpx2, the machine's 1.33 does
    not): their requirements, transitively, that are neither on the machine nor carried. The run
    sees them, but only the machine's distributions (and these) may import them."""
    here = installed()
    todo, found = [n for n in machine if n in here], {}
    while todo:
        name = todo.pop()
        for line in here[name].requires or []:
            req = Requirement(line)
            dep = canonical(req.name)
            if (
                (not req.marker or req.marker.evaluate({"extra": ""}))
                and dep in here
                and dep not in allowed | set(found)
            ):
                found[dep] = name
                todo.append(dep)
    return found


def machine_view(view: Path, allowed: set[str]) -> Path:
    """A folder of links to the files of this environment's distributions in `allowed` (their
    modules and .dist-info): site-packages as the GPU machine would have it with the wheels
    installed. A folder two distributions share (a namespace package) is made here and its
    entries linked one by one, so that one not allowed stays out."""
    site = site_packages()
    mine: set[tuple[str, ...]] = set()
    others: set[tuple[str, ...]] = set()
    for dist in metadata.distributions(path=[str(site)]):
        parts = {Path(f).parts for f in dist.files or []}
        (mine if canonical(dist.metadata["Name"]) in allowed else others).update(p for p in parts if ".." not in p)

    def link(at: tuple[str, ...], mine: set, others: set) -> None:
        for top in {p[0] for p in mine}:
            under = {p[1:] for p in mine if p[0] == top and len(p) > 1}
            blocked = {p[1:] for p in others if p[0] == top and len(p) > 1}
            target, here = site.joinpath(*at, top), view.joinpath(*at, top)
            if not blocked or not under:
                if target.exists() or target.is_symlink():
                    here.symlink_to(target)
            else:
                here.mkdir()
                link((*at, top), under, blocked)

    view.mkdir()
    link((), mine, others)
    return view


def gpu_only_imports() -> set[str]:
    """bench.py's GPU_ONLY_IMPORTS, read from its text."""
    assert BENCH.exists(), (
        f"{BENCH.relative_to(REPO)} is missing: it defines GPU_ONLY_IMPORTS and runs the GPU benchmark"
    )
    for node in ast.parse(BENCH.read_text()).body:
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        if any(isinstance(t, ast.Name) and t.id == "GPU_ONLY_IMPORTS" for t in targets):
            return set(ast.literal_eval(node.value))
    pytest.fail(f"{BENCH.relative_to(REPO)} defines no module-level GPU_ONLY_IMPORTS")


def read_records(folder: Path) -> tuple[list[str], dict[str, tuple[str, str]], dict[str, str]]:
    """(each process's argv, {top-level module: (file, first importer)}, {missing name: importer})."""
    argvs, loaded, missing = [], {}, {}
    for path in folder.glob("*.tsv"):
        for line in path.read_text().splitlines():
            kind, _, rest = line.partition("\t")
            if kind == "argv":
                argvs.append(rest)
            elif kind == "loaded":
                name, file, who = rest.split("\t")
                if not loaded.get(name, ("", ""))[0]:
                    loaded[name] = (file, who)
            elif kind == "missing":
                name, _, who = rest.partition("\t")
                missing.setdefault(name, who)
    return argvs, loaded, missing


def distributions_of(name: str, file: str, view: Path) -> list[str] | None:
    """The distributions that provide top-level module `name` (loaded from `file`): [] for the
    standard library and the repository's own modules, None where unknown."""
    stdlib = {Path(sysconfig.get_paths()[k]).resolve() for k in ("stdlib", "platstdlib")}
    if name in sys.stdlib_module_names or name in sys.builtin_module_names or name in ("__main__", "__mp_main__"):
        return []
    if name == "sitecustomize" or not file:  # the recorder; modules made at run time (no file)
        return []
    path = Path(file)
    for root in (view, site_packages()):
        if path.is_relative_to(root):
            rel = path.relative_to(root)
            top = rel.parts[0].split(".")[0]  # a package's folder, or a module's file name
            dists = PACKAGES.get(top) or PACKAGES.get(name) or []
            if len(dists) > 1:  # a namespace package: the distribution holding this file
                dists = [d for d in dists if any(Path(f).parts == rel.parts for f in metadata.distribution(d).files)]
            return [canonical(d) for d in dists] or None
    if path.resolve().is_relative_to(REPO) or any(path.resolve().is_relative_to(s) for s in stdlib):
        return []  # ftflow (src/), tests/helpers, benchmarks/; the interpreter's own modules
    return None


@dataclass
class MachineRun:
    """COMMAND's run as the GPU machine's packages would have it, and what it recorded."""

    out: Path  # the run's --out (gpu.json, gpu.md, gpu.log)
    proc: subprocess.CompletedProcess
    records: Path
    view: Path
    allowed: set[str]
    machine_only: set[str]
    helpers_of_machine: dict[str, str]
    wheels: dict


@pytest.fixture(scope="module")
def machine_run(wheel_dir, tmp_path_factory) -> MachineRun:
    """The run (COMMAND) seeing only the distributions the machine has, the wheels carry, and the
    machine's own need as installed here (support: a site-packages view of those): an import of
    any other fails, as it would there, and an optional one is skipped, as it would be there.
    Every process records its imports."""
    tmp = tmp_path_factory.mktemp("machine-run")
    machine, listed, wheels = fetch_wheels.read_machine(), fetch_wheels.read_wheels(), carried(wheel_dir)
    allowed = set(machine) | set(listed)
    machine_only = set(machine) - set(listed)  # their code here stands in for the machine's
    helpers_of_machine = support(machine_only, allowed)
    (tmp / "site").mkdir()
    (tmp / "site/sitecustomize.py").write_text(RECORDER)
    records, out = tmp / "records", tmp / "out"
    records.mkdir()
    view = machine_view(tmp / "view", allowed | set(helpers_of_machine) | {"ftflow"})
    cmd = [sys.executable if a == "python" else a for a in shlex.split(COMMAND.format(out=out))]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp / "site"), os.environ.get("PYTHONPATH")])),
           "IMPORT_RECORD_DIR": str(records), "IMPORT_VIEW": str(view), "IMPORT_SITE": str(site_packages())}  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    return MachineRun(out, proc, records, view, allowed, machine_only, helpers_of_machine, wheels)


@pytest.mark.slow
def test_the_runs_imports_are_on_the_machine_or_carried(machine_run):
    """Each distribution the run imported (and GPU_ONLY_IMPORTS') is in machine.txt or
    wheels.txt, or is support that only the machine's distributions import."""
    r = machine_run
    proc, records, view, allowed = r.proc, r.records, r.view, r.allowed
    machine_only, helpers_of_machine, wheels = r.machine_only, r.helpers_of_machine, r.wheels
    gpu_only = gpu_only_imports()
    argvs, loaded, missing = read_records(records)
    hidden = "\n".join(f"  {n} ({', '.join(PACKAGES[n])}), looked up by {who or '?'}"
                       for n, who in sorted(missing.items()) if n in PACKAGES)  # fmt: skip
    assert proc.returncode == 0, (
        f"{COMMAND} failed ({proc.returncode}) with only the machine's and the carried distributions importable; "
        f"modules this environment has that it did not see:\n{hidden}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    assert argvs and {"torch", "transformers"} <= set(loaded), f"the recorder saw no training run: {argvs}"

    needed: dict[str, set[tuple[str, str]]] = {}  # distribution: (its module, who imported it first)
    unknown = []
    for name, (file, who) in loaded.items():
        dists = distributions_of(name, file, view)
        if dists is None:
            unknown.append(f"  {name} ({file}), imported by {who or '?'}")
        for dist in dists or []:
            needed.setdefault(dist, set()).add((name, who))
    for module in gpu_only:
        in_wheels = [d for d, (_, _, modules) in wheels.items() if module in modules]
        for dist in in_wheels or [canonical(d) for d in PACKAGES.get(module, [module])]:
            needed.setdefault(dist, set()).add((module, "GPU_ONLY_IMPORTS"))
    needed.pop("ftflow", None)
    for dist in helpers_of_machine:  # fine where only the machine's distributions (or support) import it
        if all(by_machine(who, machine_only | set(helpers_of_machine)) for _, who in needed.get(dist, [])):
            needed.pop(dist, None)
    absent = [f"  {d}: " + ", ".join(f"{m} (imported by {who or '?'})" for m, who in sorted(needed[d]))
              for d in sorted(needed) if d not in allowed]  # fmt: skip
    print(f"{len(argvs)} processes; distributions imported: {', '.join(sorted(needed))}")
    print(f"hidden from the run (here, not there), which went on without them:\n{hidden}")
    assert not unknown, "imported modules of no known distribution:\n" + "\n".join(unknown)
    assert not absent, (
        "distributions the run imports, neither on the machine (machine.txt) nor carried (wheels.txt):\n"
        + "\n".join(absent)
    )


def by_machine(who: str, dists: set[str]) -> bool:
    """Whether module `who` (an importer's __name__) belongs to one of `dists` (not ftflow, the
    script, or a carried distribution)."""
    found = [canonical(d) for d in PACKAGES.get(who.split(".")[0], [])]
    return bool(found) and set(found) <= dists


@pytest.mark.slow
def test_the_cpu_mode_runs_every_section(machine_run):
    """The whole script on CPU, tiny shapes (COMMAND, with only the machine's and the carried
    distributions importable): every section runs or says why not (Liger and torch.compile:
    GPU only), and what it finds holds: packing is correct for sdpa and eager and the check
    catches a row whose positions do not restart; each shape and method ran in ftflow's stage and
    in plain TRL; the resumed run's loss curve is the uninterrupted run's, bitwise, as on CPU it
    must be; gradient checkpointing changes no loss; QLoRA's loss falls and consolidate verifies
    and merges it."""
    proc, tmp_path = machine_run.proc, machine_run.out
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads((tmp_path / "gpu.json").read_text())["sections"]
    failed = {k: v.get("error") for k, v in s.items() if "error" in v}
    assert not failed, (failed, (tmp_path / "gpu.log").read_text()[-4000:])

    assert s["env"]["measured_matmul_tflops"] > 0 and s["env"]["versions"]["trl"]
    impls = s["attention"]["implementations"]
    assert impls["sdpa"]["correct"] and impls["eager"]["correct"] and s["attention"]["control_caught"]
    assert len(s["attention"]["row_conversations"]) > 1
    assert s["attention"]["fastest_correct"] in ("sdpa", "eager")

    runs = [r for r in s["train"]["runs"] if r["attn"] == "sdpa"]  # what auto picks on CPU
    assert [(r["shape"], r["method"]) for r in runs] == [(shape, m) for shape in ("tiny-llama", "tiny-qwen")
                                                         for m in ("full", "lora")]  # fmt: skip
    # where the attention section found a faster correct one, the stage ran with it too
    pick = s["attention"]["fastest_correct"]
    extra = [(r["shape"], r["method"], r["attn"]) for r in s["train"]["runs"] if r["attn"] != "sdpa"]
    assert extra == ([] if pick == "sdpa" else [("tiny-llama", "full", pick)])
    for r in runs:
        for who in ("ftflow", "trl"):
            assert r[who]["tokens_per_s"] > 0 and r[who]["timed_steps"] == 10, r  # 12, the first two untimed
            assert r[who]["mfu"] is None and r[who]["mfu_of_measured_matmul"] > 0  # no datasheet peak on CPU
        assert r["ratio"] > 0
        # the same model, rows and arguments: the same first loss (the weights are not yet updated)
        assert r["ftflow"]["first_loss"] == pytest.approx(r["trl"]["first_loss"], rel=1e-5), r

    resume = s["resume"]
    assert resume["resumed_from"] == f"checkpoint-{resume['stopped_at_step']}"
    assert 0 < resume["stopped_at_step"] < resume["steps"] and resume["identical"], resume
    assert resume["max_rel_loss_diff_resumed"] == resume["max_rel_loss_diff_two_uninterrupted_runs"] == 0

    checkpointing = s["speedups"]["switches"]["gradient_checkpointing"]
    assert checkpointing["last_loss"] == s["speedups"]["plain"]["last_loss"]
    qlora = s["qlora"]  # bitsandbytes' CPU kernels: the GPU run's path, slowly
    assert qlora["loss_went_down"] and qlora["merged"] and qlora["verification"]["ok"], qlora
    assert "quantized to 4 bits" in qlora["verification"]["checks"]["trained_weights"]["compares"]

    table = (tmp_path / "gpu.md").read_text()
    assert table.count("| tiny-") == 4 + len(extra) and "| sdpa | yes |" in table, table


def test_the_wrapper_runs_the_script_and_leaves_its_records_in_out(tmp_path):
    """benchmarks/gpu/run.sh, the one command of a GPU run (here without wheels, on CPU, one
    section): bench.py's files, the package list and nvidia-smi's answer land in $OUT."""
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OUT": str(out),
           "FTFLOW_WHEELS": str(tmp_path / "no-wheels")}  # fmt: skip
    proc = subprocess.run(["bash", str(GPU / "run.sh"), "--cpu", "--sections", "env"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == {"gpu.json", "gpu.md", "gpu.log", "packages.txt", "nvidia-smi.txt"}
    assert json.loads((out / "gpu.json").read_text())["sections"]["env"]["measured_matmul_tflops"] > 0
    assert "trl==" in (out / "packages.txt").read_text()
