"""What the orchestration costs on a finished run, next to its floor, measured in one run:

    python benchmarks/orchestration.py [--repeats 5] [--experiment smoke]

On a repository copy in which the demo (or `--experiment`) has run to the end:
  - `snakemake -n` (nothing to do) against a 3-rule Snakefile whose outputs exist: Snakemake's
    own start-up, parse and DAG, the floor of any workflow;
  - `ftflow dispatch <stage> -- -n` for each DVC stage, what a DVC stage's command pays before the
    stage's own work (ftflow's start, the Snakefile's parse, the one-step DAG), against `dvc
    status` in a one-stage repository (DVC's own start-up, the floor of any DVC stage).
Each is timed `--repeats` times, alternately with its floor; the median is printed. Targets
(issue 21): `snakemake -n` <= 2.0 s, dispatch <= 3 s per stage.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tests' helpers

from helpers import BIN, copy_repo, env, ftflow  # noqa: E402

FLOOR_SNAKEFILE = """
rule a:
    output: "a.txt"
    shell: "echo a > {output}"
rule b:
    input: "a.txt"
    output: "b.txt"
    shell: "cp {input} {output}"
rule c:
    input: "b.txt"
    output: "c.txt"
    shell: "cp {input} {output}"
"""


def seconds(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env(), check=True, capture_output=True)
    return time.perf_counter() - start


def floor_workflow(root: Path) -> Path:
    root.mkdir()
    (root / "Snakefile").write_text(FLOOR_SNAKEFILE)
    subprocess.run([str(BIN / "snakemake"), "--cores", "1", "c.txt"], cwd=root, check=True, capture_output=True)
    return root


def floor_dvc(root: Path) -> Path:
    root.mkdir()
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"],
                [str(BIN / "dvc"), "stage", "add", "-q", "-n", "s", "-o", "out.txt", "echo s > out.txt"],
                [str(BIN / "dvc"), "repro", "-q"]):  # fmt: skip
        subprocess.run(cmd, cwd=root, env=env(), check=True, capture_output=True)
    return root


def median(cmd: list[str], cwd: Path, floor: list[str], floor_cwd: Path, repeats: int) -> tuple[float, float]:
    ours, base = [], []
    for _ in range(repeats):  # alternated: the machine's other load shifts both alike
        ours.append(seconds(cmd, cwd))
        base.append(seconds(floor, floor_cwd))
    return statistics.median(ours), statistics.median(base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--experiment", default=None, help="e.g. smoke (default: the demo)")
    args = parser.parse_args()
    from ftflow.stages import DVC_STAGES

    with tempfile.TemporaryDirectory() as tmp:
        work = copy_repo(Path(tmp) / "repo")
        shutil.copy(REPO / "dvc.yaml", work)  # dispatch checks the DAG against it (a DVC stage's command)
        start = time.perf_counter()
        ftflow("run", *([f"experiment={args.experiment}"] if args.experiment else []), cwd=work)
        print(f"{args.experiment or 'demo'} run to the end in {time.perf_counter() - start:.0f} s\n")
        snakefile, dvc = floor_workflow(Path(tmp) / "floor"), floor_dvc(Path(tmp) / "dvc")

        rows = []
        ours, base = median([str(BIN / "snakemake"), "--profile", "profiles/local", "-n"], work,
                            [str(BIN / "snakemake"), "--cores", "1", "-n", "c.txt"], snakefile, args.repeats)  # fmt: skip
        rows.append(("snakemake -n (nothing to do)", ours, "3-rule Snakefile, -n", base, 2.0))
        for stage in DVC_STAGES:
            ours, base = median([str(BIN / "ftflow"), "dispatch", stage, "--", "-n"], work,
                                [str(BIN / "dvc"), "status"], dvc, args.repeats)  # fmt: skip
            rows.append((f"ftflow dispatch {stage} -- -n", ours, "dvc status, 1 stage", base, 3.0))

    print("| command | median s | floor | floor s | ratio | target |\n|---|---|---|---|---|---|")
    for what, ours, floor, base, target in rows:
        print(f"| {what} | {ours:.2f} | {floor} | {base:.2f} | {ours / base:.2f}x | <= {target:.1f} s "
              f"{'met' if ours <= target else 'missed'} |")  # fmt: skip


if __name__ == "__main__":
    main()
