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

The choice is a value: ``resolve_attention`` makes it once, for a device and dtype, as a frozen
``AttentionImpl`` (the kernel's name, what was asked for, where it was chosen for, the ``fa4``
backward rule ``FA4Backward``, and the library function to call). A model holds one and passes
it down its forward; nothing here is module state that a caller would set or patch.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field
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
def _fa4_funcs() -> tuple[Callable, Callable] | None:
    # The private forward and backward that the ``fa4`` ops call (the public
    # ``flash_attn_varlen_func`` is an autograd.Function over them that torch.compile cannot trace):
    # the probe checks the very functions that run.
    fwd = _import_attr("flash_attn.cute.interface", "_flash_attn_fwd")
    bwd = _import_attr("flash_attn.cute.interface", "_flash_attn_bwd")
    return (fwd, bwd) if fwd is not None and bwd is not None else None


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
        if _fa4_funcs() is not None and major >= 9:
            names.append("fa4")
        if _classic_flash_func() is not None:
            names.append("flash_attn")
        if _torch_varlen_func() is not None:
            names.append("torch")
    names.append("sdpa")
    return names


def _library_func(name: str) -> Callable | None:
    """The library function a backend calls through, looked up once when the backend is chosen
    (``fa4`` reaches its kernels from inside its custom ops, ``sdpa`` is packvit's own)."""
    if name == "torch":
        return _torch_varlen_func()
    if name == "flash_attn":
        return _classic_flash_func()[1]
    return None


# ---------------------------------------------------------------------------------------------
# The choice, as a value
# ---------------------------------------------------------------------------------------------

FA4_BACKWARD_KERNELS = ("auto", "fa4", "fa2")


@dataclass(frozen=True)
class FA4Backward:
    """How the ``fa4`` backend computes its backward; part of an ``AttentionImpl``.

    ``kernel``: FA4's own backward (``"fa4"``), PyTorch's built-in FA2 kernel
    (``aten._flash_attention_backward``) on FA4's forward (``"fa2"``), or ``"auto"``: FA2's for
    batches whose segments average under ``min_mean_seqlen`` tokens, FA4's from there. FA2 reads the
    (H, T) natural-log LSE that FA4's forward writes (checked against fp32 on the H100 by
    benchmarks/gpu_checks.py); FA2's backward measured faster on batches of short frames, 691 tokens
    on average and below, FA4's from 722, by up to 1.7x on long segments (benchmarks/ab_kernels.py,
    RESULTS.md section 2).

    ``head_dims``: flash-attn-4 4.0.0b36's Hopper backward returns a wrong dq at head dims 72
    (SigLIP2) and 80: relative error 1.0 against the fp32 reference on the H100, while 64, 96 and
    128 agree to bf16 rounding (benchmarks/gpu_checks.py). FA4's backward runs other head dims
    zero-padded to the next one listed here.

    The custom ops take these as plain arguments (a ``torch.library`` op takes no objects).
    """

    kernel: str = "auto"
    min_mean_seqlen: int = 704
    head_dims: tuple[int, ...] = (64, 96, 128)

    def __post_init__(self):
        if self.kernel not in FA4_BACKWARD_KERNELS:
            raise ValueError(f"FA4Backward.kernel must be one of {FA4_BACKWARD_KERNELS}, got {self.kernel!r}")
        n = self.min_mean_seqlen
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"FA4Backward.min_mean_seqlen must be an int >= 0, got {self.min_mean_seqlen!r}")
        dims = tuple(self.head_dims)
        if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in dims):
            raise ValueError(f"FA4Backward.head_dims must be positive ints, got {self.head_dims!r}")
        object.__setattr__(self, "head_dims", tuple(sorted(dims)))

    def kernel_for(self, num_tokens: int, num_segments: int) -> str:
        """ "fa4" or "fa2" for a batch of ``num_tokens`` in ``num_segments`` segments."""
        if self.kernel != "auto":
            return self.kernel
        return "fa4" if num_tokens >= self.min_mean_seqlen * num_segments else "fa2"

    def padded_head_dim(self, head_dim: int) -> int:
        return _padded_head_dim(head_dim, self.head_dims)

    def __repr__(self) -> str:
        return (
            f"FA4Backward(kernel={self.kernel!r}, min_mean_seqlen={self.min_mean_seqlen}, head_dims={self.head_dims})"
        )


def _padded_head_dim(head_dim: int, head_dims: Sequence[int]) -> int:
    return next((d for d in sorted(head_dims) if d >= head_dim), head_dim)


def fa4_backward_head_dim(head_dim: int, head_dims: Sequence[int] = FA4Backward.head_dims) -> int:
    """The head dim FA4's backward runs ``head_dim`` at (see ``FA4Backward.head_dims``)."""
    return _padded_head_dim(head_dim, head_dims)


