"""The `ftflow` command.

    ftflow compose [overrides...]        compose conf/ (+ overrides) into params.yaml
    ftflow run [overrides...] [-- snakemake args]   compose, run the DAG with Snakemake, then
                                         write its report: results/report.html
    ftflow report [-- snakemake args]    bring the report's files up to date, write the report
    ftflow <stage> [overrides...]        run one stage by hand (same code as its rule);
                                         `ftflow <stage> --help`: the config keys it reads
    ftflow config [GROUP...] [overrides...]   every config key (of GROUP: train, data, ...) with
                                         its type, allowed values, value and description
    ftflow inspect [packed dir] [--rows N]   packed rows with trained / masked tokens marked
    ftflow chat [model dir] [--prompt TEXT] [--system TEXT] [--max-new-tokens N]
                                         talk to a model (default: results/consolidate/model)
                                         with its own chat template; --prompt: one answer

  DVC (see dvc.yaml):
    ftflow compose --check               fail if params.yaml is not what conf/ composes to
    ftflow dispatch <rule>               run exactly one rule through Snakemake (DVC's stage cmd)
    ftflow dvc-yaml                      render dvc.yaml from the Snakemake rules
    ftflow sync                          after dvc checkout / exp apply: make Snakemake agree
    ftflow pull [dvc pull args]          dvc pull, then ftflow sync

Overrides are Hydra's: `train.learning_rate=1e-4`, `peft=lora`, `experiment=demo_lora`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ftflow import freshness, runner, stages
from ftflow.config import params
from ftflow.errors import ConfigError, StageError
from ftflow.progress import setup_logging
from ftflow.workflow import workspace

INTERRUPTED = 128 + signal.SIGINT  # a shell's exit status for a process ended by Ctrl-C


def run_rule(smk) -> None:
    """Every rule script's body (`smk`: the `snakemake` object Snakemake gives a script): output to
    the rule's log, run the rule's part of its stage on its params, and end a StageError with
    its message and exit status, no traceback."""
    # Snakemake's side of the job (under Slurm: the job's own log, kept per job id, while the
    # rule's log is replaced by a retry): the reason a job stopped is written there too
    job_stderr = os.fdopen(os.dup(2), "w")
    # dup2, not sys.stderr=: child processes (accelerate's workers) must log there too
    log_fd = os.open(smk.log[0], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    setup_logging()
    if "SLURM_JOB_ID" in os.environ:
        print(f"Slurm job {os.environ['SLURM_JOB_ID']}", flush=True)
    try:
        runner.run_rule(smk.rule, smk.params.cfg)
    except (StageError, KeyboardInterrupt) as err:
        why = err if isinstance(err, StageError) else "interrupted (SIGINT); run again to redo this step"
        for out in (sys.stderr, job_stderr):
            print(f"ftflow {smk.rule}: {why}", file=out, flush=True)
        sys.exit(getattr(err, "exit_status", INTERRUPTED))


def call(cmd: list[str], **kwargs) -> int:
    """Run a child command (Snakemake, DVC) to its end, even through Ctrl-C: the terminal sends
    SIGINT to the child as well, which stops in its own way (Snakemake waits for its jobs; the
    training processes save a checkpoint), so this process only waits, and says so once."""
    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))  # reset in the child
    try:
        rc = subprocess.call(cmd, **kwargs)
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        raise KeyboardInterrupt
    return rc


def compose_and_write(overrides: list[str]) -> dict:
    notes: list[str] = []
    tree = params.compose(overrides, notes=notes)
    for note in notes:
        print(note, file=sys.stderr)
    params.write_params(tree, overrides)
    print(f"composed conf/ {' '.join(overrides) or '(no overrides)'} -> {params.PARAMS_FILE}", file=sys.stderr)
    return tree


def snakemake_cmd(*args: str) -> list[str]:
    """Snakemake with the profile users pick through SNAKEMAKE_PROFILE (default: this machine)."""
    profile = os.environ.get("SNAKEMAKE_PROFILE", "profiles/local")
    return [shutil.which("snakemake") or "snakemake", "--profile", profile, *args]


def dispatch(rule: str, extra: list[str]) -> int:
    """Run one rule, and only it, through Snakemake: DVC has already decided it must run and
    that its inputs are current (so no upstream rule may run, and the rule is forced)."""
    from ftflow.workflow import dvcyaml

    if rule not in stages.DVC_STAGES:
        raise ConfigError(f"dispatch: {rule!r} is not a DVC stage (one of {stages.DVC_STAGES})")
    from ftflow.workflow.inputs import missing_downloads

    missing = missing_downloads(params.read_params()[0], rule) if rule in stages.BY_NAME else []
    if missing:
        raise StageError(
            f"{rule} reads what was never downloaded into data/:\n  " + "\n  ".join(missing) + "\n"
            "DVC's pipeline does not download (login nodes do; data/ is versioned by `dvc add data`). "
            "Download with this params.yaml, then version it and run again:\n"
            "  snakemake --profile profiles/local download && dvc add data"
        )
    dvc = workspace.launcher(os.getpid()) or "dvc"
    os.environ.update(workspace.claim(f"{dvc} (its stage {rule})", dvc="skip"))
    # --allowed-rules: the other rules are not in the DAG, so their outputs are plain inputs (a
    # missing one is an error); this holds because rules name their inputs by path (common.smk)
    cmd = snakemake_cmd("--allowed-rules", rule, "--forcerun", rule, *extra, "--", rule)
    print(" ".join(cmd), file=sys.stderr, flush=True)
    return call(cmd, env={**os.environ, dvcyaml.STAGE_ENV: rule})


# Snakemake's options whose next words are values, not targets
VALUE_OPTIONS = {"--forcerun", "-R", "--until", "-U", "--omit-from", "-O", "--allowed-rules", "--cores", "-c",
                 "--jobs", "-j", "--config", "-C", "--set-threads", "--set-resources", "--profile", "--directory",
                 "-d", "--rerun-triggers", "--latency-wait", "--retries", "--resources"}  # fmt: skip


def dry_run(extra: list[str]) -> bool:
    """Snakemake only plans: nothing to check, record or report afterwards."""
    return bool({"-n", "--dry-run", "--dryrun"} & set(extra))


def targets(extra: list[str]) -> list[str]:
    """The files or rules named in Snakemake's arguments: a run of those only."""
    found, value = [], False
    for word in extra:
        if word.startswith("-"):
            value = word.partition("=")[0] in VALUE_OPTIONS and "=" not in word
        elif not value:
            found.append(word)
    return found


