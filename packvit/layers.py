"""Building blocks shared by the three families: norms, MLPs, rotary, attention, the block.

Every module works on packed tokens, ``x`` of shape (T, D); see ``packing.py`` for the notation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import fused_ops, quack_mlp
from .attention import AttentionImpl
from .fp8 import FP8Linear, FP8Rows, runs_plain, wants_fp8_input
from .packing import PackedMeta

# The GELU activations by name, as ``F.gelu``'s ``approximate`` argument (also what the fused GELU
# kernels take: ``fused_ops.gelu_fp8``).
GELU_APPROXIMATE = {"gelu": "none", "gelu_pytorch_tanh": "tanh"}

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    **{name: functools.partial(F.gelu, approximate=a) for name, a in GELU_APPROXIMATE.items()},
    "silu": F.silu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class RMSNorm(nn.Module):
    """RMSNorm as AIMv2 writes it: normalise in fp32, cast back, then scale (the order matters in bf16)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.fused: str | None = None  # set by the model (``PackedViT.set_fused_kernels``)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and fused_ops.runs_fused(x, self.weight):
            # Eagerly the lines below are seven kernels, 0.32 ms per call at 23k tokens on the H200.
            if self.fused == "liger":
                return fused_ops.rmsnorm(x, self.weight, self.eps)
            return fused_ops.norm(x, self.weight, None, self.eps, rms=True)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}" + (f", fused={self.fused}" if self.fused else "")


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}")


@dataclass(frozen=True)
class Tuning:
    """Speed and memory trade-offs of the fused CUDA path, held by the model as one value
    (``PackedViT.set_tuning``) and read by its blocks; the reference path ignores them.

    train_saves_less: training keeps fewer activations for backward where recomputing them is free:
        the SwiGLU MLP's fc2 input (rewritten by the backward's SwiGLU kernel) and v after the fused
        RoPE (copied, so that the (T, 3D) qkv output is not kept beside the rotated q and k). False:
        what the autograd of the plain modules keeps (for A/B runs).
    mlp_chunk_tokens: inference runs the MLP over row chunks of this many tokens when a batch has
        more than twice as many, so that its (T, hidden) activations are never whole. 0 (off) by
        default: on the H200 at 23k tokens it saved no peak memory (the peak is elsewhere: weights,
        attention, the (T, 3D) qkv output) and cost 1.7-4.5 ms of host launches per forward.
    quack_min_tokens: the GELU MLPs run quack's GEMM with the activation in its epilogue
        (``packvit.quack_mlp``) from this many tokens: its launch path costs the host about 0.2 ms a
        call more than cuBLAS's, which made eager forwards of small batches slower (one 858-patch
        SigLIP2 image: 17.1 -> 23.0 ms on the H200).
    """

    train_saves_less: bool = True
    mlp_chunk_tokens: int = 0
    quack_min_tokens: int = 8192


DEFAULT_TUNING = Tuning()


