"""Images -> ``(hidden_states, grid_thw)``: the Hugging Face image processors, re-implemented for packing.

Three sizing modes, chosen from the checkpoint (or by hand):

    ``naflex``  SigLIP2 NaFlex: the largest size whose patch count fits ``max_num_patches``, keeping the
                aspect ratio, sides multiples of the patch size (``Siglip2ImageProcessor``'s binary
                search, reproduced float for float). packvit does not pad to ``max_num_patches``.
    ``native``  AIMv2 native / DINOv3: the image's own resolution rounded to patch multiples, scaled
                into ``[min_pixels, max_pixels]`` (Qwen2-VL's ``smart_resize`` with factor = patch).
    ``fixed``   the checkpoint's fixed-size recipe: ``size={"height", "width"}``, or
                ``size={"shortest_edge"}`` then a centre crop to ``crop_size`` (CLIP's recipe).

Two pixel paths (``backend``), each identical to one of transformers' two processor backends:

    ``pil``          convert to RGB, resize with PIL (``resample`` from the config), rescale by
                     ``rescale_factor`` in float64 then cast to float32, normalise ``(x - mean) / std``
                     in float32, cut (p_h, p_w, C) patches.
    ``torchvision``  the same image resized by ``torch.nn.functional.interpolate`` as transformers'
                     torchvision ("fast") processors do, then their fused rescale + normalise
                     (``packvit.preprocess_torchvision``; needs no torchvision).
    ``auto``         what transformers picks in this environment: ``torchvision`` when the package
                     is installed, else ``pil``. The config holds the resolved name.

Rescale and normalise of an 8-bit image are one 256-entry lookup table per channel, computed with
exactly the backend's operations, so the output matches bit for bit. Float inputs are taken as
values in [0, 1] and rounded to 8 bits first (transformers truncates them when it hands them to
PIL; rounding recovers ``k / 255`` exactly).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
from PIL import Image

from weights_conversion.checkpoint_io import read_json_object, resolve
from weights_conversion.families import FAMILIES
from weights_conversion.families.dinov3 import IMAGENET_MEAN, IMAGENET_STD
from weights_conversion.native import describe_native

from . import preprocess_torchvision as tv
from .packed_pixels import PackedPixels

ImageLike = Union[Image.Image, np.ndarray, torch.Tensor, str, os.PathLike]
# One entry of a batch: an image, or a video given as a list of frames (or a (t, C, H, W) tensor).
Sample = Union[ImageLike, Sequence[ImageLike]]

MODES = ("naflex", "native", "fixed")
BACKENDS = ("auto", "pil", "torchvision")


@dataclass(frozen=True)
class PreprocessConfig:
    """What ``preprocessor_config.json`` says, plus packvit's sizing mode.

    ``min_pixels`` / ``max_pixels`` bound the native mode; their defaults (16 and 1024 patches)
    keep a 512 x 512 DINOv3 input at native size and stop a 4K photo from costing 30k tokens.
    """

    patch_size: int
    mode: str = "native"
    image_mean: tuple[float, ...] = IMAGENET_MEAN
    image_std: tuple[float, ...] = IMAGENET_STD
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    do_convert_rgb: bool = True
    resample: int = Image.BILINEAR
    max_num_patches: int = 256  # naflex
    min_pixels: int | None = None  # native; None -> 16 patches
    max_pixels: int | None = None  # native; None -> 1024 patches
    size: dict = field(default_factory=dict)  # fixed: {"height", "width"} or {"shortest_edge"}
    crop_size: dict | None = None  # fixed: centre crop after a shortest_edge resize
    backend: str = "auto"  # "pil" | "torchvision"; "auto" is resolved on construction
    rescale_first: bool = False  # torchvision backend: rescale to float, then resize (DINOv3's processor)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "auto":  # transformers' rule: torchvision when installed, else PIL
            object.__setattr__(self, "backend", "torchvision" if tv.torchvision_installed() else "pil")
        if self.backend == "torchvision" and self.do_resize:
            tv.interpolation(self.resample)  # refuse a resample torchvision cannot apply, now
        if self.patch_size <= 0:
            raise ValueError(f"patch_size must be positive, got {self.patch_size}")
        if len(self.image_mean) != len(self.image_std):
            raise ValueError(f"image_mean {self.image_mean} and image_std {self.image_std} differ in length")
        if self.mode == "fixed" and not ({"height", "width"} <= set(self.size) or "shortest_edge" in self.size):
            raise ValueError(
                f"fixed mode needs size={{'height', 'width'}} or {{'shortest_edge'}}, got size={self.size}"
            )

    @property
    def num_channels(self) -> int:
        return len(self.image_mean)

    @property
    def bounds(self) -> tuple[int, int]:
        """(min_pixels, max_pixels) of the native mode."""
        p2 = self.patch_size * self.patch_size
        return self.min_pixels or 16 * p2, self.max_pixels or 1024 * p2

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, mode: str | None = None, backend: str = "auto", **overrides
    ) -> "PreprocessConfig":
        """Read ``config.json`` (family, patch size) and ``preprocessor_config.json`` (if present) in
        ``path``: a checkpoint folder (transformers' or ``packvit convert``'s) or a hub id, read
        through the Hugging Face cache as ``packvit.from_pretrained`` reads it.

        The mode is ``naflex`` for SigLIP2; AIMv2 and DINOv3 default to ``native`` (packvit's point),
        ``mode="fixed"`` gives their checkpoint's fixed-size recipe. ``backend`` picks which of
        transformers' processors to reproduce (``"auto"``: the one transformers would pick here).
        ``overrides`` replace fields.
        """
        path = Path(path).expanduser()
        if not path.exists():
            path = resolve(path)  # a hub id
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: give a checkpoint folder")
        cfg = read_json_object(path / "config.json")
        native = describe_native(cfg)  # a folder written by packvit convert: family and fields, no model_type
        if native is not None:
            family, vision = native
        else:
            model_type = cfg.get("model_type")
            family = next((f.name for f in FAMILIES.values() if model_type in f.hf_model_types), None)
            if family is None:
                known = sorted(t for f in FAMILIES.values() for t in f.hf_model_types)
                raise ValueError(f"config.json model_type {model_type!r} is not one of {known}")
            vision = cfg.get("vision_config", cfg)  # the dual-tower SigLIP2 nests the vision config
        d = FAMILIES[family].preprocess
        kw: dict[str, Any] = dict(
            patch_size=int(vision["patch_size"]),
            mode=mode or d.mode,
            image_mean=d.image_mean,
            image_std=d.image_std,
            resample=d.resample,
            backend=backend,
            rescale_first=d.rescale_first,
        )
        pp = path / "preprocessor_config.json"
        if pp.is_file():
            kw.update(_from_processor_json(read_json_object(pp)))
            if mode is None and "max_num_patches" in kw:
                kw["mode"] = "naflex"
        kw.update(overrides)
        if kw["mode"] == "fixed" and not kw.get("size"):
            raise ValueError(f"mode='fixed' needs a size: {path} has no preprocessor_config.json size; pass size=")
        return cls(**kw)


def _from_processor_json(d: dict) -> dict:
    out: dict[str, Any] = {}
    for key in (
        "do_resize",
        "do_rescale",
        "rescale_factor",
        "do_normalize",
        "do_convert_rgb",
        "resample",
        "max_num_patches",
        "min_pixels",
        "max_pixels",
        "patch_size",
    ):
        if d.get(key) is not None:
            out[key] = d[key]
    for key in ("image_mean", "image_std"):
        if d.get(key) is not None:
            v = d[key]
            out[key] = tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * 3))
    if isinstance(d.get("size"), dict):
        out["size"] = {k: v for k, v in d["size"].items() if v is not None}
    if d.get("do_center_crop") and isinstance(d.get("crop_size"), dict):
        out["crop_size"] = dict(d["crop_size"])
    kind = str(d.get("image_processor_type", ""))
    if any(kind.startswith(f.hf_processor) and f.preprocess.rescale_first for f in FAMILIES.values()):
        out["rescale_first"] = True  # the family's torchvision processor rescales before resizing
    return out


# ---------------------------------------------------------------------------------------------
# Target sizes (pure functions of the input size: a data set can compute token counts from
# image sizes alone, see ``ImageProcessor.num_patches``)
# ---------------------------------------------------------------------------------------------


def naflex_size(height: int, width: int, patch_size: int, max_num_patches: int, eps: float = 1e-5) -> tuple[int, int]:
    """SigLIP2's ``get_image_size_for_max_num_patches``: binary search on the scale, same float steps."""

    def scaled(scale: float, size: int) -> int:
        return int(max(patch_size, math.ceil(size * scale / patch_size) * patch_size))

    lo, hi = eps / 10, 100.0
    while hi - lo >= eps:
        mid = (lo + hi) / 2
        if (scaled(mid, height) / patch_size) * (scaled(mid, width) / patch_size) <= max_num_patches:
            lo = mid
        else:
            hi = mid
    return scaled(lo, height), scaled(lo, width)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's rule: sides multiples of ``factor``, area in [min_pixels, max_pixels], aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be below 200, got {height}x{width}")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def _shortest_edge_size(height: int, width: int, shortest: int) -> tuple[int, int]:
    # transformers' get_resize_output_image_size(default_to_square=False): int() truncates the long side.
    if width <= height:
        return int(shortest * height / width), shortest
    return shortest, int(shortest * width / height)


# ---------------------------------------------------------------------------------------------
# Decoding inputs to 8-bit HWC
# ---------------------------------------------------------------------------------------------


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> (3, H, W) float32 in [0, 1] (no resize, no normalisation)."""
    w, h = image.size
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1) / 255


def _to_pil(image: ImageLike, where: str, convert_rgb: bool) -> Image.Image:
    """Any supported image -> a PIL image (mode RGB when ``convert_rgb``)."""
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise FileNotFoundError(f"{where}: no image file at {os.fspath(image)!r}")
        with Image.open(image) as f:
            f.load()
            image = f.copy() if f.mode == "RGB" or not convert_rgb else f.convert("RGB")
    elif isinstance(image, torch.Tensor):
        if image.dim() == 2:
            image = image[None]
        if image.dim() != 3:
            raise ValueError(f"{where}: a tensor image must be [C, H, W], got shape {list(image.shape)}")
        image = _array_to_pil(image.detach().cpu().permute(1, 2, 0).numpy(), where)
    elif isinstance(image, np.ndarray):
        if image.ndim not in (2, 3):
            raise ValueError(f"{where}: an array image must be [H, W, C] or [H, W], got shape {list(image.shape)}")
        image = _array_to_pil(image, where)
    elif not isinstance(image, Image.Image):
        raise TypeError(
            f"{where}: expected a PIL image, a numpy array [H, W, C], a tensor [C, H, W], a file path or a "
            f"list of frames, got {type(image).__name__}"
        )
    if convert_rgb and image.mode != "RGB":
        image = image.convert("RGB")
    return image


def _array_to_pil(a: np.ndarray, where: str) -> Image.Image:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 3 and a.shape[2] not in (3, 4):
        raise ValueError(f"{where}: expected 1, 3 or 4 channels last, got shape {list(a.shape)}")
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.floating):
            raise TypeError(f"{where}: pixel arrays must be uint8 (0..255) or float (0..1), got {a.dtype}")
        if a.size and (a.min() < 0 or a.max() > 1):
            raise ValueError(f"{where}: float pixels must lie in [0, 1], got [{a.min():.3g}, {a.max():.3g}]")
        a = np.rint(a * 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(a))


# ---------------------------------------------------------------------------------------------
# The processor
# ---------------------------------------------------------------------------------------------


class ImageProcessor:
    """Preprocess images and videos into one packed batch.

        proc = ImageProcessor.from_pretrained("path/to/checkpoint")
        hidden_states, grid_thw = proc([pil_img, "photo.jpg", np_hwc_uint8, [frame0, frame1]])
        # hidden_states (Tp, p*p*C) float32, grid_thw (N, 3) int64 on the CPU

    A video is a list (or tuple) of frames of one size, or a (t, C, H, W) tensor: one entry with
    t > 1. Every frame gets the size the first frame would get.
    """

    def __init__(self, config: PreprocessConfig):
        self.config = c = config
        if c.backend == "torchvision":
            lut = tv.level_table(
                c.num_channels, c.do_rescale, c.rescale_factor, c.do_normalize, c.image_mean, c.image_std
            ).numpy()
        else:
            # (C, 256) float32: rescale (float64, then cast) and normalise (float32), as transformers does.
            levels = np.arange(256, dtype=np.float64)
            lut = (levels * c.rescale_factor if c.do_rescale else levels).astype(np.float32)
            lut = np.repeat(lut[None], c.num_channels, 0)  # (C, 256)
            if c.do_normalize:
                mean = np.array(c.image_mean, dtype=np.float32)[:, None]
                std = np.array(c.image_std, dtype=np.float32)[:, None]
                lut = (lut - mean) / std
        self._lut = torch.from_numpy(np.ascontiguousarray(lut)).reshape(-1)  # (C*256,), index c*256 + v

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, mode: str | None = None, backend: str = "auto", **overrides
    ) -> "ImageProcessor":
        return cls(PreprocessConfig.from_pretrained(path, mode=mode, backend=backend, **overrides))

    def __repr__(self) -> str:
        c = self.config
        sizing = {
            "naflex": f"max_num_patches={c.max_num_patches}",
            "native": f"pixels={c.bounds}",
            "fixed": f"size={c.size}" + (f", crop_size={c.crop_size}" if c.crop_size else ""),
        }[c.mode]
        return (
            f"ImageProcessor(backend={c.backend!r}, mode={c.mode!r}, patch_size={c.patch_size}, {sizing}, "
            f"resample={Image.Resampling(c.resample).name}, image_mean={c.image_mean}, image_std={c.image_std})"
        )

    @property
    def backend(self) -> str:
        """``"pil"`` or ``"torchvision"``: which of transformers' processors the pixels match."""
        return self.config.backend

    # LLaVA reads these off its image processor (e.g. to fill padding with the mean colour).
    @property
    def image_mean(self) -> list[float]:
        return list(self.config.image_mean)

    @property
    def image_std(self) -> list[float]:
        return list(self.config.image_std)

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    # LLaVA-NeXT's anyres / highres code (llava/mm_utils.py, llava/train/train.py) reads
    # ``size["shortest_edge"]`` (the side of the square tile and of the resized whole image),
    # ``crop_size["height"/"width"]`` (the tile it cuts, and the blank image of a text-only sample).
    # Both are fresh dicts: changing one does not change the processor.
    @property
    def size(self) -> dict[str, int]:
        """Fixed mode: the checkpoint's ``size``, plus ``shortest_edge`` when it is {height, width}.

        naflex / native: ``{"shortest_edge": S}``, S the largest square side the processor keeps
        unchanged (``p * isqrt(max_num_patches)`` for naflex, the square within ``max_pixels`` for
        native): the tile LLaVA's anyres cuts costs the full patch budget and is not resized again.
        """
        c = self.config
        if c.mode == "fixed":
            size = {k: int(v) for k, v in c.size.items()}
            if "shortest_edge" not in size:
                size["shortest_edge"] = min(size["height"], size["width"])
            return size
        return {"shortest_edge": self._square_side()}

    @property
    def crop_size(self) -> dict[str, int]:
        """{"height", "width"} of the square (or fixed) image this processor outputs as is.

        Fixed mode: ``crop_size`` if the recipe crops, else ``size`` ({height, width}, or the
        shortest edge squared); naflex / native: ``size["shortest_edge"]`` squared.
        """
        c = self.config
        if c.mode == "fixed" and c.crop_size:
            return {"height": int(c.crop_size["height"]), "width": int(c.crop_size["width"])}
        if c.mode == "fixed" and "height" in c.size:
            return {"height": int(c.size["height"]), "width": int(c.size["width"])}
        side = self.size["shortest_edge"]
        return {"height": side, "width": side}

    def _square_side(self) -> int:
        c, p = self.config, self.config.patch_size
        if c.mode == "naflex":
            return p * math.isqrt(c.max_num_patches)
        return p * max(1, math.isqrt(c.bounds[1] // (p * p)))

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) in pixels the model sees for an input of ``height x width`` pixels."""
        c = self.config
        if height <= 0 or width <= 0:
            raise ValueError(f"image size must be positive, got {height}x{width}")
        if not c.do_resize:
            return height, width
        if c.mode == "naflex":
            return naflex_size(height, width, c.patch_size, c.max_num_patches)
        if c.mode == "native":
            return smart_resize(height, width, c.patch_size, *c.bounds)
        if "shortest_edge" in c.size:
            h, w = _shortest_edge_size(height, width, int(c.size["shortest_edge"]))
        else:
            h, w = int(c.size["height"]), int(c.size["width"])
        if c.crop_size:
            h, w = int(c.crop_size["height"]), int(c.crop_size["width"])
        return h, w

    def num_patches(self, height: int, width: int, frames: int = 1) -> int:
        """Tokens an input of this size costs, without decoding it (for token-budget batching)."""
        h, w = self.target_size(height, width)
        return frames * (h // self.patch_size) * (w // self.patch_size)

    def _resize(self, img: Image.Image) -> Image.Image:
        c = self.config
        if not c.do_resize:
            return img
        if c.mode == "fixed" and c.crop_size:
            img = img.resize(
                _shortest_edge_size(img.height, img.width, int(c.size["shortest_edge"]))[::-1]
                if "shortest_edge" in c.size
                else (int(c.size["width"]), int(c.size["height"])),
                resample=c.resample,
            )
            ch, cw = int(c.crop_size["height"]), int(c.crop_size["width"])
            if ch > img.height or cw > img.width:
                raise ValueError(f"crop_size {ch}x{cw} is larger than the resized image {img.height}x{img.width}")
            top, left = (img.height - ch) // 2, (img.width - cw) // 2
            return img.crop((left, top, left + cw, top + ch))
        h, w = self.target_size(img.height, img.width)
        return img if (h, w) == (img.height, img.width) else img.resize((w, h), resample=c.resample)

    def _torchvision_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """(t, C, H, W) uint8 -> transformers' torchvision processor: resized uint8, or float32 values.

        The order is transformers' ``TorchvisionBackend._preprocess`` (resize, centre crop, then the
        fused rescale + normalise, left to the lookup table), or DINOv3's override (rescale, resize
        in float32, centre crop, normalise).
        """
        c = self.config
        height, width = x.shape[-2:]
        if c.rescale_first and c.do_rescale:
            x = tv.rescale(x, c.rescale_factor)  # (t, C, H, W) float32
        if c.do_resize:
            if c.mode != "fixed":
                size = self.target_size(height, width)
            elif "shortest_edge" in c.size:
                size = _shortest_edge_size(height, width, int(c.size["shortest_edge"]))
            else:
                size = (int(c.size["height"]), int(c.size["width"]))
            x = tv.resize(x, size, tv.interpolation(c.resample))
            if c.mode == "fixed" and c.crop_size:
                x = tv.center_crop(x, int(c.crop_size["height"]), int(c.crop_size["width"]))
        if c.rescale_first:
            x = x.to(torch.float32)  # a no-op unless do_rescale=False
            return tv.normalize(x, c.image_mean, c.image_std) if c.do_normalize else x
        return x

    def _frames(self, sample: Sample, i: int) -> list[Image.Image]:
        rgb = self.config.do_convert_rgb
        if isinstance(sample, (list, tuple)):
            if not sample:
                raise ValueError(f"images[{i}] is an empty list of frames")
            frames = [_to_pil(f, f"images[{i}][{j}]", rgb) for j, f in enumerate(sample)]
        elif isinstance(sample, torch.Tensor) and sample.dim() == 4:
            frames = [_to_pil(f, f"images[{i}][{j}]", rgb) for j, f in enumerate(sample.unbind(0))]
        elif isinstance(sample, np.ndarray) and sample.ndim == 4:
            frames = [_to_pil(f, f"images[{i}][{j}]", rgb) for j, f in enumerate(sample)]
        else:
            frames = [_to_pil(sample, f"images[{i}]", rgb)]
        if len({f.size for f in frames}) != 1:
            raise ValueError(f"images[{i}]: the frames of a video must share one size, got {[f.size for f in frames]}")
        return frames

    def __call__(
        self,
        images: Sample | Sequence[Sample],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        pin_memory: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """images -> hidden_states (Tp, p*p*C) and grid_thw (N, 3) int64, which stays on the CPU.

        ``pin_memory`` writes the patches straight into page-locked memory, so the copy to
        ``device`` (if given) is asynchronous.
        """
        # A top-level list is a batch; a single video must be wrapped: ``[[frame0, frame1]]``.
        if not isinstance(images, (list, tuple)):
            images = [images]
        c, p = self.config, self.config.patch_size
        resize = self._resize if c.backend == "pil" else (lambda f: f)  # torchvision: resized below, in torch
        decoded = []  # (t, H, W, C) each: uint8 levels (one table lookup away) or final float32 values
        for i, sample in enumerate(images):
            frames = [np.asarray(resize(f)) for f in self._frames(sample, i)]  # (H, W, C) uint8 each
            if frames[0].ndim != 3 or frames[0].shape[2] != c.num_channels:
                raise ValueError(
                    f"images[{i}] has shape {list(frames[0].shape)}, expected {c.num_channels} channels last"
                )
            v = torch.from_numpy(np.stack(frames))  # (t, H, W, C) uint8
            if c.backend == "torchvision":
                v = self._torchvision_pixels(v.permute(0, 3, 1, 2).contiguous()).permute(0, 2, 3, 1)
            hh, ww = v.shape[1:3]
            if hh % p or ww % p:
                raise ValueError(
                    f"images[{i}] is {hh}x{ww} after resizing, not a multiple of patch_size {p}: "
                    "use do_resize=True or give sides that are multiples of the patch size"
                )
            decoded.append(v)
        grid = [(v.shape[0], v.shape[1] // p, v.shape[2] // p) for v in decoded]
        total = sum(t * h * w for t, h, w in grid)
        dim = p * p * c.num_channels
        out = torch.empty(total, dim, dtype=torch.float32, pin_memory=pin_memory)  # (Tp, p*p*C)
        offsets = torch.arange(dim) % c.num_channels * 256  # channel of each column, (p_h, p_w, C) order
        start = 0
        for v, (t, h, w) in zip(decoded, grid):
            n = t * h * w
            # (t, H, W, C) -> (t, h, w, p_h, p_w, C); splitting dims is a view whatever the strides.
            patches = v.unflatten(1, (h, p)).unflatten(3, (w, p)).permute(0, 1, 3, 2, 4, 5)
            if v.dtype == torch.uint8:
                idx = patches.reshape(n, dim).to(torch.int64) + offsets  # (n, p*p*C)
                torch.take(self._lut, idx, out=out[start : start + n])  # rescale + normalise, one lookup
            else:
                out[start : start + n].view(t, h, w, p, p, c.num_channels).copy_(patches)
            start += n
        grid_thw = torch.tensor(grid, dtype=torch.int64).reshape(-1, 3)
        if dtype != torch.float32:
            out = out.to(dtype)
        if device is not None:
            out = out.to(device, non_blocking=pin_memory)
        return out, grid_thw

    def preprocess(self, images, return_tensors: str | None = "pt", **kwargs) -> dict[str, torch.Tensor]:
        """The LLaVA / Hugging Face spelling: ``{"pixel_values": (Tp, p*p*C), "grid_thw": (N, 3)}``.

        ``pixel_values`` is a ``PackedPixels``: ``["pixel_values"][i]`` is image i with its grid."""
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be 'pt' (packvit returns torch tensors), got {return_tensors!r}")
        hidden_states, grid_thw = self(images, **kwargs)
        return {"pixel_values": PackedPixels(hidden_states, grid_thw), "grid_thw": grid_thw}
