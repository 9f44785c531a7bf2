"""Fused elementwise ops of the default CUDA path, each with autograd, and the choice of which run.

What runs between a block's matmuls on the reference path is several kernels per op, each a pass
over a (T, D) or (T, hidden) activation in device memory. The fused path does each in one:

    add_layernorm   s = x + gamma * a, y = LayerNorm(s)   packvit's Triton kernel   (SigLIP2, DINOv3)
    add_rmsnorm     s = x + a, y = RMSNorm(s)              packvit's or Liger-Kernel (AIMv2)
    rmsnorm         y = RMSNorm(x)                         packvit's or Liger-Kernel (AIMv2 norm1, final, patch)
    swiglu          silu(gate) * up of fc1's [gate | up]   packvit's Triton kernel   (AIMv2)
    rope            RoPE of q and k, read from qkv         packvit's Triton kernel   (DINOv3)
    gelu_mlp        GELU in fc1's GEMM epilogue, fwd+bwd   quack-kernels gemm_act    (SigLIP2, DINOv3; ``quack_mlp``)
    gelu_fp8        GELU written as an FP8 fc2's e4m3 input packvit's Triton kernel   (SigLIP2, DINOv3; FP8 inference)

Both RMSNorms normalise in fp32, cast back, then scale, which is AIMv2's order (``layers.RMSNorm``;
Liger's "llama" casting mode). Why packvit has kernels of its own: ``triton_kernels``.

Which run is decided once, when the model chooses its attention (build, ``set_attention``; moving
the model keeps both choices): ``resolve_fused`` returns, per op, the implementation that will run,
and the model hands it to its modules, whose ``repr`` shows it. CPU, fp32 and a missing library leave
the op on the reference path (``None``). Every op is a ``torch.library`` custom op with a fake
implementation and an autograd formula, so ``torch.compile`` keeps each block one graph; eager
calls skip the op dispatcher and go straight to an ``autograd.Function`` over the same functions.
"""

from __future__ import annotations

import functools
import importlib
from typing import Optional

import torch

from .fp8 import FP8Rows

FUSED_CHOICES = ("auto", "on", "off")
_HALF = (torch.float16, torch.bfloat16)
OPS = ("add_layernorm", "add_rmsnorm", "rmsnorm", "swiglu", "rope", "gelu_mlp", "gelu_fp8")
# AIMv2's RMSNorm, in order of preference: packvit's kernel's backward measured 1.7-2.4x faster than
# Liger-Kernel's on the H200, the forwards tie (benchmarks/fused_ab.py, RESULTS.md); Liger's stays
# as the alternative.
RMSNORM_IMPLS = ("triton", "liger")


