"""Finding and reading checkpoint files: local folders, single files, hub ids; safetensors first."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path, PurePosixPath
from typing import Callable

import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, truncated, corrupted or of an unknown layout."""


def resolve(src: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory or file as it is, otherwise a hub id fetched through huggingface_hub.

    The hub path honours ``HF_HUB_OFFLINE``, the cache (``HF_HOME``) and ``revision``, and fetches
    only the files packvit reads.
    """
    path = Path(src).expanduser()
    if path.exists():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to hub ids, but {str(src)!r} is a local path")
        return path
    if str(src).count("/") != 1 or str(src).startswith((".", "/")):
        raise CheckpointError(f"checkpoint {str(src)!r} is neither an existing path nor a hub id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                str(src),
                revision=revision,
                allow_patterns=["config.json", "preprocessor_config.json", "*.safetensors", INDEX],
            )
        )
    except Exception as e:  # offline without a cached copy, unknown repo, no network
        raise CheckpointError(f"could not fetch {str(src)!r} from the hub (revision {revision}): {e}") from e


def read_config(directory: Path) -> dict:
    f = directory / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{directory} has no config.json: packvit needs it to know the architecture")
    return read_json_object(f)


def read_json_object(f: Path) -> dict:
    """A JSON file that must hold one object (``config.json``, an index, ``preprocessor_config.json``)."""
    try:
        value = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{f} holds a JSON {type(value).__name__}, expected an object {{...}}")
    return value


def _shard_path(folder: Path, name, index: Path) -> Path:
    """A shard named by an index, which must lie inside the checkpoint folder (no absolute path, no '..')."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{index} names a shard {name!r}: expected a file name")
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or "\\" in name:
        raise CheckpointError(
            f"{index} names the shard {name!r}, outside the checkpoint folder {folder}; refusing to read it"
        )
    return folder / rel


def weight_files(path: Path, allow_pickle: bool = False) -> list[Path]:
    """The files holding a checkpoint's tensors, checked to exist."""
    if path.is_file():
        files = [path]
    elif (path / INDEX).is_file():
        index = read_json_object(path / INDEX)
        if not isinstance(index.get("weight_map"), dict):
            raise CheckpointError(f"{path / INDEX} is not a valid safetensors index: it has no weight_map object")
        files = sorted({_shard_path(path, n, path / INDEX) for n in index["weight_map"].values()})
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{path / INDEX} names shards that are missing: {missing}")
    elif (path / SINGLE).is_file():
        files = [path / SINGLE]
    else:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles and not allow_pickle:
                raise CheckpointError(
                    f"{path} holds only pickled weights {pickles}; packvit reads safetensors. Pass "
                    "allow_pickle=True (--allow-pickle) to read them with torch.load(weights_only=True)"
                )
            files = [path / p for p in pickles]
            if not files:
                raise CheckpointError(f"{path} holds no weights (no *.safetensors)")
    for f in files:
        if f.suffix in PICKLE_SUFFIXES and not allow_pickle:
            raise CheckpointError(
                f"{f.name} is a pickle; pass allow_pickle=True (--allow-pickle) to read it with "
                "torch.load(weights_only=True)"
            )
    return files


def load_tensors(files: list[Path], progress: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
    """Read every tensor of every file onto the CPU; duplicate names across shards are an error.

    ``progress(nbytes)`` is called after each tensor (safetensors) or file (pickles) is read.
    Pickles are only ever opened with ``weights_only=True``: callers gate them behind ``allow_pickle``.
    """
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            if f.suffix in PICKLE_SUFFIXES:
                part = torch.load(f, map_location="cpu", weights_only=True)
                if isinstance(part, dict) and "model" in part and isinstance(part["model"], dict):
                    part = part["model"]
                if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
                    raise CheckpointError(f"{f} is not a flat state dict of tensors")
                if progress is not None:
                    progress(f.stat().st_size)
            else:
                part = _read_safetensors(f, progress)
                if progress is not None:  # the header: so the bar ends at the files' total size
                    progress(max(0, f.stat().st_size - sum(t.numel() * t.element_size() for t in part.values())))
        except CheckpointError:
            raise
        except Exception as e:  # safetensors' SafetensorError, truncated files, unpickling errors
            raise CheckpointError(f"could not read {f}: {e} (truncated or corrupted?)") from e
        dup = set(part) & set(out)
        if dup:
            raise CheckpointError(f"tensor {sorted(dup)[0]!r} appears in more than one shard")
        out.update(part)
    return out


def _read_safetensors(f: Path, progress: Callable[[int], None] | None) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    part = {}
    # safe_open checks the header against the file size, so a truncated file fails here.
    with safe_open(str(f), framework="pt", device="cpu") as fh:
        for name in fh.keys():
            t = fh.get_tensor(name)
            part[name] = t
            if progress is not None:
                progress(t.numel() * t.element_size())
    return part


def parse_size(text: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"20KiB"`` or a number of bytes -> bytes (decimal and binary units)."""
    if isinstance(text, int):
        return text
    units = {
        "": 1,
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in units:
        raise ValueError(f"size {text!r} is not understood: expected a number of bytes or e.g. 500MB, 5GB, 2GiB")
    size = int(float(m.group(1)) * units[m.group(2).upper()])
    if size <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return size


def save_tensors(tensors: dict[str, torch.Tensor], f: Path) -> None:
    """``safetensors.torch.save_file``, with a full disk or a failed write as one clear ``OSError``."""
    from safetensors import SafetensorError
    from safetensors import torch as st

    try:
        st.save_file({k: v.contiguous() for k, v in tensors.items()}, str(f), metadata={"format": "pt"})
    except (OSError, SafetensorError) as e:
        raise OSError(f"could not write {f.name} into {f.parent}: {e}") from e


def write_text(f: Path, text: str) -> None:
    try:
        f.write_text(text)
    except OSError as e:
        raise OSError(f"could not write {f.name} into {f.parent}: {e.strerror or e}") from e
