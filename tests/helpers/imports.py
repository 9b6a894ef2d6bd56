"""ftflow's own imports, read from the source (no module is imported): which ftflow modules a
module can run, for the drift test of the stages' code inputs (tests/test_stages.py) and the
structure figures (benchmarks/structure.py).

A module is named by its dotted path under ftflow ("train.worker"); a package by its folder
("train", its __init__.py). Importing a module runs its packages' __init__ too, so they count.
"""

from __future__ import annotations

import ast
from pathlib import Path

from ftflow.stages import module_file

SRC = Path(__file__).resolve().parents[2] / "src/ftflow"

# Modules whose imports inside functions are not a stage's code: config.params composes and checks the
# whole tree (the CLI and the Snakefile's parse do that, not a stage), and schema's validators
# ask the readers about data sources (normalize, which imports the readers itself).
MODULE_LEVEL_ONLY = {"config.params", "config.schema"}


def path(module: str) -> Path:
    """The file of a module or package."""
    return SRC.parents[1] / module_file(module)


def exists(module: str) -> bool:
    return path(module).exists()


def packages(module: str) -> set[str]:
    """The packages whose __init__ importing `module` runs (not ftflow's own)."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def ftflow_imports(module: str, every: bool = False) -> set[str]:
    """The ftflow modules that `module` imports, at module level or inside its functions
    (`every`: inside the functions of MODULE_LEVEL_ONLY's modules too), with their packages."""
    tree = ast.parse(path(module).read_text())
    nodes = tree.body if module in MODULE_LEVEL_ONLY and not every else list(ast.walk(tree))
    typing_only = {id(n) for block in ast.walk(tree) if _type_checking(block) for n in ast.walk(block)}
    found: set[str] = set()
    for node in (n for n in nodes if id(n) not in typing_only):
        if isinstance(node, ast.ImportFrom) and (node.module == "ftflow" or (node.module or "").startswith("ftflow.")):
            base = node.module.removeprefix("ftflow").removeprefix(".")
            for alias in node.names:  # `from ftflow.train import tracking` imports a module
                sub = f"{base}.{alias.name}" if base else alias.name
                found.add(sub if exists(sub) else base)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("ftflow.") for a in node.names if a.name.startswith("ftflow.")}
    found.discard("")
    return found | {p for m in found for p in packages(m)}


def _type_checking(node: ast.AST) -> bool:
    """An `if TYPE_CHECKING:` block: imports for annotations, never run."""
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def reachable(module: str, every: bool = False, skip: frozenset[str] = frozenset()) -> set[str]:
    """`module`, its packages, and every ftflow module its imports reach (not through `skip`)."""
    seen, todo = set(), [module, *packages(module)]
    while todo:
        name = todo.pop()
        if name not in seen and name not in skip:
            seen.add(name)
            todo += ftflow_imports(name, every)
    return seen


def modules() -> list[str]:
    """Every module and package of ftflow (not the top-level package itself)."""
    found = []
    for p in SRC.rglob("*.py"):
        parts = p.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts and "__pycache__" not in parts:
            found.append(".".join(parts))
    return sorted(found)


def circles() -> set[tuple[str, str]]:
    """Pairs of modules that import each other, directly or through others (every import). A
    package and the modules inside it are not a circle: importing one of them runs the package's
    __init__ by itself."""
    return {tuple(sorted((a, b))) for a in modules() for b in ftflow_imports(a, every=True)
            if b != a and b not in packages(a) and a not in packages(b) and a in reachable(b, every=True)}  # fmt: skip
