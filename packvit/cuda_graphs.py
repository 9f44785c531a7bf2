"""CUDA graphs for the inference forward, over a few token-budget buckets.

    graphed = packvit.cuda_graphs.capture(model, max_tokens=32768)   # captures every bucket now
    with torch.inference_mode():
        out = graphed(hidden_states, grid_thw)                         # as model(hidden_states, grid_thw)

Why: an eager forward is a few hundred kernel launches, each through Python (FA4's CuTe launch path
alone costs about 1.5 ms of host time a call on the H200); on a small batch the GPU waits for the host.
A CUDA graph replays the whole blocks + final norm from one host call.

How, as vLLM does for its vision encoders: a graph is captured per bucket of ``T_b`` tokens and
``F_b`` frames (``S_b`` attention segments: F_b plus room for the padding), on static buffers. A
batch of T <= T_b tokens and F <= F_b frames is run by the smallest buckets that hold it:

* the embedding (patch matmul, position tables, prefix tokens) runs eagerly, as per-batch tables do;
  its (T, D) output is copied into the static (T_b, D) input; DINOv3's RoPE cos/sin likewise;
* the T_b - T padding tokens form segments of their own (at most ``pad_segment`` tokens each, so the
  attention spent on them stays small), never mixed with a real frame: every op in a block is
  per-token except attention, which is per segment, so real tokens see exactly what eager sees;
* ``cu_seqlens`` is padded to the bucket's S_b segments with empty ones (the last offset repeated);
  ``max_seqlen`` is T_b for the bucket (FlashAttention-4 uses it only as a hint: its varlen grid
  is sized from the total tokens and the segment count);
* the frame buckets are powers of two up to ``max_frames``, because FlashAttention-4 pays for every
  segment slot, empty or not: its varlen grid has about one tile per segment per head beyond the
  tokens' own, and each tile finds its segment by a scan over all of them. With one frame bucket of
  128 (+ 12 padding segments) for mixed32's 32 frames, its attention took 8.63 ms of a DINOv3 FP8
  forward replayed against 6.87 eager (H200, 2026-12-03, RESULTS.md). Each (T_b, F_b) pair is
  captured on its first use (``capture(frames=...)`` captures pairs ahead);
* the graph's outputs are sliced to the batch and copied out (a replay overwrites them).

Training calls (``model.train()`` and autograd on) replay a forward and a backward graph per bucket
when captured with ``training=True`` (``packvit.cuda_graphs_training``), and run eagerly otherwise.

Falls back to the model's eager forward (same results) when a graph cannot serve the call: on the
CPU or the ``sdpa`` reference attention, above the largest bucket or with more frames than
``max_frames``, or when ``output_layers`` asks for hidden states other than a truncated tower's
last one. If the model's attention backend, fused kernels, device or
dtype change after capture, the graphs are dropped and captured again on their next use; so do FP8
changes (``set_fp8``, and an FP8 linear's weight changed in place: a graph holds its e4m3 copy).

Results: real tokens get the same kernels as eager on the same values, except that the matmuls run
with T_b rows instead of T (cuBLAS may pick another tiling, so outputs agree to bf16 rounding, and
bitwise when T is a bucket size; the H200 run found them bitwise equal at every size tried). All
graphs share one memory pool (those captured ahead, largest first; a frame bucket captured on first
use reuses what the pool holds where it can) and one input, output and RoPE buffer sized for the
largest bucket, so they hold about one forward's activations at the largest bucket.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from . import fp8
from .cuda_graphs_training import TrainingGraphs, warm_up
from .models.base import PackedBatch, PackedVisionOutput, PackedViT
from .packing import PackedMeta

# Above about 16k tokens the eager forward keeps the GPU busy (its ~15 ms of host time per forward
# hides behind the kernels) and a graph only adds its padding: measured on the H200, RESULTS.md.
DEFAULT_MAX_TOKENS = 16384
DEFAULT_STEP = 1.125
DEFAULT_MIN_TOKENS = 1024
DEFAULT_MAX_FRAMES = 128
PAD_SEGMENT = 256  # longest padding segment: attention over padding costs T_pad * 256 at most


def token_buckets(
    max_tokens: int = DEFAULT_MAX_TOKENS,
    min_tokens: int = DEFAULT_MIN_TOKENS,
    step: float = DEFAULT_STEP,
    multiple: int = 256,
) -> tuple[int, ...]:
    """Bucket sizes from ``min_tokens`` to ``max_tokens``, each ``step`` times the last, rounded up
    to ``multiple``: with 1.125 a batch pads by at most 12.5% (6% on average)."""
    if max_tokens < 1 or min_tokens < 1 or step <= 1.0 or multiple < 1:
        raise ValueError(
            f"token_buckets needs max_tokens, min_tokens, multiple >= 1 and step > 1, got "
            f"{max_tokens}, {min_tokens}, {multiple}, {step}"
        )
    out: list[int] = []
    t = float(min(min_tokens, max_tokens))
    while True:
        b = min(-(-math.ceil(t) // multiple) * multiple, -(-max_tokens // multiple) * multiple)
        if not out or b > out[-1]:
            out.append(b)
        if b >= max_tokens:
            return tuple(out)
        t *= step


def frame_buckets(max_frames: int = DEFAULT_MAX_FRAMES) -> tuple[int, ...]:
    """Frame buckets: the powers of two below ``max_frames``, then ``max_frames`` (1, 2, 4, ..., 128):
    a batch's segment slots are at most twice its frames (plus its padding segments)."""
    if max_frames < 1:
        raise ValueError(f"frame_buckets needs max_frames >= 1, got {max_frames}")
    return tuple(1 << i for i in range((max_frames - 1).bit_length()) if 1 << i < max_frames) + (max_frames,)


