"""SigLIP2's position-grid resize: the exact antialiased bilinear filter, and where F.interpolate is not."""

import pytest
import torch
import torch.nn.functional as F

from packvit.models.siglip2 import packed_resize_weights


def resize_weights(h, w, side, device):
    return packed_resize_weights(((1, h, w),), side, device)


SHAPES = [(1, 1), (1, 9), (7, 2), (3, 20), (16, 16), (5, 7), (40, 3), (16, 1), (1, 16), (31, 33)]


@pytest.mark.parametrize("hw", SHAPES)
def test_resize_matches_interpolate(hw):
    """Equal to F.interpolate(bilinear, antialias=True) wherever that kernel is right."""
    grid = torch.randn(16, 16, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ours = resize_weights(*hw, 16, torch.device("cpu")).double() @ grid.reshape(256, 8)
    ref = F.interpolate(grid.permute(2, 0, 1)[None], size=hw, mode="bilinear", align_corners=False, antialias=True)
    assert (ours - ref[0].permute(1, 2, 0).reshape(-1, 8)).abs().max().item() < 1e-6


def test_interpolate_cpu_bug_is_avoided():
    """Output one column wide with a shrinking height: PyTorch's CPU kernel departs from the filter."""
    grid = torch.randn(16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ours = resize_weights(7, 1, 16, torch.device("cpu")).double() @ grid.reshape(256)
    # the filter is separable: resize rows to 7, then columns to 1 (a plain weighted mean)
    rows = F.interpolate(grid[None, None], size=(7, 16), mode="bilinear", align_corners=False, antialias=True)[0, 0]
    col_w = 1 - ((torch.arange(16, dtype=torch.float64) + 0.5) - 8).abs() / 16
    expected = rows @ (col_w / col_w.sum())
    assert (ours - expected).abs().max().item() < 1e-6  # W is stored in fp32
    buggy = F.interpolate(grid[None, None], size=(7, 1), mode="bilinear", align_corners=False, antialias=True)
    if (buggy.flatten() - expected).abs().max().item() < 1e-6:
        pytest.skip("this PyTorch build has the kernel fixed")
