"""A/B of the inference forward on a GPU: eager against CUDA graphs (``packvit.cuda_graphs``), and the
other speed switches of issue 19 (chained norms, chunked MLP) when this tree has them.

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

    fam = FAMILIES[family]
    torch.manual_seed(0)
    m = fam.MODEL_CLASS(fam.CONFIG_CLASS.from_name(DEFAULT_PRESETS[family]))
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.05)
    m = m.to(DEV, BF16).eval()
    if backend != "auto":
        m.set_attention_backend(backend)
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


def run(args, record):
    for family in args.family:
        model = build(family, args.backend)
        grids = {w: workload(w, model.config.patch_size) for w in args.workload}
        print(f"\n== {family}: {repr(model).splitlines()[0]}", flush=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        try:
            graphed = cuda_graphs.capture(model, max_tokens=args.max_tokens)
        except Exception as e:  # report exactly what fails (FA4's launch under capture, say)
            import traceback

            record(dict(part="capture", family=family, backend=model.attn_backend, ok=False, error=repr(e)[:2000],
                        tb=traceback.format_exc()[-3000:]))
            del model
            torch.cuda.empty_cache()
            continue
        torch.cuda.synchronize()
        record(dict(part="capture", family=family, backend=model.attn_backend, ok=True, buckets=list(graphed.buckets),
                    capture_s=time.perf_counter() - t0, graphs_gib=(torch.cuda.memory_allocated() - base) / 2**30,
                    reserved_gib=torch.cuda.memory_reserved() / 2**30))
        for wname, grid in grids.items():
            n = sum(t * h * w for t, h, w in grid)
            px = torch.randn(n, model.patch_dim, generator=torch.Generator().manual_seed(0)).to(DEV, BF16)
            grid_t = torch.tensor(grid)
            with torch.inference_mode():
                ref = model(px, grid_t).float()
                out = graphed(px, grid_t).float()
            cos = F.cosine_similarity(out, ref, dim=-1)
            row = dict(part="graphs", family=family, backend=model.attn_backend, workload=wname, patches=n,
                       cos_min=cos.min().item(), max_abs=(out - ref).abs().max().item(), bitwise=torch.equal(out, ref))
            for how, m in (("eager", model), ("graphs", graphed)):
                def fn(m=m):
                    with torch.inference_mode():
                        m(px, grid_t)
                r = measure(fn, DEV, args.warmup, args.iters)
                row[f"{how}_ms"], row[f"{how}_p10"], row[f"{how}_p90"] = r["ms"], r["p10"], r["p90"]
                row[f"{how}_host_ms"] = host_ms(fn)
                row[f"{how}_peak_gib"] = r["peak_gib"]
            row["speedup"] = row["eager_ms"] / row["graphs_ms"]
            record(row)
        del graphed
        if args.switches:
            switches(args, model, family, record)
        del model
        torch.cuda.empty_cache()


def switches(args, model, family, record):
    """The eager forward and training step on mixed32 with each switch of this tree off and on."""
    from packvit.bench.timing import model_step

    grid = workload("mixed32", model.config.patch_size)
    n = sum(t * h * w for t, h, w in grid)
    px = torch.randn(n, model.patch_dim, generator=torch.Generator().manual_seed(0)).to(DEV, BF16)
    grid_t = torch.tensor(grid)
    for name, attr, values in [("chain_norms", "chain_norms", (False, True))]:
        outs = {}
        for v in values:
            setattr(model, attr, v)
            model.eval()
            with torch.inference_mode():
                outs[v] = model(px, grid_t).float()
            for mode in ("infer", "train"):
                r = measure(model_step(model, px, grid_t, mode), DEV, args.warmup, args.iters)
                record(dict(part="switch", family=family, backend=model.attn_backend, switch=name, value=v, mode=mode,
                            **r))
                model.zero_grad(set_to_none=True)
        cos = F.cosine_similarity(outs[values[0]], outs[values[-1]], dim=-1)
        record(dict(part="switch_check", family=family, switch=name, cos_min=cos.min().item()))
        setattr(model, attr, values[-1])
    model.eval()


def table(rows):
    lines = []
    for r in rows:
        if r["part"] == "capture":
            if r["ok"]:
                lines.append(f"capture {r['family']} {r['backend']}: {len(r['buckets'])} buckets {r['buckets'][0]}.."
                             f"{r['buckets'][-1]} in {r['capture_s']:.1f} s, graphs hold {r['graphs_gib']:.2f} GiB")
            else:
                lines.append(f"capture {r['family']} {r['backend']} FAILED: {r['error'][:300]}")
    lines += ["", "| family | attention | workload | patches | eager ms (host ms) | graphs ms (host ms) | speedup | cos min | max abs | bitwise |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["part"] == "graphs":
            lines.append(f"| {r['family']} | {r['backend']} | {r['workload']} | {r['patches']} | {r['eager_ms']:.2f} "
                         f"({r['eager_host_ms']:.2f}) | {r['graphs_ms']:.2f} ({r['graphs_host_ms']:.2f}) | {r['speedup']:.2f}x "
                         f"| {r['cos_min']:.5f} | {r['max_abs']:.3f} | {r['bitwise']} |")
    lines += ["", "| family | attention | switch | value | mode | ms (p10-p90) | peak GiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["part"] == "switch":
            lines.append(f"| {r['family']} | {r['backend']} | {r['switch']} | {r['value']} | {r['mode']} | {r['ms']:.1f} "
                         f"({r['p10']:.1f}-{r['p90']:.1f}) | {r['peak_gib']:.2f} |")
        if r["part"] == "switch_check":
            lines.append(f"check {r['family']} {r['switch']}: per-patch cosine off vs on, min {r['cos_min']:.5f}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", nargs="+", default=["siglip2", "dinov3", "aimv2"])
    p.add_argument("--workload", nargs="+", default=["mixed32", "small4", "one"])
    p.add_argument("--backend", default="auto")
    p.add_argument("--max-tokens", type=int, default=32768)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--switches", action="store_true", help="also the eager A/B of chain_norms (mixed32)")
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
