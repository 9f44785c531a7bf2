"""The ``packvit`` command line: argument parsing and dispatch only; each subcommand lives in
``packvit/commands/`` and calls plain library functions."""

from __future__ import annotations

import argparse
import sys

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
        prog="packvit", description="Packed Vision Transformers (AIMv2, DINOv3, SigLIP2): convert, export, check, benchmark.",
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


def _passthrough(name: str, rest: list[str]) -> int:
    import importlib

    module_name = PASSTHROUGH[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is None or not module_name.startswith(e.name):
            raise  # the module exists but one of its own imports is missing: show that
        print(f"packvit {name}: {module_name} is not available in this installation ({e})", file=sys.stderr)
        return 1
    return int(module.main(rest) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _main(argv)
    except KeyboardInterrupt as e:  # also during imports, before a command runs
        print(f"packvit{' ' + argv[0] if argv else ''}: interrupted", file=sys.stderr)
        return 128 + getattr(e, "signum", 2)


def _main(argv: list[str]) -> int:
    parser = build_parser()
    if argv and argv[0] in PASSTHROUGH:
        try:
            return _passthrough(argv[0], argv[1:])
        except SystemExit as e:  # the subcommand's own argparse: --help (0) or a usage error (2)
            return e.code if isinstance(e.code, int) else 1
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.run(args)
    except (ValueError, OSError, ImportError) as e:
        # CheckpointError and ConversionError are ValueErrors; FileExistsError/FileNotFoundError are OSErrors.
        print(f"packvit {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
