"""Training behaviour on CPU, fp32: gradients vs transformers, checkpointing, drop path, RoPE
augmentation switch, torch.compile.

Gradient criterion, for every parameter and the input: with g the packvit gradient and r the
transformers gradient (converted to packvit's layout by the same weight conversion as the weights),
    max |g - r| <= 1e-4 * max(1, max |r|).
"""

from __future__ import annotations

import types

import pytest
import torch

import packvit
from helpers import PATCH, random_images, tiny_hf_model
from packvit.layers import DropPath
from packvit.packing import build_meta, grid_to_tuple
from packvit.tower import PackedVisionTower
from weights_conversion import FAMILIES, convert_state_dict, load_model
from weights_conversion.reference import run_twin

GRID = [(1, 5, 7), (1, 3, 2), (2, 2, 4), (1, 1, 9)]


def _assert_grad_close(g: torch.Tensor, r: torch.Tensor, what: str):
    assert g.shape == r.shape, f"{what}: shape {tuple(g.shape)} vs {tuple(r.shape)}"
    tol = 1e-4 * max(1.0, r.abs().max().item())
    err = (g - r).abs().max().item()
    assert err <= tol, f"{what}: max abs diff {err:.3g} > {tol:.3g}"


def _weights(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _hf_grads_in_packvit_layout(hf) -> dict[str, torch.Tensor]:
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in hf.named_parameters()}
    _, _, sd, _ = convert_state_dict(hf.config.to_dict(), grads)
    return sd


@pytest.mark.parametrize("family", ["siglip2", "dinov3", "aimv2"])
def test_gradients_match_transformers(family, hf_checkpoints):
    """Scalar loss on patch tokens and the pooled output of a mixed-resolution batch."""
    hf, d = hf_checkpoints[family]
    hf = hf.float().requires_grad_(True)
    hf.zero_grad(set_to_none=True)
    model = load_model(d, attn_backend="sdpa")
    p = PATCH[family]
    images = [im.requires_grad_(True) for im in random_images(GRID, p, seed=4)]
    x, g = packvit.patchify(images, p)
    out = model(x, g, return_dict=True)
    w_tok = _weights(x.shape[0], model.hidden_size, 1)
    w_pool = _weights(out.pooler_output.shape[0], out.pooler_output.shape[1], 2)
    ((out.last_hidden_state * w_tok).sum() + (out.pooler_output * w_pool).sum()).backward()

    frames = [f for im in images for f in (im.unbind(0) if im.dim() == 4 else [im])]
    ref_frames = [f.detach().clone().requires_grad_(True) for f in frames]
    # The way transformers runs each family: one padded batch with a mask (NaFlex), or one call
    # per frame (models without a padded-batch mode), losses summed.
    groups = [ref_frames] if FAMILIES[family].hf_pads else [[f] for f in ref_frames]
    loss, start, i = 0.0, 0, 0
    for group in groups:
        o = run_twin(family, hf, group)
        for tok, pooled in zip(o.patch_tokens, o.pooler_output):
            loss = loss + (tok * w_tok[start : start + len(tok)]).sum() + (pooled * w_pool[i]).sum()
            start, i = start + len(tok), i + 1
    loss.backward()

    ref_inputs = torch.cat([f.grad.flatten() for f in ref_frames])
    _assert_grad_close(torch.cat([im.grad.flatten() for im in images]), ref_inputs, "input gradient")
    ref = _hf_grads_in_packvit_layout(hf)
    params = dict(model.named_parameters())
    assert set(params) <= set(ref), f"no reference gradient for {sorted(set(params) - set(ref))}"
    for name, prm in params.items():
        assert prm.grad is not None, f"{name} got no gradient"
        _assert_grad_close(prm.grad, ref[name], name)
    hf.zero_grad(set_to_none=True)


def _grads(model, x, g, seed=0):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = model(x, g, return_dict=True)
    loss = (out.last_hidden_state * _weights(*out.last_hidden_state.shape, seed)).sum()
    if out.pooler_output is not None:
        loss = loss + out.pooler_output.square().sum()
    loss.backward()
    return x.grad, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", [True, "mlp"])
