"""packvit against transformers on the same pixels: the metrics ``convert --verify`` and ``align`` print.

transformers runs each group of same-size images as one padded-free batch (SigLIP2 with an all-ones
``pixel_attention_mask``); packvit runs the whole mixed-resolution list as one packed batch.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

import packvit
from weights_conversion import export_hf
from weights_conversion.reference import run_twin


@contextmanager
def reference_dir(ckpt, model) -> Iterator[tuple[Path, str]]:
    """A folder transformers' ``from_pretrained`` reads, with a line saying what it holds.

    A transformers checkpoint is used as it is (a single file is linked beside its config.json);
    any other layout is exported to HF first, which then checks packvit's forward, not the key map.
    """
    if ckpt.layout == "hf" and ckpt.path.is_dir():
        yield ckpt.path, f"transformers on the source checkpoint {ckpt.path}"
        return
    with tempfile.TemporaryDirectory(prefix="packvit-ref-") as tmp:
        tmp = Path(tmp)
        if ckpt.layout == "hf":
            name = "model.safetensors" if ckpt.path.suffix == ".safetensors" else "pytorch_model.bin"
            os.symlink(ckpt.path.resolve(), tmp / name)
            (tmp / "config.json").write_text(json.dumps(ckpt.hf_config))
            yield tmp, f"transformers on the source checkpoint {ckpt.path}"
        else:
            export_hf(model, tmp / "hf")
            yield tmp / "hf", f"transformers on packvit's HF export ({ckpt.layout} source has no transformers twin)"


@torch.inference_mode()
def compare(family: str, model, hf, images: list[torch.Tensor]) -> dict[str, float]:
    """Metrics over every patch token of ``images`` ((C, H, W) each, normalised, on the model's device)."""
    patch = model.config.patch_size
    x, grid = packvit.patchify(images, patch)
    ours = packvit.split_by_image(model(x.to(model.dtype), grid).float(), grid)
    ref: list[torch.Tensor | None] = [None] * len(images)
    by_size: dict[tuple, list[int]] = {}
    for i, img in enumerate(images):
        by_size.setdefault(tuple(img.shape), []).append(i)
    for idx in by_size.values():
        batch = torch.stack([images[i] for i in idx]).to(next(hf.parameters()).dtype)
        for i, r in zip(idx, run_twin(family, hf, list(batch)).patch_tokens):
            ref[i] = r.float()
    a, b = torch.cat(ours), torch.cat(ref)
    diff = (a - b).abs()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return {
        "tokens": a.shape[0],
        "max_diff": diff.max().item(),
        "mean_diff": diff.mean().item(),
        "cos_min": cos.min().item(),
        "cos_mean": cos.mean().item(),
        "cos_max": cos.max().item(),
    }


HEADER = f"{'batch':<16} {'images':>6} {'tokens':>7} {'max diff':>10} {'mean diff':>10} {'cos min':>9} {'cos mean':>9} {'cos max':>9}"


def row(name: str, n_images: int, m: dict[str, float]) -> str:
    return (
        f"{name:<16} {n_images:>6} {m['tokens']:>7} {m['max_diff']:>10.3e} {m['mean_diff']:>10.3e} "
        f"{m['cos_min']:>9.6f} {m['cos_mean']:>9.6f} {m['cos_max']:>9.6f}"
    )
