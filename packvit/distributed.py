"""Data-parallel training of a packed tower: FSDP2 or DDP, each rank with its own packed batch.

    torch.distributed.init_process_group("nccl")
    model = shard_tower(model)                       # FSDP2: fully_shard per block, then the root
    # or: model = ddp_tower(model)
    out = model(hidden_states, grid_thw)             # this rank's batch
    loss = token_sum_loss / global_token_count(num_tokens_here)   # equal to the single-process loss
    loss.backward()

Ranks hold different numbers of tokens, so the per-rank mean would weight tokens unequally.
FSDP2 and DDP average gradients over ranks (divide by world size); normalising each rank's
*sum* over tokens by the *global* token count and multiplying by the world size makes the
averaged gradient equal the gradient of the mean over all tokens of the union of the batches.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .models.base import PackedViT


def shard_tower(
    model: PackedViT,
    mesh=None,
    *,
    reshard_after_forward: bool = True,
    mp_policy=None,
    blocks_per_unit: int = 1,
) -> PackedViT:
    """FSDP2: ``fully_shard`` every block (or every ``blocks_per_unit`` consecutive blocks, as one
    unit), then the root (embeddings, final norm, head).

    mesh: a 1-D ``DeviceMesh`` over the data-parallel ranks (default: all ranks, on the model's
    device type). mp_policy: e.g. ``MixedPrecisionPolicy(param_dtype=torch.bfloat16,
    reduce_dtype=torch.float32)``. Works with one rank too (then only the wrapping costs).
    blocks_per_unit: FSDP2's host work is per unit and step (hooks, collectives), and with small
    per-rank batches it can bound the step (benchmarks/RESULTS.md section 6). Fewer, larger units
    cost less host time and more memory for the gathered parameters.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise RuntimeError("shard_tower needs torch.distributed.init_process_group() first")
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(model.device.type, (dist.get_world_size(),))
    if blocks_per_unit < 1:
        raise ValueError(f"blocks_per_unit must be >= 1, got {blocks_per_unit}")
    kw = dict(mesh=mesh, mp_policy=mp_policy or MixedPrecisionPolicy())
    blocks = list(model.blocks)
    for i in range(0, len(blocks), blocks_per_unit):
        unit = blocks[i : i + blocks_per_unit]  # a list: one FSDP unit over several blocks
        fully_shard(unit if len(unit) > 1 else unit[0], reshard_after_forward=reshard_after_forward, **kw)
    # The root's own parameters (final norm, head) are the first the backward needs: keep them
    # gathered after the forward rather than all-gathering them again at once.
    fully_shard(model, reshard_after_forward=False, **kw)
    return model


def ddp_tower(model: nn.Module, **kwargs) -> nn.parallel.DistributedDataParallel:
    """Plain DDP. Frozen parameters are skipped by DDP itself; pooling heads unused by the loss
    need ``find_unused_parameters=True``."""
    if not dist.is_initialized():
        raise RuntimeError("ddp_tower needs torch.distributed.init_process_group() first")
    device_ids = [model.device.index] if model.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **kwargs)


def global_token_count(num_tokens: int | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """Sum over ranks of ``num_tokens`` (one all-reduce of one number), as a float64 tensor.

    Never a host sync: a Python count is written by a fill kernel on ``device``, not copied from
    the host (a blocking copy would wait for the forward to finish before the backward is issued).
    """
    if isinstance(num_tokens, torch.Tensor):
        t = num_tokens.to(device=device, dtype=torch.float64, copy=True, non_blocking=True)
    else:
        t = torch.full((), float(num_tokens), dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def loss_scale(num_tokens_here: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Multiply a rank's token-*sum* loss by this: world_size / global token count.

    Gradient averaging over ranks then yields exactly the gradient of the mean over all tokens.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    return world / global_token_count(num_tokens_here, device)
