from .aimv2 import AIMv2, AIMv2Config, AIMv2Tables
from .base import PackedBatch, PackedVisionOutput, PackedViT
from .dinov3 import DINOv3, DINOv3Config, DINOv3Tables
from .siglip2 import Siglip2, Siglip2Config, Siglip2Tables

__all__ = [
    "AIMv2",
    "AIMv2Config",
    "DINOv3",
    "DINOv3Config",
    "Siglip2",
    "Siglip2Config",
    "PackedBatch",
    "PackedViT",
    "PackedVisionOutput",
    "AIMv2Tables",
    "DINOv3Tables",
    "Siglip2Tables",
]
