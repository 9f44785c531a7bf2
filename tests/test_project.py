"""Project rules that code review alone would let slip."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The tools on top of the library: they import it, nothing in it imports them (so the library never
# needs their dependencies, and a tool can change without touching the models). integrations/ is the
# glue to other projects (LLaVA-NeXT, transformers); it imports them by design.
TOOLS = ("packvit.cli", "packvit.commands", "packvit.demo", "packvit.bench", "packvit.integrations")
# The model itself: it computes, it does not know where weights come from.
MODEL = (
    "packvit.models",
    "packvit.attention",
    "packvit.layers",
    "packvit.packing",
    "packvit.fused_ops",
    "packvit.triton_kernels",
)


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


# --- No import circle between packvit and weights_conversion -------------------------------------
# The layers, bottom up: packvit's core (what ``packvit/__init__.py`` imports: attention, layers,
# models, packing, ``packvit._version``); ``weights_conversion``, which converts checkpoints into the
# core's models; the loaders above both (``packvit.pretrained``, ``packvit.seed``, ``packvit.tower``,
# ``packvit.zero3``, ``packvit.preprocess``), which ``packvit/__init__`` names but imports on first use.
# Public names: packvit's ``__all__`` (``from_pretrained`` and the ``*Packing`` classes included) and
# weights_conversion's ``__all__``.

LOADERS = (
    "packvit/__init__.py",
    "packvit/seed.py",
    "packvit/tower.py",
    "packvit/pretrained.py",
    "packvit/zero3.py",
    "packvit/preprocess.py",
)


def _module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _top_level_imports(f: Path):
    """Modules ``f`` imports when it is imported (function bodies excluded), as absolute names."""
    package = list(f.relative_to(ROOT).with_suffix("").parts[:-1])
    tree = ast.parse(f.read_text())
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield module
            yield from (f"{module}.{a.name}" for a in node.names)  # a submodule, when it is one
        else:
            todo.extend(ast.iter_child_nodes(node))


def test_packvit_init_never_reaches_weights_conversion():
    """What ``import packvit`` runs (following every module-level import, and the parent packages
    Python runs first) holds no ``weights_conversion`` module. weights_conversion imports the core,
    so the two meet one way only: ``import weights_conversion`` first can never find packvit
    half-built waiting on it."""
    seen, todo = set(), ["packvit"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        f = _module_file(name)
        if f is None:
            continue
        parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        todo.extend(
            parents + [m for m in _top_level_imports(f) if m.split(".")[0] in ("packvit", "weights_conversion")]
        )
    reached = sorted(m for m in seen if _module_file(m) is not None)
    assert not [m for m in reached if m.startswith("weights_conversion")], reached
    assert "packvit._version" in reached


def _fresh(code: str) -> str:
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_each_side_imports_first_in_a_fresh_process():
    out = _fresh(
        "import sys, weights_conversion\n"
        "assert 'packvit.seed' not in sys.modules and 'packvit.pretrained' not in sys.modules, 'loaders imported'\n"
        "import packvit\n"
        "assert packvit.from_pretrained is sys.modules['packvit.pretrained'].from_pretrained\n"
        "from weights_conversion import native\n"
        "print(native.__version__ == packvit.__version__)\n"
    )
    assert out.strip() == "True"
    out = _fresh(
        "import sys, packvit\n"
        "print(sorted(m for m in sys.modules if m.startswith('weights_conversion')))\n"
        "from packvit import AIMv2Packing, DINOv3ViTPacking, Siglip2NaflexPacking, from_pretrained\n"
        "print(set(packvit.__all__) <= set(dir(packvit)))\n"
    )
    assert out.split("\n")[:2] == ["[]", "True"], out


def _function_local_imports(f: Path):
    """(line, module) of every import inside a function body of ``f``."""
    package = list(f.relative_to(ROOT).with_suffix("").parts[:-1])
    for fn in ast.walk(ast.parse(f.read_text())):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Import):
                yield from ((node.lineno, a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                yield node.lineno, ".".join(base + ([node.module] if node.module else []))


def test_no_function_local_imports_between_packvit_and_weights_conversion():
    """Deferred imports used to hide the circle (packvit/__init__.py, seed.py, tower.py twice,
    weights_conversion/native.py). The loaders and the converter import each other's modules at the
    top, where a circle would fail at once. (``packvit/__init__``'s ``__getattr__`` names its loaders
    through ``importlib``; the tools, cli/commands/demo/bench, defer imports to keep ``--help`` fast.)"""
    files = [ROOT / f for f in LOADERS] + sorted((ROOT / "weights_conversion").rglob("*.py"))
    offenders = [
        f"{f.relative_to(ROOT)}:{line} imports {name}"
        for f in files
        for line, name in _function_local_imports(f)
        if name.split(".")[0] in ("packvit", "weights_conversion")
    ]
    assert not offenders, offenders


# Python that hides transformers (as if not installed), then runs pytest on the given test files.
_WITHOUT_TRANSFORMERS = """
import importlib.abc, sys

class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "transformers":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Hide())
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", *sys.argv[1:]]))
"""


def test_core_tests_run_without_transformers():
    """Only the tests that compare against transformers need it: the core's tests run (none skipped)
    with transformers hidden, as on an install without it."""
    files = [
        "tests/test_packing.py",
        "tests/test_packing_limits.py",
        "tests/test_position_tables.py",
        "tests/test_attention.py",
        "tests/test_batching.py",
    ]
    r = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TRANSFORMERS, *files],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    summary = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-2000:]
    assert r.returncode == 0 and " passed" in summary and "skipped" not in summary, summary


def test_public_names_resolve():
    """packvit's and weights_conversion's ``__all__`` are their public names (README uses them); each resolves."""
    import packvit
    import weights_conversion

    for module in (packvit, weights_conversion):
        missing = [n for n in module.__all__ if not hasattr(module, n)]
        assert not missing, f"{module.__name__}.__all__ names {missing}, which it does not define"
    assert {"load_model", "export_hf", "FAMILIES", "Family"} <= set(weights_conversion.__all__)
    assert {"from_pretrained", "AIMv2Packing", "DINOv3ViTPacking", "Siglip2NaflexPacking"} <= set(packvit.__all__)


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
