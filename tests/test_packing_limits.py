"""Issue 16 items 9-10: grids that cannot be packed fail at once with one clear error, before any
table is built; the per-grid table caches are bounded in bytes and can be cleared."""

from __future__ import annotations

import time

import pytest
import torch

from packvit import DINOv3, DINOv3Config, Siglip2, Siglip2Config, packing
from packvit.packing import MAX_TOKENS, cache_bytes, check_packed, clear_caches, grid_to_tuple, set_cache_limit


@pytest.fixture(scope="module")
def dinov3():
    torch.manual_seed(0)
    return DINOv3(DINOv3Config(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)).eval()


BAD_GRIDS = {
    "meta-device": (torch.tensor([[1, 2, 5]], device="meta"), "meta device"),
    "huge-int64": (torch.tensor([[1, 2**62, 4]]), "at most 2147483647"),
    "int32-overflow": (torch.tensor([[1, 50_000, 50_000]]), "2500000000 patches"),
    "sum-overflows": (
        [[1, 40_000, 40_000], [1, 30_000, 30_000], [1, 1, 1]],
        r"at least 2500000000 patches \(up to grid_thw\[1\]",
    ),
    "python-bigint": ([[1, 2**70, 1]], "at most 2147483647"),
}


@pytest.mark.parametrize("case", list(BAD_GRIDS))
def test_unpackable_grid_is_one_clear_error_at_once(case, dinov3):
    grid, message = BAD_GRIDS[case]
    x = torch.randn(10, dinov3.patch_dim)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        dinov3(x, grid)
    assert time.perf_counter() - start < 1.0  # refused, not attempted (a 68 GB allocation, before)


def test_prefix_tokens_count_towards_the_limit():
    with pytest.raises(ValueError, match="prefix tokens"):
        packing.build_meta(((1, 1, MAX_TOKENS - 2),), 5, torch.device("cpu"))


def test_rows_are_checked_against_the_grid_before_any_table(dinov3):
    """A 1000 x 1000 grid given 10 rows: ``check_packed`` refuses it from the integers alone (before this
    check, 16 s and 3.7 GB of table work before the error, and 1.07 GB left in the caches)."""
    clear_caches()
    x = torch.randn(10, dinov3.patch_dim)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="10 rows but grid_thw describes 1000000 patches"):
        check_packed(x, [[1, 1000, 1000]], dinov3.patch_dim)
    assert time.perf_counter() - start < 0.1 and cache_bytes() == 0
    assert check_packed(torch.randn(6, dinov3.patch_dim), [[2, 1, 3]], dinov3.patch_dim) == ((2, 1, 3),)
    with pytest.raises(ValueError, match="patch_dim"):
        check_packed(torch.randn(6, 5), [[2, 1, 3]], dinov3.patch_dim)


def test_caches_are_bounded_in_bytes_and_clearable():
    torch.manual_seed(0)
    model = Siglip2(Siglip2Config(hidden_size=16, num_layers=1, num_heads=1, intermediate_size=32)).eval()
    clear_caches()
    try:
        set_cache_limit(2 * 2**20)
        with torch.no_grad():
            for side in (40, 41, 42, 43):  # each batch's resize table alone is side^2 * 256 * 4 bytes (1.6+ MB)
                model(torch.randn(side * side, model.patch_dim), [[1, side, side]])
                assert 0 < cache_bytes() <= 2 * 2**20
            model(torch.randn(90 * 90, model.patch_dim), [[1, 90, 90]])  # 8 MB: used, not kept
        assert cache_bytes() <= 2 * 2**20
        clear_caches()
        assert cache_bytes() == 0
        set_cache_limit(0)  # caching off: every call rebuilds, nothing is kept
        with torch.no_grad():
            model(torch.randn(12, model.patch_dim), [[1, 3, 4]])
        assert cache_bytes() == 0
    finally:
        set_cache_limit(512 * 2**20)
        clear_caches()


def test_cached_tables_are_reused():
    clear_caches()
    grid = grid_to_tuple([[1, 3, 4], [2, 2, 2]])
    a = packing.build_meta(grid, 1, torch.device("cpu"))
    assert packing.build_meta(grid, 1, torch.device("cpu")) is a and cache_bytes() > 0
    packing.build_meta.cache_clear()
    assert packing.build_meta(grid, 1, torch.device("cpu")) is not a
    with pytest.raises(ValueError, match="non-negative"):
        set_cache_limit(-1)


def test_model_checks_rows_before_tables(dinov3):
    clear_caches()
    start = time.perf_counter()
    with pytest.raises(ValueError, match="10 rows but grid_thw describes 1000000 patches"):
        dinov3(torch.randn(10, dinov3.patch_dim), [[1, 1000, 1000]])
    assert time.perf_counter() - start < 0.5 and cache_bytes() == 0
