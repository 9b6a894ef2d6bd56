"""Progress that reads well where it is written.

On a terminal, tqdm's bars. Anywhere else (a rule's log, a Slurm job's log) a bar that redraws
itself with carriage returns becomes one line of thousands of overwritten updates, so in a
process whose stderr is not a terminal every tqdm bar logs whole lines instead:

    2026-11-26 10:12:01,112 ftflow.progress INFO 120/335 it (36%), 4.12it/s, elapsed 00:29, ETA 00:52

(the Trainer's steps), at most once per FTFLOW_PROGRESS_INTERVAL seconds (default 30) per bar,
and once more when a bar that ran that long finishes; a shorter bar (loading a small model's
weights) is silent, its stage logs what it did. "Every bar" includes those inside transformers
(the Trainer), datasets (map), huggingface_hub and lm-eval: they offer no common hook, and all
of them draw through tqdm's class, so the line mode is set on that class (`lines()`), once per
process, before any bar.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time

import tqdm.std

INTERVAL_ENV = "FTFLOW_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0
log = logging.getLogger("ftflow.progress")

# tqdm.format_meter fills these in (it adds the ", " before a postfix itself)
KNOWN_TOTAL = "{n_fmt}/{total_fmt} {unit} ({percentage:.0f}%), {rate_fmt}, elapsed {elapsed}, ETA {remaining}{postfix}"
UNKNOWN_TOTAL = "{n_fmt} {unit}, {rate_fmt}, elapsed {elapsed}{postfix}"


def interval() -> float:
    value = os.environ.get(INTERVAL_ENV, "")
    try:
        return float(value) if value else DEFAULT_INTERVAL
    except ValueError:
        raise ValueError(f"{INTERVAL_ENV}={value!r}: expected seconds between progress lines, e.g. 30") from None


def setup_logging(level: int = logging.INFO) -> None:
    """A stage process's output: log lines with their time, progress as bars or lines."""
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    setup()


def setup(stream=None) -> None:
    """Bars on a terminal, lines elsewhere: called where a stage process sets up its logging."""
    stream = sys.stderr if stream is None else stream
    if not (hasattr(stream, "isatty") and stream.isatty()):
        lines(interval())


class _Discard:
    """Where tqdm's own drawing goes in line mode (redraws, cursor moves, final newline)."""

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


def line(bar: tqdm.std.tqdm) -> str:
    """One bar's state as a log line: count, share, rate, elapsed, ETA and its postfix."""
    stats = {**bar.format_dict, "ncols": None}
    stats["unit"] = (stats.get("unit") or "it").strip()
    known = bool(stats["total"]) and stats["n"] <= stats["total"]
    fmt = KNOWN_TOTAL if known else UNKNOWN_TOTAL
    if stats.get("prefix"):  # "desc: " (datasets' descriptions end with a colon already)
        fmt = "{desc} " + fmt if stats["prefix"].rstrip().endswith(":") else "{desc}: " + fmt
    return re.sub(r"  +", " ", tqdm.std.tqdm.format_meter(**{**stats, "bar_format": fmt}))  # tqdm pads rates


def lines(every: float) -> None:
    """Make every tqdm bar in this process log a line at most every `every` seconds (and a last
    one when a bar that logged closes) instead of drawing itself."""
    cls = tqdm.std.tqdm
    patched = getattr(cls, "_ftflow_lines", None) is not None
    cls._ftflow_lines = every
    if patched:
        return
    draw_init = cls.__init__

    def __init__(self, *args, **kwargs):
        kwargs["file"] = _Discard()
        # tqdm's own throttle, so that updates between two lines cost nothing
        kwargs.setdefault("mininterval", cls._ftflow_lines)
        kwargs["maxinterval"] = max(kwargs.get("maxinterval") or 0, cls._ftflow_lines)
        self._line_at = time.monotonic()  # the first line comes an interval after the start
        self._line_n = 0
        draw_init(self, *args, **kwargs)

    def display(self, msg=None, pos=None):
        closing = self.disable  # close() marks the bar disabled, then draws it a last time
        if msg == "" or self.n == self._line_n:  # a clear, or nothing new since the last line
            return True
        now = time.monotonic()
        if now - self._line_at < cls._ftflow_lines and not (closing and self._line_n):
            return True  # too soon, unless it is the end of a bar that has logged before
        self._line_at, self._line_n = now, self.n
        log.info("%s", line(self))
        return True

    cls.__init__ = __init__
    cls.display = display