@functools.cache
def _has(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except Exception:  # ImportError, or a package broken at import (no driver, wrong triton)
        return False


def _triton_ok() -> bool:
    return _has("triton") and _has("packvit.triton_kernels")


def _liger_ok() -> bool:
    return _has("liger_kernel.ops.fused_add_rms_norm") and _has("liger_kernel.ops.rms_norm")


def _quack_ok() -> bool:
    from . import quack_mlp

    return quack_mlp.available()


def resolve_fused(
    request: str, device: torch.device | str, dtype: torch.dtype, attn_backend: str = "sdpa"
) -> dict[str, str | None]:
    """op name -> the implementation that runs it ("triton", "liger"), or None for the reference path.

    ``request``: "auto" fuses alongside a fused attention kernel, so that a model on the ``sdpa``
    reference backend stays the reference throughout; "on" fuses whatever the attention backend;
    "off" never. Either way only on CUDA in fp16/bf16, and only where the kernel's library imports.
    """
    if request not in FUSED_CHOICES:
        raise ValueError(f"fused_kernels must be one of {FUSED_CHOICES}, got {request!r}")
    out: dict[str, str | None] = dict.fromkeys(OPS)
    if request == "off" or (request == "auto" and attn_backend == "sdpa"):
        return out
    if torch.device(device).type != "cuda" or dtype not in _HALF:
        return out
    if _triton_ok():
        out["add_layernorm"] = out["swiglu"] = out["rope"] = out["gelu_fp8"] = "triton"
    if _quack_ok():
        out["gelu_mlp"] = "quack"
    for impl in RMSNORM_IMPLS:
        if {"triton": _triton_ok, "liger": _liger_ok}[impl]():
            out["add_rmsnorm"] = out["rmsnorm"] = impl
            break
    return out


def runs_fused(*tensors: torch.Tensor) -> bool:
    """Inputs the fused kernels take: CUDA, half precision, one dtype (not, e.g., autocast's mixes)."""
    t0 = tensors[0]
    return t0.is_cuda and t0.dtype in _HALF and all(t.dtype == t0.dtype for t in tensors[1:])


def _kernels():
    from . import triton_kernels

    return triton_kernels


# --- add + norm (+ LayerScale), and norm: packvit's Triton kernel ------------------------------------------


def _empty(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty(0)


@torch.library.custom_op("packvit::add_norm", mutates_args=(), device_types="cuda")
def _add_norm_op(
    x: torch.Tensor,
    a: Optional[torch.Tensor],
    gamma: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    eps: float,
    rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    s, y, mean, rstd = _kernels().norm_fwd(x, a, gamma, weight, bias, eps, rms)
    # Without a residual the kernel's s is x itself; an op may not return its input, so an empty stands in.
    return (s if a is not None else _empty(x)), y, mean, rstd


@_add_norm_op.register_fake
def _(x, a, gamma, weight, bias, eps, rms):
    T = x.shape[0]
    s = torch.empty_like(x) if a is not None else _empty(x)
    return s, torch.empty_like(x), x.new_empty(T, dtype=torch.float32), x.new_empty(T, dtype=torch.float32)


@torch.library.custom_op("packvit::add_norm_backward", mutates_args=(), device_types="cuda")
def _add_norm_bwd_op(
    dy: torch.Tensor,
    ds: Optional[torch.Tensor],
    s: torch.Tensor,
    a: Optional[torch.Tensor],
    gamma: Optional[torch.Tensor],
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    has_bias: bool,
    rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # A custom op returns tensors only: the absent gradients travel as empty tensors.
    dx, da, dg, dw, db = _kernels().norm_bwd(dy, ds, s, a, gamma, weight, mean, rstd, has_bias, rms)
    return (
        dx,
        da if da is not None else _empty(s),
        dg if dg is not None else _empty(weight),
        dw,
        db if db is not None else _empty(weight),
    )


@_add_norm_bwd_op.register_fake
def _(dy, ds, s, a, gamma, weight, mean, rstd, has_bias, rms):
    g = gamma is not None
    return (
        torch.empty_like(s),
        torch.empty_like(s) if g else _empty(s),
        torch.empty_like(gamma) if g else _empty(weight),
        torch.empty_like(weight),
        torch.empty_like(weight) if has_bias else _empty(weight),
    )


# The backward formulas take the kernel to call: the backward custom op when they are the op's
# autograd formula (traced by AOTAutograd under torch.compile, which must see an opaque op), the
# plain function in the eager ``autograd.Function``.
def _add_norm_grads(ctx, ds, dy, bwd):
    s, a, gamma, weight, mean, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(s)
    if not ctx.has_res:
        ds = None
    dx, da, dg, dw, db = bwd(dy, ds, s, a, gamma, weight, mean, rstd, ctx.has_bias, ctx.rms)
    g = gamma is not None
    da = (da if g else dx) if ctx.has_res else None
    return dx, da, (dg if g else None), dw, (db if ctx.has_bias else None), None, None


def _add_norm_save(ctx, x, a, gamma, weight, bias, rms, s, mean, rstd):
    # The norm's input: s with a residual, x without.
    ctx.save_for_backward(s if a is not None else x, a if gamma is not None else None, gamma, weight, mean, rstd)
    ctx.has_bias, ctx.has_res, ctx.rms = bias is not None, a is not None, rms


def _add_norm_setup(ctx, inputs, output):
    x, a, gamma, weight, bias, eps, rms = inputs
    s, y, mean, rstd = output
    _add_norm_save(ctx, x, a, gamma, weight, bias, rms, s, mean, rstd)


_add_norm_op.register_autograd(
    lambda ctx, ds, dy, dmean, drstd: _add_norm_grads(ctx, ds, dy, _add_norm_bwd_op), setup_context=_add_norm_setup
)


class _AddNormFn(torch.autograd.Function):
    """The eager route: the same kernels without the custom op's dispatch (tens of microseconds a call)."""

    @staticmethod
    def forward(ctx, x, a, gamma, weight, bias, eps, rms):
        s, y, mean, rstd = _kernels().norm_fwd(x, a, gamma, weight, bias, eps, rms)
        _add_norm_save(ctx, x, a, gamma, weight, bias, rms, s, mean, rstd)
        if a is None:
            return y
        return s, y

    @staticmethod
    def backward(ctx, *grads):
        ds, dy = grads if ctx.has_res else (None, grads[0])
        return _add_norm_grads(ctx, ds, dy, _kernels().norm_bwd)


def add_norm(
    x: torch.Tensor,
    a: torch.Tensor,
    gamma: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    rms: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, D) residual x and branch output a -> (s = x + gamma * a, norm(s)), one kernel each way.
    ``rms``: AIMv2's RMSNorm (``layers.RMSNorm``); else LayerNorm."""
    if torch.compiler.is_compiling():
        s, y, _, _ = _add_norm_op(x, a, gamma, weight, bias, eps, rms)
        return s, y
    return _AddNormFn.apply(x, a, gamma, weight, bias, eps, rms)


def norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, rms: bool = False
) -> torch.Tensor:
    """(T, D) -> norm(x) with the same kernel, no residual."""
    if torch.compiler.is_compiling():
        return _add_norm_op(x, None, None, weight, bias, eps, rms)[1]
    return _AddNormFn.apply(x, None, None, weight, bias, eps, rms)


# The fp8 variants (inference): the norm's output goes out as e4m3 rows for an FP8 linear
# (``fp8.wants_fp8_input``), no bf16 copy, no autograd.


def add_norm_fp8(x, a, gamma, weight, bias, eps, rms=False) -> tuple[torch.Tensor, FP8Rows]:
    """``add_norm`` with norm(s) as ``FP8Rows``: (s (T, D), e4m3 rows of norm(s)), one kernel."""
    s, q, scale = _kernels().norm_fwd_fp8(x, a, gamma, weight, bias, eps, rms)
    return s, FP8Rows(q, scale, x.dtype)


def norm_fp8(x, weight, bias, eps, rms=False) -> FP8Rows:
    """``norm`` as ``FP8Rows``."""
    _, q, scale = _kernels().norm_fwd_fp8(x, None, None, weight, bias, eps, rms)
    return FP8Rows(q, scale, x.dtype)


def add_layernorm(x, a, gamma, weight, bias, eps):
    """``add_norm`` with LayerNorm: (s = x + gamma * a, layer_norm(s))."""
    return add_norm(x, a, gamma, weight, bias, eps, rms=False)


# --- add + RMSNorm and RMSNorm (Liger-Kernel) ----------------------------------------------------------


def _liger_settings(D: int) -> tuple[int, int]:
    from liger_kernel.ops.utils import calculate_settings

    return calculate_settings(D)


def _add_rmsnorm_fwd(x, a, weight, eps):
    from liger_kernel.ops.fused_add_rms_norm import fused_add_rms_norm_forward

    y, s, rstd, *_ = fused_add_rms_norm_forward(x.contiguous(), a.contiguous(), weight, eps, 0.0, "llama")
    return s, y, rstd


def _add_rmsnorm_bwd(dy, ds, s, weight, rstd):
    from liger_kernel.ops.fused_add_rms_norm import _str_to_casting_mode, fused_add_rms_norm_backward

    block, warps = _liger_settings(s.shape[-1])
    dy = dy.contiguous() if dy is not None else torch.zeros_like(s)
    ds = ds.contiguous() if ds is not None else torch.zeros_like(s)
    dx, _, dw = fused_add_rms_norm_backward(
        dy, ds, s, weight, rstd, 0.0, _str_to_casting_mode["llama"], block, warps, 2, False, needs_dw=True
    )
    return dx, dw


@torch.library.custom_op("packvit::add_rmsnorm", mutates_args=(), device_types="cuda")
def _add_rmsnorm_op(
    x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _add_rmsnorm_fwd(x, a, weight, eps)


@_add_rmsnorm_op.register_fake
def _(x, a, weight, eps):
    return torch.empty_like(x), torch.empty_like(x), x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("packvit::add_rmsnorm_backward", mutates_args=(), device_types="cuda")
def _add_rmsnorm_bwd_op(
    dy: Optional[torch.Tensor], ds: Optional[torch.Tensor], s: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _add_rmsnorm_bwd(dy, ds, s, weight, rstd)


@_add_rmsnorm_bwd_op.register_fake
def _(dy, ds, s, weight, rstd):
    return torch.empty_like(s), torch.empty_like(weight)


def _add_rmsnorm_grads(saved, ds, dy, bwd):
    s, weight, rstd = saved
    dx, dw = bwd(dy, ds, s, weight, rstd)
    return dx, dx, dw, None


def _add_rmsnorm_setup(ctx, inputs, output):
    s, y, rstd = output
    ctx.save_for_backward(s, inputs[2], rstd)


_add_rmsnorm_op.register_autograd(
    lambda ctx, ds, dy, drstd: _add_rmsnorm_grads(ctx.saved_tensors, ds, dy, _add_rmsnorm_bwd_op),
    setup_context=_add_rmsnorm_setup,
)


class _AddRMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, weight, eps):
        s, y, rstd = _add_rmsnorm_fwd(x, a, weight, eps)
        ctx.save_for_backward(s, weight, rstd)
        ctx.mark_non_differentiable(rstd)
        return s, y, rstd

    @staticmethod
    def backward(ctx, ds, dy, drstd):
        return _add_rmsnorm_grads(ctx.saved_tensors, ds, dy, _add_rmsnorm_bwd)


def add_rmsnorm(
    x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, D) residual x and branch output a -> (s = x + a, rms_norm(s)) as ``layers.RMSNorm`` computes it."""
    if torch.compiler.is_compiling():
        s, y, _ = _add_rmsnorm_op(x, a, weight, eps)
    else:
        s, y, _ = _AddRMSNormFn.apply(x, a, weight, eps)
    return s, y


def _rmsnorm_fwd(x, weight, eps):
    from liger_kernel.ops.rms_norm import rms_norm_forward

    y, _, rstd, *_ = rms_norm_forward(x.contiguous(), weight, eps, 0.0, "llama", None)
    return y, rstd


def _rmsnorm_bwd(dy, x, weight, rstd):
    from liger_kernel.ops.rms_norm import _str_to_casting_mode, rms_norm_backward

    block, warps = _liger_settings(x.shape[-1])
    dx, dw = rms_norm_backward(
        dy.contiguous(),
        x.contiguous(),
        weight,
        rstd,
        0.0,
        _str_to_casting_mode["llama"],
        block,
        warps,
        False,
        None,
        needs_dw=True,
    )
    return dx, dw


@torch.library.custom_op("packvit::rmsnorm", mutates_args=(), device_types="cuda")
def _rmsnorm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _rmsnorm_fwd(x, weight, eps)


@_rmsnorm_op.register_fake
def _(x, weight, eps):
    return torch.empty_like(x), x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("packvit::rmsnorm_backward", mutates_args=(), device_types="cuda")
def _rmsnorm_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _rmsnorm_bwd(dy, x, weight, rstd)


@_rmsnorm_bwd_op.register_fake
def _(dy, x, weight, rstd):
    return torch.empty_like(x), torch.empty_like(weight)


def _rmsnorm_grads(saved, dy, bwd):
    x, weight, rstd = saved
    dx, dw = bwd(dy, x, weight, rstd)
    return dx, dw, None


def _rmsnorm_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1], output[1])


_rmsnorm_op.register_autograd(
    lambda ctx, dy, drstd: _rmsnorm_grads(ctx.saved_tensors, dy, _rmsnorm_bwd_op), setup_context=_rmsnorm_setup
)


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = _rmsnorm_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.mark_non_differentiable(rstd)
        return y, rstd

    @staticmethod
    def backward(ctx, dy, drstd):
        return _rmsnorm_grads(ctx.saved_tensors, dy, _rmsnorm_bwd)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """(T, D) -> RMSNorm as ``layers.RMSNorm`` computes it, in one kernel each way."""
    if torch.compiler.is_compiling():
        return _rmsnorm_op(x, weight, eps)[0]
    return _RMSNormFn.apply(x, weight, eps)[0]


# --- SwiGLU ----------------------------------------------------------------------------------------


@torch.library.custom_op("packvit::swiglu", mutates_args=(), device_types="cuda")
def _swiglu_op(h: torch.Tensor) -> torch.Tensor:
    return _kernels().swiglu_fwd(h)


@_swiglu_op.register_fake
def _(h):
    return h.new_empty(h.shape[0], h.shape[1] // 2)


@torch.library.custom_op("packvit::swiglu_backward", mutates_args=(), device_types="cuda")
def _swiglu_bwd_op(do: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return _kernels().swiglu_bwd(do, h)


@_swiglu_bwd_op.register_fake
def _(do, h):
    return torch.empty_like(h)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


_swiglu_op.register_autograd(lambda ctx, do: _swiglu_bwd_op(do, ctx.saved_tensors[0]), setup_context=_swiglu_setup)


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        return _kernels().swiglu_fwd(h)

    @staticmethod
    def backward(ctx, do):
        return _kernels().swiglu_bwd(do, ctx.saved_tensors[0])


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """(T, 2H) fc1 output [gate | up] -> silu(gate) * up (T, H), reading h once."""
    if torch.compiler.is_compiling():
        return _swiglu_op(h)
    return _SwiGLUFn.apply(h)


def gelu_fp8(h: torch.Tensor, approximate: str, width: int | None = None) -> FP8Rows:
    """``F.gelu(h, approximate=...)`` as ``FP8Rows`` for an FP8 fc2 (inference), in one kernel; with
    ``width``, padded with zero columns to it (the fc2's ``rows_width``)."""
    q, scale = _kernels().gelu_fwd_fp8(h, approximate, width)
    return FP8Rows(q, scale, h.dtype)


def swiglu_fp8(h: torch.Tensor, width: int | None = None) -> FP8Rows:
    """``swiglu`` as ``FP8Rows`` for an FP8 fc2 (inference), in one kernel; with ``width``, padded
    with zero columns to it (the fc2's ``rows_width``)."""
    q, scale = _kernels().swiglu_fwd_fp8(h, width)
    return FP8Rows(q, scale, h.dtype)


# --- the whole SwiGLU MLP in training: fc2's input recomputed, not kept --------------------------------
#
# fc2 = nn.Linear keeps its input o = silu(gate) * up (T, H) for its weight gradient, beside the
# (T, 2H) fc1 output that the SwiGLU backward reads: 3 x (T, H) per block. Here the backward's SwiGLU
# kernel writes o again as it computes dh (one more (T, H) write, no read), so only x and h are
# kept: 2 x (T, H). Eager, for nn.Linear fc1 / fc2 (``layers.GatedMlp``).


class _SwiGLUMlpFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        k = _kernels()
        h = torch.nn.functional.linear(x, w1, b1)  # (T, 2H)
        out = torch.nn.functional.linear(k.swiglu_fwd(h), w2, b2)  # (T, D)
        ctx.save_for_backward(x, w1, w2, h)
        ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        x, w1, w2, h = ctx.saved_tensors
        dout = dout.contiguous()
        dh, o = _kernels().swiglu_bwd(dout @ w2, h, with_output=True)  # (T, 2H), (T, H)
        dw2 = dout.t() @ o
        dw1 = dh.t() @ x
        return (dh @ w1, dw1, dh.sum(0) if ctx.has_b1 else None, dw2, dout.sum(0) if ctx.has_b2 else None)


def swiglu_mlp(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None
) -> torch.Tensor:
    """fc2(silu(gate) * up) with fc1 = [gate; up], x (T, D) -> (T, D), keeping x and fc1's output only."""
    return _SwiGLUMlpFn.apply(x.contiguous(), w1, b1, w2, b2)


# --- RoPE on q and k ----------------------------------------------------------------------------------
#
# q and k go in as the strided views of the (T, 3, H, Dh) qkv output and come out rotated and
# contiguous; their gradients come back as two contiguous (T, H, Dh), which ``unbind``'s backward
# stacks with v's into the qkv gradient as on the reference path. cos and sin get no gradient.


def _check_rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> None:
    if cos.requires_grad or sin.requires_grad:
        raise ValueError(
            "rope_qk: cos and sin must not require grad (the fused RoPE has no gradient for the "
            "position tables); use layers.apply_rope for trainable tables"
        )


@torch.library.custom_op("packvit::rope_qk", mutates_args=(), device_types="cuda")
def _rope_op(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels().rope_qk(q, k, cos, sin)


@_rope_op.register_fake
def _(q, k, cos, sin):
    return q.new_empty(q.shape), k.new_empty(k.shape)  # contiguous, whatever the inputs' strides


@torch.library.custom_op("packvit::rope_qk_backward", mutates_args=(), device_types="cuda")
def _rope_bwd_op(
    dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels().rope_qk(dq, dk, cos, sin, backward=True)


@_rope_bwd_op.register_fake
def _(dq, dk, cos, sin):
    return dq.new_empty(dq.shape), dk.new_empty(dk.shape)


def _rope_grads(cos, sin, dq, dk, bwd):
    # An output that reached no loss comes back as None: its gradient is zero.
    dq = dq if dq is not None else torch.zeros_like(dk)
    dk = dk if dk is not None else torch.zeros_like(dq)
    return (*bwd(dq, dk, cos, sin), None, None)


def _rope_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[2], inputs[3])


_rope_op.register_autograd(
    lambda ctx, dq, dk: _rope_grads(*ctx.saved_tensors, dq, dk, _rope_bwd_op), setup_context=_rope_setup
)


class _RopeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _kernels().rope_qk(q, k, cos, sin)

    @staticmethod
    def backward(ctx, dq, dk):
        return _rope_grads(*ctx.saved_tensors, dq, dk, functools.partial(_kernels().rope_qk, backward=True))


def rope_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (T, H, Dh) (strided views of the qkv output are read in place), cos, sin (T, Dh) ->
    ``layers.apply_rope`` of each, contiguous (T, H, Dh), in one kernel each way."""
    _check_rope_tables(cos, sin)
    if torch.compiler.is_compiling():
        return _rope_op(q, k, cos, sin)
    return _RopeFn.apply(q, k, cos, sin)
