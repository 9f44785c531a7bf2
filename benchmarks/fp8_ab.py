"""FP8 (packvit.fp8) against bf16 on a GPU: per-shape sweep, torchao try, model fidelity, timing, training.

    python benchmarks/fp8_ab.py --part ops sweep torchao --out fp8.jsonl     # call 1
    python benchmarks/fp8_ab.py --part fidelity models train --out fp8.jsonl # call 2

ops:      torch._scaled_mm's schema, whether it takes a bias with row-wise scales, the Triton
          quantisers against their torch references, one FP8 linear against a dequantised fp32 one.
pad:      SigLIP2's MLP GEMMs at its hidden width 4304 against it padded to 4352 and 4608.
producers: the kernels writing an FP8 linear's e4m3 input (GELU, SwiGLU, add + norm) at 23k tokens,
          at several tilings, against a bf16 copy and the plain row quantiser (GB/s).
quant:    the training quantisers' kernels at 23k tokens (row pass with column statistics at several
          programs per SM, column amax, transposing cast), ms and GB/s.
sweep:    each family's four block linears (K -> N) at M = 1k .. 64k tokens, bf16 against FP8
          (activation quantisation included; the weight's e4m3 copy is cached as in inference),
          forward under inference_mode and forward + backward with each weight-gradient recipe
          (``fp8.WGRAD``); median ms of 5 repeats of 10 calls. The per-shape crossover is the
          smallest M from which FP8 stays faster; the run keeps the faster recipe for later parts.
torchao:  torchao's ``convert_to_float8_training`` (rowwise recipe, eager) on SigLIP2's MLP at
          23k tokens against packvit.fp8 and bf16, if torchao imports (PYTHONPATH).
fidelity: per family at the published size (random weights, ``build_pair``): per-patch min cosine
          of the FP8 model (every layer FP8: min_tokens 0) against the same model in bf16 and in
          fp32 (packvit fp32 is the HF stand-in: it matches HF to 1e-6 in the suite), on mixed32
          random pixels and on the three real images of packvit/assets; below 0.999 a per-kind
          and per-block search for the layers to keep in bf16.
models:   mixed32 (23k tokens) and 64 images (about 46k), forward and training step, bf16 and FP8
          (``MODEL_VARIANTS``: the crossovers, every linear, both weight-gradient recipes, the input
          quantisation unfused, CUDA graphs), same process, peak memory.
policy:   the proj crossover inside the model: the crossovers against proj in FP8 at every size, at
          about 16k, 23k, 32k and 46k tokens, alternated.
train:    200 steps of a small regression task (a trainable linear head on the tower, its first 8 blocks, regresses a
          fixed random projection of a frozen bf16 teacher's features; the tower is trained too),
          FP8 (every layer, min_tokens 0) against bf16 from the same initial weights and data.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from packvit import fp8
from packvit.bench.models import build_pair
from packvit.bench.timing import measure, model_step
from packvit.bench.workloads import mixed32

DEV = torch.device("cuda")
BF16 = torch.bfloat16
SHAPES = {  # family -> layer -> (K, N)
    "siglip2": {"qkv": (1152, 3456), "proj": (1152, 1152), "fc1": (1152, 4304), "fc2": (4304, 1152)},
    "dinov3": {"qkv": (1024, 3072), "proj": (1024, 1024), "fc1": (1024, 4096), "fc2": (4096, 1024)},
    "aimv2": {"qkv": (1024, 3072), "proj": (1024, 1024), "fc1": (1024, 5632), "fc2": (2816, 1024)},
}
MS = (1024, 2048, 4096, 8192, 12288, 16384, 23103, 32768, 49152, 65536)
OUT: list[dict] = []
TRAIN_BLOCKS = 8


def emit(row: dict) -> None:
    OUT.append(row)
    print(json.dumps(row), flush=True)


def timed(fn, reps: int = 5, calls: int = 10) -> float:
    """Median over ``reps`` of the mean ms of ``calls`` back-to-back calls (host launch cost included)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(calls):
            fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b) / calls)
    return statistics.median(out)


# -- ops --------------------------------------------------------------------------------------------


def part_ops() -> None:
    emit(
        {
            "part": "env",
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name(),
            "capability": list(torch.cuda.get_device_capability()),
            "scaled_mm_schema": str(torch.ops.aten._scaled_mm.default._schema),
        }
    )
    g = torch.Generator(device=DEV).manual_seed(0)
    x = (torch.randn(23103, 1152, device=DEV, generator=g) * torch.rand(1152, device=DEV, generator=g) * 4).to(BF16)
    x[7] = 0
    for name, kern, ref in (
        ("rows", fp8.quantize_rows, fp8.quantize_rows_reference),
        ("cols_t", fp8.quantize_cols_t, fp8.quantize_cols_t_reference),
    ):
        q, s = kern(x)
        qr, sr = ref(x)
        emit(
            {
                "part": "ops",
                "check": f"triton {name} vs torch reference",
                "shape": list(q.shape),
                "shape_ref": list(qr.shape),
                "mismatch_frac": (q.float() != qr.float()).float().mean().item(),
                "max_step": ((q.float() - qr.float()).abs() / qr.float().abs().clamp(min=2**-9)).max().item(),
                "scale_rel": ((s - sr).abs() / sr).max().item(),
            }
        )
    w = (torch.randn(4304, 1152, device=DEV, generator=g) * 0.02).to(BF16)
    b = (torch.randn(4304, device=DEV, generator=g) * 0.1).to(BF16)
    xq, sx = fp8.quantize_rows(x)
    wq, sw = fp8.quantize_rows(w)
    bias_ok = True
    try:
        torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw.view(1, -1), bias=b, out_dtype=BF16)
    except RuntimeError as e:
        bias_ok = f"{type(e).__name__}: {str(e)[:200]}"
    y = fp8.scaled_mm(xq, sx, wq, sw, b, BF16).float()
    deq = (xq.float() * sx) @ (wq.float() * sw).t() + b.float()
    full = x.float() @ w.float().t() + b.float()
    emit(
        {
            "part": "ops",
            "check": "scaled_mm rowwise + bias",
            "bias_in_call": bias_ok,
            "rel_err_vs_dequant": ((y - deq).norm() / deq.norm()).item(),
            "rel_err_vs_fp32": ((y - full).norm() / full.norm()).item(),
            "min_cos_vs_fp32": F.cosine_similarity(y, full, dim=-1).min().item(),
        }
    )


