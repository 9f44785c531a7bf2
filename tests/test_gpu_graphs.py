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


# -- training graphs (``packvit.cuda_graphs_training``) ----------------------------------------------


def _train_step(m, px, grid, seed, opt=None):
    """zero_grad, forward, a loss weighing every output row differently, backward, and an optimizer
    step if given; the output and every parameter's gradient (fp32 copies)."""
    m.zero_grad(set_to_none=True)
    out = m(px, grid, return_dict=True)
    w = torch.randn(out.last_hidden_state.shape, generator=torch.Generator().manual_seed(seed)).to(DEV)
    loss = (out.last_hidden_state.float() * w).sum()
    if out.pooler_output is not None:
        loss = loss + out.pooler_output.float().square().sum()
    loss.backward()
    grads = {
        n.removeprefix("module.").removeprefix("model."): p.grad.float().clone()
        for n, p in m.named_parameters()
        if p.grad is not None
    }
    if opt is not None:
        opt.step()
    return out.last_hidden_state, grads


def _assert_grads_close(grads, ref, what, again=None):
    """Every gradient within bf16 rounding of the reference (relative error <= 0.045, the error of a
    cosine of 0.999), or within three times eager's own run-to-run spread (``again``: the same step
    run eagerly again; FA4's backward adds dQ with atomics, and an FP8 step turns a last-bit change in
    dy into a different e4m3 rounding), whichever is larger. Except gradients that are zero in exact
    arithmetic, whose computed values are rounding noise (the key biases': a softmax over keys ignores
    a shift common to all of them): those must stay noise, under 1% of the median gradient's RMS."""
    assert grads.keys() == ref.keys(), what
    rms = {n: r.square().mean().sqrt().item() for n, r in ref.items()}
    floor = 0.01 * sorted(rms.values())[len(rms) // 2]
    for name, g in grads.items():
        r = ref[name]
        if rms[name] < floor:
            assert g.square().mean().sqrt() < floor, f"{what} {name}: {g.square().mean().sqrt():.3g} is not noise"
            continue
        err = ((g - r).norm() / r.norm()).item()
        spread = 0.0 if again is None else ((again[name] - r).norm() / r.norm()).item()
        assert err <= max(0.045, 3 * spread), f"{what} {name}: relative error {err:.4f}, eager's spread {spread:.4f}"


@pytest.mark.parametrize("fp8_on", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("family", ["siglip2", "dinov3", "aimv2"])
def test_training_graphs_match_eager(family, fp8_on):
    """Training steps replayed from graph pairs against eager steps of an identical model: outputs
    and every parameter's gradient (the patch embedding's through the graphs' input gradient), over
    batches of several buckets and layouts, with an optimizer step between (the graphs read the
    weights in place; the eager twin is given the same weights before each step). With every
    linear in FP8 too (each training step quantises the weights afresh, inside the graph)."""
    model = _model(family).train()
    if fp8_on:
        model.set_fp8(min_tokens=0)
    twin = copy.deepcopy(model)
    graphed = cuda_graphs.capture(model, buckets=BUCKETS, max_frames=16, training=True, lazy=True)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    grids = [GRID, ((1, 9, 9),), ((1, 30, 40),), GRID, GRID[:2]]
    for i, grid in enumerate(grids):
        twin.load_state_dict(model.state_dict())  # the weights the optimizer left: this step's difference alone
        px = _pixels(model, grid, seed=i)
        ref, ref_grads = _train_step(twin, px, grid, i)
        _, again = _train_step(twin, px, grid, i)
        # ``out`` of the step before still holds its autograd graph (and so the parameters'
        # gradient accumulators) while this step captures a new bucket, as a held loss would.
        out, grads = _train_step(graphed, px, grid, i, opt)
        _assert_close(out, ref, f"{family} step {i} output")
        _assert_grads_close(grads, ref_grads, f"{family} step {i}", again)
    assert graphed.replays == len(grids) and graphed.fallbacks == 0
    # (2048, 8) GRID, replayed again at step 3; (256, 1); (2048, 1); (1024, 2).
    keys = graphed.training_graphs.keys()
    assert [k[:3] for k in keys] == [(256, 1, True), (1024, 2, True), (2048, 1, True), (2048, 8, True)]


@pytest.mark.parametrize("family", ["siglip2", "dinov3"])
def test_graphed_training_steps_never_wait_for_the_gpu(family):
    """A replayed training step (embedding, forward graph, loss, backward graph, the embedding's
    backward, gradient accumulation) enqueues its work without a synchronising CUDA call."""
    model = _model(family).train()
    graphed = cuda_graphs.capture(model, buckets=BUCKETS, max_frames=16, training=True, lazy=True)
    px = _pixels(model, GRID)
    for _ in range(2):  # the capture (which synchronises), then a replay with .grad already set
        graphed(px, GRID).float().square().mean().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            graphed(px, GRID).float().square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert graphed.fallbacks == 0 and graphed.replays == 4


def test_training_graphs_under_ddp():
    """DistributedDataParallel (one rank, NCCL) around the graphed model: its gradient hooks fire on
    the gradients the backward graph hands autograd, and the step matches an eager DDP step."""
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        model = _model("siglip2").train()
        twin = copy.deepcopy(model)
        graphed = DDP(cuda_graphs.capture(model, buckets=BUCKETS, max_frames=16, training=True, lazy=True))
        eager = DDP(twin)
        for i, grid in enumerate([GRID, GRID[:3], GRID]):
            px = _pixels(model, grid, seed=i)
            ref, ref_grads = _train_step(eager, px, grid, i)
            out, grads = _train_step(graphed, px, grid, i)
            _assert_close(out, ref, f"DDP step {i} output")
            _assert_grads_close(grads, ref_grads, f"DDP step {i}")
        assert graphed.module.replays == 3
    finally:
        dist.destroy_process_group()
