"""What each training process leaves in results/train/workers/: `<rank>.pid` (the job side passes
stop signals to the pids listed there) and `<rank>.json` (its host and pid, and how it ended).

A process killed outright (SIGKILL, the out-of-memory killer, a lost node) cannot say so: its
record still reads "running" after the run. When a run fails, the job side reads the records to
name the rank that died and what the others stopped on (typically a collective that lost its
peer), instead of leaving that to torchrun's report in the middle of the log. On several
nodes the folder is on the shared file system, so the job side sees every node's records.
"""

from __future__ import annotations

import json
import os
import re
import socket
from contextlib import contextmanager
from pathlib import Path

from ftflow.train.launcher import PREEMPTED

RUNNING = "running"


def announce(workers: Path, rank: int) -> None:
    """This process runs (its stop handler is in place): its record, then its pid file."""
    _write(workers / f"{rank}.json", {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "state": RUNNING})
    pid_file = workers / f"{rank}.pid"
    pid_file.with_suffix(".tmp").write_text(str(os.getpid()))
    pid_file.with_suffix(".tmp").rename(pid_file)


def ended(workers: Path, rank: int, state: str, error: BaseException | None = None) -> None:
    """How this process ended: finished, preempted, or failed with its error's first line."""
    record = {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "state": state}
    if error is not None:
        record["error"] = first_sentence(error)
    _write(workers / f"{rank}.json", record)


@contextmanager
def recorded(workers: Path, rank: int):
    """Record how the body (the whole training process) ends."""
    try:
        yield
    except SystemExit as err:  # stop() exits PREEMPTED after saving
        ended(workers, rank, "preempted" if err.code == PREEMPTED else "failed", err)
        raise
    except BaseException as err:
        ended(workers, rank, "failed", err)
        raise
    ended(workers, rank, "finished")


def first_sentence(error: BaseException) -> str:
    """The error's type and first sentence, without the C++ source location that torch's
    collective errors start with ("[.../gloo/transport/tcp/pair.cc:537] Read error ...")."""
    text = re.sub(r"^\[[^\]]*:\d+\][\s.]*", "", str(error).strip())
    text = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {text.split('. ')[0]}".rstrip(": ")


def _write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)  # whole or absent, also when the process dies meanwhile


def records(workers: Path) -> list[dict]:
    found = [json.loads(p.read_text()) for p in workers.glob("*.json")] if workers.is_dir() else []
    return sorted(found, key=lambda r: r["rank"])


def explain(workers: Path, world_size: int) -> str:
    """Which ranks died and what the others stopped on, from the records of a failed run ("" when
    the records say nothing more than the log)."""
    found = records(workers)
    seen = {r["rank"] for r in found}
    parts = [f"rank {rank} never started" for rank in range(world_size) if rank not in seen]
    # the cause first: a process that died cannot say so, the others then fail on their peer
    parts += [f"{where(r)} died without a word: killed (SIGKILL, out of memory), frozen, or its node lost"
              for r in found if r["state"] == RUNNING]  # fmt: skip
    parts += [f"{where(r)} stopped on {r.get('error', 'an error')}" for r in found if r["state"] == "failed"]
    return "; ".join(parts)


def where(record: dict) -> str:
    return f"rank {record['rank']} (pid {record['pid']} on {record['host']})"
