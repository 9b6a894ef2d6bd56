"""ftflow's own imports, read from the source (no module is imported): which ftflow modules a
module can run, for the drift test of the stages' code inputs (tests/test_stages.py)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src/ftflow"

# Modules whose imports inside functions are not a stage's code: config composes and checks the
# whole tree (the CLI and the Snakefile's parse do that, not a stage), and schema's validators
# ask the readers about data sources (normalize, which imports the readers itself).
MODULE_LEVEL_ONLY = {"config", "schema"}


def ftflow_imports(module: str, every: bool = False) -> set[str]:
    """The ftflow modules that `module` imports, at module level or inside its functions
    (`every`: inside the functions of MODULE_LEVEL_ONLY's modules too)."""
    tree = ast.parse((SRC / f"{module}.py").read_text())
    nodes = tree.body if module in MODULE_LEVEL_ONLY and not every else list(ast.walk(tree))
    typing_only = {id(n) for block in ast.walk(tree) if _type_checking(block) for n in ast.walk(block)}
    nodes = [n for n in nodes if id(n) not in typing_only]
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module == "ftflow":  # from ftflow import x
            found |= {alias.name for alias in node.names if (SRC / f"{alias.name}.py").exists()}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ftflow."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("ftflow.")}
    return found


def _type_checking(node: ast.AST) -> bool:
    """An `if TYPE_CHECKING:` block: imports for annotations, never run."""
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def reachable(module: str, every: bool = False) -> set[str]:
    """`module` and every ftflow module its imports reach."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += ftflow_imports(name, every)
    return seen


def modules() -> list[str]:
    return sorted(p.stem for p in SRC.glob("*.py") if p.stem not in ("__init__", "__main__"))


def circles() -> set[tuple[str, str]]:
    """Pairs of modules that import each other, directly or through others (every import)."""
    return {tuple(sorted((a, b))) for a in modules() for b in ftflow_imports(a, every=True)
            if b != a and a in reachable(b, every=True)}  # fmt: skip
