"""Session fixtures: tiny transformers models saved with ``save_pretrained``, the real loading code on
real files. Shared helpers are in ``helpers.py`` (``from helpers import ...``).

Every parameter is randomised (transformers initialises many to 0 or 1, which would hide mistakes
such as a missing bias or a LayerScale applied twice). A test using these fixtures is skipped
where transformers is not installed; the other tests run.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

import pytest
import torch

from helpers import FAMILIES, tiny_hf_model
from torchvision_shim import import_torchvision
from weights_conversion import FAMILIES as REGISTRY
from weights_conversion import load_model

import_torchvision()  # before transformers imports it: beside a CPU-only torch it needs a shim


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
def tiny_models():
    """family -> a tiny packvit model (2 blocks, width 64, the family's patch size) with its own random
    initialisation, built from the registry alone: for the tests that need a model, not transformers."""
    size = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96)
    return {
        name: fam.model_class(fam.config_class(**size), attn_backend="sdpa").eval() for name, fam in REGISTRY.items()
    }


@pytest.fixture(scope="session")
def packvit_models(hf_checkpoints):
    return {f: load_model(d, attn_backend="sdpa") for f, (_, d) in hf_checkpoints.items()}


def pytest_collection_modifyitems(config, items):
    """A test marked ``gpu`` needs a CUDA device: without one it is skipped, whatever file it is in."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