def presented(tree: dict, extra: list[str]) -> int:
    """After a run: every stage's results were made by this config, or the run fails naming the
    stage and the keys (a run of some targets only, `ftflow run -- results/pack/train`, leaves
    later stages as they were: then the report is not written, and the run is not failed)."""
    if dry_run(extra):
        return 0
    try:
        freshness.check_current(tree)
    except freshness.StaleResults as err:
        if targets(extra):
            print(f"report: not written: {err}", file=sys.stderr)
            return 0
        raise
    return 0


def record_in_dvc(extra: list[str]) -> int:
    """After a whole run in a DVC repository: `dvc commit` of the pipeline's stages, so that
    dvc.lock describes what is on disk and DVC's door goes on from it (a `dvc exp run` then
    reruns what its change reaches, and finds every output in its cache instead of removing
    those it has no record of). Not after a dry run or a run of some targets only."""
    if dry_run(extra) or targets(extra):
        return 0
    if not Path(".dvc").is_dir() or not Path("dvc.yaml").exists() or shutil.which("dvc") is None:
        return 0
    from ftflow.workflow.dvcyaml import output_times

    workspace.release_dvc()  # dvc commit takes DVC's lock itself
    start, times = time.monotonic(), output_times()
    rc = call(["dvc", "commit", "--force", "dvc.yaml"])  # not --quiet: it hides DVC's error too
    for path, ns in times.items():  # as Snakemake saw them (output_times says why)
        if path.exists():
            os.utime(path, ns=(ns, ns), follow_symlinks=False)
    if rc == 0:
        print(f"dvc: the run recorded in dvc.lock ({time.monotonic() - start:.0f} s)", file=sys.stderr)
    else:
        print("dvc: `dvc commit dvc.yaml` failed (above): dvc.lock does not describe this run", file=sys.stderr)
    return rc


