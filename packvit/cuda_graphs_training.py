"""CUDA graphs for training: the blocks' forward and backward replayed from one graph pair per bucket.

    graphed = packvit.cuda_graphs.capture(model, training=True, lazy=True)
    graphed.train()
    loss = loss_fn(graphed(hidden_states, grid_thw))     # as model(...): same outputs
    loss.backward()                                      # the same .grad, accumulated as eager's

Why: an eager training step is about a thousand kernel launches and autograd nodes, each through
Python. At mixed32's 23k tokens bf16 keeps the GPU busy, but packvit's FP8 linears cost about ten host
ops a layer against bf16's three, and the FP8 step waits for the host: AIMv2 took 119.8 ms of wall
time for 85.4 ms of kernels, against bf16's 100.2 / 98.5 (H200, RESULTS.md "session 12"). Replayed,
the blocks cost two host calls a step.

How, as ``torch.cuda.make_graphed_callables`` does for a module, over the inference graphs' buckets
(``packvit.cuda_graphs``: T_b tokens, F_b frames, padding tokens in segments of their own):

* the embedding runs eagerly; its output x (T, D) is copied into the bucket's static input, whose
  T_b - T padding rows are zeroed, and DINOv3's RoPE tables likewise;
* the forward graph runs the blocks and the final norm; the backward graph, captured from
  ``torch.autograd.grad`` of that output, computes the gradients of x (when x requires one: a patch
  embedding being trained) and of every block and final-norm parameter that requires one, from a
  static output gradient whose padding rows are zero;
* an autograd Function replays them. Its forward returns the output's T real rows (a copy); its
  backward copies dy in, replays the backward graph and returns the gradients, which autograd then
  accumulates into ``.grad`` exactly as eager's (``zero_grad``, gradient accumulation, DDP's hooks and
  LLaVA's own freezing and unfreezing see no difference).

Exactness: the padding tokens' output gradient is zero and no op mixes tokens except attention, which
keeps them in their own segments, so their gradients stay exactly zero through every block and add
nothing to a weight gradient or a bias sum. The real tokens run the same kernels as eager, with T_b
rows in place of T (cuBLAS may tile the longer GEMMs differently: bf16 rounding). FP8 linears decide
FP8 or bf16 at T_b, the graph's row count.

Memory: all buckets share one memory pool and one set of static tensors (input, output, output
gradient, input gradient, one gradient buffer per parameter), so the graphs hold about one step's
activations at the largest bucket used plus one copy of the blocks' gradients. That sharing is safe
because a bucket's two graphs replay as a pair: a graphed forward runs only when no earlier graphed
forward still awaits its backward (else that call runs eagerly), and a backward refuses to run on
activations a later forward has overwritten (``retain_graph`` and a second backward after another
forward).

Runs eagerly (counted in ``fallbacks``) where a graph cannot reproduce eager training: activation
checkpointing, drop path (its per-frame masks), autocast (its weight-cast cache would be captured),
FSDP2 or any module hook in the blocks (hooks run Python per call, which a replay skips), a module
whose parameters require no gradient and an input that requires none (no backward to capture), and
the inference graphs' own limits (CPU, ``sdpa``, the largest bucket, ``max_frames``).
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from . import fp8
from .attention import AttentionImpl

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without torch.distributed: no sharded parameters
    DTensor = ()

if TYPE_CHECKING:
    from .cuda_graphs import CudaGraphedViT, _Graph


@dataclass
class _TrainGraph:
    """One bucket's graph pair and the static tensors it reads and writes."""

    base: "_Graph"  # the bucket's static input x (T_b, D), cu_seqlens, RoPE tables and metadata
    attn: AttentionImpl  # the model's, with the backward kernel this graph runs fixed
    x: torch.Tensor  # (T_b, D) the static input as the autograd leaf the backward graph differentiates
    params: tuple[nn.Parameter, ...]  # the parameters that get gradients, in the Function's argument order
    out: torch.Tensor  # (T_b, D) final-normed output, written by the forward graph
    grad_out: torch.Tensor  # (T_b, D) output gradient, read by the backward graph
    grad_x: torch.Tensor | None  # (T_b, D) input gradient, written by the backward graph (None: not asked)
    grads: tuple[torch.Tensor | None, ...] = ()  # per parameter: its shared gradient buffer, None if unused
    fwd: torch.cuda.CUDAGraph | None = None
    bwd: torch.cuda.CUDAGraph | None = None
    # While capturing: the forward body's output and the leaves its backward differentiates
    live: tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None = field(default=None, repr=False)


