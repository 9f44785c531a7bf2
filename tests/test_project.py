"""Project rules that code review alone would let slip."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


INTEGRATIONS = ROOT / "packvit" / "integrations"


def _imports(f: Path):
    """(line, absolute module name) of every import in ``f``, relative imports resolved."""
    package = list(f.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield from ((node.lineno, f"{module}.{a.name}" if not node.module else module) for a in node.names)


def test_packvit_never_imports_transformers():
    """The models are written from scratch; transformers is only the reference, reached through
    weights_conversion.reference by the tools that compare against it. The glue to other projects
    (packvit/integrations/) is the exception: it imports them by design."""
    offenders = [
        f"{f.relative_to(ROOT)}:{line}"
        for f in sorted((ROOT / "packvit").rglob("*.py")) if INTEGRATIONS not in f.parents
        for line, name in _imports(f) if name.split(".")[0] == "transformers"
    ]
    assert not offenders, f"transformers imported under packvit/: {offenders}"


def test_nothing_in_packvit_imports_the_integrations():
    """Integrations import the library; the library never imports them (so it never needs their deps)."""
    offenders = [
        f"{f.relative_to(ROOT)}:{line}"
        for f in sorted((ROOT / "packvit").rglob("*.py")) if INTEGRATIONS not in f.parents
        for line, name in _imports(f) if name.startswith("packvit.integrations")
    ]
    assert not offenders, f"packvit imports its integrations: {offenders}"
