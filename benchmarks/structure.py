"""The code's structure, in figures: modules and lines per folder of src/ftflow, import circles,
the longest functions, and where stages still validate config sections themselves.

    python benchmarks/structure.py
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tests' helpers

from helpers.imports import SRC, circles  # noqa: E402

# where validating a config section belongs: the schema, and the runner's entry into a stage
VALIDATION_HOMES = {"config/schema.py", "runner.py"}


def functions(path: Path):
    """(qualified name, lines) of every function in a module."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield f"{path.relative_to(SRC)}:{node.name}", node.end_lineno - node.lineno + 1


def main() -> None:
    files = sorted(p for p in SRC.rglob("*.py") if "__pycache__" not in p.parts)
    per_folder = Counter(str(p.parent.relative_to(SRC.parent)) for p in files)
    lines = Counter()
    for p in files:
        lines[str(p.parent.relative_to(SRC.parent))] += len(p.read_text().splitlines())
    print("| folder | modules | lines |\n|---|---:|---:|")
    for folder in sorted(per_folder):
        print(f"| {folder} | {per_folder[folder]} | {lines[folder]:,} |")
    print(f"\nimport circles: {len(circles())} {sorted(circles()) or ''}".rstrip())
    longest = sorted((f for p in files for f in functions(p)), key=lambda f: -f[1])[:5]
    print("longest functions: " + ", ".join(f"{name} ({n} lines)" for name, n in longest))
    validating = {str(p.relative_to(SRC)): p.read_text().count("model_validate") for p in files}
    outside = {name: n for name, n in validating.items() if n and name not in VALIDATION_HOMES}
    print(f"model_validate outside the schema and the runner: {sum(outside.values())} {outside}")


if __name__ == "__main__":
    main()