def html_report(extra: list[str] = ()) -> int:
    """Snakemake's report of the finished run, its first page showing the headline figures.
    Not after a dry run, nor after a run of part of the DAG that left the report's files out."""
    from ftflow import paths
    from ftflow.report import HTML

    if dry_run(extra):
        return 0
    if not all((Path(paths.REPORT) / name).exists() for name in paths.REPORT_FILES.values()):
        print(f"report: not written ({paths.REPORT}/ is incomplete); `ftflow report` makes it", file=sys.stderr)
        return 0
    rc = call(snakemake_cmd("--report", HTML))
    if rc == 0:
        print(f"report: {HTML}", file=sys.stderr)
    return rc


def config_help(words: list[str], stage: str | None) -> str:
    """`ftflow config [GROUP...] [overrides...]`, and `ftflow <stage> --help` (stage: its sections)."""
    import difflib

    from ftflow.config import describe
    from ftflow.config.schema import validate

    groups = [w for w in words if "=" not in w]
    unknown = sorted(set(groups) - set(describe.sections()))
    if unknown:
        close = difflib.get_close_matches(unknown[0], describe.sections(), n=1)
        hint = f" — did you mean {close[0]}?" if close else ""
        raise ConfigError(
            f"config: no config group {', '.join(unknown)} (groups: {', '.join(describe.sections())}){hint}"
        )
    valid = validate(params.compose([w for w in words if "=" in w])).model_dump(mode="json")
    if stage is None:
        return describe.describe(valid, groups or describe.sections())
    sections = stages.BY_NAME[stage].sections
    head = (f"ftflow {stage} [overrides...]: run the {stage} stage by hand, as its rule does. "
            + ("It reads these config keys (values as conf/ composes now):\n" if sections else "It reads no config.\n"))  # fmt: skip
    return head + describe.describe(valid, sections)


def check_params() -> None:
    params.load_checked(params.PARAMS_FILE)
    print(f"{params.PARAMS_FILE} is what conf/ composes to", file=sys.stderr)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ftflow", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "command",
        choices=("compose", "run", *stages.NAMES, "config", "dispatch", "dvc-yaml", "sync", "pull", "inspect", "chat"),
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.learning_rate=1e-4 peft=lora")
    p.add_argument("--check", action="store_true", help="compose: only check that params.yaml is current")
    p.add_argument("--stage", help=argparse.SUPPRESS)  # `ftflow <stage> --help`: config lists its sections
    p.add_argument("--rows", type=int, default=2, help="inspect: how many packed rows to show")
    p.add_argument("--prompt", help="chat: print the answer to this one message and stop")
    p.add_argument("--system", help="chat: a system message first")
    p.add_argument("--max-new-tokens", type=int, default=256, help="chat: the longest answer, in tokens")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # what follows `--` goes to Snakemake (run, report, dispatch) or DVC (pull)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    ours = argv[: argv.index("--")] if "--" in argv else argv
    if ours[:1] and ours[0] in stages.NAMES and {"-h", "--help"} & set(ours):
        ours = ["config", f"--stage={ours[0]}", *(a for a in ours[1:] if a not in ("-h", "--help"))]
    args = parser().parse_args(ours)
    setup_logging()
    try:
        return command(args, extra) or 0
    except ConfigError as err:
        print(f"ftflow: {err}", file=sys.stderr)
        return 2
    except StageError as err:
        print(f"ftflow {args.command}: {err}", file=sys.stderr)
        return getattr(err, "exit_status", 1)
    except BrokenPipeError:  # `ftflow config | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"ftflow {args.command}: interrupted (Ctrl-C). {how_to_go_on(argv)}", file=sys.stderr)
        return INTERRUPTED


