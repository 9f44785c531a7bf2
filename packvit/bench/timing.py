"""Timing and memory: warm-up runs, then CUDA events around each timed run (synchronised before
reading), reported as median / p10 / p90; peak memory from the allocator's counters. And the host's
side: the time to enqueue a call on an idle GPU, and where cProfile finds it spent."""

from __future__ import annotations

import gc
import statistics
import time
from typing import Callable

import torch


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    i = q * (len(xs) - 1)
    lo, hi = int(i), min(int(i) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)


def measure(fn: Callable[[], object], device: torch.device, warmup: int, iters: int, slow_s: float = 0.25) -> dict:
    """Run ``fn`` ``warmup`` times, then time ``iters`` runs. When one run takes longer than ``slow_s``
    seconds (the HF per-image training loops take seconds each), 3 warm-up and 10 timed runs; the
    row's ``iters`` says how many were timed."""
    cuda = device.type == "cuda"
    fn()  # the first call may compile: not a measure of a step's time
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize(device)
    if time.perf_counter() - t0 > slow_s:
        warmup, iters = min(warmup, 3), min(iters, 10)
    for _ in range(warmup - 2):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(iters):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            times.append((a, b))
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    if cuda:
        torch.cuda.synchronize(device)
        ms = [a.elapsed_time(b) for a, b in times]
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        resident = base / 2**30
    else:
        ms = [t * 1e3 for t in times]
        peak = resident = None
    return dict(
        ms=statistics.median(ms),
        p10=_quantile(ms, 0.1),
        p90=_quantile(ms, 0.9),
        iters=iters,
        peak_gib=peak,
        resident_gib=resident,
    )


def model_step(model, px, grid, mode: str):
    """One forward (``"infer"``, under inference_mode) or training step (forward + backward to the
    parameters' gradients of a mean-square loss) of ``model`` on the batch, with the mode set."""
    if mode == "infer":
        model.eval()

        def step():
            with torch.inference_mode():
                model(px, grid)
    else:
        model.train()

        def step():
            model.zero_grad(set_to_none=True)
            model(px, grid).float().square().mean().backward()

    return step


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def host_ms(fn: Callable[[], object], reps: int = 5, stat: Callable = statistics.median) -> float:
    """The host's time to enqueue one call of ``fn`` (ms; median of ``reps``, or ``stat``), the GPU
    idle at the start of each, Python's garbage collector off while timed."""
    ts = []
    gc.disable()
    try:
        for _ in range(reps):
            _sync()
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
    finally:
        gc.enable()
    _sync()
    return stat(ts)


def host_profile(fn: Callable[[], object], label: str, top: int = 12) -> None:
    """Print where the host's time goes in one call of ``fn`` (cProfile, by each function's own time)."""
    import cProfile
    import io
    import pstats

    _sync()
    pr = cProfile.Profile()
    pr.enable()
    fn()
    pr.disable()
    _sync()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(top)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    print(f"\n{label}, host (cProfile, one step):")
    print("\n".join(ln[:160] for ln in lines[2 : 6 + top]), flush=True)
