"""Registers ftflow's OmegaConf resolvers when DVC composes conf/ (`dvc exp run`).

DVC's Hydra integration imports the `hydra_plugins` packages found in `hydra.plugins_path`
(the repository root) before composing, and resolves the tree, so `${ftflow_conf_digest:}`
in conf/config.yaml needs this to be registered there too.
"""

from pathlib import Path

from ftflow.config.params import register_resolvers

register_resolvers(Path(__file__).resolve().parents[2] / "conf")
