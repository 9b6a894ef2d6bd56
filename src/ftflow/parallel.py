"""Worker pools shared by the data stages."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor


def ordered_map(pool: ProcessPoolExecutor, fn, iterable, window: int) -> Iterator:
    """pool.map with at most `window` tasks in flight (Executor.map submits everything at once,
    which would hold a whole large source in memory)."""
    pending: deque = deque()
    for x in iterable:
        pending.append(pool.submit(fn, x))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
