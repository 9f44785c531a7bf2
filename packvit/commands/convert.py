"""``packvit convert SRC DST``: any checkpoint packvit reads -> a packvit-native folder."""

from __future__ import annotations

import argparse

import torch

from .common import add_write_args, source_kwargs

EXAMPLES = """examples:
  packvit convert facebook/dinov3-vitl16-pretrain-lvd1689m dinov3-l --dtype bfloat16
  packvit convert ./siglip2-hf/model.safetensors siglip2-pv --config ./siglip2-hf/config.json --verify
  packvit convert dinov3_vitl16_pretrain_lvd1689m.pth dinov3-l --allow-pickle --max-shard-size 500MB
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "convert", help="convert a checkpoint (HF, original dinov3/ml-aim, packvit) to packvit safetensors",
        description="Convert a checkpoint to packvit's own layout: safetensors under packvit's tensor names "
        "(sharded above --max-shard-size, with an index) and a config.json recording the family and its "
        "config fields. Written atomically: on an error or Ctrl-C nothing is left at DST.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_write_args(p)
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 500MB, 5GB (default 5GB)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="show progress bars (bytes read and written)")
    v = p.add_argument_group("verification")
    v.add_argument("--verify", action="store_true",
                   help="run transformers and the converted model on a mixed-resolution batch and print parity")
    v.add_argument("--device", default="cpu", help="device for --verify (default cpu)")
    v.add_argument("--threshold", type=float, default=0.99,
                   help="--verify fails (exit 1) when the minimum cosine similarity is below this (default 0.99)")
    return p


def run(args: argparse.Namespace) -> int:
    from weights_conversion.convert import convert_checkpoint

    result = convert_checkpoint(
        args.src, args.dst, dtype=args.dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
        progress=args.progress, **source_kwargs(args),
    )
    print(result.summary())
    if not args.verify:
        return 0
    return verify(result, args.device, args.threshold)


# Grids (h, w) in patches: different sizes and aspect ratios, one axis under 16 for SigLIP2's resize.
VERIFY_GRIDS = ((3, 5), (4, 4), (2, 7), (6, 3))


def verify(result, device: str, threshold: float) -> int:
    from weights_conversion import load_model

    from weights_conversion.reference import load_reference

    from .parity import HEADER, compare, reference_dir, row

    model = load_model(result.dst, device=device, attn_backend="auto")  # what was written, read back
    ckpt = result.checkpoint
    with reference_dir(ckpt, model) as (ref_path, what):
        # The reference keeps the source's precision: fp32 unless the source was saved lower.
        hf = load_reference(ref_path, device, torch.float32)
        patch = model.config.patch_size
        g = torch.Generator().manual_seed(0)
        images = [torch.randn(model.config.num_channels, h * patch, w * patch, generator=g).to(device)
                  for h, w in VERIFY_GRIDS]
        metrics = compare(ckpt.family, model, hf, images)
    print(f"verify: packvit ({model.dtype}, {model.attn_backend}, {device}) vs {what}; random pixels, grids (h x w "
          f"patches) {', '.join(f'{h}x{w}' for h, w in VERIFY_GRIDS)} in one packed batch")
    print(HEADER)
    print(row("mixed", len(images), metrics))
    if metrics["cos_min"] < threshold:
        print(f"FAIL: cosine min {metrics['cos_min']:.6f} < threshold {threshold}")
        return 1
    print(f"OK: cosine min {metrics['cos_min']:.6f} >= threshold {threshold}")
    return 0
