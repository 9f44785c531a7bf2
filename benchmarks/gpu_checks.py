"""GPU correctness checks that are not timings (the fused attention backends and the real-size models):

1. every fused attention backend against the fp32 per-segment reference, forward and backward,
   at head dims 64, 72 (SigLIP2), 80, 96 and 128, on 32 mixed-length segments; FA4's forward with
   either backward kernel, and its LSE layout, which the FA2 backward reads;
2. a real-size forward and training step of each family under
   ``torch.cuda.set_sync_debug_mode("error")``: no host sync anywhere in the forward or backward,
   also on a batch of shapes not seen before (tables built in the step) with the loss scaled by
   ``packvit.distributed.loss_scale``;
3. regionally compiled blocks on batches of different sizes: how many graphs dynamo built.

    python benchmarks/gpu_checks.py [--tiny]      # prints a short table per section
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch._dynamo.utils as dynamo_utils

from packvit import attention
from packvit.attention import FA4Backward, available_backends, resolve_attention, varlen_attention
from packvit.bench.models import build_pair
from packvit.bench.workloads import mixed32


def kernels(device) -> bool:
    ok = True
    g = torch.Generator(device="cpu").manual_seed(0)
    lens = torch.randint(64, 2305, (32,), generator=g).tolist()
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    print("| backend | head dim | out max err | dq max err | dk max err | dv max err | (relative to max |ref|) |")
    print("|---|---|---|---|---|---|---|")
    for heads, dh in ((16, 64), (16, 72), (16, 80), (12, 96), (8, 128)):
        q, k, v = (torch.randn(sum(lens), heads, dh, generator=g).to(device) for _ in range(3))
        dout = torch.randn(sum(lens), heads, dh, generator=g).to(device)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = varlen_attention(*leaves, cu, cu, max(lens), max(lens), backend="sdpa", seqlens_q=lens, seqlens_k=lens)
        ref.backward(dout)
        refs = [ref.detach()] + [t.grad for t in leaves]
        variants = [b for b in available_backends(device, torch.bfloat16) if b not in ("sdpa", "fa4")]
        if "fa4" in available_backends(device, torch.bfloat16):
            # FA4's forward with each backward kernel packvit may pick (attention.FA4Backward).
            variants += ["fa4 +fa4-bwd", "fa4 +fa2-bwd"] + (
                ["fa4 +fa4-bwd unpadded"] if dh not in (64, 96, 128) else []
            )
        for backend in variants:
            rule = FA4Backward(
                kernel="fa2" if "fa2-bwd" in backend else "fa4",
                head_dims=(dh,) if backend.endswith("unpadded") else FA4Backward.head_dims,
            )
            impl = resolve_attention(backend.split()[0], device, torch.bfloat16, fa4_backward=rule)
            lv = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
            out = varlen_attention(*lv, cu, cu, max(lens), max(lens), backend=impl)
            out.backward(dout.to(torch.bfloat16))
            errs = [
                ((a.float() - b).abs().max() / b.abs().max()).item() for a, b in zip([out] + [t.grad for t in lv], refs)
            ]
            good = all(e < 2e-2 for e in errs)
            ok &= good or backend.endswith("unpadded")  # documents the kernel bug the padding avoids
            print(f"| {backend} | {dh} | " + " | ".join(f"{e:.1e}" for e in errs) + f" | {'ok' if good else 'FAIL'} |")
        if "fa4" in available_backends(device, torch.bfloat16):
            ok &= _lse_check(q, k, v, cu, lens)
    # The fused bias + tanh-GELU epilogue of SigLIP2's MLP (inference only) must be the tanh GELU.
    x = torch.randn(4096, 1152, device=device, dtype=torch.bfloat16)
    w = torch.randn(4304, 1152, device=device, dtype=torch.bfloat16) * 0.03
    b = torch.randn(4304, device=device, dtype=torch.bfloat16)
    fused = torch._addmm_activation(b, x, w.t(), use_gelu=True).float()
    pre = torch.nn.functional.linear(x.float(), w.float(), b.float())
    e_tanh = (fused - torch.nn.functional.gelu(pre, approximate="tanh")).abs().max().item()
    e_erf = (fused - torch.nn.functional.gelu(pre)).abs().max().item()
    print(f"\nfused addmm+GELU epilogue vs fp32: tanh GELU {e_tanh:.2e}, erf GELU {e_erf:.2e}")
    ok &= e_tanh < e_erf
    return ok


def _lse_check(q, k, v, cu, lens) -> bool:
    """FA4's forward LSE is what PyTorch's FA2 backward reads: (H, T), natural log, per segment."""
    qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
    scale = q.shape[-1] ** -0.5
    rule = FA4Backward()
    _, lse = attention._fa4_fwd_op(
        qb, kb, vb, cu, cu, max(lens), max(lens), scale, rule.kernel, rule.min_mean_seqlen, list(rule.head_dims)
    )  # (H, T)
    ref = torch.cat(
        [
            (torch.einsum("qhd,khd->hqk", qs.float(), ks.float()) * scale).logsumexp(-1)  # (H, L)
            for qs, ks in zip(qb.split(lens), kb.split(lens))
        ],
        dim=1,
    )
    if lse.shape != ref.shape:
        print(
            f"| fa4 forward LSE | {q.shape[-1]} | shape {tuple(lse.shape)}, expected (H, T) {tuple(ref.shape)} | | | | FAIL |"
        )
        return False
    err = (lse - ref).abs().max().item()
    print(
        f"| fa4 forward LSE, (H, T) natural log | {q.shape[-1]} | max abs err {err:.1e} | | | | {'ok' if err < 5e-2 else 'FAIL'} |"
    )
    return err < 5e-2


def no_sync(device, tiny) -> bool:
    ok = True
    from packvit.distributed import loss_scale

    print("\n| model | backend | forward | training step | new shapes, token-count loss |")
    print("|---|---|---|---|---|")
    for family in ("siglip2", "dinov3", "aimv2"):
        hf, pv = build_pair(family, None, device, torch.bfloat16, "torch", tiny=tiny)
        del hf
        wl = mixed32(pv.config.patch_size)
        x = torch.randn(wl.num_patches, pv.patch_dim, device=device, dtype=torch.bfloat16)
        grid = torch.tensor(wl.grid)
        for i, backend in enumerate(available_backends(device, torch.bfloat16)):
            if backend == "sdpa":
                continue
            new_grid = grid[:, [0, 2, 1]] + torch.tensor([0, 1 + i, 0])  # transposed, taller: not cached yet
            x_new = torch.randn(int(new_grid.prod(1).sum()), pv.patch_dim, device=device, dtype=torch.bfloat16)
            pv.set_attention_backend(backend)
            res = []
            for case in ("infer", "train", "new"):
                pv.train(case != "infer")
                pv(x, grid)  # tables of these shapes built and cached (host work)
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    if case == "new":  # tables built inside the step; the distributed loss helper
                        loss = pv(x_new, new_grid).float().square().sum() * loss_scale(x_new.shape[0], device)
                        loss.backward()
                    elif case == "train":
                        pv(x, grid).float().square().mean().backward()
                    else:
                        with torch.inference_mode():
                            pv(x, grid)
                    res.append("no sync")
                except RuntimeError as e:
                    res.append(f"SYNC: {str(e).splitlines()[0][:80]}")
                    ok = False
                finally:
                    torch.cuda.set_sync_debug_mode(0)
                pv.zero_grad(set_to_none=True)
            print(f"| {family} | {backend} | {res[0]} | {res[1]} | {res[2]} |")
        del pv
        torch.cuda.empty_cache()
    return ok


def recompiles(device, tiny) -> bool:
    ok = True
    for backend in [b for b in available_backends(device, torch.bfloat16) if b != "sdpa"]:
        ok &= _recompiles(device, tiny, backend)
    return ok


def _recompiles(device, tiny, backend) -> bool:
    torch._dynamo.reset()
    hf, pv = build_pair("dinov3", None, device, torch.bfloat16, backend, tiny=tiny)
    del hf
    pv.compile_blocks()
    g = torch.Generator().manual_seed(5)
    dynamo_utils.counters.clear()
    graphs = []
    for _ in range(8):
        n = int(torch.randint(2, 33, (1,), generator=g))
        grid = torch.randint(4, 40, (n, 3), generator=g)
        grid[:, 0] = 1
        x = torch.randn(int((grid[:, 1] * grid[:, 2]).sum()), pv.patch_dim, device=device, dtype=torch.bfloat16)
        with torch.inference_mode():
            pv(x, grid)
        graphs.append(dynamo_utils.counters["stats"]["unique_graphs"])
    breaks = dict(dynamo_utils.counters["graph_break"])
    print(
        f"\ncompiled DINOv3 blocks ({backend}), 8 random batches of 2..32 images: graphs after each batch "
        f"{graphs}; graph breaks: {breaks or 'none'}"
    )
    return graphs[-1] <= 2 and not breaks


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    a = p.parse_args()
    device = torch.device("cuda")
    print(torch.__version__, torch.cuda.get_device_name(), "backends:", available_backends(device, torch.bfloat16))
    results = {
        "kernels": kernels(device),
        "no host sync": no_sync(device, a.tiny),
        "recompiles": recompiles(device, a.tiny),
    }
    print("\n" + ", ".join(f"{k}: {'ok' if v else 'FAIL'}" for k, v in results.items()))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
