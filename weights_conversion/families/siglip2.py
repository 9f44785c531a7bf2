"""SigLIP2 NaFlex: transformers' ``Siglip2Model`` / ``Siglip2VisionModel`` layout <-> packvit ``Siglip2``."""

from __future__ import annotations

from packvit.models.siglip2 import Siglip2, Siglip2Config

from ..hfconfig import parse_fields
from ..keymap import CONCAT, TOKEN, Drop, Entry, KeyMap

MODEL_TYPES = ("siglip2", "siglip2_vision_model")
MODEL_CLASS = Siglip2
CONFIG_CLASS = Siglip2Config
HF_ARCHITECTURE = "Siglip2VisionModel"

_V = ""  # canonical keys are those of a bare Siglip2VisionModel as transformers 5 saves it
_L = _V + "encoder.layers.{n}."


def _ln(dst: str, src: str) -> tuple[Entry, Entry]:
    return Entry(dst + ".weight", (src + ".weight",)), Entry(dst + ".bias", (src + ".bias",))


def keymap(cfg: Siglip2Config) -> KeyMap:
    return KeyMap(
        entries=(
            *_ln("patch_embed", _V + "embeddings.patch_embedding"),
            Entry("pos_embed", (_V + "embeddings.position_embedding.weight",)),
            *_ln("blocks.{n}.norm1", _L + "layer_norm1"),
            Entry("blocks.{n}.attn.qkv.weight", tuple(_L + f"self_attn.{p}_proj.weight" for p in "qkv"), CONCAT),
            *(Entry(f"blocks.{{n}}.attn.{p}_bias", (_L + f"self_attn.{p}_proj.bias",)) for p in "qkv"),
            *_ln("blocks.{n}.attn.proj", _L + "self_attn.out_proj"),
            *_ln("blocks.{n}.norm2", _L + "layer_norm2"),
            *_ln("blocks.{n}.mlp.fc1", _L + "mlp.fc1"),
            *_ln("blocks.{n}.mlp.fc2", _L + "mlp.fc2"),
            *_ln("norm", _V + "post_layernorm"),
            Entry("head.probe", (_V + "head.probe",), TOKEN, optional=True),
            Entry("head.in_proj.weight", (_V + "head.attention.in_proj_weight",), optional=True),
            Entry("head.in_proj.bias", (_V + "head.attention.in_proj_bias",), optional=True),
            *(Entry(e.dst, e.src, optional=True) for e in _ln("head.out_proj", _V + "head.attention.out_proj")),
            *(Entry(e.dst, e.src, optional=True) for e in _ln("head.norm", _V + "head.layernorm")),
            *(Entry(e.dst, e.src, optional=True) for e in _ln("head.mlp.fc1", _V + "head.mlp.fc1")),
            *(Entry(e.dst, e.src, optional=True) for e in _ln("head.mlp.fc2", _V + "head.mlp.fc2")),
        ),
        drops=(
            Drop(r"text_model\..*", "text tower (packvit is the vision tower)"),
            Drop(r"logit_(scale|bias)", "contrastive logit scale and bias, not part of the vision tower"),
        ),
        # The dual-tower Siglip2Model (the hub files), and bare vision models saved by older
        # transformers, nest the vision tower under vision_model.
        aliases=((r"^vision_model\.", ""),),
    )


_FIELDS = {
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "intermediate_size": "intermediate_size",
    "patch_size": "patch_size",
    "num_channels": "num_channels",
    "num_patches": "num_patches",
    "layer_norm_eps": "norm_eps",
    "hidden_act": "hidden_act",
    "vision_use_head": "use_head",
}
_IGNORED = {"attention_dropout"}


def config_from_hf(d: dict, present_keys: set[str] | None = None, strict: bool = True) -> Siglip2Config:
    if d.get("model_type") == "siglip2":  # the dual-tower model: the vision tower's config is nested
        d = d.get("vision_config") or {}
    kw = parse_fields(
        d, _FIELDS, _IGNORED, family="SigLIP2", strict=strict, model_type="siglip2_vision_model", config_class=Siglip2Config,
    )
    if present_keys is not None:
        kw["use_head"] = any(k.endswith("head.probe") for k in present_keys)
    return Siglip2Config(**kw)


def config_to_hf(cfg: Siglip2Config) -> dict:
    out = {v: getattr(cfg, k) for v, k in _FIELDS.items()}
    out.update(model_type="siglip2_vision_model", architectures=[HF_ARCHITECTURE])
    return out
