"""``packvit.cuda_graphs`` on the CPU: the buckets, the padded cu_seqlens, and the eager fallback.
The graphs themselves are checked on a GPU (tests/test_gpu_graphs.py)."""

from __future__ import annotations

import contextlib

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
    # A bucket's segments: max_frames (or its frame bucket's) real ones plus room for its padding in
    # 256-token segments.
    graphed = cuda_graphs.CudaGraphedViT(model, (1024, 2048), max_frames=8)
    assert graphed.segments_for(2048) == 8 + 4 and graphed.segments_for(2048, 2) == 2 + 4
    assert graphed.frames == (1, 2, 4, 8) and [graphed.frames_for(f) for f in (1, 3, 5, 8, 9)] == [1, 4, 8, 8, None]


def test_frame_buckets():
    assert cuda_graphs.frame_buckets() == (1, 2, 4, 8, 16, 32, 64, 128)
    assert cuda_graphs.frame_buckets(6) == (1, 2, 4, 6) and cuda_graphs.frame_buckets(1) == (1,)
    model = _tiny()
    assert cuda_graphs.CudaGraphedViT(model, (256,), max_frames=24, frames=(24, 4)).frames == (4, 24)
    with pytest.raises(ValueError, match="ending at max_frames=8"):
        cuda_graphs.CudaGraphedViT(model, (256,), max_frames=8, frames=(2, 4))
    with pytest.raises(ValueError, match="max_frames >= 1"):
        cuda_graphs.frame_buckets(0)


class _FakeGraph:
    """Stands in for ``torch.cuda.CUDAGraph`` on the CPU: ``replay`` runs the captured body again,
    on the same static tensors, and writes its results where the capture left them (as a replay
    does). What it checks is everything around the capture: the padding of tokens and cu_seqlens,
    the static buffers and the output assembly (the pooled rows from the graph's output)."""

    owner = g = None

    def replay(self):
        out = self.owner._body(self.g)
        assert out.data_ptr() == self.g.out.data_ptr()  # the body writes the shared output buffer


class _NoStream:
    def wait_stream(self, other):
        pass


@pytest.fixture
def graphs_on_cpu(monkeypatch):
    from helpers import fake_fa4_on_cpu

    fake_fa4_on_cpu(monkeypatch)  # a kernel that reads cu_seqlens, as FA4 does; sdpa reads host lengths
    capturing = []

    @contextlib.contextmanager
    def graph(g, pool=None):
        capturing.append(g)
        yield
        capturing.pop()

    body = cuda_graphs.CudaGraphedViT._body

    def recording_body(self, g):
        if capturing:
            capturing[-1].owner, capturing[-1].g = self, g
        return body(self, g)

    monkeypatch.setattr(cuda_graphs.CudaGraphedViT, "_body", recording_body)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    monkeypatch.setattr(torch.cuda, "Stream", _NoStream)
    monkeypatch.setattr(torch.cuda, "current_stream", _NoStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())

    def can_graph(self, hidden_states):  # as on CUDA, minus the device test
        return not self.model.training and not torch.is_grad_enabled()

    monkeypatch.setattr(cuda_graphs.CudaGraphedViT, "can_graph", can_graph)


