"""What versioning a checkpoint costs with the pipeline's DVC settings, side by side.

    python benchmarks/dvc_versioning.py [--gb 1.0]

Writes a checkpoint-like folder (safetensors-sized shards + small JSON files), then measures in
one run: hashing its bytes once (md5, what DVC hashes with: the floor for any versioning) and
`dvc add` with this repository's cache type (.dvc/config), then with the symlink and copy types
for contrast. `dvc add` is timed inside DVC after a warm-up (the versioning itself,
as within `dvc repro`) and as a whole command, start-up and imports included. Disk use is counted in allocated blocks, workspace and cache together, each inode
once, links not followed.
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


ADD = """
import sys, time
from dvc.repo import Repo
repo = Repo()
open("warmup.txt", "w").write("warm-up")
repo.add("warmup.txt")  # DVC imports most of its modules lazily, on first use: not versioning
start = time.perf_counter()
repo.add("checkpoint")
print(time.perf_counter() - start)
"""


def dvc_add(repo: Path, link_type: str) -> tuple[float, float, int]:
    """`dvc add` of the checkpoint: (seconds inside DVC, seconds with the CLI's start-up, disk)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    for cmd in (
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
        ["dvc", "config", "cache.type", link_type],
        ["dvc", "config", "core.analytics", "false"],
    ):
        subprocess.run(cmd, cwd=repo, env=env, check=True)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", ADD], cwd=repo, env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    return float(out.stdout.split()[-1]), wall, disk_bytes(repo / "checkpoint", repo / ".dvc/cache")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0, help="checkpoint size in GB")
    args = parser.parse_args()
    size = int(args.gb * 1e9)
    ours = cache_type()
    kinds = [ours] + [k for k in ("symlink", "copy") if k != ours]
    rows = []
    with tempfile.TemporaryDirectory(dir=REPO.parent) as tmp:
        for link_type in kinds:
            repo = Path(tmp) / link_type.replace(",", "_")
            repo.mkdir()
            write_checkpoint(repo / "checkpoint", size)
            data = disk_bytes(repo / "checkpoint")
            hashed = md5_once(repo / "checkpoint")  # the floor, on the same (page-cached) bytes
            inside, wall, disk = dvc_add(repo, link_type)
            rows.append((link_type + (" (ftflow)" if link_type == ours else ""), hashed, inside, wall, disk / data))
            shutil.rmtree(repo)
    print(f"checkpoint: {size / 1e9:.2f} GB in 4 shards + 3 small files; dvc add per cache.type")
    print(
        f"{'cache.type':28} {'md5 once':>9} {'dvc add':>8} {'ratio':>6} {'+ CLI start':>12} {'ratio':>6} {'disk / data':>12}"
    )
    for label, hashed, inside, wall, disk in rows:
        print(
            f"{label:28} {hashed:8.2f}s {inside:7.2f}s {inside / hashed:5.2f}x {wall:11.2f}s {wall / hashed:5.2f}x {disk:11.2f}x"
        )


if __name__ == "__main__":
    main()
