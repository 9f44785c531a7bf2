"""DeepSpeed ZeRO-3 (LLaVA-NeXT's ``scripts/zero3.json``): build packvit models already partitioned.

``packvit.from_pretrained`` (and so the LLaVA tower) comes here when ZeRO-3 is on; with it off
nothing changes and deepspeed is never imported.

``weights_conversion.build_model`` builds on the meta device and assigns the checkpoint's tensors.
Under ZeRO-3 that goes wrong in two ways:

* inside an open ``deepspeed.zero.Init`` (transformers' ``from_pretrained`` of a LLaVA model whose
  config names the tower, so ``LlavaMetaModel.__init__`` loads it) each module's parameters are
  partitioned as it is built, shape ``(0,)``, and the load fails with ``ConversionError ... wrong
  shape``;
* outside one (LLaVA's ``initialize_vision_modules``, with transformers' ``HfDeepSpeedConfig``
  alive) every rank holds the whole tower until ``deepspeed.initialize`` partitions it.

Here the model is built under ``zero.Init`` (the caller's if one is open, else one made from the
DeepSpeed config) and the weights are copied in module by module with
``GatheredParameters(..., modifier_rank=0)``, as transformers does for its own models: one module
is whole at a time, and every rank ends with its partition of the checkpoint.

    from packvit import zero3
    model = zero3.from_pretrained(path)                  # plain packvit.from_pretrained when ZeRO-3 is off
    model = zero3.from_pretrained(path, ds_config=cfg)   # a DeepSpeed script without transformers
    state = zero3.full_state_dict(model)                 # whole CPU tensors on every rank (for saving)
    zero3.export_hf(model, "tower-hf")                   # transformers layout, written by rank 0

Forward and backward need one more thing, ``expose_output_tensors`` (see there); a parameter that
a module reads from a child (``Attention`` reads ``qkv.weight``) DeepSpeed gathers by itself, as an
external parameter of the running module.

Nothing here imports deepspeed or transformers unless they are already imported: ZeRO-3 cannot be
on without deepspeed having been imported, and transformers' switch lives in a module that is
loaded once its ``HfDeepSpeedConfig`` exists.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
from typing import Any

import torch
from torch import nn

import weights_conversion
from weights_conversion import FAMILIES, cast_state, load_model, read_checkpoint
from weights_conversion.keymap import check_dtypes, check_shapes

# transformers keeps its ZeRO-3 switch here (4.33+ and 5.x); ``transformers.deepspeed`` before.
_HF_DEEPSPEED_MODULES = ("transformers.integrations.deepspeed", "transformers.deepspeed")


def init_context_active() -> bool:
    """A ``deepspeed.zero.Init`` context is open: modules built now get partitioned parameters."""
    pp = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    return pp is not None and getattr(pp, "zero_init_context", 0) > 0


def _hf_deepspeed_module():
    for name in _HF_DEEPSPEED_MODULES:
        mod = sys.modules.get(name)
        if mod is not None and hasattr(mod, "is_deepspeed_zero3_enabled"):
            return mod
    return None


_OFF = threading.local()


@contextlib.contextmanager
def off():
    """Build plain models inside this block even with ZeRO-3 on: for a model that one rank builds
    alone (a reference, a save on rank 0), where partitioning would wait on the other ranks."""
    before = getattr(_OFF, "on", False)
    _OFF.on = True
    try:
        yield
    finally:
        _OFF.on = before


def zero3_enabled() -> bool:
    """ZeRO-3 applies to models built now: a ``zero.Init`` is open, or transformers' ``HfDeepSpeedConfig``
    (made by ``TrainingArguments(deepspeed=...)``) says stage 3; and no ``off()`` block is open."""
    if "deepspeed" not in sys.modules or getattr(_OFF, "on", False):
        return False
    if init_context_active():
        return True
    hf = _hf_deepspeed_module()
    return hf is not None and bool(hf.is_deepspeed_zero3_enabled())


def _init_context(ds_config: Any, dtype: torch.dtype | None):
    if init_context_active():
        return contextlib.nullcontext()  # the open Init (and its config and dtype) partitions what we build
    import deepspeed

    if ds_config is None:
        hf = _hf_deepspeed_module()
        ds_config = hf.deepspeed_config() if hf is not None and hf.is_deepspeed_zero3_enabled() else None
    if ds_config is None:
        # zero.Init without a config picks fp16 on an accelerator that supports it: never guess.
        raise RuntimeError(
            "ZeRO-3 build without a DeepSpeed config: pass ds_config (a dict or a json path), open a "
            "deepspeed.zero.Init, or create transformers' HfDeepSpeedConfig / TrainingArguments(deepspeed=...)"
        )
    return deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=dtype)


def _full_shape(t: torch.Tensor) -> torch.Size:
    return t.ds_shape if hasattr(t, "ds_shape") else t.shape  # a partitioned parameter's data is (0,)


def build_model(
    family: str,
    cfg,
    state_dict: dict[str, torch.Tensor],
    attn_backend: str = "auto",
    *,
    ds_config: Any = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """``weights_conversion.build_model`` with ZeRO-3 partitioned parameters, loaded strictly.

    ``ds_config`` / ``dtype`` make the ``zero.Init`` when none is open (default: transformers'
    DeepSpeed config, and the dtype it implies); an open one is used as it is.
    """
    fam = FAMILIES[family]
    with _init_context(ds_config, dtype):
        model = fam.model_class(cfg, attn_backend="sdpa")
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())  # buffers are not partitioned
    check_shapes({k: _full_shape(v) for k, v in tensors.items()}, state_dict)
    check_dtypes({k: v.dtype for k, v in tensors.items()}, state_dict)
    load_state_dict(model, state_dict)
    mark_initialized(model)
    expose_output_tensors(model)
    model.set_attention_backend(attn_backend)
    return model


def mark_initialized(model: nn.Module) -> nn.Module:
    """Flag every module and parameter as holding its checkpoint's values, so that transformers does
    not re-initialise them when the tower sits in a ``PreTrainedModel``.

    transformers' ``_from_config`` (under ZeRO-3 through ``initialize_weights_zero3``), ``post_init``
    of a plainly built model, and ``from_pretrained`` for keys its checkpoint lacks run the language
    model's ``_init_weights`` over every module not known to be initialised: a Linear gets
    N(0, 0.02), a LayerNorm ones and zeros (a tiny SigLIP2 tower kept 8 of 44 tensors, with
    transformers 4.57.6 and 5.24.0, with or without ZeRO-3). ``_is_hf_initialized`` is the flag it
    reads (on modules in 4.x, also on tensors in 5.x).
    """
    for m in model.modules():
        m._is_hf_initialized = True
        for p in m.parameters(recurse=False):
            p._is_hf_initialized = True
    return model


class HookableOutput(dict):
    """A ``PackedVisionOutput``'s fields as a dict, read as attributes too (``out.hidden_states[k]``)."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}") from None


