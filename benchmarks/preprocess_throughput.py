"""CPU preprocessing throughput (images/s per process) of packvit.preprocess.ImageProcessor.

    python benchmarks/preprocess_throughput.py                 # decoded PIL images in memory
    python benchmarks/preprocess_throughput.py --from-jpeg     # JPEG decode included (a data loader's job)

Photo-like random images, sides 256..1024 px, processed in batches of --batch. Modes: SigLIP2
NaFlex (max_num_patches 256 and 1024, patch 16) and native (DINOv3, patch 16, up to 1024
patches). ``--backend`` picks the pixel path (``pil``: PIL resize, as transformers' PIL
processors; ``torchvision``: interpolate(antialias=True), as its torchvision processors; default
both). One process, torch threads as set by --threads; a DataLoader with W workers scales
roughly by W. Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import time

import numpy as np
import torch
from PIL import Image

from packvit.preprocess import IMAGENET_MEAN, IMAGENET_STD, ImageProcessor, PreprocessConfig


def make_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = rng.integers(256, 1025, 2)
        yy, xx = np.mgrid[0:h, 0:w]
        a = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1) + rng.integers(0, 30, (h, w, 3))
        out.append(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--from-jpeg", action="store_true")
    ap.add_argument("--backend", choices=["pil", "torchvision", "both"], default="both")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    images = make_images(args.images)
    if args.from_jpeg:
        blobs = []
        for im in images:
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=90)
            blobs.append(buf.getvalue())
    procs = {
        "siglip2 naflex 256": PreprocessConfig(
            patch_size=16, mode="naflex", image_mean=(0.5,) * 3, image_std=(0.5,) * 3, max_num_patches=256
        ),
        "siglip2 naflex 1024": PreprocessConfig(
            patch_size=16, mode="naflex", image_mean=(0.5,) * 3, image_std=(0.5,) * 3, max_num_patches=1024
        ),
        "dinov3 native <=1024": PreprocessConfig(
            patch_size=16, mode="native", image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD
        ),
    }
    backends = ["pil", "torchvision"] if args.backend == "both" else [args.backend]
    procs = {f"{name} {b}": dataclasses.replace(cfg, backend=b) for name, cfg in procs.items() for b in backends}
    rows = []
    for name, cfg in procs.items():
        proc = ImageProcessor(cfg)
        proc(images[:2])  # warm-up
        t0, tokens = time.perf_counter(), 0
        for i in range(0, len(images), args.batch):
            chunk = images[i : i + args.batch]
            if args.from_jpeg:
                chunk = [Image.open(io.BytesIO(b)) for b in blobs[i : i + args.batch]]
            x, grid = proc(chunk)
            tokens += x.shape[0]
        dt = time.perf_counter() - t0
        rows.append(
            dict(
                mode=name,
                images_per_s=round(len(images) / dt, 1),
                tokens_per_s=round(tokens / dt),
                tokens_per_image=round(tokens / len(images), 1),
            )
        )
    print(f"{'mode':36s} {'images/s':>9s} {'tokens/s':>10s} {'tok/img':>8s}")
    for r in rows:
        print(f"{r['mode']:36s} {r['images_per_s']:9.1f} {r['tokens_per_s']:10d} {r['tokens_per_image']:8.1f}")
    print(json.dumps(dict(threads=args.threads, from_jpeg=args.from_jpeg, sides="256..1024 px", rows=rows)))


if __name__ == "__main__":
    main()