@dataclass(frozen=True, repr=False)
class AttentionImpl:
    """The attention kernel a model runs, chosen once (``resolve_attention``) and held as a value.

    A model holds one (``model.attention``) and hands it to every block and pooling head in its
    forward; ``varlen_attention`` takes it as ``backend``. ``name`` is the kernel that runs,
    ``request`` what was asked for ("auto" or a name), ``device_type`` and ``dtype`` where it was
    chosen for, ``compute_dtype`` the dtype the caller named (None: the weights' dtype, which
    ``dtype`` then records), ``fa4_backward`` the ``fa4`` backend's backward rule. ``fn`` is the
    library function the kernel calls (``varlen_attn``, ``flash_attn_varlen_func``), looked up
    here once so that the forward, compiled or not, only reads an attribute.
    """

    name: str
    request: str
    device_type: str
    dtype: torch.dtype
    compute_dtype: torch.dtype | None = None
    fa4_backward: FA4Backward = FA4Backward()
    fn: Callable | None = field(default=None, compare=False)

    def runs_on(self, device: torch.device | str, dtype: torch.dtype) -> bool:
        """Whether this choice was made for ``device``'s type and ``dtype`` (no probe)."""
        return torch.device(device).type == self.device_type and dtype == self.dtype

    def check(self, device: torch.device | str, dtype: torch.dtype) -> None:
        """Raise a clear error if this choice cannot run on ``device`` in ``dtype``, or if its
        request would choose another kernel there (an ``auto`` choice made for another device or
        dtype): moving a model keeps its choice, see ``PackedViT.set_attention``. No probe when the
        choice was made for this device type and dtype (every forward of a model that was not moved)."""
        if self.runs_on(device, dtype):
            return
        device = torch.device(device)
        where = f"{self.device_type} {str(self.dtype).removeprefix('torch.')}"
        here = f"{device.type} {str(dtype).removeprefix('torch.')}"
        try:
            again = resolve_attention(self.request, device, dtype, fa4_backward=self.fa4_backward).name
        except ValueError as e:
            raise ValueError(
                f"attention backend {self.name!r} was chosen for {where} and cannot run on {here} ({e}). "
                "Moving a model keeps its attention choice: call model.set_attention(...) after .to()"
            ) from None
        if again != self.name:
            raise ValueError(
                f"attention {self.request!r} was chosen for {where} ({self.name!r}); on {here} it chooses {again!r}. "
                f"Moving a model keeps its attention choice: call model.set_attention({self.request!r}) after .to(), "
                f"or model.set_attention({self.name!r}) to keep {self.name!r}"
            )

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_k: torch.Tensor,
        max_seqlen_q: int,
        max_seqlen_k: int,
        *,
        softmax_scale: float | None = None,
        seqlens_q=None,
        seqlens_k=None,
    ) -> torch.Tensor:
        return _KERNELS[self.name](
            q,
            k,
            v,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            softmax_scale,
            seqlens_q,
            seqlens_k,
            self.fn,
            self.fa4_backward,
        )

    def __repr__(self) -> str:
        dt = str(self.compute_dtype or self.dtype).removeprefix("torch.")
        parts = [f"{self.name!r}", f"request={self.request!r}", f"for={self.device_type}/{dt}"]
        if self.compute_dtype is not None:
            parts.append("compute_dtype=explicit")
        if self.name == "fa4":
            parts.append(f"fa4_backward={self.fa4_backward!r}")
        return f"AttentionImpl({', '.join(parts)})"


def resolve_attention(
    backend: str | AttentionImpl = "auto",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    compute_dtype: torch.dtype | None = None,
    fa4_backward: FA4Backward | None = None,
) -> AttentionImpl:
    """Choose the attention kernel for ``device`` and ``dtype`` once, as an ``AttentionImpl``, or raise.

    ``backend``: "auto" (the best available, in the order of ``BACKENDS``) or a backend name; an
    ``AttentionImpl`` is checked and returned as it is. ``compute_dtype`` is only recorded (see
    ``AttentionImpl``); ``dtype`` is what the kernel is chosen for.
    """
    if isinstance(backend, AttentionImpl):
        backend.check(device, dtype)
        return backend
    device = torch.device(device)
    rule = FA4Backward() if fa4_backward is None else fa4_backward
    if not isinstance(rule, FA4Backward):
        raise TypeError(f"fa4_backward must be an FA4Backward, got {type(rule).__name__}")
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {('auto',) + BACKENDS}")
    if backend == "sdpa":  # runs anywhere: nothing to probe
        return AttentionImpl("sdpa", "sdpa", device.type, dtype, compute_dtype, rule, None)
    ok = available_backends(device, dtype)
    if backend == "auto":
        name = ok[0]
    elif backend not in ok:
        why = {
            "fa4": "needs the flash-attn-4 package (flash_attn.cute.interface) and a Hopper or newer GPU",
            "flash_attn": "needs the flash-attn package (FA2 flash_attn or FA3 flash_attn_interface)",
            "torch": "needs torch.nn.attention.varlen (PyTorch >= 2.9)",
        }[backend]
        raise ValueError(
            f"attention backend {backend!r} is not available on {device} with {dtype}: it {why}, "
            "and runs only fp16/bf16 on CUDA. Available here: " + ", ".join(ok)
        )
    else:
        name = backend
    return AttentionImpl(name, backend, device.type, dtype, compute_dtype, rule, _library_func(name))


