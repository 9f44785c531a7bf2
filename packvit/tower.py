"""A LLaVA vision tower backed by a packed model: mixed resolutions, no padding, no per-image loop.

Follows the contract of LLaVA-NeXT's towers (llava/model/multimodal_encoder/siglip_encoder.py):
``__init__(vision_tower, args, delay_load=False)``, ``load_model(device_map=None)``, ``is_loaded``,
``image_processor``, ``select_layer`` / ``select_feature``, ``hidden_size``, ``config``, ``dtype``,
``device``, ``dummy_feature``, and in fixed-size mode ``image_size``, ``num_patches_per_side``,
``num_patches``. Frozen when loaded, like LLaVA's towers; gradients then follow the parameters'
``requires_grad`` however it is set (LLaVA's ``mm_tunable_parts`` calls ``requires_grad_(True)``).

Two preprocessing modes, named by the tower string LLaVA's builder sees:
    ``packvit:<ckpt>``        native resolution (the checkpoint's recipe: SigLIP2 NaFlex, AIMv2 /
                              DINOv3 native): ``pixel_values`` are ``PackedPixels`` with their grid.
    ``packvit-fixed:<ckpt>``  LLaVA's fixed-size recipe: ``pixel_values`` are (B, C, S, S) images,
                              so LLaVA's anyres crops, ``pad`` and video pooling run unchanged.

    tower = PackedVisionTower("path/to/checkpoint", args)     # args.mm_vision_select_layer etc.
    feats = tower([pil_a, pil_b, [frame0, frame1]])            # list of (N_i, D)
    packed, grid_thw = tower(hidden_states, grid_thw=grid_thw, packed=True)   # (sum N_i, D)
    feats = tower(images_bchw)                                 # (B, C, H, W) normalised -> (B, N, D)
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any, Sequence

import torch
from torch import nn

from weights_conversion import config_of, export_hf, load_model
from weights_conversion.checkpoint_io import resolve

from .models.base import PackedBatch
from .packed_pixels import PackedPixels
from .packing import frame_grid, grid_to_tuple, patchify, split_by_image, unpatchify
from .preprocess import ImageProcessor
from .pretrained import from_pretrained
from .zero3 import full_state_dict, mark_initialized

SELECT_FEATURES = ("patch", "cls_patch")
# The name's prefix -> preprocessing mode: None is the checkpoint's own recipe (SigLIP2 NaFlex,
# AIMv2 / DINOv3 native resolution), "fixed" LLaVA's fixed-size one.
PREFIXES = {"packvit:": None, "packvit-fixed:": "fixed"}


class FixedSizeOnly(AttributeError):
    """An attribute that only a fixed-size tower has (``hasattr`` is False, the message says why)."""


def parse_tower_name(name: str) -> tuple[str, str | None, bool]:
    """``packvit:<ckpt>`` / ``packvit-fixed:<ckpt>`` / ``<ckpt>`` -> (checkpoint, mode or None, prefixed)."""
    for prefix, mode in PREFIXES.items():
        if name.startswith(prefix):
            return name[len(prefix) :], mode, True
    return name, None, False


def _device_from_map(device_map: Any) -> torch.device | str | None:
    """LLaVA's ``load_model(device_map=...)`` spellings -> one device for the whole tower."""
    if device_map is None:
        return None
    if device_map == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ValueError(
                f"device_map puts the vision tower on several devices {sorted(map(str, devices))}; "
                "packvit's tower runs on one device: give one device or 'auto'"
            )
        return _device_from_map(devices.pop())
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    if isinstance(device_map, (str, torch.device)):
        return device_map
    raise TypeError(f"device_map must be 'auto', a device, an int or a dict, got {type(device_map).__name__}")