@pytest.mark.parametrize("family", ["siglip2", "dinov3", "aimv2"])
def test_gradient_checkpointing_same_gradients(family, mode, hf_checkpoints):
    model = load_model(hf_checkpoints[family][1], attn_backend="sdpa").train()
    x, g = packvit.patchify(random_images(GRID, PATCH[family], seed=6), PATCH[family])
    gx, gp = _grads(model, x, g)
    model.gradient_checkpointing = mode
    gx2, gp2 = _grads(model, x, g)
    assert torch.allclose(gx, gx2, atol=1e-6, rtol=0)
    for n in gp:
        assert torch.allclose(gp[n], gp2[n], atol=1e-6, rtol=0), n


def test_gradient_checkpointing_rejects_unknown_modes(hf_checkpoints):
    model = load_model(hf_checkpoints["dinov3"][1], attn_backend="sdpa")
    model.gradient_checkpointing = "block"
    assert model.gradient_checkpointing is True
    with pytest.raises(ValueError, match="gradient_checkpointing must be"):
        model.gradient_checkpointing = "attention"


def _meta(grid):
    return build_meta(grid_to_tuple(grid), 0, torch.device("cpu"))


def test_drop_path_per_frame_and_unbiased():
    meta = _meta([(1, 3, 3), (2, 2, 2), (1, 1, 5)])  # 4 frames: 9, 4, 4, 5 tokens
    dp = DropPath(0.25)
    x = torch.ones(meta.num_tokens, 8)
    assert torch.equal(dp.eval()(x, meta), x), "identity in eval mode"
    dp.train()
    torch.manual_seed(0)
    outs = torch.stack([dp(x, meta) for _ in range(4000)])  # (draws, T, 8)
    for f, (a, b) in enumerate(zip(meta.cu_seqlens[:-1].tolist(), meta.cu_seqlens[1:].tolist())):
        vals = outs[:, a:b]
        first = vals[:, :1, :1]
        assert torch.equal(vals, first.expand_as(vals)), f"frame {f} is not dropped as a whole"
        assert set(first.unique().tolist()) == {0.0, torch.tensor(1 / 0.75).item()}
    mean = outs.mean(0)
    assert (mean - 1).abs().max() < 0.05, "expected value is preserved"
    # frames are dropped independently: some draw keeps frame 0 and drops frame 1
    kept = outs[:, meta.cu_seqlens[:-1].long(), 0] > 0  # (draws, F)
    assert (kept[:, 0] & ~kept[:, 1]).any() and (~kept[:, 0] & kept[:, 1]).any()


def test_drop_path_in_model(tmp_path):
    hf = tiny_hf_model("dinov3", seed=2, drop_path_rate=0.5)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path, attn_backend="sdpa")
    assert model.config.drop_path_rate == 0.5 and model.blocks[0].drop_path is not None
    x, g = packvit.patchify(random_images(GRID, 16, seed=2), 16)
    with torch.no_grad():
        ev = model.eval()(x, g)
        ref = hf.eval()(pixel_values=random_images([(1, 5, 7)], 16, seed=2)[0][None]).last_hidden_state[0, 5:]
        assert (ev[:35] - ref).abs().max() < 1e-4, "eval mode ignores drop path"
        model.train()
        torch.manual_seed(1)
        a = model(x, g)
        torch.manual_seed(1)
        b = model(x, g)
        c = model(x, g)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.allclose(a, ev)


@pytest.fixture(scope="module")
def rope_aug_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("dinov3-aug")
    hf = tiny_hf_model("dinov3", seed=3, pos_embed_shift=0.1, pos_embed_jitter=1.3, pos_embed_rescale=2.0)
    hf.save_pretrained(d)
    model = load_model(d, attn_backend="sdpa")
    c = hf.config  # the augmentation settings come from config.json
    assert (model.config.pos_embed_shift, model.config.pos_embed_jitter, model.config.pos_embed_rescale) == (
        c.pos_embed_shift,
        c.pos_embed_jitter,
        c.pos_embed_rescale,
    )
    return hf, model


def test_rope_augmentation_off_by_default(rope_aug_pair):
    _, model = rope_aug_pair
    assert model.rope_augmentation is False
    x, g = packvit.patchify(random_images(GRID, 16, seed=8), 16)
    with torch.no_grad():
        assert torch.equal(model.train()(x, g), model.eval()(x, g)), "train mode alone must not perturb RoPE"


