"""The original research releases, which have no transformers ``config.json``.

* ``dinov3``: facebookresearch/dinov3 ``.pth`` backbones (bare state dicts; read only with
  ``allow_pickle`` / ``--allow-pickle``, through ``torch.load(weights_only=True)``).
* ``aimv2``: Apple ml-aim AIMv2 (``preprocessor.`` / ``trunk.`` / ``head.``; LiT checkpoints under
  ``image_encoder.``), as the hub's early custom-code revisions hold it.

The architecture is read off the tensor shapes; what the shapes cannot say comes from a preset
(``dinov3-vitl16-pretrain-lvd1689m``) or a flag. AIMv2's number of heads is such a field. The key
maps read these layouts into packvit names directly; packvit never writes them (export to HF instead).
"""

from __future__ import annotations

import dataclasses
from types import ModuleType

import torch

from ..keymap import ConversionError, ConversionReport, from_hf
from . import aimv2, dinov3

LAYOUTS: dict[str, ModuleType] = {"dinov3": dinov3, "aimv2": aimv2}

__all__ = ["LAYOUTS", "detect_layout", "convert_original"]


def detect_layout(keys: set[str]) -> str | None:
    """The packvit family of an original-layout state dict, or None if it is not one."""
    for name, mod in LAYOUTS.items():
        if mod.looks_like(keys):
            return name
    return None


def convert_original(
    family: str,
    state: dict[str, torch.Tensor],
    *,
    preset: str | None = None,
    overrides: dict | None = None,
) -> tuple[str, object, dict[str, torch.Tensor], ConversionReport]:
    """(family, original tensors) -> (family, packvit config, packvit state dict, report)."""
    mod = LAYOUTS[family]
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    km = mod.keymap(mod.CONFIG_CLASS())
    norm = {km.normalise(k): v for k, v in state.items()}
    inferred = mod.infer_config(norm)
    if preset is not None:
        base = mod.CONFIG_CLASS.from_name(preset)
        # The weights show some fields unambiguously; a preset that disagrees is the wrong preset.
        clash = {k: (getattr(base, k), v) for k, v in inferred.items() if getattr(base, k) != v}
        if clash:
            raise ConversionError(
                f"preset {preset!r} does not match the weights: "
                + ", ".join(f"{k}: preset {a}, weights {b}" for k, (a, b) in clash.items())
            )
        cfg = dataclasses.replace(base, **overrides)
    else:
        missing = [f for f in mod.NEEDS_FLAG if f not in inferred and f not in overrides]
        if missing:
            raise ConversionError(
                f"an original {family} checkpoint does not say its {', '.join(missing)}: give a preset "
                f"(preset=..., --preset, one of {sorted(mod.PRESETS)}) or the value (num_heads=..., --num-heads)"
            )
        cfg = mod.CONFIG_CLASS(**{**inferred, **overrides})
    if cfg.hidden_size % cfg.num_heads:
        raise ConversionError(f"hidden size {cfg.hidden_size} is not divisible by num_heads={cfg.num_heads}")
    notes: list[str] = []
    prepared = mod.prepare(norm, cfg, notes)
    sd, report = from_hf(mod.keymap(cfg), prepared, cfg, cfg.num_layers)
    for note in notes:
        report.notes.append(note)
    return family, cfg, sd, report
