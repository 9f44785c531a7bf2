"""``packvit.cuda_graphs`` on the CPU: the buckets, the padded cu_seqlens, and the eager fallback.
The graphs themselves are checked on a GPU (tests/test_gpu_graphs.py)."""

from __future__ import annotations

import pytest
import torch

from packvit import cuda_graphs
from packvit.bench.models import DEFAULT_PRESETS, TINY


def test_token_buckets():
    b = cuda_graphs.token_buckets(32768, step=1.25)
    assert b[0] == 1024 and b[-1] == 32768 and list(b) == sorted(set(b))
    assert all(x % 256 == 0 for x in b)
    assert all(hi <= 1.25 * lo + 256 for lo, hi in zip(b, b[1:]))  # at most 25% padding, plus rounding
    assert cuda_graphs.token_buckets()[-1] == cuda_graphs.DEFAULT_MAX_TOKENS
    assert cuda_graphs.token_buckets(1000, min_tokens=1024) == (1024,)
    with pytest.raises(ValueError, match="step > 1"):
        cuda_graphs.token_buckets(4096, step=1.0)


def test_pad_cu_seqlens():
    cu = torch.tensor([0, 10, 300, 301], dtype=torch.int32)  # 3 frames, 301 tokens
    steps = torch.arange(1, 9, dtype=torch.int32) * 100  # pad segments of 100 tokens, S_b = 8
    out = cuda_graphs.pad_cu_seqlens(cu, 301, steps, 512, torch.empty(9, dtype=torch.int32))
    # 211 padding tokens: segments of 100, 100, 11, then empty ones.
    assert out.tolist() == [0, 10, 300, 301, 401, 501, 512, 512, 512]
    full = cuda_graphs.pad_cu_seqlens(cu, 301, steps, 301, torch.empty(9, dtype=torch.int32))
    assert full.tolist() == [0, 10, 300, 301] + [301] * 5


def _tiny(family="dinov3"):
    from weights_conversion import FAMILIES

    fam = FAMILIES[family]
    torch.manual_seed(0)
    return fam.model_class(fam.config_class.from_name(DEFAULT_PRESETS[family], **TINY)).eval()


def test_cpu_model_runs_eagerly():
    model = _tiny()
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        cuda_graphs.capture(model, buckets=(256,))
    graphed = cuda_graphs.capture(model, buckets=(256,), lazy=True)
    grid = ((1, 3, 5), (2, 2, 3))
    px = torch.randn(27, model.patch_dim)
    with torch.no_grad():
        assert torch.equal(graphed(px, grid), model(px, grid))
        out = graphed(px, grid, return_dict=True)
    assert graphed.fallbacks == 2 and graphed.replays == 0
    assert out.pooler_output.shape == (3, model.hidden_size)
    assert graphed.config is model.config and "cuda_graphs: buckets=[256]" in repr(graphed)
    # A bucket's segments: max_frames real ones plus room for its padding in 256-token segments.
    assert cuda_graphs.CudaGraphedViT(model, (1024, 2048), max_frames=8).segments_for(2048) == 8 + 4
