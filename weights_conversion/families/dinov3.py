"""DINOv3 ViT: transformers' ``DINOv3ViTModel`` layout <-> packvit ``DINOv3``."""

from __future__ import annotations

from PIL import Image

from packvit.models.dinov3 import PRESETS, DINOv3, DINOv3Config

from ..family import Family, PreprocessDefaults, stacked_pixels
from ..hfconfig import parse_fields
from ..keymap import CONCAT, CONV_TO_LINEAR, TOKEN, TOKENS, Entry, KeyMap
from ..original import dinov3 as original

HF_CLASS = "DINOv3ViTModel"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

_L = "layer.{n}."  # what save_pretrained writes and the hub holds


def keymap(cfg: DINOv3Config) -> KeyMap:
    if cfg.use_gated_mlp:
        mlp = (
            Entry("blocks.{n}.mlp.fc1.weight", (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"), CONCAT),
            Entry(
                "blocks.{n}.mlp.fc1.bias", (_L + "mlp.gate_proj.bias", _L + "mlp.up_proj.bias"), CONCAT, optional=True
            ),
        )
    else:
        mlp = (
            Entry("blocks.{n}.mlp.fc1.weight", (_L + "mlp.up_proj.weight",)),
            Entry("blocks.{n}.mlp.fc1.bias", (_L + "mlp.up_proj.bias",), optional=True),
        )
    return KeyMap(
        entries=(
            Entry("cls_token", ("embeddings.cls_token",), TOKENS),
            Entry("register_tokens", ("embeddings.register_tokens",), TOKENS),
            Entry("mask_token", ("embeddings.mask_token",), TOKEN),
            Entry("patch_embed.weight", ("embeddings.patch_embeddings.weight",), CONV_TO_LINEAR),
            Entry("patch_embed.bias", ("embeddings.patch_embeddings.bias",)),
            Entry("blocks.{n}.norm1.weight", (_L + "norm1.weight",)),
            Entry("blocks.{n}.norm1.bias", (_L + "norm1.bias",)),
            Entry("blocks.{n}.attn.qkv.weight", tuple(_L + f"attention.{p}_proj.weight" for p in "qkv"), CONCAT),
            *(Entry(f"blocks.{{n}}.attn.{p}_bias", (_L + f"attention.{p}_proj.bias",), optional=True) for p in "qkv"),
            Entry("blocks.{n}.attn.proj.weight", (_L + "attention.o_proj.weight",)),
            Entry("blocks.{n}.attn.proj.bias", (_L + "attention.o_proj.bias",), optional=True),
            Entry("blocks.{n}.ls1.scale", (_L + "layer_scale1.lambda1",)),
            Entry("blocks.{n}.norm2.weight", (_L + "norm2.weight",)),
            Entry("blocks.{n}.norm2.bias", (_L + "norm2.bias",)),
            *mlp,
            Entry("blocks.{n}.mlp.fc2.weight", (_L + "mlp.down_proj.weight",)),
            Entry("blocks.{n}.mlp.fc2.bias", (_L + "mlp.down_proj.bias",), optional=True),
            Entry("blocks.{n}.ls2.scale", (_L + "layer_scale2.lambda1",)),
            Entry("norm.weight", ("norm.weight",)),
            Entry("norm.bias", ("norm.bias",)),
        ),
        # In memory, transformers 5 names the stack model.layer.N. (and renames on load and save);
        # state dicts taken from a live model carry that spelling.
        aliases=((r"^model\.layer\.(\d+)\.", r"layer.\1."),),
    )


_FIELDS = {
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "intermediate_size": "intermediate_size",
    "patch_size": "patch_size",
    "num_channels": "num_channels",
    "num_register_tokens": "num_register_tokens",
    "layer_norm_eps": "norm_eps",
    "hidden_act": "hidden_act",
    "use_gated_mlp": "use_gated_mlp",
    "layerscale_value": "layerscale_value",
    "rope_theta": "rope_theta",
    "query_bias": "query_bias",
    "key_bias": "key_bias",
    "value_bias": "value_bias",
    "proj_bias": "proj_bias",
    "mlp_bias": "mlp_bias",
    "drop_path_rate": "drop_path_rate",
    "pos_embed_shift": "pos_embed_shift",
    "pos_embed_jitter": "pos_embed_jitter",
    "pos_embed_rescale": "pos_embed_rescale",
}
# image_size only sets HF's unused default grid; the rest configures HF's Backbone wrapper. (The
# pos_embed_* augmentations are read, but apply only with the model's rope_augmentation switch on.)
_IGNORED = {
    "image_size",
    "attention_dropout",
    "out_features",
    "out_indices",
    "_out_features",
    "_out_indices",
    "stage_names",
    "apply_layernorm",
    "reshape_hidden_states",
    "return_class_token",
}


def config_from_hf(d: dict, present_keys: set[str] | None = None, strict: bool = True) -> DINOv3Config:
    return DINOv3Config(
        **parse_fields(
            d,
            _FIELDS,
            _IGNORED,
            family="DINOv3",
            strict=strict,
            model_type="dinov3_vit",
            config_class=DINOv3Config,
        )
    )


def config_to_hf(cfg: DINOv3Config) -> dict:
    out = {v: getattr(cfg, k) for v, k in _FIELDS.items()}
    out.update(model_type="dinov3_vit", architectures=[HF_CLASS])
    return out


FAMILY = Family(
    name="dinov3",
    model_class=DINOv3,
    config_class=DINOv3Config,
    presets=PRESETS,
    default_preset="dinov3-vitl16-pretrain-lvd1689m",
    patch_size=16,
    hf_model_types=("dinov3_vit",),
    hf_class=HF_CLASS,
    hf_wrappers={},
    hf_processor="DINOv3ViTImageProcessor",
    tiny_hf_fields={"patch_size": 16, "num_register_tokens": 4},
    keymap=keymap,
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    original=original.FORMAT,
    # DINOv3's torchvision processor rescales to float before resizing (its _preprocess override).
    preprocess=PreprocessDefaults("native", IMAGENET_MEAN, IMAGENET_STD, Image.BILINEAR, rescale_first=True),
    num_prefix_tokens=lambda cfg: 1 + cfg.num_register_tokens,  # CLS, then the registers
    hf_inputs=stacked_pixels,
    hf_pads=False,
)
