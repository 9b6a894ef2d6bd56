"""Peak memory of normalize + pack on many short conversations (the pack issue asks < 8 GB
for 10M).

    python benchmarks/pack_memory.py [--conversations 10000000]

Writes N short conversations in the demo's shape ("What is the first word? ..."), normalizes
them and packs them (ChatML, a trained byte-level BPE, max_length 2048), each stage in its own
process, and prints the peak resident memory of each with the time taken: the largest sum of
the resident memory of the stage process and all its worker processes, sampled every 0.2 s.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil

WORDS = "red blue green black white cat dog fox owl bee apple pear plum lime fig sun moon star rain snow".split()


def write_raw(dest: Path, n: int) -> None:
    rng = random.Random(0)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with dest.open("w") as f:
        for _ in range(n):
            words = rng.sample(WORDS, rng.randint(3, 6))
            first = rng.random() < 0.5
            rec = {"instruction": f"What is the {'first' if first else 'last'} word?", "input": " ".join(words),
                   "output": words[0] if first else words[-1]}  # fmt: skip
            f.write(json.dumps(rec) + "\n")


def stage(name: str, work: str, queue) -> None:
    """One stage in a fresh process, so that its peak memory is its own."""
    from ftflow import runner

    start = time.perf_counter()
    if name == "normalize":
        stats = runner.run(
            "normalize", {"data": {"sources": [{"name": "short", "path": "x", "reader": "alpaca"}]}}, Path(work)
        )
        summary = {"records": stats["splits"]["train"]["records_out"]}
    else:
        cfg = {"model": {"name": "m", "source": "scratch", "architecture": {}},
               "tokenizer": {"source": "train", "vocab_size": 512}, "template": {"name": "chatml"},
               "pack": {"max_length": 2048}}  # fmt: skip
        summary = runner.run("pack", cfg, Path(work))["splits"]["train"]
    keys = ("records", "conversations", "tokens", "rows", "packing_efficiency")
    queue.put(
        {
            "stage": name,
            "seconds": round(time.perf_counter() - start, 1),
            **{k: summary[k] for k in keys if k in summary},
        }
    )


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (workers, fork servers)."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def watch(pid: int, peak: list, stop: threading.Event) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], tree_rss(pid))
        stop.wait(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=10_000_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ftflow-bench-pack-memory-"))
    try:
        write_raw(work / "data/raw/short/short.jsonl", args.conversations)
        ctx = multiprocessing.get_context("spawn")
        for name in ("normalize", "pack"):
            queue = ctx.Queue()
            proc = ctx.Process(target=stage, args=(name, str(work), queue))
            proc.start()
            peak, stop = [0], threading.Event()
            watcher = threading.Thread(target=watch, args=(proc.pid, peak, stop))
            watcher.start()
            result = queue.get()
            proc.join()
            stop.set()
            watcher.join()
            result["peak_gb"] = round(peak[0] / 1e9, 2)
            print(json.dumps(result))
        print(
            f"\n{args.conversations:,} short conversations: peak memory of pack {result['peak_gb']:.2f} GB, "
            "its workers included; target < 8 GB"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
