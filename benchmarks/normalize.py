"""What normalizing costs over merely reading the same file, side by side in one run.

    python benchmarks/normalize.py [--records 1000000]

Scales the alpaca fixture (examples/formats/alpaca_en_demo.json, 999 records) to N records of
JSON lines, then times, on the same file:
  - pyarrow.json.read_json: reading it into an Arrow table (multithreaded C++; the floor),
  - datasets.load_dataset("json"): reading it the way HF-based tools do (Arrow cache included),
  - ftflow's normalize stage: parse, alpaca reader, validation, Parquet output, stats.
and prints records/s, MB/s and the ratios. The target: normalize costs no more than 3x reading.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "examples" / "formats" / "alpaca_en_demo.json"


def scaled_jsonl(dest: Path, n: int) -> None:
    """n alpaca records: the fixture repeated, each copy's instruction numbered (all distinct)."""
    base = json.loads(FIXTURE.read_text())
    with dest.open("w") as f:
        for i in range(n):
            rec = base[i % len(base)]
            f.write(json.dumps({**rec, "instruction": f"{rec['instruction']} ({i})"}) + "\n")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    args = parser.parse_args()

    import datasets
    import pyarrow.json as pj

    from ftflow import paths, runner

    work = Path(tempfile.mkdtemp(prefix="ftflow-bench-normalize-"))
    try:
        raw = work / paths.RAW / "alpaca"
        raw.mkdir(parents=True)
        data = raw / "alpaca.jsonl"
        scaled_jsonl(data, args.records)
        mb = data.stat().st_size / 1e6
        print(f"data: {args.records:,} alpaca records, {mb:,.0f} MB of JSON lines; {os.cpu_count()} cores")

        read_pa = timed(lambda: pj.read_json(data))
        cache = work / "hf-cache"
        read_ds = timed(
            lambda: datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(cache))
        )
        cfg = {"data": {"sources": [{"name": "alpaca", "path": str(data), "reader": "alpaca"}]}}
        norm = timed(lambda: runner.run("normalize", cfg, work))
        stats = json.loads((work / paths.NORMALIZE / "stats.json").read_text())
        assert stats["splits"]["train"]["records_out"] == args.records

        print(f"\n{'':34}{'seconds':>9}{'records/s':>12}{'MB/s':>8}")
        for name, sec in [("read: pyarrow.json.read_json", read_pa), ("read: datasets.load_dataset", read_ds),
                          ("ftflow normalize", norm)]:  # fmt: skip
            print(f"{name:34}{sec:9.2f}{args.records / sec:12,.0f}{mb / sec:8.1f}")
        print(f"\nnormalize / pyarrow read   = {norm / read_pa:.2f}x the time")
        print(f"normalize / datasets read  = {norm / read_ds:.2f}x the time   (target: <= 3x plain reading)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
