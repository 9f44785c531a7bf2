"""What the host pays to enqueue FP8 training's work, op by op, and whether the caching allocator
makes a training step wait for the GPU.

At 23k tokens FP8 training is host-bound: AIMv2's step with every linear in FP8 took 109-131 ms of
host time for 85-89 ms of kernels (H200, 2026-12-03, ``profile_breakdown.py --train --fp8-all``),
where the bf16 step's host time is 48-63 ms for 98 ms of kernels. This script splits that up:

0. ``queue``: whether the launch queue fills (4,000 launches behind a sleeping kernel).
1. ``ops``: the host's microseconds per call of each op the FP8 linear runs (median of 5 x 50 calls,
   enqueued while the GPU sleeps, so no call waits for it): bf16 ``F.linear``, ``torch._scaled_mm``,
   packvit's Triton quantisers, a transposed copy, ``torch.empty``.
1b. ``phases``: one FP8 linear taken apart (its forward, its backward's ops without autograd, the
   engine's cost for a Python function), with a cProfile in microseconds.
2. ``linear``: one linear's forward + backward (autograd), ``nn.Linear`` against ``FP8Linear`` with
   each weight-gradient recipe, with and without a bias, at every layer shape of the family.
3. ``step``: a whole training step of the model: host time with the GPU idle at the start, wall
   time, and the caching allocator's counters over the timed steps (device mallocs and frees, and
   the retries that free cached blocks, which wait for the GPU).

    python benchmarks/fp8_host_costs.py --family aimv2 [--parts queue ops phases linear step] [--tokens 23103]
        [--out rows.jsonl]

Results (RESULTS.md, "session 12"): the queue never fills and the allocator never waits; the host's
cost is the ops themselves, about 10 a linear at 20-140 us each (the machines' hosts differ up to 5x).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch
import torch.nn.functional as F
from fp8_ab import SHAPES as AB_SHAPES  # benchmarks/ is on sys.path when run as a script
from torch import nn

from packvit import fp8
from packvit.bench.models import build_pair
from packvit.bench.timing import model_step
from packvit.bench.workloads import mixed32

DEV = torch.device("cuda")
BF16 = torch.bfloat16
HAS_BIAS = {"siglip2": True, "dinov3": True, "aimv2": False}  # the published models' linears
SHAPES = {  # family -> layer -> (K, N, bias): fp8_ab.py's shapes with the bias
    fam: {kind: (K, N, HAS_BIAS[fam]) for kind, (K, N) in layers.items()} for fam, layers in AB_SHAPES.items()
}


def emit(row: dict, out: str | None) -> None:
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as fh:
            fh.write(json.dumps(row) + "\n")


def host_us(fn, calls: int = 50, reps: int = 5) -> float:
    """Host microseconds per call of ``fn``, the GPU kept asleep so that no call waits for it."""
    fn()
    torch.cuda.synchronize()
    out = []
    gc.disable()
    try:
        for _ in range(reps):
            torch.cuda._sleep(200_000_000)  # about 0.1 s of GPU work queued ahead
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            out.append((time.perf_counter() - t) / calls * 1e6)
            torch.cuda.synchronize()
    finally:
        gc.enable()
    return round(statistics.median(out), 1)


def profile_calls(fn, label: str, calls: int = 5, top: int = 25) -> None:
    """cProfile of ``calls`` calls of ``fn`` enqueued while the GPU sleeps, by own time."""
    import cProfile
    import io
    import pstats

    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(top)
    print(f"== {label}\n{buf.getvalue()}", flush=True)


def part_queue(out: str | None, n: int = 4000) -> None:
    """The launch queue's depth: the host's time for each of ``n`` tiny kernels enqueued behind a long
    sleeping kernel; once the queue is full a launch waits for a kernel to finish (the sleep's)."""
    t = torch.zeros(16, device=DEV)
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)  # about half a second
    stamps = []
    for _ in range(n):
        t.add_(1)
        stamps.append(time.perf_counter())
    torch.cuda.synchronize()
    gaps = [(b - a) * 1e6 for a, b in zip(stamps, stamps[1:])]
    first_slow = next((i for i, g in enumerate(gaps) if g > 1000), None)
    emit(
        {
            "part": "queue",
            "launches": n,
            "first_launch_over_1ms": first_slow,
            "median_us": round(statistics.median(gaps), 1),
        },
        out,
    )


