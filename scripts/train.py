"""Rule entry for the train stage: output to the rule's log, run the stage on its params."""

import os
import sys

from ftflow.cli import run_stage, setup_logging
from ftflow.errors import StageError

# Snakemake's side of the job (under Slurm: the job's own log, kept per job id, while the rule's
# log is replaced by the retry): the reason a run stopped is written there too
job_stderr = os.fdopen(os.dup(2), "w")
# dup2, not sys.stderr=: child processes (accelerate's workers) must log there too
log_fd = os.open(snakemake.log[0], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)  # noqa: F821
os.dup2(log_fd, 1)
os.dup2(log_fd, 2)
setup_logging()
if "SLURM_JOB_ID" in os.environ:
    print(f"Slurm job {os.environ['SLURM_JOB_ID']}", flush=True)
try:
    run_stage("train", snakemake.params.cfg)  # noqa: F821 (injected by Snakemake)
except StageError as err:
    for out in (sys.stderr, job_stderr):
        print(f"ftflow train: {err}", file=out, flush=True)
    sys.exit(getattr(err, "exit_status", 1))