@pytest.mark.parametrize("family, extra", [("siglip2", {}), ("dinov3", {}), ("aimv2", {"use_head": True})])
def test_graph_path_on_cpu_equals_eager(graphs_on_cpu, family, extra):
    """The graph code path, capture faked (replay = the captured body run again on the same static
    tensors): padded tokens in their own segments, cu_seqlens padded with empty ones, one capture
    serving batches of other layouts, and the outputs (tokens, pooled rows, prefix, last hidden
    state) equal to the eager model's."""
    from packvit.attention import AttentionImpl
    from weights_conversion import FAMILIES

    fam = FAMILIES[family]
    torch.manual_seed(0)
    model = fam.model_class(fam.config_class.from_name(DEFAULT_PRESETS[family], **TINY, **extra)).eval()
    model.attention = AttentionImpl("fa4", "fa4", "cpu", torch.float32)  # the stand-in kernel
    graphed = cuda_graphs.CudaGraphedViT(model, (256, 512), max_frames=8, pad_segment=64)
    for grid in [((1, 3, 5), (2, 2, 3)), ((1, 7, 9), (1, 4, 4), (3, 2, 2)), ((1, 16, 20), (1, 5, 7))]:
        n = sum(t * h * w for t, h, w in grid)
        px = torch.randn(n, model.patch_dim, generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            ref = model(px, grid, return_dict=True)
            out = graphed(px, grid, return_dict=True)
            feats = graphed(px, grid)
            eager = graphed(px, grid, output_layers=[-1])  # hidden state -1 of an untruncated model
        torch.testing.assert_close(feats, ref.last_hidden_state, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=1e-5)
        if model.has_pooler:  # SigLIP2's and AIMv2's pooling heads, eagerly on the graph's output
            torch.testing.assert_close(out.pooler_output, ref.pooler_output, atol=1e-5, rtol=1e-5)
        if model.num_prefix:
            torch.testing.assert_close(out.prefix_tokens, ref.prefix_tokens, atol=1e-5, rtol=1e-5)
        assert not out.hidden_states and len(eager.hidden_states) == 1
    # The plain calls replayed; asking for hidden state -1 of an untruncated model runs eagerly.
    assert graphed.replays == 6 and graphed.fallbacks == 3
    # Captured on first use, then replayed: one graph per (token bucket, frame bucket) a batch needs,
    # its segment slots the frame bucket's plus the padding's (3 frames -> 4, 5 -> 8, 2 -> 2).
    assert sorted(graphed._graphs) == [(256, 4), (256, 8), (512, 2)]
    assert [g.segments for _, g in sorted(graphed._graphs.items())] == [4 + 4, 8 + 4, 2 + 4]
    # capture() ahead of use: max_frames alone by default (it serves any batch), or the frames asked.
    ahead = cuda_graphs.CudaGraphedViT(model, (256, 512), max_frames=8, pad_segment=64).capture()
    assert sorted(ahead._graphs) == [(256, 8), (512, 8)]
    assert sorted(ahead.capture([512], [2, 4])._graphs) == [(256, 8), (512, 2), (512, 4), (512, 8)]
    with pytest.raises(ValueError, match="not one of this model's frame buckets"):
        ahead.capture(frames=[3])
    # A truncated tower's last hidden state is its output: served by the graph.
    model.truncate(1)
    graphed = cuda_graphs.CudaGraphedViT(model, (256,), max_frames=8, pad_segment=64)
    grid = ((1, 3, 5), (2, 2, 3))
    px = torch.randn(27, model.patch_dim)
    with torch.no_grad():
        ref = model(px, grid, output_layers=[-1])
        out = graphed(px, grid, output_layers=[-1])
    assert graphed.replays == 1 and graphed.fallbacks == 0
    torch.testing.assert_close(out.hidden_states[-1], ref.hidden_states[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=1e-5)


def test_fp8_changes_drop_the_graphs(graphs_on_cpu):
    """A graph holds each FP8 linear's cached e4m3 weight by address (``packvit.fp8``): after the
    weight changes in place (an optimizer step, ``copy_``) eager quantises afresh and frees the old
    copy, so the graphs must be captured again, as after ``set_fp8`` or a crossover change."""
    from packvit import fp8
    from packvit.attention import AttentionImpl
    from weights_conversion import FAMILIES

    fam = FAMILIES["dinov3"]
    torch.manual_seed(0)
    model = fam.model_class(fam.config_class.from_name(DEFAULT_PRESETS["dinov3"], **TINY)).to(torch.bfloat16).eval()
    model.attention = AttentionImpl("fa4", "fa4", "cpu", torch.bfloat16)
    graphed = cuda_graphs.CudaGraphedViT(model, (256,), max_frames=8, pad_segment=64)
    grid = ((1, 3, 5), (2, 2, 3))
    px = torch.randn(27, model.patch_dim).to(torch.bfloat16)
    captures = []
    capture_one = graphed._capture_one
    graphed._capture_one = lambda tokens, frames: captures.append(tokens) or capture_one(tokens, frames)

    def run():
        with torch.no_grad():
            out, ref = graphed(px, grid), model(px, grid)
        torch.testing.assert_close(out, ref, atol=0, rtol=0)

    run()
    model.fp8 = fp8.convert(model, min_tokens=0)  # what set_fp8 does, past its CUDA check
    run()
    run()
    assert len(captures) == 2  # bf16, then FP8: the second FP8 call replays
    lin = model.get_submodule(model.fp8[0])
    with torch.no_grad():
        lin.weight.mul_(1.5)  # in place: same storage, a new version
    run()
    assert len(captures) == 3
    for m in model.modules():
        if isinstance(m, fp8.FP8Linear):
            m.min_tokens = 10**6  # every linear back below its crossover
    run()
    fp8.unconvert(model)
    model.fp8 = []
    run()
    assert len(captures) == 5 and graphed.replays == 6


# -- training graphs (``packvit.cuda_graphs_training``) ----------------------------------------------


@pytest.fixture
def train_graphs_on_cpu(graphs_on_cpu, monkeypatch):
    """The training graphs' capture faked as ``graphs_on_cpu`` fakes the inference one: a replay of
    the forward graph runs the captured forward body again (the blocks on the static input, a fresh
    autograd graph), a replay of the backward graph the captured backward body (torch.autograd.grad
    into the static gradient buffers). What this checks is everything around the graphs: padding,
    the static buffers, the autograd Function and the gradients' way into ``.grad``."""
    from packvit import cuda_graphs_training as cgt

    capturing = []
    inference_graph = torch.cuda.graph  # graphs_on_cpu's

    @contextlib.contextmanager
    def graph(g, pool=None, capture_error_mode="global"):
        capturing.append(g)
        with inference_graph(g, pool):
            yield
        capturing.pop()

    class Fake(_FakeGraph):
        body = None

        def replay(self):
            self.body() if self.body is not None else super().replay()

    for name in ("_fwd_body", "_bwd_body"):
        body = getattr(cgt.TrainingGraphs, name)

        def recording(self, g, body=body):
            if capturing:
                capturing[-1].body = lambda: body(self, g)
            return body(self, g)

        monkeypatch.setattr(cgt.TrainingGraphs, name, recording)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Fake)

    def can_graph(self, hidden_states):  # as on CUDA, minus the device tests
        return not self.model.gradient_checkpointing and not self._has_hooks_or_drop_path()

    monkeypatch.setattr(cgt.TrainingGraphs, "can_graph", can_graph)


def _train_model(family, extra=None):
    from packvit.attention import AttentionImpl
    from weights_conversion import FAMILIES
    from weights_conversion.reference import randomize_

    fam = FAMILIES[family]
    torch.manual_seed(0)
    model = fam.model_class(fam.config_class.from_name(DEFAULT_PRESETS[family], **TINY, **(extra or {})))
    with torch.no_grad():
        randomize_(model, seed=0, scale=0.05, constant_only=True)
    model.attention = AttentionImpl("fa4", "fa4", "cpu", torch.float32)  # the stand-in kernel
    return model.train()


def _step(m, px, grid, seed):
    """Forward, a loss that weighs every output row differently, backward; the outputs."""
    out = m(px, grid, return_dict=True)
    w = torch.randn(out.last_hidden_state.shape, generator=torch.Generator().manual_seed(seed))
    loss = (out.last_hidden_state * w).sum()
    if out.pooler_output is not None:
        loss = loss + out.pooler_output.square().sum()
    loss.backward()
    return out


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


TRAIN_GRIDS = [((1, 3, 5), (2, 2, 3)), ((1, 7, 9), (1, 4, 4), (3, 2, 2)), ((1, 16, 20), (1, 5, 7))]


@pytest.mark.parametrize("family, extra", [("siglip2", {}), ("dinov3", {}), ("aimv2", {"use_head": True})])
def test_training_graphs_on_cpu_equal_eager(train_graphs_on_cpu, family, extra):
    """Training through the graph pair (capture faked): outputs and every parameter's gradient (the
    patch embedding's through the graphs' input gradient, the pooling head's from their output)
    equal to eager training, over batches of other layouts served by one capture, with gradients
    accumulated over steps as eager accumulates them."""
    from packvit import cuda_graphs_training as cgt

    model = _train_model(family, extra)
    graphed = cuda_graphs.CudaGraphedViT(model, (256, 512), max_frames=8, pad_segment=64, training=True)
    for i, grid in enumerate(TRAIN_GRIDS):
        n = sum(t * h * w for t, h, w in grid)
        px = torch.randn(n, model.patch_dim, generator=torch.Generator().manual_seed(n))
        model.zero_grad(set_to_none=True)
        ref = _step(model, px, grid, i)
        ref_grads = _grads(model)
        model.zero_grad(set_to_none=True)
        out = _step(graphed, px, grid, i)
        grads = _grads(model)
        torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=1e-5)
        if model.num_prefix:
            torch.testing.assert_close(out.prefix_tokens, ref.prefix_tokens, atol=1e-5, rtol=1e-5)
        assert grads.keys() == ref_grads.keys() and "patch_embed.weight" in "".join(grads)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
        # .grad is autograd's own tensor, never the graphs' shared buffer (the next replay rewrites it).
        bufs = {b.data_ptr() for b in graphed.training_graphs._grad_buffers.values()}
        assert not bufs & {p.grad.data_ptr() for p in model.parameters() if p.grad is not None}
    assert graphed.replays == 3 and graphed.fallbacks == 0
    # One pair per (token bucket, frame bucket), as the inference graphs (3 frames -> 4, 5 -> 8, 2 -> 2).
    assert [k[:3] for k in graphed.training_graphs.keys()] == [(256, 4, True), (256, 8, True), (512, 2, True)]
    assert "training captured=[(256, 4), (256, 8), (512, 2)]" in repr(graphed)
    # Accumulation: two graphed steps without zero_grad give the two steps' sum, as eager.
    grid = TRAIN_GRIDS[0]
    px = torch.randn(27, model.patch_dim)
    model.zero_grad(set_to_none=True)
    _step(model, px, grid, 7), _step(model, px, grid, 8)
    ref_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    _step(graphed, px, grid, 7), _step(graphed, px, grid, 8)
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    assert isinstance(graphed.training_graphs, cgt.TrainingGraphs)