class _Body(nn.Module):
    """The blocks and the final norm of ``model`` as one module, for ``torch.func.functional_call``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, meta, rope, attn):
        m = self.model
        return m.norm(m.run_blocks(x, meta, rope, attn=attn)[0])


def warm_up(body, runs: int = 2) -> None:
    """Run ``body`` on a side stream before it is captured, as torch.cuda.graphs recommends: Triton
    and CuTe compile on first use and cuBLAS picks its algorithms, none of which a capture allows."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(runs):
            body()
    torch.cuda.current_stream().wait_stream(side)


class _Pending:
    """Held by the autograd context of a replayed forward: alive while its backward may still run."""


class TrainingGraphs:
    """The training graphs of a ``CudaGraphedViT`` (see the module docstring); it owns the buckets,
    the static input layout and the counters."""

    def __init__(self, owner: "CudaGraphedViT"):
        self.owner = weakref.proxy(owner)  # not a reference cycle: a dropped wrapper frees its graphs at once
        # (T_b, F_b, x needs grad, L_b, attention backward kernel) -> pair
        self._graphs: dict[tuple[int, int, bool, int, str | None], _TrainGraph] = {}
        self._body = _Body(owner.model)
        self._grad_buffers: dict[nn.Parameter, torch.Tensor] = {}
        self._pool = None
        self._key = None
        self._pending = None  # weakref to the _Pending of a replayed forward whose backward has not run
        self.generation = 0  # forward replays so far: a backward checks its activations are the latest
        self.captures = 0

    @property
    def model(self):
        return self.owner.model

    def __len__(self) -> int:
        return len(self._graphs)

    def keys(self):
        return sorted(self._graphs)

    # -- which calls a graph serves ---------------------------------------------------------------

    def can_graph(self, hidden_states: torch.Tensor) -> bool:
        """Whether a training call can replay graphs (the eager fallbacks of the module docstring)."""
        m = self.model
        if not (
            isinstance(hidden_states, torch.Tensor)
            and hidden_states.is_cuda
            and m.device.type == "cuda"
            and m.attn_backend != "sdpa"
            and not m.gradient_checkpointing
            and not torch.is_autocast_enabled("cuda")
            and not torch.compiler.is_compiling()
        ):
            return False
        return not self._has_hooks_or_drop_path()

    def _has_hooks_or_drop_path(self) -> bool:
        from torch.nn.modules import module as nn_module

        if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
            return True
        m = self.model
        # The model's own hooks too: the wrapper calls its parts, not its forward, so a hook there
        # (FSDP2's all-gather on a root-only fully_shard) would not run; and sharded parameters.
        if m._forward_hooks or m._forward_pre_hooks or isinstance(next(m.parameters()), DTensor):
            return True
        for mod in (*m.blocks, m.norm):
            if getattr(mod, "drop_path", None) is not None:
                return True
            for sub in mod.modules():
                if sub._forward_hooks or sub._forward_pre_hooks or sub._backward_hooks or sub._backward_pre_hooks:
                    return True
        return False

    def _params(self) -> tuple[nn.Parameter, ...]:
        m = self.model
        return tuple(p for mod in (m.blocks, m.norm) for p in mod.parameters() if p.requires_grad)

    def _state_key(self):
        # What a capture bakes in: the kernels chosen, the parameters by address (a move, a dtype
        # change or FSDP's resharding makes new ones) and which of them get gradients (LLaVA unfreezes
        # with requires_grad_), the FP8 linears and their training crossovers. Not the weights'
        # values or versions: the graphs read the parameters in place, as an optimizer updates them.
        m = self.model
        lins = [m.get_submodule(n) for n in m.fp8]
        return (
            m.attention,
            tuple(sorted(m.fused_kernels.items())),
            m.device,
            m.dtype,
            len(m.blocks),
            getattr(m, "chain_norms", None),
            tuple((p.data_ptr(), p.requires_grad) for mod in (m.blocks, m.norm) for p in mod.parameters()),
            (tuple(m.fp8), fp8.WGRAD, fp8.DGRAD, tuple(lin.min_tokens_train for lin in lins)),
        )

    def _check_state(self) -> None:
        key = self._state_key()
        if key != self._key:
            self._graphs.clear()
            self._grad_buffers.clear()
            self._pool = None
            self._key = key

    # -- the call ---------------------------------------------------------------------------------

    def run(self, x: torch.Tensor, rope, meta, tokens: int, frames: int) -> torch.Tensor | None:
        """The blocks and final norm of a training call on x (T, D) through bucket (tokens, frames),
        as an autograd op; None where the call must run eagerly (a graphed forward awaits its
        backward, or nothing needs a gradient)."""
        if self._pending is not None and self._pending() is not None:
            return None
        params = self._params()
        if not params and not x.requires_grad:
            return None
        from .cuda_graphs import pad_cu_seqlens  # (a module that imports this one)

        self._check_state()
        key = (tokens, frames, x.requires_grad, self.seqlen_bucket(meta.max_seqlen, tokens), self._bwd_kernel(meta))
        g = self._graphs.get(key)
        if g is None:
            g = self._graphs[key] = self._capture(*key, params)
        b = g.base
        T = x.shape[0]
        with torch.no_grad():
            g.x[:T].copy_(x)
            g.x[T:].zero_()  # padding rows: the same values every step (FP8's column scales see them)
            if b.rope is not None:
                b.rope[0][:T].copy_(rope[0])
                b.rope[1][:T].copy_(rope[1])
            pad_cu_seqlens(meta.cu_seqlens, T, b.steps, tokens, out=b.cu)
        return _Replay.apply(self, g, x, *g.params)

    def seqlen_bucket(self, max_seqlen: int, tokens: int) -> int:
        """L_b, the ``max_seqlen`` a graph passes its attention: the batch's longest frame rounded up
        to a power of two, at least a padding segment's length, at most T_b. Not T_b itself: FA2's
        backward (which FA4's rule picks for short frames) launches a grid of max_seqlen / 128 tiles
        for every segment slot, so a T_b bound turned mixed32's backward graph 40 ms slower (H200)."""
        return min(tokens, max(self.owner.pad_segment, 1 << (max(max_seqlen, 1) - 1).bit_length()))

    def _bwd_kernel(self, meta) -> str | None:
        # The attention backward eager would run for this batch, from its real tokens and frames (the
        # graph's segment slots include empty and padding ones, which would tilt FA4's rule to FA2).
        a = self.model.attention
        return a.fa4_backward.kernel_for(meta.num_tokens, meta.num_frames) if a.name == "fa4" else None

    # -- capture ----------------------------------------------------------------------------------

    def _shared(self, name: str, tokens: int) -> torch.Tensor:
        return self.owner._shared("train_" + name, (self.owner.buckets[-1], self.model.hidden_size), 0.0)[:tokens]

    def _grad_buffer(self, p: nn.Parameter) -> torch.Tensor:
        # One per parameter for all buckets: each backward graph copies its gradients in, and the
        # Function hands them to autograd, which adds them into .grad (or copies them: it takes a
        # tensor as .grad only when nothing else holds it, and this dict does).
        buf = self._grad_buffers.get(p)
        if buf is None:
            buf = self._grad_buffers[p] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        return buf

    def _capture(
        self, tokens: int, frames: int, x_grad: bool, seqlen: int, kernel: str | None, params: tuple[nn.Parameter, ...]
    ) -> _TrainGraph:
        base = self.owner._static(tokens, frames, prefix="train_")
        base.meta = dataclasses.replace(base.meta, max_seqlen=seqlen)
        attn = self.model.attention
        if kernel is not None:
            attn = dataclasses.replace(attn, fa4_backward=dataclasses.replace(attn.fa4_backward, kernel=kernel))
        g = _TrainGraph(
            base=base,
            attn=attn,
            x=base.x.detach().requires_grad_(x_grad),
            params=params,
            out=self._shared("out", tokens),
            grad_out=self._shared("dy", tokens),
            grad_x=self._shared("dx", tokens) if x_grad else None,
        )
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # The backward body differentiates with torch.autograd.grad: nothing reaches .grad.
        warm_up(lambda: (self._fwd_body(g), self._bwd_body(g)))
        # thread_local: other threads (a DataLoader's pin-memory thread) may keep calling CUDA meanwhile.
        g.fwd, g.bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(g.fwd, pool=self._pool, capture_error_mode="thread_local"):
            self._fwd_body(g)
        with torch.cuda.graph(g.bwd, pool=self._pool, capture_error_mode="thread_local"):
            self._bwd_body(g)
        self.captures += 1
        return g

    def _fwd_body(self, g: _TrainGraph) -> None:
        # The blocks run on stand-ins for the parameters: fresh leaves on the same storage (the graph
        # reads the parameters in place), whose gradients the backward graph computes. Not the
        # parameters themselves: autograd keeps one gradient-accumulator node per parameter alive for
        # as long as any graph that used it (a previous step's loss still held, DDP's hooks), and one
        # made outside the capture, on another stream, makes the backward's capture wait on that
        # stream, which invalidates it.
        b = g.base
        names = self._names()
        leaves = {n: p.detach().requires_grad_(p.requires_grad) for n, p in names.items()}
        with torch.enable_grad():
            y = torch.func.functional_call(self._body, leaves, (g.x, b.meta, b.rope, g.attn))  # (T_b, D)
        with torch.no_grad():
            g.out.copy_(y)  # into the shared output: the graph's own y goes back to the pool after capture
        wanted = {id(p) for p in g.params}
        g.live = y, tuple(leaves[n] for n, p in names.items() if id(p) in wanted)

    def _names(self) -> dict[str, nn.Parameter]:
        body = self._body
        return {
            n: p for mod in ("model.blocks", "model.norm") for n, p in body.get_submodule(mod).named_parameters(mod)
        }

    def _bwd_body(self, g: _TrainGraph) -> None:
        (y, leaves), g.live = g.live, None  # the autograd graph is freed by this backward, as a replay's would be
        inputs = ((g.x,) if g.grad_x is not None else ()) + leaves
        grads = torch.autograd.grad(y, inputs, g.grad_out, allow_unused=True)
        with torch.no_grad():
            if g.grad_x is not None:
                g.grad_x.copy_(grads[0])
                grads = grads[1:]
            bufs = tuple(None if d is None else self._grad_buffer(p) for p, d in zip(g.params, grads))
            pairs = [(buf, d) for buf, d in zip(bufs, grads) if d is not None]
            if pairs:
                torch._foreach_copy_([buf for buf, _ in pairs], [d for _, d in pairs])
        g.grads = bufs