class Mlp(nn.Module):
    """fc2(act(fc1(x)))."""

    tuning: Tuning = DEFAULT_TUNING  # the model's, set by PackedViT.set_tuning

    def __init__(self, dim: int, hidden: int, act: str, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.act = activation(act)
        # cuBLASLt can apply bias and the tanh GELU in the matmul's epilogue (computed in fp32 on
        # the fp32 accumulator), which saves a read and a write of the (T, hidden) activation.
        # Only for the tanh approximation, which is what the epilogue computes (checked against
        # F.gelu(approximate="tanh") on the H100 by benchmarks/gpu_checks.py), and only without
        # autograd: the op has no derivative.
        self.fused_gelu_tanh = act == "gelu_pytorch_tanh" and bias
        self.act_name = act
        # "quack": fc1's GEMM applies the activation in its epilogue, forward and backward
        # (``packvit.quack_mlp``); set by the model (``PackedViT.set_fused_kernels``).
        self.fused: str | None = None
        # "triton": for an FP8 fc2 the activation writes fc2's e4m3 input itself (``fused_ops.gelu_fp8``).
        self.fused_gelu_fp8: str | None = None

    def forward(self, x: torch.Tensor | FP8Rows) -> torch.Tensor:  # (T, D) -> (T, D)
        if isinstance(x, FP8Rows):  # norm2 wrote fc1's e4m3 input (``Block._mlp_takes_fp8``)
            return self.fc2(self._act(self.fc1(x)))
        if self.fused == "quack" and quack_mlp.applies(self, x):
            return quack_mlp.gelu_mlp(self, x, self.act_name)
        if (
            self.fused_gelu_tanh
            and x.is_cuda
            and x.dtype in (torch.float16, torch.bfloat16)
            and not torch.is_grad_enabled()
            and not (isinstance(self.fc1, FP8Linear) and self.fc1.uses_fp8(x))
        ):
            h = linear_gelu_tanh(x, self.fc1.weight, self.fc1.bias)  # (T, hidden)
        else:
            h = self._act(self.fc1(x))
        return self.fc2(h)

    def _act(self, h: torch.Tensor) -> torch.Tensor | FP8Rows:
        """The activation of fc1's output h (T, hidden); for an FP8 fc2 that will run FP8, written as
        its e4m3 rows in the same pass where packvit's kernel runs (``fp8.wants_fp8_input``)."""
        if self.fused_gelu_fp8 == "triton" and fused_ops.runs_fused(h) and wants_fp8_input(self.fc2, h.shape[0]):
            return fused_ops.gelu_fp8(h, GELU_APPROXIMATE[self.act_name], self.fc2.rows_width)
        return self.act(h)

    def extra_repr(self) -> str:
        return f"fused={self.fused}" if self.fused else ""


# Inductor would split ``_addmm_activation`` into a plain matmul and a bias + GELU kernel (it
# unfuses epilogues to fuse them with pointwise neighbours), which writes and reads the (T, hidden)
# activation once more. As an opaque op the compiled graph keeps cuBLASLt's epilogue.
@torch.library.custom_op("packvit::linear_gelu_tanh", mutates_args=(), device_types="cuda")
def _linear_gelu_tanh_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)


