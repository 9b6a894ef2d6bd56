"""The wheels the GPU run carries (benchmarks/gpu/wheels.txt) into one folder, and its size.

    python benchmarks/gpu/fetch_wheels.py [--dest .whl]      # make gpu-wheels

The GPU machine has no network: what it lacks (benchmarks/gpu/machine.txt says what it has)
travels as wheels in .whl/ beside the working tree, installed there with
`python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl`. This downloads
exactly the listed distributions, without their dependencies, as wheels for the machine's
interpreter (machine.txt's `# python:` line; CPython, x86-64 manylinux), each in the version
requirements.lock pins (checked against the lock's hashes) or, for a package the lock does not
hold, the version wheels.txt pins. A package PyPI has only as an sdist (SDIST_ONLY) is built
into a pure-Python wheel here. Wheels in the folder that are not in the list (stale versions,
names since removed) are deleted.

It prints the folder's size and the total with the working tree that travels (git's tracked
files and untracked files it does not ignore) and fails if that is over 64 MiB, the device
tool's limit on what a run carries.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
WHEELS_TXT = HERE / "wheels.txt"
MACHINE_TXT = HERE / "machine.txt"
LOCK = REPO / "requirements.lock"
DEST = REPO / ".whl"
LIMIT = 64 * 2**20  # the device tool carries at most 64 MiB: working tree and wheel folder together

# PyPI has only an sdist of these: built into a wheel here (pure Python, so any interpreter's build fits)
SDIST_ONLY = {"antlr4-python3-runtime"}
# torch 2.11's wheels on the machine need glibc 2.28 (manylinux_2_28), so a wheel for any of these
# platforms runs there; manylinux2014 (= manylinux_2_17) for wheels tagged only with the old name
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64"]  # fmt: skip


class FetchError(Exception):
    pass


def canonical(name: str) -> str:
    """A distribution's normalized name (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _entries(path: Path) -> list[str]:
    """The lines of a list file, comments and blank lines dropped."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def _pins(path: Path) -> dict[str, str | None]:
    """{normalized name: version or None} of a list of `name` or `name==version` lines."""
    found: dict[str, str | None] = {}
    for entry in _entries(path):
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:==\s*(\S+))?", entry)
        if not match:
            raise FetchError(f"{path}: not `name` or `name==version`: {entry!r}")
        name = canonical(match[1])
        if name in found:
            raise FetchError(f"{path}: {name} is listed twice")
        found[name] = match[2]
    return found


def read_wheels(path: Path = WHEELS_TXT) -> dict[str, str | None]:
    """wheels.txt: {name: the version it pins, or None for the lock's}."""
    return _pins(path)


def read_machine(path: Path = MACHINE_TXT) -> dict[str, str | None]:
    """machine.txt: {name: version, or None where the version there is not recorded}."""
    return _pins(path)


def machine_python(path: Path = MACHINE_TXT) -> str:
    """The machine's Python version (machine.txt's `# python: X.Y.Z` line)."""
    match = re.search(r"^# python: (\d+\.\d+\.\d+)\s*$", path.read_text(), re.M)
    if not match:
        raise FetchError(f"{path}: no `# python: X.Y.Z` line")
    return match[1]


def read_lock(path: Path = LOCK) -> dict[str, tuple[str, list[str]]]:
    """requirements.lock: {name: (version, its sha256 hashes)}."""
    found: dict[str, tuple[str, list[str]]] = {}
    text = path.read_text().replace("\\\n", " ")  # one requirement a line, its hashes with it
    for line in text.splitlines():
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)(.*)", line)
        if match:
            found[canonical(match[1])] = (match[2], re.findall(r"--hash=(sha256:[0-9a-f]+)", match[3]))
    return found


def wanted(wheels: dict[str, str | None], lock: dict[str, tuple[str, list[str]]]) -> dict[str, str]:
    """{name: version} of every listed distribution: the lock's, or the list's for one not in it."""
    versions = {}
    for name, pin in wheels.items():
        if pin and name in lock:
            raise FetchError(f"wheels.txt pins {name}=={pin}, but requirements.lock holds it "
                             f"({lock[name][0]}): list the bare name, the lock is the one place for its version")  # fmt: skip
        if not pin and name not in lock:
            raise FetchError(f"wheels.txt lists {name} without a version and requirements.lock does not hold it: "
                             "pin it in wheels.txt (name==version)")  # fmt: skip
        versions[name] = pin or lock[name][0]
    return versions


def wheel_name(filename: str) -> tuple[str, str]:
    """(normalized name, version) of a wheel's file name."""
    name, version = filename.split("-")[:2]
    return canonical(name), version


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        err = "\n".join(line for line in proc.stderr.splitlines() if "is ignored: it is neither" not in line)
        raise FetchError(f"pip failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}{err[-4000:]}")


