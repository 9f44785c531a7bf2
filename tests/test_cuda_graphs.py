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
