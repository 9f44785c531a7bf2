"""``Family``: everything packvit knows about one model family, in one typed record.

Each family's file (``weights_conversion/families/<name>.py``) builds its ``FAMILY``; the registry
``weights_conversion.families.FAMILIES`` lists them. Conversion, the image processor's defaults,
the transformers twin, the benchmarks and the tests all read the record, so no code outside a
family's own files asks which family it holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from .keymap import KeyMap


@dataclass(frozen=True)
class PreprocessDefaults:
    """The image processor's recipe where a checkpoint has no ``preprocessor_config.json``."""

    mode: str  # "naflex" | "native" (see packvit.preprocess)
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    resample: int  # a PIL resampling filter (PIL.Image.BILINEAR = 2, BICUBIC = 3)
    rescale_first: bool = False  # transformers' torchvision processor rescales to float before resizing

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """(C, H, W) or (t, C, H, W) pixels in [0, 1] -> ``(x - mean) / std`` per channel."""
        mean, std = (
            torch.tensor(v, dtype=x.dtype, device=x.device).view(-1, 1, 1) for v in (self.image_mean, self.image_std)
        )
        return (x - mean) / std


@dataclass(frozen=True)
class OriginalFormat:
    """A research release without a transformers ``config.json`` (see ``weights_conversion.original``)."""

    looks_like: Callable[[set[str]], bool]  # these tensor names are this layout
    keymap: Callable[[Any], KeyMap]  # original names -> packvit names
    infer_config: Callable[[dict[str, torch.Tensor]], dict]  # the config fields the tensor shapes show
    prepare: Callable[[dict[str, torch.Tensor], Any, list[str]], dict[str, torch.Tensor]]  # fixes before the key map
    needs_flag: tuple[str, ...] = ()  # fields no shape shows: a preset or a flag must give them


@dataclass(frozen=True)
class Family:
    """One model family: the packvit model, its transformers twin, and how to go between them."""

    name: str  # "siglip2": the registry key, the family field of packvit's own config.json
    model_class: type  # a packvit.models.base.PackedViT subclass
    config_class: type  # its config dataclass
    presets: Mapping[str, Any]  # published checkpoint name -> its config (``config_class.from_name``)
    default_preset: str  # the one the benchmarks use
    patch_size: int  # of every published checkpoint, and of the tiny test models

    # transformers' side
    hf_model_types: tuple[str, ...]  # config.json model_types read; the first is the vision model's, written on export
    hf_class: str  # transformers class of the vision model (``from_pretrained`` of the first model type)
    hf_wrappers: Mapping[str, str]  # model_type of an image-text checkpoint -> its class; vision tower at .vision_model
    hf_processor: str  # transformers image processor class (``image_processor_type``, without "Fast")
    tiny_hf_fields: Mapping[str, Any]  # the family's own fields of a tiny transformers config (tests, demo)

    # conversion
    keymap: Callable[[Any], KeyMap]  # packvit config -> HF names <-> packvit names
    config_from_hf: Callable[..., Any]  # (config.json dict, present_keys=None, strict=True) -> packvit config
    config_to_hf: Callable[[Any], dict]  # packvit config -> config.json dict
    original: OriginalFormat | None  # the research release's layout, where packvit reads one

    # inputs and outputs
    preprocess: PreprocessDefaults
    num_prefix_tokens: Callable[[Any], int]  # tokens before the patches (a packvit or transformers config)
    hf_inputs: Callable[[list[torch.Tensor], int], dict]  # (C, H, W) frames, patch -> transformers forward kwargs
    hf_pads: bool  # one transformers call takes frames of different sizes (padded, with a mask)
    fixed_image_size: Callable[[Any], int] = field(default=lambda cfg: 224)  # the fixed-size recipe's side, in pixels

    @property
    def hf_model_type(self) -> str:
        """The model_type of the bare vision model, as export writes it."""
        return self.hf_model_types[0]


def stacked_pixels(frames: list[torch.Tensor], patch: int) -> dict:
    """``pixel_values`` of same-size (C, H, W) frames: the input of transformers' fixed-grid ViTs."""
    if len({tuple(f.shape) for f in frames}) != 1:
        raise ValueError(f"frames must share one size for one call, got {sorted({tuple(f.shape) for f in frames})}")
    return {"pixel_values": torch.stack(frames)}
