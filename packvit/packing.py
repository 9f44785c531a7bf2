"""The packed format and the per-batch metadata every block shares.

Notation used across packvit:
    T   tokens in the packed sequence (patches plus prefix tokens of every frame)
    Tp  patch tokens only (rows of the input ``hidden_states``)
    F   frames (attention segments); an image with t frames of h x w patches gives t segments
    P   prefix tokens per frame (CLS and registers; 0 for AIMv2 and SigLIP2)
    H   heads, Dh head dim, D hidden size

Input layout: ``hidden_states`` is ``(Tp, p*p*C)``, each patch flattened in (p_h, p_w, C) order
(channels last, as SigLIP2's image processor emits it), frames concatenated, patches of a frame in
row-major order. ``grid_thw`` is ``(N, 3)`` integers (t, h, w) in patches.

Inside a model each frame's segment is ``[prefix_1..prefix_P, patch_1..patch_hw]``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

Grid = tuple[tuple[int, int, int], ...]


# Every per-grid table cache shares one byte budget: a few huge grids must not pin gigabytes (host or
# device) for the life of the process. PACKVIT_TABLE_CACHE_BYTES sets it; set_cache_limit changes it.
_LOCK = threading.RLock()
_RECENT: OrderedDict = OrderedDict()  # (cache, key) -> bytes, least recently used first, over all caches
_STATE = {"bytes": 0, "limit": int(os.environ.get("PACKVIT_TABLE_CACHE_BYTES", 512 * 2**20))}
# int32 cu_seqlens and FlashAttention's int32 offsets bound a packed batch's tokens.
MAX_TOKENS = 2**31 - 1


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    if dataclasses.is_dataclass(value):
        return sum(_nbytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    return 0


def _evict(store: OrderedDict, key) -> None:
    _, n = store.pop(key)
    del _RECENT[(id(store), key)]
    _STATE["bytes"] -= n


def cache_bytes() -> int:
    """Bytes of tensors (on any device) held by packvit's per-grid table caches."""
    return _STATE["bytes"]


def set_cache_limit(nbytes: int) -> None:
    """Bound the per-grid table caches to ``nbytes`` in all (0 disables caching); evicts at once."""
    if not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"nbytes must be a non-negative integer, got {nbytes!r}")
    with _LOCK:
        _STATE["limit"] = nbytes
        _shrink()


def clear_caches() -> None:
    """Drop every cached metadata and position table (memory back to the allocator)."""
    with _LOCK:
        for store_id, key in list(_RECENT):
            _evict(_STORES[store_id], key)


_STORES: dict[int, OrderedDict] = {}


def _shrink() -> None:
    while _STATE["bytes"] > _STATE["limit"] and _RECENT:
        store_id, key = next(iter(_RECENT))
        _evict(_STORES[store_id], key)


def table_cache(maxsize: int):
    """A least-recently-used cache for per-grid tables (metadata, token positions, position tables):
    at most ``maxsize`` entries per function, and all caches together within the byte budget
    (``set_cache_limit``; a table larger than the budget is returned, not kept).

    The tables are built outside inference mode and without autograd: a table first built under
    ``torch.inference_mode()`` would otherwise be an inference tensor, and a later training step
    that reuses it from the cache would fail ("Inference tensors cannot be saved for backward").
    """

    def wrap(fn):
        store: OrderedDict = OrderedDict()  # key -> (table, bytes)
        _STORES[id(store)] = store

        @functools.wraps(fn)
        def build(*args):
            with _LOCK:
                if args in store:
                    store.move_to_end(args)
                    _RECENT.move_to_end((id(store), args))
                    return store[args][0]
            with torch.inference_mode(False), torch.no_grad():
                value = fn(*args)
            n = _nbytes(value)
            with _LOCK:
                if args in store:  # another thread built it meanwhile
                    return store[args][0]
                if n <= _STATE["limit"]:
                    store[args] = (value, n)
                    _RECENT[(id(store), args)] = n
                    _STATE["bytes"] += n
                    while len(store) > maxsize:
                        _evict(store, next(iter(store)))
                    _shrink()
            return value

        def cache_clear():
            with _LOCK:
                for key in list(store):
                    _evict(store, key)

        build.cache_clear = cache_clear
        return build

    return wrap