@_linear_gelu_tanh_op.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x @ weight.T + bias) in one cuBLASLt call; inference only (no derivative)."""
    if torch.compiler.is_compiling():
        return _linear_gelu_tanh_op(x, weight, bias)
    return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)  # eager: skip the op's dispatch


def mlp_in_chunks(mlp: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """mlp(h) for (T, D) h, over row chunks in inference (see ``Tuning.mlp_chunk_tokens``)."""
    C, T = mlp.tuning.mlp_chunk_tokens, h.shape[0]
    if not C or T <= 2 * C or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return mlp(h)
    first = mlp(h[:C])  # (C, D)
    out = first.new_empty(T, first.shape[1])  # (T, D)
    out[:C] = first
    for i in range(C, T, C):
        out[i : i + C] = mlp(h[i : i + C])
    return out


class GatedMlp(nn.Module):
    """fc2(act(gate(x)) * up(x)), with gate and up fused in one matmul: fc1 = [gate; up]."""

    tuning: Tuning = DEFAULT_TUNING  # the model's, set by PackedViT.set_tuning

    def __init__(self, dim: int, hidden: int, act: str, bias: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.act = activation(act)
        self.act_name = act
        self.fused: str | None = None  # a fused silu(gate) * up, set by the model for act == "silu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.fused
            and self.tuning.train_saves_less
            and torch.is_grad_enabled()
            and runs_plain(self.fc1, x.shape[0])
            and runs_plain(self.fc2, x.shape[0])
            and fused_ops.runs_fused(x, self.fc1.weight)
            and not torch.compiler.is_compiling()
        ):
            # Training: the same kernels, with fc2's input recomputed in backward instead of kept.
            return fused_ops.swiglu_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        h = self.fc1(x)  # (T, 2 * hidden)
        if self.fused and fused_ops.runs_fused(h):
            # One pass over h instead of three kernels (silu, product, and their reads of the halves);
            # for an FP8 fc2 it writes fc2's e4m3 input (``fp8.wants_fp8_input``).
            if self.fused == "triton" and wants_fp8_input(self.fc2, h.shape[0]):
                return self.fc2(fused_ops.swiglu_fp8(h, self.fc2.rows_width))
            return self.fc2(fused_ops.swiglu(h))
        gate, up = h.chunk(2, dim=-1)
        return self.fc2(self.act(gate) * up)

    def extra_repr(self) -> str:
        return f"fused={self.fused}" if self.fused else ""


class LayerScale(nn.Module):
    # Not called ``gamma``: transformers' from_pretrained renames checkpoint keys containing
    # "gamma" to "weight", which silently dropped a fine-tuned tower's LayerScale when a LLaVA
    # checkpoint holding it was reloaded.
    def __init__(self, dim: int, init: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class DropPath(nn.Module):
    """Stochastic depth per frame (HF drops per image; a frame is an image in the packed format)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor, meta: PackedMeta) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask_F = torch.rand(meta.num_frames, device=x.device, dtype=x.dtype).add_(keep).floor_()  # (F,)
        mask_T = mask_F.index_select(0, meta.frame_of_token)  # (T,)
        return x * (mask_T / keep)[:, None]

    def extra_repr(self) -> str:
        return f"p={self.p}"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, H, Dh), cos/sin (T, Dh). Tokens that must not rotate carry cos=1, sin=0, which is exact."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


