"""Training throughput of a packed tower under torchrun: tokens/s per GPU, FSDP2 (or DDP) wrapped.

    torchrun --nproc_per_node=1 benchmarks/train_tokens_per_s.py --preset siglip2-so400m-patch16-naflex
    torchrun --nproc_per_node=8 benchmarks/train_tokens_per_s.py --preset dinov3-vitl16-pretrain-lvd1689m --wrap ddp
    python benchmarks/train_tokens_per_s.py --device cpu --tiny        # smoke test, no torchrun needed

Random weights built from the preset's config (no download); every rank draws its own mixed
batch of images (sides 8..32 patches) up to --max-tokens, trains with AdamW on a token-sum loss
normalised by the global token count. Prints one table row per (preset, backend) and a JSON line;
--out appends the JSON rows to a file. Peak memory is the largest over ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from packvit.distributed import ddp_tower, loss_scale, shard_tower
from packvit.models.aimv2 import AIMv2, AIMv2Config
from packvit.models.dinov3 import DINOv3, DINOv3Config
from packvit.models.siglip2 import Siglip2, Siglip2Config

FAMILIES = {"siglip2": (Siglip2, Siglip2Config), "dinov3": (DINOv3, DINOv3Config), "aimv2": (AIMv2, AIMv2Config)}
TINY = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)


def build(preset: str, tiny: bool, device, dtype, backend):
    family = next(f for f in FAMILIES if f in preset)
    cls, cfg_cls = FAMILIES[family]
    cfg = cfg_cls.from_name(preset, **(TINY if tiny else {}))
    with torch.device(device):
        model = cls(cfg, attn_backend="sdpa")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    if getattr(model, "head", None) is not None:
        # The loss reads the patch features, as a LLaVA tower does: the pooling head gets no
        # gradient (DDP would refuse unused parameters) and needs no optimizer state.
        model.head.requires_grad_(False)
    return model.to(dtype=dtype), cfg


def random_batch(cfg, max_tokens: int, gen: torch.Generator, side=(8, 32)):
    grid, total = [], 0
    while True:
        h, w = torch.randint(side[0], side[1] + 1, (2,), generator=gen).tolist()
        if total + h * w > max_tokens:
            break
        grid.append((1, h, w))
        total += h * w
    if not grid:
        grid, total = [(1, side[0], side[0])], side[0] ** 2
    x = torch.randn(total, cfg.patch_size**2 * cfg.num_channels, generator=gen)
    return x, torch.tensor(grid)


def measure(preset: str, backend: str, args, rank: int, device) -> dict:
    """Warm-up, then timed training steps of one (preset, backend); tokens/s averaged over ranks."""
    model, cfg = build(preset, args.tiny, device, torch.float32, backend)
    half = args.dtype == "bf16" and device.type == "cuda"
    # The attention kernel is chosen for the compute dtype (FSDP2 casts parameters to bf16 in forward).
    attn = model.set_attention_backend(backend if device.type == "cuda" else "sdpa", torch.bfloat16 if half else None)
    model.gradient_checkpointing = {"off": False, "mlp": "mlp", "block": True}[args.grad_ckpt]
    if args.compile:
        model.compile_blocks()
    if args.wrap == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if half else None
        model = shard_tower(model, mp_policy=mp, blocks_per_unit=args.blocks_per_unit)
    elif args.wrap == "ddp":
        model = ddp_tower(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(1234 + rank)
    autocast = (
        torch.autocast("cuda", torch.bfloat16)
        if (half and args.wrap != "fsdp2")
        else torch.autocast("cpu", enabled=False)
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    tokens, elapsed, host, host_fb = 0, 0.0, 0.0, 0.0
    fixed = random_batch(cfg, args.max_tokens, gen) if args.same_batch else None
    for step in range(args.warmup + args.steps):
        x, grid = fixed or random_batch(cfg, args.max_tokens, gen)
        x = x.to(device, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            out = model(x, grid)
        loss = out.float().square().sum() * loss_scale(x.shape[0], device)
        loss.backward()
        t_fwd_bwd = time.perf_counter() - t0  # host time to issue forward and backward
        opt.step()
        opt.zero_grad(set_to_none=True)
        t_host = time.perf_counter() - t0  # the host's share: issuing the step (GPU may still run)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            elapsed += time.perf_counter() - t0
            host += t_host
            host_fb += t_fwd_bwd
            tokens += x.shape[0]

    per_gpu = torch.tensor([tokens / elapsed], dtype=torch.float64, device=device)
    mem = torch.tensor(
        [torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0],
        dtype=torch.float64,
        device=device,
    )
    world = dist.get_world_size() if dist.is_initialized() else 1
    if dist.is_initialized():
        dist.all_reduce(per_gpu)
        per_gpu /= world
        dist.all_reduce(mem, op=dist.ReduceOp.MAX)
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(
        preset=preset + (" (tiny)" if args.tiny else ""),
        world=world,
        wrap=args.wrap,
        dtype="bf16" if half else "fp32",
        attn=attn,
        grad_ckpt=args.grad_ckpt,
        blocks_per_unit=args.blocks_per_unit,
        compile=args.compile,
        max_tokens=args.max_tokens,
        steps=args.steps,
        same_batch=args.same_batch,
        step_ms=round(elapsed / args.steps * 1e3, 1),
        host_ms_rank0=round(host / args.steps * 1e3, 1),
        host_fwd_bwd_ms_rank0=round(host_fb / args.steps * 1e3, 1),
        tokens_per_s_per_gpu=round(per_gpu.item(), 1),
        peak_mem_gib_max_rank=round(mem.item(), 2),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", nargs="+", default=["siglip2-so400m-patch16-naflex"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--dtype",
        default="bf16",
        choices=["bf16", "fp32"],
        help="bf16: FSDP2 mixed precision (bf16 params/compute, fp32 master weights and reduce)",
    )
    ap.add_argument("--wrap", default="fsdp2", choices=["fsdp2", "ddp", "none"])
    ap.add_argument("--backend", nargs="+", default=["auto"], help="attention backends, one row each")
    ap.add_argument("--max-tokens", type=int, default=16384, help="patch tokens per rank per step")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument(
        "--grad-ckpt",
        default="off",
        choices=["off", "mlp", "block"],
        help="activation checkpointing: none, the MLPs only, or whole blocks",
    )
    ap.add_argument("--blocks-per-unit", type=int, default=1, help="FSDP2: consecutive blocks per fully_shard unit")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="compile the blocks")
    ap.add_argument("--tiny", action="store_true", help="tiny config for a CPU smoke test")
    ap.add_argument(
        "--same-batch",
        action="store_true",
        help="repeat one batch (cached position tables) instead of drawing a new one per step",
    )
    ap.add_argument("--out", help="append the JSON rows to this file")
    args = ap.parse_args()

    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank = dist.get_rank() if distributed else 0
    device = (
        torch.device(args.device, int(os.environ.get("LOCAL_RANK", 0)))
        if args.device == "cuda"
        else torch.device(args.device)
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.wrap != "none" and not distributed:
        # FSDP2 and DDP need a process group; a one-rank group keeps the wrapping in the measurement.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
        distributed = True

    if rank == 0:
        print(
            f"{'preset':40s} {'world':>5s} {'wrap':>6s} {'dtype':>5s} {'attn':>6s} {'tok/s/GPU':>12s} {'step ms':>8s} "
            f"{'host ms':>8s} {'peak GiB':>9s}",
            flush=True,
        )
    for preset in args.preset:
        for backend in args.backend:
            row = measure(preset, backend, args, rank, device)
            if rank == 0:
                print(
                    f"{row['preset']:40s} {row['world']:5d} {args.wrap:>6s} {row['dtype']:>5s} {row['attn']:>6s} "
                    f"{row['tokens_per_s_per_gpu']:12.1f} {row['step_ms']:8.1f} {row['host_ms_rank0']:8.1f} "
                    f"{row['peak_mem_gib_max_rank']:9.2f}",
                    flush=True,
                )
                print(json.dumps(row), flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
    if distributed:
        # Rank 0 writes results while the others reach here; tearing gloo down under it aborted a
        # rank now and then ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown under gloo's still-running threads (fsdp2_equality.py)
