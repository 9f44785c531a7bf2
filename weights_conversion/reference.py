"""transformers as the reference: the one module that imports it, lazily.

The packvit models never touch transformers. The tools that compare against it (the demo,
``packvit convert --verify`` and ``align``, the benchmark suite) get the reference models here:
load an HF checkpoint folder, build an HF model from a packvit config, or save a small
random-weight checkpoint to convert.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from .families import aimv2, dinov3, siglip2

FAMILY_MODULES = {"aimv2": aimv2, "dinov3": dinov3, "siglip2": siglip2}

# config.json model_type -> the transformers class of its vision model; image-text checkpoints
# (siglip2, aimv2) are loaded whole and their vision tower kept.
_VISION_CLASSES = {
    "siglip2_vision_model": "Siglip2VisionModel", "dinov3_vit": "DINOv3ViTModel",
    "aimv2_vision_model": "Aimv2VisionModel",
}
_FULL_CLASSES = {"siglip2": "Siglip2Model", "aimv2": "Aimv2Model"}
_FAMILY_CLASSES = {"siglip2": "Siglip2VisionModel", "dinov3": "DINOv3ViTModel", "aimv2": "Aimv2VisionModel"}


def require_transformers(what: str) -> None:
    """An ImportError naming what to install, where transformers is missing."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        raise ModuleNotFoundError(
            f"{what} compares against transformers, which is not installed: pip install 'packvit[demo]' "
            "(or pip install transformers)", name="transformers",
        )


def _transformers():
    import signal

    from .safe_write import Interrupted, _signals

    require_transformers("this")
    # A Ctrl-C inside an extension's import can surface as "TypeError: expected a message argument":
    # hold it for the import (a second or two), then raise it plainly.
    with _signals("hold") as received:
        import transformers
    if received:
        raise KeyboardInterrupt if received[0] == signal.SIGINT else Interrupted(received[0])

    return transformers


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
    model_type = json.loads((path / "config.json").read_text())["model_type"]
    kw = dict(dtype=dtype, attn_implementation="sdpa")
    if model_type in _FULL_CLASSES:
        with quiet_progress(tf):
            model = getattr(tf, _FULL_CLASSES[model_type]).from_pretrained(path, **kw).vision_model
    elif model_type in _VISION_CLASSES:
        with quiet_progress(tf):
            model = getattr(tf, _VISION_CLASSES[model_type]).from_pretrained(path, **kw)
    else:
        raise ValueError(f"no transformers reference for model_type {model_type!r} in {path / 'config.json'}")
    return model.to(device).eval()


def hf_config(family: str, cfg):
    """The transformers config object of a packvit config."""
    tf = _transformers()
    d = FAMILY_MODULES[family].config_to_hf(cfg)
    model_type = d.pop("model_type")
    d.pop("architectures", None)
    return tf.CONFIG_MAPPING[model_type](**d)


def build_hf(family: str, cfg, device: torch.device | str = "cpu", attn_implementation: str = "sdpa"):
    """A randomly initialised transformers vision model with the shapes of a packvit config."""
    tf = _transformers()
    hcfg = hf_config(family, cfg)
    hcfg._attn_implementation = attn_implementation
    with torch.device(device):
        return getattr(tf, _FAMILY_CLASSES[family])(hcfg)


def tiny_checkpoint(family: str, directory: str | Path, seed: int = 0) -> Path:
    """Save a small transformers model with random weights (real architecture, real patch size)."""
    tf = _transformers()
    common = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4)
    cls, cfg = {
        "siglip2": (tf.Siglip2VisionModel, lambda: tf.Siglip2VisionConfig(patch_size=16, num_patches=256, **common)),
        "dinov3": (tf.DINOv3ViTModel, lambda: tf.DINOv3ViTConfig(patch_size=16, num_register_tokens=4, **common)),
        "aimv2": (tf.Aimv2VisionModel, lambda: tf.Aimv2VisionConfig(patch_size=14, is_native=True, **common)),
    }[family]
    torch.manual_seed(seed)
    model = cls(cfg())
    with torch.no_grad():  # transformers initialises many tensors to 0 or 1; randomise them all
        for name, p in model.named_parameters():
            near_one = ("norm" in name and name.endswith("weight") and p.dim() == 1) or "lambda1" in name
            p.copy_(torch.randn_like(p) * 0.02 + (1.0 if near_one else 0.0))
    model.save_pretrained(directory)
    return Path(directory)