def _output_as_dict(module: nn.Module, args, output):
    if dataclasses.is_dataclass(output) and not isinstance(output, (dict, type)):
        return HookableOutput((f.name, getattr(output, f.name)) for f in dataclasses.fields(output))
    return None


def expose_output_tensors(model: nn.Module) -> nn.Module:
    """Return the model's rich outputs as a dict, in which DeepSpeed finds their tensors.

    ZeRO-3 gathers a module's parameters again for backward from hooks it puts on the tensors the
    module's forward returns; it looks into tuples, lists and dicts only. ``PackedViT.forward``
    with ``output_layers`` returns a ``PackedVisionOutput`` dataclass, so the parameters the model
    holds itself (SigLIP2's ``pos_embed``, DINOv3's ``cls_token`` / ``register_tokens``) would get
    their gradient while partitioned: ``The size of tensor a (0) must match the size of tensor b``
    in AccumulateGrad. A forward hook turns the output into a ``HookableOutput``. It must be
    registered before ``deepspeed.initialize`` adds its own hooks (they run in order): ``build_model``
    does it; call it yourself on a model that ``deepspeed.initialize`` will partition.
    """
    if getattr(model, "_packvit_output_hook", None) is None:
        model._packvit_output_hook = model.register_forward_hook(_output_as_dict)  # its handle
    return model


def load_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors into a (possibly partitioned) model, one module's parameters gathered at a
    time. Every rank must pass the same tensors (each reads the checkpoint); rank 0's copy is the one
    kept, as in transformers' ZeRO-3 loading. Keys are checked by the caller."""
    import deepspeed

    with torch.no_grad():
        for prefix, module in model.named_modules():
            prefix = f"{prefix}." if prefix else ""
            params = list(module.named_parameters(recurse=False))
            with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0):
                for name, p in params:
                    p.data.copy_(state_dict[prefix + name])
            for name, b in module.named_buffers(recurse=False):
                if prefix + name in state_dict:
                    b.copy_(state_dict[prefix + name])


def from_pretrained(
    path_or_id: str | os.PathLike,
    *,
    revision: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    attn_backend: str = "auto",
    ds_config: Any = None,
    **kwargs,
) -> nn.Module:
    """``packvit.from_pretrained``, partitioned when ZeRO-3 is on (``zero3_enabled()``) or ``ds_config``
    is given; otherwise exactly ``packvit.from_pretrained``. Under ZeRO-3 ``device`` is not used:
    DeepSpeed puts each rank's partition on its own accelerator (or offload device). ``kwargs`` are
    ``weights_conversion.read_checkpoint``'s (family, config, strict_config, ...)."""
    if ds_config is None and not zero3_enabled():
        return load_model(
            path_or_id, revision=revision, device=device, dtype=dtype, attn_backend=attn_backend, **kwargs
        )
    ckpt = read_checkpoint(path_or_id, revision=revision, **kwargs)
    model = build_model(
        ckpt.family, ckpt.config, cast_state(ckpt.state, dtype), attn_backend, ds_config=ds_config, dtype=dtype
    )
    return model.eval()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Whole CPU copies of a model's tensors, partitioned or not (LLaVA's ``maybe_zero_3``), on every rank;
    the input of ``weights_conversion.export_hf``-style writers."""
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if params:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def export_hf(model: nn.Module, dst: str | os.PathLike, **kwargs):
    """``weights_conversion.export_hf`` of a (possibly partitioned) model: every rank must call it
    (the gather is collective); rank 0 writes and returns the folder, the others return None."""
    write = weights_conversion.export_hf
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        return write(model, dst, **kwargs)
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        return write(model, dst, **kwargs) if deepspeed.comm.get_rank() == 0 else None
