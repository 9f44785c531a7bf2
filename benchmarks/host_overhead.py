"""The host's side of an eager forward: how long Python takes to enqueue it, and what the attention
call's route costs in it.

At 23k tokens an FP8 forward's GPU time (21-27 ms on the H200) is close to the time the host takes
to launch it (about 22 ms), so the GPU waits (session 9's profile: 4.8 ms idle in DINOv3's FP8
forward). This script measures, on one workload, for each family:

  * ``attention`` rows: one FA4 call's host time (microseconds, the GPU idle at its start) by each
    route: FA4's ``_flash_attn_fwd`` called directly, packvit's eager route (``varlen_attention`` with
    the model's ``AttentionImpl``), and the custom op that ``torch.compile`` traces, each without and
    with autograd;
  * ``forward`` rows: the whole forward, bf16 and FP8 (``set_fp8()``), with attention through the
    eager route and through the custom op: the host's time to enqueue it (``host_ms``, median and
    min of 7), whether it makes a host sync (``torch.cuda.set_sync_debug_mode("error")``) and its
    wall time (CUDA events, median of ``--iters``);
  * with ``--host-profile``: cProfile's top functions by own time for the FP8 forward, eager route.

    python benchmarks/host_overhead.py --model siglip2 dinov3 aimv2 --backend fa4 [--out rows.jsonl]
"""

from __future__ import annotations

import argparse
import functools
import json

import torch

from packvit import attention
from packvit.bench.models import build_pair
from packvit.bench.timing import host_ms, host_profile, measure, model_step
from packvit.bench.workloads import WORKLOADS


def host_us(fn, reps: int = 30) -> float:
    """Median host time of one call (us), the GPU idle at its start (``host_ms``)."""
    return host_ms(fn, reps) * 1e3


def syncs(fn) -> str:
    """ "none" if ``fn`` runs under ``torch.cuda.set_sync_debug_mode("error")``, else the first
    synchronising call's message (packvit's hot path makes none: README, non-negotiables)."""
    if not torch.cuda.is_available():
        return "n/a"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return "none"
    except RuntimeError as e:
        return str(e).splitlines()[0][:100]
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _via_op(q, k, v, cu_q, cu_k, max_q, max_k, scale, seqlens_q, seqlens_k, fn, rule):
    """The ``fa4`` backend through its custom op, as every call went before session 10."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, _ = attention._fa4_fwd_op(
        q, k, v, cu_q, cu_k, max_q, max_k, scale, rule.kernel, rule.min_mean_seqlen, list(rule.head_dims)
    )
    return out


def attention_rows(model, grid, dev, dt) -> dict[str, float]:
    cfg = model.config
    H = cfg.num_heads
    Dh = cfg.hidden_size // H
    lens = [t * h * w for t, h, w in grid]
    T = sum(lens)
    cu = torch.tensor([0] + lens, device=dev).cumsum(0).to(torch.int32)
    mx = max(lens)
    q, k, v = (torch.randn(T, H, Dh, device=dev, dtype=dt) for _ in range(3))
    impl = model.attention
    rule = impl.fa4_backward
    scale = Dh**-0.5
    rows = {}

    def interface(q, k, v):
        return attention._fa4_fwd(q, k, v, cu, cu, mx, mx, scale)

    def eager(q, k, v):
        return attention.varlen_attention(q, k, v, cu, cu, mx, mx, backend=impl)

    def op(q, k, v):
        return _via_op(q, k, v, cu, cu, mx, mx, None, None, None, None, rule)

    for grad in (False, True):
        qkv = [t.detach().requires_grad_(grad) for t in (q, k, v)]
        for name, call in (("FA4 interface", interface), ("eager route", eager), ("custom op", op)):
            fn = functools.partial(call, *qkv)
            for _ in range(3):
                fn()
            rows[f"{name}{', autograd' if grad else ''}"] = host_us(fn)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", nargs="+", default=["siglip2", "dinov3", "aimv2"])
    p.add_argument("--backend", default="fa4")
    p.add_argument("--workload", default="mixed32", choices=sorted(WORKLOADS))
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--host-profile", action="store_true")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny random models (a smoke test of the script)")
    a = p.parse_args()
    dev, dt = torch.device(a.device), torch.bfloat16
    out = []
    for family in a.model:
        _, pv = build_pair(family, None, dev, dt, a.backend, tiny=a.tiny)
        wl = WORKLOADS[a.workload](pv.config.patch_size)
        x = torch.randn(wl.num_patches, pv.patch_dim, device=dev, dtype=dt)
        grid = torch.tensor(wl.grid)
        if pv.attention.name == "fa4":
            for route, us in attention_rows(pv, wl.grid, dev, dt).items():
                out.append(dict(family=family, what="attention", route=route, host_us=us))
                print(f"| {family} | attention | {route} | {us:.0f} us |", flush=True)
        routes = {"eager route": attention._KERNELS["fa4"], "custom op": _via_op}
        for fp8 in (False, True) if dev.type == "cuda" else (False,):  # FP8 needs a GPU
            pv.set_fp8(fp8)
            for route, kernel in routes.items():
                attention._KERNELS["fa4"] = kernel
                try:
                    step = model_step(pv, x, grid, "infer")
                    for _ in range(3):
                        step()
                    host = host_ms(step, reps=7)
                    host_min = host_ms(step, reps=7, stat=min)
                    sync = syncs(step)
                    t = measure(step, dev, warmup=3, iters=a.iters)
                finally:
                    attention._KERNELS["fa4"] = routes["eager route"]
                what = "FP8" if fp8 else "bf16"
                row = dict(family=family, what=f"forward {what}", route=route, host_ms=host, host_min_ms=host_min)
                out.append(dict(row, host_syncs=sync, **t))
                print(
                    f"| {family} | forward {what} | {route} | host {host:.1f} ms (min {host_min:.1f}) | "
                    f"wall {t['ms']:.2f} ms (p10 {t['p10']:.2f}, p90 {t['p90']:.2f}) | syncs: {sync} |",
                    flush=True,
                )
            train = model_step(pv, x, grid, "train")
            train()  # tables and autograd's first pass outside the check
            sync = syncs(train)
            pv.eval()
            what = "FP8" if fp8 else "bf16"
            out.append(dict(family=family, what=f"training step {what}", route="eager route", host_syncs=sync))
            print(f"| {family} | training step {what} | eager route | syncs: {sync} |", flush=True)
            if fp8 and a.host_profile:
                host_profile(model_step(pv, x, grid, "infer"), f"{family} FP8 forward, eager route", a.top)
        pv.set_fp8(False)
        del pv
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if a.out:
        env = dict(
            workload=a.workload,
            backend=a.backend,
            device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
            torch=torch.__version__,
        )
        with open(a.out, "a") as fh:
            for row in out:
                fh.write(json.dumps({**row, **env}) + "\n")


if __name__ == "__main__":
    main()
