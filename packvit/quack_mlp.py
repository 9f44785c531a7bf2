"""The GELU MLP with its activation in the fc1 GEMM's epilogue, forward and backward, through
quack-kernels (Tri Dao's CuTe-DSL kernels; flash-attn-4 depends on it, so it is present wherever the
``fa4`` attention backend is).

    forward   (pre,) post = gemm_act(x, W1^T, b1, act)     one GEMM: bias and activation in the epilogue
              out = post @ W2^T + b2                        cuBLAS
    backward  dpre, post = gemm_dact(dout, W2, pre, act)    fc2's input gradient with act'(pre) applied,
                                                            and post recomputed, in one GEMM's epilogue
              dW2 = dout^T post, dW1 = dpre^T x, dx = dpre W1 (cuBLAS)

It saves x and pre for backward, not post: one (T, hidden) activation per block fewer than the
reference path (``layers.Mlp``), whose fc2 keeps post. Measured on the H200 at 23,103 tokens
(benchmarks/quack_gemm_act_probe.py, results/quack-gemm-act-probe-h200-2026-12-03.jsonl): DINOv3-L
fc1 + erf-GELU 0.294 ms against 0.383 (cuBLAS + the activation pass); SigLIP2 fc1 + gelu-tanh
0.299 ms against 0.341 (cuBLASLt's own GELU epilogue) and 0.424 unfused; the backward's
dgrad + activation derivative 0.457 / 0.385 ms against 0.540 / 0.568.

quack fingerprints an epilogue by its source and the globals it reaches, treating code installed
under ``site-packages`` / ``dist-packages`` as pinned by its version (``quack/gemm_runtime/identity.py``).
Imported from elsewhere (an unpacked bundle on ``PYTHONPATH``), the fingerprint walks into the CUTLASS
DSL's module globals and fails with ``TypeError: epilogue fn depends on <ContextVar name='_LOC_TRANSFORMS'>``
(seen with quack 0.6.5 / nvidia-cutlass-dsl 4.8.1 unpacked from a bundle: a path problem, not a version one).
``available()`` runs one tiny ``gemm_act`` and reports False on any failure, so such an install
falls back to the reference MLP.

Only where fc1 and fc2 compute as plain ``nn.Linear`` (an FP8 linear at or above its crossover keeps
its own path: ``fp8.runs_plain``), CUDA, fp16/bf16, and eagerly: under ``torch.compile`` the MLP
takes the reference ops (inductor fuses the activation into a pointwise kernel there).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import fp8

# packvit's activation names -> quack's
ACTIVATIONS = {"gelu": "gelu_erf", "gelu_pytorch_tanh": "gelu_tanh_approx"}


@functools.cache
def available() -> bool:
    """quack imports, and its ``gemm_act`` runs here (one tiny call on the current CUDA device)."""
    try:
        from quack.gemm_interface import gemm_act

        if not torch.cuda.is_available():
            return False
        x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
        gemm_act(x, x.T, activation="gelu_erf", store_preact=False, tuned=False)
        return True
    except Exception:  # not installed, no GPU, or the failure the module docstring describes
        return False


def applies(mlp: nn.Module, x: torch.Tensor) -> bool:
    return (
        x.shape[0] >= mlp.tuning.quack_min_tokens  # see layers.Tuning
        and fp8.runs_plain(mlp.fc1, x.shape[0])
        and fp8.runs_plain(mlp.fc2, x.shape[0])
        and mlp.fc1.bias is not None
        and x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16)
        and x.dtype == mlp.fc1.weight.dtype
        and not torch.compiler.is_compiling()
    )


class _GeluMlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, act):
        from quack.gemm_interface import gemm_act

        pre, post = gemm_act(x, w1.T, bias=b1, activation=act, store_preact=True, tuned=False)  # (T, H) each
        out = F.linear(post, w2, b2)  # (T, D)
        ctx.save_for_backward(x, w1, w2, pre)
        ctx.act, ctx.has_b2 = act, b2 is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        from quack.gemm_interface import gemm_dact

        x, w1, w2, pre = ctx.saved_tensors
        dout = dout.contiguous()
        dpre, post = gemm_dact(dout, w2, pre, activation=ctx.act, tuned=False)  # (T, H) each
        dw2 = dout.t() @ post
        db2 = dout.sum(0) if ctx.has_b2 else None
        dw1 = dpre.t() @ x
        db1 = dpre.sum(0)
        dx = dpre @ w1
        return dx, dw1, db1, dw2, db2, None


def gelu_mlp(mlp: nn.Module, x: torch.Tensor, act: str) -> torch.Tensor:
    """fc2(act(fc1(x))) of ``layers.Mlp`` through quack; x (T, D) -> (T, D)."""
    fc1, fc2 = mlp.fc1, mlp.fc2
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in mlp.parameters())):
        return _GeluMlp.apply(x.contiguous(), fc1.weight, fc1.bias, fc2.weight, fc2.bias, ACTIVATIONS[act])
    from quack.gemm_interface import gemm_act

    _, post = gemm_act(
        x.contiguous(), fc1.weight.T, bias=fc1.bias, activation=ACTIVATIONS[act], store_preact=False, tuned=False
    )
    return F.linear(post, fc2.weight, fc2.bias)
