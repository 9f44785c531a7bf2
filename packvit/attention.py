"""One attention entry point over packed sequences, several kernels behind it.

Every backend takes the flash-attn varlen signature: ``q, k, v`` as (T, H, Dh), ``cu_seqlens_q/k``
int32 (F + 1,) on the device, ``max_seqlen_q/k`` Python ints, and returns (Tq, H, Dh). Tokens attend
only within their own segment; there is no mask and no padding.

Backends:
    ``fa4``         FlashAttention-4 (``flash-attn-4``: ``flash_attn.cute``), Hopper and newer.
    ``flash_attn``  classic FlashAttention: FA3 (``flash_attn_interface``) or FA2 (``flash_attn``).
    ``torch``       ``torch.nn.attention.varlen.varlen_attn`` (PyTorch's built-in FA2 kernel).
    ``sdpa``        exact reference: per segment ``scaled_dot_product_attention``, segments of
                    equal length batched together. Runs anywhere, in any dtype (CPU, fp32).
    ``auto``        the best of those available for the device and dtype, in the order above.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

BACKENDS = ("fa4", "flash_attn", "torch", "sdpa")

# Fused kernels only run half precision on CUDA devices.
_HALF = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Kernel discovery: each interface is detected by what it exports, because installing
# flash-attn-4 alone makes ``import flash_attn`` succeed without FA2's functions.
# ---------------------------------------------------------------------------------------------


def _import_attr(module: str, attr: str) -> Callable | None:
    try:
        return getattr(importlib.import_module(module), attr, None)
    except Exception:  # ImportError, or a broken CUDA extension raising at import
        return None


@functools.cache
def _fa4_func() -> Callable | None:
    return _import_attr("flash_attn.cute", "flash_attn_varlen_func")


@functools.cache
def _classic_flash_func() -> tuple[str, Callable] | None:
    fa3 = _import_attr("flash_attn_interface", "flash_attn_varlen_func")
    if fa3 is not None:
        return "fa3", fa3
    fa2 = _import_attr("flash_attn", "flash_attn_varlen_func")
    if fa2 is not None:
        return "fa2", fa2
    return None


@functools.cache
def _torch_varlen_func() -> Callable | None:
    return _import_attr("torch.nn.attention.varlen", "varlen_attn")


def available_backends(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> list[str]:
    """Backends that can run on ``device`` in ``dtype``, best first."""
    device = torch.device(device)
    names = []
    if device.type == "cuda" and dtype in _HALF:
        major = torch.cuda.get_device_capability(device)[0] if torch.cuda.is_available() else 0
        if _fa4_func() is not None and major >= 9:
            names.append("fa4")
        if _classic_flash_func() is not None:
            names.append("flash_attn")
        if _torch_varlen_func() is not None:
            names.append("torch")
    names.append("sdpa")
    return names


# Kernel functions of the backends resolved so far, filled by ``resolve_backend`` so that the
# forward (possibly under torch.compile) reads a dict instead of calling an importer.
_RESOLVED: dict[str, Callable] = {}


def _remember(name: str) -> str:
    if name == "torch":
        _RESOLVED[name] = _torch_varlen_func()
    elif name == "flash_attn":
        _RESOLVED[name] = _classic_flash_func()[1]
    return name


def resolve_backend(name: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """Turn a requested backend name into one that runs on ``device``/``dtype``, or raise."""
    if name == "auto":
        return _remember(available_backends(device, dtype)[0])
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {('auto',) + BACKENDS}")
    ok = available_backends(device, dtype)
    if name not in ok:
        why = {
            "fa4": "needs the flash-attn-4 package (flash_attn.cute) and a Hopper or newer GPU",
            "flash_attn": "needs the flash-attn package (FA2 flash_attn or FA3 flash_attn_interface)",
            "torch": "needs torch.nn.attention.varlen (PyTorch >= 2.9)",
        }[name]
        raise ValueError(
            f"attention backend {name!r} is not available on {torch.device(device)} with {dtype}: it {why}, "
            "and runs only fp16/bf16 on CUDA. Available here: " + ", ".join(ok)
        )
    return _remember(name)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


def _host_lens(lens, cu: torch.Tensor) -> list[int]:
    # Host lengths come from the metadata (a CPU tensor or a tuple) when the caller has them;
    # otherwise they are read off cu_seqlens: one device sync, acceptable on this reference path.
    if lens is None:
        return torch.diff(cu).tolist()
    return lens.tolist() if isinstance(lens, torch.Tensor) else list(lens)


def _sdpa_segments(q, k, v, lens_q: list[int], lens_k: list[int], scale: float | None) -> torch.Tensor:
    """Per-segment SDPA; segments of equal (Lq, Lk) are stacked into one batched call."""
    qs, ks, vs = q.split(lens_q), k.split(lens_k), v.split(lens_k)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, key in enumerate(zip(lens_q, lens_k)):
        groups.setdefault(key, []).append(i)
    outs: list[torch.Tensor | None] = [None] * len(lens_q)
    for idx in groups.values():
        # (n, L, H, Dh) -> (n, H, L, Dh)
        qg = torch.stack([qs[i] for i in idx]).transpose(1, 2)
        kg = torch.stack([ks[i] for i in idx]).transpose(1, 2)
        vg = torch.stack([vs[i] for i in idx]).transpose(1, 2)
        og = F.scaled_dot_product_attention(qg, kg, vg, scale=scale).transpose(1, 2)  # (n, Lq, H, Dh)
        for j, i in enumerate(idx):
            outs[i] = og[j]
    return torch.cat(outs, 0)


# Under torch.compile the per-segment loop would be unrolled and specialised to every batch's
# lengths (a recompile per batch), so the compiler sees the reference path as one opaque op whose
# lengths are read at run time, with its gradient written out as a second op. This path is for
# exactness, not speed.
@torch.library.custom_op("packvit::varlen_sdpa", mutates_args=())
def _sdpa_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens_q: torch.Tensor, lens_k: torch.Tensor, scale: float
) -> torch.Tensor:
    return _sdpa_segments(q, k, v, lens_q.tolist(), lens_k.tolist(), scale)


@_sdpa_op.register_fake
def _(q, k, v, lens_q, lens_k, scale):
    return q.new_empty(q.shape[:-1] + v.shape[-1:])


@torch.library.custom_op("packvit::varlen_sdpa_backward", mutates_args=())
def _sdpa_backward_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    lens_q: torch.Tensor, lens_k: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Autograd is off inside a custom op, so the softmax-attention gradient is written out:
    # P = softmax(s QK^T), dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = s dS K, dK = s dS^T Q.
    dq, dk, dv = [], [], []
    spans = zip(q.split(lens_q.tolist()), k.split(lens_k.tolist()), v.split(lens_k.tolist()),
                dout.split(lens_q.tolist()))
    for qi, ki, vi, gi in spans:  # (L, H, Dh) each
        qh, kh, vh, gh = (t.transpose(0, 1) for t in (qi, ki, vi, gi))  # (H, L, Dh)
        p = torch.softmax((qh @ kh.transpose(1, 2)).float() * scale, dim=-1)  # (H, Lq, Lk)
        o = (p.to(vh.dtype) @ vh).float()
        ds = p * ((gh @ vh.transpose(1, 2)).float() - (gh.float() * o).sum(-1, keepdim=True))
        dq.append((ds.to(kh.dtype) @ kh * scale).transpose(0, 1))
        dk.append((ds.transpose(1, 2).to(qh.dtype) @ qh * scale).transpose(0, 1))
        dv.append((p.transpose(1, 2).to(gh.dtype) @ gh).transpose(0, 1))
    return torch.cat(dq).to(q.dtype), torch.cat(dk).to(k.dtype), torch.cat(dv).to(v.dtype)


@_sdpa_backward_op.register_fake
def _(dout, q, k, v, lens_q, lens_k, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _sdpa_setup(ctx, inputs, output):
    q, k, v, lens_q, lens_k, scale = inputs
    ctx.save_for_backward(q, k, v, lens_q, lens_k)
    ctx.scale = scale


def _sdpa_backward(ctx, dout):
    q, k, v, lens_q, lens_k = ctx.saved_tensors
    dq, dk, dv = _sdpa_backward_op(dout, q, k, v, lens_q, lens_k, ctx.scale)
    return dq, dk, dv, None, None, None


_sdpa_op.register_autograd(_sdpa_backward, setup_context=_sdpa_setup)


def _sdpa(q, k, v, cu_q, cu_k, max_q, max_k, scale, seqlens_q, seqlens_k):
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if torch.compiler.is_compiling():
        lens_q = seqlens_q if isinstance(seqlens_q, torch.Tensor) else torch.diff(cu_q).cpu()
        lens_k = seqlens_k if isinstance(seqlens_k, torch.Tensor) else torch.diff(cu_k).cpu()
        return _sdpa_op(q, k, v, lens_q, lens_k, scale)
    lens_q = _host_lens(seqlens_q, cu_q)
    lens_k = lens_q if (seqlens_k is seqlens_q and cu_k is cu_q) else _host_lens(seqlens_k, cu_k)
    return _sdpa_segments(q, k, v, lens_q, lens_k, scale)


def _torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale, seqlens_q, seqlens_k):
    # Already a torch.library custom op with autograd: opaque to torch.compile as it is. It is
    # looked up in a plain dict, not through the cached importer, which dynamo cannot trace.
    fn = _RESOLVED.get("torch") or _RESOLVED.setdefault("torch", _torch_varlen_func())
    return fn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale)


def _classic_flash(q, k, v, cu_q, cu_k, max_q, max_k, scale, seqlens_q, seqlens_k):
    fn = _RESOLVED.get("flash_attn") or _RESOLVED.setdefault("flash_attn", _classic_flash_func()[1])
    out = fn(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale)
    return out[0] if isinstance(out, tuple) else out  # some FA3 releases return (out, lse)


# flash-attn-4 4.0.0b36's Hopper backward returns a wrong dq at head dims 72 (SigLIP2) and 80:
# relative error 1.0 against the fp32 reference on the H100, while 64, 96 and 128 agree to bf16
# rounding (benchmarks/gpu_checks.py). The backward runs other head dims zero-padded to the next
# one that is right.
FA4_BACKWARD_HEAD_DIMS = (64, 96, 128)


def fa4_backward_head_dim(head_dim: int) -> int:
    return next((d for d in FA4_BACKWARD_HEAD_DIMS if d >= head_dim), head_dim)


# FlashAttention-4 is an autograd.Function over CuTe DSL kernels that torch.compile cannot trace.
# Its forward and backward kernels are wrapped as two custom ops with an autograd formula, so a
# compiled block keeps one graph and calls the kernels as opaque nodes (eager runs them the same way).
@torch.library.custom_op("packvit::fa4_varlen_fwd", mutates_args=(), device_types="cuda")
def _fa4_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
    max_q: int, max_k: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    from flash_attn.cute.interface import _flash_attn_fwd

    out, lse, *_ = _flash_attn_fwd(
        q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
        softmax_scale=scale, return_lse=True,  # the backward needs the log-sum-exp
    )
    return out, lse


@_fa4_fwd_op.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    out = q.new_empty(q.shape[:-1] + v.shape[-1:])  # (Tq, H, Dv)
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)  # (H, Tq)
    return out, lse


# Which kernel computes the ``fa4`` backend's backward: FA4's own, or PyTorch's built-in FA2 kernel
# (``aten._flash_attention_backward``) on FA4's forward. FA2 reads the (H, T) natural-log LSE that
# FA4's forward writes (checked against fp32 on the H100 by benchmarks/gpu_checks.py). "auto" takes
# FA2's where it was measured faster (benchmarks/ab_kernels.py, RESULTS.md section 2): batches of
# short frames, 691 tokens on average and below; FA4's from 722, by up to 1.7x on long segments.
FA4_BACKWARD = "auto"  # "auto", "fa4" or "fa2"
FA4_BACKWARD_MIN_MEAN_SEQLEN = 704  # "auto": FA4's backward when segments are this long on average


def _fa4_backward_kernel(num_tokens: int, num_segments: int) -> str:
    if FA4_BACKWARD not in ("auto", "fa4", "fa2"):
        raise ValueError(f"packvit.attention.FA4_BACKWARD must be 'auto', 'fa4' or 'fa2', got {FA4_BACKWARD!r}")
    if FA4_BACKWARD != "auto":
        return FA4_BACKWARD
    return "fa4" if num_tokens >= FA4_BACKWARD_MIN_MEAN_SEQLEN * num_segments else "fa2"


def _fa2_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale):
    no_dropout = torch.zeros(2, dtype=torch.uint64, device=q.device)  # philox state, unused at p = 0
    return torch.ops.aten._flash_attention_backward(
        dout.contiguous(), q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, False,
        no_dropout, q.new_empty(0), scale=scale,
    )


@torch.library.custom_op("packvit::fa4_varlen_bwd", mutates_args=(), device_types="cuda")
def _fa4_bwd_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _fa4_backward_kernel(q.shape[0], cu_q.shape[0] - 1) == "fa2":
        return _fa2_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale)
    from flash_attn.cute.interface import _flash_attn_bwd

    dh = q.shape[-1]
    pad = fa4_backward_head_dim(dh) - dh
    if pad:
        # Zero columns change neither the scores, the log-sum-exp nor rowsum(dO * O); the extra
        # gradient columns are exactly zero and are dropped.
        q, k, v, out, dout = (F.pad(t, (0, pad)) for t in (q, k, v, out, dout))
    dq, dk, dv = _flash_attn_bwd(
        q, k, v, out, dout.contiguous(), lse, scale, False, 0.0,
        cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
    )
    if pad:
        dq, dk, dv = (t[..., :dh].contiguous() for t in (dq, dk, dv))
    return dq, dk, dv


@_fa4_bwd_op.register_fake
def _(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fa4_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = (max_q, max_k, scale)


def _fa4_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = _fa4_bwd_op(dout, q, k, v, out, lse, cu_q, cu_k, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


_fa4_fwd_op.register_autograd(_fa4_backward, setup_context=_fa4_setup)


def _fa4(q, k, v, cu_q, cu_k, max_q, max_k, scale, seqlens_q, seqlens_k):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, _lse = _fa4_fwd_op(q, k, v, cu_q, cu_k, max_q, max_k, scale)
    return out


_KERNELS = {"sdpa": _sdpa, "torch": _torch_varlen, "flash_attn": _classic_flash, "fa4": _fa4}


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    backend: str = "sdpa",
    softmax_scale: float | None = None,
    seqlens_q: torch.Tensor | Sequence[int] | None = None,
    seqlens_k: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """Attention within segments: q (Tq, H, Dh), k/v (Tk, H, Dh) -> (Tq, H, Dh).

    ``backend`` is an already resolved name (see ``resolve_backend``). ``seqlens_q/k`` are optional
    host copies of the segment lengths (a CPU tensor or a sequence of ints) that spare the ``sdpa``
    path a device sync; the fused kernels need only ``cu_seqlens``.
    """
    return _KERNELS[backend](
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, seqlens_q, seqlens_k
    )
