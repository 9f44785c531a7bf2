"""Project rules that code review alone would let slip."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The tools on top of the library: they import it, nothing in it imports them (so the library never
# needs their dependencies, and a tool can change without touching the models). integrations/ is the
# glue to other projects (LLaVA-NeXT, transformers); it imports them by design.
TOOLS = ("packvit.cli", "packvit.commands", "packvit.demo", "packvit.bench", "packvit.integrations")
# The model itself: it computes, it does not know where weights come from.
MODEL = ("packvit.models", "packvit.attention", "packvit.layers", "packvit.packing", "packvit.fused_ops",
         "packvit.triton_kernels")


def _module(f: Path) -> str:
    parts = f.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _imports(f: Path):
    """(line, absolute name) of every import in ``f``, function-local ones included, relative ones
    resolved; ``from a import b`` gives ``a.b`` (``b`` may be a submodule)."""
    package = list(f.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield from ((node.lineno, f"{module}.{a.name}") for a in node.names)


def _library() -> list[Path]:
    """Every file of packvit and weights_conversion that is not a tool."""
    files = sorted((ROOT / "packvit").rglob("*.py")) + sorted((ROOT / "weights_conversion").rglob("*.py"))
    return [f for f in files if not _under(_module(f), TOOLS)]


def _offenders(files: list[Path], bad) -> list[str]:
    return [f"{f.relative_to(ROOT)}:{line} imports {name}" for f in files for line, name in _imports(f) if bad(name)]


def test_the_import_walk_sees_imports():
    # Guards the rules below against passing vacuously: known edges of every import form.
    edges = {name for _, name in _imports(ROOT / "packvit" / "cli.py")}
    assert any(_under(n, ("packvit.commands",)) for n in edges), edges  # relative, function-local
    edges = {name for _, name in _imports(ROOT / "packvit" / "bench" / "runner.py")}
    assert "packvit.attention.available_backends" in edges and "torch" in edges, edges
    assert _library() and not any(_under(_module(f), TOOLS) for f in _library())


def test_packvit_never_imports_transformers():
    """The models are written from scratch; transformers is only the reference, reached through
    weights_conversion.reference by the tools that compare against it. The glue to other projects
    (packvit/integrations/) is the exception: it imports them by design."""
    files = [f for f in sorted((ROOT / "packvit").rglob("*.py")) if not _under(_module(f), ("packvit.integrations",))]
    offenders = _offenders(files, lambda name: name.split(".")[0] == "transformers")
    assert not offenders, f"transformers imported under packvit/: {offenders}"


def test_the_library_never_imports_its_tools():
    """CLI, demo, bench and integrations import the library; nothing in packvit or
    weights_conversion outside them imports one of them."""
    offenders = _offenders(_library(), lambda name: _under(name, TOOLS))
    assert not offenders, f"the library imports a tool: {offenders}"


def test_the_model_never_imports_weights_conversion():
    """Conversion stays out of the models: the model modules never learn where weights come from
    (loading a checkpoint lives in weights_conversion, and in the tower / seed entry points)."""
    files = [f for f in _library() if _under(_module(f), MODEL)]
    assert files
    offenders = _offenders(files, lambda name: name.split(".")[0] == "weights_conversion")
    assert not offenders, f"the model imports weights_conversion: {offenders}"
