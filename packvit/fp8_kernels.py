"""Triton kernels of ``packvit.fp8``: per-row and per-column e4m3 quantisation (CUDA, bf16/fp32 in).

Each computes the same as its ``*_reference`` in ``fp8.py``: amax of the row (column) in fp32,
qscale = 448 / max(amax, 1e-12), q = e4m3(clamp(x * qscale)), and the dequantisation scale 1 / qscale.
In torch ops the row-wise one is four passes over x (abs, amax, multiply, cast); here it is one read
and one write of a byte per element. Triton's fp32 division is not the correctly rounded one torch
uses, so a few elements may land one e4m3 step apart from the reference (the GPU tests bound how many).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

E4M3_MAX = 448.0
EPS = 1e-12


@triton.jit
def _rows_kernel(X, Q, S, M, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, FMAX: tl.constexpr, EPS: tl.constexpr):
    # BLOCK_M whole rows per program: amax, scale and cast from registers.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    off = rows.to(tl.int64)[:, None] * K + cols[None, :]
    x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)  # (BLOCK_M,)
    qscale = FMAX / tl.maximum(amax, EPS)
    q = tl.clamp(x * qscale[:, None], -FMAX, FMAX)
    tl.store(Q + off, q.to(Q.dtype.element_ty), mask=mask)
    tl.store(S + rows, 1.0 / qscale, mask=rows < M)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) contiguous -> e4m3 (M, K), fp32 dequantisation scales (M, 1)."""
    x = x.contiguous()
    M, K = x.shape
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(M, 1, dtype=torch.float32, device=x.device)
    if M == 0:
        return q, s
    block_k = triton.next_power_of_2(K)
    block_m = max(1, min(64, 16384 // block_k))
    _rows_kernel[(triton.cdiv(M, block_m),)](
        x,
        q,
        s,
        M,
        K,
        BLOCK_M=block_m,
        BLOCK_K=block_k,
        FMAX=E4M3_MAX,
        EPS=EPS,
        num_warps=8,
    )
    return q, s


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


def quantize_cols_t(x: torch.Tensor, pad_to: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, C) -> e4m3 x.T (C, Mp) with Mp = M rounded up to ``pad_to`` (zero columns), scales (C, 1)."""
    x = x.contiguous()
    M, C = x.shape
    Mp = -(-M // pad_to) * pad_to
    qt = torch.empty(C, Mp, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(C, 1, dtype=torch.float32, device=x.device)
    amax = torch.zeros(C, dtype=torch.float32, device=x.device)
    bm, bc = 64, 64
    if M:
        _cols_amax_kernel[(triton.cdiv(M, bm), triton.cdiv(C, bc))](x, amax, M, C, BLOCK_M=bm, BLOCK_C=bc, num_warps=4)
    _cols_cast_t_kernel[(max(1, triton.cdiv(Mp, bm)), triton.cdiv(C, bc))](
        x,
        amax,
        qt,
        s,
        M,
        Mp,
        C,
        BLOCK_M=bm,
        BLOCK_C=bc,
        FMAX=E4M3_MAX,
        EPS=EPS,
        num_warps=4,
    )
    return qt, s
