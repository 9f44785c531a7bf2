"""LLaVA-NeXT with a packvit vision tower: mixed resolutions through LLaVA's own training and eval code.

The user's change to LLaVA-NeXT is one branch at the top of
``llava/model/multimodal_encoder/builder.py`` ``build_vision_tower``::

    if str(vision_tower).startswith("packvit"):
        from packvit.integrations.llava import build_vision_tower as build_packvit_tower
        return build_packvit_tower(vision_tower_cfg, **kwargs)

and ``--vision_tower packvit:<checkpoint>`` (native resolution) or ``packvit-fixed:<checkpoint>``
(LLaVA's fixed-size recipe: anyres crops, ``pad``, video pooling, all by LLaVA's own code).

What happens in native mode, and why:
- The processor's ``pixel_values`` are ``PackedPixels``: packed patches carrying their grid, so
  ``preprocess(img)["pixel_values"][0]`` (train.py), ``torch.stack`` (mm_utils.process_images), the
  collator's list, ``.to(device)`` and DataLoader workers all keep each image's (t, h, w).
- LLaVA's ``prepare_inputs_labels_for_multimodal`` joins its images with ``torch.cat`` (equal
  shapes only) and assumes square feature maps of ``num_patches_per_side`` for its newlines and
  video pooling. So ``install()`` (called by ``build_vision_tower``) wraps that one method: when
  the tower is a native packvit tower and images are given, it encodes the whole batch in one
  packed forward, projects it with LLaVA's ``mm_projector``, lays out each image's tokens by the
  config (``mm_patch_merge_type``, ``image_newline`` after every row of the image's own grid,
  video pooling per frame, ``mm_newline_position``), and hands the per-image token lists to the
  original method through its own single-tensor branch, which splices them into the text,
  truncates and pads exactly as before. Every other call goes to the original untouched.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..packed_pixels import PackedPixels
from ..packing import frame_grid, patchify
from ..tower import PackedVisionTower, parse_tower_name

_PATCHED = "_packvit_original"
FIXED_ONLY_ASPECT_RATIOS = ("anyres", "highres", "crop_split")


def is_packvit_tower_name(name: Any) -> bool:
    return isinstance(name, str) and parse_tower_name(name)[2]


def build_vision_tower(vision_tower_cfg: Any, **kwargs) -> PackedVisionTower:
    """LLaVA's ``build_vision_tower(vision_tower_cfg, **kwargs)`` for ``packvit:`` tower names."""
    name = getattr(vision_tower_cfg, "mm_vision_tower", getattr(vision_tower_cfg, "vision_tower", None))
    if not is_packvit_tower_name(name):
        raise ValueError(f"not a packvit tower name: {name!r} (expected 'packvit:<ckpt>' or 'packvit-fixed:<ckpt>')")
    install()
    return PackedVisionTower(name, args=vision_tower_cfg, **kwargs)


def install() -> None:
    """Wrap ``LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal`` (idempotent)."""
    from llava.model.llava_arch import LlavaMetaForCausalLM

    original = LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal
    if hasattr(original, _PATCHED):
        return

    def prepare_inputs_labels_for_multimodal(
        self,
        input_ids,
        position_ids,
        attention_mask,
        past_key_values,
        labels,
        images,
        modalities=["image"],  # noqa: B006 (LLaVA's signature)
        image_sizes=None,
    ):
        tower = self.get_vision_tower()
        if not isinstance(tower, PackedVisionTower) or tower.fixed_size or images is None or input_ids.shape[1] == 1:
            return original(
                self, input_ids, position_ids, attention_mask, past_key_values, labels, images, modalities, image_sizes
            )
        features = encode_images(self, images, modalities)
        # The original's single-tensor branch is `image_features = self.encode_images(images)`,
        # followed by the splice: an instance attribute answers that call with our token lists.
        self.encode_images = lambda _images: features
        try:
            return original(
                self,
                input_ids,
                position_ids,
                attention_mask,
                past_key_values,
                labels,
                torch.empty(0),
                modalities,
                image_sizes,
            )
        finally:
            del self.encode_images

    setattr(prepare_inputs_labels_for_multimodal, _PATCHED, original)
    prepare_inputs_labels_for_multimodal.__doc__ = original.__doc__
    LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal = prepare_inputs_labels_for_multimodal