class LlavaImageProcessor:
    """The processor a LLaVA data pipeline sees: packvit's ``ImageProcessor`` plus LLaVA's spelling.

    ``preprocess(images)["pixel_values"]`` is a ``PackedPixels`` (native mode; ``[0]`` is image 0
    with its grid) or a (B, C, S, S) tensor (fixed mode). ``size`` / ``crop_size`` are the fixed
    size S that LLaVA's anyres crops and its text-only placeholder image use; calling the
    processor directly returns ``(hidden_states, grid_thw)`` as ``ImageProcessor`` does.
    """

    def __init__(self, processor: ImageProcessor, mode: str, image_size: int):
        self.processor = processor
        self.mode = mode  # "native" or "fixed"
        self.image_size = image_size
        s = image_size
        self.size = {"shortest_edge": s, "height": s, "width": s}
        self.crop_size = {"height": s, "width": s}

    def __getattr__(self, name):  # image_mean, image_std, patch_size, config, target_size, ...
        return getattr(self.__dict__["processor"], name)

    def __call__(self, images, **kwargs):
        return self.processor(images, **kwargs)

    def preprocess(self, images, return_tensors: str | None = "pt", **kwargs) -> dict[str, torch.Tensor]:
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be 'pt' (packvit returns torch tensors), got {return_tensors!r}")
        hidden_states, grid_thw = self.processor(images, **kwargs)
        if self.mode == "fixed":  # one size: (B, C, S, S) frames, which LLaVA's fixed-size paths expect
            frames = unpatchify(
                hidden_states, frame_grid(grid_thw), self.patch_size, self.config.num_channels
            )  # (C, S, S) each
            return {"pixel_values": torch.stack(frames)}
        return {"pixel_values": PackedPixels(hidden_states, grid_thw), "grid_thw": grid_thw}

    def __repr__(self) -> str:
        return f"LlavaImageProcessor(mode={self.mode!r}, image_size={self.image_size}, processor={self.processor!r})"


