"""Triton kernels of ``packvit.fp8``: per-row and per-column e4m3 quantisation (CUDA, bf16/fp32 in).

Each computes the same as its ``*_reference`` in ``fp8.py``: amax of the row (column) in fp32,
qscale = 448 / max(amax, 1e-12), q = e4m3(clamp(x * qscale)), and the dequantisation scale 1 / qscale.
In torch ops the row-wise one is four passes over x (abs, amax, multiply, cast); here it is one read
and one write of a byte per element. Triton's fp32 division is not the correctly rounded one torch
uses, so a few elements may land one e4m3 step apart from the reference (the GPU tests bound how many).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

E4M3_MAX = 448.0
EPS = 1e-12


@triton.jit
def _rows_kernel(
    X,
    Q,
    S,
    AMAX,
    SUMS,
    M,
    K,
    blocks_per_prog,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FMAX: tl.constexpr,
    EPS: tl.constexpr,
    COL_AMAX: tl.constexpr,
    COL_SUM: tl.constexpr,
):
    # Each program takes ``blocks_per_prog`` consecutive blocks of BLOCK_M whole rows: row amax, scale
    # and cast from registers. COL_AMAX / COL_SUM: the same read also gathers the columns' |x| maxima
    # and fp32 sums, written as row ``pid`` of AMAX and SUMS (programs, K) and reduced by the caller
    # in a fixed order, so the result is deterministic. (An atomic max per column per program timed
    # about the same on the H200; the loop over row blocks is what makes this pass 2x a plain row
    # pass: 0.15-0.18 ms against 0.06-0.10 at 23k tokens.)
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_K)
    cmask = cols < K
    camax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    csum = tl.zeros((BLOCK_K,), dtype=tl.float32)
    first = pid * blocks_per_prog
    for blk in range(first, first + blocks_per_prog):
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & cmask[None, :]
        off = rows.to(tl.int64)[:, None] * K + cols[None, :]
        x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
        ax = tl.abs(x)
        amax = tl.max(ax, axis=1)  # (BLOCK_M,)
        qscale = FMAX / tl.maximum(amax, EPS)
        q = tl.clamp(x * qscale[:, None], -FMAX, FMAX)
        tl.store(Q + off, q.to(Q.dtype.element_ty), mask=mask)
        tl.store(S + rows, 1.0 / qscale, mask=rows < M)
        if COL_AMAX:
            camax = tl.maximum(camax, tl.max(ax, axis=0))
        if COL_SUM:
            csum += tl.sum(x, axis=0)
    if COL_AMAX:
        tl.store(AMAX + pid * K + cols, camax, mask=cmask)
    if COL_SUM:
        tl.store(SUMS + pid * K + cols, csum, mask=cmask)


def _row_tiles(K: int) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_M): a whole row, and as many rows as make 16k elements (64 at most)."""
    block_k = triton.next_power_of_2(K)
    return block_k, max(1, min(64, 16384 // block_k))


# Programs of the column-statistics variant per SM: each loops over its share of the row blocks and
# writes one (K,) partial amax and sum. On the H200 fewer were faster: 1 per SM 6-10% ahead of 2, 8
# slowest (benchmarks/fp8_ab.py --part quant, 2026-12-03); the model timings of that run used 2.
COL_STATS_PROGRAMS_PER_SM = 2


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) contiguous -> e4m3 (M, K), fp32 dequantisation scales (M, 1)."""
    x = x.contiguous()
    M, K = x.shape
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(M, 1, dtype=torch.float32, device=x.device)
    if M == 0:
        return q, s
    block_k, block_m = _row_tiles(K)
    _rows_kernel[(triton.cdiv(M, block_m),)](
        x, q, s, s, s, M, K, 1,
        BLOCK_M=block_m, BLOCK_K=block_k, FMAX=E4M3_MAX, EPS=EPS, COL_AMAX=False, COL_SUM=False, num_warps=8,
    )  # fmt: skip
    return q, s


# From this width on the column statistics come from the row pass itself (one read of x); below it
# from separate passes (the plain row pass, ``col_amax`` and torch's column sum), which measured
# faster there: H200, 23k tokens, x 1024 wide 0.07 ms separate against 0.15 fused; dy 4304 / 5632
# wide 0.25 / 0.29 ms separate against 0.18 / 0.20 fused (benchmarks/fp8_ab.py --part quant).
COL_STATS_FUSED_MIN_K = 2048


def quantize_rows_col_stats(
    x: torch.Tensor, col_sum: bool, amax: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``quantize_rows`` of (M, K) x plus, with ``amax``, its columns' amax (K,) fp32 and, with
    ``col_sum``, their sums (K,) fp32: what the weight gradient's column-wise quantisation
    (``cast_cols_t``) and the bias gradient need (None where not asked for). From
    ``COL_STATS_FUSED_MIN_K`` columns on, in the same read as the rows."""
    x = x.contiguous()
    M, K = x.shape
    if K < COL_STATS_FUSED_MIN_K or not (amax or col_sum):
        q, s = quantize_rows(x)
        return q, s, (col_amax(x) if amax else None), (x.sum(0, dtype=torch.float32) if col_sum else None)
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(M, 1, dtype=torch.float32, device=x.device)
    if M == 0:
        zeros = torch.zeros(K, dtype=torch.float32, device=x.device)
        return q, s, (zeros if amax else None), (zeros.clone() if col_sum else None)
    block_k, block_m = _row_tiles(K)
    blocks = triton.cdiv(M, block_m)
    sms = _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device()) if x.is_cuda else 1
    per = triton.cdiv(blocks, max(1, min(blocks, COL_STATS_PROGRAMS_PER_SM * sms)))
    progs = triton.cdiv(blocks, per)
    amaxes = torch.empty(progs, K, dtype=torch.float32, device=x.device) if amax else s
    sums = torch.empty(progs, K, dtype=torch.float32, device=x.device) if col_sum else s
    _rows_kernel[(progs,)](
        x, q, s, amaxes, sums, M, K, per,
        BLOCK_M=block_m, BLOCK_K=block_k, FMAX=E4M3_MAX, EPS=EPS, COL_AMAX=amax, COL_SUM=col_sum, num_warps=8,
    )  # fmt: skip
    return q, s, (amaxes.amax(0) if amax else None), (sums.sum(0) if col_sum else None)


