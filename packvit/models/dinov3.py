"""DINOv3 ViT (facebook/dinov3-*-pretrain-lvd1689m), packed.

patches -> Linear -> [CLS, registers, patches] per frame -> blocks with 2D RoPE on patch tokens and
LayerScale -> LayerNorm. The output drops the prefix; ``pooler_output`` is the normed CLS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
from torch import nn

from ..attention import AttentionImpl
from ..layers import Block, GatedMlp, Mlp
from ..packing import Grid, PackedMeta, insert_prefix, table_cache, token_positions
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
    # Training-time RoPE coordinate augmentation (HF's pos_embed_*; HF defaults). Applied only when
    # ``rope_augmentation`` is on AND the model is in train mode.
    pos_embed_shift: float | None = None
    pos_embed_jitter: float | None = None
    pos_embed_rescale: float | None = 2.0
    # Off by default, unlike transformers (which augments whenever its model is in train mode), so
    # that a tower fine-tuned in train mode (LLaVA) sees the positions it sees at inference. A
    # training switch with no transformers field: packvit config.json files written before it
    # existed read as off (``switch`` metadata, see weights_conversion.native).
    rope_augmentation: bool = field(default=False, metadata={"switch": True})

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
    "dinov3-vitb16-pretrain-lvd1689m": DINOv3Config(
        hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072
    ),
    "dinov3-vitl16-pretrain-lvd1689m": DINOv3Config(),
    "dinov3-vith16plus-pretrain-lvd1689m": DINOv3Config(
        hidden_size=1280, num_layers=32, num_heads=20, intermediate_size=5120, use_gated_mlp=True, hidden_act="silu"
    ),
    "dinov3-vit7b16-pretrain-lvd1689m": DINOv3Config(
        hidden_size=4096,
        num_layers=40,
        num_heads=32,
        intermediate_size=8192,
        use_gated_mlp=True,
        hidden_act="silu",
        query_bias=False,
        value_bias=False,
    ),
}


@table_cache(maxsize=8)
def packed_coords(grid: Grid, num_prefix: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RoPE inputs of a batch: patch centres ``(i + 0.5) / h``, ``(j + 0.5) / w`` mapped to [-1, 1],
    coords (T, 2) as (y, x), 0 on prefix rows; is_patch (T, 1) bool; frame (T,) each token's frame."""
    pos = token_positions(grid, num_prefix, device)
    is_patch = (pos.row >= 0)[:, None]
    cy = (pos.row.float() + 0.5) / pos.h.float()
    cx = (pos.col.float() + 0.5) / pos.w.float()
    coords = torch.where(is_patch, torch.stack([cy, cx], dim=-1) * 2 - 1, 0.0)
    return coords, is_patch, pos.frame