def grid_to_tuple(grid_thw: torch.Tensor | Sequence[Sequence[int]]) -> Grid:
    """Validate ``grid_thw`` and return it as a tuple of Python ints.

    A CPU tensor or a list costs no device sync; a CUDA tensor costs exactly one (``tolist``),
    so data loaders should keep ``grid_thw`` on the CPU.
    """
    if isinstance(grid_thw, torch.Tensor):
        if grid_thw.dtype.is_floating_point or grid_thw.dtype.is_complex or grid_thw.dtype == torch.bool:
            raise TypeError(f"grid_thw must hold integers, got dtype {grid_thw.dtype}")
        if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
            raise ValueError(f"grid_thw must have shape [num_images, 3] (t, h, w), got {list(grid_thw.shape)}")
        if grid_thw.device.type == "meta":
            raise ValueError("grid_thw is on the meta device, which holds no values: pass it as a CPU tensor or a list")
        rows = grid_thw.tolist()
    elif isinstance(grid_thw, (list, tuple)):
        rows = [list(r) if isinstance(r, (list, tuple)) else r for r in grid_thw]
        if any(not isinstance(r, list) or len(r) != 3 for r in rows):
            raise ValueError("grid_thw must be a sequence of (t, h, w) triples")
        if any(isinstance(v, bool) or not isinstance(v, int) for r in rows for v in r):
            raise TypeError("grid_thw must hold integers")
    else:
        raise TypeError(f"grid_thw must be an integer tensor or a list of (t, h, w), got {type(grid_thw).__name__}")
    total = 0
    for i, (t, h, w) in enumerate(rows):
        if t <= 0 or h <= 0 or w <= 0:
            raise ValueError(f"grid_thw[{i}] = ({t}, {h}, {w}): frames, height and width must all be positive")
        total += t * h * w  # Python ints: no overflow, so a huge grid is caught here, not by an allocation
        if total > MAX_TOKENS:
            raise ValueError(
                f"grid_thw describes {'at least ' if i < len(rows) - 1 else ''}{total} patches (up to grid_thw[{i}] "
                f"= ({t}, {h}, {w})); a packed batch holds at most {MAX_TOKENS} (int32 offsets)"
            )
    return tuple((int(t), int(h), int(w)) for t, h, w in rows)


def check_packed(hidden_states: torch.Tensor, grid_thw, patch_dim: int) -> Grid:
    """``grid_to_tuple`` and ``check_inputs`` in one: rows, patch size and grid checked against each
    other from the grid's integers alone, before any table is built for it."""
    grid = grid_to_tuple(grid_thw)
    check_inputs(hidden_states, sum(t * h * w for t, h, w in grid), patch_dim)
    return grid


@dataclass(frozen=True, eq=False)
class PackedMeta:
    """Everything the blocks need to know about one packed batch, built once per batch.

    ``cu_seqlens`` is int32 on the model's device and ``max_seqlen`` a Python int, as FlashAttention
    kernels want them. Index tensors place patch and prefix tokens inside the packed sequence.
    """

    grid: Grid
    num_prefix: int
    seqlens: tuple[int, ...]  # (F,) tokens per frame, prefix included
    cu_seqlens: torch.Tensor  # (F + 1,) int32
    max_seqlen: int
    num_frames: int  # F; a field, not len(seqlens), so compiled code guards on an int, not a tuple
    # (F,) int64 on the CPU: the lengths for the per-segment reference kernel, readable without a
    # device sync (and, as a tensor, without specialising a compiled graph to one batch).
    seqlens_cpu: torch.Tensor
    frame_hw: tuple[tuple[int, int], ...]  # (F,) (h, w) of each frame
    num_patches: int  # Tp
    # (Tp,) position of every patch row in the packed sequence; None when P == 0 (identity).
    patch_index: torch.Tensor | None
    # (F * P,) positions of the prefix tokens, frame-major; None when P == 0.
    prefix_index: torch.Tensor | None
    # (F + 1,) int32 arange: one query per frame, for the pooling heads.
    cu_frames: torch.Tensor
    # (T,) frame of every token, for per-frame randomness (drop path).
    frame_of_token: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_frames * self.num_prefix

    @property
    def max_patches(self) -> int:
        return max(h * w for h, w in self.frame_hw)

    @property
    def patch_cu_seqlens(self) -> torch.Tensor:
        """(F + 1,) int32 boundaries of the frames' patch tokens in a patches-only sequence."""
        return _patch_cu_seqlens(self)


@table_cache(maxsize=64)
def _patch_cu_seqlens(meta: PackedMeta) -> torch.Tensor:
    lens = [h * w for h, w in meta.frame_hw]
    return _cumsum_int32(lens, meta.cu_seqlens.device)


