"""Hugging Face checkpoints <-> packvit models.

    model = load_model("google/siglip2-so400m-patch16-naflex", device="cuda", dtype=torch.bfloat16)
    export_hf(model, "my-tower-hf")   # back to the layout transformers' from_pretrained loads

Public: the names in ``__all__`` below, and the modules ``convert`` (``convert_checkpoint``),
``checkpoint_io`` (``resolve``, ``read_config``), ``safe_write``, ``keymap``, ``family`` (``Family``),
``families`` (``FAMILIES``, the registry) and ``reference`` (transformers twins, tiny test models).
The rest is internal.

This package builds on packvit's core (``packvit.models``); packvit's loaders (``from_pretrained``,
the ``*Packing`` classes, the tower) build on it, and ``import packvit`` never imports it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint_io import (
    CheckpointError,
    load_tensors,
    read_config,
    read_json_object,
    resolve,
    save_tensors,
    weight_files,
    write_text,
)
from .families import FAMILIES
from .family import Family
from .keymap import ConversionError, ConversionReport, check_dtypes, check_shapes, from_hf, to_hf
from .native import PREPROCESSOR, config_from_native, is_native, rename_legacy
from .original import convert_original
from .progress import ByteBar
from .safe_write import UnsafeDestinationError, atomic_directory

__all__ = [
    "FAMILIES",
    "Family",
    "CheckpointError",
    "ConversionError",
    "UnsafeDestinationError",
    "ConversionReport",
    "detect_family",
    "convert_state_dict",
    "load_model",
    "export_hf",
    "model_family",
    "Checkpoint",
    "read_checkpoint",
    "cast_state",
    "build_model",
    "config_of",
]


def detect_family(config: dict) -> str:
    """The packvit family of a transformers ``config.json``, from its ``model_type``."""
    model_type = config.get("model_type")
    for name, fam in FAMILIES.items():
        if model_type in fam.hf_model_types:
            return name
    known = sorted(t for f in FAMILIES.values() for t in f.hf_model_types)
    raise CheckpointError(f"unknown checkpoint layout: config.json model_type is {model_type!r}; packvit reads {known}")


def config_of(path: str | os.PathLike, *, strict_config: bool = True) -> tuple[str, Any]:
    """(family, packvit config) of a checkpoint folder, from its ``config.json`` alone (no weights):
    a transformers config or packvit's own. Fields that depend on the weights (a pooling head's
    presence) are as the config says, not as the tensors do."""
    d = read_config(Path(path).expanduser())
    if is_native(d):
        return config_from_native(d)
    family = detect_family(d)
    return family, FAMILIES[family].config_from_hf(d, strict=strict_config)


def model_family(model: torch.nn.Module) -> str:
    for name, fam in FAMILIES.items():
        if type(model) is fam.model_class:
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


def _norm_keys(fam: Family, keys: set[str]) -> set[str]:
    # Key normalisation depends only on aliases, which do not depend on the config.
    km = fam.keymap(fam.config_class())
    return {km.normalise(k) for k in keys}


def build_model(family: str, cfg, state_dict: dict[str, torch.Tensor], attn_backend: str = "auto"):
    """Instantiate a packvit model and load converted weights into it, strictly."""
    fam = FAMILIES[family]
    with torch.device("meta"):
        model = fam.model_class(cfg, attn_backend="sdpa")
    expected = model.state_dict()
    check_shapes({k: v.shape for k, v in expected.items()}, state_dict)
    check_dtypes({k: v.dtype for k, v in expected.items()}, state_dict)
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.set_attention_backend(attn_backend)
    return model


def detect_layout(keys: set[str]) -> str | None:
    """The family whose original research release has these tensor names, or None if none has."""
    for name, fam in FAMILIES.items():
        if fam.original is not None and fam.original.looks_like(keys):
            return name
    return None


@dataclass
class Checkpoint:
    """A source checkpoint read and converted to packvit tensors, not yet a model."""

    family: str
    config: Any  # the family's packvit config dataclass
    state: dict[str, torch.Tensor]  # packvit names
    report: ConversionReport
    layout: str  # "hf", "packvit", or "original-<family>"
    path: Path  # the resolved source: a directory or a single file
    hf_config: dict | None  # the transformers config.json, for the "hf" layout
    source_tensors: int
    source_bytes: int
    preprocessor: dict | None = None  # the source's preprocessor_config.json, carried into what is written


def _source_config(path: Path, config: str | os.PathLike | None) -> dict | None:
    """The config.json to use: ``config`` if given, else the one in (or beside) ``path``, else None."""
    if config is not None:
        f = Path(config).expanduser()
        if f.is_dir():
            f = f / "config.json"
        if not f.is_file():
            raise CheckpointError(f"config {str(config)!r} does not exist: expected a config.json file or its folder")
        return read_json_object(f)
    directory = path if path.is_dir() else path.parent
    return read_config(directory) if (directory / "config.json").is_file() else None


def _source_preprocessor(path: Path, config: str | os.PathLike | None) -> dict | None:
    """The ``preprocessor_config.json`` beside the weights, else beside ``config``; None if there is none."""
    places = [path if path.is_dir() else path.parent]
    if config is not None:
        c = Path(config).expanduser()
        places.append(c if c.is_dir() else c.parent)
    for d in places:
        if (d / PREPROCESSOR).is_file():
            return read_json_object(d / PREPROCESSOR)
    return None


def check_finite(tensors: dict[str, torch.Tensor], where: Path) -> None:
    """NaN or Inf in a weight is a broken checkpoint: refuse it, naming the first such tensor."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(
                f"{where}: tensor {name!r} holds {bad} NaN/Inf value{'s' if bad > 1 else ''}; the checkpoint is "
                "broken or was saved mid-divergence. Pass allow_nonfinite=True (--allow-nonfinite) to read it anyway"
            )


