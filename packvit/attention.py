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


def resolve_backend(name: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """Turn a requested backend name into one that runs on ``device``/``dtype``, or raise."""
    if name == "auto":
        return available_backends(device, dtype)[0]
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
    return name


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


def _sdpa(q, k, v, cu_q, cu_k, max_q, max_k, scale, seqlens_q, seqlens_k):
    # Host lengths come from the metadata when the caller has them; otherwise read them off
    # cu_seqlens (free on the CPU, one sync on a GPU: this is the reference path).
    if seqlens_q is None:
        seqlens_q = torch.diff(cu_q).tolist()
    if seqlens_k is None:
        seqlens_k = seqlens_q if cu_k is cu_q else torch.diff(cu_k).tolist()
    qs, ks, vs = q.split(seqlens_q), k.split(seqlens_k), v.split(seqlens_k)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, key in enumerate(zip(seqlens_q, seqlens_k)):
        groups.setdefault(key, []).append(i)
    outs: list[torch.Tensor | None] = [None] * len(seqlens_q)
    for idx in groups.values():
        # (n, L, H, Dh) -> (n, H, L, Dh)
        qg = torch.stack([qs[i] for i in idx]).transpose(1, 2)
        kg = torch.stack([ks[i] for i in idx]).transpose(1, 2)
        vg = torch.stack([vs[i] for i in idx]).transpose(1, 2)
        og = F.scaled_dot_product_attention(qg, kg, vg, scale=scale).transpose(1, 2)  # (n, Lq, H, Dh)
        for j, i in enumerate(idx):
            outs[i] = og[j]
    return torch.cat(outs, 0)


def _torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale, seqlens_q, seqlens_k):
    return _torch_varlen_func()(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale)


def _classic_flash(q, k, v, cu_q, cu_k, max_q, max_k, scale, seqlens_q, seqlens_k):
    _, fn = _classic_flash_func()
    out = fn(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale)
    return out[0] if isinstance(out, tuple) else out  # some FA3 releases return (out, lse)


def _fa4(q, k, v, cu_q, cu_k, max_q, max_k, scale, seqlens_q, seqlens_k):
    out, _lse = _fa4_func()(
        q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k, softmax_scale=scale
    )
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
    seqlens_q: Sequence[int] | None = None,
    seqlens_k: Sequence[int] | None = None,
) -> torch.Tensor:
    """Attention within segments: q (Tq, H, Dh), k/v (Tk, H, Dh) -> (Tq, H, Dh).

    ``backend`` is an already resolved name (see ``resolve_backend``). ``seqlens_q/k`` are optional
    host copies of the segment lengths that spare the ``sdpa`` path a device sync.
    """
    return _KERNELS[backend](
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, seqlens_q, seqlens_k
    )
