"""Extreme grids at published sizes: are the outputs finite in bf16? (hardening)

    python benchmarks/gpu_extreme_grids.py                      # CUDA, bf16, torch backend, real presets
    python benchmarks/gpu_extreme_grids.py --device cpu --tiny  # a seconds-long smoke run of the same code

Random weights (std 0.02, norms and LayerScale at 1) in the presets' real shapes; grids of 1x1,
1x512, 512x1 and 256x256 patches, 100 frames of 16x16, and all of them in one packed batch.
Exits 1 if any output holds a NaN or an infinity.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

import torch

from packvit.models.aimv2 import AIMv2, AIMv2Config
from packvit.models.dinov3 import DINOv3, DINOv3Config
from packvit.models.siglip2 import Siglip2, Siglip2Config

PRESETS = [
    (Siglip2, Siglip2Config, "siglip2-so400m-patch16-naflex"),
    (DINOv3, DINOv3Config, "dinov3-vitl16-pretrain-lvd1689m"),
    (AIMv2, AIMv2Config, "aimv2-large-patch14-native"),
]
GRIDS = {
    "1x1": [(1, 1, 1)],
    "1x512": [(1, 1, 512)],
    "512x1": [(1, 512, 1)],
    "256x256": [(1, 256, 256)],
    "100 frames 16x16": [(100, 16, 16)],
}
GRIDS["all, packed"] = [row for g in GRIDS.values() for row in g]
TINY = dict(hidden_size=16, num_layers=1, num_heads=1, intermediate_size=32)


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            near_one = (p.dim() == 1 and "norm" in name and name.endswith("weight")) or name.endswith(
                (".gamma", "ls1.scale", "ls2.scale")
            )
            p.copy_(
                torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32).to(p.dtype) * 0.02
                + (1.0 if near_one else 0.0)
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--backend", default=None, help="attention backend (default: torch on CUDA, sdpa on CPU)")
    ap.add_argument("--tiny", action="store_true", help="width 16, one block: a quick run of the same code")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    backend = args.backend or ("torch" if args.device.startswith("cuda") else "sdpa")
    print(f"device {args.device}, {args.dtype}, backend {backend}{', tiny widths' if args.tiny else ''}")
    print(f"{'model':<32} {'grid':<18} {'tokens':>7} {'ms':>9} {'finite':>6} {'max |out|':>10}")
    ok = True
    for cls, cfg_cls, name in PRESETS:
        cfg = cfg_cls.from_name(name)
        if args.tiny:
            cfg = replace(cfg, **TINY)
        with torch.device(args.device):
            model = cls(cfg, attn_backend="sdpa").to(dtype).eval()
        randomize_(model)
        model.set_attention_backend(backend)
        for gname, grid in GRIDS.items():
            n = sum(t * h * w for t, h, w in grid)
            x = torch.randn(n, model.patch_dim, device=args.device, dtype=dtype)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = model(x, grid, return_dict=True)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) * 1e3
            tensors = [out.last_hidden_state] + ([out.pooler_output] if out.pooler_output is not None else [])
            finite = all(torch.isfinite(t).all().item() for t in tensors)
            ok &= finite
            peak = max(t.float().abs().max().item() for t in tensors)
            print(f"{name:<32} {gname:<18} {n:>7} {ms:>9.1f} {str(finite):>6} {peak:>10.3g}")
        del model
    print("all finite" if ok else "NON-FINITE OUTPUTS FOUND")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
