"""CUDA graphs of the inference forward (``packvit.cuda_graphs``) against the eager forward, on a GPU.

Each family at its published width with 3 blocks (the graph code does not depend on depth), bf16,
its default CUDA path (fused kernels, best attention). Run: ``python -m pytest -q -m gpu tests/test_gpu_graphs.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from packvit import cuda_graphs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEV = "cuda"
BF16 = torch.bfloat16
GRID = ((1, 20, 31), (1, 8, 8), (1, 37, 14), (2, 12, 16), (1, 1, 9))
BUCKETS = (256, 1024, 2048)


def _model(family: str, layers: int = 3):
    from packvit.bench.models import DEFAULT_PRESETS
    from weights_conversion import FAMILIES
    from weights_conversion.reference import randomize_

    fam = FAMILIES[family]
    # AIMv2 with its attention-pool head, so that a pooling head of each kind runs on a graph's output.
    extra = {"use_head": True} if family == "aimv2" else {}
    cfg = fam.config_class.from_name(DEFAULT_PRESETS[family], num_layers=layers, **extra)
    torch.manual_seed(0)
    m = fam.model_class(cfg)
    with torch.no_grad():  # spread the constant-initialised norms, biases and scales
        randomize_(m, seed=0, scale=0.05, constant_only=True)
    m = m.to(DEV, BF16).eval()
    m.set_attention("auto")  # chosen for where the model now is (moving keeps the choice made at build)
    if m.attn_backend == "sdpa":
        pytest.skip("no fused attention backend here")
    return m


def _pixels(model, grid, seed=0):
    n = sum(t * h * w for t, h, w in grid)
    return torch.randn(n, model.patch_dim, generator=torch.Generator().manual_seed(seed)).to(DEV, BF16)


def _assert_close(a, b, what):
    assert a.shape == b.shape, what
    cos = F.cosine_similarity(a.float(), b.float(), dim=-1)
    assert cos.min() >= 0.9999, f"{what}: per-row min cosine {cos.min():.6f}"
    assert (a.float() - b.float()).abs().max() <= 0.05 * b.float().abs().max(), what


@pytest.mark.parametrize("family", ["siglip2", "dinov3", "aimv2"])
def test_graphs_match_eager(family):
    model = _model(family)
    graphed = cuda_graphs.capture(model, buckets=BUCKETS, max_frames=16)
    assert "cuda_graphs: buckets=[256, 1024, 2048]" in repr(graphed)
    assert sorted(graphed._graphs) == [(b, 16) for b in BUCKETS]  # max_frames: serves any batch
    wide = cuda_graphs.capture(model, buckets=BUCKETS, max_frames=16, frames=(16,))  # one frame bucket
    grids = [GRID, ((1, 9, 9),), ((1, 30, 40),), GRID[:2]]
    with torch.inference_mode():
        for i, grid in enumerate(grids):
            px = _pixels(model, grid, seed=i)
            ref = model(px, grid, return_dict=True)
            out = graphed(px, grid, return_dict=True)
            # The batch's own frame bucket (fewer empty segments) against max_frames' graph.
            _assert_close(out.last_hidden_state, wide(px, grid), f"{family} {grid} frame buckets")
            _assert_close(out.last_hidden_state, ref.last_hidden_state, f"{family} {grid} patches")
            if ref.pooler_output is not None:
                _assert_close(out.pooler_output, ref.pooler_output, f"{family} {grid} pooler")
            if ref.prefix_tokens is not None:
                _assert_close(out.prefix_tokens, ref.prefix_tokens, f"{family} {grid} prefix")
            # A replay after another bucket's replay: the static outputs were copied out.
            again = graphed(px, grid)
            assert torch.equal(again, out.last_hidden_state)
    assert graphed.replays == 2 * len(grids) and graphed.fallbacks == 0
    # Each batch got a graph of its own frame bucket (6 frames -> 8, 1 -> 1, 2 -> 2), captured on use.
    assert {(2048, 8), (256, 1), (2048, 1), (1024, 2)} <= set(graphed._graphs)


@pytest.mark.parametrize("family", ["siglip2", "dinov3"])
def test_graph_of_exact_bucket_size_is_bitwise_eager(family):
    """No padding: the same kernels on the same rows as eager, plus empty segments."""
    model = _model(family)
    P = model.num_prefix
    # (1, 32, 32) = 1024 patches; DINOv3 adds 5 prefix tokens: 1 x (1019 + 5) tokens.
    grid = ((1, 32, 32),) if P == 0 else ((1, 1019, 1),)
    graphed = cuda_graphs.capture(model, buckets=(1024,), max_frames=4)
    px = _pixels(model, grid)
    with torch.inference_mode():
        ref, out = model(px, grid), graphed(px, grid)
    assert graphed.replays == 1
    assert torch.equal(out, ref), f"max abs diff {(out.float() - ref.float()).abs().max():.3g}"


def test_fallbacks_and_truncated_tower():
    model = _model("dinov3")
    graphed = cuda_graphs.capture(model, buckets=(1024,), max_frames=4)
    px = _pixels(model, GRID)  # 1,780 tokens: above the largest bucket
    with torch.inference_mode():
        ref = model(px, GRID)
        assert torch.equal(graphed(px, GRID), ref) and graphed.fallbacks == 1
        small = ((1, 5, 5),) * 5  # 5 frames > max_frames
        assert torch.equal(graphed(_pixels(model, small), small), model(_pixels(model, small), small))
        assert graphed.fallbacks == 2
    # Autograd on: eager, with gradients.
    graphed(_pixels(model, ((1, 4, 4),)), ((1, 4, 4),)).float().sum().backward()
    assert graphed.fallbacks == 3 and model.patch_embed.weight.grad is not None
    # A truncated tower asks for its last hidden state: served by the graph.
    tower = copy.deepcopy(model).truncate(2)
    gt = cuda_graphs.capture(tower, buckets=(1024,), max_frames=4)
    grid = ((1, 20, 31),)
    px = _pixels(model, grid)
    with torch.inference_mode():
        ref = tower(px, grid, output_layers=[2])
        out = gt(px, grid, output_layers=[2])
    assert gt.replays == 1
    _assert_close(out.hidden_states[2], ref.hidden_states[2], "truncated hidden state")
    _assert_close(out.prefix_hidden_states[-1], ref.prefix_hidden_states[-1], "truncated prefix hidden state")


@pytest.mark.parametrize("family", ["siglip2", "dinov3"])
def test_graphed_calls_never_wait_for_the_gpu(family):
    """A replayed call of several images enqueues its work and returns: no synchronising CUDA call
    (``set_sync_debug_mode("error")`` raises on one), once its graph exists. Session 11 saw a
    four-image replay's host time close to its wall time (RESULTS.md), which a hidden wait would do."""
    model = _model(family)
    graphed = cuda_graphs.capture(model, buckets=BUCKETS, max_frames=16)
    with torch.inference_mode():
        for grid in (GRID, GRID[:4], ((1, 9, 9),)):
            px = _pixels(model, grid)
            graphed(px, grid)  # captures the batch's own frame bucket (a capture synchronises)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                graphed(px, grid)
                graphed(px, grid, return_dict=True)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    assert graphed.fallbacks == 0
