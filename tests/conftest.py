"""Tiny transformers models saved with ``save_pretrained``: the real loading code on real files.

Every parameter is randomised (transformers initialises many to 0 or 1, which would hide mistakes
such as a missing bias or a LayerScale applied twice).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

import pytest
import torch
from torchvision_shim import import_torchvision

import_torchvision()  # before transformers imports it: beside a CPU-only torch it needs a shim
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
PATCH = {"aimv2": 14, "dinov3": 16, "siglip2": 16}
FAMILIES = ("aimv2", "dinov3", "siglip2")


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            is_norm_weight = name.endswith("weight") and p.dim() == 1 and "norm" in name
            is_scale = "lambda1" in name
            p.copy_(noise + 1.0 if (is_norm_weight or is_scale) else noise)
    return model


def tiny_hf_config(family: str, **overrides):
    if family == "aimv2":
        kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  patch_size=14, is_native=True, use_head=True)
        kw.update(overrides)
        return transformers.Aimv2VisionConfig(**kw)
    if family == "dinov3":
        kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  patch_size=16, num_register_tokens=4)
        kw.update(overrides)
        return transformers.DINOv3ViTConfig(**kw)
    if family == "siglip2":
        kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  patch_size=16, num_patches=256)
        kw.update(overrides)
        return transformers.Siglip2VisionConfig(**kw)
    raise ValueError(family)


def tiny_hf_model(family: str, seed: int = 0, **overrides):
    """A randomised HF vision model in fp32 eval mode, with eager attention (the reference math)."""
    cfg = tiny_hf_config(family, **overrides)
    cls = {
        "aimv2": transformers.Aimv2VisionModel,
        "dinov3": transformers.DINOv3ViTModel,
        "siglip2": transformers.Siglip2VisionModel,
    }[family]
    torch.manual_seed(seed)
    model = cls._from_config(cfg, attn_implementation="eager")
    return randomize_(model, seed).eval()


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """family -> (hf model, directory holding its save_pretrained files)."""
    out = {}
    for family in FAMILIES:
        model = tiny_hf_model(family)
        d = tmp_path_factory.mktemp(f"hf-{family}")
        model.save_pretrained(d)
        out[family] = (model, d)
    return out


@pytest.fixture(scope="session")
def packvit_models(hf_checkpoints):
    from weights_conversion import load_model

    return {f: load_model(d, attn_backend="sdpa") for f, (_, d) in hf_checkpoints.items()}


def random_images(grid, patch: int, seed: int = 0, channels: int = 3):
    """One (C, H, W) image or (t, C, H, W) video per (t, h, w) row, random pixels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t, h, w in grid:
        x = torch.randn(t, channels, h * patch, w * patch, generator=g)
        out.append(x if t > 1 else x[0])
    return out


def hf_reference(family: str, hf_model, images, patch: int, output_hidden_states: bool = False):
    """Run the HF model frame by frame. Returns a list over frames of (patch tokens, prefix, pooled, hidden_states)."""
    from packvit.packing import convert_to_packing_format

    frames = []
    for img in images:
        frames.extend(img.unbind(0) if img.dim() == 4 else [img])
    outs = []
    with torch.no_grad():
        for f in frames:
            if family == "siglip2":
                h, w = f.shape[1] // patch, f.shape[2] // patch
                pv = convert_to_packing_format(f[None], patch)[None]  # (1, h*w, p*p*C)
                o = hf_model(
                    pixel_values=pv,
                    pixel_attention_mask=torch.ones(1, h * w, dtype=torch.long),
                    spatial_shapes=torch.tensor([[h, w]]),
                    output_hidden_states=output_hidden_states,
                )
            else:
                o = hf_model(pixel_values=f[None], output_hidden_states=output_hidden_states)
            p = 1 + hf_model.config.num_register_tokens if family == "dinov3" else 0
            hs = o.hidden_states if output_hidden_states else None
            outs.append((o.last_hidden_state[0, p:], o.last_hidden_state[0, :p], o.pooler_output, hs))
    return outs


def run_python(args, timeout: int = 240) -> str:
    """Run ``python ARGS`` from the repository root (packvit and benchmarks/ importable, one thread,
    offline); fail with the tail of its output. Returns stdout."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'benchmarks'}", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, *map(str, args)], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"{list(map(str, args))[:3]} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r.stdout


def torchrun(script, *args, nproc: int = 2, timeout: int = 240) -> str:
    """Run ``script`` under torchrun with ``nproc`` CPU processes on a free local port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return run_python(["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                       f"--master_port={port}", script, *args], timeout=timeout)


def assert_hf_export_exact(hf_model, src_dir, export_dir) -> None:
    """An HF-layout export holds the source checkpoint's tensors bit for bit, and transformers
    reloads it to the same state dict."""
    from safetensors.torch import load_file

    original, exported = load_file(Path(src_dir) / "model.safetensors"), load_file(Path(export_dir) / "model.safetensors")
    assert set(exported) == set(original)
    for k, v in original.items():
        assert exported[k].dtype == v.dtype and torch.equal(exported[k], v), k
    reloaded = type(hf_model).from_pretrained(export_dir, attn_implementation="eager").eval()
    for (k1, v1), (k2, v2) in zip(sorted(hf_model.state_dict().items()), sorted(reloaded.state_dict().items())):
        assert k1 == k2 and torch.equal(v1, v2), k1
