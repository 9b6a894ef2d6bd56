"""The `ftflow` command.

    ftflow compose [overrides...]        compose conf/ (+ overrides) into params.yaml
    ftflow run [overrides...] [-- snakemake args]   compose, then run the DAG with Snakemake
    ftflow <stage> [overrides...]        run one stage by hand (same code as its rule)

Overrides are Hydra's: `train.learning_rate=1e-4`, `peft=lora`, `experiment=demo_lora`.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ftflow import config

STAGES = ("download", "normalize", "pack", "train", "consolidate", "evaluate")


def run_stage(stage: str, params: dict, root: Path = Path(".")):
    """The one entry every path into a stage goes through (rule script or CLI)."""
    if stage == "download":
        from ftflow.download import download as fn
    elif stage == "normalize":
        from ftflow.normalize import normalize as fn
    elif stage == "pack":
        from ftflow.pack import pack as fn
    elif stage == "train":
        from ftflow.train import launch as fn
    elif stage == "consolidate":
        from ftflow.consolidate import consolidate as fn
    elif stage == "evaluate":
        from ftflow.evaluate import evaluate as fn
    else:
        raise ValueError(f"unknown stage {stage!r}: one of {STAGES}")
    return fn(params, root)


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)


def compose_and_write(overrides: list[str]) -> dict:
    tree = config.compose(overrides)
    config.write_params(tree, overrides)
    print(f"composed conf/ {' '.join(overrides) or '(no overrides)'} -> {config.PARAMS_FILE}", file=sys.stderr)
    return tree


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ftflow", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("compose", "run", *STAGES))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.learning_rate=1e-4 peft=lora")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    setup_logging()
    try:
        if args.command == "compose":
            compose_and_write(args.overrides)
        elif args.command == "run":
            compose_and_write(args.overrides)
            profile = os.environ.get("SNAKEMAKE_PROFILE", "profiles/local")
            snakemake = shutil.which("snakemake") or "snakemake"
            return subprocess.call([snakemake, "--profile", profile, *extra])
        else:
            tree = config.compose(args.overrides)  # a hand run leaves params.yaml alone
            run_stage(args.command, config.stage_params(tree, args.command))
    except config.ConfigError as err:
        print(f"ftflow: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