def pad_cu_seqlens(
    cu: torch.Tensor, num_tokens: int, steps: torch.Tensor, tokens: int, out: torch.Tensor
) -> torch.Tensor:
    """Write into ``out`` (S_b + 1,) the batch's F + 1 offsets ``cu``, then the ends of padding
    segments ``num_tokens + steps`` up to ``tokens`` (T_b), then T_b repeated (empty segments).
    ``steps`` (S_b,) is ``pad_segment * (1, 2, ...)``. Two small device ops, no host-to-device copy."""
    F = cu.shape[0] - 1
    out[: F + 1].copy_(cu)
    torch.clamp(steps[: out.shape[0] - 1 - F] + num_tokens, max=tokens, out=out[F + 1 :])
    return out


@dataclass
class _Graph:
    """One bucket: its CUDA graph and the static tensors the graph reads and writes."""

    tokens: int  # T_b
    frames: int  # F_b
    segments: int  # S_b
    x: torch.Tensor  # (T_b, D) input: the embedding's output, copied in
    cu: torch.Tensor  # (S_b + 1,) int32 cu_seqlens, padded
    steps: torch.Tensor  # (S_b,) int32: PAD_SEGMENT * (1, 2, ...), the padding segments' ends past T
    rope: tuple[torch.Tensor, torch.Tensor] | None  # (T_b, Dh) cos and sin, or None
    meta: PackedMeta  # the bucket's metadata, over the static tensors
    graph: torch.cuda.CUDAGraph | None = None
    out: torch.Tensor | None = None  # (T_b, D) final-normed tokens (the last block's output if truncated)


