"""A/B of the training step on a GPU: eager against CUDA graph pairs (``packvit.cuda_graphs_training``),
in bf16 and with every block linear in FP8.

    python benchmarks/graphs_train_ab.py --out rows.jsonl             # the three families
    python benchmarks/graphs_train_ab.py --family aimv2 --workload mixed32

Each family at its published size (random weights, bf16 parameters, default fused kernels, best
attention), a step being ``zero_grad``, forward, a mean-square loss and backward (what
``packvit.bench.timing.model_step`` times). Workloads: ``small4`` (mixed32's first 4 images, 3.6k
tokens: launch-bound), ``mixed32`` (23k tokens), ``mixed64`` (mixed32's images twice, 46k tokens).
Variants: eager; graphs over the default buckets (``token_buckets`` up to 48k tokens: a batch pads up
to the next bucket, 6% on average); over finer ones (steps of 1.03 in place of 1.125); graphs of one bucket the batch's exact size (no padding: what the
padding costs). Each: median CUDA-event ms of 10 steps after 3 (the first captures), the host's time
to enqueue a step (GPU idle at its start), peak memory, the capture time, and the graphed step's
output and every parameter gradient against the eager step's on the same weights (min per-row cosine,
min per-parameter cosine) before anything is timed.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch
import torch.nn.functional as F
from graphs_ab import build  # benchmarks/ is on sys.path when run as a script

from packvit import cuda_graphs, fp8
from packvit.bench.timing import host_ms, model_step
from packvit.bench.workloads import get

DEV = torch.device("cuda")
BF16 = torch.bfloat16
BUCKETS = {
    "graphs": cuda_graphs.token_buckets(max_tokens=49152),  # steps of 1.125: up to 12.5% padding
    "graphs fine": cuda_graphs.token_buckets(max_tokens=49152, step=1.03),  # up to 3% (+ 256 tokens)
}


def grid_of(name: str, patch: int):
    g = get("mixed32", patch).grid
    return {"small4": g[:4], "mixed32": g, "mixed64": g + g}[name]


def wall_ms(step, n: int = 10) -> float:
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        a.record()
        step()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def grads_of(model, m, px, grid):
    """Output (T, D) and {name: grad} of one step of m (the model or its graphed wrapper)."""
    model.zero_grad(set_to_none=True)
    out = m(px, grid)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(DEV)
    (out.float() * w).sum().backward()
    return out.float(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def compare(model, graphed, px, grid) -> dict:
    """Graphed step against eager: per-row output cosine, per-parameter gradient cosine. Gradients
    that are zero in exact arithmetic (the key biases': rounding noise under 1% of the median
    gradient's RMS) are reported apart, as the largest ratio of either side's RMS to that median."""
    ref, ref_g = grads_of(model, model, px, grid)
    out, g = grads_of(model, graphed, px, grid)
    rms = {n: r.square().mean().sqrt().item() for n, r in ref_g.items()}
    median = sorted(rms.values())[len(rms) // 2]
    noise = [n for n in ref_g if rms[n] < 0.01 * median]
    cos = {n: F.cosine_similarity(g[n].flatten(), ref_g[n].flatten(), dim=0).item() for n in ref_g if n not in noise}
    worst = min(cos, key=cos.get)
    return {
        "out_min_cos": F.cosine_similarity(out, ref, dim=-1).min().item(),
        "grad_min_cos": cos[worst],
        "grad_min_cos_param": worst,
        "noise_grads": len(noise),
        "noise_max_rms_ratio": max(
            (max(rms[n], g[n].square().mean().sqrt().item()) / median for n in noise), default=0
        ),
        "same_params": sorted(g) == sorted(ref_g),
    }


class _TimedReplay:
    """A graph whose replay() records the host's time to launch it."""

    def __init__(self, graph, log, name):
        self.graph, self.log, self.name = graph, log, name

    def replay(self):
        t = time.perf_counter()
        self.graph.replay()
        self.log[self.name] = (time.perf_counter() - t) * 1e3


def host_phases(m, px, gt, reps: int = 5) -> dict:
    """Host ms of each phase of one graphed step, the GPU idle at its start (median of ``reps``):
    the forward call (embedding + the forward graph's launch), the launch alone, the loss, the
    backward call (the backward graph's launch, the gradients into .grad, the embedding's backward)
    and that launch alone. A phase that waits for the GPU shows as the GPU's time up to there."""
    log: dict = {}
    for g in m.training_graphs._graphs.values():
        g.fwd, g.bwd = _TimedReplay(g.fwd, log, "fwd_launch"), _TimedReplay(g.bwd, log, "bwd_launch")
    rows = []
    for _ in range(reps):
        m.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        y = m(px, gt)
        t1 = time.perf_counter()
        loss = y.float().square().mean()
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        rows.append(
            {"forward_call": t1 - t0, "loss": t2 - t1, "backward_call": t3 - t2} | {k: v / 1e3 for k, v in log.items()}
        )
    for g in m.training_graphs._graphs.values():
        g.fwd, g.bwd = g.fwd.graph, g.bwd.graph
    return {f"phase_{k}_ms": round(statistics.median(r[k] for r in rows) * 1e3, 2) for k in rows[0]}


def run(
    family: str, workload: str, backend: str, out: str | None, precisions=("bf16", "fp8"), hows=None, phases=False
) -> None:
    model = build(family, backend).train()
    grid = grid_of(workload, model.config.patch_size)
    px = torch.randn(sum(t * h * w for t, h, w in grid), model.patch_dim, device=DEV, dtype=BF16)
    gt = torch.tensor(grid)
    T = model.prepare(gt, DEV).meta.num_tokens
    base = None
    for precision in precisions:
        model.set_fp8(False) if precision == "bf16" else model.set_fp8(min_tokens=0)
        for how in hows or ("eager", "graphs", "graphs fine", "graphs exact"):
            row = dict(family=family, workload=workload, tokens=T, frames=len(grid), precision=precision, how=how)
            m = model
            torch.cuda.synchronize()
            mem0 = torch.cuda.memory_allocated()
            if how != "eager":
                # exact: T a bucket, the one below it 256 tokens smaller (one padding segment slot)
                buckets = (T - 256, T) if how == "graphs exact" else BUCKETS[how]
                m = cuda_graphs.capture(model, buckets=buckets, training=True, lazy=True)
                row.update(compare(model, m, px, gt))  # the first call captures
                t0 = time.perf_counter()
                m.training_graphs._graphs.clear()  # time a capture on its own
                m.training_graphs._pool = None
                step = model_step(m, px, gt, "train")
                step()
                torch.cuda.synchronize()
                row["capture_s"] = round(time.perf_counter() - t0, 2)
                row["bucket"] = m.training_graphs.keys()[0][:2]
            step = model_step(m, px, gt, "train")
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            row["wall_ms"] = round(wall_ms(step), 2)
            row["host_ms"] = round(host_ms(step, reps=5), 2)
            if phases and how != "eager":
                row.update(host_phases(m, px, gt))
            row["peak_gib"] = round((torch.cuda.max_memory_allocated() - mem0) / 2**30, 2)
            if how != "eager":
                assert m.fallbacks == 0, f"{m.fallbacks} graphed steps ran eagerly"
            if precision == "bf16" and how == "eager":
                base = row["wall_ms"]
            row["x_vs_bf16_eager"] = None if base is None else round(base / row["wall_ms"], 3)
            print(json.dumps(row), flush=True)
            if out:
                with open(out, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
            del m, step
            model.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
    model.set_fp8(False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", nargs="+", default=["siglip2", "dinov3", "aimv2"])
    ap.add_argument("--workload", nargs="+", default=["small4", "mixed32", "mixed64"])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--precision", nargs="+", default=["bf16", "fp8"], choices=["bf16", "fp8"])
    ap.add_argument("--how", nargs="+", choices=["eager", "graphs", "graphs fine", "graphs exact"])
    ap.add_argument("--phases", action="store_true", help="also the host time of each phase of a graphed step")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} fp8.WGRAD={fp8.WGRAD}", flush=True)
    for family in args.family:
        for workload in args.workload:
            run(family, workload, args.backend, args.out, args.precision, args.how, args.phases)


if __name__ == "__main__":
    main()