# -- gemm -------------------------------------------------------------------------------------------


def _gemm_steps(x, w) -> dict:
    """The timed bf16 ops at one shape: the GEMM, and the activation quantiser alone."""
    return {"bf16_ms": lambda: x @ w.t(), "quant_rows_ms": lambda: fp8.quantize_rows(x)}


def _scaled_mm_steps(xq, sx, wq, sw, one, fast) -> dict:
    """The timed FP8 GEMMs at one shape (operands already e4m3): row-wise and tensor-wise scales."""
    return {
        f"rowwise_fast{int(fast)}_ms": lambda: torch._scaled_mm(
            xq, wq.t(), scale_a=sx, scale_b=sw.view(1, -1), out_dtype=BF16, use_fast_accum=fast
        ),
        f"tensorwise_fast{int(fast)}_ms": lambda: torch._scaled_mm(
            xq, wq.t(), scale_a=one, scale_b=one, out_dtype=BF16, use_fast_accum=fast
        ),
    }


def _distinct_shapes():
    """(family, layer, K, N) of every layer shape in SHAPES, each (K, N) once (first family that has it)."""
    done = set()
    for fam, layers in SHAPES.items():
        for kind, (K, N) in layers.items():
            if (K, N) not in done:
                done.add((K, N))
                yield fam, kind, K, N


def part_gemm(ms=(23103, 65536)) -> None:
    """The GEMM alone (operands already e4m3) and the activation quantiser alone, per shape."""
    for fam, kind, K, N in _distinct_shapes():
        w = torch.randn(N, K, device=DEV, dtype=BF16) * 0.02
        wq, sw = fp8.quantize_rows(w)
        one = torch.ones((), device=DEV)
        for M in ms:
            x = torch.randn(M, K, device=DEV, dtype=BF16)
            xq, sx = fp8.quantize_rows(x)
            row = {"part": "gemm", "family": fam, "layer": kind, "K": K, "N": N, "M": M}
            for key, fn in _gemm_steps(x, w).items():
                row[key] = timed(fn)
            for fast in (False, True):
                for key, fn in _scaled_mm_steps(xq, sx, wq, sw, one, fast).items():
                    row[key] = timed(fn)
            flops = 2 * M * K * N
            row.update({k: round(v, 4) for k, v in row.items() if k.endswith("_ms")})
            row["bf16_tflops"] = round(flops / row["bf16_ms"] / 1e9, 1)
            row["rowwise_fast1_tflops"] = round(flops / row["rowwise_fast1_ms"] / 1e9, 1)
            row["tensorwise_fast1_tflops"] = round(flops / row["tensorwise_fast1_ms"] / 1e9, 1)
            emit(row)


def _pad_steps(x, w) -> dict:
    """bf16 x @ w.T, and the same in e4m3 as ``packvit.fp8`` runs it (row-wise scales, fast
    accumulation; the quantisation not timed): ``part_gemm``'s steps of those two."""
    xq, sx = fp8.quantize_rows(x)
    wq, sw = fp8.quantize_rows(w)
    one = torch.ones((), device=x.device)
    return {
        "bf16_ms": _gemm_steps(x, w)["bf16_ms"],
        "fp8_ms": _scaled_mm_steps(xq, sx, wq, sw, one, True)["rowwise_fast1_ms"],
    }


def part_pad(ms=(23103, 46206), widths=(4304, 4352, 4608)) -> None:
    """SigLIP2's MLP GEMMs with the hidden width 4304 (= 16 * 269, no multiple of 64) against it padded
    with zeros to a multiple of 256 or 512: fc1 (K 1152 -> N) and fc2 (K -> N 1152), bf16 and e4m3
    (row-wise scales, fast accumulation, as ``packvit.fp8`` runs them). Zero rows of fc1's weight and
    zero columns of fc2's add exact zeros, so padding would change no output; this asks whether the
    GEMMs pick faster tilings."""
    for M in ms:
        x_in = torch.randn(M, 1152, device=DEV, dtype=BF16)
        for H in widths:
            h = torch.randn(M, H, device=DEV, dtype=BF16)
            for layer, x, w in (
                ("fc1", x_in, torch.randn(H, 1152, device=DEV, dtype=BF16) * 0.02),
                ("fc2", h, torch.randn(1152, H, device=DEV, dtype=BF16) * 0.02),
            ):
                row = {"part": "pad", "layer": layer, "M": M, "hidden": H, "K": x.shape[1], "N": w.shape[0]}
                for key, fn in _pad_steps(x, w).items():
                    row[key] = round(timed(fn), 4)
                flops = 2 * M * 1152 * 4304  # the useful work, whatever the padding
                row["bf16_useful_tflops"] = round(flops / row["bf16_ms"] / 1e9, 1)
                row["fp8_useful_tflops"] = round(flops / row["fp8_ms"] / 1e9, 1)
                emit(row)


# -- quant ------------------------------------------------------------------------------------------


