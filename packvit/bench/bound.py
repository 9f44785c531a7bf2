"""The "bound" the benchmark tables report beside each model: only the matmuls and the varlen attention kernel of one block on
the same packed tokens, timed, times the number of blocks. An implementation that does not fuse
matmuls cannot beat it; elementwise work (norms, activations, residuals, RoPE) is what separates
a real model from it."""

from __future__ import annotations

import torch

from ..attention import varlen_attention
from ..packing import build_meta
from .timing import measure
from .workloads import Workload


def bound_ms(
    model,
    workload: Workload,
    backend: str,
    train: bool,
    device: torch.device,
    dtype: torch.dtype,
    warmup: int = 10,
    iters: int = 30,
) -> float:
    fn = bound_layer_step(model, workload, backend, train, device, dtype)
    return measure(fn, device, warmup, iters)["ms"] * model.config.num_layers


def bound_layer_step(model, workload: Workload, backend: str, train: bool, device: torch.device, dtype: torch.dtype):
    """One block's matmuls and attention on the workload's packed tokens, as a callable (forward under
    inference_mode, or forward + backward); the bound is its time times the number of blocks."""
    c = model.config
    D, H = c.hidden_size, c.num_heads
    Dh = D // H
    mlp = model.blocks[0].mlp
    w1 = mlp.fc1.weight.shape[0]  # I, or 2I for SwiGLU's fused gate and up
    inter = mlp.fc2.weight.shape[1]
    meta = build_meta(workload.grid, model.num_prefix, device)
    T = meta.num_tokens
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=g, device=device) * 0.02).to(dtype).requires_grad_(train)

    x = rand(T, D)
    wqkv, wo, wfc1, wfc2 = rand(3 * D, D), rand(D, D), rand(w1, D), rand(D, inter)

    def layer():
        q, k, v = (x @ wqkv.t()).view(T, 3, H, Dh).unbind(1)
        o = varlen_attention(
            q,
            k,
            v,
            meta.cu_seqlens,
            meta.cu_seqlens,
            meta.max_seqlen,
            meta.max_seqlen,
            backend=backend,
            seqlens_q=meta.seqlens_cpu,
            seqlens_k=meta.seqlens_cpu,
        )
        y = o.reshape(T, D) @ wo.t()
        h = (y @ wfc1.t())[:, :inter]  # a gated MLP's product is elementwise: not counted
        return h @ wfc2.t()

    if train:

        def fn():
            for t in (x, wqkv, wo, wfc1, wfc2):
                t.grad = None
            layer().backward(torch.ones(T, D, device=device, dtype=dtype))
    else:

        def fn():
            with torch.inference_mode():
                layer()

    return fn
