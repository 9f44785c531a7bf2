"""Where packvit's time goes on mixed32: a torch.profiler breakdown of GPU kernel time into
matmul, attention, elementwise/other, and idle (wall time with no kernel running).

    python benchmarks/profile_breakdown.py --model siglip2 dinov3 aimv2 --backend fa4 [--compile] [--train]
"""

from __future__ import annotations

import argparse
import re

import torch
from torch.profiler import ProfilerActivity, profile

from packvit.bench.models import build_pair
from packvit.bench.timing import model_step
from packvit.bench.workloads import mixed32

MATMUL = re.compile(r"gemm|cutlass.*(?:sm90|tensorop)|nvjet|xmma|wgmma|cublas", re.I)
ATTN = re.compile(r"flash|fmha|attention|FlashAttn|kernel_cutlass_kernel_flash|Sm90Fwd|Sm90Bwd", re.I)


def breakdown(fn, steps: int = 5) -> dict:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    cats = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    top: dict[str, float] = {}
    spans = []
    for e in kernels:
        d = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        name = e.name
        cat = "attention" if ATTN.search(name) else "matmul" if MATMUL.search(name) else "other"
        cats[cat] += d
        if cat == "other":
            top[name[:60]] = top.get(name[:60], 0.0) + d
        spans.append((e.time_range.start, e.time_range.end))
    spans.sort()
    busy, end = 0.0, None
    for s, e in spans:  # union of kernel intervals
        if end is None or s > end:
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    wall = spans[-1][1] - spans[0][0] if spans else 0.0
    per = {k: v / steps / 1e3 for k, v in cats.items()}
    per["idle"] = (wall - busy) / steps / 1e3
    per["wall"] = wall / steps / 1e3
    per["top_other"] = sorted(((v / steps / 1e3, k) for k, v in top.items()), reverse=True)[:6]
    return per


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", nargs="+", default=["siglip2", "dinov3", "aimv2"])
    p.add_argument("--backend", default="fa4")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--train", action="store_true")
    a = p.parse_args()
    dev = torch.device("cuda")
    print("| model | backend | compiled | mode | wall ms | matmul ms | attention ms | other ms | idle ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    details = []
    for family in a.model:
        hf, pv = build_pair(family, None, dev, torch.bfloat16, a.backend)
        del hf
        if a.compile:
            pv.compile_blocks()
        wl = mixed32(pv.config.patch_size)
        x = torch.randn(wl.num_patches, pv.patch_dim, device=dev, dtype=torch.bfloat16)
        grid = torch.tensor(wl.grid)
        for mode in ("infer", "train") if a.train else ("infer",):
            r = breakdown(model_step(pv, x, grid, mode))  # sets the model's train / eval mode
            print(
                f"| {family} | {a.backend} | {a.compile} | {mode} | {r['wall']:.1f} | {r['matmul']:.1f} | "
                f"{r['attention']:.1f} | {r['other']:.1f} | {r['idle']:.1f} |"
            )
            details.append((family, mode, r["top_other"]))
        del pv
        torch.cuda.empty_cache()
    for family, mode, top in details:
        print(f"\n{family} {mode}: largest other kernels (ms/step): " + "; ".join(f"{n} {ms:.2f}" for ms, n in top))


if __name__ == "__main__":
    main()
