"""House rule: no function over 60 lines outside tests (docstring included, decorators not)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("attnseg", "cli", "service", "workers")
MAX_LINES = 60


def long_functions(package: str) -> list[str]:
    """`path:line name (n lines)` for every function or method of `package` longer than MAX_LINES."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_over_60_lines():
    assert [entry for package in PACKAGES for entry in long_functions(package)] == []
