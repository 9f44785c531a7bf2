"""Apple ml-aim AIMv2 (``aim-v2``, built on ``aim-v1``'s torch layers) -> packvit ``AIMv2``.

Layout, from ``aim/v2/torch/models.py`` and ``aim/v1/torch/layers.py``: ``preprocessor.patchifier.
{proj,norm}``, ``trunk.blocks.N.{norm_1,attn.qkv,attn.proj,norm_2,mlp.fc1,mlp.fc2,mlp.fc3}``,
``trunk.post_trunk_norm``, and with an attention-pool head ``head.{cls_token,k,v,linear}``. LiT
checkpoints nest the vision tower under ``image_encoder.`` beside a text tower.
"""

from __future__ import annotations

import re

import torch

from packvit.models.aimv2 import AIMv2Config

from ..family import OriginalFormat
from ..keymap import (
    CONV_TO_LINEAR,
    IDENTITY,
    TOKEN,
    ConversionError,
    Drop,
    Entry,
    KeyMap,
    count_layers,
    one_way,
)

_B = "trunk.blocks.{n}."


# SwiGLUFFN: fc2(silu(fc1 x) * fc3 x); packvit's fc1 is [gate; up] = [fc1; fc3].
GATE_UP = one_way("concat_fc1_fc3", lambda xs, cfg: torch.cat(xs, 0))


def looks_like(keys: set[str]) -> bool:
    return any(re.match(r"(image_encoder\.)?preprocessor\.patchifier\.proj\.weight$", k) for k in keys)


def keymap(cfg: AIMv2Config) -> KeyMap:
    return KeyMap(
        entries=(
            Entry("patch_embed.weight", ("preprocessor.patchifier.proj.weight",), CONV_TO_LINEAR),
            Entry("patch_embed.bias", ("preprocessor.patchifier.proj.bias",)),
            Entry("patch_norm.weight", ("preprocessor.patchifier.norm.weight",)),
            Entry("blocks.{n}.norm1.weight", (_B + "norm_1.weight",)),
            Entry("blocks.{n}.attn.qkv.weight", (_B + "attn.qkv.weight",), IDENTITY),  # already [q; k; v]
            *(
                Entry(
                    f"blocks.{{n}}.attn.{p}_bias",
                    (_B + "attn.qkv.bias",),
                    one_way(f"qkv_bias_{p}", lambda xs, cfg, i=i: xs[0].chunk(3, 0)[i].contiguous()),
                    optional=True,
                )
                for i, p in enumerate("qkv")
            ),
            Entry("blocks.{n}.attn.proj.weight", (_B + "attn.proj.weight",)),
            Entry("blocks.{n}.attn.proj.bias", (_B + "attn.proj.bias",), optional=True),
            Entry("blocks.{n}.norm2.weight", (_B + "norm_2.weight",)),
            Entry("blocks.{n}.mlp.fc1.weight", (_B + "mlp.fc1.weight", _B + "mlp.fc3.weight"), GATE_UP),
            Entry("blocks.{n}.mlp.fc1.bias", (_B + "mlp.fc1.bias", _B + "mlp.fc3.bias"), GATE_UP, optional=True),
            Entry("blocks.{n}.mlp.fc2.weight", (_B + "mlp.fc2.weight",)),
            Entry("blocks.{n}.mlp.fc2.bias", (_B + "mlp.fc2.bias",), optional=True),
            Entry("norm.weight", ("trunk.post_trunk_norm.weight",)),
            Entry("head.cls_token", ("head.cls_token",), TOKEN, optional=True),  # [1,1,D] -> [D]
            Entry("head.k_proj.weight", ("head.k.weight",), optional=True),
            Entry("head.k_proj.bias", ("head.k.bias",), optional=True),
            Entry("head.v_proj.weight", ("head.v.weight",), optional=True),
            Entry("head.v_proj.bias", ("head.v.bias",), optional=True),
            Entry("head.out_proj.weight", ("head.linear.weight",), optional=True),
            Entry("head.out_proj.bias", ("head.linear.bias",), optional=True),
        ),
        drops=(
            Drop(r"text_encoder\..*", "text tower of an AIMv2 LiT checkpoint (packvit is the vision tower)"),
            Drop(r"(text|image)_projector\..*", "LiT projections, not part of the vision tower"),
            Drop(r"log_logit_scale", "LiT temperature, not part of the vision tower"),
        ),
        aliases=((r"^image_encoder\.", ""),),
    )


def infer_config(sd: dict[str, torch.Tensor]) -> dict:
    for k in ("preprocessor.patchifier.proj.weight", "trunk.blocks.0.mlp.fc1.weight", "trunk.post_trunk_norm.weight"):
        if k not in sd:
            raise ConversionError(f"original ml-aim checkpoint lacks {k!r}")
    w = sd["preprocessor.patchifier.proj.weight"]
    return dict(
        hidden_size=w.shape[0],
        num_layers=count_layers(sd, "trunk.blocks.", "original ml-aim checkpoint"),
        intermediate_size=sd["trunk.blocks.0.mlp.fc1.weight"].shape[0],
        patch_size=w.shape[-1],
        num_channels=w.shape[1],
        qkv_bias="trunk.blocks.0.attn.qkv.bias" in sd,
        mlp_bias="trunk.blocks.0.mlp.fc1.bias" in sd,
        use_head="head.cls_token" in sd,
    )


def prepare(sd: dict[str, torch.Tensor], cfg: AIMv2Config, notes: list[str]) -> dict[str, torch.Tensor]:
    if "preprocessor.pos_embed" in sd:
        raise ConversionError(
            "this ml-aim checkpoint has a learned preprocessor.pos_embed: it is a fixed-resolution AIMv2; "
            "packvit supports the native-resolution ones (aimv2-*-native), whose sin-cos table is built per size"
        )
    if cfg.use_head:
        q = sd["head.cls_token"]
        if q.dim() == 3 and q.shape[1] != 1:
            raise ConversionError(f"head.cls_token holds {q.shape[1]} queries; packvit's head has one")
        if "head.linear.bias" not in sd and "head.linear.weight" in sd:
            # ml-aim's head.linear may have no bias; packvit's (like HF's output_proj) has one: a zero bias is exact.
            sd = {
                **sd,
                "head.linear.bias": torch.zeros(
                    sd["head.linear.weight"].shape[0], dtype=sd["head.linear.weight"].dtype
                ),
            }
            notes.append("head.linear has no bias: a zero bias was added (packvit's and HF's output_proj have one)")
    return sd


FORMAT = OriginalFormat(
    looks_like=looks_like,
    keymap=keymap,
    infer_config=infer_config,
    prepare=prepare,
    needs_flag=("num_heads",),  # no tensor shape depends on the head count
)
