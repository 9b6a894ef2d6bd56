"""Rule entry for the report stage: see ftflow.cli.run_rule."""

from ftflow.cli import run_rule

run_rule(snakemake)  # noqa: F821 (injected by Snakemake)
