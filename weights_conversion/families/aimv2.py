"""AIMv2 native: transformers' ``Aimv2VisionModel`` layout <-> packvit ``AIMv2``."""

from __future__ import annotations

from PIL import Image

from packvit.models.aimv2 import PRESETS, AIMv2, AIMv2Config

from ..family import Family, PreprocessDefaults, stacked_pixels
from ..hfconfig import parse_fields
from ..keymap import CONCAT, CONV_TO_LINEAR, IDENTITY, TOKEN, Drop, Entry, KeyMap
from ..original import aimv2 as original

HF_CLASS = "Aimv2VisionModel"
# OpenAI CLIP's normalisation, which AIMv2's processor uses.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

_L = "encoder.layers.{n}."


def keymap(cfg: AIMv2Config) -> KeyMap:
    return KeyMap(
        entries=(
            Entry("patch_embed.weight", ("embeddings.patch_embed.weight",), CONV_TO_LINEAR),
            Entry("patch_embed.bias", ("embeddings.patch_embed.bias",)),
            Entry("patch_norm.weight", ("embeddings.rms_norm.weight",)),
            Entry("blocks.{n}.norm1.weight", (_L + "rms_norm1.weight",)),
            Entry("blocks.{n}.attn.qkv.weight", tuple(_L + f"attention.{p}_proj.weight" for p in "qkv"), CONCAT),
            *(Entry(f"blocks.{{n}}.attn.{p}_bias", (_L + f"attention.{p}_proj.bias",), optional=True) for p in "qkv"),
            Entry("blocks.{n}.attn.proj.weight", (_L + "attention.out_proj.weight",)),
            Entry("blocks.{n}.attn.proj.bias", (_L + "attention.out_proj.bias",), optional=True),
            Entry("blocks.{n}.norm2.weight", (_L + "rms_norm2.weight",)),
            Entry("blocks.{n}.mlp.fc1.weight", (_L + "ffn.gate_proj.weight", _L + "ffn.up_proj.weight"), CONCAT),
            Entry(
                "blocks.{n}.mlp.fc1.bias", (_L + "ffn.gate_proj.bias", _L + "ffn.up_proj.bias"), CONCAT, optional=True
            ),
            Entry("blocks.{n}.mlp.fc2.weight", (_L + "ffn.down_proj.weight",)),
            Entry("blocks.{n}.mlp.fc2.bias", (_L + "ffn.down_proj.bias",), optional=True),
            Entry("norm.weight", ("rms_norm.weight",)),
            Entry("head.cls_token", ("head.cls_token",), TOKEN, optional=True),
            Entry("head.k_proj.weight", ("head.k_proj.weight",), optional=True),
            Entry("head.k_proj.bias", ("head.k_proj.bias",), optional=True),
            Entry("head.v_proj.weight", ("head.v_proj.weight",), optional=True),
            Entry("head.v_proj.bias", ("head.v_proj.bias",), optional=True),
            Entry("head.out_proj.weight", ("head.output_proj.weight",), optional=True),
            Entry("head.out_proj.bias", ("head.output_proj.bias",), IDENTITY, optional=True),
        ),
        drops=(
            Drop(r"text_model\..*", "text tower of a CLIP-style AIMv2 (packvit is the vision tower)"),
            Drop(r"(visual|text)_projection\..*", "contrastive projections, not part of the vision tower"),
            Drop(r"logit_scale", "contrastive temperature, not part of the vision tower"),
        ),
        # A CLIP-style Aimv2Model nests the vision tower under vision_model.
        aliases=((r"^vision_model\.", ""),),
    )


_FIELDS = {
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "intermediate_size": "intermediate_size",
    "patch_size": "patch_size",
    "num_channels": "num_channels",
    "rms_norm_eps": "norm_eps",
    "hidden_act": "hidden_act",
    "qkv_bias": "qkv_bias",
    "mlp_bias": "mlp_bias",
    "use_head": "use_head",
}
# Fields that do not change the native forward: image_size only sizes the fixed-size variants' table.
_IGNORED = {"image_size", "is_native", "attention_dropout"}


def config_from_hf(d: dict, present_keys: set[str] | None = None, strict: bool = True) -> AIMv2Config:
    if d.get("model_type") == "aimv2":  # CLIP-style wrapper: the vision tower's config is nested
        d = d.get("vision_config") or {}
    if not d.get("is_native", False):
        raise ValueError(
            "this AIMv2 checkpoint is a fixed-resolution one (is_native is false): packvit supports the "
            "native-resolution checkpoints (apple/aimv2-*-native), whose position table is built per size"
        )
    kw = parse_fields(
        d,
        _FIELDS,
        _IGNORED,
        family="AIMv2",
        strict=strict,
        model_type="aimv2_vision_model",
        config_class=AIMv2Config,
    )
    if present_keys is not None:
        # transformers' use_head defaults to True; the vision-only checkpoints have no head weights.
        kw["use_head"] = any(k.endswith("head.cls_token") for k in present_keys)
    return AIMv2Config(**kw)


def config_to_hf(cfg: AIMv2Config) -> dict:
    out = {v: getattr(cfg, k) for v, k in _FIELDS.items()}
    out.update(model_type="aimv2_vision_model", architectures=[HF_CLASS], is_native=True, image_size=224)
    return out


FAMILY = Family(
    name="aimv2",
    model_class=AIMv2,
    config_class=AIMv2Config,
    presets=PRESETS,
    default_preset="aimv2-large-patch14-native",
    patch_size=14,
    hf_model_types=("aimv2_vision_model", "aimv2"),
    hf_class=HF_CLASS,
    hf_wrappers={"aimv2": "Aimv2Model"},
    hf_processor="CLIPImageProcessor",
    tiny_hf_fields={"patch_size": 14, "is_native": True},
    keymap=keymap,
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    original=original.FORMAT,
    preprocess=PreprocessDefaults("native", CLIP_MEAN, CLIP_STD, Image.BICUBIC),
    num_prefix_tokens=lambda cfg: 0,
    hf_inputs=stacked_pixels,
    hf_pads=False,
)