@triton.jit
def _cols_amax_kernel(X, AMAX, M, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    # A (BLOCK_M, BLOCK_C) tile's column maxima, folded into the (C,) amax with one atomic each.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < M)[:, None] & (cols < C)[None, :]
    x = tl.load(X + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.atomic_max(AMAX + cols, tl.max(tl.abs(x), axis=0), mask=cols < C)


@triton.jit
def _cols_cast_t_kernel(
    X, AMAX, QT, S, M, Mp, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, FMAX: tl.constexpr, EPS: tl.constexpr
):
    # Cast a tile with its columns' scales and store it transposed into QT (C, Mp); rows M..Mp are zeros.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    x = tl.load(
        X + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=(rows < M)[:, None] & cmask[None, :], other=0.0
    ).to(tl.float32)
    qscale = FMAX / tl.maximum(tl.load(AMAX + cols, mask=cmask, other=1.0), EPS)  # (BLOCK_C,)
    q = tl.clamp(x * qscale[None, :], -FMAX, FMAX).to(QT.dtype.element_ty)  # (BLOCK_M, BLOCK_C)
    qt = tl.trans(q)  # (BLOCK_C, BLOCK_M)
    tl.store(QT + cols.to(tl.int64)[:, None] * Mp + rows[None, :], qt, mask=cmask[:, None] & (rows < Mp)[None, :])
    if tl.program_id(0) == 0:
        tl.store(S + cols, 1.0 / qscale, mask=cmask)


def cast_cols_t(x: torch.Tensor, amax: torch.Tensor, pad_to: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, C) x and its columns' amax (C,) -> e4m3 x.T (C, Mp) with Mp = M rounded up to ``pad_to``
    (zero columns), scales (C, 1): one read of x."""
    x = x.contiguous()
    M, C = x.shape
    Mp = -(-M // pad_to) * pad_to
    qt = torch.empty(C, Mp, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(C, 1, dtype=torch.float32, device=x.device)
    bm, bc = 64, 64
    _cols_cast_t_kernel[(max(1, triton.cdiv(Mp, bm)), triton.cdiv(C, bc))](
        x, amax, qt, s, M, Mp, C,
        BLOCK_M=bm, BLOCK_C=bc, FMAX=E4M3_MAX, EPS=EPS, num_warps=4,
    )  # fmt: skip
    return qt, s


def col_amax(x: torch.Tensor) -> torch.Tensor:
    """(M, C) -> the columns' |x| maxima (C,) fp32."""
    x = x.contiguous()
    M, C = x.shape
    amax = torch.zeros(C, dtype=torch.float32, device=x.device)
    bm, bc = 64, 64
    if M:
        _cols_amax_kernel[(triton.cdiv(M, bm), triton.cdiv(C, bc))](x, amax, M, C, BLOCK_M=bm, BLOCK_C=bc, num_warps=4)
    return amax


def quantize_cols_t(x: torch.Tensor, pad_to: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, C) -> e4m3 x.T (C, Mp) with Mp = M rounded up to ``pad_to`` (zero columns), scales (C, 1)."""
    return cast_cols_t(x, col_amax(x), pad_to)
