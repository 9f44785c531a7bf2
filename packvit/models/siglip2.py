"""SigLIP2 NaFlex vision encoder (google/siglip2-*-naflex), packed.

patches -> Linear -> + learned 16x16 position grid resized to each frame's (h, w) -> GELU-tanh
blocks -> post LayerNorm [-> MAP head: a learned probe attends to each frame, then LN + MLP].
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import nn

from ..attention import AttentionImpl
from ..layers import Block, Mlp, pool_attention
from ..packing import Grid, PackedMeta, table_cache, token_positions
from .base import PackedViT


@dataclass(frozen=True)
class Siglip2Config:
    hidden_size: int = 1152
    num_layers: int = 27
    num_heads: int = 16
    intermediate_size: int = 4304
    patch_size: int = 16
    num_channels: int = 3
    num_patches: int = 256  # the learned position grid is sqrt(num_patches) squared
    norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    use_head: bool = True

    @property
    def pos_grid(self) -> int:
        side = int(round(self.num_patches**0.5))
        if side * side != self.num_patches:
            raise ValueError(f"num_patches must be a square, got {self.num_patches}")
        return side

    @classmethod
    def from_name(cls, name: str, **overrides) -> "Siglip2Config":
        key = name.split("/")[-1]
        if key not in PRESETS:
            raise ValueError(f"unknown SigLIP2 preset {name!r}; known: {sorted(PRESETS)}")
        return replace(PRESETS[key], **overrides)


PRESETS = {
    # https://huggingface.co/google/siglip2-so400m-patch16-naflex/blob/main/config.json
    "siglip2-so400m-patch16-naflex": Siglip2Config(),
    # https://huggingface.co/google/siglip2-base-patch16-naflex/blob/main/config.json
    "siglip2-base-patch16-naflex": Siglip2Config(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
}


def _aa_bilinear(pos: torch.Tensor, size: torch.Tensor, side: int) -> torch.Tensor:
    """(N, side) float64 weights of antialiased bilinear resampling (align_corners=False) of a
    ``side``-long axis to ``size`` outputs, for output position ``pos``; pos, size (N,) integers.

    A triangle filter whose support widens with the downscale factor, normalised per output, as
    PIL and ``F.interpolate(..., antialias=True)`` define it.
    """
    # (N,) inputs per output. A true division: ``side / tensor`` would be reciprocal() * side.
    scale = torch.full(size.shape, float(side), dtype=torch.float64, device=size.device) / size.double()
    support = scale.clamp(min=1.0)
    centre = (pos.double() + 0.5) * scale  # (N,)
    src = torch.arange(side, dtype=torch.float64, device=pos.device) + 0.5  # (side,)
    w = (1 - (src[None, :] - centre[:, None]).abs() / support[:, None]).clamp(min=0)
    return w / w.sum(1, keepdim=True)


# Small: a table is cheap to rebuild (a few elementwise ops) and is 1 KiB per token.
@table_cache(maxsize=4)
def packed_resize_weights(grid: Grid, side: int, device: torch.device) -> torch.Tensor:
    """(Tp, side*side) fp32 matrix W with W @ grid == the antialiased bilinear resize of the learned
    ``side x side`` grid to every frame's size, for a whole batch.

    Written out rather than calling ``F.interpolate(mode="bilinear", antialias=True)`` because
    PyTorch's CPU kernel is wrong when the output is one column wide and the height shrinks
    (16x16 -> 7x1 is off by 0.3; tests/test_siglip2_resize.py); transformers >= 5.2x writes the
    same explicit filter. Keeping W (not the resized table) lets gradients reach the learned grid.
    The filter is separable: each token's row of W is the outer product of its row and column
    weights, computed for all tokens at once on the device.
    """
    pos = token_positions(grid, 0, device)
    wh = _aa_bilinear(pos.row, pos.h, side)  # (Tp, side)
    ww = _aa_bilinear(pos.col, pos.w, side)  # (Tp, side)
    return (wh[:, :, None] * ww[:, None, :]).reshape(-1, side * side).float()


class Siglip2Tables(NamedTuple):
    """SigLIP2's per-batch position table (``Siglip2.position_tables``)."""

    resize: torch.Tensor  # (Tp, side*side) fp32: resize @ pos_embed is each token's resized position embedding


class MAPHead(nn.Module):
    """Multihead attention pooling: ``probe`` attends to each frame's tokens, then x + mlp(ln(x)).

    ``in_proj`` packs q, k and v like ``nn.MultiheadAttention``'s ``in_proj_weight``.
    """

    def __init__(self, cfg: Siglip2Config):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.probe = nn.Parameter(torch.zeros(d))
        self.in_proj = nn.Linear(d, 3 * d)
        self.out_proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.mlp = Mlp(d, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x: torch.Tensor, meta: PackedMeta, attn: AttentionImpl) -> torch.Tensor:
        T, D = x.shape
        H, Dh = self.num_heads, D // self.num_heads
        w, b = self.in_proj.weight, self.in_proj.bias
        q = nn.functional.linear(self.probe.to(x.dtype), w[:D], b[:D]).view(1, H, Dh).expand(meta.num_frames, H, Dh)
        kv = nn.functional.linear(x, w[D:], b[D:]).view(T, 2, H, Dh)
        o = pool_attention(q, kv[:, 0], kv[:, 1], meta, attn)  # (F, H, Dh)
        o = self.out_proj(o.reshape(meta.num_frames, D))
        return o + self.mlp(self.norm(o))


class Siglip2(PackedViT):
    num_prefix = 0

    def __init__(self, config: Siglip2Config, attn_backend: str | AttentionImpl = "auto"):
        super().__init__()
        self.config = c = config
        d = c.hidden_size
        self.patch_embed = nn.Linear(self.patch_dim, d)
        self.pos_embed = nn.Parameter(torch.zeros(c.pos_grid * c.pos_grid, d))  # (side*side, D), row-major
        self.blocks = nn.ModuleList(
            Block(
                d,
                c.num_heads,
                mlp=Mlp(d, c.intermediate_size, c.hidden_act),
                norm="layernorm",
                norm_eps=c.norm_eps,
                qkv_bias=(True, True, True),
                proj_bias=True,
            )
            for _ in range(c.num_layers)
        )
        self.norm = nn.LayerNorm(d, eps=c.norm_eps)
        self.head = MAPHead(c) if c.use_head else None
        self.set_attention(attn_backend)

    @property
    def has_pooler(self) -> bool:
        return self.head is not None

    def position_tables(self, meta: PackedMeta) -> Siglip2Tables:
        return Siglip2Tables(packed_resize_weights(meta.grid, self.config.pos_grid, meta.cu_seqlens.device))

    def embed(self, patches: torch.Tensor, meta: PackedMeta, tables: Siglip2Tables):
        x = self.patch_embed(patches)  # (Tp, D)
        pos = tables.resize @ self.pos_embed.float()  # (Tp, D), resized in fp32 whatever the model dtype
        return x + pos.to(x.dtype), None

    def pool(self, x: torch.Tensor, meta: PackedMeta) -> torch.Tensor | None:
        return self.head(x, meta, self.attention) if self.head is not None else None
