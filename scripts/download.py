"""Rule entry for the download stage's rules (one source, the model, the manifest): see ftflow.cli.run_rule."""

from ftflow.cli import run_rule

run_rule(snakemake)  # noqa: F821 (injected by Snakemake)
