"""ftflow: reproducible LLM fine-tuning workflows (Snakemake + DVC + Hydra over TRL/PEFT)."""

__version__ = "0.1.0"