class CudaGraphedViT(nn.Module):
    """A ``PackedViT`` whose inference forward replays CUDA graphs (see the module docstring).

    Called like the model; attributes it does not have are read from the model (``config``,
    ``prepare``, ``hidden_size``...). ``graphed.model`` is the model itself."""

    def __init__(
        self,
        model: PackedViT,
        buckets: Sequence[int],
        max_frames: int = DEFAULT_MAX_FRAMES,
        pad_segment: int = PAD_SEGMENT,
        frames: Sequence[int] | None = None,
        training: bool = False,
    ):
        super().__init__()
        if not isinstance(model, PackedViT):
            raise TypeError(f"model must be a packvit PackedViT, got {type(model).__name__}")
        buckets = tuple(sorted(set(int(b) for b in buckets)))
        if not buckets or buckets[0] < 1:
            raise ValueError(f"buckets must be positive token counts, got {buckets!r}")
        if max_frames < 1 or pad_segment < 1:
            raise ValueError(f"max_frames and pad_segment must be >= 1, got {max_frames}, {pad_segment}")
        frames = tuple(sorted(set(int(f) for f in frames))) if frames is not None else frame_buckets(max_frames)
        if not frames or frames[0] < 1 or frames[-1] != max_frames:
            raise ValueError(f"frames must be frame counts >= 1 ending at max_frames={max_frames}, got {frames!r}")
        self.model = model
        self.buckets = buckets
        self.max_frames = max_frames
        self.frames = frames
        self.pad_segment = pad_segment
        self._graphs: dict[tuple[int, int], _Graph] = {}  # (T_b, F_b) -> graph
        self._buffers: dict[str, torch.Tensor] = {}
        self._pool = None
        self._key = None
        self._fp8_modules: tuple[tuple[str, ...], list[nn.Module]] = ((), [])
        # Training calls (model.train(), autograd on) replay graph pairs too (``cuda_graphs_training``)
        self.training_graphs = TrainingGraphs(self) if training else None
        self.replays = 0  # forwards served by a graph
        self.fallbacks = 0  # forwards run eagerly

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)

    def extra_repr(self) -> str:
        s = (
            f"cuda_graphs: buckets={list(self.buckets)} tokens, frames={list(self.frames)}, "
            f"captured={sorted(self._graphs)}"
        )
        if self.training_graphs is not None:
            s += f", training captured={sorted({k[:2] for k in self.training_graphs.keys()})}"
        return s

    # -- which calls a graph serves ---------------------------------------------------------------

    def _state_key(self):
        m = self.model
        p = next(m.parameters())
        return (
            m.attention,
            tuple(sorted(m.fused_kernels.items())),
            p.device,
            p.dtype,
            p.data_ptr(),
            len(m.blocks),
            self._fp8_state(),
        )

    def _fp8_state(self) -> tuple:
        # A graph holds the FP8 linears' cached e4m3 weights by address, and whether each runs FP8
        # at its bucket. So ``set_fp8``, a crossover change, or a weight changed in place (its
        # version counter: an optimizer step, ``copy_``, ``load_state_dict``), which makes eager
        # quantise afresh and free the old copy, must drop the graphs, as a new backend does.
        names = tuple(self.model.fp8)
        if not names:
            return ()
        if self._fp8_modules[0] != names:
            self._fp8_modules = (names, [self.model.get_submodule(n) for n in names])
        return (names, fp8.FUSE_INPUT_QUANT) + tuple(
            (lin.min_tokens, lin.weight.data_ptr(), None if lin.weight.is_inference() else lin.weight._version)
            for lin in self._fp8_modules[1]
        )

    def can_graph(self, hidden_states: torch.Tensor) -> bool:
        m = self.model
        return (
            isinstance(hidden_states, torch.Tensor)
            and hidden_states.is_cuda
            and not m.training
            and not torch.is_grad_enabled()
            and m.attn_backend != "sdpa"
            and m.device.type == "cuda"
        )

    def segments_for(self, tokens: int, frames: int | None = None) -> int:
        """S_b of a bucket: ``frames`` (default ``max_frames``) real segments plus the padding
        segments it can need."""
        i = self.buckets.index(tokens)
        most_padding = tokens - (self.buckets[i - 1] + 1 if i else 1)
        return (self.max_frames if frames is None else frames) + max(1, -(-most_padding // self.pad_segment))

    def bucket_for(self, num_tokens: int, num_frames: int) -> int | None:
        """T_b of a batch: the smallest token bucket that holds it (None: none, or too many frames)."""
        if num_frames > self.max_frames:
            return None
        return next((b for b in self.buckets if b >= num_tokens), None)

    def frames_for(self, num_frames: int) -> int | None:
        """F_b of a batch: the smallest frame bucket that holds its frames (None: more than max_frames)."""
        return next((f for f in self.frames if f >= num_frames), None)

    # -- capture ----------------------------------------------------------------------------------

    def capture(self, buckets: Sequence[int] | None = None, frames: Sequence[int] | None = None) -> "CudaGraphedViT":
        """Capture the graphs of ``buckets`` (default: all) x ``frames`` (frame buckets; default
        ``max_frames`` alone, which serves every batch) now, largest first (they share one pool).
        A pair not captured here is captured on its first use."""
        self._check_state()
        frames = (self.max_frames,) if frames is None else frames
        for f in frames:
            if f not in self.frames:
                raise ValueError(f"{f} is not one of this model's frame buckets {list(self.frames)}")
        for b in sorted(buckets or self.buckets, reverse=True):
            if b not in self.buckets:
                raise ValueError(f"{b} is not one of this model's buckets {list(self.buckets)}")
            for f in sorted(frames, reverse=True):
                if (b, f) not in self._graphs:
                    self._graphs[(b, f)] = self._capture_one(b, f)
        return self

    def _check_state(self) -> None:
        key = self._state_key()
        if key != self._key:
            self._graphs.clear()
            self._buffers.clear()
            self._pool = None
            self._key = key

    def _shared(self, name: str, shape: tuple[int, ...], fill: float) -> torch.Tensor:
        # One input, output and RoPE buffer for all buckets, sized for the largest: bucket b's graph
        # reads and writes its first T_b rows. Replays never overlap, and each copies its result out.
        m = self.model
        t = self._buffers.get(name)
        if t is None:
            t = self._buffers[name] = torch.full(shape, fill, device=m.device, dtype=m.dtype)
        return t

    def _static(self, tokens: int, frames: int, prefix: str = "") -> _Graph:
        m, dev = self.model, self.model.device
        S = self.segments_for(tokens, frames)
        D, P = m.hidden_size, m.num_prefix
        T_max = self.buckets[-1]
        # A capture-time layout: every segment the same length (the values are read at replay).
        lens = [tokens // S + (i < tokens % S) for i in range(S)]
        cu = torch.tensor([0] + lens, dtype=torch.int64).cumsum(0).to(torch.int32).to(dev)
        rope = None
        if m.uses_rope:
            dh = D // m.config.num_heads
            rope = (
                self._shared(prefix + "cos", (T_max, dh), 1.0)[:tokens],
                self._shared(prefix + "sin", (T_max, dh), 0.0)[:tokens],
            )
        meta = PackedMeta(
            grid=(),
            num_prefix=P,
            seqlens=tuple(lens),
            cu_seqlens=cu,
            max_seqlen=tokens,
            num_frames=S,
            seqlens_cpu=torch.tensor(lens, dtype=torch.long),
            frame_hw=(),
            num_patches=tokens - S * P,
            patch_index=None,
            prefix_index=None,
            cu_frames=torch.arange(S + 1, dtype=torch.int32, device=dev),
            frame_of_token=torch.zeros(tokens, dtype=torch.long, device=dev),
        )
        steps = torch.arange(1, S + 1, dtype=torch.int32, device=dev) * self.pad_segment
        return _Graph(tokens, frames, S, self._shared(prefix + "x", (T_max, D), 0.0)[:tokens], cu, steps, rope, meta)

    def _body(self, g: _Graph):
        m = self.model
        x = m.norm(m.run_blocks(g.x, g.meta, g.rope)[0])  # the blocks (chained where the model chains) + norm
        # Into the shared output buffer: the graph's own (T_b, D) result goes back to the pool once
        # captured, for the next capture to reuse.
        out = self._shared("out", (self.buckets[-1], x.shape[1]), 0.0)[: g.tokens]
        out.copy_(x)
        return out

    def _capture_one(self, tokens: int, frames: int) -> _Graph:
        was_training = self.model.training
        self.model.eval()  # a graph serves only eval-mode calls: capture that path
        try:
            return self._capture_eval(tokens, frames)
        finally:
            self.model.train(was_training)

    def _capture_eval(self, tokens: int, frames: int) -> _Graph:
        with torch.inference_mode(False), torch.no_grad():
            g = self._static(tokens, frames)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            warm_up(lambda: self._body(g))
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                g.out = self._body(g)
            g.graph = graph
        return g

    # -- forward ----------------------------------------------------------------------------------

    def forward(
        self,
        hidden_states: torch.Tensor,
        grid_thw: torch.Tensor | Sequence[Sequence[int]] | PackedBatch,
        *,
        output_layers: Sequence[int] | None = None,
        return_dict: bool = False,
    ) -> torch.Tensor | PackedVisionOutput:
        m = self.model
        train = m.training and torch.is_grad_enabled()
        if train:
            if self.training_graphs is None or not self.training_graphs.can_graph(hidden_states):
                return self._eager(hidden_states, grid_thw, output_layers, return_dict)
        elif not self.can_graph(hidden_states):
            return self._eager(hidden_states, grid_thw, output_layers, return_dict)
        want = m._layer_indices(output_layers)
        n = len(m.blocks)
        # A truncated tower's last hidden state is its output (its final norm is the identity).
        if want - ({n} if m.truncated else set()):
            return self._eager(hidden_states, grid_thw, output_layers, return_dict)
        batch = m._checked_batch(hidden_states, grid_thw)  # the model's own checks and errors
        meta = batch.meta
        if meta is None:
            return self._eager(hidden_states, batch, output_layers, return_dict)
        T, F = meta.num_tokens, meta.num_frames
        tokens, frames = self.bucket_for(T, F), self.frames_for(F)
        if tokens is None or frames is None:
            return self._eager(hidden_states, batch, output_layers, return_dict)
        if train:
            return self._train_forward(
                hidden_states, batch, want, tokens, frames, return_dict or output_layers is not None
            )
        self._check_state()
        if (tokens, frames) not in self._graphs:
            self.capture([tokens], [frames])
        g = self._graphs[(tokens, frames)]

        x, rope = m.embed(hidden_states.to(m.dtype), meta, batch.tables)  # (T, D)
        g.x[:T].copy_(x)
        if g.rope is not None:
            g.rope[0][:T].copy_(rope[0])
            g.rope[1][:T].copy_(rope[1])
        pad_cu_seqlens(meta.cu_seqlens, T, g.steps, tokens, out=g.cu)
        g.graph.replay()
        self.replays += 1

        x = g.out[:T].clone()  # (T, D) final-normed (a truncated tower's last hidden state)
        layers = {n: x} if want else {}
        # The pooled output, where asked for, is pooled from x eagerly, as the model does: in the graph
        # SigLIP2's MAP head (AIMv2's attention pool) would run on every call, asked for or not, over
        # all S_b segments.
        return m.assemble_outputs(x, meta, layers, return_dict or output_layers is not None)

    def _train_forward(self, hidden_states, batch, want, tokens, frames, rich):
        m, meta = self.model, batch.meta
        x, rope = m.embed(hidden_states.to(m.dtype), meta, batch.tables)  # (T, D)
        y = self.training_graphs.run(x, rope, meta, tokens, frames)  # (T, D) final-normed, or None
        if y is None:  # a graphed forward still awaits its backward, or nothing needs a gradient
            self.fallbacks += 1
            y = m.norm(m.run_blocks(x, meta, rope)[0])
        else:
            self.replays += 1
        return m.assemble_outputs(y, meta, {len(m.blocks): y} if want else {}, rich)

    def _eager(self, hidden_states, grid_thw, output_layers, return_dict):
        self.fallbacks += 1
        return self.model(hidden_states, grid_thw, output_layers=output_layers, return_dict=return_dict)


def capture(
    model: PackedViT,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    buckets: Sequence[int] | None = None,
    max_frames: int = DEFAULT_MAX_FRAMES,
    pad_segment: int = PAD_SEGMENT,
    frames: Sequence[int] | None = None,
    lazy: bool = False,
    training: bool = False,
) -> CudaGraphedViT:
    """Wrap ``model`` (on CUDA, in eval mode, attention other than ``sdpa``) so that its inference
    forward replays CUDA graphs; see the module docstring.

    ``buckets``: token counts to capture (default ``token_buckets(max_tokens)``: 1024 up to
    ``max_tokens`` in steps of 1.125x); ``max_frames``: the most frames (attention segments) a batch
    may have to use a graph; ``frames``: the frame buckets (default ``frame_buckets(max_frames)``:
    1, 2, 4, ... max_frames). Captured now: every token bucket with ``max_frames`` frames, which
    serves any batch; a batch of fewer frames gets the graph of its own (tighter) frame bucket,
    captured on its first use. ``lazy``: capture everything on first use instead (a capture costs
    about three forwards of that size). ``training``: training calls replay graphs too, a forward and
    backward pair per bucket captured on its first use (``packvit.cuda_graphs_training``); with
    ``lazy=True`` no inference graph is captured ahead."""
    graphed = CudaGraphedViT(model, buckets or token_buckets(max_tokens), max_frames, pad_segment, frames, training)
    if not lazy:
        if model.device.type != "cuda" or model.attn_backend == "sdpa":
            raise ValueError(
                f"CUDA graphs need the model on a CUDA device with a fused attention backend; it is on "
                f"{model.device} with {model.attn_backend!r} (pass lazy=True to wrap it anyway: every "
                "call then runs eagerly)"
            )
        graphed.capture()
    return graphed
