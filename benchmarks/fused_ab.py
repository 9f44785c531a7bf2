"""A/B of the fused elementwise kernels (packvit.fused_ops) on a GPU: each op alone, then whole models.

    python benchmarks/fused_ab.py --out results.jsonl                 # ops, then the three families
    python benchmarks/fused_ab.py --part models --family aimv2 --compile
    python benchmarks/fused_ab.py --part ops rope --ops-match RoPE --compile   # the fused RoPE alone, then in DINOv3

Ops: at the suite's ``mixed32`` token count (23,103), the reference ops run eagerly (what packvit ran
before) against the fused kernel, forward and forward + backward, median of CUDA-event timings.
Models: each family at its published size (random weights, bf16, the best attention backend here),
on ``mixed32``, with the fused kernels off (today's eager path) and on (the new default), forward
and training step (forward + backward to parameter gradients), beside the matmul + attention bound
of packvit.bench.bound. The two outputs are compared (per-patch cosine) before anything is timed.
``--part rope``: the same for DINOv3 with every fused kernel on but the RoPE (``auto-norope``) against
all on (``auto``), and off, so that the fused RoPE's share of the model's time is read directly.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from packvit import fused_ops
from packvit.bench.bound import bound_ms
from packvit.bench.models import DEFAULT_PRESETS
from packvit.bench.timing import measure, model_step
from packvit.bench.workloads import get
from packvit.layers import Attention, apply_rope

DEV = torch.device("cuda")
BF16 = torch.bfloat16
T_MIXED32 = 23103


def _rms_ref(x, w, eps=1e-5):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _swiglu_ref(h):
    gate, up = h.chunk(2, -1)
    return F.silu(gate) * up


def op_cases(T: int):
    """name -> (reference fn, fused fn or None, input maker)."""

    def t(*shape, grad=True, scale=1.0, shift=0.0):
        return (torch.randn(*shape, device=DEV) * scale + shift).to(BF16).requires_grad_(grad)

    def ln_inputs(D, gamma):
        return lambda: [
            t(T, D),
            t(T, D),
            t(D, grad=gamma, scale=0.1, shift=1),
            t(D, scale=0.1, shift=1),
            t(D, scale=0.1),
        ]

    liger = fused_ops._liger_ok()

    def rope_inputs(H, Dh):
        # qkv (T, 3, H, Dh) as the matmul writes it; DINOv3-like tables, a few prefix rows unrotated.
        def make():
            ang = torch.rand(T, Dh // 2, device=DEV) * 6.3
            keep = (torch.arange(T, device=DEV) % 97 < 5)[:, None]
            cos = torch.where(keep, 1.0, ang.cos().tile(2)).to(BF16)
            sin = torch.where(keep, 0.0, ang.sin().tile(2)).to(BF16)
            return [t(T, 3, H, Dh), cos, sin]

        return make

    def rope_ref(qkv, cos, sin):
        q, k, _ = qkv.unbind(1)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def rope_fused(qkv, cos, sin):
        q, k, _ = qkv.unbind(1)
        return fused_ops.rope_qk(q, k, cos, sin)

    fc1 = lambda: [t(T, 1024), t(4096, 1024, scale=0.02), t(4096, scale=0.02)]  # noqa: E731
    return {
        "add+LayerNorm D1152 (SigLIP2)": (
            lambda x, a, g, w, b: (lambda s: (s, F.layer_norm(s, (1152,), w, b, 1e-6)))(x + a),
            {"triton": lambda x, a, g, w, b: fused_ops.add_layernorm(x, a, None, w, b, 1e-6)},
            ln_inputs(1152, False),
        ),
        "add+LayerScale+LayerNorm D1024 (DINOv3)": (
            lambda x, a, g, w, b: (lambda s: (s, F.layer_norm(s, (1024,), w, b, 1e-5)))(x + a * g),
            {"triton": lambda x, a, g, w, b: fused_ops.add_layernorm(x, a, g, w, b, 1e-5)},
            ln_inputs(1024, True),
        ),
        "add+RMSNorm fp32 D1024 (AIMv2)": (
            lambda x, a, w: (lambda s: (s, _rms_ref(s, w)))(x + a),
            {
                "triton": lambda x, a, w: fused_ops.add_norm(x, a, None, w, None, 1e-5, rms=True),
                **({"liger": lambda x, a, w: fused_ops.add_rmsnorm(x, a, w, 1e-5)} if liger else {}),
            },
            lambda: [t(T, 1024), t(T, 1024), t(1024, shift=1)],
        ),
        "RMSNorm fp32 D1024 (AIMv2 norm1)": (
            lambda x, w: _rms_ref(x, w),
            {
                "triton": lambda x, w: fused_ops.norm(x, w, None, 1e-5, rms=True),
                **({"liger": lambda x, w: fused_ops.rmsnorm(x, w, 1e-5)} if liger else {}),
            },
            lambda: [t(T, 1024), t(1024, shift=1)],
        ),
        "SwiGLU 2x2816 (AIMv2)": (_swiglu_ref, {"triton": fused_ops.swiglu}, lambda: [t(T, 2 * 2816)]),
        "RoPE q,k from qkv H16 Dh64 (DINOv3-L)": (rope_ref, {"triton": rope_fused}, rope_inputs(16, 64)),
        "x + gamma*m D1024 (DINOv3 ls2)": (
            lambda x, m, g: x + m * g,
            {"addcmul": lambda x, m, g: torch.addcmul(x, m, g)},
            lambda: [t(T, 1024), t(T, 1024), t(1024, scale=0.1, shift=1)],
        ),
        "fc1+bias 4096, GEMM alone (DINOv3)": (lambda x, w, b: F.linear(x, w, b), {}, fc1),
        "fc1+bias+erf-GELU 4096 (DINOv3, unfused)": (lambda x, w, b: F.gelu(F.linear(x, w, b)), {}, fc1),
    }


def _step(fn, inputs, train):
    if not train:

        def run():
            with torch.inference_mode():
                fn(*inputs)

        return run
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = [torch.randn_like(o) for o in outs]
    leaves = [x for x in inputs if x.requires_grad]

    def run():
        o = fn(*inputs)
        torch.autograd.grad(o if isinstance(o, tuple) else (o,), leaves, grads)

    return run


def gpu_ms(fn, n: int = 20) -> float:
    """Kernel time per call (sum of the device time of everything ``fn`` launches), read by the
    profiler: for ops of 0.1 ms the CUDA-event time of a call is mostly the host's launch path."""
    from torch.profiler import ProfilerActivity, profile

    fn(), fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / n / 1e3


