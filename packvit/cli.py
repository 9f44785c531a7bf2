"""The ``packvit`` command line: argument parsing and dispatch only; each subcommand lives in
``packvit/commands/`` and calls plain library functions."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from contextlib import contextmanager

EXIT_CODES = """exit codes:
  0    success
  1    failure: unreadable or mismatched checkpoint, or parity below --threshold (align, convert --verify)
  2    usage error (bad or missing arguments)
  130  interrupted (Ctrl-C; 143 for SIGTERM, 129 for SIGHUP); convert and export-hf leave DST as it was
"""

# Subcommands that parse their own arguments: everything after the name goes to them.
PASSTHROUGH = {
    "demo": ("packvit.demo", "encode a mixed-resolution batch of photos and check parity with transformers"),
    "bench": ("packvit.bench", "the benchmark suite (models, workloads, backends, modes, output file)"),
}


def build_parser() -> argparse.ArgumentParser:
    from .commands import align, convert, export

    parser = argparse.ArgumentParser(
        prog="packvit",
        description="Packed Vision Transformers (AIMv2, DINOv3, SigLIP2): convert, export, check, benchmark.",
        epilog=EXIT_CODES + "\nRun 'packvit COMMAND --help' for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (convert, export, align):
        p = module.add_parser(sub)
        p.epilog = (p.epilog or "") + "\n" + EXIT_CODES
        p.set_defaults(run=module.run)
    for name, (_, text) in PASSTHROUGH.items():
        sub.add_parser(name, add_help=False, help=text + f" ('packvit {name} --help')")
    return parser


# Optional dependencies -> what to install. transformers is the reference the demo, the benchmarks,
# ``convert --verify`` and ``align`` compare against; matplotlib draws ``bench render --plot``.
EXTRAS = {
    "transformers": "pip install 'packvit[demo]' (or pip install transformers)",
    "PIL": "pip install pillow",
    "matplotlib": "pip install 'packvit[bench]'",
    "tqdm": "pip install tqdm",
    "huggingface_hub": "pip install huggingface_hub",
}


def _missing(e: ImportError) -> str | None:
    """One line naming the optional package an ImportError lacks and how to install it; None when
    the missing module is not an optional dependency (a broken install: the traceback says more)."""
    name = (getattr(e, "name", None) or "").split(".")[0]
    if name in EXTRAS:
        return f"this needs {name}, which is not installed: {EXTRAS[name]}"
    return None


@contextmanager
def _ctrl_c_held():
    """Hold Ctrl-C until the block ends. A KeyboardInterrupt raised inside an extension module's
    import can surface as an unrelated error (CPython: "TypeError: expected a message argument");
    imports take a second or two, so the interrupt waits for them and is then raised plainly."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def _bench_device(rest: list[str]) -> list[str] | None:
    """``packvit bench`` times GPUs (``--device cuda``): on a machine without CUDA, the tiny smoke test
    runs on the CPU; a full run is refused with what to do instead (None)."""
    import torch

    if (
        rest[:1] == ["render"]
        or "--device" in rest
        or any(a.startswith("--device=") for a in rest)
        or "-h" in rest
        or "--help" in rest
        or torch.cuda.is_available()
    ):
        return rest
    if "--tiny" in rest:
        print("packvit bench: no CUDA device here, so the smoke test runs on the CPU (--device cpu)", file=sys.stderr)
        return rest + ["--device", "cpu"]
    print(
        "packvit bench: error: no CUDA device here, and the benchmark suite times GPUs (default --device cuda). "
        "For a CPU smoke test: packvit bench --tiny --device cpu",
        file=sys.stderr,
    )
    return None


def _passthrough(name: str, rest: list[str]) -> int:
    import importlib

    module_name = PASSTHROUGH[name][0]
    try:
        with _ctrl_c_held():
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if _missing(e):
            print(f"packvit {name}: error: {_missing(e)}", file=sys.stderr)
            return 1
        if e.name is None or not module_name.startswith(e.name):
            raise  # the module exists but one of its own imports is missing: show that
        print(f"packvit {name}: {module_name} is not available in this installation ({e})", file=sys.stderr)
        return 1
    if name == "bench":
        rest = _bench_device(rest)
        if rest is None:
            return 1
        if rest[:1] == ["render"] and any(a == "--plot" or a.startswith("--plot=") for a in rest):
            import importlib.util

            if importlib.util.find_spec("matplotlib") is None:  # before reading the results, not after
                print(f"packvit bench: error: --plot: {_missing(ImportError(name='matplotlib'))}", file=sys.stderr)
                return 1
    try:
        return int(module.main(rest) or 0)
    except ImportError as e:  # an optional dependency imported lazily by the command
        if _missing(e) is None:
            raise
        print(f"packvit {name}: error: {_missing(e)}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _main(argv)
    except KeyboardInterrupt as e:  # also during imports, before a command runs
        print(f"packvit{' ' + argv[0] if argv else ''}: interrupted", file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)


def _main(argv: list[str]) -> int:
    if argv and argv[0] in PASSTHROUGH:
        try:
            return _passthrough(argv[0], argv[1:])
        except SystemExit as e:  # the subcommand's own argparse: --help (0) or a usage error (2)
            return e.code if isinstance(e.code, int) else 1
    with _ctrl_c_held():
        parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    try:
        with _ctrl_c_held():
            import weights_conversion  # noqa: F401  (torch, safetensors: the imports every command makes)
        return args.run(args)
    except ImportError as e:
        print(f"packvit {args.command}: error: {_missing(e) or e}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:
        # CheckpointError and ConversionError are ValueErrors; FileExistsError/FileNotFoundError are OSErrors.
        print(f"packvit {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
