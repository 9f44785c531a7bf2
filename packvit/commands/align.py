"""``packvit align``: packvit against transformers, per resolution and on a mixed-resolution batch.

Both models get the same pixels: images resized to each ``--image_size`` and normalised with the
family's mean and std. Exits 1 when any cosine minimum falls below ``--threshold``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .common import add_source_args, dtype_arg, positive_int, source_kwargs

ASSETS = Path(__file__).resolve().parent.parent / "assets"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

EXAMPLES = """examples:
  packvit align --ckpt google/siglip2-base-patch16-naflex --device cuda --dtype bfloat16 --image_size 256 384x512
  packvit align --ckpt ./dinov3-hf --use_real_images --image_dir ./photos --threshold 0.999
"""


def size_arg(text: str) -> tuple[int, int]:
    """``224`` (square) or ``384x512`` (height x width), in pixels."""
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts, default=0) <= 0:
        raise argparse.ArgumentTypeError(f"image size {text!r}: expected pixels, e.g. 224 or 384x512 (height x width)")
    return (parts[0], parts[-1])


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "align",
        help="compare packvit with transformers per resolution and on a mixed batch",
        description=(__doc__.split("\n\n")[0] + " " + __doc__.split("\n\n")[1]).replace("``", "").replace("\n", " "),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--ckpt", required=True, help="checkpoint: hub id, folder or weights file (any layout packvit reads)"
    )
    add_source_args(p, name="--ckpt")
    p.add_argument("--device", default="cpu", help="device for both models (default cpu)")
    p.add_argument("--dtype", type=dtype_arg, default=torch.float32, help="dtype for both models (default float32)")
    p.add_argument(
        "--batch_size", "--batch-size", type=positive_int, default=2, help="images per resolution (default 2)"
    )
    p.add_argument(
        "--image_size",
        "--image-size",
        type=size_arg,
        nargs="+",
        default=[(224, 224), (448, 448)],
        help="resolutions in pixels, 224 or HxW, rounded to the patch size (default 224 448)",
    )
    p.add_argument(
        "--threshold", type=float, default=0.99, help="exit 1 when a cosine minimum is below this (default 0.99)"
    )
    p.add_argument(
        "--use_real_images",
        "--use-real-images",
        action="store_true",
        help="use photos (from --image_dir) instead of random pixels",
    )
    p.add_argument(
        "--image_dir",
        "--image-dir",
        type=Path,
        default=ASSETS,
        help="folder of photos for --use_real_images (default: packvit's bundled assets)",
    )
    p.add_argument("--backend", default="auto", help="packvit attention backend (default auto)")
    p.add_argument("--seed", type=int, default=0, help="seed for random images (default 0)")
    return p


def _snap(size: tuple[int, int], patch: int) -> tuple[int, int]:
    return tuple(max(patch, round(s / patch) * patch) for s in size)


def load_photos(directory: Path) -> list:
    from PIL import Image

    files = sorted(f for f in directory.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) if directory.is_dir() else []
    if not files:
        raise ValueError(f"--image_dir {directory}: expected a folder with images ({', '.join(IMAGE_SUFFIXES)})")
    return [Image.open(f).convert("RGB") for f in files]


def make_images(photos, n: int, size: tuple[int, int], normalise, gen: torch.Generator) -> list[torch.Tensor]:
    """``n`` (3, H, W) images through ``normalise``: photos resized (bicubic) to ``size``, or uniform random pixels."""
    from PIL import Image

    from packvit.preprocess import pil_to_tensor

    out = []
    for i in range(n):
        if photos:
            img = photos[i % len(photos)].resize((size[1], size[0]), Image.BICUBIC)
            x = pil_to_tensor(img)
        else:
            x = torch.rand(3, *size, generator=gen)
        out.append(normalise(x))
    return out


def run(args: argparse.Namespace) -> int:
    from weights_conversion import FAMILIES, build_model, cast_state, read_checkpoint
    from weights_conversion.reference import load_reference

    from .parity import HEADER, compare, reference_dir, row

    ckpt = read_checkpoint(args.ckpt, **source_kwargs(args))
    model = build_model(ckpt.family, ckpt.config, cast_state(ckpt.state, args.dtype), attn_backend="sdpa")
    model = model.to(args.device).eval()
    model.set_attention_backend(args.backend)
    patch = model.config.patch_size
    normalise = FAMILIES[ckpt.family].preprocess.normalise
    photos = load_photos(args.image_dir) if args.use_real_images else None
    gen = torch.Generator().manual_seed(args.seed)
    sizes = list(dict.fromkeys(_snap(s, patch) for s in args.image_size))

    with reference_dir(ckpt, model) as (ref_path, what):
        hf = load_reference(ref_path, args.device, args.dtype)
        print(
            f"packvit {ckpt.family} ({ckpt.layout} checkpoint, {model.attn_backend}, {args.dtype}, {args.device}) "
            f"vs {what}; {'photos from ' + str(args.image_dir) if photos else 'random pixels'}"
        )
        print(HEADER)
        results = []
        groups = [(f"{h}x{w}", make_images(photos, args.batch_size, (h, w), normalise, gen)) for h, w in sizes]
        # The mixed batch: every image above, sizes interleaved, in one packed sequence.
        if len(sizes) > 1:
            groups.append(("mixed", [imgs[j] for j in range(args.batch_size) for _, imgs in groups]))
        for name, images in groups:
            m = compare(ckpt.family, model, hf, [x.to(args.device, args.dtype) for x in images])
            results.append(m)
            print(row(name, len(images), m))
    worst = min(m["cos_min"] for m in results)
    if worst < args.threshold:
        print(f"FAIL: cosine min {worst:.6f} < threshold {args.threshold}")
        return 1
    print(f"OK: cosine min {worst:.6f} >= threshold {args.threshold}")
    return 0