def top_kernels(fn, n: int = 3, k: int = 12) -> tuple[float, list[tuple[str, float]]]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    ev = sorted(((e.key, e.self_device_time_total / n / 1e3) for e in prof.key_averages()), key=lambda x: -x[1])
    return sum(t for _, t in ev), [(name[:70], t) for name, t in ev[:k]]


def run_sweep(args, record):
    """Tile shapes of the norm kernels and of the RoPE kernel, by kernel time (forward, forward + backward)."""
    from packvit import triton_kernels as K

    def time_tiles(name, impls, inputs, elems, warps):
        for train in (False, True):
            record(
                dict(
                    part="sweep",
                    op=name,
                    mode="fwd+bwd" if train else "fwd",
                    tile_elems=elems,
                    warps=warps,
                    gpu_ms=gpu_ms(_step(impls["triton"], inputs, train)),
                )
            )

    # The norm kernels' tile (elements of a row block) and warps; the defaults restored after.
    default = K._TILE_ELEMS, K._NORM_WARPS
    cases = {k: v for k, v in op_cases(args.tokens).items() if "Norm" in k}
    for elems, warps in [(1024, 4), (4096, 8), (8192, 8)]:
        K._TILE_ELEMS, K._NORM_WARPS = elems, warps
        for name, (_ref, impls, make) in cases.items():
            time_tiles(name, impls, make(), elems, warps)
    K._TILE_ELEMS, K._NORM_WARPS = default
    # The RoPE kernel's tile (elements of each half-tile) and warps; the defaults restored after.
    default = K._ROPE_TILE_ELEMS, K._ROPE_WARPS
    ((name, (_ref, impls, make)),) = ((k, v) for k, v in op_cases(args.tokens).items() if "RoPE" in k)
    inputs = make()
    for elems, warps in [(1024, 4), (2048, 4), (4096, 4), (4096, 8), (8192, 8)]:
        K._ROPE_TILE_ELEMS, K._ROPE_WARPS = elems, warps
        time_tiles(name, impls, inputs, elems, warps)
    K._ROPE_TILE_ELEMS, K._ROPE_WARPS = default


