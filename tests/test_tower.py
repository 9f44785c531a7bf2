"""The LLaVA vision tower: contract, feature selection, freezing, and the README example."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
import torch

import packvit
from helpers import PATCH, hf_reference, random_images, torch_kernel_for_bf16_on_cpu
from packvit.tower import PackedVisionTower

README = Path(__file__).resolve().parents[1] / "README.md"


def _args(**kw):
    return types.SimpleNamespace(**kw)


@pytest.mark.parametrize("family", ["siglip2", "dinov3", "aimv2"])
def test_contract_and_select_layer(family, hf_checkpoints):
    hf, d = hf_checkpoints[family]
    tower = PackedVisionTower(d, _args(), attn_backend="sdpa")
    assert tower.is_loaded and tower.select_layer == -2 and tower.select_feature == "patch"
    assert tower.hidden_size == 64 and tower.dtype == torch.float32 and tower.device.type == "cpu"
    assert tower.dummy_feature.shape == (1, 64)
    assert tower.image_processor.image_mean and tower.image_processor.image_std
    assert not any(p.requires_grad for p in tower.parameters())
    # -2 of 2 blocks: only block 1 is built; no final norm, no head (LLaVA's SigLIP tower does the same)
    assert len(tower.vision_tower.blocks) == 1 and isinstance(tower.vision_tower.norm, torch.nn.Identity)
    assert getattr(tower.vision_tower, "head", None) is None

    grid = [(1, 3, 5), (2, 2, 2), (1, 4, 1)]
    images = random_images(grid, PATCH[family])
    x, g = packvit.patchify(images, PATCH[family])
    feats = tower(x, grid_thw=g)
    assert [f.shape for f in feats] == [(t * h * w, 64) for t, h, w in grid]
    P = tower.vision_tower.num_prefix
    ref = torch.cat([r[3][-2][0, P:] for r in hf_reference(family, hf, images, output_hidden_states=True)])
    err = (torch.cat(feats) - ref).abs().max().item()
    assert err <= 1e-4, f"tower vs HF hidden_states[-2]: {err:.3g}"  # the parity suite's tolerance
    packed, g2 = tower(x, grid_thw=g, packed=True)
    assert torch.equal(packed, torch.cat(feats)) and torch.equal(g2, g)


def test_cls_patch_for_dinov3(hf_checkpoints):
    _, d = hf_checkpoints["dinov3"]
    tower = PackedVisionTower(d, _args(mm_vision_select_feature="cls_patch", mm_vision_select_layer=-1))
    grid = [(1, 2, 3), (2, 3, 1)]
    x, g = packvit.patchify(random_images(grid, 16, seed=2), 16)
    out = tower.vision_tower(x, g, output_layers=[-1])
    k = len(tower.vision_tower.blocks)
    feats = tower(x, grid_thw=g)
    assert [f.shape[0] for f in feats] == [1 + 6, 2 * (1 + 3)]
    cls, patches = out.prefix_hidden_states[k][:, 0], out.hidden_states[k]
    # image 0: [CLS, 6 patches]; image 1 (2 frames): [CLS_1, 3 patches, CLS_2, 3 patches]
    assert torch.equal(feats[0], torch.cat([cls[:1], patches[:6]]))
    assert torch.equal(feats[1], torch.cat([cls[1:2], patches[6:9], cls[2:3], patches[9:12]]))
    packed, _ = tower(x, grid_thw=g, packed=True)
    assert [t.shape[0] for t in tower.split(packed, g)] == [7, 8]


def test_cls_patch_rejected_without_cls(hf_checkpoints):
    _, d = hf_checkpoints["siglip2"]
    with pytest.raises(ValueError, match="cls_patch.*needs a model with a CLS token"):
        PackedVisionTower(d, _args(mm_vision_select_feature="cls_patch"))
    with pytest.raises(ValueError, match="mm_vision_select_feature must be one of"):
        PackedVisionTower(d, _args(mm_vision_select_feature="cls"))


def test_raw_images_go_through_the_processor(hf_checkpoints):
    _, d = hf_checkpoints["siglip2"]
    tower = PackedVisionTower(d, _args())
    imgs = [
        torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8),
        torch.randint(0, 256, (3, 33, 200), dtype=torch.uint8),
    ]
    feats = tower(imgs)
    x, g = tower.image_processor(imgs)
    assert [f.shape[0] for f in feats] == g.prod(1).tolist()
    assert torch.equal(torch.cat(feats), tower(x, grid_thw=g, packed=True)[0])


def test_frozen_by_default_and_trainable_on_request(hf_checkpoints):
    _, d = hf_checkpoints["dinov3"]
    tower = PackedVisionTower(d, _args()).train()
    assert not tower.vision_tower.training, "a frozen tower stays in eval mode"
    x, g = packvit.patchify(random_images([(1, 2, 2)], 16), 16)
    assert not tower(x, grid_thw=g)[0].requires_grad  # no graph at all when nothing is trainable

    trainable = PackedVisionTower(d, _args(unfreeze_mm_vision_tower=True)).train()
    assert trainable.vision_tower.training and all(p.requires_grad for p in trainable.vision_tower.parameters())
    x.requires_grad_(True)
    trainable(x, grid_thw=g)[0].sum().backward()
    assert trainable.vision_tower.patch_embed.weight.grad is not None and x.grad is not None


@pytest.mark.parametrize("family", ["siglip2", "dinov3", "aimv2"])
def test_unfrozen_the_llava_way_trains(family, hf_checkpoints):
    """LLaVA-NeXT's mm_tunable_parts unfreezes with requires_grad_(True) on the tower's parameters,
    after load: every tensor of the (truncated) tower must then get a gradient, in train mode."""
    _, d = hf_checkpoints[family]
    tower = PackedVisionTower(d, _args(mm_vision_select_layer=-1)).train()
    for name, p in tower.named_parameters():  # train.py: `if "vision_tower" in name: p.requires_grad_(True)`
        if "vision_tower" in name:
            p.requires_grad_(True)
    x, g = packvit.patchify(random_images([(1, 2, 3), (1, 3, 1)], PATCH[family]), PATCH[family])
    assert tower.trainable
    sum(f.square().sum() for f in tower(x, grid_thw=g)).backward()
    assert tower.vision_tower.training, "a trainable tower follows .train()"
    missing = [n for n, p in tower.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"
    tower.requires_grad_(False)  # frozen again: eval mode at the next forward, no graph
    assert not tower(x, grid_thw=g)[0].requires_grad and not tower.vision_tower.training


def test_delay_load(hf_checkpoints):
    _, d = hf_checkpoints["aimv2"]
    tower = PackedVisionTower(d, _args(), delay_load=True)
    assert not tower.is_loaded and tower.hidden_size == 64
    with pytest.raises(RuntimeError, match="not loaded"):
        tower([torch.zeros(3, 28, 28)])
    tower.load_model()
    assert tower.is_loaded and len(tower([torch.zeros(3, 28, 28)])) == 1


def test_readme_example_runs(hf_checkpoints, monkeypatch, capsys):
    """The README's tower + projector snippet, run as written on a tiny SigLIP2 checkpoint."""
    text = README.read_text()
    section = text[text.index("## LLaVA vision tower") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    _, d = hf_checkpoints["siglip2"]
    code = re.sub(r'ckpt = "[^"]+"', f"ckpt = {str(d)!r}", code)
    monkeypatch.chdir(README.parent)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    proj, grid = scope["projector"], scope["grid"]
    assert grid.shape[0] == 4 and grid[-1, 0] == 2  # 3 photos + a 2-frame video
    assert all(p.grad is None for p in proj.parameters())  # zeroed after the step...
    assert all(p.requires_grad for p in proj.parameters())
    assert [t.shape[1] for t in scope["per_image"]] == [256] * 4
    assert "(" in capsys.readouterr().out


def test_a_moved_tower_chooses_its_attention_for_where_it_now_is(hf_checkpoints, monkeypatch):
    """LLaVA moves the tower after loading it (tower.to(device, dtype)); the model keeps its choice
    when moved, so the tower makes an "auto" choice again at its next forward. A "torch" kernel that
    would win in bf16 is faked here by the sdpa reference."""
    _, d = hf_checkpoints["siglip2"]
    tower = PackedVisionTower(d, _args())
    assert tower.vision_tower.attention.name == "sdpa"

    torch_kernel_for_bf16_on_cpu(monkeypatch)
    tower.to(torch.bfloat16)
    assert tower.vision_tower.attention.name == "sdpa"  # kept by the move
    x, g = packvit.patchify(random_images([(1, 3, 5)], PATCH["siglip2"]), PATCH["siglip2"])
    feats = tower(x, grid_thw=g)
    assert feats[0].dtype == torch.bfloat16
    assert tower.vision_tower.attention.name == "torch" and tower.vision_tower.attention.dtype == torch.bfloat16
