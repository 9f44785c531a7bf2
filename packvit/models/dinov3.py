"""DINOv3 ViT (facebook/dinov3-*-pretrain-lvd1689m), packed.

patches -> Linear -> [CLS, registers, patches] per frame -> blocks with 2D RoPE on patch tokens and
LayerScale -> LayerNorm. The output drops the prefix; ``pooler_output`` is the normed CLS.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..layers import Block, GatedMlp, Mlp
from ..packing import Grid, PackedMeta, insert_prefix
from .base import PackedViT


@dataclass(frozen=True)
class DINOv3Config:
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    patch_size: int = 16
    num_channels: int = 3
    num_register_tokens: int = 4
    norm_eps: float = 1e-5
    hidden_act: str = "gelu"
    use_gated_mlp: bool = False
    layerscale_value: float = 1.0
    rope_theta: float = 100.0
    query_bias: bool = True
    key_bias: bool = False
    value_bias: bool = True
    proj_bias: bool = True
    mlp_bias: bool = True
    drop_path_rate: float = 0.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_name(cls, name: str, **overrides) -> "DINOv3Config":
        key = name.split("/")[-1]
        if key not in PRESETS:
            raise ValueError(f"unknown DINOv3 preset {name!r}; known: {sorted(PRESETS)}")
        return replace(PRESETS[key], **overrides)


_SMALL = DINOv3Config(hidden_size=384, num_layers=12, num_heads=6, intermediate_size=1536)
PRESETS = {
    # https://huggingface.co/facebook/dinov3-<name>-pretrain-lvd1689m/blob/main/config.json
    "dinov3-vits16-pretrain-lvd1689m": _SMALL,
    "dinov3-vits16plus-pretrain-lvd1689m": replace(_SMALL, use_gated_mlp=True, hidden_act="silu"),
    "dinov3-vitb16-pretrain-lvd1689m": DINOv3Config(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
    "dinov3-vitl16-pretrain-lvd1689m": DINOv3Config(),
    "dinov3-vith16plus-pretrain-lvd1689m": DINOv3Config(
        hidden_size=1280, num_layers=32, num_heads=20, intermediate_size=5120, use_gated_mlp=True, hidden_act="silu"
    ),
    "dinov3-vit7b16-pretrain-lvd1689m": DINOv3Config(
        hidden_size=4096, num_layers=40, num_heads=32, intermediate_size=8192, use_gated_mlp=True,
        hidden_act="silu", query_bias=False, value_bias=False,
    ),
}


@functools.lru_cache(maxsize=256)
def rope_table(
    h: int, w: int, num_prefix: int, head_dim: int, theta: float, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (P + h*w, Dh) for one frame; prefix rows are cos=1, sin=0 (no rotation).

    Patch centres ``(i + 0.5) / h`` and ``(j + 0.5) / w`` mapped to [-1, 1] per axis; angles
    ``2*pi*coord*inv_freq`` for y then x, tiled twice (rotate_half layout). fp32, then cast, as HF.
    """
    inv_freq = 1 / theta ** torch.arange(0, 1, 4 / head_dim, dtype=torch.float32)  # (Dh/4,)
    cy = torch.arange(0.5, h, dtype=torch.float32) / h
    cx = torch.arange(0.5, w, dtype=torch.float32) / w
    coords = torch.stack(torch.meshgrid(cy, cx, indexing="ij"), dim=-1).flatten(0, 1) * 2.0 - 1.0  # (hw, 2)
    angles = (2 * math.pi * coords[:, :, None] * inv_freq[None, None, :]).flatten(1, 2).tile(2)  # (hw, Dh)
    cos = torch.cat([torch.ones(num_prefix, head_dim), angles.cos()])
    sin = torch.cat([torch.zeros(num_prefix, head_dim), angles.sin()])
    return cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=64)
def packed_rope(
    grid: Grid, num_prefix: int, head_dim: int, theta: float, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, Dh) cos and sin for a whole packed batch, prefix rows included."""
    tables = [rope_table(h, w, num_prefix, head_dim, theta, device, dtype) for t, h, w in grid for _ in range(t)]
    return torch.cat([c for c, _ in tables]), torch.cat([s for _, s in tables])


class DINOv3(PackedViT):
    def __init__(self, config: DINOv3Config, attn_backend: str = "auto"):
        super().__init__(attn_backend)
        self.config = c = config
        self.num_prefix = 1 + c.num_register_tokens
        d = c.hidden_size
        self.patch_embed = nn.Linear(self.patch_dim, d)
        self.cls_token = nn.Parameter(torch.zeros(1, d))  # (1, D), stacked with the registers
        self.register_tokens = nn.Parameter(torch.zeros(c.num_register_tokens, d))
        # Used only for masked-image pre-training; kept as a buffer so export to HF is lossless.
        self.register_buffer("mask_token", torch.zeros(d))
        mlp_cls = GatedMlp if c.use_gated_mlp else Mlp
        self.blocks = nn.ModuleList(
            Block(
                d, c.num_heads,
                mlp=mlp_cls(d, c.intermediate_size, c.hidden_act, bias=c.mlp_bias),
                norm="layernorm", norm_eps=c.norm_eps,
                qkv_bias=(c.query_bias, c.key_bias, c.value_bias), proj_bias=c.proj_bias,
                layerscale=c.layerscale_value, drop_path=c.drop_path_rate,
            )
            for _ in range(c.num_layers)
        )
        self.norm = nn.LayerNorm(d, eps=c.norm_eps)
        self.set_attention_backend(attn_backend)

    @property
    def has_pooler(self) -> bool:
        return True

    def embed(self, patches: torch.Tensor, meta: PackedMeta):
        x = self.patch_embed(patches)  # (Tp, D)
        prefix = torch.cat([self.cls_token, self.register_tokens])  # (P, D)
        x = insert_prefix(x, prefix, meta)  # (T, D)
        c = self.config
        rope = packed_rope(meta.grid, self.num_prefix, c.head_dim, c.rope_theta, x.device, x.dtype)
        return x, rope

    def pool(self, x: torch.Tensor, meta: PackedMeta) -> torch.Tensor:
        return x.index_select(0, meta.prefix_index[:: self.num_prefix])  # (F, D) normed CLS