def run_profile(args, record):
    """Each family's fused eager forward and training step: wall time against the sum of its
    kernels' time (a host-bound run has idle gaps), and the kernels that take the time."""
    for family in args.family:
        model = _build(family)
        wl = get(args.workload, model.config.patch_size)
        px = torch.randn(wl.num_patches, model.patch_dim, generator=torch.Generator().manual_seed(0)).to(DEV, BF16)
        grid = torch.tensor(wl.grid)
        for fused in ("off", "auto"):
            model.set_fused_kernels(fused)
            for mode in ("infer", "train"):
                fn = model_step(model, px, grid, mode)
                wall = measure(fn, DEV, 3, 10)["ms"]
                total, top = top_kernels(fn)
                record(
                    dict(
                        part="profile",
                        family=family,
                        backend=model.attn_backend,
                        fused=fused,
                        mode=mode,
                        wall_ms=wall,
                        kernel_ms=total,
                        top=top,
                    )
                )
                model.zero_grad(set_to_none=True)
        del model
        torch.cuda.empty_cache()


def run_ops(args, record):
    print(f"\n== ops at T={args.tokens} ==", flush=True)
    for name, (ref, impls, make) in op_cases(args.tokens).items():
        if args.ops_match and args.ops_match not in name:
            continue
        inputs = make()
        for train in (False, True):
            ref_ms = measure(_step(ref, inputs, train), DEV, args.warmup, args.iters)["ms"]
            base = dict(
                part="op",
                op=name,
                mode="fwd+bwd" if train else "fwd",
                tokens=args.tokens,
                ref_ms=ref_ms,
                ref_gpu_ms=gpu_ms(_step(ref, inputs, train)),
            )
            if not impls:
                record(base)
            for impl, fused in impls.items():
                row = dict(base, impl=impl)
                with torch.no_grad():
                    r, f = ref(*inputs), fused(*inputs)
                r, f = (r if isinstance(r, tuple) else (r,)), (f if isinstance(f, tuple) else (f,))
                row["max_rel_err"] = max(
                    ((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(f, r)
                )
                row["fused_ms"] = measure(_step(fused, inputs, train), DEV, args.warmup, args.iters)["ms"]
                row["fused_gpu_ms"] = gpu_ms(_step(fused, inputs, train))
                row["speedup"] = row["ref_ms"] / row["fused_ms"]
                row["gpu_speedup"] = row["ref_gpu_ms"] / row["fused_gpu_ms"]
                record(row)
        del inputs
    torch.cuda.empty_cache()


def _build(family):
    from weights_conversion import FAMILIES
    from weights_conversion.reference import randomize_

    fam = FAMILIES[family]
    torch.manual_seed(0)
    m = fam.model_class(fam.config_class.from_name(DEFAULT_PRESETS[family]))
    with torch.no_grad():  # spread the constant-initialised norms, biases and scales
        randomize_(m, seed=0, scale=0.05, constant_only=True)
    m = m.to(DEV, BF16).eval()
    m.set_attention("auto")  # moving keeps the CPU's choice: choose for CUDA bf16
    return m


def _set_fused(model, fused: str) -> None:
    """ "off", "auto", or "auto-norope": every fused kernel but the RoPE (its A/B inside the model)."""
    model.set_fused_kernels("auto" if fused == "auto-norope" else fused)
    if fused == "auto-norope":
        for m in model.modules():
            if isinstance(m, Attention):
                m.fused_rope = None


def run_models(args, record, variants=None, families=None):
    for family in families or args.family:
        model = _build(family)
        backend = model.attn_backend
        wl = get(args.workload, model.config.patch_size)
        g = torch.Generator().manual_seed(0)
        px = torch.randn(wl.num_patches, model.patch_dim, generator=g).to(DEV, BF16)
        grid = torch.tensor(wl.grid)
        print(f"\n== {family} {wl.name} ({wl.num_patches} patches), attention {backend} ==", flush=True)
        print(repr(model).splitlines()[0], flush=True)
        outs = {}
        for fused in ("off", "auto"):
            model.set_fused_kernels(fused)
            with torch.inference_mode():
                outs[fused] = model(px, grid).float()
        cos = F.cosine_similarity(outs["off"], outs["auto"], dim=-1)
        del outs
        bounds = {
            m: bound_ms(model, wl, backend, m == "train", DEV, BF16, args.warmup, args.iters)
            for m in ("infer", "train")
        }
        if variants is None:
            variants = [("eager", "off"), ("eager", "auto")] + ([("compiled", "auto")] if args.compile else [])
        for how, fused in variants:
            _set_fused(model, fused)
            if how == "compiled":
                model.compile_blocks()
            for mode in ("infer", "train"):
                fn = model_step(model, px, grid, mode)
                t0 = time.perf_counter()
                r = measure(fn, DEV, args.warmup + (5 if how == "compiled" else 0), args.iters)
                record(
                    dict(
                        part="model",
                        family=family,
                        workload=wl.name,
                        tokens=wl.num_patches,
                        backend=backend,
                        how=how,
                        fused=fused,
                        fused_kernels={k: v for k, v in model.fused_kernels.items() if v},
                        fused_rope=any(m.fused_rope for m in model.modules() if isinstance(m, Attention)),
                        mode=mode,
                        bound_ms=bounds[mode],
                        x_bound=r["ms"] / bounds[mode],
                        cos_min_off_vs_fused=cos.min().item(),
                        wall_s=time.perf_counter() - t0,
                        **r,
                    )
                )
                model.zero_grad(set_to_none=True)
            if how == "compiled":
                model.uncompile_blocks()
        del model, px
        torch.cuda.empty_cache()


def table(rows):
    lines = [
        "| op | mode | reference: call ms / kernels ms | fused | fused: call ms / kernels ms | kernel speedup | rel. err |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["part"] == "op":
            f = f"{r['fused_ms']:.3f} / {r['fused_gpu_ms']:.3f}" if "fused_ms" in r else "-"
            s = f"{r['gpu_speedup']:.2f}x" if "gpu_speedup" in r else "-"
            e = f"{r['max_rel_err']:.1e}" if "max_rel_err" in r else "-"
            lines.append(
                f"| {r['op']} | {r['mode']} | {r['ref_ms']:.3f} / {r['ref_gpu_ms']:.3f} | {r.get('impl', '-')} | {f} | {s} | {e} |"
            )
    for r in rows:
        if r["part"] == "sweep":
            lines.append(
                f"sweep {r['op'][:28]:28s} {r['mode']:8s} tile {r['tile_elems']:5d} warps {r['warps']}: {r['gpu_ms']:.3f} ms"
            )
    for r in rows:
        if r["part"] == "profile":
            lines.append(
                f"profile {r['family']} {r['backend']} fused={r['fused']} {r['mode']}: wall {r['wall_ms']:.1f} ms, "
                f"kernels {r['kernel_ms']:.1f} ms; " + "; ".join(f"{n[:40]} {t:.2f}" for n, t in r["top"][:8])
            )
    lines += [
        "",
        "| family | mode | how | fused | ms (p10-p90) | bound ms | x bound | peak GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["part"] == "model":
            lines.append(
                f"| {r['family']} | {r['mode']} | {r['how']} {r['backend']} | {r['fused']} | {r['ms']:.1f} "
                f"({r['p10']:.1f}-{r['p90']:.1f}) | {r['bound_ms']:.1f} | {r['x_bound']:.2f} | {r['peak_gib']:.2f} |"
            )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--part", nargs="+", default=["ops", "models"], choices=("ops", "sweep", "models", "rope", "profile")
    )
    p.add_argument("--ops-match", help="--part ops: only the ops whose name contains this (e.g. RoPE)")
    p.add_argument("--family", nargs="+", default=["siglip2", "dinov3", "aimv2"])
    p.add_argument("--workload", default="mixed32")
    p.add_argument("--tokens", type=int, default=T_MIXED32)
    p.add_argument("--compile", action="store_true", help="also time compile_blocks() with the fused kernels")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--out", help="append JSON lines here")
    args = p.parse_args(argv)
    env = dict(torch=torch.__version__, gpu=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d", time.gmtime()))
    print(env, {k: v for k, v in fused_ops.resolve_fused("on", "cuda", BF16).items()}, flush=True)
    rows = []

    def record(row):
        row = {**env, **row}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    if "ops" in args.part:
        run_ops(args, record)
    if "sweep" in args.part:
        run_sweep(args, record)
    if "models" in args.part:
        run_models(args, record)
    if "rope" in args.part:
        v = [("eager", "off"), ("eager", "auto-norope"), ("eager", "auto")]
        v += [("compiled", "auto-norope"), ("compiled", "auto")] if args.compile else []
        run_models(args, record, variants=v, families=["dinov3"])
    if "profile" in args.part:
        run_profile(args, record)
    print("\n" + table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
