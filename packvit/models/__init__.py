from .aimv2 import AIMv2, AIMv2Config
from .base import PackedBatch, PackedViT, PackedVisionOutput
from .dinov3 import DINOv3, DINOv3Config
from .siglip2 import Siglip2, Siglip2Config

__all__ = [
    "AIMv2", "AIMv2Config", "DINOv3", "DINOv3Config", "Siglip2", "Siglip2Config", "PackedBatch", "PackedViT",
    "PackedVisionOutput",
]
