"""facebookresearch/dinov3 backbones (``dinov3_vitl16_pretrain_lvd1689m-*.pth``) -> packvit ``DINOv3``.

Layout, from ``dinov3/models/vision_transformer.py``: ``cls_token`` [1,1,D], ``storage_tokens``
[1,R,D], ``mask_token`` [1,D], ``patch_embed.proj`` (Conv2d), ``rope_embed.periods`` [Dh/4],
``blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.*,ls2.gamma}``, ``norm``.
"""

from __future__ import annotations

import torch

from packvit.models.dinov3 import DINOv3Config

from ..family import OriginalFormat
from ..keymap import (
    CONV_TO_LINEAR,
    IDENTITY,
    TOKEN,
    TOKENS,
    ConversionError,
    Drop,
    Entry,
    KeyMap,
    Transform,
    count_layers,
    one_way,
)

_B = "blocks.{n}."


def _third(i: int, name: str) -> Transform:
    return one_way(name, lambda xs, cfg: xs[0].chunk(3, 0)[i].contiguous())


# The fused qkv bias [3D]: packvit keeps the q and v thirds. The k third is dropped: the original
# multiplies it by bias_mask (0 on k), and a bias shared by every key shifts each query's scores by
# a constant that softmax removes, so dropping it is exact either way.
Q_THIRD, V_THIRD = _third(0, "qkv_bias_q"), _third(2, "qkv_bias_v")


def looks_like(keys: set[str]) -> bool:
    return "storage_tokens" in keys or ("cls_token" in keys and "patch_embed.proj.weight" in keys)


def keymap(cfg: DINOv3Config) -> KeyMap:
    if cfg.use_gated_mlp:  # SwiGLUFFN: w3(silu(w1 x) * w2 x); packvit's fc1 is [gate; up]
        mlp = (
            Entry("blocks.{n}.mlp.fc1.weight", (_B + "mlp.w1.weight", _B + "mlp.w2.weight"), _concat()),
            Entry("blocks.{n}.mlp.fc1.bias", (_B + "mlp.w1.bias", _B + "mlp.w2.bias"), _concat(), optional=True),
            Entry("blocks.{n}.mlp.fc2.weight", (_B + "mlp.w3.weight",)),
            Entry("blocks.{n}.mlp.fc2.bias", (_B + "mlp.w3.bias",), optional=True),
        )
    else:
        mlp = (
            Entry("blocks.{n}.mlp.fc1.weight", (_B + "mlp.fc1.weight",)),
            Entry("blocks.{n}.mlp.fc1.bias", (_B + "mlp.fc1.bias",), optional=True),
            Entry("blocks.{n}.mlp.fc2.weight", (_B + "mlp.fc2.weight",)),
            Entry("blocks.{n}.mlp.fc2.bias", (_B + "mlp.fc2.bias",), optional=True),
        )
    return KeyMap(
        entries=(
            Entry("cls_token", ("cls_token",), TOKENS),  # [1,1,D] -> [1,D]
            Entry("register_tokens", ("storage_tokens",), TOKENS),  # [1,R,D] -> [R,D]
            Entry("mask_token", ("mask_token",), TOKEN),  # [1,D] -> [D]; unused at inference
            Entry("patch_embed.weight", ("patch_embed.proj.weight",), CONV_TO_LINEAR),
            Entry("patch_embed.bias", ("patch_embed.proj.bias",)),
            Entry("blocks.{n}.norm1.weight", (_B + "norm1.weight",)),
            Entry("blocks.{n}.norm1.bias", (_B + "norm1.bias",)),
            Entry("blocks.{n}.attn.qkv.weight", (_B + "attn.qkv.weight",), IDENTITY),  # already [q; k; v]
            Entry("blocks.{n}.attn.q_bias", (_B + "attn.qkv.bias",), Q_THIRD, optional=True),
            Entry("blocks.{n}.attn.v_bias", (_B + "attn.qkv.bias",), V_THIRD, optional=True),
            Entry("blocks.{n}.attn.proj.weight", (_B + "attn.proj.weight",)),
            Entry("blocks.{n}.attn.proj.bias", (_B + "attn.proj.bias",), optional=True),
            Entry("blocks.{n}.ls1.scale", (_B + "ls1.gamma",)),
            Entry("blocks.{n}.norm2.weight", (_B + "norm2.weight",)),
            Entry("blocks.{n}.norm2.bias", (_B + "norm2.bias",)),
            *mlp,
            Entry("blocks.{n}.ls2.scale", (_B + "ls2.gamma",)),
            Entry("norm.weight", ("norm.weight",)),
            Entry("norm.bias", ("norm.bias",)),
        ),
        drops=(
            Drop(
                r"rope_embed\.periods",
                "RoPE periods: packvit recomputes them in fp32 from rope_theta (checked to match)",
            ),
            Drop(r"blocks\.\d+\.attn\.qkv\.bias_mask", "mask_k_bias buffer (1 on q and v, 0 on k; checked)"),
            Drop(r"local_cls_norm\..*", "norm for local crops, used only in training"),
        ),
    )


