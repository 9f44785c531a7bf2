"""FSDP2 on several GPUs gives the single-GPU step: loss and every parameter gradient compared.

    torchrun --nproc_per_node=2 benchmarks/fsdp2_equality.py --dtype fp32
    torchrun --nproc_per_node=2 benchmarks/fsdp2_equality.py --dtype bf16 --backend fa4 torch
    torchrun --nproc_per_node=2 benchmarks/fsdp2_equality.py --device cpu --tiny --dtype fp32   # gloo smoke

Every rank builds the same random model (same seed, realistic scales: norm weights near 1,
LayerScale 0.1, the rest N(0, 0.02)), shards it with ``shard_tower`` (``fully_shard`` per block)
and runs one training step on its own packed batch: images of mixed sizes plus a 2-frame clip,
different on every rank. The loss is the token-sum loss normalised by the global token count
(``packvit.distributed.loss_scale``). Rank 0 then runs the same model unsharded on one device on
the union of all ranks' batches, with the mean over all tokens, and compares.

Criteria, per parameter tensor (g: sharded run, gathered; s: single device; f: fp32 single device):
  fp32   max|g - s| <= 1e-4 * max|s|, and the loss within 1e-5 relative (TF32 off; only the
         reduction order differs).
  bf16   FSDP2 mixed precision (bf16 parameters and compute, fp32 gradient reduction) against the
         single device with the same bf16 parameters. Two bf16 runs differ by rounding, so the
         yardstick is bf16's own error: ||g - s|| <= 2 * ||s - f|| + 1e-3 * ||f|| (two independent
         roundings of the same value are about sqrt(2) times one apart), and the loss within 1e-2
         relative. A missing rank, a wrong scale or a stale shard gives errors of order 1.
SigLIP2's key bias has a zero gradient in exact arithmetic (softmax ignores a per-row constant):
there both sides must be below 1e-3 of the largest gradient. Exits non-zero if a criterion fails. Prints one table row per (model, backend) and JSON lines
(--out appends them to a file).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys

import torch
import torch.distributed as dist
from train_tokens_per_s import build as build_random  # noqa: E402  (same directory)

from packvit.distributed import global_token_count, loss_scale, shard_tower

DEFAULT_PRESETS = ["siglip2-so400m-patch16-naflex", "dinov3-vitl16-pretrain-lvd1689m", "aimv2-large-patch14-native"]


def build(preset: str, tiny: bool):
    """The same model on every rank: built on the CPU, then filled from a fixed seed."""
    model, cfg = build_random(preset, tiny, "cpu", torch.float32, "sdpa")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight") and p.ndim == 1:
                p.copy_(1 + 0.02 * noise)
            elif name.endswith("gamma"):  # LayerScale
                p.copy_(0.1 * (1 + 0.02 * noise))
            else:
                p.copy_(0.02 * noise)
    return model, cfg


def rank_batch(cfg, rank: int, max_tokens: int, tiny: bool):
    """This rank's packed batch: a 2-frame clip and images of mixed sizes, plus per-token loss weights."""
    gen = torch.Generator().manual_seed(1000 + rank)
    lo, hi = (1, 6) if tiny else (6, 40)
    grid = [(2,) + tuple(torch.randint(lo, hi // 2 + 1, (2,), generator=gen).tolist())]
    total = grid[0][0] * grid[0][1] * grid[0][2]
    while True:
        h, w = torch.randint(lo, hi + 1, (2,), generator=gen).tolist()
        if total + h * w > max_tokens:
            break
        grid.append((1, h, w))
        total += h * w
    x = torch.randn(total, cfg.patch_size**2 * cfg.num_channels, generator=gen)
    w = torch.randn(total, cfg.hidden_size, generator=gen)
    return x, torch.tensor(grid), w


def token_sum(model, x, grid, w):
    return (model(x, grid).float() * w).sum()


def grads_of(model) -> dict[str, torch.Tensor | None]:
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        if g is not None and hasattr(g, "full_tensor"):
            g = g.full_tensor()  # a collective: every rank gathers
        out[name] = None if g is None else g.detach().float().cpu()
    return out


def single_device_step(model, batches, device, dtype):
    """The reference: one device, the union of the batches, the mean over all its tokens."""
    model.zero_grad(set_to_none=True)
    x = torch.cat([b[0] for b in batches]).to(device, dtype)
    grid = torch.cat([b[1] for b in batches])
    w = torch.cat([b[2] for b in batches]).to(device)
    loss = token_sum(model, x, grid, w) / x.shape[0]
    loss.backward()
    return loss.item(), grads_of(model)


# A key bias adds the same q.b_k to every score of a query row, which softmax ignores: its
# gradient is zero in exact arithmetic and rounding noise in practice, so relative errors mean
# nothing there. It is checked to be negligible against the largest gradient instead.
ZERO_GRADIENT = ("attn.k_bias",)


def compare(dtype: str, loss, ref_loss, f32_loss, grads, ref, f32) -> dict:
    worst, worst_name, fails = 0.0, None, []
    scale = max(s.abs().max().item() for s in ref.values() if s is not None)
    for name, s in ref.items():
        g = grads[name]
        if (g is None) != (s is None):
            fails.append(f"{name}: gradient present on one side only")
            continue
        if s is None:
            continue
        if name.endswith(ZERO_GRADIENT):
            err = max(g.abs().max().item(), s.abs().max().item()) / scale
            if not err <= 1e-3:
                fails.append(f"{name}: should be ~0, max {err:.3g} of the largest gradient")
            continue
        if dtype == "fp32":
            err = ((g - s).abs().max() / s.abs().max().clamp_min(1e-30)).item()
            limit = 1e-4
        else:
            f = f32[name]
            err = ((g - s).norm() / f.norm().clamp_min(1e-30)).item()
            limit = 2 * ((s - f).norm() / f.norm().clamp_min(1e-30)).item() + 1e-3
        if err / limit > worst:
            worst, worst_name = err / limit, name
        if not err <= limit:
            fails.append(f"{name}: {err:.3g} > {limit:.3g}")
    loss_rel = abs(loss - ref_loss) / max(abs(ref_loss), 1e-30)
    loss_lim = 1e-5 if dtype == "fp32" else 1e-2
    if not loss_rel <= loss_lim:
        fails.append(f"loss: rel diff {loss_rel:.3g} > {loss_lim:g}")
    out = dict(
        loss=loss,
        ref_loss=ref_loss,
        loss_rel=loss_rel,
        worst_err_over_limit=worst,
        worst_param=worst_name,
        fails=fails[:10],
    )
    if f32_loss is not None:
        out["fp32_loss"] = f32_loss
    return out


def run_one(preset, backend, args, rank, world, device) -> dict | None:
    half = args.dtype == "bf16"
    model, cfg = build(preset, args.tiny)
    ref = copy.deepcopy(model) if rank == 0 else None
    model = model.to(device)
    name = model.set_attention_backend(backend if half else "sdpa", torch.bfloat16 if half else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if half else None
    model = shard_tower(model, mp_policy=mp)
    batches = [rank_batch(cfg, r, args.max_tokens, args.tiny) for r in range(world)]
    x, grid, w = batches[rank]
    local = token_sum(model, x.to(device), grid, w.to(device))
    (local * loss_scale(x.shape[0], device)).backward()
    loss = (global_token_count(local.detach(), device) / global_token_count(x.shape[0], device)).item()
    grads = grads_of(model)  # collective
    del model
    if rank != 0:
        return None

    f32_loss = f32 = None
    if half:  # the fp32 truth that measures bf16's own error
        f32_model = copy.deepcopy(ref).to(device)
        f32_loss, f32 = single_device_step(f32_model, batches, device, torch.float32)
        del f32_model
        ref = ref.to(device, torch.bfloat16)
        ref.set_attention_backend(backend)
    else:
        ref = ref.to(device)
    ref_loss, ref_grads = single_device_step(ref, batches, device, torch.bfloat16 if half else torch.float32)
    row = dict(
        preset=preset + (" (tiny)" if args.tiny else ""),
        world=world,
        dtype=args.dtype,
        attn=name,
        tokens_per_rank=[int(b[0].shape[0]) for b in batches],
        **compare(args.dtype, loss, ref_loss, f32_loss, grads, ref_grads, f32),
    )
    row["ok"] = not row["fails"]
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", nargs="+", default=DEFAULT_PRESETS)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--backend", nargs="+", default=["auto"], help="attention backends (bf16); fp32 uses sdpa")
    ap.add_argument("--max-tokens", type=int, default=6144, help="patch tokens per rank")
    ap.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke test)")
    ap.add_argument("--out", help="append the JSON rows to this file")
    args = ap.parse_args()
    if args.device == "cpu" and args.dtype == "bf16":
        ap.error("--dtype bf16 needs --device cuda")

    # Exact fp32 matmuls: with TF32 the two runs would differ by TF32 rounding, not by the sharding.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (
        torch.device(args.device, int(os.environ.get("LOCAL_RANK", 0)))
        if args.device == "cuda"
        else torch.device("cpu")
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)

    rows = []
    for preset in args.preset:
        for backend in args.backend if args.dtype == "bf16" else ["sdpa"]:
            row = run_one(preset, backend, args, rank, world, device)
            dist.barrier()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if row is None:
                continue
            rows.append(row)
            print(
                f"{row['preset']:38s} {row['dtype']:>5s} {row['attn']:>6s} world {world}  tokens {row['tokens_per_rank']}  "
                f"loss rel {row['loss_rel']:.2e}  worst err/limit {row['worst_err_over_limit']:.3f}  "
                f"{'ok' if row['ok'] else 'FAIL ' + '; '.join(row['fails'])}",
                flush=True,
            )
    if rank == 0:
        for row in rows:
            row["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
            row["torch"] = torch.__version__
            print(json.dumps(row))
        if args.out:
            with open(args.out, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
    ok = all(r["ok"] for r in rows) if rank == 0 else True
    # Rank 0 prints and writes while the others reach here; tearing gloo down under it aborts a rank
    # now and then ("terminate called without an active exception", as train_tokens_per_s.py saw).
    dist.barrier()
    dist.destroy_process_group()
    # Out without the interpreter's teardown, where gloo's still-running threads can abort a rank too.
    sys.stdout.flush()
    os._exit(0 if ok and not any(math.isnan(r["loss"]) for r in rows) else 1)


if __name__ == "__main__":
    main()