class Attention(nn.Module):
    """Multi-head self-attention over packed segments, with one fused QKV projection.

    The kernel is the model's ``AttentionImpl``, passed in by the forward (``attn``): every block
    and pooling head runs the one choice the model holds. Biases are per projection (``q_bias``,
    ``k_bias``, ``v_bias``) because DINOv3 has query and value biases but no key bias; a missing
    one is a zero in the fused bias.
    """

    tuning: Tuning = DEFAULT_TUNING  # the model's, set by PackedViT.set_tuning

    def __init__(self, dim: int, num_heads: int, qkv_bias: tuple[bool, bool, bool], proj_bias: bool):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        for name, on in zip(("q_bias", "k_bias", "v_bias"), qkv_bias):
            self.register_parameter(name, nn.Parameter(torch.zeros(dim)) if on else None)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.fused_rope: str | None = None  # the fused RoPE of q and k, set by the model (``fused_ops``)

    def qkv_bias(self) -> torch.Tensor | None:
        parts = (self.q_bias, self.k_bias, self.v_bias)
        if all(p is None for p in parts):
            return None
        zeros = self.qkv.weight.new_zeros(self.qkv.weight.shape[1])
        return torch.cat([p if p is not None else zeros for p in parts])

    def forward(
        self,
        x: torch.Tensor,
        meta: PackedMeta,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        attn: AttentionImpl,
    ) -> torch.Tensor:
        T, D = x.shape
        if isinstance(self.qkv, FP8Linear):  # the fused bias goes into the FP8 matmul (``packvit.fp8``)
            qkv = self.qkv(x, self.qkv_bias()).view(T, 3, self.num_heads, self.head_dim)
        else:
            qkv = F.linear(x, self.qkv.weight, self.qkv_bias()).view(T, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(1)  # (T, H, Dh) each
        if rope is not None:
            cos, sin = rope  # (T, Dh) each
            if (
                self.fused_rope
                and fused_ops.runs_fused(q, k, cos, sin)
                and not (cos.requires_grad or sin.requires_grad)
            ):
                # One kernel reads q and k where the matmul wrote them and writes both rotated,
                # contiguous; the lines below are a strided pass and a cat for each.
                q, k = fused_ops.rope_qk(q, k, cos, sin)
                if self.tuning.train_saves_less and torch.is_grad_enabled():
                    # Attention keeps q, k, v for backward: with v a view of qkv, the whole (T, 3D)
                    # output would stay alive beside the rotated q and k. One (T, D) copy frees it.
                    v = v.contiguous()
            else:
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = attn(
            q,
            k,
            v,
            meta.cu_seqlens,
            meta.cu_seqlens,
            meta.max_seqlen,
            meta.max_seqlen,
            seqlens_q=meta.seqlens_cpu,
            seqlens_k=meta.seqlens_cpu,
        )  # (T, H, Dh)
        return self.proj(o.reshape(T, D))

    def extra_repr(self) -> str:
        return f"fused_rope={self.fused_rope}" if self.fused_rope else ""


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp: nn.Module,
        norm: str,
        norm_eps: float,
        qkv_bias: tuple[bool, bool, bool],
        proj_bias: bool,
        layerscale: float | None = None,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.norm1 = make_norm(norm, dim, norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, proj_bias)
        self.ls1 = LayerScale(dim, layerscale) if layerscale is not None else nn.Identity()
        self.norm2 = make_norm(norm, dim, norm_eps)
        self.mlp = mlp
        self.ls2 = LayerScale(dim, layerscale) if layerscale is not None else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else None
        # The kernel that does ``x + ls1(a)`` and ``norm2`` of it in one pass ("triton" for
        # LayerNorm, "liger" for RMSNorm; see ``fused_ops``), or None; set by the model.
        self.fused_add_norm: str | None = None

    def forward(
        self,
        x: torch.Tensor,
        meta: PackedMeta,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        attn: AttentionImpl,
        checkpoint_mlp: bool = False,
        normed: torch.Tensor | FP8Rows | None = None,
        next_norm: tuple | None = None,
        next_fp8: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | FP8Rows | None]:
        if normed is not None:  # chained norms (``packvit.chained``): norm1(x) came with x
            return self._forward_chained(x, normed, meta, rope, checkpoint_mlp, next_norm, attn, next_fp8)
        n1 = self.norm1
        qkv_takes_fp8 = (  # packvit's norm kernel writes an FP8 qkv's e4m3 input itself
            getattr(n1, "fused", None) == "triton"
            and fused_ops.runs_fused(x, n1.weight)
            and wants_fp8_input(self.attn.qkv, x.shape[0])
        )
        h = fused_ops.norm_fp8(x, *norm_args(n1)) if qkv_takes_fp8 else n1(x)
        a = self.attn(h, meta, rope, attn=attn)
        if self._fuses(x, a):
            return self._forward_fused(x, a, checkpoint_mlp)
        a = self.ls1(a)
        if self.drop_path is not None:
            a = self.drop_path(a, meta)
        x = x + a
        if checkpoint_mlp:
            # Selective checkpointing: the MLP's (T, hidden) activations, the largest a block saves
            # for backward, are recomputed instead of kept; attention's are kept.
            m = checkpoint(self._mlp, x, use_reentrant=False)
        else:
            m = self._mlp(x)
        if self.drop_path is not None:
            m = self.drop_path(m, meta)
        return x + m

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def _fuses(self, x: torch.Tensor, a: torch.Tensor) -> bool:
        if not self.fused_add_norm or (self.drop_path is not None and self.training):
            return False
        if isinstance(self.norm2, RMSNorm):
            ok_ls = self.fused_add_norm == "triton" or not isinstance(self.ls1, LayerScale)  # Liger's has no gamma
            return ok_ls and fused_ops.runs_fused(x, a, self.norm2.weight)
        return isinstance(self.norm2, nn.LayerNorm) and self.norm2.weight is not None and fused_ops.runs_fused(x, a)

    def _forward_fused(self, x: torch.Tensor, a: torch.Tensor, checkpoint_mlp: bool) -> torch.Tensor:
        """The same block with x + ls1(a) and norm2 in one kernel (forward and backward), and
        x + ls2(m) in one ``addcmul``: two and three passes over (T, D) fewer than the reference."""
        n = self.norm2
        gamma = self.ls1.scale if isinstance(self.ls1, LayerScale) else None
        if self.fused_add_norm == "liger":
            x, h = fused_ops.add_rmsnorm(x, a, n.weight, n.eps)
        else:
            add_norm = fused_ops.add_norm_fp8 if self._mlp_takes_fp8(x) else fused_ops.add_norm
            x, h = add_norm(x, a, gamma, n.weight, getattr(n, "bias", None), n.eps, rms=isinstance(n, RMSNorm))
        # With checkpointing, the normed h (T, D) is what the checkpoint keeps, in place of x.
        m = checkpoint(self.mlp, h, use_reentrant=False) if checkpoint_mlp else mlp_in_chunks(self.mlp, h)
        if isinstance(self.ls2, LayerScale):
            return torch.addcmul(x, m, self.ls2.scale)
        return x + m

    def _forward_chained(self, x, h, meta, rope, checkpoint_mlp, next_norm, attn: AttentionImpl, next_fp8=False):
        """The fused block with norm1 done by the caller: ``h`` is norm1(x), and the final
        x + ls2(m) runs with the next block's norm1 (``next_norm`` = its ``norm_args``) as one
        kernel each way. Returns (x, next block's normed input, or None after the last block);
        ``next_fp8``: that input as ``FP8Rows`` for the next block's FP8 qkv."""
        a = self.attn(h, meta, rope, attn=attn)
        n = self.norm2
        gamma = self.ls1.scale if isinstance(self.ls1, LayerScale) else None
        x, h = (fused_ops.add_norm_fp8 if self._mlp_takes_fp8(x) else fused_ops.add_norm)(x, a, gamma, *norm_args(n))
        m = checkpoint(self.mlp, h, use_reentrant=False) if checkpoint_mlp else mlp_in_chunks(self.mlp, h)
        gamma = self.ls2.scale if isinstance(self.ls2, LayerScale) else None
        if next_norm is None:
            return (torch.addcmul(x, m, gamma) if gamma is not None else x + m), None
        return (fused_ops.add_norm_fp8 if next_fp8 else fused_ops.add_norm)(x, m, gamma, *next_norm)

    def _mlp_takes_fp8(self, x: torch.Tensor) -> bool:
        """Whether norm2 (packvit's kernel) writes the MLP's input as e4m3 rows for an FP8 fc1;
        not with row chunks (``Tuning.mlp_chunk_tokens``), which slice a tensor."""
        fc1 = getattr(self.mlp, "fc1", None)
        return (
            self.fused_add_norm == "triton"
            and not self.mlp.tuning.mlp_chunk_tokens
            and wants_fp8_input(fc1, x.shape[0])
        )

    def extra_repr(self) -> str:
        return f"fused_add_norm={self.fused_add_norm}" if self.fused_add_norm else ""


def norm_args(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, float, bool]:
    """(weight, bias, eps, rms) of a LayerNorm or ``RMSNorm``, as ``fused_ops.add_norm`` takes them."""
    if isinstance(norm, RMSNorm):
        return norm.weight, None, norm.eps, True
    return norm.weight, norm.bias, norm.eps, False


def pool_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: PackedMeta, attn: AttentionImpl
) -> torch.Tensor:
    """One query per frame attending to that frame's tokens: q (F, H, Dh), k/v (T, H, Dh) -> (F, H, Dh)."""
    return attn(
        q,
        k,
        v,
        meta.cu_frames,
        meta.cu_seqlens,
        1,
        meta.max_seqlen,
        seqlens_q=meta.seqlens_cpu.new_ones(meta.num_frames),
        seqlens_k=meta.seqlens_cpu,
    )
