"""transformers as the reference: the one module that imports it, lazily.

The packvit models never touch transformers. The tools that compare against it (the demo,
``packvit convert --verify`` and ``align``, the benchmark suite, the tests) get the reference models
here: load an HF checkpoint folder, build an HF model from a packvit config, build or save a small
random-weight model, and run a transformers model on frames the way packvit's output is laid out
(``run_twin``). What differs between families comes from their ``Family`` record.
"""

from __future__ import annotations

import contextlib
import signal
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint_io import read_config
from .families import FAMILIES
from .family import Family
from .safe_write import Interrupted, _signals


def require_transformers(what: str) -> None:
    """An ImportError naming what to install, where transformers is missing."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        raise ModuleNotFoundError(
            f"{what} compares against transformers, which is not installed: pip install 'packvit[demo]' "
            "(or pip install transformers)",
            name="transformers",
        )


def _transformers():
    require_transformers("this")
    # A Ctrl-C inside an extension's import can surface as "TypeError: expected a message argument":
    # hold it for the import (a second or two), then raise it plainly.
    with _signals("hold") as received:
        import transformers
    if received:
        raise KeyboardInterrupt if received[0] == signal.SIGINT else Interrupted(received[0])

    return transformers


def _family_of(model_type: str | None) -> Family | None:
    return next((f for f in FAMILIES.values() if model_type in f.hf_model_types), None)


@contextlib.contextmanager
def quiet_progress(tf):
    """transformers' progress bars off inside the block only (the callers print their own output);
    the process-wide setting is left as the caller had it."""
    logging = tf.utils.logging
    was_on = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            logging.enable_progress_bar()


def load_reference(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """The transformers vision model of an HF checkpoint folder, in eval mode."""
    tf = _transformers()
    path = Path(path)
    model_type = read_config(path).get("model_type")
    fam = _family_of(model_type)
    if fam is None:
        raise ValueError(f"no transformers reference for model_type {model_type!r} in {path / 'config.json'}")
    kw = dict(dtype=dtype, attn_implementation="sdpa")
    with quiet_progress(tf):
        if model_type in fam.hf_wrappers:  # an image-text checkpoint: load it whole, keep its vision tower
            model = getattr(tf, fam.hf_wrappers[model_type]).from_pretrained(path, **kw).vision_model
        else:
            model = getattr(tf, fam.hf_class).from_pretrained(path, **kw)
    return model.to(device).eval()


def hf_config(family: str, cfg):
    """The transformers config object of a packvit config."""
    tf = _transformers()
    d = FAMILIES[family].config_to_hf(cfg)
    model_type = d.pop("model_type")
    d.pop("architectures", None)
    return tf.CONFIG_MAPPING[model_type](**d)


def build_hf(family: str, cfg, device: torch.device | str = "cpu", attn_implementation: str = "sdpa"):
    """A randomly initialised transformers vision model with the shapes of a packvit config."""
    tf = _transformers()
    hcfg = hf_config(family, cfg)
    hcfg._attn_implementation = attn_implementation
    with torch.device(device):
        return getattr(tf, FAMILIES[family].hf_class)(hcfg)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.1, *, constant_only: bool = False):
    """Random weights for a test: transformers initialises biases, norms and LayerScale to constants
    (0 or 1), which would hide a missing bias or a scale applied twice.

    By default every parameter becomes ``noise * scale``, norm weights and LayerScale ``1 + noise *
    scale``; with ``constant_only`` only the constant tensors get ``noise * scale`` added (a real-size
    model keeps transformers' initialisation elsewhere). Returns the model."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if constant_only:
            flat = p.detach().flatten()
            if flat.numel() and bool((flat == flat[0]).all()):
                p.add_((torch.randn(p.shape, generator=g) * scale).to(p.device, p.dtype))
            continue
        noise = torch.randn(p.shape, generator=g) * scale
        near_one = (name.endswith("weight") and p.dim() == 1 and "norm" in name) or "lambda1" in name
        p.copy_(noise + 1.0 if near_one else noise)
    return model


# The size of the tiny models of the tests and the demo: the family's own fields come from its record.
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)


def tiny_hf_config(family: str, **fields):
    """A transformers config of ``family``'s vision model: ``TINY`` and the family's own fields, then ``fields``."""
    tf = _transformers()
    fam = FAMILIES[family]
    return tf.CONFIG_MAPPING[fam.hf_model_type](**{**TINY, **fam.tiny_hf_fields, **fields})


def tiny_hf_model(family: str, seed: int = 0, *, attn_implementation: str = "eager", **fields):
    """A randomised transformers vision model in fp32 eval mode (eager attention by default: the
    reference math); ``fields`` go to its config."""
    tf = _transformers()
    torch.manual_seed(seed)
    cls = getattr(tf, FAMILIES[family].hf_class)
    model = cls._from_config(tiny_hf_config(family, **fields), attn_implementation=attn_implementation)
    return randomize_(model, seed).eval()


def tiny_checkpoint(family: str, directory: str | Path, seed: int = 0) -> Path:
    """Save a small transformers model with random weights (real architecture, real patch size)."""
    model = tiny_hf_model(
        family, seed, attn_implementation="sdpa", hidden_size=128, intermediate_size=256, num_hidden_layers=4
    )
    model.save_pretrained(directory)
    return Path(directory)


@dataclass
class TwinOutput:
    """A transformers model's output on some frames, laid out as packvit's."""

    patch_tokens: list[torch.Tensor]  # per frame (h*w, D)
    prefix_tokens: torch.Tensor  # (B, P, D): DINOv3's CLS and registers; P = 0 for the others
    pooler_output: torch.Tensor | None  # (B, D)
    hidden_states: tuple[torch.Tensor, ...] | None  # transformers' own (B, P + L, D) per layer, prefix included
    num_prefix_tokens: int


def run_twin(family: str, hf, frames: list[torch.Tensor], *, output_hidden_states: bool = False) -> TwinOutput:
    """Run the transformers model ``hf`` of ``family`` in one call on (C, H, W) ``frames`` (one size,
    unless the family's model takes a padded batch: ``Family.hf_pads``)."""
    fam = FAMILIES[family]
    patch = hf.config.patch_size
    out = hf(**fam.hf_inputs(list(frames), patch), output_hidden_states=output_hidden_states)
    p = fam.num_prefix_tokens(hf.config)
    x = out.last_hidden_state  # (B, P + L, D)
    lens = [(f.shape[-2] // patch) * (f.shape[-1] // patch) for f in frames]
    return TwinOutput(
        patch_tokens=[x[i, p : p + n] for i, n in enumerate(lens)],
        prefix_tokens=x[:, :p],
        pooler_output=getattr(out, "pooler_output", None),
        hidden_states=out.hidden_states if output_hidden_states else None,
        num_prefix_tokens=p,
    )