def part_ops(M: int, out: str | None) -> None:
    from packvit import fp8_kernels

    K, N = 1024, 3072
    x = torch.randn(M, K, device=DEV, dtype=BF16)
    w = torch.randn(N, K, device=DEV, dtype=BF16) * 0.02
    dy = torch.randn(M, N, device=DEV, dtype=BF16)
    xq, sx = fp8.quantize_rows(x)
    wq, sw = fp8.quantize_rows(w)
    amax = x.float().abs().amax(0)
    ops = {
        "F.linear bf16": lambda: F.linear(x, w),
        "mm dy.T @ x bf16": lambda: dy.t() @ x,
        "torch._scaled_mm rowwise": lambda: torch._scaled_mm(
            xq, wq.t(), scale_a=sx, scale_b=sw.view(1, -1), out_dtype=BF16, use_fast_accum=True
        ),
        "quantize_rows (triton)": lambda: fp8_kernels.quantize_rows(x),
        "quantize_rows_col_stats K<2048": lambda: fp8_kernels.quantize_rows_col_stats(x, col_sum=True),
        "quantize_rows_col_stats K>=2048": lambda: fp8_kernels.quantize_rows_col_stats(dy, col_sum=True),
        "cast_cols_t": lambda: fp8_kernels.cast_cols_t(x, amax),
        "w.t().contiguous()": lambda: w.t().contiguous(),
        "torch.empty": lambda: torch.empty(M, K, device=DEV, dtype=torch.float8_e4m3fn),
        "tensor.sum(0)": lambda: dy.sum(0, dtype=torch.float32),
    }
    for name, fn in ops.items():
        emit({"part": "ops", "op": name, "M": M, "host_us": host_us(fn)}, out)


def part_linear(family: str, M: int, out: str | None) -> None:
    saved = fp8.WGRAD
    for kind, (K, N, bias) in SHAPES[family].items():
        for with_bias in sorted({bias, False}):
            x = torch.randn(M, K, device=DEV, dtype=BF16, requires_grad=True)
            dy = torch.randn(M, N, device=DEV, dtype=BF16)
            lin = nn.Linear(K, N, bias=with_bias, device=DEV, dtype=BF16)
            row = {"part": "linear", "family": family, "layer": kind, "K": K, "N": N, "bias": with_bias, "M": M}

            def step(lin=lin, x=x, dy=dy):
                lin(x).backward(dy)

            row["bf16_us"] = host_us(step, calls=5)
            fp8.convert(nn.ModuleDict({"blocks": nn.ModuleList([nn.ModuleDict({kind: lin})])}), min_tokens=0)
            for wgrad in ("bf16", "fp8"):
                fp8.WGRAD = wgrad
                row[f"fp8_wgrad_{wgrad}_us"] = host_us(step, calls=5)
                if kind == "qkv" and wgrad == "bf16" and not with_bias:
                    profile_calls(step, f"{family} {kind} FP8 forward + backward, 5 calls")
            fp8.WGRAD = saved
            emit(row, out)


