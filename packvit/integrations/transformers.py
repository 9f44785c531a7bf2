"""packvit inside transformers' vision-language models.

Two ways in, both tested with tiny random models (tests/test_integration_transformers.py):

1. ``PackvitVisionModel``, a ``PreTrainedModel`` (model_type ``"packvit_vision"``, registered with
   ``AutoConfig`` / ``AutoModel`` when this module is imported), answers the call LLaVA-style models
   (``LlavaForConditionalGeneration``, ``LlavaOnevisionForConditionalGeneration``) make to their
   ``vision_tower``: ``vision_tower(pixel_values, output_hidden_states=...)`` with (B, C, H, W) pixels,
   then ``.hidden_states[layer]``. Its outputs mirror the transformers model the checkpoint came from.

       tower = PackvitVisionModel.from_checkpoint("google/siglip2-base-patch16-naflex")
       vlm.model.vision_tower = tower                                   # swap into a built model, or
       config = LlavaOnevisionConfig(vision_config=tower.config, ...)  # name it in a config

2. ``PackvitQwen2VLVisual`` replaces Qwen2-VL / Qwen2.5-VL's ``model.model.visual``: packvit's
   packed input (pixel_values (Tp, p*p*C) + grid_thw) is already Qwen's contract; it adds Qwen's
   2x2 spatial merge + MLP projector. ``QwenImageProcessor`` is the matching image processor
   (sides multiples of patch * merge, ``image_grid_thw``), to set on a ``Qwen2VLProcessor``.

Shapes: B images, T tokens, Tp patch tokens, F frames, P prefix tokens (DINOv3's CLS + registers),
N = h*w patches per image, D hidden size, L blocks.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModel, BatchFeature, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from weights_conversion import FAMILIES, model_family
from weights_conversion.checkpoint_io import read_json_object

from ..layers import LayerScale
from ..models.base import PackedViT
from ..packing import convert_to_packing_format, grid_to_tuple, patchify
from ..preprocess import ImageProcessor, smart_resize
from ..pretrained import from_pretrained

MODEL_TYPE = "packvit_vision"
PREFIX_TOKENS = ("all", "cls", "none")

# transformers 5 returns the visual's output object (``.pooler_output`` = merged tokens) where 4.x
# took a tensor.
_TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5

# Keyword arguments transformers' VLMs may pass down to their vision model besides the ones
# ``forward`` names: the shared ``TransformersKwargs`` (meant for the language model: packed-sequence
# lengths and the like), which a vision tower ignores.
_LM_KWARGS = frozenset(
    {
        "num_items_in_batch",
        "output_router_logits",
        "cu_seq_lens_q",
        "cu_seq_lens_k",
        "max_length_q",
        "max_length_k",
        "position_ids",
        "is_causal",
        "seq_idx",
    }
)
# The VLM's own settings, which transformers 5's ``merge_with_config_defaults`` can add to the kwargs a
# ``get_*_features`` method passes on to its tower (LlavaOnevision's video path does).
_VLM_KWARGS = frozenset({"use_cache", "vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio"})
# Options of other vision towers, accepted while off.
_OFF_KWARGS = ("head_mask", "bool_masked_pos")


def _check_kwargs(output_attentions: Any, kwargs: dict, who: str) -> None:
    """Refuse what packvit cannot honour with a ValueError (never a TypeError), accept the rest."""
    if output_attentions:
        raise ValueError(
            f"{who}: output_attentions=True is not supported: packvit's varlen attention kernels never "
            "materialise the attention weights"
        )
    for k, v in kwargs.items():
        if k in _LM_KWARGS or k in _VLM_KWARGS:
            continue  # meant for the language model or the VLM itself
        if k == "interpolate_pos_encoding":
            continue  # packvit always runs at the input's own resolution
        if k in _OFF_KWARGS and v is None:
            continue
        raise ValueError(
            f"{who} got an unsupported argument {k}={_short(v)}. It takes pixel_values, grid_thw, image_sizes, "
            f"output_hidden_states, output_attentions=False, return_dict, and ignores the VLM settings and "
            f"language-model kwargs transformers passes down ({sorted(_VLM_KWARGS | _LM_KWARGS)})"
        )


def _short(v: Any) -> str:
    return f"<tensor {list(v.shape)}>" if isinstance(v, torch.Tensor) else repr(v)


# ---------------------------------------------------------------------------------------------
# The config
# ---------------------------------------------------------------------------------------------


class PackvitVisionConfig(PretrainedConfig):
    """A packvit model as a transformers config.

    family: "aimv2" | "dinov3" | "siglip2"; packvit_config: the fields of that family's packvit
    config dataclass (``dataclasses.asdict(model.config)``); image_size: the side in pixels of the
    fixed-size crops LLaVA's processors make (``vision_config.image_size``; packvit itself takes
    any size); prefix_tokens (DINOv3): which of the CLS + register tokens lead each image's rows in
    the (B, C, H, W) outputs: "all" (as transformers' DINOv3ViTModel), "cls" (CLS only: what LLaVA's
    ``vision_feature_select_strategy="default"`` expects, as it drops the first row and reshapes the
    rest into the patch grid), or "none". attn_backend: packvit's kernel (see the README).

    The transformers names (hidden_size, num_hidden_layers, num_attention_heads, intermediate_size,
    patch_size, num_channels) are set from ``packvit_config``, for the code that reads them.
    """

    model_type = MODEL_TYPE
    base_config_key = "vision_config"
    _DERIVED = (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "patch_size",
        "num_channels",
    )

    def __init__(
        self,
        family: str = "siglip2",
        packvit_config: dict | None = None,
        image_size: int | None = None,
        prefix_tokens: str = "all",
        attn_backend: str = "auto",
        **kwargs,
    ):
        for k in self._DERIVED:  # written by to_dict() for readers; always recomputed from packvit_config
            kwargs.pop(k, None)
        super().__init__(**kwargs)
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
        cls = FAMILIES[family].config_class
        fields = dict(packvit_config or {})
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"packvit_config has fields {cls.__name__} does not know: {unknown}")
        cfg = cls(**fields)
        if prefix_tokens not in PREFIX_TOKENS:
            raise ValueError(f"prefix_tokens must be one of {PREFIX_TOKENS}, got {prefix_tokens!r}")
        self.family = family
        self.packvit_config = dataclasses.asdict(cfg)
        self.prefix_tokens = prefix_tokens
        self.attn_backend = attn_backend
        self.hidden_size = cfg.hidden_size
        self.num_hidden_layers = cfg.num_layers
        self.num_attention_heads = cfg.num_heads
        self.intermediate_size = cfg.intermediate_size
        self.patch_size = cfg.patch_size
        self.num_channels = cfg.num_channels
        self.image_size = int(image_size) if image_size is not None else FAMILIES[family].fixed_image_size(cfg)

    @property
    def packvit(self):
        """The family's packvit config dataclass."""
        return FAMILIES[self.family].config_class(**self.packvit_config)


