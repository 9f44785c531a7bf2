"""packvit: packed Vision Transformers (AIMv2, DINOv3, SigLIP2) for mixed-resolution batches."""

from __future__ import annotations

import os

import torch

from .attention import BACKENDS, available_backends, resolve_backend, varlen_attention
from .models import (
    AIMv2, AIMv2Config, DINOv3, DINOv3Config, PackedBatch, PackedViT, PackedVisionOutput, Siglip2, Siglip2Config,
)
from .packing import (
    PackedMeta, build_meta, cache_bytes, clear_caches, convert_to_packing_format, grid_to_tuple, patchify,
    set_cache_limit, split_by_image, unpatchify,
)
from .seed import AIMv2Packing, DINOv3ViTPacking, Siglip2NaflexPacking

__version__ = "0.1.0"


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
    from weights_conversion import load_model

    from .zero3 import zero3_enabled

    if zero3_enabled():
        from .zero3 import from_pretrained as zero3_from_pretrained

        model = zero3_from_pretrained(path_or_id, revision=revision, device=device, dtype=dtype,
                                      attn_backend=attn_backend, **kwargs)
    else:
        model = load_model(path_or_id, revision=revision, device=device, dtype=dtype, attn_backend=attn_backend, **kwargs)
    if fp8:
        model.set_fp8()
    return model


__all__ = [
    "AIMv2", "AIMv2Config", "DINOv3", "DINOv3Config", "Siglip2", "Siglip2Config", "PackedViT", "PackedVisionOutput", "PackedBatch",
    "AIMv2Packing", "DINOv3ViTPacking", "Siglip2NaflexPacking", "from_pretrained", "BACKENDS", "available_backends",
    "resolve_backend", "varlen_attention", "PackedMeta", "build_meta", "convert_to_packing_format", "grid_to_tuple",
    "patchify", "unpatchify", "split_by_image", "cache_bytes", "clear_caches", "set_cache_limit",
]
