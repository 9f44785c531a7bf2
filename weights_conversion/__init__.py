"""Hugging Face checkpoints <-> packvit models.

    model = load_model("google/siglip2-so400m-patch16-naflex", device="cuda", dtype=torch.bfloat16)
    export_hf(model, "my-tower-hf")   # back to the layout transformers' from_pretrained loads
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import ModuleType

import torch

from .checkpoint_io import CheckpointError, atomic_directory, load_tensors, read_config, resolve, weight_files
from .families import aimv2, dinov3, siglip2
from .keymap import ConversionError, ConversionReport, check_shapes, from_hf, to_hf

FAMILIES: dict[str, ModuleType] = {"aimv2": aimv2, "dinov3": dinov3, "siglip2": siglip2}

__all__ = [
    "FAMILIES", "CheckpointError", "ConversionError", "ConversionReport", "detect_family",
    "convert_state_dict", "load_model", "export_hf", "model_family",
]


def detect_family(config: dict) -> str:
    """The packvit family of a transformers ``config.json``, from its ``model_type``."""
    model_type = config.get("model_type")
    for name, fam in FAMILIES.items():
        if model_type in fam.MODEL_TYPES:
            return name
    known = sorted(t for f in FAMILIES.values() for t in f.MODEL_TYPES)
    raise CheckpointError(f"unknown checkpoint layout: config.json model_type is {model_type!r}; packvit reads {known}")


def model_family(model: torch.nn.Module) -> str:
    for name, fam in FAMILIES.items():
        if type(model) is fam.MODEL_CLASS:
            return name
    raise TypeError(f"{type(model).__name__} is not a packvit model")


def convert_state_dict(
    config: dict, hf_state: dict[str, torch.Tensor], *, family: str | None = None, strict_config: bool = True
):
    """(config.json dict, HF tensors) -> (family, packvit config, packvit state dict, report)."""
    detected = detect_family(config)
    if family is not None and family != detected:
        raise CheckpointError(f"expected a {family} checkpoint, but config.json describes a {detected} model")
    fam = FAMILIES[detected]
    cfg = fam.config_from_hf(config, present_keys=_norm_keys(fam, set(hf_state)), strict=strict_config)
    sd, report = from_hf(fam.keymap(cfg), hf_state, cfg, cfg.num_layers)
    return detected, cfg, sd, report


def _norm_keys(fam: ModuleType, keys: set[str]) -> set[str]:
    # Key normalisation depends only on aliases, which do not depend on the config.
    km = fam.keymap(fam.CONFIG_CLASS())
    return {km.normalise(k) for k in keys}


def build_model(family: str, cfg, state_dict: dict[str, torch.Tensor], attn_backend: str = "auto"):
    """Instantiate a packvit model and load converted weights into it, strictly."""
    fam = FAMILIES[family]
    with torch.device("meta"):
        model = fam.MODEL_CLASS(cfg, attn_backend="sdpa")
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_shapes(expected, state_dict)
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.set_attention_backend(attn_backend)
    return model


def load_model(
    src: str | os.PathLike,
    *,
    revision: str | None = None,
    family: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    attn_backend: str = "auto",
    strict_config: bool = True,
    allow_pickle: bool = False,
):
    """Load a HF checkpoint (local dir or hub id) as a packvit model in eval mode."""
    path = resolve(src, revision)
    directory = path if path.is_dir() else path.parent
    config = read_config(directory)
    hf_state = load_tensors(weight_files(path, allow_pickle=allow_pickle))
    fam_name, cfg, sd, _ = convert_state_dict(config, hf_state, family=family, strict_config=strict_config)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    model = build_model(fam_name, cfg, sd, attn_backend="sdpa")
    model.to(device=device)
    model.set_attention_backend(attn_backend)
    return model.eval()


def hf_state_dict(model) -> tuple[dict, dict[str, torch.Tensor]]:
    """A packvit model's (config.json dict, state dict) in the HF layout."""
    fam = FAMILIES[model_family(model)]
    cfg = model.config
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return fam.config_to_hf(cfg), to_hf(fam.keymap(cfg), sd, cfg, cfg.num_layers)


def export_hf(model, dst: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``config.json`` and ``model.safetensors`` that transformers' ``from_pretrained`` loads."""
    from safetensors.torch import save_file

    config, sd = hf_state_dict(model)
    config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(dst)