# ---------------------------------------------------------------------------------------------
# The vision model
# ---------------------------------------------------------------------------------------------


@dataclass
class PackvitVisionOutput(BaseModelOutputWithPooling):
    """``BaseModelOutputWithPooling`` plus what a packed forward has besides.

    (B, C, H, W) input: last_hidden_state (B, P' + N, D) final-normed, hidden_states[i] (B, P' + N, D)
    (P' prefix rows as ``config.prefix_tokens`` says; index 0 = embeddings, -1 = last block before
    the final norm, as transformers), pooler_output (B, D) as transformers' model (SigLIP2 / AIMv2
    head, DINOv3 normed CLS; None without a head).
    Packed input (pixel_values (Tp, p*p*C) + grid_thw): patch rows only, last_hidden_state (Tp, D),
    hidden_states[i] (Tp, D), pooler_output (F, D); DINOv3's prefix rows in prefix_tokens (F, P, D)
    and prefix_hidden_states[i] (F, P, D).
    With image_sizes (Pixtral-style padded batch): (1, sum N_i, D) patch rows, images one after another.
    Unrequested hidden_states entries are None (transformers >= 5 asks for the layers it uses).
    """

    prefix_tokens: torch.Tensor | None = None
    prefix_hidden_states: tuple[torch.Tensor | None, ...] | None = None
    grid_thw: torch.Tensor | None = None


