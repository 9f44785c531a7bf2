"""The benchmark workloads: fixed grids, identical for every model of a patch size.

``mixed32`` (32 random grids, 23,103 patches) and ``fixed32_448`` (32 images of 448 x 448 pixels) are
the suite's two headline workloads, the ones benchmarks/RESULTS.md reports; ``highres`` and ``video``
add large images and clips. Pixel sizes are turned into patch grids by flooring to the patch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..packing import Grid


@dataclass(frozen=True)
class Workload:
    name: str
    grid: Grid  # (t, h, w) per image, in patches
    about: str

    @property
    def num_images(self) -> int:
        return len(self.grid)

    @property
    def num_frames(self) -> int:
        return sum(t for t, _, _ in self.grid)

    @property
    def num_patches(self) -> int:
        return sum(t * h * w for t, h, w in self.grid)


def mixed32(patch: int) -> Workload:
    # One draw per side, h first, from a fresh generator: every model sees the same grids.
    g = torch.Generator().manual_seed(1234)
    grid = []
    for _ in range(32):
        h = int(torch.randint(8, 48 + 1, (1,), generator=g))
        w = int(torch.randint(8, 48 + 1, (1,), generator=g))
        grid.append((1, h, w))
    return Workload("mixed32", tuple(grid), "32 images, h and w uniform in 8..48 patches (seed 1234)")


def _pixels(name: str, sizes: list[tuple[int, int, int]], patch: int, about: str) -> Workload:
    return Workload(name, tuple((t, hp // patch, wp // patch) for t, hp, wp in sizes), about)


def fixed32_448(patch: int) -> Workload:
    return _pixels("fixed32_448", [(1, 448, 448)] * 32, patch, "32 images of 448x448 pixels")


def highres(patch: int) -> Workload:
    sizes = [(1, 1024, 1024), (1, 1024, 1536), (1, 2048, 1024), (1, 1280, 1280)]
    return _pixels("highres", sizes, patch, "4 images: 1024x1024, 1024x1536, 2048x1024, 1280x1280 pixels")


def video(patch: int) -> Workload:
    sizes = [(8, 336, 448), (8, 448, 336), (8, 224, 224), (8, 384, 512)]
    return _pixels("video", sizes, patch, "4 clips of 8 frames: 336x448, 448x336, 224x224, 384x512 pixels")


# What a LLaVA-style training batch holds after its resize rule (longest side at most 1024 pixels):
# documents, screenshots, slides and photos of their own aspect ratios, 1k to 4k patches each at
# patch 16 (about 1.3x more at patch 14). (t, h, w) in pixels, h first.
_LLAVA_MIX = [
    (1, 1024, 724),  # A4 page scan
    (1, 1024, 792),  # US letter page
    (1, 1024, 384),  # receipt
    (1, 576, 1024),  # slide, 16:9
    (1, 640, 1024),  # desktop screenshot, 16:10
    (1, 1024, 472),  # phone screenshot
    (1, 1024, 1024),  # web page capture
    (1, 600, 800),  # chart
    (1, 576, 768),  # photo 4:3
    (1, 512, 768),  # photo 3:2
    (1, 504, 896),  # photo 16:9
    (1, 768, 576),  # portrait photo 3:4
    (1, 640, 640),  # square photo
    (1, 384, 1024),  # panorama
    (1, 512, 512),  # thumbnail
    (1, 720, 960),  # phone photo 4:3
]


def llava_mix(patch: int) -> Workload:
    return _pixels(
        "llava_mix",
        _LLAVA_MIX,
        patch,
        "16 images of real aspect ratios (pages, screenshots, slides, charts, photos), longest side <= 1024 px",
    )


def tiny(patch: int) -> Workload:
    """CPU smoke test: a few small mixed grids, one of them a 2-frame video."""
    return Workload("tiny", ((1, 3, 5), (1, 4, 4), (2, 2, 3), (1, 1, 6)), "smoke test")


WORKLOADS = {
    "mixed32": mixed32,
    "fixed32_448": fixed32_448,
    "highres": highres,
    "video": video,
    "llava_mix": llava_mix,
    "tiny": tiny,
}


def get(name: str, patch: int) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {sorted(WORKLOADS)}")
    return WORKLOADS[name](patch)
