"""A LLaVA vision tower backed by a packed model: mixed resolutions, no padding, no per-image loop.

Follows the contract of LLaVA's ``CLIPVisionTower`` (llava/model/multimodal_encoder/clip_encoder.py):
``__init__(vision_tower, args, delay_load=False)``, ``load_model()``, ``is_loaded``,
``image_processor``, ``select_layer`` / ``select_feature``, ``hidden_size``, ``config``, ``dtype``,
``device``, ``dummy_feature``; frozen by default.

    tower = PackedVisionTower("path/to/checkpoint", args)     # args.mm_vision_select_layer etc.
    feats = tower([pil_a, pil_b, [frame0, frame1]])            # list of (N_i, D)
    packed, grid_thw = tower(hidden_states, grid_thw=grid_thw, packed=True)   # (sum N_i, D)

    # Under torch.compile: prepare the batch eagerly, so the graph never sees the grid itself.
    compiled = torch.compile(tower, fullgraph=True)
    packed, batch = compiled(hidden_states, grid_thw=tower.prepare(grid_thw), packed=True)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .models.base import PackedBatch
from .packing import grid_to_tuple, split_by_image
from .preprocess import ImageProcessor

SELECT_FEATURES = ("patch", "cls_patch")


class PackedVisionTower(nn.Module):
    """LLaVA vision tower over a packvit model.

    args (any object; missing attributes take the defaults):
        mm_vision_select_layer (-2): hidden state to return, Hugging Face indexing (0 = embeddings,
            -1 = last block before the final norm; LLaVA's -2 is the block before that).
        mm_vision_select_feature ("patch"): "patch", or "cls_patch" (DINOv3: each frame's CLS token
            followed by its patches, so a frame gives 1 + h*w rows).
        unfreeze_mm_vision_tower (False): trainable tower (LLaVA-NeXT's flag); else frozen.
        mm_vision_preprocess_mode (None): "naflex" / "native" / "fixed"; None -> the checkpoint's.
    Keyword arguments ``device``, ``dtype``, ``attn_backend`` go to ``packvit.from_pretrained``.

    Frozen (the default): parameters have ``requires_grad=False``, the model stays in eval mode
    even under ``.train()`` (so no drop path and no RoPE augmentation), and forward runs under
    ``no_grad``. ``set_trainable(True)`` undoes all three.
    """

    def __init__(self, vision_tower: str | os.PathLike, args: Any = None, delay_load: bool = False, **load_kwargs):
        super().__init__()
        self.is_loaded = False
        self.vision_tower_name = os.fspath(vision_tower)
        self.select_layer = int(getattr(args, "mm_vision_select_layer", -2))
        self.select_feature = getattr(args, "mm_vision_select_feature", "patch")
        if self.select_feature not in SELECT_FEATURES:
            raise ValueError(f"mm_vision_select_feature must be one of {SELECT_FEATURES}, got {self.select_feature!r}")
        self.trainable = bool(getattr(args, "unfreeze_mm_vision_tower", False))
        self.preprocess_mode = getattr(args, "mm_vision_preprocess_mode", None)
        self.load_kwargs = load_kwargs
        if not delay_load or self.trainable:
            self.load_model()
        else:
            self.cfg_only = _config_only(self.vision_tower_name)

    def load_model(self, device_map: Any = None) -> None:
        if self.is_loaded:
            return
        from . import from_pretrained

        if device_map is not None and "device" not in self.load_kwargs:
            self.load_kwargs["device"] = device_map if isinstance(device_map, (str, torch.device)) else None
        self.image_processor = ImageProcessor.from_pretrained(self.vision_tower_name, mode=self.preprocess_mode)
        self.vision_tower = from_pretrained(self.vision_tower_name, **self.load_kwargs)
        if self.select_feature == "cls_patch" and self.vision_tower.num_prefix == 0:
            raise ValueError(
                f"mm_vision_select_feature='cls_patch' needs a model with a CLS token (DINOv3); "
                f"{type(self.vision_tower).__name__} has none: use 'patch'"
            )
        self.vision_tower._layer_indices([self.select_layer])  # range check now, not at the first batch
        self.is_loaded = True
        self.set_trainable(self.trainable)

    def set_trainable(self, trainable: bool = True) -> "PackedVisionTower":
        self.trainable = trainable
        self.vision_tower.requires_grad_(trainable)
        self.vision_tower.train(self.training and trainable)
        return self

    def train(self, mode: bool = True) -> "PackedVisionTower":
        super().train(mode)
        if self.is_loaded and not self.trainable:
            self.vision_tower.eval()  # a frozen tower must not drop paths or augment positions
        return self

    # -- forward --------------------------------------------------------------------------------

    def forward(
        self,
        images: torch.Tensor | Sequence[Any],
        grid_thw: torch.Tensor | Sequence[Sequence[int]] | None = None,
        *,
        packed: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, torch.Tensor]:
        """Features of the selected layer.

        images: a list of images / videos (anything ``image_processor`` takes: PIL, arrays, tensors,
            paths, lists of frames), or already packed ``hidden_states`` (Tp, p*p*C) with ``grid_thw``
            (an (N, 3) tensor or list, or the ``PackedBatch`` of ``prepare(grid_thw)``, which is what
            a ``torch.compile``d tower should get: then batches of new shapes do not recompile).
        Returns a list of (N_i, D) per image (N_i = t*h*w, or t*(1 + h*w) with "cls_patch"), or with
        ``packed=True`` the tuple (features (sum N_i, D), grid_thw): grid_thw as an (N, 3) int64 CPU
        tensor, or the ``PackedBatch`` when one was passed.
        """
        if not self.is_loaded:
            raise RuntimeError("the vision tower is not loaded: call load_model() first (delay_load=True)")
        if isinstance(images, torch.Tensor) and images.dim() == 2:
            if grid_thw is None:
                raise ValueError("packed hidden_states (Tp, p*p*C) need grid_thw (N, 3)")
            hidden_states = images
        else:
            if grid_thw is not None:
                raise ValueError("grid_thw is only for packed hidden_states; a list of images is preprocessed here")
            hidden_states, grid_thw = self.image_processor(images)
        batch = self.prepare(grid_thw)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            feats = self._select(hidden_states.to(self.device, self.dtype, non_blocking=True), batch)
        if packed:
            return feats, grid_thw if isinstance(grid_thw, PackedBatch) else torch.as_tensor(grid_thw, dtype=torch.int64)
        return list(feats.split(self.feature_lengths(batch), 0))

    def prepare(self, grid_thw) -> PackedBatch:
        """The batch's packing metadata and position tables on the tower's device (host work,
        cached per grid); pass it as ``grid_thw`` to a compiled tower."""
        return self.vision_tower.prepare(grid_thw, self.device)

    def _select(self, hidden_states: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        out = self.vision_tower(hidden_states, batch, output_layers=[self.select_layer])
        k = self.select_layer % (len(self.vision_tower.blocks) + 1)
        patches = out.hidden_states[k]  # (Tp, D)
        if self.select_feature == "patch" or batch.meta is None:
            return patches
        # [CLS_f, patches_f] per frame: the model's own layout [CLS, registers, patches] with the
        # P - 1 registers of every earlier frame (and of this one, for patches) taken out. Index
        # arithmetic on the batch's tensors, so a compiled tower does not specialise on the grid.
        meta, P = batch.meta, self.vision_tower.num_prefix
        frame_of_patch = meta.frame_of_token.index_select(0, meta.patch_index)  # (Tp,)
        patch_pos = meta.patch_index - (frame_of_patch + 1) * (P - 1)
        cls_index = meta.prefix_index[::P]  # (F,) CLS positions in the model's layout
        cls_pos = cls_index - torch.arange(cls_index.shape[0], device=cls_index.device) * (P - 1)
        cls = out.prefix_hidden_states[k][:, 0]  # (F, D)
        x = patches.new_empty(patches.shape[0] + cls.shape[0], patches.shape[1])
        return x.index_copy(0, patch_pos, patches).index_copy(0, cls_pos, cls)

    def feature_lengths(self, grid_thw) -> list[int]:
        """Rows each image contributes to the output."""
        extra = 1 if self.select_feature == "cls_patch" else 0
        return [t * (extra + h * w) for t, h, w in _grid(grid_thw)]

    def split(self, features: torch.Tensor, grid_thw) -> list[torch.Tensor]:
        """Packed output -> list of (N_i, D)."""
        if self.select_feature == "patch":
            return split_by_image(features, _grid(grid_thw))
        return list(features.split(self.feature_lengths(grid_thw), 0))

    # -- LLaVA's properties -----------------------------------------------------------------------

    @property
    def dummy_feature(self) -> torch.Tensor:
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.dtype

    @property
    def device(self) -> torch.device:
        return self.vision_tower.device

    @property
    def config(self):
        return self.vision_tower.config if self.is_loaded else self.cfg_only

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def patch_size(self) -> int:
        return self.config.patch_size


def _config_only(path: str):
    """The packvit config of a checkpoint, without loading weights (LLaVA's ``delay_load``)."""
    from weights_conversion import FAMILIES, detect_family

    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; delay_load needs a local checkpoint folder")
    d = json.loads((Path(path) / "config.json").read_text())
    fam = FAMILIES[detect_family(d)]
    return fam.config_from_hf(d.get("vision_config", d) if "vision_config" in d else d, strict=False)


def _grid(grid_thw) -> tuple[tuple[int, int, int], ...]:
    """The (t, h, w) rows of a grid_thw tensor or list, or of a ``PackedBatch`` (eager code only)."""
    if isinstance(grid_thw, PackedBatch):
        return grid_thw.meta.grid if grid_thw.meta is not None else ()
    return grid_to_tuple(grid_thw)