def uninstall() -> None:
    from llava.model.llava_arch import LlavaMetaForCausalLM

    current = LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal
    if hasattr(current, _PATCHED):
        LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal = getattr(current, _PATCHED)


# ---------------------------------------------------------------------------------------------
# Encoding: one packed forward for the batch, then LLaVA's token layout per image
# ---------------------------------------------------------------------------------------------


def _entries(images) -> list[torch.Tensor]:
    """LLaVA's ``images`` argument -> one tensor per <image> placeholder, in order."""
    if isinstance(images, PackedPixels):  # process_images' batch: one entry per image
        return images.images()
    if isinstance(images, torch.Tensor):
        if images.dim() == 4:  # (B, C, H, W): B images
            return list(images.unbind(0))
        if images.dim() == 5:  # (B, F, C, H, W): B entries of F frames
            return list(images.unbind(0))
        raise ValueError(
            f"images must be PackedPixels, a list, or a (B, C, H, W) tensor; got shape {list(images.shape)}"
        )
    return list(images)


def _frames(entry: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One entry -> (patches (n, p*p*C), grid rows (k, 3)) with one row per frame."""
    if isinstance(entry, PackedPixels):
        x, grid = entry.packed()
    else:  # a dense, normalised (C, H, W) / (F, C, H, W) tensor, e.g. train.py's text-only placeholder
        if entry.dim() not in (3, 4):
            raise ValueError(
                f"an image must be PackedPixels or a normalised [C, H, W] / [F, C, H, W] tensor, got {list(entry.shape)}"
            )
        x, grid = patchify(list(entry.unbind(0)) if entry.dim() == 4 else [entry], patch_size)
    return x, frame_grid(grid)


def encode_images(model, images, modalities: Sequence[str] | str = ("image",)) -> list[torch.Tensor]:
    """Per-<image> token tensors (L_i, D_llm) for a LLaVA model with a native packvit tower."""
    config = model.config
    aspect = str(getattr(config, "image_aspect_ratio", "") or "")
    if aspect.startswith(FIXED_ONLY_ASPECT_RATIOS):
        raise ValueError(
            f"image_aspect_ratio={aspect!r} cuts each image into fixed-size crops; a native packvit tower encodes "
            "every image whole at its own resolution instead. Set image_aspect_ratio to 'pad' (or leave it unset): "
            "with mm_patch_merge_type='spatial_unpad' each row of the image then ends in image_newline, as anyres "
            "does. To keep LLaVA's crops, name the tower 'packvit-fixed:<checkpoint>'."
        )
    if getattr(config, "add_faster_video", False):
        raise ValueError("add_faster_video is not supported by a native packvit tower: name it 'packvit-fixed:<ckpt>'")
    if isinstance(modalities, str):
        modalities = [modalities]
    tower: PackedVisionTower = model.get_vision_tower()
    entries = _entries(images)
    parts = [_frames(e, tower.patch_size) for e in entries]
    hidden_states = torch.cat([x.to(tower.device, tower.dtype, non_blocking=True) for x, _ in parts])
    grid = torch.cat([g for _, g in parts])  # (F, 3): every frame its own segment
    feats, _ = tower(hidden_states, grid_thw=grid, packed=True)  # (sum rows, D_vision)
    projector = model.get_model().mm_projector
    weight = next(projector.parameters(), None)
    # LLaVA's towers return features in the pixels' dtype; the tower itself may run in another
    # (train.py casts it to fp16/bf16): hand the projector its own dtype.
    feats = projector(feats.to(weight.dtype) if weight is not None else feats)  # (sum rows, D_llm): token-wise
    per_frame = feats.split(tower.feature_lengths(grid), 0)

    cls = tower.select_feature == "cls_patch"
    out, f = [], 0
    for i, (_, frames) in enumerate(parts):
        k = frames.shape[0]
        maps = []  # per frame: (cls (1, D) or None, grid (h, w, D))
        for (_, h, w), x in zip(frames.tolist(), per_frame[f : f + k]):
            maps.append((x[:1], x[1:].view(h, w, -1)) if cls else (None, x.view(h, w, -1)))
        f += k
        modality = modalities[i] if i < len(modalities) else "image"
        out.append(_layout_video(model, maps) if modality == "video" else _layout_image(model, maps))
    return out


def _newline(model, like: torch.Tensor) -> torch.Tensor:
    return model.get_model().image_newline.to(like.device, like.dtype)


def _with_cls(cls: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
    return tokens if cls is None else torch.cat([cls, tokens])


def _rows_with_newline(model, grid: torch.Tensor) -> torch.Tensor:
    """(h, w, D) -> (h * (w + 1), D): image_newline after every row, as LLaVA's unpad layout."""
    h, w, d = grid.shape
    nl = _newline(model, grid).view(1, 1, d).expand(h, 1, d)
    return torch.cat([grid, nl], dim=1).reshape(h * (w + 1), d)


def _layout_image(model, maps) -> torch.Tensor:
    merge = getattr(model.config, "mm_patch_merge_type", "flat")
    parts = []
    for cls, grid in maps:
        if merge == "flat":
            parts.append(_with_cls(cls, grid.flatten(0, 1)))
        elif merge.startswith("spatial") and "maxpool" not in merge:
            # LLaVA-NeXT's unpad layout (a newline after every row of the feature map), on the
            # image's own grid; "spatial" without unpad adds none, as LLaVA's single-image path.
            tokens = _rows_with_newline(model, grid) if "unpad" in merge else grid.flatten(0, 1)
            parts.append(_with_cls(cls, tokens))
        else:
            raise ValueError(f"Unexpected mm_patch_merge_type: {merge!r}")
    return torch.cat(parts)


def _pool(model, grid: torch.Tensor) -> torch.Tensor:
    """LLaVA's get_2dPool on one frame's own (h, w) grid: (h, w, D) -> (h', w', D)."""
    stride = int(getattr(model.config, "mm_spatial_pool_stride", 2) or 1)
    mode = getattr(model.config, "mm_spatial_pool_mode", "average")
    if stride <= 1:
        return grid
    x = grid.permute(2, 0, 1)[None]  # (1, D, h, w)
    if mode == "average":
        x = F.avg_pool2d(x, stride)
    elif mode == "max":
        x = F.max_pool2d(x, stride)
    elif mode == "bilinear":
        x = F.interpolate(
            x, size=[math.ceil(grid.shape[0] / stride), math.ceil(grid.shape[1] / stride)], mode="bilinear"
        )
    else:
        raise ValueError(f"Unexpected mm_spatial_pool_mode: {mode!r}")
    if x.shape[-1] == 0 or x.shape[-2] == 0:
        raise ValueError(
            f"a video frame of {grid.shape[0]}x{grid.shape[1]} patches is smaller than mm_spatial_pool_stride={stride}"
        )
    return x[0].permute(1, 2, 0)


def _layout_video(model, maps) -> torch.Tensor:
    merge = getattr(model.config, "mm_patch_merge_type", "flat")
    position = getattr(model.config, "mm_newline_position", "one_token")
    pooled = [(cls, _pool(model, grid)) for cls, grid in maps]
    if merge == "flat" or not merge.startswith("spatial"):
        if merge != "flat":
            raise ValueError(f"Unexpected mm_patch_merge_type: {merge!r}")
        return torch.cat([_with_cls(c, g.flatten(0, 1)) for c, g in pooled])
    if position == "grid":
        return torch.cat([_with_cls(c, _rows_with_newline(model, g)) for c, g in pooled])
    if position == "frame":
        return torch.cat([torch.cat([_with_cls(c, g.flatten(0, 1)), _newline(model, g)[None]]) for c, g in pooled])
    flat = torch.cat([_with_cls(c, g.flatten(0, 1)) for c, g in pooled])
    if position == "one_token":
        return torch.cat([flat, _newline(model, flat)[None]]) if "unpad" in merge else flat
    if position == "no_token":
        return flat
    raise ValueError(f"Unexpected mm_newline_position: {position!r}")