def resolve_backend(name: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The name of the backend ``resolve_attention`` chooses (kept for callers that want a string)."""
    return resolve_attention(name, device, dtype).name


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
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lens_q: torch.Tensor,
    lens_k: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Autograd is off inside a custom op, so the softmax-attention gradient is written out:
    # P = softmax(s QK^T), dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = s dS K, dK = s dS^T Q.
    dq, dk, dv = [], [], []
    spans = zip(
        q.split(lens_q.tolist()), k.split(lens_k.tolist()), v.split(lens_k.tolist()), dout.split(lens_q.tolist())
    )
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


def _sdpa(q, k, v, cu_q, cu_k, max_q, max_k, scale, seqlens_q, seqlens_k, fn, rule):
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if torch.compiler.is_compiling():
        lens_q = seqlens_q if isinstance(seqlens_q, torch.Tensor) else torch.diff(cu_q).cpu()
        lens_k = seqlens_k if isinstance(seqlens_k, torch.Tensor) else torch.diff(cu_k).cpu()
        return _sdpa_op(q, k, v, lens_q, lens_k, scale)
    lens_q = _host_lens(seqlens_q, cu_q)
    lens_k = lens_q if (seqlens_k is seqlens_q and cu_k is cu_q) else _host_lens(seqlens_k, cu_k)
    return _sdpa_segments(q, k, v, lens_q, lens_k, scale)


def _torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale, seqlens_q, seqlens_k, fn, rule):
    # ``fn`` is ``varlen_attn``, looked up when the backend was chosen: already a torch.library
    # custom op with autograd, so opaque to torch.compile as it is.
    return fn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale)


def _classic_flash(q, k, v, cu_q, cu_k, max_q, max_k, scale, seqlens_q, seqlens_k, fn, rule):
    out = fn(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale)
    return out[0] if isinstance(out, tuple) else out  # some FA3 releases return (out, lse)


# FlashAttention-4 is an autograd.Function over CuTe DSL kernels that torch.compile cannot trace.
# Its forward and backward kernels are wrapped as two custom ops with an autograd formula, so a
# compiled block keeps one graph and calls the kernels as opaque nodes. Eager calls skip the op
# dispatcher (``_fa4``), as ``fused_ops`` does: the same two functions, reached without it.
# The backward rule (``FA4Backward``) travels as plain arguments of the forward op, which its
# autograd formula hands to the backward op: the op reads no module state.
def _fa4_fwd(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FA4's forward: (out (Tq, H, Dv), lse (H, Tq) fp32)."""
    fwd, _bwd = _fa4_funcs()
    out, lse, *_ = fwd(
        q,
        k,
        v,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        max_seqlen_q=max_q,
        max_seqlen_k=max_k,
        softmax_scale=scale,
        return_lse=True,  # the backward needs the log-sum-exp
    )
    return out, lse


def _fa4_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, scale: float, rule: "FA4Backward"):
    """(dq, dk, dv) by the kernel ``rule`` picks for this batch. The rule is applied here, at run
    time, where the token and segment counts are plain ints (deciding in the traced forward would
    specialise a compiled graph on the batch's size)."""
    if rule.kernel_for(q.shape[0], cu_q.shape[0] - 1) == "fa2":
        return _fa2_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale)
    _fwd, bwd = _fa4_funcs()
    dh = q.shape[-1]
    pad = rule.padded_head_dim(dh) - dh
    copy = _head_copier(q) if pad else None
    if pad:
        # Zero columns change neither the scores, the log-sum-exp nor rowsum(dO * O); the extra
        # gradient columns are exactly zero and are dropped.
        q, k, v, out, dout = copy((q, k, v, out, dout), dh + pad)
    dq, dk, dv = bwd(
        q,
        k,
        v,
        out,
        dout.contiguous(),
        lse,
        scale,
        False,
        0.0,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        max_seqlen_q=max_q,
        max_seqlen_k=max_k,
    )
    if pad:
        dq, dk, dv = copy((dq, dk, dv), dh)
    return dq, dk, dv


