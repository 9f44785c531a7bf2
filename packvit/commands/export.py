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
        "export-hf",
        help="write a checkpoint as config.json + model.safetensors that transformers loads",
        description="Write a checkpoint (packvit-native, e.g. a tower fine-tuned in LLaVA, or any layout "
        "packvit reads) as the Hugging Face layout transformers' from_pretrained loads. Converting an HF "
        "checkpoint and exporting it gives back the same tensors bit for bit; the source's "
        "preprocessor_config.json comes along. Written to a temporary folder beside DST and swapped in: "
        "on an error or Ctrl-C, DST is as it was.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_write_args(p)
    p.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar (bytes read)"
    )
    return p


def run(args: argparse.Namespace) -> int:
    from weights_conversion import build_model, cast_state, export_hf, read_checkpoint
    from weights_conversion.convert import ByteBar
    from weights_conversion.safe_write import prepare_destination

    sources = [args.src, args.config]
    prepare_destination(args.dst, sources=sources, overwrite=args.overwrite)  # before reading gigabytes
    bar = ByteBar("read", args.progress)
    try:
        ckpt = read_checkpoint(args.src, progress=bar, **source_kwargs(args))
    finally:
        bar.close()
    model = build_model(ckpt.family, ckpt.config, cast_state(ckpt.state, args.dtype), attn_backend="sdpa")
    out = export_hf(model, args.dst, overwrite=args.overwrite, preprocessor=ckpt.preprocessor, sources=sources)
    n = sum(p.numel() for p in model.parameters())
    files = sorted(f.name for f in out.iterdir() if not f.name.startswith("."))
    size = sum((out / f).stat().st_size for f in files)
    print(
        f"exported {ckpt.family} model ({n:,} parameters, {str(model.dtype).removeprefix('torch.')}) "
        f"to {out} ({' + '.join(files)}, {size / 1e6:.1f} MB)"
    )
    return 0
