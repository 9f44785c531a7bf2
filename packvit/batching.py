"""Token-budget batches for packed data loaders, balanced across data-parallel ranks.

    lengths = [proc.num_patches(h, w) for h, w in dataset_sizes]        # tokens per sample
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=16384, num_replicas=world, rank=rank, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_packed, pin_memory=True)
    for epoch in range(n):
        sampler.set_epoch(epoch)
        for hidden_states, grid_thw in loader: ...

Every rank builds the same plan from (seed, epoch) with no communication and takes its share:
the same number of batches on every rank (a collective per step cannot hang), and batches of
similar size in the same step (the slowest rank sets the step time).
"""

from __future__ import annotations

import random
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch.utils.data import Sampler


def pack_batches(
    lengths: Sequence[int], order: Sequence[int], max_tokens: int, max_images: int | None
) -> list[list[int]]:
    """Greedy packing in ``order``: start a new batch when the next sample would break a cap."""
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_tokens = 0
    for i in order:
        n = lengths[i]
        if cur and (cur_tokens + n > max_tokens or (max_images is not None and len(cur) >= max_images)):
            batches.append(cur)
            cur, cur_tokens = [], 0
        cur.append(i)
        cur_tokens += n
    if cur:
        batches.append(cur)
    return batches


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset indices whose token counts sum to at most ``max_tokens``.

    lengths: tokens of each sample (``t * h * w`` patches; see ``ImageProcessor.num_patches``).
    max_images: optional cap on samples per batch.
    num_replicas / rank: data-parallel world; default from ``torch.distributed`` if initialised, else 1 / 0.
    shuffle: permute samples with ``seed + epoch`` (``set_epoch``), else keep dataset order.
    drop_last: drop the batches that do not fill a last step on every rank; otherwise repeat the
        first batches of the epoch to fill it (as ``DistributedSampler`` repeats indices).

    Balancing: the epoch's batches are sorted by token count and cut into steps of
    ``num_replicas`` consecutive batches, so the batches of one step have similar sizes; steps run
    in a seeded random order, and the rank that gets the largest batch of a step alternates, so
    each rank's token total over the epoch is balanced too.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        *,
        max_images: int | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ):
        if num_replicas is None or rank is None:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            num_replicas = (
                num_replicas if num_replicas is not None else (torch.distributed.get_world_size() if dist else 1)
            )
            rank = rank if rank is not None else (torch.distributed.get_rank() if dist else 0)
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas), got rank={rank}, num_replicas={num_replicas}")
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        if max_images is not None and max_images <= 0:
            raise ValueError(f"max_images must be positive or None, got {max_images}")
        self.lengths = [int(n) for n in lengths]
        bad = [(i, n) for i, n in enumerate(self.lengths) if not 0 < n <= max_tokens]
        if bad:
            i, n = bad[0]
            raise ValueError(
                f"lengths[{i}] = {n}: every sample must cost between 1 and max_tokens={max_tokens} tokens "
                f"({len(bad)} do not); raise max_tokens or resize those images"
            )
        self.max_tokens, self.max_images = max_tokens, max_images
        self.num_replicas, self.rank = num_replicas, rank
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self) -> list[list[list[int]]]:
        """The whole epoch: ``plan[step][rank]`` is that rank's batch of dataset indices."""
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(order)
        batches = pack_batches(self.lengths, order, self.max_tokens, self.max_images)
        if not batches:
            return []
        W = self.num_replicas
        extra = len(batches) % W
        if extra:
            if self.drop_last:
                batches.sort(key=self._tokens, reverse=True)
                batches = batches[: len(batches) - extra]  # drop the smallest
                if not batches:
                    return []
            else:
                batches += [batches[i % len(batches)] for i in range(W - extra)]
        batches.sort(key=self._tokens, reverse=True)  # stable: ties keep the seeded order
        steps = [batches[i : i + W] for i in range(0, len(batches), W)]
        if self.shuffle:
            rng.shuffle(steps)
        # Snake order: the rank holding the largest batch alternates from step to step.
        return [s if k % 2 == 0 else s[::-1] for k, s in enumerate(steps)]

    def _tokens(self, batch: list[int]) -> int:
        return sum(self.lengths[i] for i in batch)

    def __iter__(self) -> Iterator[list[int]]:
        for step in self.plan():
            yield step[self.rank]

    def __len__(self) -> int:
        return len(self.plan())


def collate_packed(samples: Sequence[Any]) -> Any:
    """Concatenate preprocessed samples into one packed batch.

    Each sample is ``(hidden_states (Tp_i, p*p*C), grid_thw (N_i, 3))``, optionally followed by
    more fields, or a dict with ``"pixel_values"`` (or ``"hidden_states"``) and ``"grid_thw"``.
    Returns the same structure: the two tensors concatenated along dim 0, other fields as lists
    (tensors of equal shape are stacked).
    """
    if not samples:
        raise ValueError("collate_packed got an empty list of samples")
    first = samples[0]
    if isinstance(first, Mapping):
        key = "pixel_values" if "pixel_values" in first else "hidden_states"
        if key not in first or "grid_thw" not in first:
            raise KeyError(f"dict samples need 'pixel_values' (or 'hidden_states') and 'grid_thw', got {sorted(first)}")
        out = {k: _gather([s[k] for s in samples]) for k in first if k not in (key, "grid_thw")}
        out[key], out["grid_thw"] = _cat_packed([(s[key], s["grid_thw"]) for s in samples])
        return out
    if not isinstance(first, (tuple, list)) or len(first) < 2:
        raise TypeError(
            "each sample must be (hidden_states, grid_thw, ...) or a dict with 'pixel_values' and 'grid_thw'"
        )
    x, grid = _cat_packed([(s[0], s[1]) for s in samples])
    rest = tuple(_gather([s[j] for s in samples]) for j in range(2, len(first)))
    return (x, grid) + rest


def _cat_packed(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    grids = []
    for i, (x, g) in enumerate(pairs):
        g = torch.as_tensor(g, dtype=torch.int64).reshape(-1, 3)
        n = int((g[:, 0] * g[:, 1] * g[:, 2]).sum())
        if x.dim() != 2 or x.shape[0] != n:
            raise ValueError(
                f"sample {i}: hidden_states has shape {list(x.shape)} but its grid_thw describes {n} patches"
            )
        grids.append(g)
    return torch.cat([x for x, _ in pairs], 0), torch.cat(grids, 0)


def _gather(values: list[Any]) -> Any:
    if all(isinstance(v, torch.Tensor) for v in values) and len({v.shape for v in values}) == 1:
        return torch.stack(values)
    return values