def _head_copier(x: torch.Tensor) -> Callable:
    """(tensors, width) -> contiguous (T, H, width) copies, zero-padded or cut: packvit's Triton kernel
    (``triton_kernels.copy_heads``: the five pads in one launch at the bytes' time) where it runs,
    else ``F.pad`` / a slice."""
    from .fused_ops import _triton_ok

    if x.is_cuda and _triton_ok():
        from .triton_kernels import copy_heads

        return copy_heads

    def plain(tensors, width):
        d = tensors[0].shape[-1]
        return [F.pad(t, (0, width - d)) if width > d else t[..., :width].contiguous() for t in tensors]

    return plain


@torch.library.custom_op("packvit::fa4_varlen_fwd", mutates_args=(), device_types="cuda")
def _fa4_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    scale: float,
    bwd_kernel: str,
    bwd_min_mean_seqlen: int,
    bwd_head_dims: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    return _fa4_fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale)


@_fa4_fwd_op.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, scale, bwd_kernel, bwd_min_mean_seqlen, bwd_head_dims):
    out = q.new_empty(q.shape[:-1] + v.shape[-1:])  # (Tq, H, Dv)
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)  # (H, Tq)
    return out, lse


def _fa2_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale):
    no_dropout = torch.zeros(2, dtype=torch.uint64, device=q.device)  # philox state, unused at p = 0
    return torch.ops.aten._flash_attention_backward(
        dout.contiguous(),
        q,
        k,
        v,
        out,
        lse,
        cu_q,
        cu_k,
        max_q,
        max_k,
        0.0,
        False,
        no_dropout,
        q.new_empty(0),
        scale=scale,
    )


@torch.library.custom_op("packvit::fa4_varlen_bwd", mutates_args=(), device_types="cuda")
def _fa4_bwd_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    scale: float,
    bwd_kernel: str,
    bwd_min_mean_seqlen: int,
    bwd_head_dims: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rule = FA4Backward(bwd_kernel, bwd_min_mean_seqlen, tuple(bwd_head_dims))
    return _fa4_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, rule)


@_fa4_bwd_op.register_fake
def _(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, bwd_kernel, bwd_min_mean_seqlen, bwd_head_dims):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fa4_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, *rule = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = (max_q, max_k, scale, *rule)


def _fa4_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = _fa4_bwd_op(dout, q, k, v, out, lse, cu_q, cu_k, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_fa4_fwd_op.register_autograd(_fa4_backward, setup_context=_fa4_setup)


class _FA4Fn(torch.autograd.Function):
    """The eager route with autograd: the same two functions without the custom ops' dispatch,
    which cost the host 30-110 us a call on the H200 without autograd and 50-200 with it, beside
    80-160 for FA4's own Python (two runs; RESULTS.md, "session 10")."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, scale, rule):
        out, lse = _fa4_fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.args = (max_q, max_k, scale, rule)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        dq, dk, dv = _fa4_bwd(dout, q, k, v, out, lse, cu_q, cu_k, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None


def _fa4(q, k, v, cu_q, cu_k, max_q, max_k, scale, seqlens_q, seqlens_k, fn, rule):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if torch.compiler.is_compiling():  # an opaque node in the compiled graph
        out, _lse = _fa4_fwd_op(
            q, k, v, cu_q, cu_k, max_q, max_k, scale, rule.kernel, rule.min_mean_seqlen, list(rule.head_dims)
        )
        return out
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _FA4Fn.apply(q, k, v, cu_q, cu_k, max_q, max_k, scale, rule)
    return _fa4_fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale)[0]


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
    backend: str | AttentionImpl = "sdpa",
    softmax_scale: float | None = None,
    seqlens_q: torch.Tensor | Sequence[int] | None = None,
    seqlens_k: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """Attention within segments: q (Tq, H, Dh), k/v (Tk, H, Dh) -> (Tq, H, Dh).

    ``backend`` is an ``AttentionImpl`` (``resolve_attention``; what models pass), or a backend
    name, whose library function is then looked up on each call and whose ``fa4`` backward follows
    the default ``FA4Backward()`` (for scripts and tests; not under ``torch.compile``).
    ``seqlens_q/k`` are optional host copies of the segment lengths (a CPU tensor or a sequence of
    ints) that spare the ``sdpa`` path a device sync; the fused kernels need only ``cu_seqlens``.
    """
    if isinstance(backend, AttentionImpl):
        fn, rule, name = backend.fn, backend.fa4_backward, backend.name
    else:
        if backend not in _KERNELS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
        fn, rule, name = _library_func(backend), _DEFAULT_FA4_BACKWARD, backend
    return _KERNELS[name](
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, seqlens_q, seqlens_k, fn, rule
    )


_DEFAULT_FA4_BACKWARD = FA4Backward()
