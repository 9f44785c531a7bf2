"""Packing metadata, patchify and the seed's packing format; bad input gets a clear error."""

from __future__ import annotations

import pytest
import torch

import packvit
from packvit.packing import build_meta, grid_to_tuple, insert_prefix, split_prefix


def test_meta_one_segment_per_frame_with_prefix():
    grid = grid_to_tuple(torch.tensor([[1, 2, 3], [2, 1, 4], [1, 5, 5]]))
    meta = build_meta(grid, 5, torch.device("cpu"))
    assert meta.seqlens == (5 + 6, 5 + 4, 5 + 4, 5 + 25)
    assert meta.cu_seqlens.dtype == torch.int32
    assert meta.cu_seqlens.tolist() == [0, 11, 20, 29, 59]
    assert isinstance(meta.max_seqlen, int) and meta.max_seqlen == 30
    assert meta.num_patches == 39 and meta.num_tokens == 59
    # patch and prefix positions partition the sequence, prefix first in every frame
    both = torch.cat([meta.patch_index, meta.prefix_index]).sort().values
    assert torch.equal(both, torch.arange(59))
    assert meta.prefix_index.view(4, 5)[:, 0].tolist() == [0, 11, 20, 29]
    assert build_meta(grid, 5, torch.device("cpu")) is meta  # cached per grid


def test_insert_and_split_prefix_round_trip():
    grid = ((1, 2, 2), (3, 1, 2))
    meta = build_meta(grid, 2, torch.device("cpu"))
    patches = torch.randn(meta.num_patches, 4)
    prefix = torch.randn(2, 4)
    x = insert_prefix(patches, prefix, meta)
    p, q = split_prefix(x, meta)
    assert torch.equal(p, patches)
    assert torch.equal(q, prefix.expand(4, 2, 4))
    assert torch.equal(x[:2], prefix) and torch.equal(x[2:6], patches[:4])


def test_convert_to_packing_format_matches_seed():
    imgs = torch.randn(2, 3, 28, 42)
    p = 14
    ref = imgs.view(2, 3, 2, p, 3, p).permute(0, 2, 4, 3, 5, 1).reshape(-1, p * p * 3)
    assert torch.equal(packvit.convert_to_packing_format(imgs, p), ref)


def test_patchify_unpatchify_round_trip_mixed_and_video():
    images = [torch.randn(3, 32, 48), torch.randn(2, 3, 16, 16), torch.randn(3, 16, 80)]
    x, g = packvit.patchify(images, 16)
    assert g.tolist() == [[1, 2, 3], [2, 1, 1], [1, 1, 5]]
    assert x.shape == (6 + 2 + 5, 16 * 16 * 3)
    back = packvit.unpatchify(x, g, 16)
    for a, b in zip(images, back):
        assert torch.equal(a, b)
    # the first patch of the first image is its top-left p x p block in (p_h, p_w, C) order
    assert torch.equal(x[0], images[0][:, :16, :16].permute(1, 2, 0).reshape(-1))


@pytest.mark.parametrize(
    "grid,exc,match",
    [
        (torch.tensor([[1.0, 2.0, 2.0]]), TypeError, "grid_thw must hold integers"),
        (torch.tensor([1, 2, 2]), ValueError, r"grid_thw must have shape \[num_images, 3\]"),
        (torch.tensor([[1, 2]]), ValueError, r"grid_thw must have shape \[num_images, 3\]"),
        (torch.tensor([[1, 0, 2]]), ValueError, r"grid_thw\[0\] = \(1, 0, 2\)"),
        (torch.tensor([[1, 2, 2], [-1, 2, 2]]), ValueError, r"grid_thw\[1\].*positive"),
        ([[1, 2.5, 2]], TypeError, "integers"),
        ("1,2,2", TypeError, "grid_thw must be"),
    ],
)
def test_bad_grid(grid, exc, match, tiny_models):
    model = tiny_models["siglip2"]
    with pytest.raises(exc, match=match):
        model(torch.randn(4, 768), grid)


def test_row_count_and_patch_dim_errors(tiny_models):
    model = tiny_models["dinov3"]
    g = torch.tensor([[1, 2, 3], [2, 2, 2]])  # 6 + 8 = 14 patches
    with pytest.raises(ValueError, match="hidden_states has 13 rows but grid_thw describes 14 patches"):
        model(torch.randn(13, 768), g)
    with pytest.raises(ValueError, match=r"patch_dim 588, expected 768 \(patch_size \* patch_size \* num_channels"):
        model(torch.randn(14, 588), g)
    with pytest.raises(ValueError, match=r"\[total_patches, patch_dim\]"):
        model(torch.randn(1, 14, 768), g)
    with pytest.raises(TypeError, match="floating point"):
        model(torch.zeros(14, 768, dtype=torch.long), g)


def test_empty_batch_returns_empty_outputs(tiny_models):
    for model in tiny_models.values():
        x = torch.zeros(0, model.patch_dim)
        g = torch.zeros(0, 3, dtype=torch.long)
        assert model(x, g).shape == (0, model.hidden_size)
        out = model(x, g, return_dict=True, output_layers=[-2])
        assert out.last_hidden_state.shape == (0, model.hidden_size)
        assert out.hidden_states[len(model.blocks) - 1].shape == (0, model.hidden_size)


def test_output_layers_out_of_range(tiny_models):
    model = tiny_models["aimv2"]  # 2 blocks: 3 hidden states
    x, g = packvit.patchify([torch.randn(3, 28, 28)], 14)
    with pytest.raises(ValueError, match="output_layers entry 3 is out of range.*-3 to 2"):
        model(x, g, output_layers=[3])


def test_backend_choice_is_reported_and_validated(tiny_models):
    model = tiny_models["siglip2"]
    assert model.attn_backend == "sdpa"
    assert model.set_attention_backend("auto") == "sdpa"  # CPU fp32
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        model.set_attention_backend("flash")
    with pytest.raises(ValueError, match="'torch' is not available on cpu"):
        model.set_attention_backend("torch")
    assert model.attn_backend == "sdpa"


def test_tables_cached_under_inference_mode_serve_training(tiny_models):
    """A table first built under inference_mode must not poison a later training step."""
    from packvit.packing import build_meta

    grid = ((1, 3, 7), (2, 2, 5))
    for family, model in tiny_models.items():
        build_meta.cache_clear()
        x = torch.randn(sum(t * h * w for t, h, w in grid), model.patch_dim)
        with torch.inference_mode():
            model(x, grid)
        model.train()
        try:
            model(x.requires_grad_(), grid).square().mean().backward()
        finally:
            model.eval().zero_grad(set_to_none=True)
        assert x.grad is not None and torch.isfinite(x.grad).all(), family


def test_prepared_batch_equals_grid_and_checks_rows(tiny_models):
    """model(x, model.prepare(grid)) is model(x, grid); a prepared batch still checks the rows."""
    grid = ((1, 3, 5), (2, 2, 2))
    for family, model in tiny_models.items():
        x = torch.randn(sum(t * h * w for t, h, w in grid), model.patch_dim)
        batch = model.prepare(grid)
        assert torch.equal(model(x, batch), model(x, grid)), family
        with pytest.raises(ValueError, match="hidden_states has 22 rows but grid_thw describes 23 patches"):
            model(x[:-1], batch)
    empty = model.prepare(torch.zeros(0, 3, dtype=torch.long))
    assert empty.meta is None and model(x[:0], empty).shape == (0, model.hidden_size)