def to_device(table: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Copy a table built on the host to ``device`` without a host sync.

    A plain ``.to(cuda)`` from pageable memory waits for the stream to drain: every batch with a
    new shape would then stall the host until the previous step finished. ``non_blocking`` stages
    the pageable source before returning (so it may be freed at once) and keeps the copy ordered
    on the stream.
    """
    return table.to(device=device, dtype=dtype, non_blocking=True)


def _cumsum_int32(lens: Sequence[int], device: torch.device) -> torch.Tensor:
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return to_device(torch.tensor(cu, dtype=torch.int32), device)


def _layout(frame_hw: Sequence[tuple[int, int]], num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed sequence's layout on the host, vectorised over all tokens: frame (T,) each token's
    frame, within (T,) its patch index in that frame, negative on the frame's prefix tokens."""
    hw = torch.tensor(frame_hw, dtype=torch.long).reshape(-1, 2)  # (F, 2)
    seqlens = num_prefix + hw[:, 0] * hw[:, 1]  # (F,)
    total = int(seqlens.sum())
    frame = torch.repeat_interleave(torch.arange(len(seqlens)), seqlens, output_size=total)  # (T,)
    within = torch.arange(total) - (torch.cumsum(seqlens, 0) - seqlens)[frame] - num_prefix  # (T,)
    return frame, within


class TokenPositions(NamedTuple):
    """Where each token of a packed sequence sits; every field (T,) int32 on the device."""

    row: torch.Tensor  # row of the patch in its frame; -1 on prefix tokens
    col: torch.Tensor  # column of the patch in its frame; -1 on prefix tokens
    h: torch.Tensor  # height of the token's frame, in patches
    w: torch.Tensor  # width of the token's frame, in patches
    frame: torch.Tensor  # index of the token's frame


@table_cache(maxsize=16)
def token_positions(grid: Grid, num_prefix: int, device: torch.device) -> TokenPositions:
    """Positions of every token, the input of all position tables (sin-cos, RoPE, resize weights).

    Built with a handful of vectorised ops over the whole batch, not one table per frame: a batch
    of new shapes (the rule when training on native resolutions) costs microseconds, where
    building per-frame tables on the host cost tens to hundreds of milliseconds. One copy.
    """
    frame_hw = [(h, w) for t, h, w in grid for _ in range(t)]
    frame, within = _layout(frame_hw, num_prefix)
    h, w = torch.tensor(frame_hw, dtype=torch.long).reshape(-1, 2)[frame].unbind(1)
    is_patch = within >= 0
    row = torch.where(is_patch, within // w, -1)
    col = torch.where(is_patch, within % w, -1)
    packed = to_device(torch.stack([row, col, h, w, frame]).to(torch.int32), device)  # (5, T)
    return TokenPositions(*packed.unbind(0))


@table_cache(maxsize=128)
def build_meta(grid: Grid, num_prefix: int, device: torch.device) -> PackedMeta:
    """Metadata for a validated grid (see ``grid_to_tuple``); cached per (grid, prefix, device)."""
    frame_hw = tuple((h, w) for t, h, w in grid for _ in range(t))
    seqlens = tuple(num_prefix + h * w for h, w in frame_hw)
    if sum(seqlens) > MAX_TOKENS:
        raise ValueError(
            f"grid_thw with {num_prefix} prefix tokens per frame gives {sum(seqlens)} tokens; "
            f"a packed batch holds at most {MAX_TOKENS} (int32 offsets)"
        )
    frame, within = _layout(frame_hw, num_prefix)
    patch_index = prefix_index = None
    if num_prefix:
        position = torch.arange(len(within))
        patch_index = to_device(position[within >= 0], device)  # (Tp,) in frame order
        prefix_index = to_device(position[within < 0], device)  # (F * P,) frame-major
    return PackedMeta(
        grid=grid,
        num_prefix=num_prefix,
        seqlens=seqlens,
        cu_seqlens=_cumsum_int32(seqlens, device),
        max_seqlen=max(seqlens),
        num_frames=len(seqlens),
        seqlens_cpu=torch.tensor(seqlens, dtype=torch.long),
        frame_hw=frame_hw,
        num_patches=sum(h * w for h, w in frame_hw),
        patch_index=patch_index,
        prefix_index=prefix_index,
        cu_frames=to_device(torch.arange(len(seqlens) + 1, dtype=torch.int32), device),
        frame_of_token=to_device(frame, device),
    )


def check_inputs(hidden_states: torch.Tensor, num_patches: int, patch_dim: int) -> None:
    """Clear errors for inputs that do not describe the same batch (``num_patches``: sum of t*h*w)."""
    if not isinstance(hidden_states, torch.Tensor):
        raise TypeError(f"hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}")
    if not hidden_states.is_floating_point():
        raise TypeError(f"hidden_states must be floating point, got dtype {hidden_states.dtype}")
    if hidden_states.dim() != 2:
        raise ValueError(f"hidden_states must have shape [total_patches, patch_dim], got {list(hidden_states.shape)}")
    if hidden_states.shape[1] != patch_dim:
        raise ValueError(
            f"hidden_states has patch_dim {hidden_states.shape[1]}, expected {patch_dim} "
            "(patch_size * patch_size * num_channels, flattened in (p_h, p_w, C) order)"
        )
    if hidden_states.shape[0] != num_patches:
        raise ValueError(
            f"hidden_states has {hidden_states.shape[0]} rows but grid_thw describes {num_patches} patches "
            "(the sum of t*h*w over images)"
        )


def insert_prefix(patches: torch.Tensor, prefix: torch.Tensor, meta: PackedMeta) -> torch.Tensor:
    """Interleave per-frame prefix tokens with patch tokens.

    patches (Tp, D), prefix (P, D) shared by every frame -> (T, D) ordered frame by frame.
    """
    if meta.num_prefix == 0:
        return patches
    x = patches.new_empty(meta.num_tokens, patches.shape[-1])
    x = x.index_copy(0, meta.patch_index, patches)
    return x.index_copy(0, meta.prefix_index, prefix.to(patches.dtype).repeat(meta.num_frames, 1))


def split_prefix(x: torch.Tensor, meta: PackedMeta) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(T, D) -> patches (Tp, D) in input order and prefix tokens (F, P, D), or None when P == 0."""
    if meta.num_prefix == 0:
        return x, None
    patches = x.index_select(0, meta.patch_index)
    prefix = x.index_select(0, meta.prefix_index).view(meta.num_frames, meta.num_prefix, -1)
    return patches, prefix


# ---------------------------------------------------------------------------------------------
# Images <-> packed patches
# ---------------------------------------------------------------------------------------------


def convert_to_packing_format(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) images of one size -> (B * H/p * W/p, p*p*C) patches in (p_h, p_w, C) order.

    The seed's semantics: ``view(B, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1)``.
    """
    if images.dim() != 4:
        raise ValueError(f"images must have shape [B, C, H, W], got {list(images.shape)}")
    b, c, hh, ww = images.shape
    if hh % patch_size or ww % patch_size:
        raise ValueError(f"image size {hh}x{ww} is not a multiple of patch_size {patch_size}")
    h, w = hh // patch_size, ww // patch_size
    x = images.reshape(b, c, h, patch_size, w, patch_size).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C)
    return x.reshape(b * h * w, patch_size * patch_size * c)


def patchify(images: torch.Tensor | Sequence[torch.Tensor], patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images -> ``(hidden_states, grid_thw)``.

    ``images`` is a (B, C, H, W) batch, or a list whose items are (C, H, W) images or (t, C, H, W)
    videos of any size (each side a multiple of ``patch_size``). ``grid_thw`` is int64 on the CPU.
    """
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"images must be [B, C, H, W] or a list of [C, H, W], got {list(images.shape)}")
        images = list(images.unbind(0))
    if len(images) == 0:
        raise ValueError("images is empty: give at least one image")
    chunks, grid = [], []
    for i, img in enumerate(images):
        video = img if img.dim() == 4 else img.unsqueeze(0)
        if video.dim() != 4:
            raise ValueError(f"images[{i}] must be [C, H, W] or [t, C, H, W], got {list(img.shape)}")
        t, _, hh, ww = video.shape
        if hh % patch_size or ww % patch_size:
            raise ValueError(f"images[{i}] has size {hh}x{ww}, not a multiple of patch_size {patch_size}")
        chunks.append(convert_to_packing_format(video, patch_size))
        grid.append((t, hh // patch_size, ww // patch_size))
    return torch.cat(chunks, 0), torch.tensor(grid, dtype=torch.long)


def unpatchify(
    hidden_states: torch.Tensor,
    grid_thw: torch.Tensor | Sequence[Sequence[int]],
    patch_size: int,
    num_channels: int = 3,
) -> list[torch.Tensor]:
    """Inverse of ``patchify``: a list of (C, H, W) images, or (t, C, H, W) for entries with t > 1."""
    grid = grid_to_tuple(grid_thw)
    check_inputs(hidden_states, sum(t * h * w for t, h, w in grid), patch_size * patch_size * num_channels)
    out, start = [], 0
    for t, h, w in grid:
        n = t * h * w
        x = hidden_states[start : start + n].reshape(t, h, w, patch_size, patch_size, num_channels)
        x = x.permute(0, 5, 1, 3, 2, 4).reshape(t, num_channels, h * patch_size, w * patch_size)
        out.append(x if t > 1 else x[0])
        start += n
    return out


def frame_grid(grid_thw: torch.Tensor) -> torch.Tensor:
    """(N, 3) grid -> (F, 3) with one (1, h, w) row per frame: the same packed rows, each frame
    its own entry (attention segments are per frame anyway)."""
    frames = grid_thw.repeat_interleave(grid_thw[:, 0], dim=0)
    frames[:, 0] = 1
    return frames


def split_by_image(packed: torch.Tensor, grid_thw: torch.Tensor | Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """(Tp, D) packed patch features -> one (t*h*w, D) tensor per image (views, no copy)."""
    grid = grid_to_tuple(grid_thw)
    return list(packed.split([t * h * w for t, h, w in grid], 0))
