"""The contamination check at scale, beside the pack stage on the same data and machine (issue:
the check must take no longer than pack).

    python benchmarks/contamination.py --gsm8k test.jsonl [--conversations 10000000] [--plant 25]

Writes N short conversations in the demo's shape (pack_memory.py's), plants --plant GSM8K test
problems among them as ordinary question/answer records (the way a contaminated dataset holds
them: without lm-eval's "Question: ... Answer:" frame), normalizes and packs them as
pack_memory.py does, then checks GSM8K's test set, rendered as lm-eval's gsm8k task renders it
(doc_to_text + target), against the training split. Prints the seconds of each and the ratio to
pack, and what the check found (every planted problem should be found; none is a whole-text copy,
because of the frame).

GSM8K's test set (1,319 problems, MIT): openai/grade-school-math's
grade_school_math/data/test.jsonl, or `hf download openai/gsm8k --repo-type dataset`'s
main/test parquet (--gsm8k takes either).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

from pack_memory import write_raw


def gsm8k(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plant(raw: Path, problems: list[dict], k: int) -> list[int]:
    """Add k problems to the raw file as alpaca records; returns which ones."""
    chosen = sorted(random.Random(1).sample(range(len(problems)), k))
    with raw.open("a") as f:
        for i in chosen:
            f.write(
                json.dumps({"instruction": problems[i]["question"], "input": "", "output": problems[i]["answer"]})
                + "\n"
            )
    return chosen


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def main() -> None:
    from ftflow import paths, runner
    from ftflow.contamination import check

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gsm8k", type=Path, required=True, help="GSM8K's test split: .jsonl or .parquet")
    parser.add_argument("--conversations", type=int, default=10_000_000)
    parser.add_argument("--plant", type=int, default=25)
    args = parser.parse_args()
    problems = gsm8k(args.gsm8k)
    work = Path(tempfile.mkdtemp(prefix="ftflow-bench-contamination-"))
    try:
        raw = work / "data/raw/short/short.jsonl"
        write_raw(raw, args.conversations)
        planted = plant(raw, problems, args.plant)
        data = {"data": {"sources": [{"name": "short", "path": "x", "reader": "alpaca"}]}}
        _, normalize_s = timed(runner.run, "normalize", data, work)
        cfg = {"model": {"name": "m", "source": "scratch", "architecture": {}},
               "tokenizer": {"source": "train", "vocab_size": 512}, "template": {"name": "chatml"},
               "pack": {"max_length": 2048}}  # fmt: skip
        _, pack_s = timed(runner.run, "pack", cfg, work)
        texts = {"gsm8k": [f"Question: {p['question']}\nAnswer: {p['answer']}" for p in problems]}
        (summary, lines), check_s = timed(check, texts, work / paths.NORMALIZE / "train.parquet", 13, 0.0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    found = summary["tasks"]["gsm8k"]
    print(f"{summary['train_records']:,} training records ({args.plant} GSM8K test problems planted), "
          f"{len(problems):,} GSM8K test problems checked\n")  # fmt: skip
    print("| step | seconds | ratio to pack |\n|---|---:|---:|")
    for name, s in (("normalize", normalize_s), ("pack", pack_s), ("contamination check", check_s)):
        print(f"| {name} | {s:.1f} | {s / pack_s:.2f}x |")
    hit = sorted(line["example"] for line in lines)
    print(f"\nfound: {found['ngram']} problems sharing a 13-word run ({found['exact']} whole-text copies); "
          f"planted {len(planted)}; every planted one found: {set(planted) <= set(hit)}; "
          f"found but not planted: {sorted(set(hit) - set(planted))}")  # fmt: skip


if __name__ == "__main__":
    main()
