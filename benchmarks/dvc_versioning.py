"""What versioning a checkpoint costs with the pipeline's DVC settings, side by side.

    python benchmarks/dvc_versioning.py [--gb 1.0]

Writes a checkpoint-like folder (safetensors-sized shards + small JSON files), then measures in
one run: hashing its bytes once (md5, what DVC hashes with: the floor for any versioning),
`dvc add` with this repository's cache settings (.dvc/config: reflink, else symlink), and
`dvc add` with a copy cache for contrast. Disk use is counted in allocated blocks, workspace and
cache together, links not followed.
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CHUNK = 1 << 20


def cache_type() -> str:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / ".dvc/config")
    return cfg["cache"]["type"].strip('"')


def write_checkpoint(dest: Path, total_bytes: int) -> None:
    """Four weight shards of random bytes (incompressible, like trained weights) + metadata."""
    import numpy as np

    dest.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shard = total_bytes // 4
    for i in range(4):
        (dest / f"model-{i + 1:05d}-of-00004.safetensors").write_bytes(rng.bytes(shard))
    for name in ("config.json", "trainer_state.json", "optimizer_meta.json"):
        (dest / name).write_text('{"step": 1000}\n')


def md5_once(folder: Path) -> float:
    start = time.perf_counter()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h = hashlib.md5()
            with path.open("rb") as f:
                while block := f.read(CHUNK):
                    h.update(block)
    return time.perf_counter() - start


def disk_bytes(*roots: Path) -> int:
    """Allocated bytes under these folders, each inode once, links not followed."""
    seen, total = set(), 0
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                st = os.lstat(os.path.join(dirpath, name))
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total


def dvc_add(repo: Path, link_type: str) -> tuple[float, int]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "cache.type", link_type], ["dvc", "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True)
    start = time.perf_counter()
    subprocess.run(["dvc", "add", "-q", "checkpoint"], cwd=repo, env=env, check=True)
    elapsed = time.perf_counter() - start
    return elapsed, disk_bytes(repo / "checkpoint", repo / ".dvc/cache")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0, help="checkpoint size in GB")
    args = parser.parse_args()
    size = int(args.gb * 1e9)
    ours = cache_type()
    rows = []
    with tempfile.TemporaryDirectory(dir=REPO.parent) as tmp:
        for label, link_type in ((f"dvc add, cache.type={ours}", ours), ("dvc add, cache.type=copy", "copy")):
            repo = Path(tmp) / link_type.replace(",", "_")
            repo.mkdir()
            write_checkpoint(repo / "checkpoint", size)
            data = disk_bytes(repo / "checkpoint")
            hashed = md5_once(repo / "checkpoint")  # the floor, on the same (page-cached) bytes
            took, disk = dvc_add(repo, link_type)
            rows.append((label, hashed, took, disk / data))
            shutil.rmtree(repo)
    print(f"checkpoint: {size / 1e9:.2f} GB in 4 shards + 3 small files")
    print(f"{'':32} {'md5 once':>10} {'versioning':>11} {'time ratio':>11} {'disk (x data)':>14}")
    for label, hashed, took, disk in rows:
        print(f"{label:32} {hashed:9.2f}s {took:10.2f}s {took / hashed:10.2f}x {disk:13.2f}x")


if __name__ == "__main__":
    main()
