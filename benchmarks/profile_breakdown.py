"""Where packvit's time goes on a workload: a torch.profiler breakdown of GPU kernel time into
matmul, attention, elementwise/other, and idle (wall time with no kernel running), for the model
and, in the same process, for the bound (`packvit.bench.bound`: one block's matmuls and attention
on the same tokens, times the number of blocks). The difference per category is the answer to
"why is the model slower than its bound": matmuls slower inside the model than alone, attention
likewise, the elementwise work, or the GPU waiting for the host.

    python benchmarks/profile_breakdown.py --model siglip2 dinov3 aimv2 --backend fa4 [--compile] [--train] \
        [--fp8] [--fp8-all] [--wgrad bf16|fp8] [--workload mixed32 llava_mix] [--out rows.jsonl]

``--host-profile`` also prints the Python functions that take the host's time in one step (cProfile,
by own time), for each model row.
``--fp8`` adds the FP8 model (``set_fp8()``, the measured crossovers) beside the bf16 one, so the two
kernel lists can be read against each other. Each row also has ``host_ms``: the Python time to enqueue
one step on an idle GPU (median of 5); a step whose host_ms exceeds its wall is host-bound. It is
measured before the process first runs torch.profiler, which leaves the host slower: so only the
first ``--model``'s figures are clean (one model per process for host figures).
"""

from __future__ import annotations

import argparse
import json
import re

import torch
from torch.profiler import ProfilerActivity, profile

from packvit.bench.bound import bound_layer_step
from packvit.bench.models import build_pair
from packvit.bench.timing import host_ms, host_profile, model_step
from packvit.bench.workloads import WORKLOADS

MATMUL = re.compile(r"gemm|cutlass.*(?:sm90|tensorop)|nvjet|xmma|wgmma|cublas", re.I)
ATTN = re.compile(r"flash|fmha|attention|FlashAttn|kernel_cutlass_kernel_flash|Sm90Fwd|Sm90Bwd", re.I)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def breakdown(fn, steps: int = 5, scale: float = 1.0, top_n: int = 8, host: float | None = None) -> dict:
    """Per-step GPU time by category (ms), times ``scale`` (the bound's one block -> all blocks);
    ``host``: the step's host time if measured already (else measured here)."""
    for _ in range(3):
        fn()
    _sync()
    host = host_ms(fn) * scale if host is None else host
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
        _sync()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    cats = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    top: dict[str, float] = {}
    top_mm: dict[str, float] = {}
    spans = []
    for e in kernels:
        d = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        name = e.name
        cat = "attention" if ATTN.search(name) else "matmul" if MATMUL.search(name) else "other"
        cats[cat] += d
        into = top if cat == "other" else top_mm if cat == "matmul" else None
        if into is not None:
            into[name[:60]] = into.get(name[:60], 0.0) + d
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
    f = scale / steps / 1e3
    per = {k: v * f for k, v in cats.items()}
    per["idle"] = (wall - busy) * f
    per["wall"] = wall * f
    per["host_ms"] = host
    per["top_other"] = sorted(((v * f, k) for k, v in top.items()), reverse=True)[:top_n]
    per["top_matmul"] = sorted(((v * f, k) for k, v in top_mm.items()), reverse=True)[:top_n]
    return per


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", nargs="+", default=["siglip2", "dinov3", "aimv2"])
    p.add_argument("--backend", default="fa4")
    p.add_argument("--workload", nargs="+", default=["mixed32"], choices=sorted(WORKLOADS))
    p.add_argument("--compile", action="store_true")
    p.add_argument("--train", action="store_true")
    p.add_argument("--fp8", action="store_true", help="also the FP8 model (set_fp8(), measured crossovers)")
    p.add_argument("--fp8-all", action="store_true", help="also the FP8 model with every linear FP8 (min_tokens 0)")
    p.add_argument(
        "--wgrad", choices=["bf16", "fp8"], help="the FP8 rows' weight-gradient GEMM (fp8.WGRAD; default: its default)"
    )
    p.add_argument("--no-bound", action="store_true", help="skip the bound's rows")
    p.add_argument("--host-profile", action="store_true", help="cProfile one step of each model row")
    p.add_argument("--top", type=int, default=8, help="kernels listed per category")
    p.add_argument("--out", help="append one JSON line per row here")
    p.add_argument("--device", default="cuda", help="cpu with --tiny: a smoke test of the script (no GPU kernels)")
    p.add_argument("--tiny", action="store_true", help="tiny random models")
    a = p.parse_args()
    if a.wgrad:
        from packvit import fp8

        fp8.WGRAD = a.wgrad
    dev, dt = torch.device(a.device), torch.bfloat16
    print("| model | workload | what | mode | wall ms | matmul ms | attention ms | other ms | idle ms | host ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    details = []
    for family in a.model:
        hf, pv = build_pair(family, None, dev, dt, a.backend, tiny=a.tiny)
        del hf
        if a.compile:
            pv.compile_blocks()
        what = "packvit compiled" if a.compile else "packvit eager"
        for name in a.workload:
            wl = WORKLOADS[name](pv.config.patch_size)
            x = torch.randn(wl.num_patches, pv.patch_dim, device=dev, dtype=dt)
            grid = torch.tensor(wl.grid)
            for mode in ("infer", "train") if a.train else ("infer",):
                variants = [(what, {"enabled": False})] + ([(what + " fp8", {})] if a.fp8 else [])
                variants += [(what + " fp8 all", {"min_tokens": 0})] if a.fp8_all else []
                # The host's time first, for every variant, before this process runs torch.profiler:
                # after a profiler run the host stays slower (H200, 2026-12-03: DINOv3's FP8 forward
                # 29.7 ms of host time measured after one, while its eager forward ran in 27.5 ms).
                hosts = {}
                for label, fp8_args in variants:
                    pv.set_fp8(**fp8_args)
                    step = model_step(pv, x, grid, mode)  # sets train / eval
                    for _ in range(3):
                        step()
                    hosts[label] = host_ms(step)
                    if a.host_profile:
                        host_profile(step, f"{family} {name} {label} {mode}")
                rows = {}
                for label, fp8_args in variants:
                    pv.set_fp8(**fp8_args)
                    rows[label] = breakdown(model_step(pv, x, grid, mode), top_n=a.top, host=hosts[label])
                pv.set_fp8(False)
                if not a.no_bound:
                    rows["bound"] = breakdown(
                        bound_layer_step(pv, wl, a.backend, mode == "train", dev, dt),
                        scale=pv.config.num_layers,
                        top_n=a.top,
                    )
                for label, r in rows.items():
                    print(
                        f"| {family} | {name} | {label} | {mode} | {r['wall']:.1f} | {r['matmul']:.1f} | "
                        f"{r['attention']:.1f} | {r['other']:.1f} | {r['idle']:.1f} | {r['host_ms']:.1f} |"
                    )
                    details.append((family, name, label, mode, r))
                    if a.out:
                        row = dict(family=family, workload=name, what=label, mode=mode, backend=a.backend, **r)
                        if "fp8" in label and mode == "train":
                            from packvit import fp8

                            row["wgrad"] = fp8.WGRAD
                        row.update(
                            device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                            torch=torch.__version__,
                        )
                        with open(a.out, "a") as fh:
                            fh.write(json.dumps(row) + "\n")
        del pv
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    for family, name, label, mode, r in details:
        for key in ("top_matmul", "top_other"):
            items = "; ".join(f"{n} {ms:.2f}" for ms, n in r[key])
            print(f"\n{family} {name} {label} {mode}, {key} (ms/step): {items}")


if __name__ == "__main__":
    main()