def rope_from_coords(
    coords: torch.Tensor, is_patch: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (T, Dh): angles ``2*pi*coord*inv_freq`` for y then x, tiled twice (rotate_half
    layout), in fp32 then cast, as HF; prefix rows are cos=1, sin=0 (no rotation)."""
    inv_freq = 1 / theta ** torch.arange(0, 1, 4 / head_dim, dtype=torch.float32, device=coords.device)  # (Dh/4,)
    angles = (2 * math.pi * coords[:, :, None] * inv_freq).flatten(1, 2).tile(2)  # (T, Dh)
    cos = torch.where(is_patch, angles.cos(), 1.0)
    sin = torch.where(is_patch, angles.sin(), 0.0)
    return cos.to(dtype), sin.to(dtype)


@table_cache(maxsize=8)
def packed_rope(
    grid: Grid, num_prefix: int, head_dim: int, theta: float, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, Dh) cos and sin for a whole packed batch, prefix rows included."""
    coords, is_patch, _ = packed_coords(grid, num_prefix, device)
    return rope_from_coords(coords, is_patch, head_dim, theta, dtype)


class DINOv3Tables(NamedTuple):
    """DINOv3's per-batch position tables (``DINOv3.position_tables``): RoPE's cos and sin, and, when
    ``config.rope_augmentation`` is on, the un-augmented coordinates it perturbs per training step."""

    cos: torch.Tensor  # (T, Dh), prefix rows 1
    sin: torch.Tensor  # (T, Dh), prefix rows 0
    coords: torch.Tensor | None = None  # (T, 2) (y, x) in [-1, 1], 0 on prefix rows
    is_patch: torch.Tensor | None = None  # (T, 1) bool
    frame: torch.Tensor | None = None  # (T,) each token's frame


def augmented_rope(
    coords: torch.Tensor,
    is_patch: torch.Tensor,
    frame: torch.Tensor,
    num_frames: int,
    head_dim: int,
    cfg: "DINOv3Config",
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's ``augment_patches_center_coordinates``, drawn per frame on the device (no host sync).

    coords (T, 2), is_patch (T, 1), frame (T,) -> cos, sin (T, Dh). Draws are made in HF's order
    (shift (F, 2), jitter (F, 2), rescale (F, 1)), so a one-frame batch matches HF's RNG use exactly.
    """
    dev = coords.device
    if cfg.pos_embed_shift is not None:
        shift = torch.empty(num_frames, 2, device=dev).uniform_(-cfg.pos_embed_shift, cfg.pos_embed_shift)
        coords = coords + shift.index_select(0, frame)
    if cfg.pos_embed_jitter is not None:
        r = math.log(cfg.pos_embed_jitter)
        coords = coords * torch.empty(num_frames, 2, device=dev).uniform_(-r, r).exp().index_select(0, frame)
    if cfg.pos_embed_rescale is not None:
        r = math.log(cfg.pos_embed_rescale)
        coords = coords * torch.empty(num_frames, 1, device=dev).uniform_(-r, r).exp().index_select(0, frame)
    return rope_from_coords(coords, is_patch, head_dim, cfg.rope_theta, dtype)


class DINOv3(PackedViT):
    """With ``config.rope_augmentation`` on and the model in train mode, RoPE coordinates are
    randomly shifted / jittered / rescaled per frame as HF does in training (``config.pos_embed_*``)."""

    uses_rope = True

    def __init__(self, config: DINOv3Config, attn_backend: str | AttentionImpl = "auto"):
        super().__init__()
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
                d,
                c.num_heads,
                mlp=mlp_cls(d, c.intermediate_size, c.hidden_act, bias=c.mlp_bias),
                norm="layernorm",
                norm_eps=c.norm_eps,
                qkv_bias=(c.query_bias, c.key_bias, c.value_bias),
                proj_bias=c.proj_bias,
                layerscale=c.layerscale_value,
                drop_path=c.drop_path_rate,
            )
            for _ in range(c.num_layers)
        )
        self.norm = nn.LayerNorm(d, eps=c.norm_eps)
        self.set_attention(attn_backend)

    @property
    def has_pooler(self) -> bool:
        return True

    @property
    def rope_augmentation(self) -> bool:
        """``config.rope_augmentation``; setting it replaces the (frozen) config with the switch changed."""
        return self.config.rope_augmentation

    @rope_augmentation.setter
    def rope_augmentation(self, on: bool) -> None:
        if not isinstance(on, bool):
            raise TypeError(f"rope_augmentation must be a bool, got {on!r}")
        self.config = replace(self.config, rope_augmentation=on)

    def position_tables(self, meta: PackedMeta) -> DINOv3Tables:
        c, device = self.config, meta.cu_seqlens.device
        cos, sin = packed_rope(meta.grid, self.num_prefix, c.head_dim, c.rope_theta, device, self.dtype)
        if c.rope_augmentation:
            return DINOv3Tables(cos, sin, *packed_coords(meta.grid, self.num_prefix, device))
        return DINOv3Tables(cos, sin)

    def embed(self, patches: torch.Tensor, meta: PackedMeta, tables: DINOv3Tables):
        x = self.patch_embed(patches)  # (Tp, D)
        prefix = torch.cat([self.cls_token, self.register_tokens])  # (P, D)
        x = insert_prefix(x, prefix, meta)  # (T, D)
        c = self.config
        if c.rope_augmentation and self.training:
            if tables.coords is None:
                raise RuntimeError("this PackedBatch was prepared with rope_augmentation off; prepare it again")
            rope = augmented_rope(tables.coords, tables.is_patch, tables.frame, meta.num_frames, c.head_dim, c, x.dtype)
            return x, rope
        return x, (tables.cos.to(x.dtype), tables.sin.to(x.dtype))

    def pool(self, x: torch.Tensor, meta: PackedMeta) -> torch.Tensor:
        return x.index_select(0, meta.prefix_index[:: self.num_prefix])  # (F, D) normed CLS
