"""A/B of the inference forward on a GPU: eager against CUDA graphs (``packvit.cuda_graphs``), and the
other switches of the fused path (chained norms, quack's GELU in fc1, fewer saved activations,
chunked MLP), each against the path without them.

    python benchmarks/graphs_ab.py --out rows.jsonl                     # the three families, fa4 or best
    python benchmarks/graphs_ab.py --backend torch --family dinov3

Each family at its published size (random weights, bf16, default fused kernels), on ``mixed32``
(23k tokens: GPU-bound) and ``small4`` (its first 4 images: launch-bound), forward under
``inference_mode``: median CUDA-event ms of 30 runs after warm-up. Also the host time of one call
(``perf_counter`` around the call without a sync: what the Python side costs when the GPU keeps up),
the capture time, the memory the graphs hold, and the graphed output against eager (per-patch
cosine, max abs difference) before anything is timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from packvit import cuda_graphs
from packvit.bench.models import DEFAULT_PRESETS
from packvit.bench.timing import measure
from packvit.bench.workloads import get

DEV = torch.device("cuda")
BF16 = torch.bfloat16


def build(family, backend):
    from weights_conversion import FAMILIES
    from weights_conversion.reference import randomize_

    fam = FAMILIES[family]
    torch.manual_seed(0)
    m = fam.model_class(fam.config_class.from_name(DEFAULT_PRESETS[family]))
    with torch.no_grad():  # spread the constant-initialised norms, biases and scales
        randomize_(m, seed=0, scale=0.05, constant_only=True)
    m = m.to(DEV, BF16).eval()
    m.set_attention(backend)  # chosen for where the model now is (moving keeps the choice made at build)
    return m


def workload(name, patch):
    if name == "small4":
        return get("mixed32", patch).grid[:4]
    if name == "one":
        return get("mixed32", patch).grid[:1]
    return get(name, patch).grid


def host_ms(fn, n=20):
    """Host time of one call: the GPU is kept busy first so the host never waits for it."""
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(ts)


def _inference_forward(m, px, grid_t):
    """One forward of m (the eager model or its graphed wrapper) under inference_mode."""

    def fn():
        with torch.inference_mode():
            m(px, grid_t)

    return fn


def run(args, record):
    for family in args.family:
        model = build(family, args.backend)
        if args.fp8:
            model.set_fp8()  # the default crossovers
        grids = {w: workload(w, model.config.patch_size) for w in args.workload}
        print(f"\n== {family}: {repr(model).splitlines()[0]}", flush=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        graphed = None
        for without in ((), ("gelu_mlp",)):  # a second try without quack's GEMM, to tell what fails
            set_switches(model, set(SWITCHES) - set(without))
            try:
                kw = {"frames": tuple(args.frames)} if args.frames else {}
                graphed = (
                    cuda_graphs.capture(model, buckets=tuple(args.bucket), **kw)
                    if args.bucket
                    else cuda_graphs.capture(model, max_tokens=args.max_tokens, **kw)
                )
                break
            except Exception as e:  # report exactly what fails (FA4's launch under capture, say)
                import traceback

                record(
                    dict(
                        part="capture",
                        family=family,
                        backend=model.attn_backend,
                        ok=False,
                        without=without,
                        error=repr(e)[:2000],
                        tb=traceback.format_exc()[-3000:],
                    )
                )
                torch.cuda.synchronize()
        if graphed is None:
            if args.switches:
                switches(args, model, family, record)
            del model
            torch.cuda.empty_cache()
            continue
        torch.cuda.synchronize()
        record(
            dict(
                part="capture",
                family=family,
                backend=model.attn_backend,
                ok=True,
                buckets=list(graphed.buckets),
                fused={k: v for k, v in model.fused_kernels.items() if v},
                capture_s=time.perf_counter() - t0,
                graphs_gib=(torch.cuda.memory_allocated() - base) / 2**30,
                reserved_gib=torch.cuda.memory_reserved() / 2**30,
            )
        )
        for wname, grid in grids.items():
            n = sum(t * h * w for t, h, w in grid)
            px = torch.randn(n, model.patch_dim, generator=torch.Generator().manual_seed(0)).to(DEV, BF16)
            grid_t = torch.tensor(grid)
            with torch.inference_mode():
                ref = model(px, grid_t).float()
                out = graphed(px, grid_t).float()
            cos = F.cosine_similarity(out, ref, dim=-1)
            row = dict(
                part="graphs",
                family=family,
                backend=model.attn_backend,
                workload=wname,
                patches=n,
                cos_min=cos.min().item(),
                max_abs=(out - ref).abs().max().item(),
                bitwise=torch.equal(out, ref),
            )
            for how, m in (("eager", model), ("graphs", graphed)):
                fn = _inference_forward(m, px, grid_t)
                r = measure(fn, DEV, args.warmup, args.iters)
                row[f"{how}_ms"], row[f"{how}_p10"], row[f"{how}_p90"] = r["ms"], r["p10"], r["p90"]
                row[f"{how}_host_ms"] = host_ms(fn)
                row[f"{how}_peak_gib"] = r["peak_gib"]
            row["speedup"] = row["eager_ms"] / row["graphs_ms"]
            record(row)
        if args.profile:
            profile(args, model, graphed, family, record)
        del graphed
        if args.switches:
            switches(args, model, family, record)
        del model
        torch.cuda.empty_cache()


SWITCHES = ("chain_norms", "gelu_mlp", "saves_less", "mlp_chunks")


def set_switches(model, on: set[str]) -> None:
    """This tree's speed/memory switches: each off is what main ran before them."""
    from packvit import layers

    model.chain_norms = "chain_norms" in on
    # run 2 measured with 8192-token chunks in "all"
    model.set_tuning(train_saves_less="saves_less" in on, mlp_chunk_tokens=8192 if "mlp_chunks" in on else 0)
    for m in model.modules():
        if isinstance(m, layers.Mlp):
            m.fused = model.fused_kernels.get("gelu_mlp") if "gelu_mlp" in on else None


