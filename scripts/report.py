"""Rule entry for the report stage: output to the rule's log, run the stage on its params."""

import os

from ftflow.cli import run_stage, setup_logging

# dup2, not sys.stderr=: child processes (accelerate's workers) must log there too
log_fd = os.open(snakemake.log[0], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)  # noqa: F821
os.dup2(log_fd, 1)
os.dup2(log_fd, 2)
setup_logging()
run_stage("report", snakemake.params.cfg)  # noqa: F821 (injected by Snakemake)