def download(versions: dict[str, str], lock: dict[str, tuple[str, list[str]]], python: str, into: Path) -> None:
    """The wheels of `versions` into `into`: the lock's checked against its hashes, the sdist-only
    ones built into wheels."""
    major_minor = ".".join(python.split(".")[:2])
    target = ["--python-version", major_minor, "--implementation", "cp"]
    for platform in PLATFORMS:
        target += ["--platform", platform]
    common = ["--no-deps", "--disable-pip-version-check", "--no-input"]

    def hashed(n: str) -> bool:
        return n in lock and lock[n][0] == versions[n] and bool(lock[n][1])

    def requirements(names: list[str], name: str) -> Path:
        # hashes where the lock has them: pip checks every file it downloads against them
        lines = [" ".join([f"{n}=={versions[n]}", *(f"--hash={h}" for h in (lock[n][1] if hashed(n) else []))])
                 for n in names]  # fmt: skip
        path = into / f".{name}.txt"
        path.write_text("\n".join(lines) + "\n")
        return path

    binary = [n for n in versions if n not in SDIST_ONLY]
    for group, names in (
        ("hashed", [n for n in binary if hashed(n)]),
        ("pinned", [n for n in binary if not hashed(n)]),
    ):
        if names:
            pip("download", "-q", *common, "--only-binary=:all:", *target, "-d", str(into),
                "-r", str(requirements(names, group)))  # fmt: skip
    built = [n for n in versions if n in SDIST_ONLY]
    if built:
        # the current interpreter builds it (no build isolation: the venv's setuptools, nothing fetched)
        work = into / ".build"
        pip("wheel", "-q", *common, "--no-binary=:all:", "--no-build-isolation", "-w", str(work),
            "-r", str(requirements(built, "sdist")))  # fmt: skip
        for wheel in work.glob("*.whl"):
            if not wheel.name.endswith("-none-any.whl"):
                raise FetchError(f"{wheel.name}: built from its sdist, but not a pure-Python wheel")
            wheel.rename(into / wheel.name)
        shutil.rmtree(work)
    for path in into.glob(".*.txt"):
        path.unlink()


def fetch(dest: Path) -> list[Path]:
    """The listed wheels in `dest`, and nothing else of wheels there; returns them."""
    lock = read_lock()
    versions = wanted(read_wheels(), lock)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest) as tmp:
        download(versions, lock, machine_python(), Path(tmp))
        new = sorted(Path(tmp).glob("*.whl"))
        got: dict[str, list[str]] = {}
        for wheel in new:
            got.setdefault(wheel_name(wheel.name)[0], []).append(wheel.name)
        problems = [f"{n}: {got.get(n, 'no wheel')}" for n in versions if len(got.get(n, [])) != 1]
        problems += [f"{n}: not listed ({files})" for n, files in got.items() if n not in versions]
        if problems:
            raise FetchError("not exactly one wheel for each listed distribution:\n  " + "\n  ".join(problems))
        for old in dest.glob("*.whl"):  # stale: other versions, names no longer listed
            if old.name not in {w.name for w in new}:
                print(f"removed {old.name}")
                old.unlink()
        for wheel in new:
            os.replace(wheel, dest / wheel.name)
    return sorted(dest / w.name for w in new)


def folder_size(folder: Path) -> int:
    return sum(p.lstat().st_size for p in folder.rglob("*") if not p.is_dir() or p.is_symlink())


def tree_size(exclude: Path | None = None) -> int:
    """Bytes of the working tree that travels: git's tracked files and the untracked ones it does
    not ignore (not those under `exclude`, counted apart)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout  # fmt: skip
    total = 0
    for rel in {p for p in out.decode().split("\0") if p}:
        path = REPO / rel
        if exclude and path.resolve().is_relative_to(exclude.resolve()):
            continue
        if path.is_symlink() or path.is_file():  # a tracked file deleted here does not travel
            total += path.lstat().st_size
    return total


def mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=DEST, help="the wheel folder (default: .whl/ at the repo root)")
    args = parser.parse_args(argv)
    try:
        wheels = fetch(args.dest)
    except FetchError as err:
        print(f"fetch_wheels: {err}", file=sys.stderr)
        return 1
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:8.2f} MiB  {wheel.name}")
    folder, tree = folder_size(args.dest), tree_size(exclude=args.dest)
    total = folder + tree
    print(f"{args.dest}: {mib(folder)} in {len(wheels)} wheels; working tree that travels: {mib(tree)}; "
          f"total {mib(total)} of {mib(LIMIT)}")  # fmt: skip
    if total > LIMIT:
        print(f"fetch_wheels: over the limit: {mib(total)} > {mib(LIMIT)} ({args.dest} {mib(folder)} + working "
              f"tree {mib(tree)}); carry fewer wheels or shrink the tree", file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