def test_rope_augmentation_matches_transformers_when_on(rope_aug_pair):
    hf, model = rope_aug_pair
    img = random_images([(1, 4, 6)], 16, seed=9)[0]
    x, g = packvit.patchify([img], 16)
    model.rope_augmentation = True
    try:
        with torch.no_grad():
            torch.manual_seed(123)
            ref = hf.train()(pixel_values=img[None]).last_hidden_state[0, 5:]
            torch.manual_seed(123)
            out = model.train()(x, g)
            assert (out - ref).abs().max() < 1e-4, "same draws as transformers for a one-frame batch"
            assert not torch.allclose(out, model.eval()(x, g), atol=1e-3), "augmentation is active"
            ref_eval = hf.eval()(pixel_values=img[None]).last_hidden_state[0, 5:]
            assert (model.eval()(x, g) - ref_eval).abs().max() < 1e-4, "eval mode: no augmentation, as HF"
            # Per-frame draws: two copies of one image in one batch get different positions.
            x2, g2 = packvit.patchify([img, img], 16)
            model.train()
            pair = packvit.split_by_image(model(x2, g2), g2)
            assert not torch.allclose(pair[0], pair[1], atol=1e-3)
    finally:
        model.rope_augmentation = False
        model.eval()


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------


def _compile_counters():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.slow
@pytest.mark.parametrize("select_feature", ["patch", "cls_patch"])
def test_compile_fullgraph_tower(select_feature, hf_checkpoints):
    """The whole DINOv3 tower (the richest path: prefix tokens, RoPE) under fullgraph=True, so no
    graph break can pass: outputs equal eager, and batches of new grids do not recompile once dynamo
    has made the token counts dynamic. The batch is prepared eagerly (``tower.prepare``), so the
    compiled code sees tensors and integers, never the grid."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    _, d = hf_checkpoints["dinov3"]
    args = types.SimpleNamespace(mm_vision_select_layer=-2, mm_vision_select_feature=select_feature)
    tower = PackedVisionTower(d, args, attn_backend="sdpa")
    compiled = torch.compile(tower, fullgraph=True)
    p = PATCH["dinov3"]
    grids = [
        [(1, 2, 3), (1, 3, 3)],
        [(1, 4, 5), (2, 1, 3), (1, 2, 2)],
        [(1, 3, 2), (1, 5, 4)],
        [(1, 2, 2), (1, 4, 4), (1, 3, 6), (1, 1, 2)],
        [(1, 2, 3), (1, 3, 3)],
    ]
    graphs = []
    for i, grid in enumerate(grids):
        x, _ = packvit.patchify(random_images(grid, p, seed=i), p)
        feats, _ = compiled(x, grid_thw=tower.prepare(grid), packed=True)
        eager, _ = tower(x, grid_thw=grid, packed=True)
        assert torch.allclose(feats, eager, atol=1e-5, rtol=1e-5)
        graphs.append(_compile_counters())
    # The first batch compiles with static sizes, the second marks them dynamic; after that no grid,
    # new or seen, compiles again.
    assert graphs[1:] == [graphs[1]] * (len(grids) - 1), f"graphs after each batch: {graphs}"
    torch._dynamo.reset()


@pytest.mark.slow
def test_compile_fullgraph_training_step():
    """Forward and backward of a compiled model on batches of different grids: gradients equal eager."""
    from packvit import DINOv3, DINOv3Config

    torch._dynamo.reset()
    cfg = DINOv3Config(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, num_register_tokens=2)
    torch.manual_seed(0)
    model = DINOv3(cfg).train()
    compiled = torch.compile(model, fullgraph=True)
    for i, grid in enumerate([[(1, 2, 3), (1, 3, 3)], [(1, 4, 2), (2, 2, 2)], [(1, 3, 5)]]):
        x = torch.randn(sum(t * h * w for t, h, w in grid), model.patch_dim, generator=torch.Generator().manual_seed(i))
        grads = []
        for fn, batch in ((compiled, model.prepare(grid)), (model, grid)):
            model.zero_grad(set_to_none=True)
            fn(x, batch).square().mean().backward()
            grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        for k in grads[0]:
            torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-5, rtol=1e-4, msg=k)
    torch._dynamo.reset()