def read_checkpoint(
    src: str | os.PathLike,
    *,
    revision: str | None = None,
    config: str | os.PathLike | None = None,
    family: str | None = None,
    strict_config: bool = True,
    allow_pickle: bool = False,
    preset: str | None = None,
    num_heads: int | None = None,
    progress: Any = None,
    allow_nonfinite: bool = False,
) -> Checkpoint:
    """Read any checkpoint packvit understands and convert it to packvit tensors.

    ``src`` is a hub id, a folder, or a single weights file. The layout is recognised in this order:
    a packvit ``config.json`` (written by ``packvit convert``); original research weights
    (facebookresearch/dinov3, Apple ml-aim), recognised by their tensor names, configured by
    ``preset`` / ``num_heads`` and the shapes; otherwise a transformers checkpoint, whose
    ``config.json`` sits beside the weights or is given as ``config``. ``progress`` is a tqdm bar
    (its total is set to the bytes to read) or a callable taking a byte count. Weights holding NaN
    or Inf are refused unless ``allow_nonfinite``.
    """
    path = resolve(src, revision)
    cfg_json = _source_config(path, config)
    preprocessor = _source_preprocessor(path, config)
    files = weight_files(path, allow_pickle=allow_pickle)
    _check_config_first(cfg_json, files, family, strict_config)
    source_bytes = sum(f.stat().st_size for f in files)
    if progress is not None and hasattr(progress, "reset"):  # a tqdm bar: now we know its total
        progress.reset(total=source_bytes)
    tensors = load_tensors(files, None if progress is None else getattr(progress, "update", progress))
    if cfg_json is not None and is_native(cfg_json):
        fam_name, cfg = config_from_native(cfg_json)
        report = ConversionReport(mapped=len(tensors))
        layout, sd, hf_config = "packvit", rename_legacy(tensors), None
    elif (orig := detect_layout(set(tensors))) is not None:
        if num_heads is None and cfg_json is not None and isinstance(cfg_json.get("num_attention_heads"), int):
            # ml-aim's custom-code hub revisions ship a config.json beside original-layout weights.
            num_heads = cfg_json["num_attention_heads"]
        fam_name, cfg, sd, report = convert_original(
            FAMILIES[orig], tensors, preset=preset, overrides={"num_heads": num_heads}
        )
        layout, hf_config = f"original-{orig}", None
    elif cfg_json is None:
        raise CheckpointError(
            f"{path} has no config.json beside it, and its tensor names are not an original dinov3/ml-aim "
            "layout: give the transformers config.json (config=..., --config)"
        )
    else:
        fam_name, cfg, sd, report = convert_state_dict(cfg_json, tensors, family=family, strict_config=strict_config)
        layout, hf_config = "hf", cfg_json
    if family is not None and family != fam_name:
        raise CheckpointError(f"expected a {family} checkpoint, but {path} holds a {fam_name} model")
    if not allow_nonfinite:  # the converted tensors: a NaN in a dropped text tower is not the vision tower's
        check_finite(sd, path)
    return Checkpoint(fam_name, cfg, sd, report, layout, path, hf_config, len(tensors), source_bytes, preprocessor)


