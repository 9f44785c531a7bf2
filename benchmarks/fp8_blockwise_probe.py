"""Does ``torch._scaled_mm`` run block-scaled e4m3 GEMMs on this GPU, and how fast, for the weight
gradient of packvit's linears?

The weight gradient dW (N, K) = dy.T (N, M) @ x (M, K) reduces over the M tokens. ``packvit.fp8``'s
e4m3 recipe scales dy and x per column over all M tokens: every token's amax is needed before the
first element is cast, so each operand is two passes (column statistics, then the transposed cast).
With one scale per column and per 128 tokens ("1x128" blocks along the reduction, DeepSeek-V3's
recipe; cuBLAS 12.9+ runs it on SM90, pytorch#158037) a tile of 128 tokens holds everything its
scales need, so the transposed cast is one local pass and can live inside the kernel that produces
the tensor. This script answers the two questions that decide whether to build that:

1. which scale layouts ``_scaled_mm`` accepts for (1x128, 1x128) and (1x128, 128x128), and whether
   its result equals the dequantised operands' product (max relative error per layout);
2. the GEMMs' time at mixed32's and mixed64's token counts for every layer shape of the three
   families: bf16 (what runs now), row-wise e4m3 (per-column scales, ``fp8.WGRAD = "fp8"``) and
   block-wise e4m3; and the forward's shape (x 1x128, W 128x128) against row-wise, for reference.

    python benchmarks/fp8_blockwise_probe.py [--ms 23103 46206] [--out rows.jsonl]

Results (H200, torch 2.11 + CUDA 13.0, 2026-12-03, RESULTS.md "session 12"): both recipes run with
``scale_a`` outer-dim-major (column-major) and give the dequantised product (max relative error
2e-4); SigLIP2's qkv weight gradient took 0.186 ms block-wise against 0.136 row-wise and 0.235 bf16
at 23k tokens, 0.430 / 0.265 / 0.467 at 46k.
"""

from __future__ import annotations

import argparse
import json

import torch
from fp8_ab import SHAPES, timed  # the layer shapes, and fp8_ab.py's timing of its GEMMs (median of 5 x 10 calls)

DEV = torch.device("cuda")
BF16 = torch.bfloat16
E4M3 = torch.float8_e4m3fn
FMAX = 448.0


def emit(row: dict, out: str | None) -> None:
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as fh:
            fh.write(json.dumps(row) + "\n")


