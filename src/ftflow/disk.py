"""Large outputs on a file system that fills up (a shared cluster file system, a quota): the
write stops midway, its partial files are removed, and the stage fails saying where, how
much it needed and how much was free, instead of leaving a library's traceback and a
half-written folder that a rerun or the next stage could mistake for whole.
"""

from __future__ import annotations

import errno
import logging
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from ftflow.errors import StageError

log = logging.getLogger(__name__)

NEARLY_FULL = 1 << 20  # bytes: a failed write with less room than this left ran out of space


class OutOfSpace(StageError):
    pass


def mb(size: float) -> str:
    return f"{size / 1e6:,.1f} MB"


def free_bytes(path: Path) -> int:
    """Free space on the file system that holds path (or would: its nearest existing parent)."""
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def ran_out_of_space(err: BaseException, path: Path) -> bool:
    """Whether a failed write failed for lack of space. The errno is the sure sign, but some
    writers lose it (torch's zip writer reports "unexpected pos ..."): a file system with
    almost nothing left counts too."""
    seen = err
    while seen is not None:
        if getattr(seen, "errno", None) == errno.ENOSPC or "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return free_bytes(path) < NEARLY_FULL


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def room_for(what: str, outputs: list[Path], needed: Callable[[int], int]):
    """Write `what` into `outputs` (files or folders). Should the file system fill up, remove
    them and fail with how much space the write needed: needed(bytes written when it stopped)."""
    try:
        yield
    except OutOfSpace:  # a write inside this one said so already
        raise
    except Exception as err:
        if not ran_out_of_space(err, outputs[0]):
            raise
        free = free_bytes(outputs[0])
        written = sum(size_of(p) for p in outputs)
        for path in outputs:
            remove(path)
        raise OutOfSpace(
            f"{what}: the file system holding {outputs[0]} is full: it needs about {mb(needed(written))} and had "
            f"{mb(free)} free when the write stopped, {mb(written)} in; the partial files are removed. "
            "Free space there, or put results/ on a larger file system"
        ) from None
