"""Checkpoint -> packvit-native folder, atomically: the function behind ``packvit convert``."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from . import Checkpoint, build_model, cast_state, read_checkpoint
from .checkpoint_io import parse_size
from .native import write_native
from .progress import ByteBar
from .safe_write import atomic_directory, prepare_destination


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
    allow_nonfinite: bool = False,
    preset: str | None = None,
    num_heads: int | None = None,
    strict_config: bool = True,
    overwrite: bool = False,
    progress: bool = False,
    check: Callable[["ConvertResult"], None] | None = None,
) -> ConvertResult:
    """Convert any checkpoint ``load_model`` reads into a packvit-native folder at ``dst``.

    DST is checked first (``safe_write.check_destination``: never a source, the working directory,
    or a folder packvit did not write), then everything is read and checked (names, shapes, dtypes,
    finite values, by building the model) before a byte is written. The output is written to a
    temporary folder beside ``dst``; ``check(result)`` (``--verify``) runs on it there, with
    ``result.dst`` naming that folder, and may raise to abandon it. Only then is it swapped in for
    ``dst``, the old output kept until the new one is complete. ``progress`` shows tqdm bars in bytes.
    """
    max_bytes = parse_size(max_shard_size)
    sources = [src, config]
    prepare_destination(dst, sources=sources, overwrite=overwrite)  # fail before reading gigabytes
    read_bar = ByteBar("read", progress)
    try:
        ckpt = read_checkpoint(
            src,
            revision=revision,
            config=config,
            strict_config=strict_config,
            allow_pickle=allow_pickle,
            allow_nonfinite=allow_nonfinite,
            preset=preset,
            num_heads=num_heads,
            progress=read_bar,
        )
    finally:
        read_bar.close()
    state = cast_state(ckpt.state, dtype)
    model = build_model(ckpt.family, ckpt.config, state, attn_backend="sdpa")  # strict: shapes, dtypes, names
    num_params = sum(p.numel() for p in model.parameters())
    del model
    total = sum(t.numel() * t.element_size() for t in state.values())
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    write_bar = ByteBar("write", progress)
    try:
        with atomic_directory(dst, sources=sources, overwrite=overwrite, command="convert") as tmp:
            write_bar.reset(total)
            files = write_native(
                tmp,
                ckpt.family,
                ckpt.config,
                state,
                max_shard_bytes=max_bytes,
                progress=write_bar.update,
                preprocessor=ckpt.preprocessor,
            )
            result = ConvertResult(
                dst=tmp,
                checkpoint=ckpt,
                dtype=dtypes.pop() if len(dtypes) == 1 else None,
                num_params=num_params,
                files=files,
                output_bytes=sum(f.stat().st_size for f in files),
            )
            write_bar.close()
            if check is not None:
                check(result)
    finally:
        write_bar.close()
    return replace(result, dst=Path(dst), files=[Path(dst) / f.name for f in files])