def part_quant(M: int = 23103) -> None:
    """The training quantisers at 23k tokens on AIMv2's fc1 operands (x 1024 wide, dy 5632): the
    plain row pass, the row pass that also gathers column amax and sums (``quantize_rows_col_stats``)
    at several programs per SM, and the column passes; with the bytes each moves, as GB/s."""
    from packvit import fp8_kernels as FK

    default = FK.COL_STATS_PROGRAMS_PER_SM
    for what, C in (("x", 1024), ("dy", 5632), ("dy_siglip2_fc1", 4304)):
        t = torch.randn(M, C, device=DEV, dtype=BF16)
        amax = FK.col_amax(t)
        read, q8 = t.numel() * 2, t.numel()
        row = {"part": "quant", "operand": what, "M": M, "C": C}
        row["rows_ms"] = timed(functools.partial(FK.quantize_rows, t))
        min_k = FK.COL_STATS_FUSED_MIN_K
        FK.COL_STATS_FUSED_MIN_K = 0
        for pps in (1, 2, 4, 8):
            FK.COL_STATS_PROGRAMS_PER_SM = pps
            row[f"rows_colstats_pps{pps}_ms"] = timed(functools.partial(FK.quantize_rows_col_stats, t, True))
        FK.COL_STATS_PROGRAMS_PER_SM = default
        FK.COL_STATS_FUSED_MIN_K = 1 << 30
        row["rows_colstats_separate_ms"] = timed(functools.partial(FK.quantize_rows_col_stats, t, True))
        FK.COL_STATS_FUSED_MIN_K = min_k
        row["col_amax_ms"] = timed(functools.partial(FK.col_amax, t))
        row["cast_cols_t_ms"] = timed(functools.partial(FK.cast_cols_t, t, amax))
        row["sum0_ms"] = timed(functools.partial(t.sum, 0))
        row = {k: round(v, 4) if k.endswith("_ms") else v for k, v in row.items()}
        row["rows_gbps"] = round((read + q8) / row["rows_ms"] / 1e6)
        row["cast_cols_t_gbps"] = round((read + q8) / row["cast_cols_t_ms"] / 1e6)
        emit(row)