def how_to_go_on(argv: list[str]) -> str:
    """The command that goes on from where an interrupted one stopped: the same, but never with
    train.resume=false, which would remove the checkpoint just saved (it reruns nothing else:
    train.resume is not a rerun trigger)."""
    again = " ".join(["ftflow", *(a for a in argv if a.lstrip("+") != "train.resume=false")])
    hint = f"`{again}` goes on from where it stopped (training from the checkpoint it saved"
    if again != " ".join(["ftflow", *argv]):
        return hint + "; with train.resume=false it would start afresh and remove that checkpoint)"
    return hint + "; add train.resume=false to start afresh instead)"


# commands that write the workspace (params.yaml, results/): one at a time (workflow/workspace.py)
WRITERS = ("compose", "run", "report", "sync", "pull", *stages.NAMES)


def command(args: argparse.Namespace, extra: list[str]) -> int | None:
    """Run one command; its exit status (None: 0)."""
    if args.command in WRITERS and not args.check:  # the children run under the hold
        dvc = "check" if args.command in ("sync", "pull") else "hold"  # those two run DVC
        os.environ.update(workspace.claim(workspace.command_line(), dvc=dvc))
    if args.command == "compose" and args.check:
        check_params()
    elif args.command == "compose":
        compose_and_write(args.overrides)
    elif args.command == "run":
        tree = compose_and_write(args.overrides)
        changed = freshness.changes(tree)
        for line in freshness.describe(changed):
            print(f"changed since the results on disk: {line}", file=sys.stderr)
        # rerun them whatever Snakemake's own records say (after `ftflow sync` it has none); not in
        # a run of some targets only: Snakemake would add the forced rules to it
        force = ["--forcerun", *changed] if changed and not targets(extra) else []
        return (call(snakemake_cmd(*force, *extra)) or presented(tree, extra) or record_in_dvc(extra)
                or html_report(extra))  # fmt: skip
    elif args.command == "report":
        return call(snakemake_cmd(*extra, "--", "report")) or html_report()
    elif args.command == "config":
        print(config_help(args.overrides, args.stage))
    elif args.command == "dispatch":
        if len(args.overrides) != 1:
            parser().error("dispatch takes one rule name")
        return dispatch(args.overrides[0], extra)
    elif args.command == "dvc-yaml":
        from ftflow.workflow import dvcyaml

        print(f"wrote {dvcyaml.write()}", file=sys.stderr)
    elif args.command == "inspect":
        from ftflow.pack.inspect import inspect

        print(inspect(*(Path(p) for p in args.overrides[:1]), rows=args.rows))
    elif args.command == "chat":
        from ftflow.chat import MODEL, chat

        if not args.overrides and Path(MODEL).exists() and Path(params.PARAMS_FILE).exists():
            # the pipeline's model: made by the current params.yaml, or refused
            freshness.check_current(params.read_params()[0], only=freshness.before("evaluate"))
        chat(Path(args.overrides[0] if args.overrides else MODEL), args.system, args.max_new_tokens, args.prompt)
    elif args.command in ("sync", "pull"):
        from ftflow.workflow.sync import sync

        if args.command == "pull" and call(["dvc", "pull", *args.overrides, *extra]) != 0:
            return 1
        sync()
    else:  # a stage, by hand: composed with the overrides, params.yaml left alone
        tree = params.compose(args.overrides)
        if not (args.command == "evaluate" and tree["eval"].get("models")):  # (eval.models: other models)
            # what it reads was made by this config, as far as the keys it reads itself go
            sections = stages.BY_NAME[args.command].sections
            freshness.check_current(tree, only=freshness.before(args.command), sections=sections)
        runner.run(args.command, params.stage_params(tree, args.command))
    return None


if __name__ == "__main__":
    sys.exit(main())
