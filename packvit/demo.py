"""Encode a mixed-resolution batch of real photos with a packed ViT, and check it against transformers.

python -m packvit.demo                                  # tiny random SigLIP2 checkpoint, CPU
python -m packvit.demo --family dinov3                  # ... or DINOv3 / AIMv2
python -m packvit.demo --ckpt google/siglip2-base-patch16-naflex --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

import packvit
from weights_conversion import FAMILIES, model_family
from weights_conversion.checkpoint_io import resolve
from weights_conversion.reference import load_reference, run_twin, tiny_checkpoint

from .preprocess import pil_to_tensor

ASSETS = Path(__file__).with_name("assets")
# (asset, long side in pixels); the astronaut is square, so it is cropped to a 3:4 portrait first.
IMAGES = [("coffee.jpg", 224), ("chelsea.jpg", 160), ("astronaut.jpg", 96)]
VIDEO = ("chelsea.jpg", 128)  # two frames, the second shifted by a few pixels


def load_image(name: str, long_side: int, patch: int) -> torch.Tensor:
    """(3, H, W) float in [0, 1], both sides multiples of ``patch``, aspect ratio roughly kept."""
    img = Image.open(ASSETS / name).convert("RGB")
    w, h = img.size
    if w == h:  # make it non-square: centre crop to a 3:4 portrait
        img, w = img.crop(((w - w * 3 // 4) // 2, 0, (w - w * 3 // 4) // 2 + w * 3 // 4, h)), w * 3 // 4
    scale = long_side / max(w, h)
    size = [max(patch, round(s * scale / patch) * patch) for s in (w, h)]
    return pil_to_tensor(img.resize(tuple(size), Image.BICUBIC))


def build_batch(family: str, patch: int) -> list[torch.Tensor]:
    images = [load_image(n, s, patch) for n, s in IMAGES]
    frame = load_image(*VIDEO, patch)
    images.append(torch.stack([frame, torch.roll(frame, shifts=(3, 5), dims=(1, 2))]))  # (t=2, C, H, W)
    return [FAMILIES[family].preprocess.normalise(x) for x in images]


@torch.inference_mode()
def parity(family: str, hf, images: list[torch.Tensor], outputs: list[torch.Tensor], patch: int, device: str) -> None:
    """Run transformers frame by frame and compare its patch tokens to packvit's."""
    worst_diff, worst_cos = 0.0, 1.0
    for img, out in zip(images, outputs):
        frames = img.unbind(0) if img.dim() == 4 else [img]
        h, w = frames[0].shape[1] // patch, frames[0].shape[2] // patch
        for f, ours in zip(frames, out.float().split(h * w)):
            ref = run_twin(family, hf, [f.to(device)]).patch_tokens[0]
            worst_diff = max(worst_diff, (ours - ref).abs().max().item())
            worst_cos = min(worst_cos, torch.nn.functional.cosine_similarity(ours, ref, dim=-1).min().item())
    print(f"parity vs transformers: max abs diff {worst_diff:.2e}, min cosine {worst_cos:.6f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="packvit demo", description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", help="checkpoint folder or hub id (default: a tiny random checkpoint)")
    ap.add_argument("--family", choices=sorted(FAMILIES), default="siglip2", help="family of the tiny checkpoint")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    ap.add_argument("--backend", default="auto", choices=("auto",) + packvit.BACKENDS)
    ap.add_argument("--no-parity", action="store_true", help="skip the comparison with transformers")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="packvit-demo-") as tmp:
        if args.ckpt is None:
            path = tiny_checkpoint(args.family, Path(tmp))
            print(f"generated a tiny random-weight {args.family} checkpoint (transformers) in {path}")
        else:
            path = resolve(args.ckpt)
            path = path if path.is_dir() else path.parent

        t0 = time.perf_counter()
        model = packvit.from_pretrained(
            path, device=args.device, dtype=getattr(torch, args.dtype), attn_backend=args.backend
        )
        family, patch = model_family(model), model.config.patch_size
        print(
            f"converted {family} checkpoint in {time.perf_counter() - t0:.2f} s "
            f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, {model.dtype}, {model.device})"
        )

        images = build_batch(family, patch)
        hidden_states, grid_thw = packvit.patchify(images, patch)
        print(f"packed batch: hidden_states {list(hidden_states.shape)}, grid_thw (t, h, w) = {grid_thw.tolist()}")

        x = hidden_states.to(args.device, getattr(torch, args.dtype))
        with torch.inference_mode():
            model(x, grid_thw)  # warm-up
            if x.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model(x, grid_thw, return_dict=True)
            if x.is_cuda:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
        print(f"attention backend: {model.attn_backend}; forward {elapsed * 1e3:.1f} ms")
        per_image = packvit.split_by_image(out.last_hidden_state, grid_thw)
        for (t, h, w), name, feats in zip(grid_thw.tolist(), [n for n, _ in IMAGES] + ["video"], per_image):
            print(f"  {name:14s} t={t} {h * patch}x{w * patch} px -> {h}x{w} patches -> features {list(feats.shape)}")
        if out.pooler_output is not None:
            print(f"  pooler_output {list(out.pooler_output.shape)} (one row per frame)")

        if args.no_parity:
            return 0
        try:
            hf = load_reference(path, args.device)
        except ImportError:
            print("transformers is not installed: skipping the parity check")
            return 0
        parity(family, hf, images, per_image, patch, args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
