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
        "convert",
        help="convert a checkpoint (HF, original dinov3/ml-aim, packvit) to packvit safetensors",
        description="Convert a checkpoint to packvit's own layout: safetensors under packvit's tensor names "
        "(sharded above --max-shard-size, with an index) and a config.json recording the family and its "
        "config fields, and the source's preprocessor_config.json. Written to a temporary folder beside DST, "
        "checked there (--verify), then swapped in: on an error, a failed --verify or Ctrl-C, DST is as it was.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_write_args(p)
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 500MB, 5GB (default 5GB)")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="show progress bars (bytes read and written)",
    )
    v = p.add_argument_group("verification")
    v.add_argument(
        "--verify",
        action="store_true",
        help="run transformers and the converted model on a mixed-resolution batch and print parity",
    )
    v.add_argument("--device", default="cpu", help="device for --verify (default cpu)")
    v.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="--verify fails (exit 1, nothing written) when the minimum cosine similarity is below this "
        f"(default {THRESHOLDS['float32']} for float32 output, {THRESHOLDS['16-bit']} for bfloat16/float16)",
    )
    return p


# Default --verify thresholds. A float32 conversion is exact (max abs <= 1e-4 against transformers, a
# cosine within 1e-8 of 1), so 0.9999 leaves room only for TF32 on a GPU. 16-bit weights: packvit in
# bf16 kept a per-patch cosine >= 0.99982 against transformers on all 96 rows of the full benchmark at
# the published sizes (README, Results), so 0.999 passes every faithful conversion. A wrong head
# count (16 for 12, as a config.json without num_attention_heads once gave) gives 0.991 and 0.986, under both.
THRESHOLDS = {"float32": 0.9999, "16-bit": 0.999}


class VerificationFailed(ValueError):
    """--verify measured the written model below the threshold; DST was left as it was."""


def run(args: argparse.Namespace) -> int:
    from weights_conversion.convert import convert_checkpoint
    from weights_conversion.reference import require_transformers

    if args.verify:
        require_transformers("--verify")  # before reading gigabytes, not after writing them

    def check(result):  # on the temporary folder, before it is swapped in
        print(result.summary().replace(str(result.dst), str(args.dst)))
        if args.verify:
            verify(result, args.device, args.threshold)

    try:
        convert_checkpoint(
            args.src,
            args.dst,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            progress=args.progress,
            check=check,
            **source_kwargs(args),
        )
    except VerificationFailed as e:
        print(f"FAIL: {e}")
        return 1
    if args.verify:
        print(f"OK: written to {args.dst}")
    return 0


# Grids (h, w) in patches: different sizes and aspect ratios, one axis under 16 for SigLIP2's resize.
VERIFY_GRIDS = ((3, 5), (4, 4), (2, 7), (6, 3))


def verify(result, device: str, threshold: float | None) -> None:
    """Read back what was written (``result.dst``, the temporary folder) and compare it with
    transformers; raise ``VerificationFailed`` below ``threshold``."""
    from weights_conversion import load_model
    from weights_conversion.reference import load_reference

    from .parity import HEADER, compare, reference_dir, row

    model = load_model(result.dst, device=device, attn_backend="auto", allow_nonfinite=True)  # read back
    ckpt = result.checkpoint
    with reference_dir(ckpt, model) as (ref_path, what):
        # The reference keeps the source's precision: fp32 unless the source was saved lower.
        hf = load_reference(ref_path, device, torch.float32)
        patch = model.config.patch_size
        g = torch.Generator().manual_seed(0)
        images = [
            torch.randn(model.config.num_channels, h * patch, w * patch, generator=g).to(device)
            for h, w in VERIFY_GRIDS
        ]
        metrics = compare(ckpt.family, model, hf, images)
    print(
        f"verify: packvit ({model.dtype}, {model.attn_backend}, {device}) vs {what}; random pixels, grids (h x w "
        f"patches) {', '.join(f'{h}x{w}' for h, w in VERIFY_GRIDS)} in one packed batch"
    )
    print(HEADER)
    print(row("mixed", len(images), metrics))
    if threshold is None:
        threshold = THRESHOLDS["float32" if model.dtype == torch.float32 else "16-bit"]
    if not metrics["cos_min"] >= threshold:  # a NaN fails too
        raise VerificationFailed(
            f"cosine min {metrics['cos_min']:.6f} < threshold {threshold}; nothing was written to DST"
        )
    print(f"OK: cosine min {metrics['cos_min']:.6f} >= threshold {threshold}")