class _PyIdentity(torch.autograd.Function):
    """y = x with a Python backward: what the autograd engine alone costs a Python function."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dy):
        return dy


def part_phases(M: int, out: str | None, K: int = 1024, N: int = 3072) -> None:
    """One FP8 linear (no bias, bf16 weight gradient) taken apart: each piece's host us per call."""
    x = torch.randn(M, K, device=DEV, dtype=BF16, requires_grad=True)
    w = torch.randn(N, K, device=DEV, dtype=BF16, requires_grad=True)
    dy = torch.randn(M, N, device=DEV, dtype=BF16)
    xd = x.detach()
    fp8.WGRAD = "bf16"
    fwd = fp8._FP8Linear.apply
    dyq, sdy = fp8.quantize_rows(dy)
    wtq, swt = fp8.quantize_rows(w.detach().t().contiguous())
    steps = {
        "bf16 F.linear, grad": lambda: F.linear(x, w),
        "bf16 F.linear + backward": lambda: F.linear(x, w).backward(dy),
        "python identity + backward": lambda: _PyIdentity.apply(x).backward(xd),
        "fp8.quantize_rows": lambda: fp8.quantize_rows(xd),
        "_FP8Linear forward, grad": lambda: fwd(x, w, None),
        "_FP8Linear forward + backward": lambda: fwd(x, w, None).backward(dy),
        "backward's ops, no autograd": lambda: (
            fp8.quantize_rows(dy),
            fp8.quantize_rows(w.detach().t().contiguous()),
            fp8.scaled_mm(dyq, sdy, wtq, swt, None, BF16),
            dy.t() @ xd,
        ),
    }
    for name, fn in steps.items():
        emit({"part": "phases", "what": name, "M": M, "K": K, "N": N, "host_us": host_us(fn, calls=5)}, out)
    import cProfile
    import pstats

    step = steps["_FP8Linear forward + backward"]
    step()
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(5):
        step()
    pr.disable()
    torch.cuda.synchronize()
    st = pstats.Stats(pr).stats  # (file, line, name) -> (cc, nc, tottime, cumtime, callers)
    rows = sorted(
        ((v[2], v[3], v[1], f"{k[0].rsplit('/', 1)[-1]}:{k[1]}({k[2]})") for k, v in st.items()), reverse=True
    )
    print("own us/call, cum us/call, calls/step, function (cProfile, 5 steps)")
    for tot, cum, n, name in rows[:25]:
        print(f"{tot / 5 * 1e6:9.1f} {cum / 5 * 1e6:9.1f} {n / 5:6.1f}  {name}")


def part_step(family: str, out: str | None) -> None:
    _, model = build_pair(family, None, DEV, BF16, "fa4")
    grid = mixed32(model.config.patch_size).grid
    px = torch.randn(sum(t * h * w for t, h, w in grid), model.patch_dim, device=DEV, dtype=BF16)
    g = torch.tensor(grid)
    saved = fp8.WGRAD
    for label, args, wgrad in (
        ("bf16", None, None),
        ("fp8 all", {"min_tokens": 0}, "bf16"),
        ("fp8 all", {"min_tokens": 0}, "fp8"),
        ("fp8", {}, None),
    ):
        model.set_fp8(False) if args is None else model.set_fp8(**args)
        fp8.WGRAD = wgrad or saved
        step = model_step(model, px, g, "train")
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        hosts, walls = [], []
        s0 = torch.cuda.memory_stats()
        gc.disable()
        for _ in range(5):
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t = time.perf_counter()
            a.record()
            step()
            b.record()
            hosts.append((time.perf_counter() - t) * 1e3)
            torch.cuda.synchronize()
            walls.append(a.elapsed_time(b))
        gc.enable()
        s1 = torch.cuda.memory_stats()
        delta = {
            k: s1.get(k, 0) - s0.get(k, 0)
            for k in ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")
        }
        emit(
            {
                "part": "step",
                "family": family,
                "what": label,
                "wgrad": wgrad,
                "host_ms": round(statistics.median(hosts), 1),
                "wall_ms": round(statistics.median(walls), 1),
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
                **{f"{k}_per_5_steps": v for k, v in delta.items()},
            },
            out,
        )
    fp8.WGRAD = saved


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", nargs="+", default=["aimv2"], choices=list(SHAPES))
    ap.add_argument("--tokens", type=int, default=23103)
    ap.add_argument(
        "--parts", nargs="+", default=["ops", "linear", "step"], choices=["queue", "ops", "phases", "linear", "step"]
    )
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if "queue" in a.parts:
        part_queue(a.out)
    if "ops" in a.parts:
        part_ops(a.tokens, a.out)
    if "phases" in a.parts:
        part_phases(a.tokens, a.out)
    for fam in a.family:
        if "linear" in a.parts:
            part_linear(fam, a.tokens, a.out)
        if "step" in a.parts:
            part_step(fam, a.out)


if __name__ == "__main__":
    main()
