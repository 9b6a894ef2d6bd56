"""Rule entry for the download rules (one source, the model, the manifest): output to the
rule's log, run that part of the stage on the rule's params."""

import os

from ftflow import download
from ftflow.cli import setup_logging

# dup2, not sys.stderr=: child processes must log there too
log_fd = os.open(snakemake.log[0], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)  # noqa: F821
os.dup2(log_fd, 1)
os.dup2(log_fd, 2)
setup_logging()
part = {"download_source": download.download_source, "download_model": download.download_model,
        "download": download.gather}[snakemake.rule]  # noqa: F821 (injected by Snakemake)  # fmt: skip
part(snakemake.params.cfg)  # noqa: F821