def part_producers(M: int = 23103) -> None:
    """The kernels that write an FP8 linear's e4m3 input (GELU, SwiGLU, the norms) at 23k tokens, at
    several tilings, beside the plain row quantiser and a bf16 copy as bandwidth references: ms and
    GB/s (bytes read + written). The GELU kernel as it was before (``_gelu_fp8_before``) is the
    baseline: each tiling reports the fraction of its e4m3 codes that differ from it; SwiGLU's
    tilings must give the first tiling's bits."""
    import triton

    from packvit import fp8_kernels as FK
    from packvit import triton_kernels as K

    def gbps(nbytes, ms):
        return round(nbytes / ms / 1e6)

    for N in (4304, 4096, 2816, 1152):
        t = torch.randn(M, N, device=DEV, dtype=BF16) * 2
        nb = t.numel() * 2
        emit(
            {
                "part": "producers",
                "op": "copy_bf16",
                "N": N,
                "ms": round(ms := timed(t.clone), 4),
                "gbps": gbps(2 * nb, ms),
            }
        )
        ms = timed(functools.partial(FK.quantize_rows, t))
        emit({"part": "producers", "op": "quantize_rows", "N": N, "ms": round(ms, 4), "gbps": gbps(nb * 3 // 2, ms)})
    for op, N, act in (("gelu_tanh", 4304, K._GELU_TANH), ("gelu_erf", 4096, K._GELU_ERF), ("swiglu", 2816, K._SWIGLU)):
        h = torch.randn(M, 2 * N if op == "swiglu" else N, device=DEV, dtype=BF16) * 2
        kernel, kw = K._act_fwd_fp8_kernel, {"ACT": act}
        nbytes = h.numel() * 2 + M * N
        ref = None
        if op != "swiglu":  # the kernel before this part existed, as the baseline
            q = torch.empty(M, N, dtype=fp8.E4M3, device=DEV)
            sc = torch.empty(M, 1, dtype=torch.float32, device=DEV)
            bn = triton.next_power_of_2(N)
            run = functools.partial(
                _gelu_fp8_before()[(M,)], h, q, sc, M, N, BLOCK_M=1, BLOCK_N=bn, num_warps=8, TANH=op == "gelu_tanh"
            )
            ms = timed(run)
            ref = (q.clone(), sc.clone())
            emit(
                {
                    "part": "producers",
                    "op": op,
                    "N": N,
                    "variant": "before",
                    "ms": round(ms, 4),
                    "gbps": gbps(nbytes, ms),
                }
            )
        for split in (False, True):
            a, b = K._row_split(N) if split else (triton.next_power_of_2(N), 0)
            for warps in (4, 8, 16):
                for bm in (1, 2):
                    q = torch.empty(M, N, dtype=fp8.E4M3, device=DEV)
                    sc = torch.empty(M, 1, dtype=torch.float32, device=DEV)

                    run = functools.partial(
                        kernel[((M + bm - 1) // bm,)],
                        h,
                        q,
                        sc,
                        M,
                        N,
                        BLOCK_M=bm,
                        BLOCK_A=a,
                        BLOCK_B=b,
                        num_warps=warps,
                        **kw,
                    )
                    ms = timed(run)
                    if ref is None:
                        ref = (q.clone(), sc.clone())
                    same = (q.view(torch.uint8) != ref[0].view(torch.uint8)).float().mean().item()  # codes that differ
                    same = same if op != "swiglu" else same == 0 and torch.equal(sc, ref[1])
                    emit(
                        {
                            "part": "producers",
                            "op": op,
                            "N": N,
                            "split": split,
                            "tiles": [a, b],
                            "warps": warps,
                            "bm": bm,
                            "ms": round(ms, 4),
                            "gbps": gbps(nbytes, ms),
                            ("same_bits" if op == "swiglu" else "codes_differ_from_before"): same,
                        }
                    )
    # The norms at D 1152 (SigLIP2) and 1024, add + LayerNorm: the bf16 kernel, the one-tile fp8 variant
    # (the only one before session 10; still what a power-of-two width runs) and, at 1152, the two-tile
    # fp8 kernel at several rows a program and warps, with the fraction of its codes that differ from
    # quantize_rows of the bf16 kernel's y (its sums are added in another order).
    for D in (1152, 1024):
        x = torch.randn(M, D, device=DEV, dtype=BF16)
        a_ = torch.randn(M, D, device=DEV, dtype=BF16)
        w = torch.rand(D, device=DEV, dtype=BF16) + 0.5
        bias = torch.randn(D, device=DEV, dtype=BF16) * 0.1
        s, y, mean, rstd = K.norm_fwd(x, a_, None, w, bias, 1e-6, False)
        qr, _ = FK.quantize_rows(y)
        q = torch.empty(M, D, dtype=fp8.E4M3, device=DEV)
        sc = torch.empty(M, 1, dtype=torch.float32, device=DEV)
        bm1, bn1 = K._norm_tile(D)
        one_tile = functools.partial(  # what a power-of-two width runs (norm_fwd_fp8 routes 1152 to two tiles)
            K._norm_fwd_kernel[(triton.cdiv(M, bm1),)],
            x, a_, w, w, bias, s, x, sc, sc, q, sc, M, D, 1e-6,
            HAS_RES=True, HAS_GAMMA=False, HAS_BIAS=True, IS_RMS=False,
            BLOCK_M=bm1, BLOCK_N=bn1, FP8_OUT=True, num_warps=K._NORM_WARPS,
        )  # fmt: skip
        rows = [
            ("bf16", functools.partial(K.norm_fwd, x, a_, None, w, bias, 1e-6, False), x.numel() * 8, None),
            ("fp8 one tile", one_tile, x.numel() * 7, None),
        ]
        if D & (D - 1):
            ta, tb = K._row_split(D)
            for bm in (1, 2, 4, 8):
                for warps in (4, 8):
                    run = functools.partial(
                        K._norm_fwd_fp8_two_tiles_kernel[(triton.cdiv(M, bm),)],
                        x, a_, w, w, bias, s, x, q, sc, M, D, 1e-6,
                        HAS_RES=True, HAS_GAMMA=False, HAS_BIAS=True, IS_RMS=False,
                        BLOCK_M=bm, BLOCK_A=ta, BLOCK_B=tb, num_warps=warps,
                    )  # fmt: skip
                    rows.append((f"fp8 two tiles bm={bm} warps={warps}", run, x.numel() * 7, True))
        for variant, run, nbytes, check in rows:
            ms = timed(run, calls=20)
            row = {"part": "producers", "op": "add_layernorm", "N": D, "variant": variant, "ms": round(ms, 4)}
            row["gbps"] = gbps(nbytes, ms)
            if check:
                row["codes_differ_from_bf16"] = (q.view(torch.uint8) != qr.view(torch.uint8)).float().mean().item()
            emit(row)


def _gelu_fp8_before():
    """The GELU e4m3 kernel as it was before the producers part (one next_power_of_2 tile a row,
    tl.sigmoid, clamp before the cast), kept here only as the same-run baseline."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(Hx, Q, QS, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TANH: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        live = rows < M
        mask = live[:, None] & (cols < N)[None, :]
        off = rows.to(tl.int64)[:, None] * N + cols[None, :]
        x = tl.load(Hx + off, mask=mask, other=0.0).to(tl.float32)
        if TANH:
            inner = 0.7978845608028654 * (x + 0.044715 * (x * x * x))
            g = 0.5 * x * (2.0 * tl.sigmoid(2.0 * inner))
        else:
            g = x * 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
        y = tl.where(mask, g.to(Hx.dtype.element_ty).to(tl.float32), 0.0)
        amax = tl.max(tl.abs(y), axis=1)
        qscale = 448.0 / tl.maximum(amax, 1e-12)
        q = tl.clamp(y * qscale[:, None], -448.0, 448.0)
        tl.store(Q + off, q.to(Q.dtype.element_ty), mask=mask)
        tl.store(QS + rows, 1.0 / qscale, mask=live)

    return kernel


# -- sweep ------------------------------------------------------------------------------------------


def _layer(K: int, N: int, bias: bool) -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(0)
    ref = nn.Linear(K, N, bias=bias, device=DEV, dtype=BF16)
    lin = copy.deepcopy(ref)
    lin.__class__ = fp8.FP8Linear
    lin._init_fp8(0, 0)
    return ref, lin


def _train_step(m, xg, dy):
    """One training step of layer m: its and the input's gradients cleared, forward, backward of dy."""

    def step():
        m.zero_grad(set_to_none=True)
        xg.grad = None
        m(xg).backward(dy)

    return step


def part_sweep(ms=MS) -> None:
    """Per shape and token count: inference, and the training step of each weight-gradient recipe
    (``fp8.WGRAD`` "fp8" and "bf16"). Sets, for this process's later parts, the recipe that is faster
    summed over the shapes at 23k and 48k tokens, and each shape's crossovers under it."""
    default_wgrad = fp8.WGRAD
    for fam, kind, K, N in _distinct_shapes():
        ref, lin = _layer(K, N, True)
        for M in ms:
            x = torch.randn(M, K, device=DEV, dtype=BF16)
            dy = torch.randn(M, N, device=DEV, dtype=BF16)
            with torch.inference_mode():
                t_bf = timed(functools.partial(ref, x))
                t_f8 = timed(functools.partial(lin, x))
            xg = x.clone().requires_grad_(True)
            tt_bf = timed(_train_step(ref, xg, dy), reps=3)
            tt = {}
            for wgrad in ("fp8", "bf16"):
                fp8.WGRAD = wgrad
                tt[wgrad] = timed(_train_step(lin, xg, dy), reps=3)
            fp8.WGRAD = default_wgrad
            emit(
                {
                    "part": "sweep",
                    "family": fam,
                    "layer": kind,
                    "K": K,
                    "N": N,
                    "M": M,
                    "infer_bf16_ms": round(t_bf, 4),
                    "infer_fp8_ms": round(t_f8, 4),
                    "infer_speedup": round(t_bf / t_f8, 3),
                    "train_bf16_ms": round(tt_bf, 4),
                    "train_fp8_ms": round(tt["fp8"], 4),
                    "train_gwhp_ms": round(tt["bf16"], 4),  # weight gradient in bf16
                    "train_speedup": round(tt_bf / tt["fp8"], 3),
                    "train_gwhp_speedup": round(tt_bf / tt["bf16"], 3),
                }
            )
            del x, dy, xg
    rows = [r for r in OUT if r["part"] == "sweep"]
    at = {M for M in ms if M in (23103, 49152)} or {max(ms)}
    total = {key: sum(r[key] for r in rows if r["M"] in at) for key in ("train_fp8_ms", "train_gwhp_ms")}
    fp8.WGRAD = "fp8" if total["train_fp8_ms"] <= total["train_gwhp_ms"] else "bf16"
    emit({"part": "wgrad_choice", "summed_ms": total, "tokens": sorted(at), "wgrad": fp8.WGRAD})
    train_key = "train_speedup" if fp8.WGRAD == "fp8" else "train_gwhp_speedup"
    # Crossovers: the smallest M from which every larger M measured is faster in FP8.
    for K, N in sorted({(r["K"], r["N"]) for r in rows}):
        rs = sorted((r for r in rows if (r["K"], r["N"]) == (K, N)), key=lambda r: r["M"])
        cross = {}
        for mode, key in (("infer", "infer_speedup"), ("train", train_key)):
            c = None
            for r in reversed(rs):
                if r[key] > 1.0:
                    c = r["M"]
                else:
                    break
            cross[mode] = c
            fp8.CROSSOVER[mode][(K, N)] = c  # what the model parts of this run use
        emit({"part": "crossover", "K": K, "N": N, "wgrad": fp8.WGRAD, **cross})


# -- torchao ----------------------------------------------------------------------------------------


def _input_grad_step(m, x, dy):
    """One training step of module m: the input's gradient cleared (not m's), forward, backward of dy."""

    def step():
        x.grad = None
        m(x).backward(dy)

    return step


def part_torchao() -> None:
    try:
        import torchao
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except Exception as e:  # noqa: BLE001
        emit({"part": "torchao", "import": f"{type(e).__name__}: {str(e)[:300]}"})
        return
    M = 23103
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(1152, 4304), nn.GELU(approximate="tanh"), nn.Linear(4304, 1152)).to(DEV, BF16)
    ao = copy.deepcopy(base)
    try:
        convert_to_float8_training(ao, config=Float8LinearConfig.from_recipe_name("rowwise"))
    except Exception as e:  # noqa: BLE001
        emit({"part": "torchao", "version": torchao.__version__, "convert": f"{type(e).__name__}: {str(e)[:300]}"})
        return
    ours = copy.deepcopy(base)
    for m in ours:
        if isinstance(m, nn.Linear):
            m.__class__ = fp8.FP8Linear
            m._init_fp8(0, 0)
    x = torch.randn(M, 1152, device=DEV, dtype=BF16, requires_grad=True)
    dy = torch.randn(M, 1152, device=DEV, dtype=BF16)
    row = {"part": "torchao", "version": torchao.__version__, "M": M, "what": "SigLIP2 MLP fc1-gelu-fc2, eager"}
    ref_out = base(x).float()
    for name, m in (("bf16", base), ("torchao_rowwise", ao), ("packvit_fp8", ours)):
        try:
            out = m(x).float()
            row[f"{name}_min_cos"] = F.cosine_similarity(out, ref_out, dim=-1).min().item()
            row[f"{name}_train_ms"] = round(timed(_input_grad_step(m, x, dy), reps=3), 3)
            with torch.inference_mode():
                row[f"{name}_infer_ms"] = round(timed(functools.partial(m, x)), 3)
        except Exception as e:  # noqa: BLE001
            row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    emit(row)


# -- models -----------------------------------------------------------------------------------------


def _pixels(model, grid, seed: int) -> torch.Tensor:
    g = torch.Generator(device=DEV).manual_seed(seed)
    n = sum(t * h * w for t, h, w in grid)
    return torch.randn(n, model.patch_dim, device=DEV, generator=g)


def _asset_batch(model):
    """The three real images of packvit/assets at their own aspect, about 1k-2.5k patches each, normalised."""
    from PIL import Image

    from packvit.packing import patchify

    p = model.config.patch_size
    ims, grid = [], []
    for f in sorted((Path(__file__).resolve().parents[1] / "packvit" / "assets").glob("*.jpg")):
        im = Image.open(f).convert("RGB")
        scale = (1536 * p * p / (im.width * im.height)) ** 0.5
        w, h = max(p, round(im.width * scale / p) * p), max(p, round(im.height * scale / p) * p)
        t = torch.frombuffer(bytearray(im.resize((w, h)).tobytes()), dtype=torch.uint8).view(h, w, 3)
        t = (t.permute(2, 0, 1).float() / 255 - 0.5) / 0.5
        ims.append(t)
    hs, grid = patchify(ims, p)
    return hs.to(DEV), grid


def _mincos(a, b) -> float:
    return F.cosine_similarity(a.float(), b.float(), dim=-1).min().item()


def _models(fam: str, backend: str):
    _, m32 = build_pair(fam, None, DEV, torch.float32, "sdpa")  # fp32: the reference path
    mbf = copy.deepcopy(m32).to(BF16)
    mbf.set_attention_backend(backend)
    m32.set_attention_backend("sdpa")  # the fp32 reference path
    return m32, mbf


def part_fidelity(families, backend: str) -> None:
    for fam in families:
        m32, mbf = _models(fam, backend)
        m8 = copy.deepcopy(mbf)
        m8.set_fp8(min_tokens=0)
        with torch.inference_mode():
            _fidelity(fam, m32, mbf, m8)
        del m8, m32, mbf
        torch.cuda.empty_cache()


def _fidelity(fam, m32, mbf, m8) -> None:
    if True:
        inputs = {
            "mixed32": (_pixels(mbf, mixed32(mbf.config.patch_size).grid, 1), mixed32(mbf.config.patch_size).grid),
            "assets": _asset_batch(mbf),
        }
        mdef = copy.deepcopy(mbf)
        mdef.set_fp8()  # the default policy: only the layers faster at this token count
        for wl, (px, grid) in inputs.items():
            r32, rbf, r8, rdef = m32(px, grid), mbf(px, grid), m8(px, grid), mdef(px, grid)
            emit(
                {
                    "part": "fidelity",
                    "family": fam,
                    "workload": wl,
                    "tokens": int(px.shape[0]),
                    "bf16_vs_fp32": _mincos(rbf, r32),
                    "fp8_vs_bf16": _mincos(r8, rbf),
                    "fp8_vs_fp32": _mincos(r8, r32),
                    "fp8_default_vs_bf16": _mincos(rdef, rbf),
                    "fp8_default_vs_fp32": _mincos(rdef, r32),
                    "fp8_default_layers_run": sum(
                        1 for mod in mdef.modules() if isinstance(mod, fp8.FP8Linear) and mod.uses_fp8(px)
                    ),
                }
            )
        del mdef
        px, grid = inputs["mixed32"]
        rbf = mbf(px, grid)
        if _mincos(m8(px, grid), rbf) >= 0.999:
            return
        # Which layers: one kind kept bf16 at a time, then FP8 in one block at a time.
        for kind in fp8.LAYERS:
            m8.set_fp8(min_tokens=0, skip=(kind,))
            emit(
                {"part": "fidelity_search", "family": fam, "bf16_kept": kind, "fp8_vs_bf16": _mincos(m8(px, grid), rbf)}
            )
        for i in range(len(mbf.blocks)):
            m8.set_fp8(min_tokens=0, skip=tuple(f"blocks.{j}" for j in range(len(mbf.blocks)) if j != i))
            emit(
                {
                    "part": "fidelity_search",
                    "family": fam,
                    "fp8_only_block": i,
                    "fp8_vs_bf16": _mincos(m8(px, grid), rbf),
                }
            )


# The model part's variants: name -> (set_fp8 arguments or None for bf16, modes, CUDA graphs, what
# runs differently: None, "freeq" (``free_quantisation``, the ceiling of any fused quantisation) or
# "unpadded" (fc2's e4m3 rows not padded to ``fp8.PAD_K_MULTIPLE``)).
# "fp8": the crossovers (this run's sweep, if it ran first); "fp8_unfused": the same with each linear
# quantising its own input (``fp8.FUSE_INPUT_QUANT`` off: inference only, as the fusion is);
# "fp8_all": every linear FP8 whatever its crossover, training with this process's weight-gradient
# recipe (``fp8.WGRAD``) and, as "fp8_all_other_wgrad", with the other one; "*_graphs": the forward
# replayed from a CUDA graph of one bucket just above the batch (``packvit.cuda_graphs``), which
# takes the host's launch cost out; "*_freeq": every linear FP8 with its quantisation free (the
# ceiling: what FP8 linears could give if every quantisation were fused into its producer at no cost);
# "fp8_unpadded": the crossovers with fc2's e4m3 input not padded (SigLIP2's 4304 columns, as before).
MODEL_VARIANTS = {
    "bf16": (None, ("infer", "train"), False, None),
    "fp8": ({}, ("infer", "train"), False, None),
    "fp8_unfused": ({}, ("infer",), False, None),
    "fp8_unpadded": ({}, ("infer",), False, "unpadded"),
    "fp8_all": ({"min_tokens": 0}, ("infer", "train"), False, None),
    "fp8_all_other_wgrad": ({"min_tokens": 0}, ("train",), False, None),
    "bf16_graphs": (None, ("infer",), True, None),
    "fp8_graphs": ({}, ("infer",), True, None),
    "fp8_all_freeq": ({"min_tokens": 0}, ("infer", "train"), False, "freeq"),
    "fp8_all_freeq_other_wgrad": ({"min_tokens": 0}, ("train",), False, "freeq"),
}


@contextlib.contextmanager
def unpadded_rows():
    """fc2's e4m3 rows as wide as its input (no zero columns): ``fp8.PAD_K_MULTIPLE`` 16."""
    saved = fp8.PAD_K_MULTIPLE
    fp8.PAD_K_MULTIPLE = 16
    try:
        yield
    finally:
        fp8.PAD_K_MULTIPLE = saved


@contextlib.contextmanager
def free_quantisation():
    """Quantisation at no cost, for a ceiling: each quantising call returns what its first call at
    that shape (and grad mode) returned, without running a kernel. Covered: ``packvit.fp8``'s row,
    column and column-statistics passes (activations, weights, gradients) and the GELU that writes
    fc2's e4m3 input (the bf16 path has that GELU in fc1's GEMM epilogue, so it is counted as free
    too). The norms that write e4m3 rows run as they are (they cost what the bf16 norms cost), and so
    do the GEMMs, attention and everything else. Timing only: the outputs are wrong."""
    from packvit import fused_ops

    targets = [(fp8, n) for n in ("quantize_rows", "quantize_rows_col_stats", "cast_cols_t")]
    targets.append((fused_ops, "gelu_fp8"))
    saved = {(mod, name): getattr(mod, name) for mod, name in targets}
    cache: dict = {}

    def frozen(name, fn):
        def call(x, *rest, **kw):
            key = (
                name,
                tuple(x.shape),
                x.dtype,
                () if name == "cast_cols_t" else (rest, tuple(sorted(kw.items()))),
                torch.is_grad_enabled(),
                torch.is_inference_mode_enabled(),
            )
            if key not in cache:
                cache[key] = fn(x, *rest, **kw)
            return cache[key]

        return call

    for (mod, name), fn in saved.items():
        setattr(mod, name, frozen(name, fn))
    try:
        yield
    finally:
        for (mod, name), fn in saved.items():
            setattr(mod, name, fn)


VARIANT_CONTEXT = {None: contextlib.nullcontext, "freeq": free_quantisation, "unpadded": unpadded_rows}


def part_models(families, backend: str, variants=None, modes=("infer", "train")) -> None:
    """``MODEL_VARIANTS`` (or the ``variants`` named) in the ``modes`` given; "bf16" always runs, as
    the ratios' base."""
    from packvit import cuda_graphs

    chosen = {k: v for k, v in MODEL_VARIANTS.items() if variants is None or k in variants or k == "bf16"}

    wgrad = fp8.WGRAD
    other = {"fp8": "bf16", "bf16": "fp8"}[wgrad]
    for fam in families:
        _, mbf = build_pair(fam, None, DEV, BF16, backend)
        mbf.set_attention_backend(backend)
        p = mbf.config.patch_size
        g32 = mixed32(p).grid
        g64 = g32 + tuple((1, w, h) for _, h, w in g32)  # 64 images: the mixed32 sizes and their transposes
        for wl, grid in (("mixed32", g32), ("mixed64", g64)):
            px = _pixels(mbf, grid, 2)
            res = {}
            for name, (args, var_modes, graphs, how) in chosen.items():
                fp8.FUSE_INPUT_QUANT = name != "fp8_unfused"
                fp8.WGRAD = other if name.endswith("_other_wgrad") else wgrad
                if args is None:
                    mbf.set_fp8(False)
                else:
                    mbf.set_fp8(**args)
                target = mbf
                if graphs:
                    # the bucket just above the batch, and one 256 tokens below it: a graph's padding
                    # segments are sized for the most padding its bucket can see (the whole bucket, were
                    # it the only one), and FA4 pays for every segment slot (``cuda_graphs``)
                    tokens = int(px.shape[0]) + mbf.num_prefix * len(grid)
                    b = -(-tokens // 256) * 256
                    target = cuda_graphs.capture(mbf, buckets=(b - 256, b), lazy=True)
                for mode in (m for m in var_modes if m in modes):
                    torch.cuda.empty_cache()
                    with VARIANT_CONTEXT[how]():
                        r = measure(model_step(target, px, grid, mode), DEV, warmup=4, iters=10)
                    res[(name, mode)] = r
                    emit(
                        {
                            "part": "models",
                            "family": fam,
                            "workload": wl,
                            "tokens": int(px.shape[0]),
                            "impl": name,
                            "mode": mode,
                            "ms": round(r["ms"], 3),
                            "p10": round(r["p10"], 3),
                            "p90": round(r["p90"], 3),
                            "peak_gib": r["peak_gib"] and round(r["peak_gib"], 3),
                            "fp8_layers": len(mbf.fp8),
                            "wgrad": fp8.WGRAD if mode == "train" and mbf.fp8 else None,
                            "backend": mbf.attn_backend,
                            "graph_replays": getattr(target, "replays", None),
                        }
                    )
                del target
            for mode in modes:
                base = res[("bf16", mode)]["ms"]
                emit(
                    {
                        "part": "models_ratio",
                        "family": fam,
                        "workload": wl,
                        "mode": mode,
                        **{
                            f"bf16_over_{name}": round(base / r["ms"], 3)
                            for (name, m), r in res.items()
                            if m == mode and name != "bf16"
                        },
                    }
                )
            fp8.FUSE_INPUT_QUANT, fp8.WGRAD = True, wgrad
            mbf.set_fp8(False)
        del mbf
        torch.cuda.empty_cache()


TRAIN_RECIPES = {  # name -> fp8.DGRAD during the run (None: the bf16 model, no FP8 at all)
    "bf16": None,
    "fp8": "fp8",
    "fp8_bf16_dgrad": "bf16",  # only the forward in e4m3 (WGRAD is bf16 by default): isolates the gradient's share
}


def part_train(families, backend: str, steps: int = 200, every: int = 20, seeds=(0,), recipes=("bf16", "fp8")) -> None:
    """bf16 against FP8 (every linear) on a short regression task, once per seed. A seed sets the
    student's starting noise and the batches, the same for every recipe, so the spread of bf16 over
    the seeds is the noise that FP8's gap is read against (``TRAIN_RECIPES``)."""
    for fam in families:
        _, teacher = build_pair(fam, None, DEV, BF16, backend)
        teacher.truncate(TRAIN_BLOCKS)  # the first blocks only: 2 x 200 steps per family and seed in one call
        teacher.set_attention_backend(backend)
        teacher.eval().requires_grad_(False)
        D = teacher.hidden_size
        proj = torch.randn(D, 64, device=DEV, generator=torch.Generator(device=DEV).manual_seed(3)) / D**0.5
        curves = {}
        for seed in seeds:
            for name in recipes:
                fp8.DGRAD = TRAIN_RECIPES[name] or "fp8"
                student = copy.deepcopy(teacher).requires_grad_(True).train()
                torch.manual_seed(5 + 100 * seed)
                with torch.no_grad():  # the student starts off the teacher
                    for q in student.blocks.parameters():
                        q.add_(torch.randn_like(q) * 0.02 * q.float().std().to(q.dtype))
                if TRAIN_RECIPES[name]:
                    student.set_fp8(min_tokens=0)
                head = nn.Linear(D, 64, device=DEV, dtype=BF16)
                nn.init.zeros_(head.bias)
                opt = torch.optim.AdamW(list(student.parameters()) + list(head.parameters()), lr=1e-4, weight_decay=0.0)
                g = torch.Generator().manual_seed(7 + 100 * seed)
                losses = []
                t0 = time.perf_counter()
                for step in range(steps):
                    grid = [
                        (
                            1,
                            int(torch.randint(12, 33, (1,), generator=g)),
                            int(torch.randint(12, 33, (1,), generator=g)),
                        )
                        for _ in range(12)
                    ]
                    px = _pixels(teacher, grid, 1000 + step + 100_000 * seed)
                    with torch.no_grad():
                        target = teacher(px, grid).float() @ proj
                    loss = F.mse_loss(head(student(px, grid)).float(), target)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    losses.append(loss.detach())
                curves[name, seed] = torch.stack(losses).tolist()  # one sync per run, not per step
                secs = time.perf_counter() - t0
                # Held-out loss of the trained weights, run in bf16 and (the FP8 student) in FP8: where
                # the two recipes' students tie in bf16, FP8 training learned as well, and a gap in the
                # training curve is FP8's forward noise on the exact targets, not worse weights.
                held = {}
                student.eval()
                for mode in ("bf16", "fp8") if TRAIN_RECIPES[name] else ("bf16",):
                    student.set_fp8(mode == "fp8", min_tokens=0)
                    ls = []
                    for i in range(4):
                        gh = torch.Generator().manual_seed(99_000 + i)
                        grid = [(1, int(torch.randint(12, 33, (1,), generator=gh)), 24) for _ in range(12)]
                        px = _pixels(teacher, grid, 99_000 + i)
                        with torch.inference_mode():
                            target = teacher(px, grid).float() @ proj
                            ls.append(F.mse_loss(head(student(px, grid)).float(), target))
                    held[f"held_out_as_{mode}"] = round(torch.stack(ls).mean().item(), 5)
                emit(
                    {
                        "part": "train_run",
                        "family": fam,
                        "impl": name,
                        "seed": seed,
                        "steps": steps,
                        "s": round(secs, 1),
                        "fp8_layers": len(student.fp8),
                        **held,
                    }
                )
                del student, opt, head
                torch.cuda.empty_cache()
            fp8.DGRAD = "fp8"
        for s in range(0, steps, every):
            w = slice(s, s + every)
            row = {"part": "train_loss", "family": fam, "steps": f"{s + 1}-{s + every}"}
            for (name, seed), c in curves.items():
                row[f"{name}_s{seed}"] = round(statistics.mean(c[w]), 5)
            emit(row)
        del teacher
        torch.cuda.empty_cache()


def summary() -> None:
    """A short table of this run's rows, for a terminal that shows only the tail (the JSON lines
    above it hold everything)."""
    print("# summary")
    for r in OUT:
        part = r["part"]
        if part in ("quant", "producers", "pad"):
            print(part, {k: v for k, v in r.items() if k != "part"})
        elif part in ("wgrad_choice", "crossover"):
            print(part, {k: v for k, v in r.items() if k != "part"})
        elif part == "sweep" and r["M"] in (23103, 49152):
            print(
                f"sweep {r['family']:8} {r['layer']:5} M={r['M']:6} infer x{r['infer_speedup']:.2f} "
                f"train x{r['train_speedup']:.2f} (bf16 wgrad x{r['train_gwhp_speedup']:.2f})"
            )
        elif part == "models":
            print(
                f"models {r['family']:8} {r['workload']} {r['mode']:5} {r['impl']:20} {r['ms']:8.2f} ms p90 {r['p90']:.2f}"
            )
        elif part == "models_ratio":
            print("ratio", {k: v for k, v in r.items() if k != "part"})
        elif part in ("train_loss", "train_run"):
            print(part, {k: v for k, v in r.items() if k != "part"})


def part_policy(families, backend: str, rounds: int = 3) -> None:
    """The proj crossover checked inside the model: the FP8 forward with the measured crossovers
    (``fp8.CROSSOVER``; proj, (D, D), stays bf16 below 49k-65k tokens) against the same with proj in
    FP8 at every size, the only layer the two differ in from 16k tokens on. Batches of the mixed32
    sizes and their transposes (about 16k, 23k, 32k and 46k tokens), the two variants alternated
    ``rounds`` times (10 timed forwards each), median of the rounds' medians."""
    for fam in families:
        _, m = build_pair(fam, None, DEV, BF16, backend)
        m.set_attention_backend(backend)
        D = m.config.hidden_size
        g32 = mixed32(m.config.patch_size).grid
        g64 = g32 + tuple((1, w, h) for _, h, w in g32)
        table = fp8.CROSSOVER["infer"]
        measured = dict(table)
        for k in (22, 32, 44, 64):
            grid = g64[:k]
            px = _pixels(m, grid, 3)
            times = {"crossovers": [], "proj_fp8": []}
            for _ in range(rounds):
                for name in times:
                    table.clear()
                    table.update(measured if name == "crossovers" else {**measured, (D, D): 0})
                    m.set_fp8()
                    times[name].append(measure(model_step(m, px, grid, "infer"), DEV, warmup=3, iters=10)["ms"])
            table.clear()
            table.update(measured)
            a, b = (statistics.median(times[n]) for n in ("crossovers", "proj_fp8"))
            emit(
                {
                    "part": "policy",
                    "family": fam,
                    "tokens": int(px.shape[0]),
                    "proj_crossover": fp8.crossover(D, D, "infer"),
                    "crossovers_ms": round(a, 3),
                    "proj_fp8_ms": round(b, 3),
                    "proj_fp8_gain": round(a / b, 4),
                    "rounds": {n: [round(t, 3) for t in v] for n, v in times.items()},
                }
            )
        m.set_fp8(False)
        del m
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--part",
        nargs="+",
        default=["ops", "sweep"],
        choices=[
            "ops",
            "gemm",
            "pad",
            "producers",
            "quant",
            "sweep",
            "torchao",
            "fidelity",
            "models",
            "policy",
            "train",
        ],
    )
    ap.add_argument("--family", nargs="+", default=list(SHAPES))
    ap.add_argument("--backend", default="torch", help="attention backend of the model parts (default: torch's varlen)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--variants", nargs="+", choices=list(MODEL_VARIANTS), help="models part: these only")
    ap.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    ap.add_argument("--recipes", nargs="+", default=["bf16", "fp8"], choices=list(TRAIN_RECIPES))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="train part: one bf16 and one FP8 run per seed")
    ap.add_argument("--out", default=None, help="append the rows as JSON lines here")
    args = ap.parse_args()
    for part in args.part:
        t0 = time.perf_counter()
        if part == "ops":
            part_ops()
        elif part == "gemm":
            part_gemm()
        elif part == "pad":
            part_pad()
        elif part == "quant":
            part_quant()
        elif part == "producers":
            part_producers()
        elif part == "sweep":
            part_sweep()
        elif part == "torchao":
            part_torchao()
        elif part == "fidelity":
            part_fidelity(args.family, args.backend)
        elif part == "models":
            part_models(args.family, args.backend, args.variants, tuple(args.modes))
        elif part == "policy":
            part_policy(args.family, args.backend)
        elif part == "train":
            part_train(args.family, args.backend, args.steps, seeds=args.seeds, recipes=args.recipes)
        print(f"# part {part}: {time.perf_counter() - t0:.1f} s", flush=True)
    summary()
    if args.out:
        with open(args.out, "a") as f:
            for r in OUT:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
