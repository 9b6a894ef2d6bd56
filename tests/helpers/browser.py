"""Headless Chromium (Debian's `chromium` package) for the report's tests, and for the README's
screenshot, which comes from the same call:

    python tests/helpers/browser.py results/report.html docs/report.png
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Flags for a root user on a machine without a display or a network: no sandbox (root), no GPU,
# and none of Chromium's own connections (updates, sync, field trials), which a closed network
# refuses many at a time. A fresh profile each run, so nothing of an earlier run is reused.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
         "--no-first-run", "--disable-component-update", "--disable-sync", "--hide-scrollbars")  # fmt: skip
WINDOW = (1400, 860)
# Virtual time: the page's scripts (the report is a React app) run to completion before the capture
SETTLE_MS = 5000


def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        raise RuntimeError("chromium is not installed: `apt-get install -y chromium` (.ci/run installs it)")
    return found


def run(url: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        cmd = [chromium(), *FLAGS, f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
               f"--virtual-time-budget={SETTLE_MS}", *args, url]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def screenshot(page: Path, png: Path) -> Path:
    run(Path(page).resolve().as_uri(), f"--screenshot={Path(png).resolve()}")
    return png


def dom(page: Path) -> str:
    """The page's DOM after its scripts ran (what a reader sees, as HTML)."""
    return run(Path(page).resolve().as_uri(), "--dump-dom").stdout


if __name__ == "__main__":
    print(screenshot(Path(sys.argv[1]), Path(sys.argv[2])))