class _Replay(torch.autograd.Function):
    """The blocks and final norm as one autograd op: forward and backward replay a bucket's graphs."""

    @staticmethod
    def forward(ctx, runner: TrainingGraphs, g: _TrainGraph, x: torch.Tensor, *params: torch.Tensor):
        g.fwd.replay()
        runner.generation += 1
        ctx.runner, ctx.g, ctx.tokens, ctx.generation = runner, g, x.shape[0], runner.generation
        ctx.pending = _Pending()
        runner._pending = weakref.ref(ctx.pending)
        return g.out[: x.shape[0]].clone()  # (T, D): the next replay overwrites the static output

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        runner, g, T = ctx.runner, ctx.g, ctx.tokens
        if ctx.generation != runner.generation:
            raise RuntimeError(
                "packvit CUDA graphs: this backward's activations were overwritten by a later graphed "
                "forward (a second backward through a retained graph after another forward); run such "
                "steps on the model itself"
            )
        g.grad_out[:T].copy_(dy)
        g.grad_out[T:].zero_()  # padding tokens get no gradient, so they add nothing to the weights'
        g.bwd.replay()
        runner._pending = None
        dx = g.grad_x[:T].clone() if g.grad_x is not None and ctx.needs_input_grad[2] else None
        return (None, None, dx, *g.grads)
