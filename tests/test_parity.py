"""packvit vs transformers on the same weights, fp32 on CPU: every output within 1e-4."""

from __future__ import annotations

import pytest
import torch

import packvit
from helpers import FAMILIES, PATCH, hf_reference, random_images, tiny_hf_model
from weights_conversion import load_model

ATOL = 1e-4

GRIDS = {
    "mixed_nonsquare": [(1, 5, 7), (1, 12, 4), (1, 9, 9), (1, 6, 17)],
    "axis_below_16": [(1, 3, 20), (1, 15, 2), (1, 18, 11)],  # SigLIP2's antialiasing kicks in
    "one_by_one_and_1xN": [(1, 1, 1), (1, 1, 9), (1, 7, 1), (1, 2, 2)],
    "video_frames": [(3, 4, 6), (1, 5, 5), (2, 3, 2)],
    "single_image": [(1, 6, 10)],
    "many_images": [
        (1, h, w)
        for h, w in zip(
            torch.randint(1, 13, (22,), generator=torch.Generator().manual_seed(7)).tolist(),
            torch.randint(1, 13, (22,), generator=torch.Generator().manual_seed(8)).tolist(),
        )
    ],
}


def _close(a: torch.Tensor, b: torch.Tensor, what: str):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs HF {tuple(b.shape)}"
    err = (a - b).abs().max().item()
    assert err <= ATOL, f"{what}: max abs error {err:.3g} > {ATOL}"


@pytest.mark.parametrize("grid_name", list(GRIDS))
@pytest.mark.parametrize("family", FAMILIES)
def test_parity_all_outputs(family, grid_name, hf_checkpoints, packvit_models):
    hf, _ = hf_checkpoints[family]
    model = packvit_models[family]
    grid = GRIDS[grid_name]
    images = random_images(grid, PATCH[family], seed=len(grid))
    x, grid_thw = packvit.patchify(images, PATCH[family])
    n_layers = len(model.blocks)
    layers = [0, 1, -2, -1]
    with torch.no_grad():
        out = model(x, grid_thw, return_dict=True, output_layers=layers)
    ref = hf_reference(family, hf, images, output_hidden_states=True)

    _close(out.last_hidden_state, torch.cat([r[0] for r in ref]), "last_hidden_state")
    _close(out.pooler_output, torch.cat([r[2] for r in ref]), "pooler_output")
    if model.num_prefix:
        _close(out.prefix_tokens, torch.stack([r[1] for r in ref]), "prefix_tokens")
    P = model.num_prefix
    for i in layers:
        k = i % (n_layers + 1)
        _close(out.hidden_states[k], torch.cat([r[3][k][0, P:] for r in ref]), f"hidden_states[{i}]")
        if P:
            _close(
                out.prefix_hidden_states[k], torch.stack([r[3][k][0, :P] for r in ref]), f"prefix_hidden_states[{i}]"
            )


def test_layers_are_distinct(packvit_models):
    """Guards the layer test above against comparing the same tensor to itself."""
    model = packvit_models["aimv2"]
    x, g = packvit.patchify(random_images([(1, 4, 5)], 14), 14)
    out = model(x, g, output_layers=[0, 1, 2])
    assert not torch.allclose(out.hidden_states[0], out.hidden_states[1])
    assert not torch.allclose(out.hidden_states[1], out.hidden_states[2])


@pytest.mark.parametrize("family", FAMILIES)
def test_packing_invariance(family, packvit_models):
    """Each image's output is the same alone as inside a batch."""
    model = packvit_models[family]
    grid = [(1, 5, 7), (2, 3, 3), (1, 1, 4), (1, 9, 2)]
    images = random_images(grid, PATCH[family], seed=3)
    x, g = packvit.patchify(images, PATCH[family])
    with torch.no_grad():
        batch = packvit.split_by_image(model(x, g), g)
        for img, b in zip(images, batch):
            xi, gi = packvit.patchify([img], PATCH[family])
            assert (model(xi, gi) - b).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("aimv2", dict(use_head=False)),
        ("aimv2", dict(qkv_bias=True, mlp_bias=True)),
        ("dinov3", dict(use_gated_mlp=True, hidden_act="silu", num_register_tokens=0)),
        ("dinov3", dict(key_bias=True, layerscale_value=0.1, mlp_bias=False, proj_bias=False)),
        ("siglip2", dict(vision_use_head=False, num_patches=64)),
    ],
)
def test_parity_config_variants(family, overrides, tmp_path):
    hf = tiny_hf_model(family, seed=5, **overrides)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path, attn_backend="sdpa")
    grid = [(1, 5, 3), (2, 2, 7)]
    images = random_images(grid, PATCH[family], seed=1)
    x, g = packvit.patchify(images, PATCH[family])
    with torch.no_grad():
        out = model(x, g, return_dict=True)
    ref = hf_reference(family, hf, images)
    _close(out.last_hidden_state, torch.cat([r[0] for r in ref]), "last_hidden_state")
    if ref[0][2] is not None and out.pooler_output is not None:
        _close(out.pooler_output, torch.cat([r[2] for r in ref]), "pooler_output")
    else:
        assert out.pooler_output is None and ref[0][2] is None


def test_siglip2_padded_batch_reference(hf_checkpoints, packvit_models):
    """Against HF run the way users run it: one padded batch with pixel_attention_mask."""
    hf, _ = hf_checkpoints["siglip2"]
    model = packvit_models["siglip2"]
    grid = [(1, 5, 7), (1, 3, 20), (1, 16, 16), (1, 1, 2)]
    images = random_images(grid, 16, seed=11)
    x, g = packvit.patchify(images, 16)
    n = max(h * w for _, h, w in grid)
    pv = torch.zeros(len(grid), n, x.shape[1])
    mask = torch.zeros(len(grid), n, dtype=torch.long)
    for i, chunk in enumerate(packvit.split_by_image(x, g)):
        pv[i, : len(chunk)], mask[i, : len(chunk)] = chunk, 1
    with torch.no_grad():
        ref = hf(pixel_values=pv, pixel_attention_mask=mask, spatial_shapes=g[:, 1:])
        out = model(x, g, return_dict=True)
    _close(out.last_hidden_state, ref.last_hidden_state[mask.bool()], "last_hidden_state")
    _close(out.pooler_output, ref.pooler_output, "pooler_output")
