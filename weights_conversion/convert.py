"""Checkpoint -> packvit-native folder, atomically: the function behind ``packvit convert``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import Checkpoint, build_model, cast_state, read_checkpoint
from .checkpoint_io import atomic_directory, parse_size
from .native import write_native


@dataclass
class ConvertResult:
    dst: Path
    checkpoint: Checkpoint  # the source as read (its ``state`` is the converted, uncast tensors)
    dtype: torch.dtype | None  # the dtype written (None: no floating tensors)
    num_params: int
    files: list[Path]
    output_bytes: int

    def summary(self) -> str:
        ck = self.checkpoint
        lines = [
            f"converted {ck.family} checkpoint ({ck.layout} layout, {ck.source_tensors} tensors, "
            f"{_size(ck.source_bytes)}) from {ck.path}",
            f"  mapped:     {ck.report.mapped} packvit tensors",
        ]
        for reason, keys in ck.report.dropped.items():
            lines.append(f"  dropped:    {len(keys)} tensors: {reason} (e.g. {keys[0]})")
        if not ck.report.dropped:
            lines.append("  dropped:    none")
        lines += [f"  note:       {n}" for n in ck.report.notes]
        n_shards = sum(f.name.endswith(".safetensors") for f in self.files)
        lines += [
            f"  parameters: {self.num_params:,} ({self.num_params / 1e6:.2f} M)",
            f"  dtype:      {str(self.dtype).removeprefix('torch.')}",
            f"  output:     {self.dst} ({n_shards} safetensors file{'s' if n_shards > 1 else ''}, {_size(self.output_bytes)})",
        ]
        return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    revision: str | None = None,
    config: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: str | int = "5GB",
    allow_pickle: bool = False,
    preset: str | None = None,
    num_heads: int | None = None,
    strict_config: bool = True,
    overwrite: bool = False,
    progress: bool = False,
) -> ConvertResult:
    """Convert any checkpoint ``load_model`` reads into a packvit-native folder at ``dst``.

    Everything is read and checked (names, shapes, dtypes, by building the model) before a byte is
    written; the output goes to a temporary sibling folder renamed to ``dst`` at the end, so an
    error or Ctrl-C leaves nothing at ``dst``. ``progress`` shows tqdm bars weighted by bytes.
    """
    max_bytes = parse_size(max_shard_size)
    dst = Path(dst)
    if dst.exists() and not overwrite:  # fail before reading gigabytes
        raise FileExistsError(f"destination {dst} exists; choose another one or pass overwrite=True (--overwrite)")
    read_bar = _bar("read", progress)
    try:
        ckpt = read_checkpoint(
            src, revision=revision, config=config, strict_config=strict_config, allow_pickle=allow_pickle,
            preset=preset, num_heads=num_heads, progress=read_bar,
        )
    finally:
        if read_bar is not None:
            read_bar.close()
    state = cast_state(ckpt.state, dtype)
    model = build_model(ckpt.family, ckpt.config, state, attn_backend="sdpa")  # strict: shapes, dtypes, names
    num_params = sum(p.numel() for p in model.parameters())
    total = sum(t.numel() * t.element_size() for t in state.values())
    write_bar = _bar("write", progress, total)
    try:
        with atomic_directory(dst, overwrite=overwrite) as tmp:
            files = write_native(
                tmp, ckpt.family, ckpt.config, state, max_shard_bytes=max_bytes,
                progress=None if write_bar is None else write_bar.update,
            )
            files = [dst / f.name for f in files]
    finally:
        if write_bar is not None:
            write_bar.close()
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    return ConvertResult(
        dst=dst, checkpoint=ckpt, dtype=dtypes.pop() if len(dtypes) == 1 else None, num_params=num_params,
        files=files, output_bytes=sum(f.stat().st_size for f in files),
    )


def _bar(desc: str, enabled: bool, total: int | None = None):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1000, leave=False)
