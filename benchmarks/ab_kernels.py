"""A/B timings behind packvit's kernel choices (issue 7), on the GPU:

1. ``attention``: the varlen attention kernels on the suite's segment mixes, per model's heads and
   head dim: PyTorch's FA2 kernel, and FA4's forward with FA4's backward or with PyTorch's FA2
   backward (``packvit.attention.FA4_BACKWARD``). Forward alone and forward + backward.
2. ``mlp``: SigLIP2's MLP matmuls on ``mixed32``'s tokens: plain, with the bias epilogue, with the
   bias + GELU epilogue, at the published width 4304 and padded to 4352.

    python benchmarks/ab_kernels.py [--section attention mlp]    # a markdown table per section
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from packvit import attention
from packvit.attention import available_backends, varlen_attention
from packvit.bench.timing import measure
from packvit.bench.workloads import get
from packvit.packing import build_meta

# (model, heads, head dim, patch size, prefix tokens per frame)
MODELS = (("siglip2", 16, 72, 16, 0), ("dinov3", 16, 64, 16, 5), ("aimv2", 8, 128, 14, 0))
DEV = torch.device("cuda")


def _ms(fn) -> float:
    return measure(fn, DEV, warmup=5, iters=20)["ms"]


def section_attention() -> None:
    have_fa4 = "fa4" in available_backends(DEV, torch.bfloat16)
    variants = ["torch"] + (["fa4 +fa4-bwd", "fa4 +fa2-bwd"] if have_fa4 else [])
    print("| model | workload | tokens | mean segment | " + " | ".join(f"{v} fwd / fwd+bwd ms" for v in variants) + " |")
    print("|---|---|---|---|" + "---|" * len(variants))
    for model, heads, dh, patch, prefix in MODELS:
        for wname in ("mixed32", "video", "highres", "fixed32_448"):
            meta = build_meta(get(wname, patch).grid, prefix, DEV)
            T = meta.num_tokens
            q, k, v = (torch.randn(T, heads, dh, device=DEV, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
            dout = torch.randn(T, heads, dh, device=DEV, dtype=torch.bfloat16)
            cells = []
            for variant in variants:
                backend = variant.split()[0]
                attention.FA4_BACKWARD = "fa2" if "fa2-bwd" in variant else "fa4"

                def fwd():
                    with torch.no_grad():
                        varlen_attention(q, k, v, meta.cu_seqlens, meta.cu_seqlens, meta.max_seqlen,
                                         meta.max_seqlen, backend=backend)

                def fwd_bwd():
                    o = varlen_attention(q, k, v, meta.cu_seqlens, meta.cu_seqlens, meta.max_seqlen,
                                         meta.max_seqlen, backend=backend)
                    torch.autograd.grad(o, (q, k, v), dout)

                cells.append(f"{_ms(fwd):.2f} / {_ms(fwd_bwd):.2f}")
            attention.FA4_BACKWARD = "auto"
            print(f"| {model} | {wname} | {T} | {T / meta.num_frames:.0f} | " + " | ".join(cells) + " |")


def section_mlp() -> None:
    T, D = get("mixed32", 16).num_patches, 1152
    x = torch.randn(T, D, device=DEV, dtype=torch.bfloat16) * 0.5
    print("| op | width 4304 ms | width 4352 ms |")
    print("|---|---|---|")
    rows = {}
    for width in (4304, 4352):
        w1 = torch.randn(width, D, device=DEV, dtype=torch.bfloat16) * 0.03
        b1 = torch.randn(width, device=DEV, dtype=torch.bfloat16) * 0.1
        w2 = torch.randn(D, width, device=DEV, dtype=torch.bfloat16) * 0.03
        b2 = torch.randn(D, device=DEV, dtype=torch.bfloat16) * 0.1
        h = torch.randn(T, width, device=DEV, dtype=torch.bfloat16)
        with torch.inference_mode():
            cases = {
                "fc1 plain matmul": lambda: x @ w1.t(),
                "fc1 + bias epilogue": lambda: F.linear(x, w1, b1),
                "fc1 + bias + GELU epilogue": lambda: torch._addmm_activation(b1, x, w1.t(), use_gelu=True),
                "fc1 + bias, then GELU kernel": lambda: F.gelu(F.linear(x, w1, b1), approximate="tanh"),
                "fc2 plain matmul": lambda: h @ w2.t(),
                "fc2 + bias epilogue": lambda: F.linear(h, w2, b2),
                "MLP, as packvit runs it": lambda: F.linear(torch._addmm_activation(b1, x, w1.t(), use_gelu=True), w2, b2),
            }
            for name, fn in cases.items():
                rows.setdefault(name, []).append(_ms(fn))
        w1.requires_grad_(), b1.requires_grad_(), w2.requires_grad_(), b2.requires_grad_()
        xg = x.clone().requires_grad_()

        def train():
            y = F.linear(F.gelu(F.linear(xg, w1, b1), approximate="tanh"), w2, b2)
            torch.autograd.grad(y, (xg, w1, b1, w2, b2), torch.ones_like(y))

        rows.setdefault("MLP forward + backward (eager)", []).append(_ms(train))
    for name, (a, b) in rows.items():
        print(f"| {name} | {a:.3f} | {b:.3f} |")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--section", nargs="+", default=["attention", "mlp"], choices=("attention", "mlp"))
    a = p.parse_args()
    print(torch.__version__, torch.cuda.get_device_name(), "backends:", available_backends(DEV, torch.bfloat16))
    for name in a.section:
        print(f"\n## {name}\n")
        {"attention": section_attention, "mlp": section_mlp}[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
