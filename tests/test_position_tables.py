"""Position tables are built for a whole batch at once (``packing.token_positions``). They must equal,
bit for bit, the per-frame tables this file writes out the plain way: one frame at a time, as the
reference implementations lay them out."""

from __future__ import annotations

import math

import pytest
import torch

from packvit.models.aimv2 import packed_sincos
from packvit.models.dinov3 import packed_coords, packed_rope
from packvit.models.siglip2 import packed_resize_weights
from packvit.packing import token_positions

CPU = torch.device("cpu")
GRID = ((1, 3, 5), (2, 4, 2), (1, 1, 7), (1, 9, 1), (1, 1, 1), (3, 6, 6))


def frames(grid):
    return [(h, w) for t, h, w in grid for _ in range(t)]


def sincos_frame(h, w, dim):
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    ex, ey = xs.reshape(-1, 1) * omega, ys.reshape(-1, 1) * omega
    return torch.cat([ex.sin(), ex.cos(), ey.sin(), ey.cos()], dim=1)


def rope_frame(h, w, num_prefix, head_dim, theta):
    inv_freq = 1 / theta ** torch.arange(0, 1, 4 / head_dim, dtype=torch.float32)
    cy = torch.arange(0.5, h, dtype=torch.float32) / h
    cx = torch.arange(0.5, w, dtype=torch.float32) / w
    coords = torch.stack(torch.meshgrid(cy, cx, indexing="ij"), dim=-1).flatten(0, 1) * 2.0 - 1.0
    angles = (2 * math.pi * coords[:, :, None] * inv_freq[None, None, :]).flatten(1, 2).tile(2)
    cos = torch.cat([torch.ones(num_prefix, head_dim), angles.cos()])
    sin = torch.cat([torch.zeros(num_prefix, head_dim), angles.sin()])
    return cos, sin


def aa_bilinear_1d(n_in, n_out):
    scale = n_in / n_out
    support = max(scale, 1.0)
    centre = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale
    src = torch.arange(n_in, dtype=torch.float64) + 0.5
    w = (1 - (src[None, :] - centre[:, None]).abs() / support).clamp(min=0)
    return w / w.sum(1, keepdim=True)


def test_token_positions():
    pos = token_positions(((1, 2, 3), (2, 1, 2)), 2, CPU)
    assert pos.row.tolist() == [-1, -1, 0, 0, 0, 1, 1, 1] + [-1, -1, 0, 0] * 2
    assert pos.col.tolist() == [-1, -1, 0, 1, 2, 0, 1, 2] + [-1, -1, 0, 1] * 2
    assert pos.h.tolist() == [2] * 8 + [1] * 8 and pos.w.tolist() == [3] * 8 + [2] * 8
    assert pos.frame.tolist() == [0] * 8 + [1] * 4 + [2] * 4
    assert all(t.dtype == torch.int32 for t in pos)
    assert all(t.numel() == 0 for t in token_positions((), 1, CPU))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_aimv2_sincos_equals_per_frame(dtype):
    ours = packed_sincos(GRID, 64, CPU, dtype)
    ref = torch.cat([sincos_frame(h, w, 64) for h, w in frames(GRID)]).to(dtype)
    assert torch.equal(ours, ref)
    big = ((1, 70, 130),)  # positions past one 64-row axis table
    assert torch.equal(packed_sincos(big, 64, CPU, torch.float32), sincos_frame(70, 130, 64).float())


def test_dinov3_rope_equals_per_frame():
    cos, sin = packed_rope(GRID, 5, 64, 100.0, CPU, torch.float32)
    ref = [rope_frame(h, w, 5, 64, 100.0) for h, w in frames(GRID)]
    assert torch.equal(cos, torch.cat([c for c, _ in ref])) and torch.equal(sin, torch.cat([s for _, s in ref]))
    coords, is_patch, frame = packed_coords(GRID, 5, CPU)
    assert coords.shape == (cos.shape[0], 2) and (coords[~is_patch[:, 0]] == 0).all()
    assert frame.tolist() == [f for f, (h, w) in enumerate(frames(GRID)) for _ in range(5 + h * w)]


def test_siglip2_resize_weights_equal_per_frame():
    ours = packed_resize_weights(GRID, 16, CPU)
    ref = [
        torch.einsum("ia,jb->ijab", aa_bilinear_1d(16, h), aa_bilinear_1d(16, w)).reshape(h * w, 256)
        for h, w in frames(GRID)
    ]
    assert torch.equal(ours, torch.cat(ref).float())
