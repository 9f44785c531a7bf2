"""packvit: packed Vision Transformers (AIMv2, DINOv3, SigLIP2) for mixed-resolution batches.

Layers, bottom up: the core (attention, layers, models, packing) is imported here; the checkpoint
converter ``weights_conversion`` builds on the core; the loading entry points (``from_pretrained``,
the ``*Packing`` classes) build on the converter. So this module imports the core alone, and
names the loading entry points, imported on first use: ``import weights_conversion`` then runs
this file to its end without ever coming back into the converter half-built.
"""

from __future__ import annotations

import importlib

from ._version import __version__
from .attention import (
    BACKENDS,
    AttentionImpl,
    FA4Backward,
    available_backends,
    resolve_attention,
    resolve_backend,
    varlen_attention,
)
from .models import (
    AIMv2,
    AIMv2Config,
    DINOv3,
    DINOv3Config,
    PackedBatch,
    PackedVisionOutput,
    PackedViT,
    Siglip2,
    Siglip2Config,
)
from .packing import (
    PackedMeta,
    build_meta,
    cache_bytes,
    clear_caches,
    convert_to_packing_format,
    grid_to_tuple,
    patchify,
    set_cache_limit,
    split_by_image,
    unpatchify,
)

# name -> the module defining it; these modules import weights_conversion (see the docstring).
_LOADERS = {
    "from_pretrained": "packvit.pretrained",
    "AIMv2Packing": "packvit.seed",
    "DINOv3ViTPacking": "packvit.seed",
    "Siglip2NaflexPacking": "packvit.seed",
}


def __getattr__(name: str):
    if name in _LOADERS:
        value = getattr(importlib.import_module(_LOADERS[name]), name)
        globals()[name] = value  # found directly from now on
        return value
    raise AttributeError(f"module 'packvit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LOADERS))


__all__ = [
    "AIMv2",
    "AIMv2Config",
    "DINOv3",
    "DINOv3Config",
    "Siglip2",
    "Siglip2Config",
    "PackedViT",
    "PackedVisionOutput",
    "PackedBatch",
    "AIMv2Packing",
    "DINOv3ViTPacking",
    "Siglip2NaflexPacking",
    "from_pretrained",
    "BACKENDS",
    "available_backends",
    "__version__",
    "AttentionImpl",
    "FA4Backward",
    "resolve_attention",
    "resolve_backend",
    "varlen_attention",
    "PackedMeta",
    "build_meta",
    "convert_to_packing_format",
    "grid_to_tuple",
    "patchify",
    "unpatchify",
    "split_by_image",
    "cache_bytes",
    "clear_caches",
    "set_cache_limit",
]
