"""Token-budget batch sampler and packed collate."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset

from packvit.batching import TokenBudgetBatchSampler, collate_packed


def _lengths(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(1, 30, (n,), generator=g) * torch.randint(1, 30, (n,), generator=g)).tolist()


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 300), min_size=1, max_size=120),
    max_tokens=st.integers(300, 2000),
    max_images=st.one_of(st.none(), st.integers(1, 8)),
    world=st.integers(1, 4),
    drop_last=st.booleans(),
)
def test_caps_and_coverage(lengths, max_tokens, max_images, world, drop_last):
    per_rank = []
    for rank in range(world):
        s = TokenBudgetBatchSampler(
            lengths, max_tokens, max_images=max_images, num_replicas=world, rank=rank, seed=3, drop_last=drop_last
        )
        per_rank.append(list(s))
        assert len(s) == len(per_rank[-1])
    assert len({len(b) for b in per_rank}) == 1, "every rank must get the same number of batches"
    seen = [i for batches in per_rank for b in batches for i in b]
    for batches in per_rank:
        for b in batches:
            assert b and sum(lengths[i] for i in b) <= max_tokens
            assert max_images is None or len(b) <= max_images
    if not drop_last:
        assert set(seen) == set(range(len(lengths))), "every sample appears at least once"
    else:
        assert len(seen) == len(set(seen)), "drop_last never repeats a sample"


def test_deterministic_and_epoch_dependent():
    lengths = _lengths()
    a = TokenBudgetBatchSampler(lengths, 2000, num_replicas=2, rank=0, seed=1)
    b = TokenBudgetBatchSampler(lengths, 2000, num_replicas=2, rank=0, seed=1)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)
    c = TokenBudgetBatchSampler(lengths, 2000, num_replicas=2, rank=0, seed=2)
    assert list(a) != list(c)
    ordered = TokenBudgetBatchSampler(lengths, 2000, shuffle=False)
    assert sorted(i for batch in ordered for i in batch) == list(range(len(lengths)))


def test_ranks_balanced():
    """Per step, batch sizes are close; over the epoch, token totals differ by at most 5%."""
    lengths = _lengths(2000, seed=4)
    world, cap = 4, 4096
    s = TokenBudgetBatchSampler(lengths, cap, num_replicas=world, rank=0, seed=0)
    plan = s.plan()
    tok = [[sum(lengths[i] for i in b) for b in step] for step in plan]
    totals = [sum(step[r] for step in tok) for r in range(world)]
    assert max(totals) - min(totals) <= 0.05 * max(totals), totals
    spread = sum(max(t) - min(t) for t in tok) / len(tok)
    assert spread < 0.1 * cap, f"mean per-step spread {spread} tokens"


def test_errors():
    with pytest.raises(ValueError, match=r"lengths\[1\] = 5000"):
        TokenBudgetBatchSampler([10, 5000], 4096)
    with pytest.raises(ValueError, match="rank must be in"):
        TokenBudgetBatchSampler([10], 100, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="max_tokens must be positive"):
        TokenBudgetBatchSampler([10], 0)


class _Images(Dataset):
    def __init__(self, grids):
        self.grids = grids

    def __len__(self):
        return len(self.grids)

    def __getitem__(self, i):
        t, h, w = self.grids[i]
        return torch.full((t * h * w, 12), float(i)), torch.tensor([[t, h, w]]), i


def test_collate_with_dataloader():
    grids = [(1, 2, 3), (2, 1, 1), (1, 4, 4), (1, 1, 5), (3, 2, 2)]
    lengths = [t * h * w for t, h, w in grids]
    ds = _Images(grids)
    sampler = TokenBudgetBatchSampler(lengths, 20, shuffle=False)
    seen = []
    for x, grid, idx in DataLoader(ds, batch_sampler=sampler, collate_fn=collate_packed):
        assert x.shape[0] == int(grid.prod(1).sum()) <= 20
        assert grid.tolist() == [list(grids[i]) for i in idx]
        assert x[:, 0].tolist() == [float(i) for i in idx for _ in range(lengths[i])]
        seen += idx
    assert sorted(seen) == list(range(len(grids)))


def test_collate_dicts_and_mismatch():
    a = {"pixel_values": torch.zeros(6, 4), "grid_thw": torch.tensor([[1, 2, 3]]), "label": 1}
    b = {"pixel_values": torch.ones(2, 4), "grid_thw": torch.tensor([[2, 1, 1]]), "label": 0}
    out = collate_packed([a, b])
    assert out["pixel_values"].shape == (8, 4) and out["grid_thw"].tolist() == [[1, 2, 3], [2, 1, 1]]
    assert out["label"] == [1, 0]
    with pytest.raises(ValueError, match="sample 1: hidden_states has shape"):
        collate_packed([(torch.zeros(6, 4), [[1, 2, 3]]), (torch.zeros(3, 4), [[1, 2, 2]])])
