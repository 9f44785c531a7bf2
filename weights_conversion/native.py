"""packvit's own checkpoint layout: packvit tensor names in safetensors, plus a ``config.json``.

    config.json = {"format": "packvit", "format_version": 1, "family": "dinov3",
                   "config": {<the family's config dataclass fields>}, "dtype": "bfloat16"}

Tensors are written as ``model.safetensors``, or, above ``max_shard_size``, as
``model-0000i-of-0000n.safetensors`` shards with a ``model.safetensors.index.json`` (the same index
format transformers writes), so the loader in ``checkpoint_io`` reads both layouts.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import torch

from packvit._version import __version__

from .checkpoint_io import INDEX, SINGLE, CheckpointError, save_tensors, write_text
from .families import FAMILIES
from .hfconfig import check_types

FORMAT = "packvit"
FORMAT_VERSION = 1


PREPROCESSOR = "preprocessor_config.json"  # carried from the source, so the resize recipe survives


def is_native(config) -> bool:
    return isinstance(config, dict) and config.get("format") == FORMAT


def describe_native(config) -> tuple[str, dict] | None:
    """(family, the model's config fields) of a packvit ``config.json``; None for any other file. For
    readers that need only the family and patch size, such as the image processor."""
    if not is_native(config):
        return None
    family, fields = config.get("family"), config.get("config")
    if family not in FAMILIES or not isinstance(fields, dict):
        raise CheckpointError(
            f"packvit config.json names family {family!r} with config {type(fields).__name__}; "
            f"expected one of {sorted(FAMILIES)} and an object of fields"
        )
    return family, fields


def config_to_native(family: str, cfg, dtype: torch.dtype) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "family": family,
        "config": dataclasses.asdict(cfg),
        "dtype": str(dtype).removeprefix("torch."),
        "packvit_version": __version__,
    }


def config_from_native(config: dict) -> tuple[str, object]:
    """(family, config dataclass) of a packvit ``config.json``; unknown families or fields are errors."""
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"packvit checkpoint format_version {version!r} is not supported (this packvit reads {FORMAT_VERSION})"
        )
    family = config.get("family")
    if family not in FAMILIES:
        raise CheckpointError(f"packvit config.json names family {family!r}; expected one of {sorted(FAMILIES)}")
    cls = FAMILIES[family].config_class
    fields = config.get("config")
    if not isinstance(fields, dict):
        raise CheckpointError("packvit config.json has no 'config' object with the model's fields")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        # Written by a newer packvit, or edited by hand: a field we do not know may change the model.
        raise CheckpointError(f"packvit config.json has {family} fields this packvit does not know: {unknown}")
    # A training switch (``field(metadata={"switch": True})``, e.g. DINOv3's rope_augmentation)
    # changes no weight: a file written before it existed means its default.
    switches = {f.name for f in dataclasses.fields(cls) if f.metadata.get("switch")}
    missing = sorted(known - set(fields) - switches)
    if missing:
        # packvit writes every field; a default filled in here would be a guess at the model.
        raise CheckpointError(f"packvit config.json lacks the {family} fields {missing}; refusing to guess them")
    try:
        check_types(cls, fields, "packvit config.json")
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    return family, cls(**fields)


# Tensor names earlier packvit versions wrote, renamed since (same format version: the tensors are
# the same). DINOv3's LayerScale was ``gamma``, a name transformers' loaders rewrite to "weight".
_RENAMED = ((".ls1.gamma", ".ls1.scale"), (".ls2.gamma", ".ls2.scale"))


def rename_legacy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        for old, new in _RENAMED:
            if k.endswith(old):
                k = k[: -len(old)] + new
        out[k] = v
    return out


def plan_shards(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped into shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def write_native(
    directory: Path,
    family: str,
    cfg,
    state: dict[str, torch.Tensor],
    *,
    max_shard_bytes: int,
    progress: Callable[[int], None] | None = None,
    preprocessor: dict | None = None,
) -> list[Path]:
    """Write tensors, config.json (and the source's ``preprocessor_config.json``) into an existing
    (temporary) directory; returns the files written."""
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    shards = plan_shards(state, max_shard_bytes)
    names = (
        [SINGLE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    written = []
    for fname, keys in zip(names, shards):
        part = {k: state[k] for k in keys}
        save_tensors(part, directory / fname)
        written.append(directory / fname)
        if progress is not None:
            progress(sum(t.numel() * t.element_size() for t in part.values()))
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": {k: f for f, ks in zip(names, shards) for k in ks}}
        write_text(directory / INDEX, json.dumps(index, indent=2) + "\n")
        written.append(directory / INDEX)
    if preprocessor is not None:
        write_text(directory / PREPROCESSOR, json.dumps(preprocessor, indent=2) + "\n")
        written.append(directory / PREPROCESSOR)
    write_text(directory / "config.json", json.dumps(config_to_native(family, cfg, dtype), indent=2) + "\n")
    written.append(directory / "config.json")
    return written
