"""The original research releases, which have no transformers ``config.json``.

* ``dinov3``: facebookresearch/dinov3 ``.pth`` backbones (bare state dicts; read only with
  ``allow_pickle`` / ``--allow-pickle``, through ``torch.load(weights_only=True)``).
* ``aimv2``: Apple ml-aim AIMv2 (``preprocessor.`` / ``trunk.`` / ``head.``; LiT checkpoints under
  ``image_encoder.``), as the hub's early custom-code revisions hold it.

The architecture is read off the tensor shapes; what the shapes cannot say comes from a preset
(``dinov3-vitl16-pretrain-lvd1689m``) or a flag. AIMv2's number of heads is such a field. Each reader
(``original/<family>.py``) is the ``original`` of its family's record; the key
maps read these layouts into packvit names directly; packvit never writes them (export to HF instead).
"""

from __future__ import annotations

import dataclasses

import torch

from ..family import Family
from ..keymap import ConversionError, ConversionReport, from_hf

__all__ = ["convert_original"]


def convert_original(
    fam: Family,
    state: dict[str, torch.Tensor],
    *,
    preset: str | None = None,
    overrides: dict | None = None,
) -> tuple[str, object, dict[str, torch.Tensor], ConversionReport]:
    """(family, original tensors) -> (family name, packvit config, packvit state dict, report)."""
    fmt = fam.original
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    km = fmt.keymap(fam.config_class())
    norm = {km.normalise(k): v for k, v in state.items()}
    inferred = fmt.infer_config(norm)
    if preset is not None:
        base = fam.config_class.from_name(preset)
        # The weights show some fields unambiguously; a preset that disagrees is the wrong preset.
        clash = {k: (getattr(base, k), v) for k, v in inferred.items() if getattr(base, k) != v}
        if clash:
            raise ConversionError(
                f"preset {preset!r} does not match the weights: "
                + ", ".join(f"{k}: preset {a}, weights {b}" for k, (a, b) in clash.items())
            )
        cfg = dataclasses.replace(base, **overrides)
    else:
        missing = [f for f in fmt.needs_flag if f not in inferred and f not in overrides]
        if missing:
            raise ConversionError(
                f"an original {fam.name} checkpoint does not say its {', '.join(missing)}: give a preset "
                f"(preset=..., --preset, one of {sorted(fam.presets)}) or the value (num_heads=..., --num-heads)"
            )
        cfg = fam.config_class(**{**inferred, **overrides})
    if cfg.hidden_size % cfg.num_heads:
        raise ConversionError(f"hidden size {cfg.hidden_size} is not divisible by num_heads={cfg.num_heads}")
    notes: list[str] = []
    prepared = fmt.prepare(norm, cfg, notes)
    sd, report = from_hf(fmt.keymap(cfg), prepared, cfg, cfg.num_layers)
    for note in notes:
        report.notes.append(note)
    return fam.name, cfg, sd, report
