"""packvit's own Triton kernels for the elementwise work between a block's matmuls (CUDA, fp16/bf16):
residual add + norm, SwiGLU, and RoPE on q and k (why not a library's RoPE: at its section).

Written here, not taken from a kept library, because none fits (checked 2026-12-03):
  * residual add + LayerNorm, with DINOv3's LayerScale folded in, forward and backward: Liger-Kernel's
    ``layer_norm`` has no residual input; quack-kernels' residual path is its RMSNorm, and quack only
    reaches the GPU machine inside the 70 MB fa4 bundle (its ``gemm_act`` also fails there with the
    bundle's nvidia-cutlass-dsl 4.8.1). The same kernel does AIMv2's add + RMSNorm, which
    Liger-Kernel has (``fused_add_rms_norm``, kept as the alternative in ``fused_ops``), because
    Liger's backward measured slower on the H200 (kernel time, 23k x 1024, forward + backward:
    add + RMSNorm 0.271 ms Liger, 0.118 packvit; RMSNorm 0.193 against 0.082; the forwards tie).
  * SwiGLU over the fused ``[gate; up]`` fc1 output: Liger's ``swiglu`` takes gate and up as two
    tensors sharing one row stride, so the (T, 2H) output would first be copied into two (T, H)
    halves (two more passes over the largest activation), and its backward writes in place into
    its inputs. This kernel reads the halves by stride and writes the (T, 2H) gradient that fc1's
    backward takes as it is.

Notation: T packed tokens (rows), D model width, H the MLP's hidden width. Every kernel computes in
fp32 and rounds once per stored tensor. They also run on the CPU under Triton's interpreter
(``TRITON_INTERPRET=1``), which is how CI checks them.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# --- e4m3 rows for an FP8 linear's input (inference) --------------------------------------------------
#
# The fp8 variants of the norm and SwiGLU forwards end with this instead of storing the bf16 output:
# the same per-row quantisation as ``packvit.fp8_kernels.quantize_rows`` (same expressions, so the
# same bits on the GPU) applied to the output rounded to the storage dtype, i.e. to exactly what the
# unfused path would store and then quantise. ``packvit.fp8`` explains the convention.

E4M3_MAX = tl.constexpr(448.0)  # packvit.fp8.E4M3_MAX
FP8_EPS = tl.constexpr(1e-12)  # packvit.fp8.EPS


@triton.jit
def _store_e4m3_rows(y, Q, QS, off, rows, live, mask, FMAX: tl.constexpr, EPS: tl.constexpr):
    # y (BLOCK_M, BLOCK_N) fp32 holding storage-dtype values, whole rows -> q (e4m3) and one
    # dequantisation scale per row (scale = max(amax, EPS) / 448, stored as 1 / (448 / max(...))).
    amax = tl.max(tl.abs(y), axis=1)  # (BLOCK_M,); y is 0 where masked (see the callers)
    qscale = FMAX / tl.maximum(amax, EPS)
    # No clamp to +-448 before the cast, unlike ``fp8_kernels.quantize_rows``: the GPU's cast
    # (cvt.rn.satfinite.e4m3x2.f32) saturates to +-448 itself, so the codes are the same, and these
    # kernels are bound by instruction issue, not memory (RESULTS.md, "FP8 producer kernels").
    tl.store(Q + off, (y * qscale[:, None]).to(Q.dtype.element_ty), mask=mask)
    tl.store(QS + rows, 1.0 / qscale, mask=live)


# --- e4m3 rows of a whole row, in two tiles -------------------------------------------------------------
#
# The row amax needs the whole row in registers, and a Triton tile is a power of two wide: one tile of
# next_power_of_2(H) lanes wastes nearly half of them at H = 4304 (SigLIP2's GELU, 8192 lanes), 44% at
# 1152 (SigLIP2's norms) and 31% at 2816 (AIMv2's SwiGLU), lanes that still compute and hold registers.
# So a row is two tiles, BLOCK_A = the largest power of two <= H and BLOCK_B = next_power_of_2(H -
# BLOCK_A) (0 when H is a power of two): 4096 + 256 lanes for 4304. The amax is the max of the two
# tiles' (exact), so the bits are those of one tile. ``_row_split`` picks the tiles. On the H200 the
# split and the faster GELU below took SigLIP2's GELU kernel from 0.206 to 0.096 ms at 23k tokens
# (RESULTS.md, "FP8 producer kernels").


def _row_split(n: int) -> tuple[int, int]:
    a = 1 << (n.bit_length() - 1)
    return a, (triton.next_power_of_2(n - a) if n > a else 0)


@triton.jit
def _store_e4m3_two(oa, ob, Q, QS, r64, ca, cb, ma, mb, rows, live, N, BLOCK_B: tl.constexpr):
    # ``_store_e4m3_rows`` for a row held as two tiles (ob unused when BLOCK_B is 0), into Q of row
    # stride N, where ma / mb are true.
    # oa, ob are 0 where masked (the activations map a masked load's 0 to 0). No clamp: as in
    # ``_store_e4m3_rows``, the cast saturates.
    amax = tl.max(tl.abs(oa), axis=1)
    if BLOCK_B > 0:
        amax = tl.maximum(amax, tl.max(tl.abs(ob), axis=1))
    qscale = E4M3_MAX / tl.maximum(amax, FP8_EPS)
    tl.store(Q + r64 * N + ca[None, :], (oa * qscale[:, None]).to(Q.dtype.element_ty), mask=ma)
    if BLOCK_B > 0:
        tl.store(Q + r64 * N + cb[None, :], (ob * qscale[:, None]).to(Q.dtype.element_ty), mask=mb)
    tl.store(QS + rows, 1.0 / qscale, mask=live)


# --- residual add + norm (+ LayerScale) --------------------------------------------------------------
#
# One kernel for LayerNorm and for AIMv2's RMSNorm (IS_RMS), with or without the residual add
# (HAS_RES) and DINOv3's LayerScale on the branch (HAS_GAMMA). A program takes BLOCK_M rows as one
# (BLOCK_M, BLOCK_N) tile; see ``_TILE_ELEMS`` for the shape chosen.


@triton.jit
def _residual_tile(X, A, G, S, r64, cols, mask, N, HAS_RES: tl.constexpr, HAS_GAMMA: tl.constexpr):
    # s = x + gamma * a for one tile of the rows, stored, in fp32 as stored: the residual is
    # normalised as stored, as the unfused path does. 0 where masked.
    off = r64 * N + cols[None, :]
    s = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        a = tl.load(A + off, mask=mask, other=0.0).to(tl.float32)
        if HAS_GAMMA:
            a = a * tl.load(G + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        s_lo = (s + a).to(S.dtype.element_ty)
        tl.store(S + off, s_lo, mask=mask)
        s = s_lo.to(tl.float32)
    return s


@triton.jit
def _norm_fwd_kernel(
    X,
    A,
    G,
    W,
    B,
    S,
    Y,
    MEAN,
    RSTD,
    Q,
    QS,
    M,
    N,
    eps,
    HAS_RES: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IS_RMS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FP8_OUT: tl.constexpr = False,
):
    # s = x + gamma * a (stored), then y = LayerNorm(s) or RMSNorm(s). FP8_OUT: y goes out as e4m3
    # rows with their scales (Q, QS) instead of into Y (inference; mean and rstd are not stored).
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    live = rows < M
    mask = live[:, None] & (cols < N)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    off = r64 * N + cols[None, :]
    s = _residual_tile(X, A, G, S, r64, cols, mask, N, HAS_RES, HAS_GAMMA)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if IS_RMS:
        rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=1) / N + eps)
        # AIMv2's order: normalise in fp32, round to the storage dtype, then scale.
        y = (s * rstd[:, None]).to(Y.dtype.element_ty).to(tl.float32) * w
    else:
        mean = tl.sum(s, axis=1) / N
        d = tl.where(mask, s - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / N + eps)
        y = d * rstd[:, None] * w
        if not FP8_OUT:
            tl.store(MEAN + rows, mean, mask=live)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if FP8_OUT:  # y is 0 in masked lanes: s (or d) and w, b load 0 there
        y = y.to(Y.dtype.element_ty).to(tl.float32)  # what the unfused path stores, then quantises
        _store_e4m3_rows(y, Q, QS, off, rows, live, mask, E4M3_MAX, FP8_EPS)
    else:
        tl.store(Y + off, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + rows, rstd, mask=live)


@triton.jit
def _norm_bwd_kernel(
    DY,
    DS,
    S,
    A,
    G,
    W,
    MEAN,
    RSTD,
    DX,
    DA,
    DW_P,
    DB_P,
    DG_P,
    M,
    N,
    HAS_DS: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IS_RMS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TILES: tl.constexpr,
):
    # LayerNorm: ds = rstd * (w*dy - mean(w*dy) - xhat * mean(w*dy*xhat)); RMSNorm drops the
    # mean(w*dy) term. Then ds += ds_out (the residual's own gradient), dx = ds, da = gamma * ds.
    # The program's TILES * BLOCK_M rows sum their parameter gradients into one fp32 row of partials.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_GAMMA:
        g = tl.load(G + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dg = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for t in range(0, TILES):  # a constexpr trip count: a run-time one does not run under the interpreter
        rows = (pid * TILES + t) * BLOCK_M + tl.arange(0, BLOCK_M)
        live = rows < M
        mask = live[:, None] & cmask[None, :]
        off = rows.to(tl.int64)[:, None] * N + cols[None, :]
        dy = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(S + off, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=live, other=0.0)[:, None]
        wdy = w * dy
        if IS_RMS:
            xhat = s * rstd
            ds = (wdy - xhat * (tl.sum(xhat * wdy, axis=1) / N)[:, None]) * rstd
            # The forward scales the rounded normalised value: so does the weight's gradient.
            dw += tl.sum(dy * xhat.to(DX.dtype.element_ty).to(tl.float32), axis=0)
        else:
            mean = tl.load(MEAN + rows, mask=live, other=0.0)[:, None]
            xhat = tl.where(mask, (s - mean) * rstd, 0.0)
            c1 = tl.sum(xhat * wdy, axis=1) / N
            c2 = tl.sum(wdy, axis=1) / N
            ds = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd
            dw += tl.sum(dy * xhat, axis=0)
        if HAS_DS:
            ds = ds + tl.load(DS + off, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + off, ds.to(DX.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            db += tl.sum(dy, axis=0)
        if HAS_GAMMA:
            a = tl.load(A + off, mask=mask, other=0.0).to(tl.float32)
            tl.store(DA + off, (ds * g).to(DA.dtype.element_ty), mask=mask)
            dg += tl.sum(ds * a, axis=0)
    tl.store(DW_P + pid * N + cols, dw, mask=cmask)
    if HAS_BIAS:
        tl.store(DB_P + pid * N + cols, db, mask=cmask)
    if HAS_GAMMA:
        tl.store(DG_P + pid * N + cols, dg, mask=cmask)


# Tiles of one row (BLOCK_N = next power of two of D) with 4 warps. Kernel time on the H200 at
# 23,103 rows (benchmarks/fused_ab.py --part sweep): the forward is at the bytes' time for every
# tile tried (add + LayerNorm D 1152: 0.054 ms); the backward is fastest with one-row tiles: forward +
# The fp8 norm at a width that is not a power of two (SigLIP2's 1152): ``_norm_fwd_kernel`` holds a row
# as one 2048-lane tile, 44% of it masked, a program a row, and its FP8_OUT variant ran at 0.076 ms a
# call at 23k tokens against the bf16 variant's 0.056 (H200 profile, RESULTS.md "session 9"): bound by
# instruction issue, 1,888 warp-instructions a row in its sm_90 code (ptxas) against the bf16 one's
# 1,408. This kernel holds a row as two tiles (1024 + 128 lanes, none masked) and takes
# ``_NORM_FP8_TWO_TILES_ROWS`` rows a program, which shares each reduction's fixed cost (shuffles,
# shared memory, barriers) among them: 896 warp-instructions a row at 4 rows and 4 warps. Its sums are the two tiles' sums added, another order than the one-tile
# kernel's, so a rare y rounds to the neighbouring bf16 value (the kernel tests bound how often); the
# power-of-two widths (DINOv3, AIMv2) keep the one-tile kernel and its bits.


@triton.jit
def _norm_y(s, W, B, cols, N, mean, rstd, HAS_BIAS: tl.constexpr, IS_RMS: tl.constexpr, OUT_TY):
    # y of one tile (``_norm_fwd_kernel``'s expressions), rounded to the storage dtype, in fp32;
    # 0 where masked (s, w and b are 0 there).
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if IS_RMS:
        y = (s * rstd[:, None]).to(OUT_TY).to(tl.float32) * w
    else:
        y = (s - mean[:, None]) * rstd[:, None] * w
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    return y.to(OUT_TY).to(tl.float32)


@triton.jit
def _norm_fwd_fp8_two_tiles_kernel(
    X,
    A,
    G,
    W,
    B,
    S,
    Y,
    Q,
    QS,
    M,
    N,
    eps,
    HAS_RES: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IS_RMS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    # ``_norm_fwd_kernel`` with FP8_OUT for a width N that is not a power of two: a row as two tiles
    # (``_row_split``), the sums as the two tiles' sums added. Y: only its dtype is used.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    live = rows < M
    r64 = rows.to(tl.int64)[:, None]
    ca = tl.arange(0, BLOCK_A)
    cb = BLOCK_A + tl.arange(0, BLOCK_B)
    ma = live[:, None] & (ca < N)[None, :]
    mb = live[:, None] & (cb < N)[None, :]
    sa = _residual_tile(X, A, G, S, r64, ca, ma, N, HAS_RES, HAS_GAMMA)
    sb = _residual_tile(X, A, G, S, r64, cb, mb, N, HAS_RES, HAS_GAMMA)
    if IS_RMS:
        rstd = 1.0 / tl.sqrt((tl.sum(sa * sa, axis=1) + tl.sum(sb * sb, axis=1)) / N + eps)
        mean = rstd  # unused
    else:
        mean = (tl.sum(sa, axis=1) + tl.sum(sb, axis=1)) / N
        da = tl.where(ma, sa - mean[:, None], 0.0)
        db = tl.where(mb, sb - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt((tl.sum(da * da, axis=1) + tl.sum(db * db, axis=1)) / N + eps)
    ya = _norm_y(sa, W, B, ca, N, mean, rstd, HAS_BIAS, IS_RMS, Y.dtype.element_ty)
    yb = _norm_y(sb, W, B, cb, N, mean, rstd, HAS_BIAS, IS_RMS, Y.dtype.element_ty)
    _store_e4m3_two(ya, yb, Q, QS, r64, ca, cb, ma, mb, rows, live, N, BLOCK_B)


# backward 0.183 / 0.194 / 0.118 ms (add + LayerNorm D 1152, + LayerScale D 1024, add + RMSNorm D
# 1024) against 0.207 / 0.342 / 0.164 with 4096-element tiles and 8 warps. The backward program takes
# 8 tiles and writes one row of fp32 partials per 8 rows: (T / 8, D), summed after.
_TILE_ELEMS, _BWD_TILES, _NORM_WARPS = 1024, 8, 4
# Rows a program of ``_norm_fwd_fp8_two_tiles_kernel`` (with ``_NORM_WARPS``): H200, 23k x 1152, add +
# LayerNorm, 0.056 ms at 4 rows against 0.072 / 0.062 / 0.061 at 1 / 2 / 8, slower with 8 warps; the
# one-tile fp8 variant 0.073, the bf16 kernel 0.058 (results/fp8-ab-producers-h200-2026-12-03-s10.jsonl).
_NORM_FP8_TWO_TILES_ROWS = 4


def _norm_tile(D: int) -> tuple[int, int]:
    block_n = triton.next_power_of_2(D)
    return max(1, _TILE_ELEMS // block_n), block_n


def norm_fwd(
    x: torch.Tensor,
    a: torch.Tensor | None,
    gamma: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, a (T, D) -> s = x + gamma * a (T, D; x itself when a is None), y = norm(s) (T, D), and
    mean, rstd (T,) fp32 (mean unused for RMSNorm)."""
    x = x.contiguous()
    a = a.contiguous() if a is not None else None
    T = x.shape[0]
    s = torch.empty_like(x) if a is not None else x
    y = torch.empty_like(x)
    mean = x.new_empty(T, dtype=torch.float32)
    rstd = x.new_empty(T, dtype=torch.float32)
    _launch_norm_fwd(x, a, gamma, weight, bias, eps, rms, s, y, mean, rstd, q=y, qs=rstd, fp8=False)
    return s, y, mean, rstd