def _check_config_first(cfg_json: dict | None, files: list[Path], family: str | None, strict: bool) -> None:
    """Parse ``config.json`` before reading gigabytes of weights: a typo in it must not cost the read.

    The tensor names come from the safetensors headers alone; pickles cannot be listed without
    unpickling them, so their config is checked after the read, as before."""
    if cfg_json is None or any(f.suffix != ".safetensors" for f in files):
        return
    if is_native(cfg_json):
        config_from_native(cfg_json)
        return
    from safetensors import safe_open

    names: set[str] = set()
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as fh:
                names.update(fh.keys())
        except Exception:
            return  # unreadable: load_tensors says why, naming the file
    if detect_layout(names) is None:  # a transformers layout: the file must describe the model
        name = detect_family(cfg_json)
        if family is not None and family != name:
            raise CheckpointError(f"expected a {family} checkpoint, but config.json describes a {name} model")
        fam = FAMILIES[name]
        fam.config_from_hf(cfg_json, present_keys=_norm_keys(fam, names), strict=strict)


def cast_state(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Cast floating tensors to ``dtype``; with None, keep a single dtype, and widen a mix to float32."""
    if dtype is None:
        dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
        if len(dtypes) <= 1:
            return state
        dtype = torch.float32  # a mix (e.g. fp32 norms beside bf16 weights): widening loses nothing
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


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
    config: str | os.PathLike | None = None,
    preset: str | None = None,
    num_heads: int | None = None,
    allow_nonfinite: bool = False,
    progress: bool = False,
):
    """Load a checkpoint (HF, packvit-native or original layout; local or hub id) as a packvit model in eval mode.

    ``progress=True`` shows a tqdm bar of the bytes read (worth it for a DINOv3 7B).
    """
    bar = ByteBar("read", progress)
    try:
        ckpt = read_checkpoint(
            src,
            revision=revision,
            config=config,
            family=family,
            strict_config=strict_config,
            allow_pickle=allow_pickle,
            preset=preset,
            num_heads=num_heads,
            allow_nonfinite=allow_nonfinite,
            progress=bar if progress else None,
        )
    finally:
        bar.close()
    model = build_model(ckpt.family, ckpt.config, cast_state(ckpt.state, dtype), attn_backend="sdpa")
    model.to(device=device)
    model.set_attention_backend(attn_backend)
    return model.eval()


def hf_state_dict(model) -> tuple[dict, dict[str, torch.Tensor]]:
    """A packvit model's (config.json dict, state dict) in the HF layout."""
    if getattr(model, "truncated", False):
        raise ValueError(
            f"this {type(model).__name__} was truncated to {len(model.blocks)} blocks without its final norm "
            "(a vision tower's select_layer), so it is no whole checkpoint: export the tower with "
            "PackedVisionTower.export_hf, which takes the dropped parts from its source checkpoint"
        )
    fam = FAMILIES[model_family(model)]
    cfg = model.config
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return fam.config_to_hf(cfg), to_hf(fam.keymap(cfg), sd, cfg, cfg.num_layers)


def export_hf(
    model,
    dst: str | os.PathLike,
    *,
    overwrite: bool = False,
    preprocessor: dict | None = None,
    sources=(),
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` that transformers' ``from_pretrained`` loads,
    and ``preprocessor_config.json`` when given one (``Checkpoint.preprocessor``).

    Written through ``safe_write.atomic_directory``: ``dst`` is replaced only once the new folder is
    complete, and only if packvit wrote it (``overwrite``); ``sources`` are paths ``dst`` must not contain.
    """
    config, sd = hf_state_dict(model)
    config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    with atomic_directory(dst, sources=sources, overwrite=overwrite, command="export-hf") as tmp:
        save_tensors(sd, tmp / "model.safetensors")
        if preprocessor is not None:
            write_text(tmp / PREPROCESSOR, json.dumps(preprocessor, indent=2) + "\n")
        write_text(tmp / "config.json", json.dumps(config, indent=2) + "\n")
    return Path(dst)
