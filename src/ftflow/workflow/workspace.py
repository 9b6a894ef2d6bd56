"""One run at a time in a workspace: `ftflow run`, a `snakemake` run, a `dvc repro` / `dvc exp
run` stage and a hand-run stage all write the same results/ and params.yaml, so a second one
is refused at once, naming what holds the workspace.

The hold is an exclusive flock on .snakemake/ftflow/workspace.lock, taken by the process that
runs the work and released by the kernel when it ends (a killed run leaves no stale lock, unlike
Snakemake's own locks, which the profiles turn off: this one covers the whole workspace). The
file says who holds it. The holder's children (its Snakemake, the jobs) get HOLDER_ENV and do
not claim it again. DVC releases its own repo lock while a stage command runs and holds it
between stages, so a claim also looks at DVC's lock and the stages DVC has running. Queued
DVC experiments run in their own copies of the workspace, each with its own lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from ftflow.errors import StageError

LOCK = ".snakemake/ftflow/workspace.lock"
HOLDER_ENV = "FTFLOW_WORKSPACE_HOLDER"  # set for the holder's children: they run under its hold
DVC_LOCK, DVC_RWLOCK = ".dvc/tmp/lock", ".dvc/tmp/rwlock"

_held: dict[Path, object] = {}  # lock files this process holds, open for its lifetime


class WorkspaceInUse(StageError):
    exit_status = 3


def claim(what: str, root: Path = Path("."), dvc: str = "hold") -> dict[str, str]:
    """Hold the workspace for the rest of this process, or refuse naming who holds it. Returns
    the environment entries that mark this process's children as running under the hold.

    dvc: "hold" takes DVC's repo lock too (a `dvc repro` or `dvc exp run` started meanwhile then
    fails at once, before it removes any output it would rebuild; `cat .dvc/tmp/lock` names
    the holder); "check" only refuses while DVC runs (`ftflow sync` and `pull`, which run DVC);
    "skip" for the command DVC itself runs (`ftflow dispatch`)."""
    if os.environ.get(HOLDER_ENV):
        return {HOLDER_ENV: os.environ[HOLDER_ENV]}
    record = json.dumps({"command": what, "pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
    path = (root / LOCK).resolve()
    if path not in _held:
        path.parent.mkdir(parents=True, exist_ok=True)
        held = _lock(path)
        if held is None:
            raise WorkspaceInUse(refusal(root, describe(path.read_text())))
        dvc_lock = root / DVC_LOCK
        if dvc == "hold" and (root / ".dvc").is_dir():
            dvc_lock.parent.mkdir(parents=True, exist_ok=True)
            dvc_held = _lock(dvc_lock)
            if dvc_held is None:
                held.close()
                raise WorkspaceInUse(refusal(root, dvc_holder(root) or "DVC"))
            _write(dvc_held, record)
            _held[dvc_lock.resolve()] = dvc_held
        elif dvc == "check" and (running := dvc_holder(root)):
            held.close()
            raise WorkspaceInUse(refusal(root, running))
        _write(held, record)
        _held[path] = held
    return {HOLDER_ENV: str(os.getpid())}


def release_dvc(root: Path = Path(".")) -> None:
    """Give DVC's repo lock back, keeping the workspace's: `ftflow run` then records its run
    with `dvc commit`, which takes that lock itself."""
    held = _held.pop((root / DVC_LOCK).resolve(), None)
    if held is not None:
        held.close()


def _lock(path: Path):
    """The file, open and exclusively locked by this process, or None if another holds it."""
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def _write(f, text: str) -> None:
    f.truncate(0)
    f.write(text)
    f.flush()


def refusal(root: Path, holder: str) -> str:
    return (
        f"this workspace ({root.resolve()}) is in use by {holder}; wait for it to end (runs in parallel: "
        "`dvc exp run --queue ...` then `dvc queue start`, each in its own copy)"
    )


def describe(record: str) -> str:
    try:
        held = json.loads(record)
    except ValueError:
        return "another run (its lock file names none)"
    since = time.strftime("%H:%M:%S", time.localtime(held["since"]))
    return f"`{held['command']}` (pid {held['pid']} on {held['host']}, since {since})"


def dvc_holder(root: Path) -> str | None:
    """What DVC is running here, if anything: its repo lock (held between stages) or a stage
    command it has running (listed in its rwlock with the pid of the DVC process)."""
    lock = root / DVC_LOCK
    if lock.exists():
        with open(lock, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
            except BlockingIOError:
                f.seek(0)
                content = f.read().strip()
                if content.startswith("{"):  # an ftflow run holds DVC's lock too
                    return describe(content)
                return f"DVC (`{command_of(content) or 'dvc'}`, pid {content or '?'})"
    try:
        rwlock = json.loads((root / DVC_RWLOCK).read_text())
    except (FileNotFoundError, ValueError):
        return None
    for kind in ("write", "read"):
        for entry in (rwlock.get(kind) or {}).values():
            info = entry if isinstance(entry, dict) else (entry[0] if entry else {})
            if info and alive(int(info.get("pid", 0))):
                return f"DVC (`{info.get('cmd', 'dvc')}`, pid {info['pid']})"
    return None


def alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def command_of(pid: str) -> str | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except (OSError, ValueError):
        return None


SHELLS = {"sh", "dash", "bash", "zsh"}


def launcher(pid: int) -> str | None:
    """The command that started process `pid`, past any shell between them: DVC runs a stage's
    command through `/bin/sh -c`, which may or may not exec it (dash does for a lone command,
    not always), and the person wants to read `dvc exp run ...`, not `/bin/sh -c ...`."""
    for _ in range(8):  # a chain of shells, never a long one
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return None
        command = command_of(str(ppid))
        if not command or Path(command.split()[0]).name not in SHELLS:
            return command
        pid = ppid
    return None


def command_line() -> str:
    """This process's command, as a person typed it."""
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