class PackvitVisionModel(PreTrainedModel):
    """A packvit model (``self.packvit``, a ``PackedViT``) as a transformers vision model.

    Build it from a checkpoint (``from_checkpoint``: HF, ``packvit convert`` or original layouts),
    from a loaded packvit model (``from_packvit``), from its config (``AutoModel.from_config``, random
    weights), or from a folder its own ``save_pretrained`` wrote (``from_pretrained``; the weights
    are saved under packvit's names, prefixed ``packvit.``). ``self.packvit`` goes back to packvit
    (e.g. ``weights_conversion.export_hf(tower.packvit, dst)``).

    Gradients follow the parameters' ``requires_grad``: ``tower.requires_grad_(False)`` freezes it.
    """

    config_class = PackvitVisionConfig
    config: PackvitVisionConfig  # transformers 5 reads the annotation
    base_model_prefix = "packvit_vision"
    main_input_name = "pixel_values"
    input_modalities = ("image", "video")
    supports_gradient_checkpointing = True
    _supports_sdpa = True  # packvit picks its own kernels; this keeps transformers from refusing "sdpa"
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["Block"]

    def __init__(self, config: PackvitVisionConfig, model: PackedViT | None = None):
        super().__init__(config)
        if model is None:
            model = FAMILIES[config.family].model_class(config.packvit, attn_backend=config.attn_backend)
        self.packvit = model
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # For random weights (``AutoModel.from_config``) and keys a checkpoint lacks. Linear and norm
        # layers as transformers initialises them; the parameters packvit's modules hold directly:
        # LayerScale at the config's value, attention biases at zero, position tables, CLS /
        # register tokens and probes from a normal distribution.
        super()._init_weights(module)
        if isinstance(module, nn.Linear) or "Norm" in type(module).__name__:
            return
        std = getattr(self.config, "initializer_range", None) or 0.02
        for name, p in module.named_parameters(recurse=False):
            if getattr(p, "_is_hf_initialized", False):
                continue
            if isinstance(module, LayerScale):
                p.fill_(self.config.packvit_config.get("layerscale_value", 1.0))
            elif name.endswith("_bias"):
                p.zero_()
            else:
                nn.init.normal_(p, std=std)

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_packvit(
        cls, model: PackedViT, *, image_size: int | None = None, prefix_tokens: str = "all"
    ) -> "PackvitVisionModel":
        """Wrap a loaded packvit model; its weights are kept as they are (not copied, not re-initialised)."""
        config = PackvitVisionConfig(
            family=model_family(model),
            packvit_config=dataclasses.asdict(model.config),
            image_size=image_size,
            prefix_tokens=prefix_tokens,
            attn_backend=model.attn_backend_request,
        )
        for t in (*model.modules(), *model.parameters(), *model.buffers()):
            t._is_hf_initialized = True  # transformers' post_init must not re-initialise loaded weights
        wrapper = cls(config, model=model)
        if _TRANSFORMERS_5:
            wrapper.config.dtype = model.dtype
        else:
            wrapper.config.torch_dtype = model.dtype
        return wrapper

    @classmethod
    def from_checkpoint(
        cls, src, *, image_size: int | None = None, prefix_tokens: str = "all", **load_kwargs
    ) -> "PackvitVisionModel":
        """Load any checkpoint ``packvit.from_pretrained`` reads (a transformers checkpoint of SigLIP2,
        DINOv3 or AIMv2: hub id or folder; a ``packvit convert`` folder); ``load_kwargs`` (device,
        dtype, attn_backend, revision, ...) go to it."""
        cfg = os.path.join(os.fspath(src), "config.json")
        if os.path.isfile(cfg) and read_json_object(Path(cfg)).get("model_type") == MODEL_TYPE:
            raise ValueError(
                f"{src} was written by PackvitVisionModel.save_pretrained: load it with "
                "PackvitVisionModel.from_pretrained (or AutoModel.from_pretrained)"
            )
        return cls.from_packvit(from_pretrained(src, **load_kwargs), image_size=image_size, prefix_tokens=prefix_tokens)

    # -- what LLaVA-style code reads --------------------------------------------------------------

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        """Prefix rows leading each image in the (B, C, H, W) outputs."""
        p = self.packvit.num_prefix
        return {"all": p, "cls": min(p, 1), "none": 0}[self.config.prefix_tokens]

    # -- forward --------------------------------------------------------------------------------

    def forward(
        self,
        pixel_values: torch.Tensor,
        grid_thw: torch.Tensor | Sequence[Sequence[int]] | None = None,
        image_sizes: torch.Tensor | Sequence[Sequence[int]] | None = None,
        output_hidden_states: bool | int | Sequence[int] | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> PackvitVisionOutput | tuple:
        """pixel_values: (B, C, H, W) images of one size (sides cropped down to patch multiples, as a
        stride-p convolution does), with ``image_sizes`` (B, 2) a zero-padded batch of images of
        (H_i, W_i) pixels (Pixtral's convention, which ``LlavaForConditionalGeneration`` splits
        by), or packed patches (Tp, p*p*C) with ``grid_thw`` (N, 3).

        output_hidden_states: True for all L + 1 hidden states, an index or list of indices
        (transformers >= 5 passes the layers it will read) for those only, the rest None.
        See ``PackvitVisionOutput`` for the shapes.
        """
        _check_kwargs(output_attentions, kwargs, type(self).__name__)
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        want = self._wanted(output_hidden_states)

        if pixel_values.dim() == 2:
            if grid_thw is None:
                raise ValueError("packed pixel_values (Tp, p*p*C) need grid_thw (N, 3)")
            if image_sizes is not None:
                raise ValueError("image_sizes is for (B, C, H, W) pixel_values; packed input has grid_thw")
            out = self._packed(pixel_values, grid_thw, want)
        elif pixel_values.dim() == 4:
            if grid_thw is not None:
                raise ValueError("grid_thw is for packed pixel_values (Tp, p*p*C); got (B, C, H, W) pixel_values")
            out = (
                self._images(pixel_values, want)
                if image_sizes is None
                else self._padded(pixel_values, image_sizes, want)
            )
        else:
            raise ValueError(
                f"pixel_values must be (B, C, H, W) images or packed (Tp, p*p*C) patches, got shape {list(pixel_values.shape)}"
            )
        return out if return_dict else out.to_tuple()

    def _wanted(self, output_hidden_states) -> list[int] | None:
        """Hidden-state indices to keep (non-negative, sorted), or None for none."""
        n = len(self.packvit.blocks) + 1
        if output_hidden_states is None or output_hidden_states is False:
            return None
        if output_hidden_states is True:
            return list(range(n))
        sel = [output_hidden_states] if isinstance(output_hidden_states, int) else list(output_hidden_states)
        return sorted(self.packvit._layer_indices(sel))  # range-checked: a clear ValueError

    def _run(self, hidden_states: torch.Tensor, grid, want: list[int] | None):
        if not torch.compiler.is_compiling():  # transformers places the model after building it
            self.packvit.refresh_attention()
        return self.packvit(hidden_states, grid, output_layers=want or [], return_dict=True)

    def _images(self, pixel_values: torch.Tensor, want) -> PackvitVisionOutput:
        p = self.config.patch_size
        B, C, H, W = pixel_values.shape
        h, w = H // p, W // p
        if h == 0 or w == 0:
            raise ValueError(f"pixel_values are {H}x{W} pixels, smaller than one {p}x{p} patch")
        x = convert_to_packing_format(pixel_values[:, :, : h * p, : w * p], p)  # (B*N, p*p*C)
        out = self._run(x, [(1, h, w)] * B, want)
        k = self.num_prefix_tokens

        def rows(patches, prefix):  # (B*N, D), (B, P, D) -> (B, k + N, D) as transformers lays them out
            y = patches.view(B, h * w, -1)
            return torch.cat([prefix[:, :k], y], dim=1) if k else y

        prefix_hs = out.prefix_hidden_states or {}
        hs = None
        if want is not None:
            n = len(self.packvit.blocks) + 1
            hs = tuple(
                rows(out.hidden_states[i], prefix_hs.get(i)) if i in out.hidden_states else None for i in range(n)
            )
        return PackvitVisionOutput(
            last_hidden_state=rows(out.last_hidden_state, out.prefix_tokens),
            pooler_output=out.pooler_output,
            hidden_states=hs,
        )

    def _padded(self, pixel_values: torch.Tensor, image_sizes, want) -> PackvitVisionOutput:
        p = self.config.patch_size
        sizes = torch.as_tensor(image_sizes).tolist()
        if len(sizes) != pixel_values.shape[0]:
            raise ValueError(f"image_sizes has {len(sizes)} rows for {pixel_values.shape[0]} images")
        crops = [img[:, : hh // p * p, : ww // p * p] for img, (hh, ww) in zip(pixel_values, sizes)]
        x, grid = patchify(crops, p)  # (Tp, p*p*C), (N, 3)
        out = self._packed(x, grid, want)
        return PackvitVisionOutput(
            last_hidden_state=out.last_hidden_state[None],
            pooler_output=out.pooler_output,
            hidden_states=None
            if out.hidden_states is None
            else tuple(h if h is None else h[None] for h in out.hidden_states),
            grid_thw=grid,
        )

    def _packed(self, pixel_values: torch.Tensor, grid_thw, want) -> PackvitVisionOutput:
        out = self._run(pixel_values, grid_thw, want)
        n = len(self.packvit.blocks) + 1
        hs = prefix_hs = None
        if want is not None:
            hs = tuple(out.hidden_states.get(i) for i in range(n))
            if out.prefix_hidden_states is not None:
                prefix_hs = tuple(out.prefix_hidden_states.get(i) for i in range(n))
        return PackvitVisionOutput(
            last_hidden_state=out.last_hidden_state,
            pooler_output=out.pooler_output,
            hidden_states=hs,
            prefix_tokens=out.prefix_tokens,
            prefix_hidden_states=prefix_hs,
            grid_thw=torch.as_tensor(grid_to_tuple(grid_thw), dtype=torch.int64).reshape(-1, 3),
        )


def register() -> None:
    """Register the config and model with AutoConfig / AutoModel (done on import; idempotent)."""
    AutoConfig.register(MODEL_TYPE, PackvitVisionConfig, exist_ok=True)
    AutoModel.register(PackvitVisionConfig, PackvitVisionModel, exist_ok=True)


register()


# ---------------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL
# ---------------------------------------------------------------------------------------------


class PatchMerger(nn.Module):
    """Qwen2-VL's merger: LayerNorm, then each 2x2 window's m*m rows concatenated -> MLP -> LM width."""

    def __init__(self, dim: int, out_dim: int, merge_size: int = 2, eps: float = 1e-6):
        super().__init__()
        self.hidden_size = dim * merge_size**2
        self.ln_q = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Sequential(
            nn.Linear(self.hidden_size, self.hidden_size), nn.GELU(), nn.Linear(self.hidden_size, out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (Tp, D) in window order -> (Tp / m^2, out_dim)
        return self.mlp(self.ln_q(x).view(-1, self.hidden_size))


@functools.lru_cache(maxsize=16)
def merge_order(grid: tuple[tuple[int, int, int], ...], merge_size: int) -> torch.Tensor:
    """(Tp,) int64: packed row-major patches -> Qwen's order, each m x m window's rows together,
    windows row-major per frame (the order ``get_rope_index`` gives the merged tokens positions in)."""
    m, parts, start = merge_size, [], 0
    for t, h, w in grid:
        idx = torch.arange(t * h * w).view(t, h // m, m, w // m, m).permute(0, 1, 3, 2, 4).reshape(-1)
        parts.append(idx + start)
        start += t * h * w
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


class PackvitQwen2VLVisual(nn.Module):
    """Drop-in for Qwen2-VL / Qwen2.5-VL's ``model.model.visual``.

        vlm.model.visual = PackvitQwen2VLVisual(packvit.from_pretrained(ckpt), vlm.config.text_config.hidden_size)

    Qwen calls ``visual(pixel_values, grid_thw=image_grid_thw)`` with packvit's own layout here:
    pixel_values (Tp, p*p*C) row-major per frame, grid_thw (N, 3) with h and w multiples of
    ``spatial_merge_size`` (``QwenImageProcessor`` makes both). It runs packvit, reorders the
    features into m x m windows and merges each to one token of the language model's width
    (``PatchMerger``, new weights to train): N_i = t*h*w / m^2 tokens per image, the count Qwen
    splits by and puts image pad tokens for. ``select_layer`` None takes the final-normed output,
    an index a hidden state (transformers indexing).

    Returns (transformers >= 5) ``BaseModelOutputWithPooling(last_hidden_state=(Tp, D) features in
    window order, pooler_output=(sum N_i, out_dim))``, or (4.x) the merged tensor itself.
    """

    def __init__(
        self,
        vision: PackedViT | PackvitVisionModel,
        out_hidden_size: int,
        *,
        spatial_merge_size: int = 2,
        select_layer: int | None = None,
        return_output: bool | None = None,
    ):
        super().__init__()
        self.vision = vision.packvit if isinstance(vision, PackvitVisionModel) else vision
        if select_layer is not None:
            self.vision._layer_indices([select_layer])  # range check now
        self.spatial_merge_size = spatial_merge_size
        self.select_layer = select_layer
        self.merger = PatchMerger(self.vision.hidden_size, out_hidden_size, spatial_merge_size)
        self.merger.to(self.vision.device, self.vision.dtype)
        self.return_output = _TRANSFORMERS_5 if return_output is None else return_output

    @property
    def dtype(self) -> torch.dtype:
        return self.vision.dtype

    @property
    def device(self) -> torch.device:
        return self.vision.device

    def get_dtype(self) -> torch.dtype:
        return self.dtype

    def get_device(self) -> torch.device:
        return self.device

    def forward(self, hidden_states: torch.Tensor, grid_thw: torch.Tensor | None = None, **kwargs):
        _check_kwargs(
            kwargs.pop("output_attentions", None),
            {k: v for k, v in kwargs.items() if k not in ("output_hidden_states", "return_dict")},
            type(self).__name__,
        )
        if grid_thw is None:
            raise ValueError("grid_thw (N, 3) is required: Qwen passes image_grid_thw / video_grid_thw")
        grid, m = grid_to_tuple(grid_thw), self.spatial_merge_size
        bad = [g for g in grid if g[1] % m or g[2] % m]
        if bad:
            raise ValueError(
                f"grid_thw rows {bad[:3]} have h or w not a multiple of spatial_merge_size {m}: preprocess with "
                "QwenImageProcessor, which sizes images to multiples of patch_size * merge_size"
            )
        if not torch.compiler.is_compiling():  # transformers places the model after building it
            self.vision.refresh_attention()
        if self.select_layer is None:
            feats = self.vision(hidden_states, grid)  # (Tp, D) final-normed
        else:
            k = self.select_layer % (len(self.vision.blocks) + 1)
            feats = self.vision(hidden_states, grid, output_layers=[k]).hidden_states[k]
        feats = feats.index_select(0, merge_order(grid, m).to(feats.device))  # (Tp, D) window order
        merged = self.merger(feats)  # (Tp / m^2, out)
        if self.return_output:
            return BaseModelOutputWithPooling(last_hidden_state=feats, pooler_output=merged)
        return merged


class QwenImageProcessor(ImageProcessor):
    """packvit's image processor as Qwen2-VL's: sides multiples of patch_size * merge_size, output
    ``BatchFeature(pixel_values (Tp, p*p*C), image_grid_thw (N, 3))``, and ``merge_size`` from which
    ``Qwen2VLProcessor`` counts the image pad tokens (t*h*w / merge_size^2 per image). Set it on a
    processor: ``processor.image_processor = QwenImageProcessor.from_pretrained(ckpt)``.

    Sizes: the checkpoint's recipe, then rounded to multiples of patch * merge: the native mode
    runs Qwen's ``smart_resize`` with that factor; NaFlex rounds each side down (so the patch
    budget still holds); a fixed size must already be a multiple.
    """

    model_input_names = ["pixel_values", "image_grid_thw"]
    temporal_patch_size = 1

    def __init__(self, config, merge_size: int = 2):
        super().__init__(config)
        self.merge_size = merge_size

    @classmethod
    def from_pretrained(
        cls, path, *, mode: str | None = None, merge_size: int = 2, **overrides
    ) -> "QwenImageProcessor":
        proc = ImageProcessor.from_pretrained(path, mode=mode, **overrides)
        return cls(proc.config, merge_size=merge_size)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        c, f = self.config, self.patch_size * self.merge_size
        if c.do_resize and c.mode == "native":
            return smart_resize(height, width, f, *c.bounds)
        h, w = super().target_size(height, width)
        if h % f == 0 and w % f == 0:
            return h, w
        if c.do_resize and c.mode == "naflex":
            return max(f, h // f * f), max(f, w // f * f)
        raise ValueError(
            f"{h}x{w} pixels is not a multiple of patch_size * merge_size = {f}: Qwen's merge needs even patch grids"
        )

    def __call__(self, images=None, videos=None, return_tensors: str | None = "pt", **kwargs):
        if videos is not None:
            raise ValueError("QwenImageProcessor takes images; pass a video as a list of frames in images")
        own = {k: kwargs.pop(k) for k in ("device", "dtype", "pin_memory") if k in kwargs}  # packvit's own
        own = {k: v for k, v in own.items() if v is not None}
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be 'pt' (packvit returns torch tensors), got {return_tensors!r}")
        extra = {k: v for k, v in kwargs.items() if v is not None}
        if extra:
            raise ValueError(
                f"QwenImageProcessor does not take {sorted(extra)}: its sizes and normalisation come from the "
                "checkpoint's preprocessor_config.json (build it with from_pretrained(path, **overrides))"
            )
        pixel_values, grid_thw = super().__call__(images, **own)
        return BatchFeature({"pixel_values": pixel_values, "image_grid_thw": grid_thw})

    def preprocess(self, images, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        return self(images, return_tensors=return_tensors, **kwargs)

    def fetch_images(self, images):
        """transformers 5's processors call this before checking the images' layout: open file
        paths (and fetch URLs) as PIL images, leave everything else (arrays, tensors, PIL) as it is."""
        if isinstance(images, (list, tuple)):
            return [self.fetch_images(x) for x in images]
        if isinstance(images, str) and images.startswith(("http://", "https://")):
            from transformers.image_utils import load_image

            return load_image(images)
        if isinstance(images, (str, os.PathLike)):
            from PIL import Image

            with Image.open(images) as f:
                f.load()
                return f.copy()
        return images