def test_training_graphs_pairs_and_fallbacks(train_graphs_on_cpu):
    """A graphed forward replays only when no graphed forward awaits its backward (they share one
    pool): a second forward before the first backward runs eagerly, and both backwards are right.
    A backward whose activations a later forward overwrote refuses to run. Freezing and unfreezing
    (LLaVA's own requires_grad_) recaptures with the gradients asked for; activation checkpointing,
    module hooks and eval mode run eagerly."""
    model = _train_model("dinov3")
    graphed = cuda_graphs.CudaGraphedViT(model, (256,), max_frames=8, pad_segment=64, training=True)
    grid_a, grid_b = ((1, 3, 5), (2, 2, 3)), ((1, 4, 6),)
    px_a, px_b = torch.randn(27, model.patch_dim), torch.randn(24, model.patch_dim)

    def loss(out, seed):
        return (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))).sum()

    model.zero_grad(set_to_none=True)
    (loss(model(px_a, grid_a), 0) + loss(model(px_b, grid_b), 1)).backward()
    ref = _grads(model)
    model.zero_grad(set_to_none=True)
    (loss(graphed(px_a, grid_a), 0) + loss(graphed(px_b, grid_b), 1)).backward()
    assert graphed.replays == 1 and graphed.fallbacks == 1  # b ran eagerly: a's backward was pending
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, ref[name], atol=1e-5, rtol=1e-4, msg=name)
    # The pending forward's graph dropped without a backward: the next forward replays again.
    out = graphed(px_a, grid_a)
    del out
    graphed(px_a, grid_a).sum().backward()
    assert graphed.replays == 3 and graphed.fallbacks == 1
    # retain_graph: a second backward after another graphed forward would read overwritten activations.
    first = graphed(px_a, grid_a).sum()
    first.backward(retain_graph=True)
    graphed(px_b, grid_b).sum().backward()
    with pytest.raises(RuntimeError, match="overwritten by a later graphed forward"):
        first.backward()
    # The backward graph differentiates stand-ins on the parameters' storage, not the parameters: a
    # parameter's gradient accumulator made outside the capture (a previous step's graph still held,
    # DDP's hooks) would make the capture wait on another stream, which invalidates it on the GPU.
    tg = graphed.training_graphs
    g = next(iter(tg._graphs.values()))
    tg._fwd_body(g)
    y, leaves = g.live
    g.live = None
    params = list(model.blocks.parameters()) + list(model.norm.parameters())
    assert len(leaves) == len(params) and all(leaf.is_leaf and leaf.requires_grad for leaf in leaves)
    assert all(leaf is not p and leaf.data_ptr() == p.data_ptr() for leaf, p in zip(leaves, params))
    # Freezing the blocks (the patch embedding still trains): recaptured, gradients only where asked.
    captures = graphed.training_graphs.captures
    model.blocks.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    graphed(px_a, grid_a).sum().backward()
    assert graphed.training_graphs.captures == captures + 1
    assert all(p.grad is None for p in model.blocks.parameters())
    assert model.patch_embed.weight.grad is not None
    model.requires_grad_(False)  # nothing trains: eager (no backward to capture)
    fallbacks = graphed.fallbacks
    assert not graphed(px_a, grid_a).requires_grad and graphed.fallbacks == fallbacks + 1
    model.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    graphed(px_a, grid_a).sum().backward()
    assert graphed.training_graphs.captures == captures + 2 and model.blocks[0].mlp.fc1.weight.grad is not None
    # The embedding frozen, the blocks training (x needs no gradient: no input gradient captured).
    model.requires_grad_(False)
    model.blocks.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    loss(model(px_a, grid_a), 2).backward()
    ref = _grads(model)
    model.zero_grad(set_to_none=True)
    loss(graphed(px_a, grid_a), 2).backward()
    assert [k[2] for k in graphed.training_graphs.keys()] == [False] and _grads(model).keys() == ref.keys()
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, ref[name], atol=1e-5, rtol=1e-4, msg=name)
    assert graphed.training_graphs._graphs[graphed.training_graphs.keys()[0]].grad_x is None
    model.requires_grad_(True)
    # Paths a replay cannot reproduce run eagerly.
    model.gradient_checkpointing = True
    graphed(px_a, grid_a).sum().backward()
    model.gradient_checkpointing = False
    handle = model.blocks[0].register_forward_hook(lambda mod, args, out: None)
    graphed(px_a, grid_a).sum().backward()
    handle.remove()
    handle = model.register_forward_pre_hook(lambda mod, args: None)  # as FSDP2's root all-gather
    graphed(px_a, grid_a).sum().backward()
    handle.remove()
    assert graphed.fallbacks == fallbacks + 4
    model.eval()
    with torch.no_grad():
        graphed(px_a, grid_a)  # an inference call: the inference graphs (not asked for in training)
    # Without training=True, training calls run eagerly.
    plain = cuda_graphs.CudaGraphedViT(model.train(), (256,), max_frames=8, pad_segment=64)
    plain(px_a, grid_a).sum().backward()
    assert plain.fallbacks == 1 and plain.replays == 0
