"""Packed patches that carry their grid: what a processor hands to code written for image tensors.

LLaVA-style data code treats a processor's ``pixel_values`` as a batch of images: it takes
``["pixel_values"][0]`` for one image, ``torch.stack``s images of one shape, moves them with
``.to(device, dtype)``, pins them in a DataLoader and sends them between worker processes. A packed
batch is one ``(Tp, p*p*C)`` tensor whose image boundaries live in ``grid_thw``, so each of those
steps would silently cut across images or drop the grid. ``PackedPixels`` is that tensor with its
grid attached and image-wise indexing:

    x = PackedPixels(hidden_states, grid_thw)   # (Tp, p*p*C), grid (N, 3)
    x[0]               # image 0: a PackedPixels of t0*h0*w0 rows and grid [[t0, h0, w0]]
    len(x), list(x)    # N images
    torch.stack([a, b])            # images of equal token counts: (2, n, p*p*C), grids concatenated
    torch.cat([a, b])  # packed:   (Ta + Tb, p*p*C), grids concatenated
    x.to("cuda", torch.bfloat16)   # any op that keeps the shape keeps the grid

Every other op returns a plain tensor. The grid stays an int64 CPU tensor: it is host metadata.
"""

from __future__ import annotations

from typing import Sequence

import torch

_IMAGEWISE = {torch.Tensor.__getitem__, torch.Tensor.__len__, torch.Tensor.__iter__, torch.Tensor.unbind}


class PackedPixels(torch.Tensor):
    """(Tp, D) packed patches with ``grid_thw`` (N, 3), or (N, n, D) for N images of n tokens each
    (what ``torch.stack`` of equal-size images gives)."""

    grid_thw: torch.Tensor

    @staticmethod
    def __new__(cls, data: torch.Tensor, grid_thw) -> "PackedPixels":
        grid = torch.as_tensor(grid_thw, dtype=torch.int64, device="cpu").reshape(-1, 3)
        if data.dim() not in (2, 3):
            raise ValueError(f"PackedPixels data must be (Tp, D) or (N, n, D), got shape {list(data.shape)}")
        tokens = grid.prod(1)
        if data.dim() == 2 and int(tokens.sum()) != data.shape[0]:
            raise ValueError(
                f"grid_thw {grid.tolist()} counts {int(tokens.sum())} patches but data has {data.shape[0]} rows"
            )
        if data.dim() == 3 and (grid.shape[0] != data.shape[0] or bool((tokens != data.shape[1]).any())):
            raise ValueError(
                f"stacked data {list(data.shape)} needs one grid row of {data.shape[1]} patches per image, got {grid.tolist()}"
            )
        out = data.as_subclass(cls)
        out.grid_thw = grid
        return out

    # -- views --------------------------------------------------------------------------------

    def packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden_states (Tp, D) as a plain tensor, grid_thw (N, 3))."""
        x = self.as_subclass(torch.Tensor)
        return x.reshape(-1, x.shape[-1]), self.grid_thw

    def num_images(self) -> int:
        return self.grid_thw.shape[0]

    def image(self, i: int) -> "PackedPixels":
        n = self.num_images()
        if not -n <= i < n:
            raise IndexError(f"image index {i} is out of range for {n} images")
        i %= n
        x = self.as_subclass(torch.Tensor)
        if x.dim() == 3:
            return PackedPixels(x[i], self.grid_thw[i : i + 1])
        ends = self.grid_thw.prod(1).cumsum(0).tolist()
        start = ends[i - 1] if i else 0
        return PackedPixels(x[start : ends[i]], self.grid_thw[i : i + 1])

    def images(self) -> list["PackedPixels"]:
        return [self.image(i) for i in range(self.num_images())]

    def __deepcopy__(self, memo):
        return PackedPixels(self.as_subclass(torch.Tensor).clone(), self.grid_thw.clone())

    def __reduce_ex__(self, protocol):
        # Pickling (DataLoader workers, deepcopy) keeps the grid: rebuild from a plain tensor.
        return PackedPixels, (self.as_subclass(torch.Tensor).clone(), self.grid_thw)

    # -- the torch function protocol ----------------------------------------------------------------

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _IMAGEWISE and isinstance(args[0], PackedPixels):
            return _imagewise(func, args, kwargs)
        if func in (torch.stack, torch.cat, torch.concat) and _all_packed(args[0] if args else kwargs.get("tensors")):
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            if dim == 0:
                return _join(func, list(args[0] if args else kwargs["tensors"]))
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        src = next((a for a in args if isinstance(a, PackedPixels)), None)
        if (
            src is not None
            and isinstance(out, torch.Tensor)
            and out.shape == src.shape
            and func is not torch.Tensor.__setitem__
        ):
            return PackedPixels(out, src.grid_thw)  # same layout: .to(), .pin_memory(), .half(), clone, ...
        return out


def _all_packed(seq) -> bool:
    return isinstance(seq, (list, tuple)) and len(seq) > 0 and all(isinstance(t, PackedPixels) for t in seq)


def _imagewise(func, args, kwargs):
    x: PackedPixels = args[0]
    if func is torch.Tensor.__len__:
        return x.num_images()
    if func is torch.Tensor.__iter__:
        return iter(x.images())
    if func is torch.Tensor.unbind:
        if kwargs.get("dim", args[1] if len(args) > 1 else 0) != 0:
            return tuple(t for t in x.as_subclass(torch.Tensor).unbind(*args[1:], **kwargs))
        return tuple(x.images())
    index = args[1]
    if isinstance(index, int) or (
        isinstance(index, torch.Tensor) and index.dim() == 0 and not index.is_floating_point()
    ):
        return x.image(int(index))
    if isinstance(index, slice):
        picked = x.images()[index]
        if not picked:
            raise IndexError(f"slice {index} selects no image of {x.num_images()}")
        return _join(torch.cat, picked)
    with torch._C.DisableTorchFunctionSubclass():
        return x.as_subclass(torch.Tensor)[index]  # row or column indexing: a plain tensor


def _join(func, seq: Sequence[PackedPixels]) -> PackedPixels:
    grid = torch.cat([t.grid_thw for t in seq])
    plain = [t.as_subclass(torch.Tensor) for t in seq]
    with torch._C.DisableTorchFunctionSubclass():
        if func is torch.stack:
            if len({p.shape for p in plain}) != 1 or plain[0].dim() != 2:
                raise ValueError(
                    f"torch.stack of PackedPixels needs single images of one token count, got {[list(p.shape) for p in plain]}"
                )
            return PackedPixels(torch.stack(plain), grid)
        return PackedPixels(torch.cat([p.reshape(-1, p.shape[-1]) for p in plain]), grid)