def norm_fwd_fp8(
    x: torch.Tensor,
    a: torch.Tensor | None,
    gamma: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``norm_fwd`` for inference with y written as an FP8 linear's input: (s (T, D; x itself when
    a is None), q (T, D) e4m3, scale (T, 1) fp32), q * scale ~= y. For a power-of-two D, bit for bit
    what ``fp8_kernels.quantize_rows(norm_fwd(...)[1])`` gives; for other widths the row's sums are
    added in another order (``_norm_fwd_fp8_two_tiles_kernel``), so a rare y is a bf16 step from
    ``norm_fwd``'s and its e4m3 code may be the neighbour."""
    x = x.contiguous()
    a = a.contiguous() if a is not None else None
    T, D = x.shape
    s = torch.empty_like(x) if a is not None else x
    q = torch.empty(T, D, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(T, 1, dtype=torch.float32, device=x.device)
    # Y is not written: its dtype is the one y is rounded to before quantising. MEAN, RSTD: not written.
    _launch_norm_fwd(x, a, gamma, weight, bias, eps, rms, s, x, scale, scale, q=q, qs=scale, fp8=True)
    return s, q, scale


def _launch_norm_fwd(x, a, gamma, weight, bias, eps, rms, s, y, mean, rstd, *, q, qs, fp8: bool) -> None:
    """One launch over x's rows (T, D): ``_norm_fwd_kernel``, or for e4m3 rows of a width that is
    not a power of two ``_norm_fwd_fp8_two_tiles_kernel``. Absent optional inputs are passed as a
    tensor the kernel never reads (its HAS_* flags are off)."""
    T, D = x.shape
    if not T:
        return
    inputs = (
        x,
        a if a is not None else x,
        gamma if gamma is not None else weight,
        weight,
        bias if bias is not None else weight,
    )
    flags = dict(HAS_RES=a is not None, HAS_GAMMA=gamma is not None, HAS_BIAS=bias is not None, IS_RMS=rms)
    if fp8 and D & (D - 1):
        block_a, block_b = _row_split(D)
        bm = _NORM_FP8_TWO_TILES_ROWS
        _norm_fwd_fp8_two_tiles_kernel[(triton.cdiv(T, bm),)](
            *inputs,
            s,
            y,
            q,
            qs,
            T,
            D,
            eps,
            **flags,
            BLOCK_M=bm,
            BLOCK_A=block_a,
            BLOCK_B=block_b,
            num_warps=_NORM_WARPS,
        )
        return
    bm, bn = _norm_tile(D)
    _norm_fwd_kernel[(triton.cdiv(T, bm),)](
        *inputs, s, y, mean, rstd, q, qs, T, D, eps, **flags, BLOCK_M=bm, BLOCK_N=bn, FP8_OUT=fp8, num_warps=_NORM_WARPS
    )


def norm_bwd(
    dy: torch.Tensor,
    ds: torch.Tensor | None,
    s: torch.Tensor,
    a: torch.Tensor | None,
    gamma: torch.Tensor | None,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    has_bias: bool,
    rms: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Gradients of ``norm_fwd``: (dx, da or None, dgamma or None, dweight, dbias or None).

    ``ds`` is the gradient reaching the residual output s from later layers (None: zero). Without
    gamma, da equals dx (the caller reuses it)."""
    dy = dy.contiguous()
    ds = ds.contiguous() if ds is not None else None
    T, D = s.shape
    bm, bn = _norm_tile(D)
    P = max(1, triton.cdiv(T, bm * _BWD_TILES))
    dx = torch.empty_like(s)
    da = torch.empty_like(s) if gamma is not None else None
    part = s.new_zeros((1 + (gamma is not None) + has_bias, P, D), dtype=torch.float32)
    dw_p = part[0]
    dg_p = part[1] if gamma is not None else dw_p
    db_p = part[-1] if has_bias else dw_p
    if T:
        _norm_bwd_kernel[(P,)](
            dy,
            ds if ds is not None else dy,
            s,
            a if a is not None else s,
            gamma if gamma is not None else weight,
            weight,
            mean,
            rstd,
            dx,
            da if da is not None else dx,
            dw_p,
            db_p,
            dg_p,
            T,
            D,
            HAS_DS=ds is not None,
            HAS_GAMMA=gamma is not None,
            HAS_BIAS=has_bias,
            IS_RMS=rms,
            BLOCK_M=bm,
            BLOCK_N=bn,
            TILES=_BWD_TILES,
            num_warps=_NORM_WARPS,
        )
    dw = dw_p.sum(0).to(weight.dtype)
    dg = dg_p.sum(0).to(gamma.dtype) if gamma is not None else None
    db = db_p.sum(0).to(weight.dtype) if has_bias else None
    return dx, da, dg, dw, db


# --- SwiGLU ------------------------------------------------------------------------------------------


@triton.jit
def _swiglu_fwd_kernel(Hx, O, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # h (M, 2N) = [gate | up] -> o (M, N) = silu(gate) * up; silu is rounded to the storage dtype
    # before the product, as the unfused ``F.silu(gate) * up`` does.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    h_off = r64 * (2 * N) + cols[None, :]
    gate = tl.load(Hx + h_off, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(Hx + h_off + N, mask=mask, other=0.0).to(tl.float32)
    act = (gate * tl.sigmoid(gate)).to(O.dtype.element_ty).to(tl.float32)
    tl.store(O + r64 * N + cols[None, :], (act * up).to(O.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DO, Hx, DH, O, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_O: tl.constexpr):
    # dgate = do * up * silu'(gate), dup = do * silu(gate), written as one (M, 2N) gradient; with
    # HAS_O also the forward's output silu(gate) * up, recomputed for fc2's weight gradient.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    h_off = r64 * (2 * N) + cols[None, :]
    do = tl.load(DO + r64 * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(Hx + h_off, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(Hx + h_off + N, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    act = (gate * sig).to(DH.dtype.element_ty).to(tl.float32)
    dgate = do * up * (sig * (1.0 + gate * (1.0 - sig)))
    tl.store(DH + h_off, dgate.to(DH.dtype.element_ty), mask=mask)
    tl.store(DH + h_off + N, (do * act).to(DH.dtype.element_ty), mask=mask)
    if HAS_O:
        tl.store(O + r64 * N + cols[None, :], (act * up).to(O.dtype.element_ty), mask=mask)


_SWIGLU_BLOCK_M, _SWIGLU_BLOCK_N = 8, 256


def _swiglu_grid(M: int, N: int) -> tuple[int, int]:
    return triton.cdiv(M, _SWIGLU_BLOCK_M), triton.cdiv(N, _SWIGLU_BLOCK_N)


def swiglu_fwd(h: torch.Tensor) -> torch.Tensor:
    """h (T, 2H) = fc1 output [gate | up] -> silu(gate) * up (T, H)."""
    h = h.contiguous()
    M, N = h.shape[0], h.shape[1] // 2
    out = h.new_empty(M, N)
    if M:
        _swiglu_fwd_kernel[_swiglu_grid(M, N)](
            h, out, M, N, BLOCK_M=_SWIGLU_BLOCK_M, BLOCK_N=_SWIGLU_BLOCK_N, num_warps=4
        )
    return out


# Warps per program (one row a program from 2048 columns on): 4 measured fastest for all three uses
# (H200, 23k tokens: GELU-tanh 4304 wide 0.096 ms against 0.098 with 8, GELU-erf 4096 0.148 against
# 0.154, SwiGLU 2816 0.088 against 0.104; results/fp8-ab-producers-after-h200-2026-12-03-s9.jsonl;
# with ``_erf`` the GELU-erf 0.112 against 0.118, results/fp8-ab-producers-h200-2026-12-03-s10.jsonl).
_ACT_FP8_WARPS = 4


@triton.jit
def _swiglu_tile(Hx, r64, cols, mask, N):
    # ``_swiglu_fwd_kernel``'s output for one tile of the rows, rounded to h's dtype, in fp32 (0 where
    # masked: silu(0) * 0).
    h_off = r64 * (2 * N) + cols[None, :]
    gate = tl.load(Hx + h_off, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(Hx + h_off + N, mask=mask, other=0.0).to(tl.float32)
    act = (gate * tl.sigmoid(gate)).to(Hx.dtype.element_ty).to(tl.float32)
    return (act * up).to(Hx.dtype.element_ty).to(tl.float32)


# --- GELU as fc2's e4m3 input (FP8 inference) ---------------------------------------------------------
#
# With an FP8 fc1 the GELU MLP loses its fused activation (quack's epilogue, cuBLASLt's GELU epilogue:
# ``_scaled_mm`` has none), so the activation would be a pass of its own over the (T, hidden) output and
# fc2's input quantisation another. This kernel is both in one read: torch's GELU in fp32, rounded to
# h's dtype (what ``F.gelu`` stores), then e4m3 rows. The erf GELU is torch's formula with torch's erff
# bit for bit (``_erf``, below); the tanh GELU is rewritten, below, so a rare element's bf16 GELU is a neighbour
# of torch's; the GPU tests bound how many codes that moves.
#
# The kernel is bound by instruction issue, not memory: with tl.sigmoid its sm_90 code (ptxas, N a
# multiple of 16) was 36 instructions an element, 15 of them the quantisation, and the H200 ran it at
# 1.5 TB/s against a copy's 4. So the tanh GELU is x * sigmoid(2u) = x / (1 + 2^z) with
# z = x * (A + B * x^2), torch's constants folded into A and B (three instructions before the
# exponential instead of seven), and the exponential and division are the GPU's approximate ones
# (ex2.approx, div.approx), without the denormal guards that tl.exp and tl.sigmoid's division put
# around each: 22 instructions an element. Relative error about 1e-6; on 23k x 4304 random inputs
# the H200 gave the same e4m3 codes as the tl.sigmoid version. Triton's interpreter has no libdevice,
# so there (CI) the same expression runs through tl.exp2 and "/".
_GELU_TANH_A = tl.constexpr(-2.302208198144325)  # -2 * sqrt(2 / pi) * log2(e)
_GELU_TANH_B = tl.constexpr(-0.1029432395800235)  # _GELU_TANH_A * 0.044715

if os.environ.get("TRITON_INTERPRET") == "1":

    @triton.jit
    def _x_over_1_plus_exp2(x, z):
        return x / (1.0 + tl.exp2(z))

    @triton.jit
    def _ex2_approx_ftz(x):
        return tl.exp2(x)

else:
    from triton.language.extra import libdevice

    @triton.jit
    def _x_over_1_plus_exp2(x, z):
        return libdevice.fast_dividef(x, 1.0 + libdevice.exp2(z))

    @triton.jit
    def _ex2_approx_ftz(x):
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], tl.float32, True, 1)


# The erf GELU's erf: libdevice's erff (what torch's CUDA GELU calls) written out. erff evaluates one
# degree-6 polynomial whose coefficients it selects per element between two ranges (|a| below or from
# 1.00296), then for the upper range 1 - 2^p with the sign of a. Through ``tl.erf`` the selects
# compiled to about 14 of the GELU kernel's 41 instructions an element (MOV, HFMA2 and IMAD moving
# constants; sm_90 SASS), and Triton links libdevice flushing denormals, which torch's build does
# not. Here both polynomials run with their coefficients as immediates and one result is kept: the
# same coefficients (libdevice.10.bc, as fp32), the same fma order and ex2.approx.ftz, no flush. On the
# H200 (2026-12-03) this equals ``torch.erf`` bit for bit on every 7th fp32 in [-10, 10], where
# ``tl.erf`` differs on 1.1% (the denormals, and one ulp on some of [1.003, 3.92]); the GELU kernel
# went from 0.160 to 0.112 ms at 23k x 4096 (tests/test_gpu_fp8.py, RESULTS.md "session 10").
@triton.jit
def _erf(a):
    t = tl.abs(a)
    s = a * a
    # |a| < 1.00296: a + a * p(a^2)
    ps = tl.fma(8.483494457323104e-05, s, -0.0008213091641664505)
    ps = tl.fma(ps, s, 0.005213488824665546)
    ps = tl.fma(ps, s, -0.026868773624300957)
    ps = tl.fma(ps, s, 0.11284004896879196)
    ps = tl.fma(ps, s, -0.37612664699554443)
    ps = tl.fma(ps, s, 0.12837915122509003)
    small = tl.fma(ps, a, a)
    # from 1.00296: 1 - 2^(-t - t * p(t)), with a's sign
    pb = tl.fma(0.00011219871521461755, t, -0.0013275252422317863)
    pb = tl.fma(pb, t, 0.00839653518050909)
    pb = tl.fma(pb, t, -0.04024658352136612)
    pb = tl.fma(pb, t, 0.15950430929660797)
    pb = tl.fma(pb, t, 0.9129176735877991)
    pb = tl.fma(pb, t, 0.6290600299835205)
    pb = tl.fma(pb, -t, -t)
    big = 1.0 - _ex2_approx_ftz(pb)
    big = (big.to(tl.int32, bitcast=True) | (a.to(tl.int32, bitcast=True) & -2147483648)).to(tl.float32, bitcast=True)
    return tl.where(t >= 1.002959966659546, big, small)


@triton.jit
def _gelu_tile(Hx, r64, cols, mask, N, TANH: tl.constexpr):
    # GELU of one tile of the rows, rounded to h's dtype, in fp32 (0 where masked: gelu(0) = 0).
    x = tl.load(Hx + r64 * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if TANH:  # torch: 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3))) = x * sigmoid(2 * inner)
        g = _x_over_1_plus_exp2(x, x * (x * x * _GELU_TANH_B + _GELU_TANH_A))
    else:  # torch: x * 0.5 * (1 + erf(x / sqrt(2)))
        g = x * 0.5 * (1.0 + _erf(x * 0.7071067811865476))
    return g.to(Hx.dtype.element_ty).to(tl.float32)


# What ``_act_fwd_fp8_kernel`` computes (a constexpr, one compiled kernel each).
_SWIGLU, _GELU_TANH, _GELU_ERF = 0, 1, 2


@triton.jit
def _act_tile(Hx, r64, cols, mask, N, ACT: tl.constexpr):
    if ACT == 0:
        return _swiglu_tile(Hx, r64, cols, mask, N)
    else:
        return _gelu_tile(Hx, r64, cols, mask, N, ACT == 1)


@triton.jit
def _act_fwd_fp8_kernel(
    Hx,
    Q,
    QS,
    M,
    N,
    N_OUT,
    BLOCK_M: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    ACT: tl.constexpr,
):
    # The activation (SwiGLU over h's [gate; up] halves, or GELU) over whole rows as two tiles, its
    # output rounded to h's dtype, then e4m3 rows and their scales. The rows are N_OUT >= N wide:
    # columns N.. are zeros (the activations map a masked load's 0 to 0), padding for the GEMM.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    live = rows < M
    r64 = rows.to(tl.int64)[:, None]
    ca = tl.arange(0, BLOCK_A)
    ma = live[:, None] & (ca < N)[None, :]
    oa = _act_tile(Hx, r64, ca, ma, N, ACT)
    cb, mb, ob = ca, ma, oa
    if BLOCK_B > 0:
        cb = BLOCK_A + tl.arange(0, BLOCK_B)
        mb = live[:, None] & (cb < N)[None, :]
        ob = _act_tile(Hx, r64, cb, mb, N, ACT)
    sa = live[:, None] & (ca < N_OUT)[None, :]
    sb = live[:, None] & (cb < N_OUT)[None, :]
    _store_e4m3_two(oa, ob, Q, QS, r64, ca, cb, sa, sb, rows, live, N_OUT, BLOCK_B)


def _act_fwd_fp8(h: torch.Tensor, N: int, act: int, width: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    h = h.contiguous()
    M = h.shape[0]
    width = N if width is None else width
    if width < N:
        raise ValueError(f"width must be at least the activation's {N} columns, got {width}")
    q = torch.empty(M, width, dtype=torch.float8_e4m3fn, device=h.device)
    scale = torch.empty(M, 1, dtype=torch.float32, device=h.device)
    if M:
        block_a, block_b = _row_split(width)
        bm = 1 << max(0, (2048 // (block_a + block_b)).bit_length() - 1)  # rows a program: a power of two
        _act_fwd_fp8_kernel[(triton.cdiv(M, bm),)](
            h, q, scale, M, N, width, BLOCK_M=bm, BLOCK_A=block_a, BLOCK_B=block_b, ACT=act, num_warps=_ACT_FP8_WARPS
        )
    return q, scale


def swiglu_fwd_fp8(h: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """h (T, 2H) -> silu(gate) * up as e4m3 rows (T, H) and their fp32 scales (T, 1), bit for bit
    ``fp8_kernels.quantize_rows(swiglu_fwd(h))`` (inference). ``width`` > H: the rows padded with
    zero columns to that width (``fp8.padded_k``)."""
    return _act_fwd_fp8(h, h.shape[1] // 2, _SWIGLU, width)


def gelu_fwd_fp8(h: torch.Tensor, approximate: str, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """h (T, H) -> gelu(h) (``approximate`` "tanh" or "none", as ``F.gelu``) as e4m3 rows (T, H) and
    their fp32 scales (T, 1): ``fp8_kernels.quantize_rows(F.gelu(h))`` in one kernel (inference).
    ``width`` > H: the rows padded with zero columns to that width (``fp8.padded_k``)."""
    return _act_fwd_fp8(h, h.shape[1], _GELU_TANH if approximate == "tanh" else _GELU_ERF, width)


def swiglu_bwd(do: torch.Tensor, h: torch.Tensor, with_output: bool = False):
    """do (T, H), h (T, 2H) -> dh (T, 2H); with ``with_output`` also (dh, silu(gate) * up (T, H))."""
    do, h = do.contiguous(), h.contiguous()
    M, N = h.shape[0], h.shape[1] // 2
    dh = torch.empty_like(h)
    o = h.new_empty(M, N) if with_output else dh
    if M:
        _swiglu_bwd_kernel[_swiglu_grid(M, N)](
            do, h, dh, o, M, N, BLOCK_M=_SWIGLU_BLOCK_M, BLOCK_N=_SWIGLU_BLOCK_N, HAS_O=with_output, num_warps=4
        )
    return (dh, o) if with_output else dh


# --- RoPE on q and k ---------------------------------------------------------------------------------
#
# out = x * cos + rotate_half(x) * sin for q and k of the fused qkv output, with rotate_half(x) =
# cat(-x2, x1) (``layers.apply_rope``): per half, out1 = x1*c1 - x2*s1, out2 = x2*c2 + x1*s2. The
# kernel reads q and k by stride where the qkv matmul wrote them ((T, 3, H, Dh): the views
# ``qkv.unbind(1)`` gives, rows of 3*D elements) and writes each rotated into a contiguous (T, H, Dh),
# what the attention kernels take; the unfused path spends one strided elementwise pass and a cat per
# tensor on it (6.6 + 3.7 ms a DINOv3-L forward at 23k tokens on the H200).
#
# Not a kept library's kernel (checked 2026-12-03):
#   * Liger-Kernel's ``rope_forward`` takes q, k as (B, H, T, Dh), transposes them to (B, T, H, Dh)
#     and calls ``.contiguous()``, which for the strided qkv views is a full copy before its in-place
#     rotation (two passes where one does); it also reads only the first half of cos/sin.
#   * quack-kernels' ``apply_rotary_emb_qkv_`` fits the layout (in place on (1, T, 3, H, Dh) with
#     cos[:, :Dh/2] as a per-token table) but is CuTe-DSL code: it needs nvidia-cutlass-dsl, which
#     reaches the GPU machine only inside the fa4 bundle, cannot run under CI's Triton interpreter,
#     and its in-place op leaves q and k strided for attention. Same reasons as for the norms above.
#
# The backward is the adjoint (RoPE is a rotation): dx1 = g1*c1 + g2*s2, dx2 = g2*c2 - g1*s1, i.e.
# the forward with (s1, s2) -> (-s2, -s1); with DINOv3's twice-tiled angles (c1 = c2, s1 = s2) that is
# the same rotation with -sin. cos/sin get no gradient (position tables, never trained).


@triton.jit
def _rope_one(X, O, sx_t, sx_h, so_t, so_h, t, h, cols, mask, c1, c2, s1, s2, HALF: tl.constexpr):
    # One tensor's tile: x (BLOCK_R rows of (token t, head h), Dh) -> o, in fp32, one rounding.
    x_off = t[:, None] * sx_t + h[:, None] * sx_h + cols[None, :]
    x1 = tl.load(X + x_off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_off + HALF, mask=mask, other=0.0).to(tl.float32)
    o_off = t[:, None] * so_t + h[:, None] * so_h + cols[None, :]
    tl.store(O + o_off, (x1 * c1 - x2 * s1).to(O.dtype.element_ty), mask=mask)
    tl.store(O + o_off + HALF, (x2 * c2 + x1 * s2).to(O.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q,
    K,
    QO,
    KO,
    C,
    S,
    M,
    NH,
    sq_t,
    sq_h,
    sk_t,
    sk_h,
    sqo_t,
    sqo_h,
    sko_t,
    sko_h,
    sc_t,
    ss_t,
    HALF: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    # A program takes BLOCK_R of the T * NH (token, head) rows, row r = t * NH + h, of q and of k.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    live = rows < M
    mask = live[:, None] & (cols < HALF)[None, :]
    t = (rows // NH).to(tl.int64)
    h = (rows % NH).to(tl.int64)
    c_off = t[:, None] * sc_t + cols[None, :]
    s_off = t[:, None] * ss_t + cols[None, :]
    # Rows past the end read cos=sin=0 and are not stored. The tables are (T, Dh), so the H rows of a
    # token read the same cos/sin from cache.
    c1 = tl.load(C + c_off, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(C + c_off + HALF, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(S + s_off, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(S + s_off + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        s1, s2 = -s2, -s1
    _rope_one(Q, QO, sq_t, sq_h, sqo_t, sqo_h, t, h, cols, mask, c1, c2, s1, s2, HALF)
    _rope_one(K, KO, sk_t, sk_h, sko_t, sko_h, t, h, cols, mask, c1, c2, s1, s2, HALF)


# 2048 elements of each half-tile (64 rows at Dh 64), 4 warps: an elementwise pass at the bytes' time
# needs no more; not swept on the H200 yet (benchmarks/fused_ab.py --part ops times it).
_ROPE_TILE_ELEMS, _ROPE_WARPS = 2048, 4


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def rope_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (T, H, Dh), any strides with a unit last one (the views of the (T, 3, H, Dh) qkv output),
    cos, sin (T, Dh) -> rotated q, k, each a new contiguous (T, H, Dh). ``backward``: the adjoint,
    for incoming gradients dq, dk in place of q, k."""
    if q.dim() != 3 or q.shape != k.shape:
        raise ValueError(f"q and k must be (T, H, Dh) of one shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    T, NH, Dh = q.shape
    if Dh % 2 or cos.shape != (T, Dh) or sin.shape != (T, Dh):
        raise ValueError(
            f"cos and sin must be (T, Dh) = {(T, Dh)} with Dh even, got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    q, k, cos, sin = _unit_last(q), _unit_last(k), _unit_last(cos), _unit_last(sin)
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    M = T * NH
    if M:
        half = Dh // 2
        block_d = triton.next_power_of_2(half)
        block_r = max(1, _ROPE_TILE_ELEMS // block_d)
        _rope_kernel[(triton.cdiv(M, block_r),)](
            q,
            k,
            qo,
            ko,
            cos,
            sin,
            M,
            NH,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            qo.stride(0),
            qo.stride(1),
            ko.stride(0),
            ko.stride(1),
            cos.stride(0),
            sin.stride(0),
            HALF=half,
            BLOCK_R=block_r,
            BLOCK_D=block_d,
            BACKWARD=backward,
            num_warps=_ROPE_WARPS,
        )
    return qo, ko


# --- Head-dim padding for FlashAttention-4's backward -------------------------------------------------
#
# FA4's Hopper backward runs head dims it gets wrong (SigLIP2's 72) zero-padded to the next it gets
# right (96; ``attention.FA4Backward.head_dims``): q, k, v, out and dO padded, dq, dk and dv cut back.
# F.pad and the slice copies are torch's generic strided elementwise kernel, at a fraction of the
# bandwidth: 16.0 ms of SigLIP2's 165 ms training step at 23k tokens on the H200 (eight copies a block,
# profile_breakdown.py --train, 2026-12-03). Here the five pads are one launch and the three cuts one,
# each a read and a write of the bytes: 9.6 ms a step in the same profile (RESULTS.md, session 12).

_HEADS_MAX = 5  # tensors per launch


@triton.jit
def _copy_heads_kernel(
    S0, S1, S2, S3, S4, D0, D1, D2, D3, D4,
    st0, st1, st2, st3, st4, sh0, sh1, sh2, sh3, sh4,
    R, NH, DS, DD,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # Program (i, j): BLOCK_R of the T * NH (token, head) rows of tensor j, row r = t * NH + h, read at
    # t * st + h * sh (any strides with a unit last one), written to the contiguous (T, NH, DD) output:
    # the first min(DS, DD) columns copied, the columns from DS on zero.
    j = tl.program_id(1)
    src, dst, st, sh = S0, D0, st0, sh0
    if j == 1:
        src, dst, st, sh = S1, D1, st1, sh1
    elif j == 2:
        src, dst, st, sh = S2, D2, st2, sh2
    elif j == 3:
        src, dst, st, sh = S3, D3, st3, sh3
    elif j == 4:
        src, dst, st, sh = S4, D4, st4, sh4
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    live = rows < R
    r64 = rows.to(tl.int64)
    off = (r64 // NH) * st + (r64 % NH) * sh
    x = tl.load(src + off[:, None] + cols[None, :], mask=live[:, None] & (cols < DS)[None, :], other=0.0)
    tl.store(dst + r64[:, None] * DD + cols[None, :], x, mask=live[:, None] & (cols < DD)[None, :])


def copy_heads(tensors, width: int) -> list[torch.Tensor]:
    """(T, H, d) tensors of one shape and dtype, any strides with a unit last one -> contiguous
    (T, H, ``width``) copies: the first min(d, width) columns, zeros after (``F.pad`` to a wider
    head dim, or a cut to a narrower one, then ``.contiguous()``)."""
    tensors = [_unit_last(t) for t in tensors]
    T, NH, d = tensors[0].shape
    if any(t.shape != tensors[0].shape or t.dtype != tensors[0].dtype for t in tensors):
        raise ValueError(f"copy_heads takes tensors of one shape and dtype, got {[tuple(t.shape) for t in tensors]}")
    outs = [torch.empty(T, NH, width, dtype=t.dtype, device=t.device) for t in tensors]
    R = T * NH
    if R == 0:
        return outs
    block_d = triton.next_power_of_2(max(d, width))
    block_r = max(1, 4096 // block_d)
    for i in range(0, len(tensors), _HEADS_MAX):
        src, dst = tensors[i : i + _HEADS_MAX], outs[i : i + _HEADS_MAX]
        n = len(src)
        src, dst = src + [src[0]] * (_HEADS_MAX - n), dst + [dst[0]] * (_HEADS_MAX - n)  # unused slots
        _copy_heads_kernel[(triton.cdiv(R, block_r), n)](
            *src, *dst, *(t.stride(0) for t in src), *(t.stride(1) for t in src),
            R, NH, d, width, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip
    return outs
