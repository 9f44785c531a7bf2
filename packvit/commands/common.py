"""Argument types and options shared by the subcommands."""

from __future__ import annotations

import argparse

import torch

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def dtype_arg(text: str) -> torch.dtype:
    try:
        return DTYPES[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}: expected one of {', '.join(DTYPES)}") from None


def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def add_source_args(p: argparse.ArgumentParser, name: str = "SRC") -> None:
    """How to read a source checkpoint (called ``name`` in the help): the options of ``read_checkpoint``."""
    g = p.add_argument_group("reading the source")
    g.add_argument("--revision", help=f"hub revision (branch, tag or commit) when {name} is a hub id")
    g.add_argument(
        "--config",
        metavar="PATH",
        help="transformers config.json for a single weights file (default: the config.json beside it)",
    )
    g.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read .pth/.bin/.pt pickles, with torch.load(weights_only=True); refused without this flag",
    )
    g.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="read weights holding NaN or Inf (refused without this flag: such a checkpoint is broken)",
    )
    g.add_argument(
        "--preset",
        help="original-layout checkpoints: the architecture preset, "
        "e.g. dinov3-vitl16-pretrain-lvd1689m or aimv2-large-patch14-native",
    )
    g.add_argument(
        "--num-heads",
        type=positive_int,
        help="original ml-aim checkpoints: number of attention heads (not readable from the weights)",
    )
    g.add_argument(
        "--no-strict-config",
        dest="strict_config",
        action="store_false",
        help="warn about unknown config.json fields instead of failing",
    )


def add_write_args(p: argparse.ArgumentParser) -> None:
    """SRC and DST of a command that writes a checkpoint, how to read SRC, --dtype and --overwrite."""
    p.add_argument("src", metavar="SRC", help="hub id (owner/name), local folder, or a single weights file")
    p.add_argument(
        "dst",
        metavar="DST",
        help="output folder: new, empty, or written by packvit (with --overwrite); "
        "never SRC, a folder holding SRC, the working directory or its parents",
    )
    add_source_args(p)
    p.add_argument("--dtype", type=dtype_arg, help="cast floating tensors to this dtype (default: keep the source's)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace DST if packvit wrote it; the old output stays until the new one is complete. "
        "A folder packvit did not write is never replaced",
    )


def source_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        revision=args.revision,
        config=args.config,
        allow_pickle=args.allow_pickle,
        preset=args.preset,
        num_heads=args.num_heads,
        strict_config=args.strict_config,
        allow_nonfinite=args.allow_nonfinite,
    )