class PackedVisionTower(nn.Module):
    """LLaVA vision tower over a packvit model.

    args (any object; missing attributes take the defaults):
        mm_vision_select_layer (-2): hidden state to return, Hugging Face indexing (0 = embeddings,
            -1 = last block before the final norm; LLaVA's -2 is the block before that). Blocks past
            it, the final norm and the pooling head are dropped at load: not run, no parameters.
        mm_vision_select_feature ("patch"): "patch", or "cls_patch" (DINOv3: each frame's CLS token
            followed by its patches, so a frame gives 1 + h*w rows).
        unfreeze_mm_vision_tower (False) / mm_tunable_parts containing "mm_vision_tower": the tower's
            weights are trained, so a ``delay_load`` tower loads at once (as LLaVA's own towers do:
            the fine-tuned weights then come from the LLaVA checkpoint) and starts trainable.
        mm_vision_preprocess_mode (None): "native" / "naflex" / "fixed"; overrides the name's prefix.
        mm_vision_fp8 (False): FP8 matmuls in the blocks (``PackedViT.set_fp8``), as the keyword ``fp8``.
    Keyword arguments ``device``, ``dtype``, ``attn_backend`` go to ``packvit.from_pretrained``;
    ``fp8=True`` is applied at the first forward, once LLaVA has moved the tower to its GPU in bf16.
    """

    def __init__(self, vision_tower: str | os.PathLike, args: Any = None, delay_load: bool = False, **load_kwargs):
        super().__init__()
        self.is_loaded = False
        name, mode, _ = parse_tower_name(os.fspath(vision_tower))
        self.vision_tower_name = name
        self.select_layer = int(getattr(args, "mm_vision_select_layer", -2))
        self.select_feature = getattr(args, "mm_vision_select_feature", "patch")
        if self.select_feature not in SELECT_FEATURES:
            raise ValueError(f"mm_vision_select_feature must be one of {SELECT_FEATURES}, got {self.select_feature!r}")
        self.preprocess_mode = getattr(args, "mm_vision_preprocess_mode", None) or mode
        if self.preprocess_mode not in (None, "native", "naflex", "fixed"):
            raise ValueError(
                f"mm_vision_preprocess_mode must be 'native', 'naflex' or 'fixed', got {self.preprocess_mode!r}"
            )
        tunable = getattr(args, "mm_tunable_parts", None) or ""
        self.tuned = bool(getattr(args, "unfreeze_mm_vision_tower", False)) or "mm_vision_tower" in tunable
        self.fp8 = bool(load_kwargs.pop("fp8", False)) or bool(getattr(args, "mm_vision_fp8", False))
        self.load_kwargs = load_kwargs
        if not delay_load or self.tuned:
            self.load_model()
        else:
            self.cfg_only = _config_only(self.vision_tower_name)

    def load_model(self, device_map: Any = None, **kwargs) -> None:
        """Load weights and processor. ``device_map`` as LLaVA passes it ("auto", a device, an int, a
        one-device dict); ``torch_dtype`` / ``dtype`` are honoured, other keywords refused."""
        if self.is_loaded:
            return
        # transformers 5 builds a PreTrainedModel (a LLaVA model holding this tower) under a meta
        # default device: the checkpoint's tensors and the processor's tables are real data.
        with torch.device("cpu"):
            self._load(device_map, **kwargs)

    def _load(self, device_map: Any = None, **kwargs) -> None:
        dtype = kwargs.pop("torch_dtype", None) or kwargs.pop("dtype", None)
        if kwargs:
            raise TypeError(
                f"load_model got unsupported arguments {sorted(kwargs)}; it takes device_map and torch_dtype"
            )
        load_kwargs = dict(self.load_kwargs)
        if device_map is not None and "device" not in load_kwargs:
            load_kwargs["device"] = _device_from_map(device_map)
        if dtype is not None and "dtype" not in load_kwargs:
            load_kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        path = resolve(self.vision_tower_name)
        model = from_pretrained(path, **load_kwargs)
        fixed = self.preprocess_mode == "fixed"
        core = ImageProcessor.from_pretrained(path, mode=None if fixed else self.preprocess_mode)
        size = _fixed_size(core)
        if fixed:  # the checkpoint's own fixed recipe, or S x S when it has none
            core = ImageProcessor(
                replace(core.config, mode="fixed", size=core.config.size or {"height": size, "width": size})
            )
        self.image_processor = LlavaImageProcessor(core, "fixed" if fixed else "native", size)
        if self.select_feature == "cls_patch" and model.num_prefix == 0:
            raise ValueError(
                f"mm_vision_select_feature='cls_patch' needs a model with a CLS token (DINOv3); "
                f"{type(model).__name__} has none: use 'patch'"
            )
        model._layer_indices([self.select_layer])  # range check now, not at the first batch
        # transformers re-initialises every module of a PreTrainedModel it does not know was loaded
        # (LLaVA's _init_weights over a tower built in __init__): these hold the checkpoint.
        mark_initialized(model)
        # Keep only what the selected layer needs (as LLaVA's SigLIP tower deletes its last block
        # and head): no wasted compute, and no parameters that never get a gradient under DDP.
        model.truncate(self.select_layer % (len(model.blocks) + 1))
        model.requires_grad_(self.tuned)
        self.vision_tower = model
        self.is_loaded = True
        self.train(self.training)

    def set_trainable(self, trainable: bool = True) -> "PackedVisionTower":
        """``requires_grad_`` on the tower's weights (the same as LLaVA's unfreezing)."""
        self.vision_tower.requires_grad_(trainable)
        return self

    @property
    def trainable(self) -> bool:
        return self.is_loaded and any(p.requires_grad for p in self.vision_tower.parameters())

    def train(self, mode: bool = True) -> "PackedVisionTower":
        super().train(mode)
        if self.is_loaded:
            self._sync_mode()
        return self

    def _sync_mode(self) -> None:
        # A frozen tower stays in eval mode even under .train(): no drop path, no RoPE
        # augmentation, so its features are those it was trained to give. A trainable one follows.
        want = self.training and self.trainable
        if self.vision_tower.training != want:
            self.vision_tower.train(want)

    # -- forward --------------------------------------------------------------------------------

    def forward(
        self,
        images: torch.Tensor | Sequence[Any],
        grid_thw: torch.Tensor | Sequence[Sequence[int]] | PackedBatch | None = None,
        *,
        packed: bool = False,
        normalized: bool | None = None,
        **kwargs,
    ) -> list[torch.Tensor] | torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Features of the selected layer.

        images: one of
            - ``PackedPixels`` (what ``image_processor.preprocess`` returns in native mode), or
              packed ``hidden_states`` (Tp, p*p*C) with ``grid_thw`` (an (N, 3) tensor or list, or
              the ``PackedBatch`` of ``prepare(grid_thw)``, which a ``torch.compile``d tower should get);
            - a (B, C, H, W) tensor of B images (LLaVA's fixed-size batches), normalised unless
              ``normalized=False``: returns (B, N, D) like LLaVA's own towers;
            - a list of images / videos (PIL, arrays, tensors, paths, lists of frames), raw pixels
              unless ``normalized=True`` (then a list of normalised (C, H, W) / (t, C, H, W) tensors).
        Returns a list of (N_i, D) per image (N_i = t*h*w, or t*(1 + h*w) with "cls_patch"), or with
        ``packed=True`` the tuple (features (sum N_i, D), grid_thw).
        """
        if kwargs:
            raise ValueError(
                f"PackedVisionTower.forward got unsupported arguments {sorted(kwargs)}: it returns the "
                f"selected layer ({self.select_layer}) only; for all hidden states use packvit.integrations."
                "transformers.PackvitVisionModel or the packvit model itself (tower.vision_tower)"
            )
        if not self.is_loaded:
            raise RuntimeError("the vision tower is not loaded: call load_model() first (delay_load=True)")
        batched = None
        if isinstance(images, PackedPixels):
            if grid_thw is not None:
                raise ValueError("PackedPixels carry their own grid_thw: do not pass grid_thw too")
            hidden_states, grid_thw = images.packed()
        elif isinstance(images, torch.Tensor) and images.dim() == 2:
            if grid_thw is None:
                raise ValueError("packed hidden_states (Tp, p*p*C) need grid_thw (N, 3)")
            hidden_states = images
        elif isinstance(images, torch.Tensor) and images.dim() == 4 and images.is_floating_point():
            if grid_thw is not None:
                raise ValueError("grid_thw is only for packed hidden_states, not for a (B, C, H, W) batch")
            if normalized is False:
                hidden_states, grid_thw = self.image_processor(list(images.unbind(0)))
            else:
                hidden_states, grid_thw = patchify(images, self.patch_size)
            batched = images.shape[0]
        else:
            if grid_thw is not None:
                raise ValueError("grid_thw is only for packed hidden_states; a list of images is preprocessed here")
            if normalized:
                hidden_states, grid_thw = patchify(list(images), self.patch_size)
            else:
                hidden_states, grid_thw = self.image_processor(images)
        self._sync_mode()
        if not torch.compiler.is_compiling():
            # LLaVA moves the tower (.to(device, dtype)) after loading it: choose the attention
            # kernel for where it now is (the model itself keeps its choice when moved).
            self.vision_tower.refresh_attention()
        if self.fp8 and not self.vision_tower.fp8:  # now on the device and dtype it runs in
            self.vision_tower.set_fp8()
        batch = self.prepare(grid_thw)
        feats = self._select(hidden_states.to(self.device, self.dtype, non_blocking=True), batch)
        if batched is not None:  # (B, N, D): every image has the same size
            return feats.view(batched, -1, feats.shape[-1])
        if packed:
            return feats, grid_thw if isinstance(grid_thw, PackedBatch) else torch.as_tensor(
                grid_thw, dtype=torch.int64
            )
        return list(feats.split(self.feature_lengths(batch), 0))

    def export_hf(self, dst: str | os.PathLike, **kwargs):
        """The tower's (fine-tuned) weights as a transformers checkpoint of the whole model.

        The blocks past ``select_layer``, the final norm and the head that the tower dropped come
        from its source checkpoint, unchanged; ``kwargs`` go to ``weights_conversion.export_hf``.
        Under ZeRO-3 every rank calls it (gathering is collective) and rank 0 writes; the others
        return None."""
        tuned = full_state_dict(self.vision_tower)  # whole CPU tensors, partitioned or not
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return None
        full = load_model(resolve(self.vision_tower_name), attn_backend="sdpa", dtype=self.dtype)
        state = full.state_dict()
        unknown = sorted(set(tuned) - set(state))
        if unknown:
            raise ValueError(f"the tower holds tensors its source checkpoint has not: {unknown[:5]}")
        full.load_state_dict({**state, **tuned}, strict=True)
        return export_hf(full, dst, **kwargs)

    def prepare(self, grid_thw) -> PackedBatch:
        """The batch's packing metadata and position tables on the tower's device (host work,
        cached per grid); pass it as ``grid_thw`` to a compiled tower."""
        return self.vision_tower.prepare(grid_thw, self.device)

    def _select(self, hidden_states: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        # The model was truncated at load: the selected layer is its last block's output.
        k = len(self.vision_tower.blocks)
        out = self.vision_tower(hidden_states, batch, output_layers=[k])
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

    @property
    def fixed_size(self) -> bool:
        return self.is_loaded and self.image_processor.mode == "fixed"

    @property
    def image_size(self) -> int:
        """Side S of the (S, S) images a fixed-size tower takes (LLaVA's anyres reads it)."""
        self._need_fixed("image_size")
        return self.image_processor.image_size

    @property
    def num_patches_per_side(self) -> int:
        self._need_fixed("num_patches_per_side")
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        self._need_fixed("num_patches")
        return self.num_patches_per_side**2

    def __getattr__(self, name: str):
        # A property that raises AttributeError falls through to here; keep its message.
        if name in ("image_size", "num_patches_per_side", "num_patches"):
            self._need_fixed(name)
        return super().__getattr__(name)

    def _need_fixed(self, name: str) -> None:
        if not self.fixed_size:
            raise FixedSizeOnly(
                f"PackedVisionTower.{name} exists only in fixed-size mode: this tower runs every image at its "
                "own resolution, so there is no single image size. Name the tower 'packvit-fixed:<ckpt>' for "
                "LLaVA's fixed-size paths (anyres crops), or use packvit.integrations.llava, which handles "
                "native-resolution images with their grids."
            )


def _fixed_size(processor: ImageProcessor) -> int:
    """S of the fixed-size recipe: the checkpoint's crop or size; else 384 for SigLIP2 NaFlex, which
    has no fixed recipe (LLaVA-OneVision's SigLIP input, and one of the sizes LLaVA's anyres
    accepts); else 224 (the size DINOv3 and AIMv2 were trained at)."""
    c = processor.config
    if c.crop_size:
        return int(c.crop_size["height"])
    if c.size:
        return int(c.size.get("height") or c.size.get("shortest_edge"))
    return 384 if c.mode == "naflex" else 224


def _config_only(path: str):
    """The packvit config of a checkpoint, without loading weights (LLaVA's ``delay_load``)."""
    return config_of(resolve(path), strict_config=False)[1]


def _grid(grid_thw) -> tuple[tuple[int, int, int], ...]:
    """The (t, h, w) rows of a grid_thw tensor or list, or of a ``PackedBatch`` (eager code only)."""
    if isinstance(grid_thw, PackedBatch):
        return grid_thw.meta.grid if grid_thw.meta is not None else ()
    return grid_to_tuple(grid_thw)