def _concat() -> Transform:
    return one_way("concat", lambda xs, cfg: torch.cat(xs, 0))


def infer_config(sd: dict[str, torch.Tensor]) -> dict:
    """The config fields the tensor shapes show unambiguously."""
    for k in ("cls_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.ls1.gamma"):
        if k not in sd:
            raise ConversionError(f"original dinov3 checkpoint lacks {k!r}")
    d = sd["cls_token"].shape[-1]
    gated = "blocks.0.mlp.w1.weight" in sd
    fc1 = sd["blocks.0.mlp.w1.weight" if gated else "blocks.0.mlp.fc1.weight"]
    has_qkv_bias = "blocks.0.attn.qkv.bias" in sd
    kw = dict(
        hidden_size=d,
        num_layers=count_layers(sd, "blocks.", "original dinov3 checkpoint"),
        intermediate_size=fc1.shape[0],
        patch_size=sd["patch_embed.proj.weight"].shape[-1],
        num_channels=sd["patch_embed.proj.weight"].shape[1],
        num_register_tokens=sd["storage_tokens"].shape[1] if "storage_tokens" in sd else 0,
        use_gated_mlp=gated,
        hidden_act="silu" if gated else "gelu",
        query_bias=has_qkv_bias,
        key_bias=False,
        value_bias=has_qkv_bias,
        proj_bias="blocks.0.attn.proj.bias" in sd,
        mlp_bias=("blocks.0.mlp.w1.bias" if gated else "blocks.0.mlp.fc1.bias") in sd,
    )
    if "rope_embed.periods" in sd:
        kw["num_heads"] = d // (4 * sd["rope_embed.periods"].numel())
    return kw


def check(sd: dict[str, torch.Tensor], cfg: DINOv3Config) -> None:
    if "cls_norm.weight" in sd:
        raise ConversionError(
            "this dinov3 checkpoint unties the CLS/register norm (cls_norm): packvit's DINOv3 applies one "
            "final norm to every token, so its pooler output would differ; not supported"
        )
    if "rope_embed.periods" in sd:
        stored = sd["rope_embed.periods"].float()
        i = torch.arange(stored.numel(), dtype=torch.float64)
        expected = (cfg.rope_theta ** (4 * i / cfg.head_dim)).float()
        # The release may store bf16-rounded periods (relative error <= 2^-8); packvit uses the exact ones.
        if not torch.allclose(stored, expected, rtol=8e-3, atol=0):
            raise ConversionError(
                f"rope_embed.periods {stored.tolist()[:4]}... do not match rope_theta={cfg.rope_theta} with head dim "
                f"{cfg.head_dim} (expected {expected.tolist()[:4]}...): the checkpoint uses other RoPE settings"
            )
    pattern = torch.tensor([1.0, 0.0, 1.0]).repeat_interleave(cfg.hidden_size)
    for k, v in sd.items():
        if k.endswith("attn.qkv.bias_mask") and not torch.equal(v.float(), pattern):
            raise ConversionError(f"{k} is not 1 on q and v and 0 on k; packvit cannot reproduce that bias mask")


def prepare(sd: dict[str, torch.Tensor], cfg: DINOv3Config, notes: list[str]) -> dict[str, torch.Tensor]:
    check(sd, cfg)
    if "rope_embed.periods" in sd and sd["rope_embed.periods"].dtype != torch.float32:
        notes.append(
            f"rope_embed.periods is stored in {sd['rope_embed.periods'].dtype}; packvit uses the exact fp32 periods "
            "from rope_theta, as transformers does"
        )
    return sd


# The head count comes from rope_embed.periods (Dh/4 entries): every field shows in a shape.
FORMAT = OriginalFormat(looks_like=looks_like, keymap=keymap, infer_config=infer_config, prepare=prepare)
