"""``packvit.from_pretrained``: a checkpoint (any layout ``weights_conversion`` reads) -> a packvit model."""

from __future__ import annotations

import os

import torch

from weights_conversion import load_model

from .models.base import PackedViT
from .zero3 import from_pretrained as zero3_from_pretrained
from .zero3 import zero3_enabled


def from_pretrained(
    path_or_id: str | os.PathLike,
    *,
    revision: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    attn_backend: str = "auto",
    fp8: bool = False,
    **kwargs,
) -> PackedViT:
    """Load a Hugging Face checkpoint (local folder or hub id); the family comes from config.json.

    Under DeepSpeed ZeRO-3 (an open ``deepspeed.zero.Init``, or transformers' stage-3 config) the
    model is built partitioned and filled module by module (``packvit.zero3``).
    ``fp8=True``: FP8 matmuls in the blocks from each layer's token crossover on (``PackedViT.set_fp8``,
    ``packvit.fp8``); needs ``device`` a CUDA GPU of compute capability >= 8.9 and ``dtype=torch.bfloat16``."""
    if zero3_enabled():
        model = zero3_from_pretrained(
            path_or_id, revision=revision, device=device, dtype=dtype, attn_backend=attn_backend, **kwargs
        )
    else:
        model = load_model(
            path_or_id, revision=revision, device=device, dtype=dtype, attn_backend=attn_backend, **kwargs
        )
    if fp8:
        model.set_fp8()
    return model
