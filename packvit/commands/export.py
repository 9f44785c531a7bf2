"""``packvit export-hf SRC DST``: any checkpoint packvit reads -> the layout transformers loads."""

from __future__ import annotations

import argparse

from .common import add_write_args, source_kwargs

EXAMPLES = """examples:
  packvit export-hf dinov3-l dinov3-l-hf                 # a folder written by packvit convert
  packvit export-hf ./finetuned-tower out-hf --dtype bfloat16
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "export-hf", help="write a checkpoint as config.json + model.safetensors that transformers loads",
        description="Write a checkpoint (packvit-native, e.g. a tower fine-tuned in LLaVA, or any layout "
        "packvit reads) as the Hugging Face layout transformers' from_pretrained loads. Converting an HF "
        "checkpoint and exporting it gives back the same tensors bit for bit. Written atomically.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_write_args(p)
    return p


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from weights_conversion import export_hf, load_model, model_family

    if Path(args.dst).exists() and not args.overwrite:
        raise FileExistsError(f"destination {args.dst} exists; choose another one or pass --overwrite")
    model = load_model(args.src, dtype=args.dtype, attn_backend="sdpa", **source_kwargs(args))
    out = export_hf(model, args.dst, overwrite=args.overwrite)
    n = sum(p.numel() for p in model.parameters())
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"exported {model_family(model)} model ({n:,} parameters, {str(model.dtype).removeprefix('torch.')}) "
          f"to {out} (config.json + model.safetensors, {size / 1e6:.1f} MB)")
    return 0
