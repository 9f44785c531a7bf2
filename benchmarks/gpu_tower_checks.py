"""The tower on the GPU: bf16 autocast, pure-bf16 weights, torch.compile; correctness and timings.

    python benchmarks/gpu_tower_checks.py --preset siglip2-so400m-patch16-naflex
    python benchmarks/gpu_tower_checks.py --device cpu --tiny          # smoke test

Random weights from the preset's config. For a mixed batch (--images images, sides 8..32 patches):
  fp32        reference forward + backward (sdpa backend)
  autocast    fp32 weights under torch.autocast(bf16), the auto backend
  pure_bf16   weights cast to bf16, the auto backend
  compile     torch.compile(fullgraph=True, dynamic=True) of the bf16 tower on prepared batches:
              first-call compile time, steady step time, and graphs compiled over --grids
              different batches plus one repeat (one is right)
Each mode reports forward+backward ms, the relative error of the features and of the input
gradient vs fp32 (||a - b|| / ||b||), and whether every gradient is finite. Exits non-zero if a
check fails (relative error > --tol, or non-finite gradients).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from train_tokens_per_s import build, random_batch  # noqa: E402  (same directory)

from packvit.models.base import PackedViT


def timed(fn, device, reps: int):
    for _ in range(2):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, (time.perf_counter() - t0) / reps * 1e3


def fwd_bwd(model: PackedViT, x, grid, w, autocast: bool):
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast(x.device.type, torch.bfloat16, enabled=autocast):
        out = model(x, grid)
    (out.float() * w).sum().backward()
    return out.detach().float(), x.grad.float()


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def bad(row, tol) -> bool:
    return not (row["feat_rel"] <= tol and row["grad_rel"] <= tol and row["finite"])


def report(row, tol) -> None:
    extra = "".join(f"  {k}={v}" for k, v in row.items() if k in ("first_call_s", "graphs", "error"))
    print(
        f"{row['mode']:10s} {row['attn']:>10s} {row['ms']:11.2f} {row['feat_rel']:9.2e} {row['grad_rel']:9.2e} "
        f"{row['finite']}{'  FAIL' if bad(row, tol) else ''}{extra}",
        flush=True,
    )


def compile_row(bf, cfg, x, grid, w, o32, g32, gen, device, args) -> dict:
    """torch.compile(fullgraph=True, dynamic=True) of the whole bf16 tower. Batches are prepared
    eagerly (``model.prepare``), so the compiled code sees tensors and integers, never the grid:
    one graph should serve every batch."""
    try:  # a compile failure is reported as a failed row, the other rows still stand
        from torch._dynamo.utils import counters

        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(bf, fullgraph=True, dynamic=True)
        batch = bf.prepare(grid)
        t0 = time.perf_counter()
        fwd_bwd(compiled, x, batch, w, False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        first = time.perf_counter() - t0
        (o, g), ms = timed(lambda: fwd_bwd(compiled, x, batch, w, False), device, args.reps)
        others = [random_batch(cfg, args.max_tokens, gen) for _ in range(args.grids - 1)]
        for xo, go in others + [(x.cpu(), grid)]:  # new grids, then the first grid again
            xo = xo.to(device, torch.bfloat16)
            fwd_bwd(compiled, xo, bf.prepare(go), torch.ones(xo.shape[0], cfg.hidden_size, device=device), False)
        return dict(
            mode="compile",
            attn=bf.attn_backend,
            ms=ms,
            feat_rel=rel(o, o32),
            grad_rel=rel(g, g32),
            finite=bool(torch.isfinite(g).all()),
            first_call_s=round(first, 1),
            graphs=f"{counters['stats']['unique_graphs']} for {args.grids} grids + a repeat",
        )
    except Exception as e:  # noqa: BLE001
        return dict(
            mode="compile",
            attn=bf.attn_backend,
            ms=float("nan"),
            feat_rel=float("inf"),
            grad_rel=float("inf"),
            finite=False,
            error=f"{type(e).__name__}: {str(e)[:400]}",
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="siglip2-so400m-patch16-naflex")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--grids", type=int, default=4, help="different batches fed to the compiled tower")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time torch.compile of the whole tower (minutes at real size)",
    )
    ap.add_argument("--tol", type=float, default=5e-2, help="max relative error of bf16 vs fp32")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    ref, cfg = build(args.preset, args.tiny, device, torch.float32, "sdpa")
    gen = torch.Generator().manual_seed(0)
    x, grid = random_batch(cfg, args.max_tokens, gen)
    x = x.to(device)
    w = torch.randn(x.shape[0], cfg.hidden_size, generator=gen).to(device)
    rows = []
    print(f"{args.preset}: {x.shape[0]} tokens in {len(grid)} images")
    print(f"{'mode':10s} {'attn':>10s} {'fwd+bwd ms':>11s} {'feat rel':>9s} {'grad rel':>9s} finite", flush=True)

    (o32, g32), ms = timed(lambda: fwd_bwd(ref, x, grid, w, False), device, args.reps)
    rows.append(dict(mode="fp32", attn=ref.attn_backend, ms=ms, feat_rel=0.0, grad_rel=0.0, finite=True))
    report(rows[-1], args.tol)

    name = ref.set_attention_backend("auto", torch.bfloat16)  # autocast: fp32 weights, bf16 compute
    (o, g), ms = timed(lambda: fwd_bwd(ref, x, grid, w, True), device, args.reps)
    finite = all(torch.isfinite(p.grad).all().item() for p in ref.parameters() if p.grad is not None)
    rows.append(
        dict(
            mode="autocast",
            attn=name if device.type == "cuda" else "sdpa",
            ms=ms,
            feat_rel=rel(o, o32),
            grad_rel=rel(g, g32),
            finite=finite,
        )
    )
    report(rows[-1], args.tol)

    bf = ref.to(torch.bfloat16)  # in place; keeps the attention chosen above, so choose again for bf16
    bf.set_attention_backend("auto")
    (o, g), ms = timed(lambda: fwd_bwd(bf, x, grid, w, False), device, args.reps)
    finite = all(torch.isfinite(p.grad).all().item() for p in bf.parameters() if p.grad is not None)
    rows.append(
        dict(mode="pure_bf16", attn=bf.attn_backend, ms=ms, feat_rel=rel(o, o32), grad_rel=rel(g, g32), finite=finite)
    )
    report(rows[-1], args.tol)

    if args.compile:
        rows.append(compile_row(bf, cfg, x, grid, w, o32, g32, gen, device, args))
        report(rows[-1], args.tol)
    ok = all(not bad(r, args.tol) for r in rows)
    print(
        json.dumps(
            dict(
                preset=args.preset + (" (tiny)" if args.tiny else ""),
                tokens=x.shape[0],
                images=len(grid),
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch=torch.__version__,
                ok=ok,
                rows=rows,
            )
        )
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
