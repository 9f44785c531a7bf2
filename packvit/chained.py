"""Chained norms: each block's last residual add runs with the next block's norm1 as one kernel.

A pre-norm block starts with norm1(x) and ends with x + ls2(m). On the fused path
(``fused_ops.add_norm``) the end of block i and the start of block i + 1 are one kernel each way:
block i returns (x, norm1_{i+1}(x)), the usual "fused add + norm" chaining of pre-norm
transformers. The first block's norm1 is one fused norm; the last block's add stays an add
(``addcmul`` with LayerScale), followed by the model's final norm. Per block that is two passes over
(T, D) fewer forward (torch's LayerNorm, or AIMv2's fused RMSNorm, plus the add) and as many backward.

It runs where every block takes the fused add + norm (CUDA, fp16/bf16, packvit's Triton kernels: see
``fused_ops``) and whole blocks are not checkpointed (a checkpointed block would keep both x and
norm1(x) instead of x alone). ``model.chain_norms``: unset (auto) chains the LayerNorm models
(SigLIP2, DINOv3: training steps 1-4% faster on the H200); AIMv2's RMSNorm blocks stay unchained, as
their training step measured 1-2% slower chained (two runs, RESULTS.md); True or False forces it.
The reference path is not touched.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from . import fused_ops
from .attention import AttentionImpl
from .fp8 import wants_fp8_input
from .layers import Block, norm_args
from .packing import PackedMeta


def chains(model: nn.Module, x: torch.Tensor, checkpointing: bool | str = False) -> bool:
    """Whether ``run_blocks`` runs ``model``'s blocks on ``x``."""
    blocks: Iterable[Block] = model.blocks
    want = getattr(model, "chain_norms", None)
    if want is False or checkpointing is True or not len(blocks):
        return False
    if want is None and not isinstance(blocks[0].norm1, nn.LayerNorm):
        return False  # "auto": LayerNorm models; AIMv2's RMSNorm blocks measured 1-2% slower in training
    for b in blocks:
        if b.fused_add_norm != "triton" or type(b.norm1) is not type(b.norm2) or b.norm1.weight is None:
            return False
        if not b._fuses(x, x):
            return False
    return True


def run_blocks(
    blocks,
    x: torch.Tensor,
    meta: PackedMeta,
    rope,
    want: set[int] = frozenset(),
    checkpoint_mlp: bool = False,
    *,
    attn: AttentionImpl,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The blocks with chained norms: (T, D) -> (T, D) residual stream after the last block, and
    the residual stream after block i for every i in ``want`` (Hugging Face's hidden-state index)."""
    T = x.shape[0]
    # (T, D) norm1 of the first block; e4m3 rows (``FP8Rows``) wherever a block's qkv takes them
    first = fused_ops.norm_fp8 if wants_fp8_input(blocks[0].attn.qkv, T) else fused_ops.norm
    h = first(x, *norm_args(blocks[0].norm1))
    layers = {}
    n = len(blocks)
    for i, block in enumerate(blocks, start=1):
        nxt = norm_args(blocks[i].norm1) if i < n else None
        fp8_next = i < n and wants_fp8_input(blocks[i].attn.qkv, T)
        x, h = block(
            x, meta, rope, attn=attn, checkpoint_mlp=checkpoint_mlp, normed=h, next_norm=nxt, next_fp8=fp8_next
        )
        if i in want:
            layers[i] = x
    return x, layers
