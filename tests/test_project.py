"""Project rules that code review alone would let slip."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_packvit_never_imports_transformers():
    """The models are written from scratch; transformers is only the reference, reached through
    weights_conversion.reference by the tools that compare against it."""
    offenders = []
    for f in sorted((ROOT / "packvit").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{f.relative_to(ROOT)}:{node.lineno}" for n in names if n.split(".")[0] == "transformers"]
    assert not offenders, f"transformers imported under packvit/: {offenders}"
