"""FP8 (e4m3) linears for the blocks' matmuls (qkv, proj, fc1, fc2), inference and training.

    model = packvit.from_pretrained(path, device="cuda", dtype=torch.bfloat16, fp8=True)
    model.set_fp8(False)                      # back to the bf16 path (same parameters)

What runs: ``torch._scaled_mm`` with row-wise scales, the recipe of torchao's "rowwise" float8
training. Each operand is cast to e4m3 with one fp32 scale per row of the reduction:

    forward   y  = x @ W.T     x: one scale per token row,      W: one per output row
    dgrad     dx = dy @ W      dy: one per token row,           W: one per input column
    wgrad     dW = dy.T @ x    bf16 by default (``WGRAD``); in e4m3, dy and x one per column over tokens

with bf16 output and the bias in the matmul's epilogue. The parameters stay the bf16 (or, under
FSDP2 mixed precision, fp32) master weights; their e4m3 copy is made once and cached for inference
(keyed on the parameter's storage and its version counter, so ``optimizer.step()``, ``copy_`` or a
``load_state_dict`` re-quantise it), and made afresh each training step. Patch embedding, pooling
heads and attention itself stay bf16.

**The policy.** FP8 pays only on large matmuls: quantising the activation is one extra pass over it
and the e4m3 GEMM has its own fixed costs. Each linear has a token crossover (``min_tokens``): a
batch of T >= min_tokens tokens runs the FP8 path, a smaller one the bf16 path, decided per call from
``x.shape[0]`` (a Python int: no host sync). The crossovers come from the per-shape sweep on the
H200 (``benchmarks/fp8_ab.py``, RESULTS.md "FP8"), proj's from the whole model; see ``CROSSOVER``.

**Fused input quantisation (inference).** On the fused CUDA path the kernels that make qkv's and
fc1's inputs (packvit's norm kernels, chained or not) and fc2's input (AIMv2's SwiGLU kernel, the GELU
kernel of SigLIP2 and DINOv3) write them as e4m3 rows with their scales (``FP8Rows``) when the linear
will run FP8 (``wants_fp8_input``), so no separate quantisation pass runs. The kernels round y to
bf16 and quantise it as the separate pass does. The bits are the same for DINOv3's and AIMv2's
norms (D 1024), AIMv2's SwiGLU and the erf GELU (DINOv3; torch's erf bit for bit). SigLIP2's norm
(D 1152) sums a row as two tiles, so a rare y is a bf16 step from the bf16 kernel's (2.9e-7 of the
codes, H200, 2026-12-03), and its tanh GELU is a rare bf16 step from torch's
(``triton_kernels.gelu_fwd_fp8``); the fidelity is unchanged. ``FUSE_INPUT_QUANT`` turns it off for
A/B runs; training quantises inside ``_FP8Linear`` as before. H200, FA4, 23k tokens: forward 25.1 ->
23.1 ms (AIMv2), 42.6 -> 38.0 (DINOv3), 38.1 -> 37.1 (SigLIP2) (RESULTS.md, session 8).

**Fidelity (measured, H200, random weights at the published sizes, mixed32).** FP8 is opt-in
because it does not reach the 0.999 per-patch min cosine that bf16 keeps (0.9999): with every
linear in e4m3 the worst patch is at 0.9962 (SigLIP2), 0.9939 (DINOv3), 0.9973 (AIMv2) against
fp32, and 0.9975 / 0.9945 / 0.9979 with the default crossovers at 23k tokens. No layer kind is the
cause (keeping any one kind in bf16 moves it by < 0.002), and no block is: each block alone costs
1e-4 to 1e-3 of cosine, the early ones most, and the costs add up over depth; e4m3's 3-bit mantissa
rounds each element by up to 1/16, which is what a single linear already shows (min row cosine 0.9992
against fp32). A short training run (200 steps, three seeds, RESULTS.md) ends 0.2% above bf16's
loss for SigLIP2 (inside the seeds' spread), 1.1-1.3% for DINOv3 and 0.7-1.6% for AIMv2 (outside it).

**Where it runs.** CUDA devices of compute capability >= 8.9 (Ada, Hopper, Blackwell) with a bf16
model; ``set_fp8`` refuses anything else with a message naming what is needed. (PyTorch also runs
``_scaled_mm`` on the CPU, slowly; the tests use that to check the numerics against a dequantised
reference.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
EPS = 1e-12  # floor of a row's amax, so an all-zero row (padding) gets a finite scale, as torchao does
LAYERS = ("qkv", "proj", "fc1", "fc2")

# Token crossover per linear (in_features, out_features): at T >= this many tokens the FP8 path is
# faster than bf16 on the H200 (benchmarks/fp8_ab.py, "sweep": median of 5 x 10 timed calls each,
# the activation quantisation included). Shapes not listed get DEFAULT_MIN_TOKENS. "train" is the
# forward + backward of the linear (three GEMMs, the weight gradient's in bf16: ``WGRAD``).
# None: not faster at any measured size (up to 64k tokens), so the layer stays bf16 (``convert``
# leaves a layer that is None in both modes a plain nn.Linear). Measured 2026-12-03 on an H200
# (torch 2.11, FA4 bundle present), M = 1k, 2k, 4k, 8k, 12k, 16k, 23k, 32k, 48k, 64k;
# results/fp8-ab-train-fa4-h200-2026-12-03-session8.jsonl. Speedups at mixed32's 23k tokens,
# inference: qkv 1.25-1.37x, fc1 1.34-1.38x, fc2 1.02-1.24x, proj 0.41-0.64x (its quantisation
# costs as much as its GEMM saves). Training pays from 48k tokens on, AIMv2's fc1 from 23k.
# proj's inference crossover is the whole model's instead (``fp8_ab.py --part policy``: the forward
# with proj in FP8 against in bf16, alternated, on 14.6k / 23k / 32k / 46k tokens, H200, FA4,
# 2026-12-03, results/fp8-ab-policy-fa4-h200-2026-12-03-s10.jsonl): SigLIP2's is faster from 32k on
# (+2.6% at 32k, +1.0% at 46k, -1.1% at 23k), DINOv3's and AIMv2's at 46k (+0.7%, +1.9%; level at
# 32k, 10-14% slower at 23k, where the extra quantisation launches make the forward host-bound).
CROSSOVER: dict[str, dict[tuple[int, int], int | None]] = {
    "infer": {
        (1152, 3456): 23103,
        (1152, 1152): 32414,
        (1152, 4304): 12288,
        (4304, 1152): 12288,  # SigLIP2 so400m
        (1024, 3072): 23103,
        (1024, 1024): 46206,
        (1024, 4096): 16384,
        (4096, 1024): 23103,  # DINOv3-L
        (1024, 5632): 12288,
        (2816, 1024): 16384,  # AIMv2-L (qkv, proj as DINOv3's)
    },
    "train": {
        (1152, 3456): 49152,
        (1152, 1152): None,
        (1152, 4304): 49152,
        (4304, 1152): 49152,
        (1024, 3072): 49152,
        (1024, 1024): None,
        (1024, 4096): 49152,
        (4096, 1024): 49152,
        (1024, 5632): 23103,
        (2816, 1024): 49152,
    },
}
# Other shapes (other presets): the wide layers measured cross over at 12k-23k tokens for inference
# and 23k-48k for training.
DEFAULT_MIN_TOKENS = {"infer": 16384, "train": 49152}
NEVER = 1 << 62  # min_tokens of a layer that never runs FP8 in that mode


# -- quantisation -----------------------------------------------------------------------------------


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> e4m3 (M, K) and fp32 scales (M, 1) with x ~= q * scale, one scale per row.

    The plain-torch definition; ``quantize_rows`` runs the Triton kernel on CUDA, to the same bits."""
    x32 = x.float()
    qscale = E4M3_MAX / x32.abs().amax(dim=1, keepdim=True).clamp(min=EPS)  # (M, 1)
    q = (x32 * qscale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, qscale.reciprocal()


def quantize_cols_t_reference(x: torch.Tensor, pad_to: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, C) -> e4m3 x.T (C, Mp) contiguous with one scale per column of x, (C, 1) fp32.

    The operand of a GEMM that reduces over M (the weight gradient). ``_scaled_mm`` needs the
    reduction length to be a multiple of 16: Mp is M rounded up, the extra columns are zeros."""
    return cast_cols_t_reference(x, x.float().abs().amax(dim=0), pad_to)


def cast_cols_t_reference(x: torch.Tensor, amax: torch.Tensor, pad_to: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_cols_t_reference`` with the columns' amax (C,) fp32 given (gathered earlier)."""
    M, C = x.shape
    qscale = E4M3_MAX / amax.clamp(min=EPS)  # (C,)
    q = (x.float() * qscale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    Mp = -(-M // pad_to) * pad_to
    out = torch.zeros(C, Mp, dtype=E4M3, device=x.device)
    out[:, :M] = q.t()
    return out, qscale.reciprocal()[:, None]


def quantize_rows_col_stats_reference(
    x: torch.Tensor, col_sum: bool, amax: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``quantize_rows_reference`` of (M, K) x and, with ``amax``, its columns' amax (K,) fp32 and,
    with ``col_sum``, their fp32 sums (K,) (None where not asked for): one read of x on the GPU
    (``fp8_kernels.quantize_rows_col_stats``)."""
    q, s = quantize_rows_reference(x)
    x32 = x.float()
    return q, s, (x32.abs().amax(dim=0) if amax else None), (x32.sum(dim=0) if col_sum else None)


def _triton_runs(x: torch.Tensor) -> bool:
    if not x.is_cuda:
        return False
    from .fused_ops import _has

    return _has("packvit.fp8_kernels")


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_rows_reference`` as one Triton kernel on CUDA (one read of x, one write of q)."""
    if _triton_runs(x):
        from .fp8_kernels import quantize_rows as kernel

        return kernel(x)
    return quantize_rows_reference(x)


def quantize_cols_t(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_cols_t_reference`` as two Triton kernels on CUDA (column amax, then cast + transpose)."""
    if _triton_runs(x):
        from .fp8_kernels import quantize_cols_t as kernel

        return kernel(x)
    return quantize_cols_t_reference(x)


def quantize_rows_col_stats(x: torch.Tensor, col_sum: bool, amax: bool = True):
    """``quantize_rows_col_stats_reference`` as one Triton kernel on CUDA (one read of x)."""
    if _triton_runs(x):
        from .fp8_kernels import quantize_rows_col_stats as kernel

        return kernel(x, col_sum, amax)
    return quantize_rows_col_stats_reference(x, col_sum, amax)


def cast_cols_t(x: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cast_cols_t_reference`` as one Triton kernel on CUDA (one read of x)."""
    if _triton_runs(x):
        from .fp8_kernels import cast_cols_t as kernel

        return kernel(x, amax)
    return cast_cols_t_reference(x, amax)


# -- the matmuls ------------------------------------------------------------------------------------


# The forward's GEMM accumulates in the tensor cores' fast (lower-precision) mode, as torchao's
# float8 recipes do for the output; the gradients' GEMMs do not.
FAST_ACCUM_FORWARD = True
_BIAS_IN_MM = {}  # device type -> whether _scaled_mm takes a bias with row-wise scales (found at the first call)


def scaled_mm(
    a: torch.Tensor,
    sa: torch.Tensor,
    b: torch.Tensor,
    sb: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype,
    fast_accum: bool = False,
) -> torch.Tensor:
    """(a * sa) @ (b * sb).T + bias: a (M, K) and b (N, K) e4m3 row-major, sa (M, 1), sb (N, 1) fp32."""
    dev = a.device.type
    kw = dict(scale_a=sa, scale_b=sb.view(1, -1), out_dtype=out_dtype, use_fast_accum=fast_accum)
    if bias is not None and _BIAS_IN_MM.get(dev, True):
        try:
            out = torch._scaled_mm(a, b.t(), bias=bias, **kw)
            _BIAS_IN_MM[dev] = True
            return out
        except RuntimeError:
            if dev in _BIAS_IN_MM:
                raise
            _BIAS_IN_MM[dev] = False
    out = torch._scaled_mm(a, b.t(), **kw)
    return out if bias is None else out + bias


def fp8_linear_inference(
    x: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x (M, K) bf16 and an already quantised weight -> (M, N) in x's dtype."""
    xq, sx = quantize_rows(x)
    return scaled_mm(xq, sx, wq, sw, None if bias is None else bias.to(x.dtype), x.dtype, FAST_ACCUM_FORWARD)


# The weight gradient's GEMM: "bf16" runs it on the bf16 dy and x (torchao's "rowwise_with_gw_hp":
# no column-wise quantisation at all, the GEMM at bf16's rate); "fp8" runs it in e4m3 with dy and x
# quantised per column over the tokens (torchao's "rowwise" recipe). bf16 measured faster in sum
# over the ten layer shapes at 23k and 48k tokens on the H200 (31.4 against 35.6 ms, 2026-12-03,
# benchmarks/fp8_ab.py --part sweep): the two column-wise casts cost more than the e4m3 GEMM saves.
# One scale per column and per 128 tokens (DeepSeek-V3's 1x128 blocks) would make those casts one local
# pass, but torch._scaled_mm's block-scaled GEMM ran slower than the row-wise one (SigLIP2's qkv at 23k
# tokens: 0.186 against 0.136 ms, bf16 0.235; H200, benchmarks/fp8_blockwise_probe.py, RESULTS.md).
WGRAD = "bf16"

# The input gradient's GEMM: "fp8" (default) runs dx = dy @ W in e4m3 (dy per token row, W per input
# column); "bf16" runs it on the bf16 dy and W (torchao's per-GEMM choice, as its "grad_input"
# config). A diagnostic for training fidelity: with both gradients bf16, only the forward is e4m3.
DGRAD = "fp8"


class _FP8Linear(torch.autograd.Function):
    """y = x @ W.T + b with the forward GEMM in e4m3, the input gradient's in e4m3 or bf16
    (``DGRAD``) and the weight gradient's in e4m3 or bf16 (``WGRAD``); bf16 is kept for what is
    saved (x and W, quantised again along the other axis in backward) and for the grads.

    Each activation is read as few times as the recipe allows: the forward's row quantisation of x
    also gathers x's column amax (what the e4m3 weight gradient's column scales need), and the
    backward's row quantisation of dy gathers dy's column amax and column sums (the bias gradient),
    so the column-wise casts are one read each (``quantize_rows_col_stats``, ``cast_cols_t``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        w = weight.to(x.dtype)  # FSDP2 mixed precision hands a bf16 weight already; fp32 masters are cast
        fp8_wgrad = WGRAD == "fp8" and ctx.needs_input_grad[1]
        if fp8_wgrad:
            xq, sx, x_amax, _ = quantize_rows_col_stats(x, col_sum=False)  # (M, K), (M, 1), (K,)
        else:
            (xq, sx), x_amax = quantize_rows(x), None
        wq, sw = quantize_rows(w)  # (N, K), (N, 1)
        ctx.save_for_backward(x, w, x_amax)
        ctx.has_bias = bias is not None
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return scaled_mm(xq, sx, wq, sw, None if bias is None else bias.to(x.dtype), x.dtype, FAST_ACCUM_FORWARD)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w, x_amax = ctx.saved_tensors
        dy = dy.contiguous()  # (M, N)
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_db = ctx.has_bias and ctx.needs_input_grad[2]
        fp8_dw = need_dw and x_amax is not None
        fp8_dx = need_dx and DGRAD == "fp8"
        dx = dw = db = dy_sum = None
        if fp8_dw or (fp8_dx and need_db):  # one read of dy: its rows, column amax and / or column sums
            dyq, sdy, dy_amax, dy_sum = quantize_rows_col_stats(dy, col_sum=need_db, amax=fp8_dw)
        elif fp8_dx:
            dyq, sdy = quantize_rows(dy)  # per token row, over N
        if fp8_dx:
            wtq, swt = quantize_rows(w.t().contiguous())  # (K, N): per input column of W, over N
            dx = scaled_mm(dyq, sdy, wtq, swt, None, x.dtype)  # (M, K)
        elif need_dx:
            dx = dy @ w  # (M, K), bf16 GEMM
        if fp8_dw:
            dytq, sdyt = cast_cols_t(dy, dy_amax)  # (N, Mp): per output column, over tokens
            xtq, sxt = cast_cols_t(x, x_amax)  # (K, Mp): per input column, over tokens
            dw = scaled_mm(dytq, sdyt, xtq, sxt, None, x.dtype).to(ctx.weight_dtype)  # (N, K)
        elif need_dw:
            dw = (dy.t() @ x).to(ctx.weight_dtype)  # (N, K), bf16 GEMM
        if need_db:
            db = (dy.sum(0, dtype=torch.float32) if dy_sum is None else dy_sum).to(ctx.bias_dtype)
        return dx, dw, db


# -- pre-quantised inputs ---------------------------------------------------------------------------
#
# At 23k tokens quantising a linear's input is a pass of its own, 0.03-0.08 ms a layer on the H200,
# which ate much of the e4m3 GEMM's gain (RESULTS.md, "FP8 linears"). Where the input comes from one
# of packvit's Triton kernels that hold whole rows (the norms before qkv and fc1, AIMv2's SwiGLU before
# fc2), that kernel writes the e4m3 rows and their scales itself (``fused_ops.norm_fp8``,
# ``add_norm_fp8``, ``swiglu_fp8``), quantising as the separate pass does, and the linear takes them.

# Off: every FP8 linear quantises its own bf16 input, as before (for A/B runs).
FUSE_INPUT_QUANT = True


# The activation kernels write fc2's e4m3 input with zero columns up to a multiple of this
# (``FP8Linear.rows_width``): cuBLASLt's e4m3 GEMM ran SigLIP2's fc2 (K 4304 = 16 x 269) 10-12% faster
# at K 4352 (H200, 2026-12-03, ``benchmarks/fp8_ab.py --part pad``: 0.206 -> 0.182 ms at 23k tokens,
# 0.407 -> 0.367 at 46k; bf16 unchanged, and fc1 with N 4304 -> 4352 not faster). Zero columns add
# exact zeros to the products and leave each row's amax (its scale) as it is. Every other width of
# the three families is a multiple of 128 already.
PAD_K_MULTIPLE = 128


def padded_k(k: int) -> int:
    """K rounded up to ``PAD_K_MULTIPLE``."""
    return -(-k // PAD_K_MULTIPLE) * PAD_K_MULTIPLE


class FP8Rows(NamedTuple):
    """An FP8 linear's input already in e4m3: q (T, K) and fp32 scales (T, 1), q * scale ~= x, and
    ``dtype``, the dtype the bf16 input would have had (the linear's output dtype). q may be wider
    than the linear's K, with zero columns (``FP8Linear.rows_width``)."""

    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.q.shape


def wants_fp8_input(linear: nn.Module, tokens: int) -> bool:
    """Whether the kernel making ``linear``'s input of ``tokens`` rows should hand it ``FP8Rows``: an
    ``FP8Linear`` at or above its inference crossover, without autograd (training quantises in
    ``_FP8Linear``) and outside ``torch.compile`` (the fp8 kernels are no custom ops)."""
    return (
        FUSE_INPUT_QUANT
        and isinstance(linear, FP8Linear)
        and tokens >= linear.min_tokens
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    )


def runs_plain(linear: nn.Module, tokens: int) -> bool:
    """Whether ``linear`` computes a call of ``tokens`` rows as a plain ``nn.Linear`` would: it is one,
    or an ``FP8Linear`` below its crossover for the current grad mode. Fused paths that take the
    weights themselves (quack's GELU MLP, the SwiGLU training MLP) may then run, so an FP8 model
    keeps them wherever its linears stay bf16."""
    if type(linear) is nn.Linear:
        return True
    return isinstance(linear, FP8Linear) and tokens < (
        linear.min_tokens_train if torch.is_grad_enabled() else linear.min_tokens
    )


# -- the module -------------------------------------------------------------------------------------


class FP8Linear(nn.Linear):
    """An ``nn.Linear`` (same parameters, same state dict) whose matmul runs in FP8 from
    ``min_tokens`` tokens on (see the module docstring). Made by ``convert`` with an in-place class
    swap, so optimizers, FSDP2 and checkpoints keep seeing the very same parameters."""

    min_tokens: int
    min_tokens_train: int

    def _init_fp8(self, min_tokens: int, min_tokens_train: int) -> None:
        self.min_tokens, self.min_tokens_train = min_tokens, min_tokens_train
        self._fp8_weight: tuple | None = (
            None  # (key, e4m3 weight, scales, ...) last used; not a buffer: no state dict entry
        )
        self._fp8_weights: dict[int, tuple] = {}  # width -> the same, for every width used since the weight changed

    @property
    def rows_width(self) -> int:
        """The width an activation kernel writes this linear's ``FP8Rows`` at: K padded with zero
        columns to ``PAD_K_MULTIPLE`` (``padded_k``), which the e4m3 GEMM runs faster."""
        return padded_k(self.in_features)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None | str = "own") -> torch.Tensor:
        """x (..., K) -> (..., N). ``bias`` replaces the layer's own (the fused qkv's is built from
        per-projection biases, ``layers.Attention.qkv_bias``)."""
        b = self.bias if isinstance(bias, str) else bias
        if isinstance(x, FP8Rows):  # quantised by the kernel that made it (``wants_fp8_input``)
            return self._rows_mm(x, b)
        if not self.uses_fp8(x):
            return F.linear(x, self.weight, b)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        if self._training_call(x2, b):
            y = _FP8Linear.apply(x2, self.weight, b)
        else:
            wq, sw = self.quantized_weight()
            y = fp8_linear_inference(x2, wq, sw, b)
        return y.view(*lead, y.shape[-1])

    def _rows_mm(self, x: FP8Rows, b: torch.Tensor | None) -> torch.Tensor:
        # The inference hot path, once per FP8 linear and block: ``scaled_mm``'s call with the views
        # it would make each time (W.T, the scales as a row) kept in the weight cache, and the bias
        # cast skipped where the bias already has the output dtype. 11 -> 4 us of Python a call (CPU).
        _, wq, sw, wq_t, sw_row = self._weight_cache(x.q.shape[1])  # as wide as the rows, zero-padded
        if b is not None:
            if b.dtype != x.dtype:
                b = b.to(x.dtype)
            if not _BIAS_IN_MM.get(x.q.device.type, False):  # not yet known to take it: the probing path
                return scaled_mm(x.q, x.scale, wq, sw, b, x.dtype, FAST_ACCUM_FORWARD)
        return torch._scaled_mm(
            x.q, wq_t, scale_a=x.scale, scale_b=sw_row, bias=b, out_dtype=x.dtype, use_fast_accum=FAST_ACCUM_FORWARD
        )

    def uses_fp8(self, x: torch.Tensor) -> bool:
        """Whether this call runs in FP8: the token count against this layer's crossover."""
        if isinstance(x, FP8Rows):
            return True
        tokens = x.numel() // x.shape[-1] if x.dim() != 2 else x.shape[0]
        return tokens >= (self.min_tokens_train if torch.is_grad_enabled() else self.min_tokens)

    def _training_call(self, x: torch.Tensor, bias: torch.Tensor | None) -> bool:
        return torch.is_grad_enabled() and (
            x.requires_grad or self.weight.requires_grad or (bias is not None and bias.requires_grad)
        )

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight in e4m3 with its per-output-row scales, quantised once per weight version."""
        return self._weight_cache()[1:3]

    def _weight_cache(self, width: int | None = None) -> tuple:
        # (key, e4m3 weight (N, width), scales (N, 1), and the views _scaled_mm takes: (width, N),
        # (1, N)). width: K (default), or K padded with zero columns for ``FP8Rows`` that are
        # (``rows_width``). Each width used is kept until the weight changes: a CUDA graph holds the
        # copy it captured by address (``cuda_graphs``), so a call at another width must not free it.
        w = self.weight
        width = self.in_features if width is None else width
        if width < self.in_features:
            raise ValueError(f"FP8Rows of {width} columns for a linear of in_features={self.in_features}")
        # A weight made under inference_mode has no version counter (and cannot be changed in place
        # outside it): its storage is the key.
        key = (w.data_ptr(), None if w.is_inference() else w._version, w.dtype, w.device, w.shape)
        c = self._fp8_weight
        if c is not None and c[0] == key and c[1].shape[1] == width:
            return c
        if c is None or c[0] != key:
            self._fp8_weights = {}
        c = self._fp8_weights.get(width)
        if c is None:
            with torch.inference_mode(False), torch.no_grad():  # a cache that outlives inference_mode
                wq, sw = quantize_rows(w.detach())
                if width != wq.shape[1]:  # e4m3 0 is byte 0: padded through a byte view
                    wp = torch.zeros(wq.shape[0], width, dtype=torch.uint8, device=wq.device)
                    wp[:, : wq.shape[1]] = wq.view(torch.uint8)
                    wq = wp.view(E4M3)
            c = self._fp8_weights[width] = (key, wq, sw, wq.t(), sw.view(1, -1))
        self._fp8_weight = c
        return c

    def extra_repr(self) -> str:
        def at(n):
            return "never" if n >= NEVER else f"{n} tokens"

        return (
            super().extra_repr()
            + f", fp8=e4m3 rowwise from {at(self.min_tokens)} ({at(self.min_tokens_train)} training)"
        )


# Layers that stay bf16 under ``fp8=True``, per model class (names or kinds, as ``fp8_targets``
# takes them): set from the fidelity check (benchmarks/fp8_ab.py, RESULTS.md "FP8").
DEFAULT_SKIP: dict[str, tuple[str, ...]] = {}


def default_skip(model: nn.Module) -> tuple[str, ...]:
    return DEFAULT_SKIP.get(type(model).__name__, ())


def crossover(in_features: int, out_features: int, mode: str) -> int:
    c = CROSSOVER[mode].get((in_features, out_features), DEFAULT_MIN_TOKENS[mode])
    return NEVER if c is None else c


def fp8_targets(model: nn.Module, skip: frozenset[str] = frozenset()) -> dict[str, nn.Linear]:
    """name -> linear for every qkv / proj / fc1 / fc2 of the model's blocks, but for names in
    ``skip`` ("blocks.0.mlp.fc2", or a layer kind "fc2", or "blocks.3")."""
    out = {}
    for name, m in model.named_modules():
        kind = name.rsplit(".", 1)[-1]
        if not isinstance(m, nn.Linear) or kind not in LAYERS or ".blocks." not in f".{name}":
            continue
        if name in skip or kind in skip or any(name.startswith(s + ".") for s in skip):
            continue
        if m.in_features % 16 or m.out_features % 16:  # _scaled_mm's alignment; such a layer stays bf16
            continue
        out[name] = m
    return out


def convert(
    model: nn.Module, *, skip=(), min_tokens: int | None = None, min_tokens_train: int | None = None
) -> list[str]:
    """Swap the blocks' qkv / proj / fc1 / fc2 to ``FP8Linear`` in place (no device check: see
    ``check_device``); returns the names converted. ``min_tokens`` overrides every crossover (0: FP8
    for every batch)."""
    names = []
    for name, m in fp8_targets(model, frozenset(skip)).items():
        infer = crossover(m.in_features, m.out_features, "infer") if min_tokens is None else min_tokens
        train = (
            min_tokens_train
            if min_tokens_train is not None
            else (min_tokens if min_tokens is not None else crossover(m.in_features, m.out_features, "train"))
        )
        if infer == train == NEVER:
            continue
        if type(m) is nn.Linear:
            m.__class__ = FP8Linear
        m._init_fp8(infer, train)
        names.append(name)
    return names


def unconvert(model: nn.Module) -> None:
    """Every ``FP8Linear`` back to a plain ``nn.Linear`` (same parameters)."""
    for m in model.modules():
        if isinstance(m, FP8Linear):
            del m._fp8_weight, m._fp8_weights, m.min_tokens, m.min_tokens_train
            m.__class__ = nn.Linear


def check_device(device: torch.device, dtype: torch.dtype) -> None:
    """Raise where ``fp8=True`` cannot run: it needs a CUDA GPU of compute capability >= 8.9 and a
    bf16 model (e4m3 matmuls with bf16 output)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(
            f"fp8=True needs the model on a CUDA GPU of compute capability >= 8.9 (Ada, Hopper or newer); "
            f"it is on {device}: move it first (model.to('cuda', torch.bfloat16)) or leave fp8 off"
        )
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        raise ValueError(
            f"fp8=True needs a GPU of compute capability >= 8.9 (Ada, Hopper or newer) for e4m3 matmuls; "
            f"{torch.cuda.get_device_name(device)} has {cap[0]}.{cap[1]}: leave fp8 off"
        )
    if dtype != torch.bfloat16:
        raise ValueError(
            f"fp8=True needs a bf16 model (dtype=torch.bfloat16): its matmuls write bf16; this model is "
            f"{dtype}. FP8 training with fp32 master weights: keep fp32 parameters under FSDP2 mixed "
            f"precision (param_dtype=torch.bfloat16) and pass compute_dtype=torch.bfloat16"
        )