def switches(args, model, family, record):
    """The eager forward and training step on mixed32: main's path, each switch alone, all on. The
    training rows also give the memory the forward leaves for backward (saved activations)."""
    from packvit.bench.timing import model_step

    grid = workload("mixed32", model.config.patch_size)
    n = sum(t * h * w for t, h, w in grid)
    px = torch.randn(n, model.patch_dim, generator=torch.Generator().manual_seed(0)).to(DEV, BF16)
    grid_t = torch.tensor(grid)
    has_gelu = model.fused_kernels.get("gelu_mlp") is not None and family != "aimv2"
    configs = [("main", set()), ("chain_norms", {"chain_norms"})]
    configs += [("gelu_mlp", {"gelu_mlp"})] if has_gelu else []
    configs += [
        ("saves_less", {"saves_less"}),
        ("all_but_chunks", set(SWITCHES) - {"mlp_chunks"}),
        ("all", set(SWITCHES)),
    ]
    outs = {}
    for name, on in configs:
        set_switches(model, on)
        model.eval()
        with torch.inference_mode():
            outs[name] = model(px, grid_t).float()
        for mode in ("infer", "train"):
            if mode == "train" and name == "all_but_chunks":
                continue  # the chunks are inference-only
            r = measure(model_step(model, px, grid_t, mode), DEV, args.warmup, args.iters)
            row = dict(part="switch", family=family, backend=model.attn_backend, config=name, mode=mode, **r)
            if mode == "train":
                model.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                y = model(px, grid_t)
                torch.cuda.synchronize()
                row["saved_gib"] = (torch.cuda.memory_allocated() - base) / 2**30  # what the forward keeps
                del y
                row["weights_gib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
            record(row)
            model.zero_grad(set_to_none=True)
        cos = F.cosine_similarity(outs[name], outs["main"], dim=-1)
        record(dict(part="switch_check", family=family, config=name, cos_min=cos.min().item()))
    set_switches(model, set(SWITCHES))
    model.eval()


def profile(args, model, graphed, family, record):
    """Kernel time of one eager and one graphed forward of mixed32 (is the graph's GPU work the same?)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    grid = torch.tensor(workload("mixed32", model.config.patch_size))
    n = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())
    px = torch.randn(n, model.patch_dim, device=DEV, dtype=BF16)
    for how, m in (("eager", model), ("graphs", graphed)):
        with torch.inference_mode():
            m(px, grid), m(px, grid)
            torch.cuda.synchronize()
            with prof(activities=[ProfilerActivity.CUDA]) as p:
                for _ in range(3):
                    m(px, grid)
                torch.cuda.synchronize()
        ev = sorted(((e.key, e.self_device_time_total / 3e3) for e in p.key_averages()), key=lambda x: -x[1])
        record(
            dict(
                part="profile",
                family=family,
                how=how,
                kernel_ms=sum(t for _, t in ev),
                top=[(k[:60], round(t, 3)) for k, t in ev[:30]],
            )
        )


def table(rows):
    lines = []
    for r in rows:
        if r["part"] == "capture":
            if r["ok"]:
                lines.append(
                    f"capture {r['family']} {r['backend']}: {len(r['buckets'])} buckets {r['buckets'][0]}.."
                    f"{r['buckets'][-1]} in {r['capture_s']:.1f} s, graphs hold {r['graphs_gib']:.2f} GiB"
                )
            else:
                lines.append(f"capture {r['family']} {r['backend']} FAILED: {r['error'][:300]}")
    lines += [
        "",
        "| family | attention | workload | patches | eager ms (host ms) | graphs ms (host ms) | speedup | cos min | max abs | bitwise |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["part"] == "graphs":
            lines.append(
                f"| {r['family']} | {r['backend']} | {r['workload']} | {r['patches']} | {r['eager_ms']:.2f} "
                f"({r['eager_host_ms']:.2f}) | {r['graphs_ms']:.2f} ({r['graphs_host_ms']:.2f}) | {r['speedup']:.2f}x "
                f"| {r['cos_min']:.5f} | {r['max_abs']:.3f} | {r['bitwise']} |"
            )
    lines += [
        "",
        "| family | attention | config | mode | ms (p10-p90) | peak GiB | saved by forward GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["part"] == "switch":
            saved = f"{r['saved_gib']:.2f}" if "saved_gib" in r else ""
            lines.append(
                f"| {r['family']} | {r['backend']} | {r['config']} | {r['mode']} | {r['ms']:.1f} "
                f"({r['p10']:.1f}-{r['p90']:.1f}) | {r['peak_gib']:.2f} | {saved} |"
            )
    for r in rows:
        if r["part"] == "switch_check":
            lines.append(
                f"check {r['family']} {r['config']}: per-patch cosine against main's path, min {r['cos_min']:.5f}"
            )
        if r["part"] == "profile":
            lines.append(
                f"profile {r['family']} {r['how']}: kernels {r['kernel_ms']:.2f} ms; "
                + "; ".join(f"{k[:45]} {t}" for k, t in r["top"][:8])
            )
    lines += profile_diff(rows)
    return "\n".join(lines)


def profile_diff(rows, n=8):
    """Per family, the kernels whose time differs most between the graphed and the eager forward."""
    prof = {(r["family"], r["how"]): dict(r["top"]) for r in rows if r["part"] == "profile"}
    lines = []
    for fam in dict.fromkeys(f for f, _ in prof):
        e, g = prof.get((fam, "eager")), prof.get((fam, "graphs"))
        if e is None or g is None:
            continue
        d = sorted(((g.get(k, 0.0) - e.get(k, 0.0), k) for k in set(e) | set(g)), key=lambda x: -abs(x[0]))
        lines.append(
            f"graphs - eager, {fam}: " + "; ".join(f"{k[:45]} {dt:+.3f} ({e.get(k, 0):.3f})" for dt, k in d[:n])
        )
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", nargs="+", default=["siglip2", "dinov3", "aimv2"])
    p.add_argument("--workload", nargs="+", default=["mixed32", "small4", "one"])
    p.add_argument("--backend", default="auto")
    p.add_argument("--max-tokens", type=int, default=cuda_graphs.DEFAULT_MAX_TOKENS)
    p.add_argument("--bucket", type=int, nargs="+", help="capture these token buckets only (else up to --max-tokens)")
    p.add_argument(
        "--frames", type=int, nargs="+", help="frame buckets (default: cuda_graphs.frame_buckets); 128: one, as before"
    )
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--switches", action="store_true", help="also the eager A/B of this tree's switches (mixed32)")
    p.add_argument("--profile", action="store_true", help="also the kernel time of eager against graphed (mixed32)")
    p.add_argument("--fp8", action="store_true", help="the FP8 model (set_fp8(), default crossovers)")
    p.add_argument("--out", help="append JSON lines here")
    args = p.parse_args(argv)
    env = dict(torch=torch.__version__, gpu=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d", time.gmtime()))
    print(env, flush=True)
    rows = []

    def record(row):
        row = {**env, **row}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    run(args, record)
    print("\n" + table(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
