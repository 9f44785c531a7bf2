"""Checkpoint layouts on the hub, strict conversion, and the bit-exact round trip back to HF."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import packvit
from helpers import FAMILIES, PATCH, assert_hf_export_exact, random_images, randomize_, tiny_hf_config, tiny_hf_model
from weights_conversion import CheckpointError, ConversionError, export_hf, load_model

transformers = pytest.importorskip("transformers")


def _encode(model, family, seed=0):
    images = random_images([(1, 4, 6), (2, 3, 2)], PATCH[family], seed=seed)
    x, g = packvit.patchify(images, PATCH[family])
    with torch.no_grad():
        return model(x, g, return_dict=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bit_exact_and_loads_in_transformers(family, hf_checkpoints, packvit_models, tmp_path):
    hf, src = hf_checkpoints[family]
    export_hf(packvit_models[family], tmp_path / "out")
    assert_hf_export_exact(hf, src, tmp_path / "out")
    # and packvit reads its own export back to the same outputs
    again = load_model(tmp_path / "out", attn_backend="sdpa")
    assert torch.equal(
        _encode(again, family).last_hidden_state, _encode(packvit_models[family], family).last_hidden_state
    )


def test_dinov3_both_layer_spellings(hf_checkpoints, packvit_models, tmp_path):
    """Hub DINOv3 files say layer.N.; transformers 5 names the stack model.layer.N. in memory."""
    _, src = hf_checkpoints["dinov3"]
    sd = load_file(src / "model.safetensors")
    assert any(k.startswith("layer.0.") for k in sd)  # the spelling the hub files (and save_pretrained) use
    other = {"model." + k if k.startswith("layer.") else k: v for k, v in sd.items()}
    save_file(other, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    model = load_model(tmp_path, attn_backend="sdpa")
    assert torch.equal(
        _encode(model, "dinov3").last_hidden_state, _encode(packvit_models["dinov3"], "dinov3").last_hidden_state
    )


@pytest.mark.parametrize("prefixed", [False, True])
def test_siglip2_dual_tower_checkpoint(tmp_path, prefixed):
    """The hub's google/siglip2-*-naflex files hold the whole Siglip2Model; the text tower is dropped."""
    vcfg = tiny_hf_config("siglip2").to_dict()
    tcfg = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=64,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    full = randomize_(
        transformers.Siglip2Model(transformers.Siglip2Config(text_config=tcfg, vision_config=vcfg))
    ).eval()
    full.save_pretrained(tmp_path)
    model = load_model(tmp_path, attn_backend="sdpa")
    images = random_images([(1, 5, 9), (1, 2, 3)], 16, seed=2)
    x, g = packvit.patchify(images, 16)
    with torch.no_grad():
        ours = model(x, g)
        refs = []
        for img in images:
            h, w = img.shape[1] // 16, img.shape[2] // 16
            pv = packvit.convert_to_packing_format(img[None], 16)[None]
            refs.append(
                full.vision_model(
                    pixel_values=pv,
                    pixel_attention_mask=torch.ones(1, h * w, dtype=torch.long),
                    spatial_shapes=torch.tensor([[h, w]]),
                ).last_hidden_state[0]
            )
    assert (ours - torch.cat(refs)).abs().max().item() <= 1e-4


def test_sharded_checkpoint(tmp_path):
    hf = tiny_hf_model("dinov3")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model = load_model(tmp_path, attn_backend="sdpa")
    ref = load_model_from_single(hf, tmp_path.parent / "single")
    assert torch.equal(_encode(model, "dinov3").last_hidden_state, _encode(ref, "dinov3").last_hidden_state)


def load_model_from_single(hf, d):
    hf.save_pretrained(d)
    return load_model(d, attn_backend="sdpa")


# -- strictness -----------------------------------------------------------------------------------


