"""SigLIP2 NaFlex: transformers' ``Siglip2Model`` / ``Siglip2VisionModel`` layout <-> packvit ``Siglip2``."""

from __future__ import annotations

import torch
from PIL import Image

from packvit.models.siglip2 import PRESETS, Siglip2, Siglip2Config
from packvit.packing import convert_to_packing_format

from ..family import Family, PreprocessDefaults
from ..hfconfig import parse_fields
from ..keymap import CONCAT, TOKEN, Drop, Entry, KeyMap

HF_CLASS = "Siglip2VisionModel"

# The keys are those of a bare Siglip2VisionModel as transformers 5 saves it.
_L = "encoder.layers.{n}."


def _ln(dst: str, src: str) -> tuple[Entry, Entry]:
    return Entry(dst + ".weight", (src + ".weight",)), Entry(dst + ".bias", (src + ".bias",))


def keymap(cfg: Siglip2Config) -> KeyMap:
    return KeyMap(
        entries=(
            *_ln("patch_embed", "embeddings.patch_embedding"),
            Entry("pos_embed", ("embeddings.position_embedding.weight",)),
            *_ln("blocks.{n}.norm1", _L + "layer_norm1"),
            Entry("blocks.{n}.attn.qkv.weight", tuple(_L + f"self_attn.{p}_proj.weight" for p in "qkv"), CONCAT),
            *(Entry(f"blocks.{{n}}.attn.{p}_bias", (_L + f"self_attn.{p}_proj.bias",)) for p in "qkv"),
            *_ln("blocks.{n}.attn.proj", _L + "self_attn.out_proj"),
            *_ln("blocks.{n}.norm2", _L + "layer_norm2"),
            *_ln("blocks.{n}.mlp.fc1", _L + "mlp.fc1"),
            *_ln("blocks.{n}.mlp.fc2", _L + "mlp.fc2"),
            *_ln("norm", "post_layernorm"),
            Entry("head.probe", ("head.probe",), TOKEN, optional=True),
            Entry("head.in_proj.weight", ("head.attention.in_proj_weight",), optional=True),
            Entry("head.in_proj.bias", ("head.attention.in_proj_bias",), optional=True),
            *(Entry(e.dst, e.src, optional=True) for e in _ln("head.out_proj", "head.attention.out_proj")),
            *(Entry(e.dst, e.src, optional=True) for e in _ln("head.norm", "head.layernorm")),
            *(Entry(e.dst, e.src, optional=True) for e in _ln("head.mlp.fc1", "head.mlp.fc1")),
            *(Entry(e.dst, e.src, optional=True) for e in _ln("head.mlp.fc2", "head.mlp.fc2")),
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
    if isinstance(d, dict) and "vision_use_head" not in d:
        # transformers 4.x neither writes the field nor has a default for it: its model builds the
        # head unless the config says otherwise (``hasattr(config, "vision_use_head")``), as 5.x's default does.
        d = {**d, "vision_use_head": True}
    kw = parse_fields(
        d,
        _FIELDS,
        _IGNORED,
        family="SigLIP2",
        strict=strict,
        model_type="siglip2_vision_model",
        config_class=Siglip2Config,
    )
    if present_keys is not None:
        kw["use_head"] = any(k.endswith("head.probe") for k in present_keys)
    return Siglip2Config(**kw)


def config_to_hf(cfg: Siglip2Config) -> dict:
    out = {v: getattr(cfg, k) for v, k in _FIELDS.items()}
    out.update(model_type="siglip2_vision_model", architectures=[HF_CLASS])
    return out


def hf_inputs(frames: list[torch.Tensor], patch: int) -> dict:
    """transformers' NaFlex input: each (C, H, W) frame as (h*w, p*p*C) patches, padded to the longest
    with zeros, a mask of the real patches, and each frame's (h, w)."""
    rows = [convert_to_packing_format(f[None], patch) for f in frames]  # (h*w, p*p*C) each
    n = max(len(r) for r in rows)
    if all(len(r) == n for r in rows):
        pixels = torch.stack(rows)  # (B, n, p*p*C)
    else:
        pixels = rows[0].new_zeros(len(rows), n, rows[0].shape[1])
        for i, r in enumerate(rows):
            pixels[i, : len(r)] = r
    device = pixels.device
    mask = (torch.arange(n, device=device)[None] < torch.tensor([len(r) for r in rows], device=device)[:, None]).long()
    shapes = torch.tensor([[f.shape[1] // patch, f.shape[2] // patch] for f in frames], device=device)
    return {"pixel_values": pixels, "pixel_attention_mask": mask, "spatial_shapes": shapes}


FAMILY = Family(
    name="siglip2",
    model_class=Siglip2,
    config_class=Siglip2Config,
    presets=PRESETS,
    default_preset="siglip2-so400m-patch16-naflex",
    patch_size=16,
    hf_model_types=("siglip2_vision_model", "siglip2"),
    hf_class=HF_CLASS,
    hf_wrappers={"siglip2": "Siglip2Model"},
    hf_processor="Siglip2ImageProcessor",
    tiny_hf_fields={"patch_size": 16, "num_patches": 256},
    keymap=keymap,
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    original=None,
    preprocess=PreprocessDefaults("naflex", (0.5,) * 3, (0.5,) * 3, Image.BILINEAR),
    num_prefix_tokens=lambda cfg: 0,
    hf_inputs=hf_inputs,
    hf_pads=True,
    # The learned position grid covers pos_grid patches a side.
    fixed_image_size=lambda cfg: cfg.patch_size * cfg.pos_grid,
)
