"""transformers' torchvision image-processor backend, op for op, in plain torch.

transformers 5 picks its torchvision ("fast") processors whenever ``torchvision`` is installed.
They differ from the PIL processors by one or two 8-bit levels per pixel (SigLIP2 NaFlex up to
1.6e-2 after normalisation, CLIP's recipe 3.0e-2, DINOv3 1.7e-2): the resize is
``torch.nn.functional.interpolate(antialias=True)``, not PIL's ``Image.resize``. This module calls
the same torch ops with the same arguments, dtypes and order as
``transformers.image_processing_backends.TorchvisionBackend`` (transformers 5.24) and
``torchvision.transforms.v2.functional`` (0.28/0.29) do on the CPU, so the output matches bit for
bit, and it needs no torchvision: tvF.resize / normalize / crop on tensors are thin wrappers over
torch ops, and torchvision's compiled extension (which fails to load beside a CPU-only torch) is
never involved.

Steps that differ from the PIL backend:
    resize      8-bit images are resized as uint8 (torch's native antialiased uint8 kernels for
                bicubic/lanczos everywhere and for bilinear on AVX2/AVX512/ARM CPUs; elsewhere
                uint8 -> float32 -> interpolate -> round -> uint8, as torchvision does);
                DINOv3's processor rescales to float first and resizes float32.
    normalise   rescale and normalise fused: ``(x - mean / r) / (std / r)`` in float32
                (``TorchvisionBackend.rescale_and_normalize``), not ``x * r`` in float64 then
                ``(x - mean) / std``.
    centre crop a crop larger than the image pads with zeros instead of failing.

Resizing happens on the CPU, as transformers does unless told ``device=``; a CUDA resize would
differ again.
"""

from __future__ import annotations

import importlib.util
import platform
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

# PIL resample id -> torchvision InterpolationMode value (transformers' pil_torch_interpolation_mapping;
# BOX and HAMMING map to modes torchvision cannot apply to tensors, so they are refused here).
_MODES = {
    Image.NEAREST: "nearest-exact",
    Image.BILINEAR: "bilinear",
    Image.BICUBIC: "bicubic",
    Image.LANCZOS: "lanczos",
}
_ANTIALIASED = ("bilinear", "bicubic", "lanczos")


def torchvision_installed() -> bool:
    """What transformers' ``is_torchvision_available`` checks: the package is installed (not imported).

    Importing torchvision would cost about a second and can fail beside a CPU-only torch, while
    transformers still picks its torchvision processors in that case.
    """
    return importlib.util.find_spec("torchvision") is not None


def interpolation(resample: int) -> str:
    """The ``interpolate`` mode transformers' torchvision backend uses for a PIL ``resample`` id."""
    if resample not in _MODES:
        raise ValueError(
            f"resample={resample} has no torchvision tensor equivalent; the torchvision backend supports "
            f"{sorted(_MODES)} (nearest, bilinear, bicubic, lanczos): use backend='pil'"
        )
    return _MODES[resample]


def _native_uint8(mode: str) -> bool:
    # torchvision's _do_native_uint8_resize_on_cpu: its benchmarks found the uint8 bilinear kernel
    # slower than the float path on CPUs without AVX2, so there it converts, and rounds back.
    if mode == "bilinear":
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in (
            "aarch64",
            "arm64",
        )
    return mode in ("bicubic", "lanczos")


def resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """``tvF.resize(x, size, interpolation=mode, antialias=True)`` for a CPU tensor (N, C, H, W).

    Returns ``x`` itself when the size does not change, as torchvision does.
    """
    n, c, h, w = x.shape
    if (h, w) == tuple(size) or x.numel() == 0:
        return x
    antialias = mode in _ANTIALIASED
    align_corners = False if antialias else None
    dtype = x.dtype
    acceptable = [torch.float32, torch.float64]
    if mode in ("nearest", "nearest-exact") or _native_uint8(mode):
        acceptable.append(torch.uint8)
    # torchvision restrides a channels_last (1, C, H, W) input so interpolate keeps the layout;
    # packvit always passes contiguous NCHW (as transformers does after its .contiguous()), so
    # that branch never applies.
    x = x.contiguous()
    need_cast = dtype not in acceptable
    if need_cast:
        x = x.to(torch.float32)
    x = F.interpolate(x, size=list(size), mode=mode, align_corners=align_corners, antialias=antialias)
    if need_cast:
        if mode in ("bicubic", "lanczos") and dtype == torch.uint8:
            x = x.clamp_(min=0, max=255)  # reached only off the native path (e.g. CUDA)
        if not dtype.is_floating_point:
            x = x.round_()
        x = x.to(dtype)
    return x


def center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``TorchvisionBackend.center_crop``: zero-pad (left/top get the floor) up to the crop, then slice."""
    h, w = x.shape[-2:]
    if width > w or height > h:
        pad_w, pad_h = max(width - w, 0), max(height - h, 0)
        # (left, right, top, bottom) for F.pad; torchvision's [l, t, r, b] with l = pad // 2.
        x = F.pad(x, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2), value=0)
        h, w = x.shape[-2:]
        if (h, w) == (height, width):
            return x
    top, left = int((h - height) / 2.0), int((w - width) / 2.0)
    return x[..., top : top + height, left : left + width]


def rescale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``TorchvisionBackend.rescale``: uint8 * python float -> float32."""
    return x * factor


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``tvF.normalize`` (not in place): mean and std cast to the image's float dtype, per channel."""
    mean_t = torch.as_tensor(list(mean), dtype=x.dtype).view(-1, 1, 1)
    std_t = torch.as_tensor(list(std), dtype=x.dtype).view(-1, 1, 1)
    return x.sub(mean_t).div_(std_t)


def level_table(
    num_channels: int,
    do_rescale: bool,
    rescale_factor: float,
    do_normalize: bool,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """(C, 256) float32: ``TorchvisionBackend.rescale_and_normalize`` applied to every uint8 level.

    Element-wise float ops give the same bits whatever the tensor's shape, so one lookup per pixel
    reproduces the fused rescale + normalise exactly.
    """
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 256).expand(num_channels, 1, 256)  # (C, 1, 256)
    if do_rescale and do_normalize:
        # _fuse_mean_std_and_rescale_factor: fold 1 / rescale_factor into mean and std (float32).
        mean_t = torch.tensor(list(mean)) * (1.0 / rescale_factor)
        std_t = torch.tensor(list(std)) * (1.0 / rescale_factor)
        table = normalize(levels.to(torch.float32), mean_t.tolist(), std_t.tolist())
    elif do_normalize:
        table = normalize(levels.to(torch.float32), mean, std)
    elif do_rescale:
        table = rescale(levels, rescale_factor)
    else:
        table = levels.to(torch.float32)
    return table.reshape(num_channels, 256).to(torch.float32).contiguous()