def quant_1x128(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, C) -> e4m3 (R, C) and fp32 scales (R, ceil(C/128)): one scale per row and 128 columns."""
    R, C = t.shape
    Cp = -(-C // 128) * 128
    tp = torch.nn.functional.pad(t.float(), (0, Cp - C)).view(R, Cp // 128, 128)
    s = tp.abs().amax(-1).clamp(min=1e-12) / FMAX  # (R, Cb) dequantisation scales
    q = (tp / s[..., None]).clamp(-FMAX, FMAX).view(R, Cp)[:, :C].to(E4M3)
    return q.contiguous(), s


def quant_128x128(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, C) -> e4m3 (R, C) and fp32 scales (ceil(R/128), ceil(C/128)): one per 128 x 128 block."""
    R, C = t.shape
    Rp, Cp = -(-R // 128) * 128, -(-C // 128) * 128
    tp = torch.nn.functional.pad(t.float(), (0, Cp - C, 0, Rp - R)).view(Rp // 128, 128, Cp // 128, 128)
    s = tp.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FMAX  # (Rb, Cb)
    q = (tp / s[:, None, :, None]).clamp(-FMAX, FMAX).view(Rp, Cp)[:R, :C].to(E4M3)
    return q.contiguous(), s


def dequant(q: torch.Tensor, s: torch.Tensor, br: int, bc: int) -> torch.Tensor:
    """e4m3 (R, C) times its scales, each covering a (br, bc) block."""
    R, C = q.shape
    full = s.repeat_interleave(br, 0)[:R].repeat_interleave(bc, 1)[:, :C]
    return q.float() * full


def layouts(s: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same scales row-major and column-major (cuBLAS's 1x128 scales are documented outer-dim-major)."""
    return {"rowmajor": s.contiguous(), "colmajor": s.t().contiguous().t()}


def check_layouts(out: str | None) -> dict:
    """Which scale layouts each block recipe accepts, and the result's error against dequantised
    operands; returns {recipe: first layout pair that worked}."""
    M, N, K = 1024, 384, 512  # a (M, K) 1x128 along K; b (K, N) column-major
    g = torch.Generator(device=DEV).manual_seed(0)
    a = torch.randn(M, K, device=DEV, generator=g) * torch.rand(M, 1, device=DEV, generator=g) * 4
    b = torch.randn(N, K, device=DEV, generator=g) * 0.05
    aq, sa = quant_1x128(a)  # (M, K), (M, K/128)
    recipes = {"1x128_1x128": quant_1x128(b), "1x128_128x128": quant_128x128(b)}
    found = {}
    for name, (bq, sb) in recipes.items():
        blk_b = (1, 128) if name == "1x128_1x128" else (128, 128)
        ref = dequant(aq, sa, 1, 128) @ dequant(bq, sb, *blk_b).t()  # (M, N) fp32
        sb_t = sb.t()  # scales of b as the (K, N) operand: (K/128, N) or (K/128, N/128)
        for la, sa_l in layouts(sa).items():
            for lb, sb_l in layouts(sb_t).items():
                row = {"part": "layout", "recipe": name, "scale_a": la, "scale_b": lb}
                try:
                    y = torch._scaled_mm(aq, bq.t(), scale_a=sa_l, scale_b=sb_l, out_dtype=torch.float32)
                    torch.cuda.synchronize()
                    row["max_rel_err"] = float((y - ref).abs().max() / ref.abs().max())
                    row["ok"] = row["max_rel_err"] < 1e-3
                    if row["ok"]:
                        found.setdefault(name, (la, lb))
                except Exception as e:  # noqa: BLE001 -- a probe: report what the GPU refuses
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                emit(row, out)
    return found


def wgrad_row(fam: str, kind: str, K: int, N: int, M: int, found: dict) -> dict:
    """dW = dy.T @ x at one shape: bf16, row-wise e4m3 and block-wise e4m3 (ms)."""
    Mp = -(-M // 128) * 128
    x = torch.randn(M, K, device=DEV, dtype=BF16)
    dy = torch.randn(M, N, device=DEV, dtype=BF16) * 1e-3
    row = {"part": "wgrad", "family": fam, "layer": kind, "M": M, "N": N, "K": K}
    row["bf16_ms"] = timed(lambda: dy.t() @ x)
    # row-wise: per column over all tokens (what fp8.WGRAD = "fp8" runs)
    dyt = torch.nn.functional.pad(dy, (0, 0, 0, Mp - M)).t().contiguous()  # (N, Mp)
    xt = torch.nn.functional.pad(x, (0, 0, 0, Mp - M)).t().contiguous()  # (K, Mp)
    sdy = dyt.float().abs().amax(1, keepdim=True).clamp(min=1e-12) / FMAX
    sx = xt.float().abs().amax(1, keepdim=True).clamp(min=1e-12) / FMAX
    dytq, xtq = (dyt / sdy).to(E4M3), (xt / sx).to(E4M3)
    row["rowwise_ms"] = timed(
        lambda: torch._scaled_mm(dytq, xtq.t(), scale_a=sdy, scale_b=sx.view(1, -1), out_dtype=BF16)
    )
    # block-wise: 1x128 along the tokens for both operands
    if "1x128_1x128" in found:
        la, lb = found["1x128_1x128"]
        bq_dy, bs_dy = quant_1x128(dyt)  # (N, Mp), (N, Mp/128)
        bq_x, bs_x = quant_1x128(xt)  # (K, Mp), (K, Mp/128)
        sa, sb = layouts(bs_dy)[la], layouts(bs_x.t())[lb]
        y = torch._scaled_mm(bq_dy, bq_x.t(), scale_a=sa, scale_b=sb, out_dtype=torch.float32)
        ref = dy.float().t() @ x.float()
        row["blockwise_rel_err"] = float((y - ref).norm() / ref.norm())
        yr = torch._scaled_mm(dytq, xtq.t(), scale_a=sdy, scale_b=sx.view(1, -1), out_dtype=torch.float32)
        row["rowwise_rel_err"] = float((yr - ref).norm() / ref.norm())
        row["blockwise_ms"] = timed(lambda: torch._scaled_mm(bq_dy, bq_x.t(), scale_a=sa, scale_b=sb, out_dtype=BF16))
    row.update({k: round(v, 4) for k, v in row.items() if k.endswith("_ms")})
    return row


def forward_row(fam: str, kind: str, K: int, N: int, M: int, found: dict) -> dict:
    """y = x @ W.T at one shape: row-wise e4m3 (fast accumulation, as packvit runs it) against
    block-wise (x 1x128 along K, W 128x128) (ms)."""
    la, lb = found["1x128_128x128"]
    x = torch.randn(M, K, device=DEV, dtype=BF16)
    w = torch.randn(N, K, device=DEV, dtype=BF16) * 0.02
    xq, xs = quant_1x128(x)
    wq, ws = quant_128x128(w)
    sa, sb = layouts(xs)[la], layouts(ws.t())[lb]
    sxr = x.float().abs().amax(1, keepdim=True).clamp(min=1e-12) / FMAX
    swr = w.float().abs().amax(1, keepdim=True).clamp(min=1e-12) / FMAX
    xqr, wqr = (x / sxr).to(E4M3), (w / swr).to(E4M3)
    row = {"part": "forward", "family": fam, "layer": kind, "M": M, "N": N, "K": K}
    row["rowwise_fast_ms"] = timed(
        lambda: torch._scaled_mm(
            xqr, wqr.t(), scale_a=sxr, scale_b=swr.view(1, -1), out_dtype=BF16, use_fast_accum=True
        )
    )
    row["blockwise_ms"] = timed(lambda: torch._scaled_mm(xq, wq.t(), scale_a=sa, scale_b=sb, out_dtype=BF16))
    row.update({k: round(v, 4) for k, v in row.items() if k.endswith("_ms")})
    return row


def _row_or_error(fn, *args) -> dict:
    """The row ``fn`` measures, or what the GPU refused (cuBLASLt declines some block-scaled shapes:
    the forward's (1x128, 128x128) at 23k x 1152 x 3456 with bf16 output, H200, 2026-12-03)."""
    try:
        return fn(*args)
    except RuntimeError as e:
        fam, kind, K, N, M = args[:5]
        part = "wgrad" if fn is wgrad_row else "forward"
        return {
            "part": part,
            "family": fam,
            "layer": kind,
            "M": M,
            "N": N,
            "K": K,
            "error": str(e).splitlines()[0][:300],
        }


def time_shapes(ms, found: dict, out: str | None) -> None:
    for fam, layers in SHAPES.items():
        for kind, (K, N) in layers.items():
            for M in ms:
                emit(_row_or_error(wgrad_row, fam, kind, K, N, M, found), out)
            if "1x128_128x128" in found:
                emit(_row_or_error(forward_row, fam, kind, K, N, ms[0], found), out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", type=int, nargs="+", default=[23103, 46206])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    emit(
        {
            "part": "env",
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name(),
        },
        a.out,
    )
    found = check_layouts(a.out)
    emit({"part": "found", **{k: list(v) for k, v in found.items()}}, a.out)
    time_shapes(a.ms, found, a.out)


if __name__ == "__main__":
    main()
