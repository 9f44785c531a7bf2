"""The first entry points packvit offered (kept for code written against them): ``Cls(ckpt=..., device=...)`` then ``model(hidden_states, grid_thw)``."""

from __future__ import annotations

import torch
from torch import nn

from weights_conversion import load_model

from .models.base import PackedViT


class _SeedPacking(nn.Module):
    family: str = ""

    def __init__(
        self,
        ckpt: str,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        attn_backend: str = "auto",
        revision: str | None = None,
    ):
        super().__init__()
        self.model: PackedViT = load_model(
            ckpt, revision=revision, family=self.family, device=device, dtype=dtype, attn_backend=attn_backend
        )

    @property
    def attn_backend(self) -> str:
        return self.model.attn_backend

    @property
    def config(self):
        return self.model.config

    def forward(self, hidden_states: torch.Tensor, grid_thw: torch.Tensor, **kwargs):
        """(total_patches, p*p*C), (N, 3) -> (total_patches, hidden); see ``PackedViT.forward``."""
        return self.model(hidden_states, grid_thw, **kwargs)


class AIMv2Packing(_SeedPacking):
    family = "aimv2"


class DINOv3ViTPacking(_SeedPacking):
    family = "dinov3"


class Siglip2NaflexPacking(_SeedPacking):
    family = "siglip2"
