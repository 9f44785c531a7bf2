"""AIMv2 native-resolution vision encoder (apple/aimv2-*-native), packed.

patches -> Linear -> RMSNorm -> + 2D sin-cos table -> SwiGLU blocks -> RMSNorm [-> attention-pool head]
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import nn

from ..attention import AttentionImpl
from ..layers import Block, GatedMlp, RMSNorm, pool_attention
from ..packing import Grid, PackedMeta, table_cache, to_device, token_positions
from .base import PackedViT


@dataclass(frozen=True)
class AIMv2Config:
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 8
    intermediate_size: int = 2816
    patch_size: int = 14
    num_channels: int = 3
    norm_eps: float = 1e-5
    hidden_act: str = "silu"
    qkv_bias: bool = False
    mlp_bias: bool = False
    use_head: bool = False  # vision-only -native checkpoints ship no head

    @classmethod
    def from_name(cls, name: str, **overrides) -> "AIMv2Config":
        key = name.split("/")[-1]
        if key not in PRESETS:
            raise ValueError(f"unknown AIMv2 preset {name!r}; known: {sorted(PRESETS)}")
        return replace(PRESETS[key], **overrides)


PRESETS = {
    # https://huggingface.co/apple/aimv2-large-patch14-native/blob/main/config.json
    "aimv2-large-patch14-native": AIMv2Config(),
}


@table_cache(maxsize=16)
def axis_sincos(n: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(n, dim/2) [sin(i*omega), cos(i*omega)] for positions i < n, omega_k = 1 / 10000^(k / (dim/4)).

    Built in float64 (as transformers does) and cast, so large positions keep their precision in
    bf16.
    """
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (D/4,)
    angles = torch.arange(n, dtype=torch.float64)[:, None] * omega  # (n, D/4)
    return to_device(torch.cat([angles.sin(), angles.cos()], dim=1), device, dtype)


# Small: a table is cheap to rebuild (two gathers) and can be tens of MB.
@table_cache(maxsize=4)
def packed_sincos(grid: Grid, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(Tp, dim) 2-D sin-cos table of a whole batch, laid out [sin(x), cos(x), sin(y), cos(y)], x the
    column and y the row index.

    This is ml-aim's layout, which transformers reaches by building [y | x] and swapping halves;
    the two only differ on non-square grids. The table is separable, so it is two gathers from
    one axis table.
    """
    pos = token_positions(grid, 0, device)
    longest = max((max(h, w) for _, h, w in grid), default=1)
    axis = axis_sincos(-(-longest // 64) * 64, dim, device, dtype)  # (n, D/2); a few sizes serve all batches
    return torch.cat([axis.index_select(0, pos.col), axis.index_select(0, pos.row)], dim=1)


class AIMv2Tables(NamedTuple):
    """AIMv2's per-batch position table (``AIMv2.position_tables``)."""

    sincos: torch.Tensor  # (Tp, D) 2-D sin-cos, in the model's dtype


class AttentionPoolHead(nn.Module):
    """A learned query (``cls_token``, not projected) attends to each frame's tokens, then ``out_proj``."""

    def __init__(self, cfg: AIMv2Config):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.cls_token = nn.Parameter(torch.zeros(d))
        self.k_proj = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(d, d, bias=True)

    def forward(self, x: torch.Tensor, meta: PackedMeta, attn: AttentionImpl) -> torch.Tensor:
        T, D = x.shape
        H, Dh = self.num_heads, D // self.num_heads
        q = self.cls_token.to(x.dtype).view(1, H, Dh).expand(meta.num_frames, H, Dh)  # (F, H, Dh)
        k = self.k_proj(x).view(T, H, Dh)
        v = self.v_proj(x).view(T, H, Dh)
        o = pool_attention(q, k, v, meta, attn)  # (F, H, Dh)
        return self.out_proj(o.reshape(meta.num_frames, D))


class AIMv2(PackedViT):
    num_prefix = 0

    def __init__(self, config: AIMv2Config, attn_backend: str | AttentionImpl = "auto"):
        super().__init__()
        self.config = c = config
        # Conv2d(k=p, stride=p) over an image == Linear over its (p_h, p_w, C)-flattened patches.
        self.patch_embed = nn.Linear(self.patch_dim, c.hidden_size)
        self.patch_norm = RMSNorm(c.hidden_size, c.norm_eps)
        self.blocks = nn.ModuleList(
            Block(
                c.hidden_size,
                c.num_heads,
                mlp=GatedMlp(c.hidden_size, c.intermediate_size, c.hidden_act, bias=c.mlp_bias),
                norm="rmsnorm",
                norm_eps=c.norm_eps,
                qkv_bias=(c.qkv_bias,) * 3,
                proj_bias=c.qkv_bias,
            )
            for _ in range(c.num_layers)
        )
        self.norm = RMSNorm(c.hidden_size, c.norm_eps)
        self.head = AttentionPoolHead(c) if c.use_head else None
        self.set_attention(attn_backend)

    @property
    def has_pooler(self) -> bool:
        return self.head is not None

    def position_tables(self, meta: PackedMeta) -> AIMv2Tables:
        return AIMv2Tables(packed_sincos(meta.grid, self.config.hidden_size, meta.cu_seqlens.device, self.dtype))

    def embed(self, patches: torch.Tensor, meta: PackedMeta, tables: AIMv2Tables):
        x = self.patch_norm(self.patch_embed(patches))  # (Tp, D)
        return x + tables.sincos.to(x.dtype), None

    def pool(self, x: torch.Tensor, meta: PackedMeta) -> torch.Tensor | None:
        return self.head(x, meta, self.attention) if self.head is not None else None