def _copy_ckpt(src, dst, edit_state=None, edit_config=None):
    dst.mkdir(parents=True, exist_ok=True)
    sd = load_file(src / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    if edit_state:
        sd = edit_state(sd)
    if edit_config:
        cfg = edit_config(cfg)
    save_file(sd, dst / "model.safetensors")
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_missing_tensor_is_an_error(hf_checkpoints, tmp_path):
    _, src = hf_checkpoints["aimv2"]
    d = _copy_ckpt(
        src, tmp_path / "c", edit_state=lambda sd: {k: v for k, v in sd.items() if "layers.1.ffn.up_proj" not in k}
    )
    with pytest.raises(ConversionError, match="missing .*layers.1.ffn.up_proj"):
        load_model(d)


def test_unexpected_tensor_is_an_error(hf_checkpoints, tmp_path):
    _, src = hf_checkpoints["siglip2"]
    d = _copy_ckpt(src, tmp_path / "c", edit_state=lambda sd: {**sd, "encoder.layers.0.extra.weight": torch.zeros(3)})
    with pytest.raises(ConversionError, match="does not understand.*extra"):
        load_model(d)


def test_wrong_shape_is_an_error(hf_checkpoints, tmp_path):
    _, src = hf_checkpoints["dinov3"]
    d = _copy_ckpt(src, tmp_path / "c", edit_config=lambda c: {**c, "intermediate_size": c["intermediate_size"] + 32})
    with pytest.raises(ConversionError, match="wrong shape.*mlp.fc1"):
        load_model(d)


def test_unknown_model_type_is_an_error(hf_checkpoints, tmp_path):
    _, src = hf_checkpoints["dinov3"]
    d = _copy_ckpt(src, tmp_path / "c", edit_config=lambda c: {**c, "model_type": "vit"})
    with pytest.raises(CheckpointError, match="unknown checkpoint layout.*'vit'"):
        load_model(d)


def test_unknown_config_field_is_an_error(hf_checkpoints, tmp_path):
    _, src = hf_checkpoints["aimv2"]
    d = _copy_ckpt(src, tmp_path / "c", edit_config=lambda c: {**c, "use_fancy_norm": True})
    with pytest.raises(ValueError, match="use_fancy_norm"):
        load_model(d)
    with pytest.warns(UserWarning, match="use_fancy_norm"):
        load_model(d, strict_config=False)


def test_fixed_size_aimv2_is_refused(hf_checkpoints, tmp_path):
    _, src = hf_checkpoints["aimv2"]
    d = _copy_ckpt(src, tmp_path / "c", edit_config=lambda c: {**c, "is_native": False})
    with pytest.raises(ValueError, match="native"):
        load_model(d)


@pytest.mark.parametrize(
    "cls,family",
    [(packvit.AIMv2Packing, "dinov3"), (packvit.DINOv3ViTPacking, "siglip2"), (packvit.Siglip2NaflexPacking, "aimv2")],
)
def test_seed_class_refuses_other_family(cls, family, hf_checkpoints):
    _, src = hf_checkpoints[family]
    with pytest.raises(CheckpointError, match=f"describes a {family} model"):
        cls(ckpt=str(src), device="cpu")


@pytest.mark.parametrize(
    "cls,family",
    [(packvit.AIMv2Packing, "aimv2"), (packvit.DINOv3ViTPacking, "dinov3"), (packvit.Siglip2NaflexPacking, "siglip2")],
)
def test_seed_classes(cls, family, hf_checkpoints, packvit_models):
    _, src = hf_checkpoints[family]
    seed = cls(ckpt=str(src), device="cpu", attn_backend="sdpa")
    x, g = packvit.patchify(random_images([(1, 3, 5)], PATCH[family]), PATCH[family])
    assert seed.attn_backend == "sdpa"
    assert torch.equal(seed(x, g), packvit_models[family](x, g))
    assert type(packvit.from_pretrained(str(src))).__name__ == type(packvit_models[family]).__name__


def test_pickles_need_permission(hf_checkpoints, tmp_path):
    hf, _ = hf_checkpoints["dinov3"]
    (tmp_path / "config.json").write_text(hf.config.to_json_string())
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle"):
        load_model(tmp_path)
    model = load_model(tmp_path, allow_pickle=True, attn_backend="sdpa")
    assert model.config.num_layers == 2


def test_missing_shard_and_corrupted_file(hf_checkpoints, tmp_path):
    hf = tiny_hf_model("siglip2")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_model(tmp_path / "sharded")
    _, src = hf_checkpoints["siglip2"]
    d = _copy_ckpt(src, tmp_path / "trunc")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_model(d)


def test_siglip2_config_without_vision_use_head_builds_the_head():
    """transformers 4.x writes no ``vision_use_head`` and its model then builds the head; a config.json
    from it must read the same way (not as an error for a field transformers 4.x has no default for)."""
    from weights_conversion.families import FAMILIES as REGISTRY

    fam = REGISTRY["siglip2"]
    d = fam.config_to_hf(fam.config_class.from_name(fam.default_preset))
    del d["vision_use_head"]
    assert fam.config_from_hf(d).use_head is True
    d["vision_use_head"] = False
    assert fam.config_from_hf(d).use_head is False
