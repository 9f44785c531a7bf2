"""Checkpoints that would convert to a wrong model,
read files outside their folder, or end in a traceback; and preprocessor_config.json carried through
convert and export-hf."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import packvit
from helpers import FAMILIES, PATCH, hf_reference, random_images, tiny_hf_model
from packvit.cli import main
from packvit.preprocess import ImageProcessor, PreprocessConfig
from weights_conversion import CheckpointError, config_of, load_model
from weights_conversion.hfconfig import transformers_defaults


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_json(f: Path, fn) -> None:
    f.write_text(json.dumps(fn(json.loads(f.read_text()))))


def _one_line_error(argv, capsys, *needles) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"packvit {argv[0]}: error:" in err, err
    for n in needles:
        assert n in err, err
    return err


# -- item 5: a missing field takes transformers' default, never packvit's preset ---------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_missing_field_takes_transformers_default(family, hf_checkpoints, tmp_path):
    transformers = pytest.importorskip("transformers")
    _, src = hf_checkpoints[family]
    d = _copy(src, tmp_path / "c")
    _edit_json(
        d / "config.json",
        lambda c: {k: v for k, v in c.items() if k not in ("num_attention_heads", "layer_norm_eps", "rms_norm_eps")},
    )
    _, cfg = config_of(d)
    hf_cfg = transformers.AutoConfig.from_pretrained(d)  # what transformers builds from the same file
    assert cfg.num_heads == hf_cfg.num_attention_heads
    assert cfg.norm_eps == getattr(hf_cfg, "rms_norm_eps", getattr(hf_cfg, "layer_norm_eps", None))


def test_missing_head_count_matches_transformers_outputs(tmp_path):
    """Issue 16's case: no num_attention_heads in config.json. packvit used its preset (16 heads) where
    transformers builds its default (12); now both build 12 and agree to 1e-4."""
    hf = tiny_hf_model("siglip2", hidden_size=48, intermediate_size=64, num_attention_heads=12)
    hf.save_pretrained(tmp_path / "c")
    _edit_json(tmp_path / "c" / "config.json", lambda c: {k: v for k, v in c.items() if k != "num_attention_heads"})
    model = load_model(tmp_path / "c", attn_backend="sdpa")
    assert model.config.num_heads == 12
    images = random_images([(1, 3, 5), (1, 2, 2)], 16)
    x, g = packvit.patchify(images, 16)
    with torch.no_grad():
        ours = model(x, g)
    ref = torch.cat([r[0] for r in hf_reference("siglip2", hf, images)])
    assert (ours - ref).abs().max().item() <= 1e-4


def test_missing_field_without_transformers_is_an_error(hf_checkpoints, tmp_path, monkeypatch, capsys):
    _, src = hf_checkpoints["dinov3"]
    d = _copy(src, tmp_path / "c")
    _edit_json(d / "config.json", lambda c: {k: v for k, v in c.items() if k != "num_attention_heads"})
    transformers_defaults.cache_clear()
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    try:
        with pytest.raises(ValueError, match=r"lacks \['num_attention_heads'\].*not installed"):
            load_model(d)
        _one_line_error(["convert", str(d), str(tmp_path / "pv"), "--no-progress"], capsys, "num_attention_heads")
    finally:
        transformers_defaults.cache_clear()
    assert not (tmp_path / "pv").exists()


def test_native_config_missing_field_is_an_error(hf_checkpoints, tmp_path, capsys):
    _, src = hf_checkpoints["siglip2"]
    assert main(["convert", str(src), str(tmp_path / "pv"), "--no-progress"]) == 0
    _edit_json(
        tmp_path / "pv" / "config.json",
        lambda c: {**c, "config": {k: v for k, v in c["config"].items() if k != "num_heads"}},
    )
    with pytest.raises(CheckpointError, match="lacks the siglip2 fields.*num_heads"):
        load_model(tmp_path / "pv")
    _one_line_error(["export-hf", str(tmp_path / "pv"), str(tmp_path / "hf")], capsys, "num_heads")


# -- item 9: malformed config files are one clear line -----------------------------------------------


BAD_CONFIGS = {
    "json-list": (lambda c: [c], "holds a JSON list"),
    "hidden-size-string": (lambda c: {**c, "hidden_size": "64"}, "hidden_size must be int, got '64'"),
    "heads-float": (lambda c: {**c, "num_attention_heads": 4.0}, "num_attention_heads must be int"),
    "bias-as-int": (lambda c: {**c, "mlp_bias": 1}, "mlp_bias must be bool"),
    "act-as-number": (lambda c: {**c, "hidden_act": 3}, "hidden_act must be str"),
    "heads-null": (lambda c: {**c, "num_attention_heads": None}, None),  # null = absent: transformers' default
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_malformed_config_is_one_line(case, hf_checkpoints, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    _, src = hf_checkpoints["dinov3"]
    d = _copy(src, tmp_path / "c")
    edit, message = BAD_CONFIGS[case]
    _edit_json(d / "config.json", edit)
    if message is None:
        assert config_of(d)[1].num_heads == transformers.DINOv3ViTConfig().num_attention_heads
        return
    _one_line_error(["convert", str(d), str(tmp_path / "pv"), "--no-progress"], capsys, message)
    assert not (tmp_path / "pv").exists()


def test_native_config_wrong_type_is_one_line(hf_checkpoints, tmp_path, capsys):
    _, src = hf_checkpoints["aimv2"]
    assert main(["convert", str(src), str(tmp_path / "pv"), "--no-progress"]) == 0
    _edit_json(tmp_path / "pv" / "config.json", lambda c: {**c, "config": {**c["config"], "hidden_size": "64"}})
    _one_line_error(["export-hf", str(tmp_path / "pv"), str(tmp_path / "hf")], capsys, "hidden_size must be int")
    (tmp_path / "pv" / "config.json").write_text("[1, 2]")
    _one_line_error(["export-hf", str(tmp_path / "pv"), str(tmp_path / "hf")], capsys, "holds a JSON list")


# -- item 6: shards stay inside the checkpoint folder -------------------------------------------------


def _two_shards(d: Path, second: str, outside: Path | None = None, duplicate: bool = False) -> None:
    sd = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = sorted(sd)
    a, b = names[: len(names) // 2], names[len(names) // 2 :]
    save_file({k: sd[k] for k in a}, d / "model-00001-of-00002.safetensors")
    target = outside if outside is not None else d / second
    save_file({k: sd[k] for k in b + (a[:1] if duplicate else [])}, target)
    wmap = {**{k: "model-00001-of-00002.safetensors" for k in a}, **{k: second for k in b}}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_shard_outside_the_folder_is_refused(where, hf_checkpoints, tmp_path, capsys):
    _, src = hf_checkpoints["dinov3"]
    d = _copy(src, tmp_path / "a" / "b" / "c")
    outside = tmp_path / "outside.safetensors"
    _two_shards(d, "../../outside.safetensors" if where == "parent" else str(outside), outside=outside)
    _one_line_error(["convert", str(d), str(tmp_path / "pv"), "--no-progress"], capsys, "outside the checkpoint folder")
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        load_model(d)


def test_tensor_in_two_shards_is_an_error(hf_checkpoints, tmp_path, capsys):
    """The duplicate-across-shards check: without it the later shard would silently win."""
    _, src = hf_checkpoints["dinov3"]
    d = _copy(src, tmp_path / "c")
    _two_shards(d, "model-00002-of-00002.safetensors", duplicate=True)
    with pytest.raises(CheckpointError, match="appears in more than one shard"):
        load_model(d)
    _one_line_error(["convert", str(d), str(tmp_path / "pv"), "--no-progress"], capsys, "more than one shard")


# -- item 8: NaN and Inf ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_weight_is_an_error_unless_allowed(value, hf_checkpoints, tmp_path, capsys):
    _, src = hf_checkpoints["siglip2"]
    d = _copy(src, tmp_path / "c")
    sd = load_file(d / "model.safetensors")
    sd["encoder.layers.1.mlp.fc1.weight"][3, 5] = value
    save_file(sd, d / "model.safetensors")
    _one_line_error(
        ["convert", str(d), str(tmp_path / "pv"), "--no-progress"],
        capsys,
        "blocks.1.mlp.fc1.weight",
        "1 NaN/Inf value",
        "--allow-nonfinite",
    )
    with pytest.raises(CheckpointError, match="NaN/Inf"):
        load_model(d)
    assert not (tmp_path / "pv").exists()
    assert main(["convert", str(d), str(tmp_path / "pv"), "--no-progress", "--allow-nonfinite"]) == 0
    assert load_model(tmp_path / "pv", allow_nonfinite=True).config.num_layers == 2


# -- preprocessor_config.json through convert and export-hf ------------------------


@pytest.fixture
def siglip2_with_processor(hf_checkpoints, tmp_path):
    _, src = hf_checkpoints["siglip2"]
    d = _copy(src, tmp_path / "hf")
    transformers = pytest.importorskip("transformers")
    transformers.Siglip2ImageProcessorPil(max_num_patches=64).save_pretrained(d)
    return d


def test_preprocessor_config_survives_convert_and_export(siglip2_with_processor, tmp_path):
    src = siglip2_with_processor
    assert main(["convert", str(src), str(tmp_path / "pv"), "--no-progress"]) == 0
    assert main(["export-hf", str(tmp_path / "pv"), str(tmp_path / "back")]) == 0
    original = json.loads((src / "preprocessor_config.json").read_text())
    for d in ("pv", "back"):
        assert json.loads((tmp_path / d / "preprocessor_config.json").read_text()) == original
    reference = PreprocessConfig.from_pretrained(src)
    assert reference.max_num_patches == 64
    for d in ("pv", "back"):
        assert PreprocessConfig.from_pretrained(tmp_path / d) == reference
    x = torch.rand(3, 70, 130)
    a, ga = ImageProcessor.from_pretrained(src)([x])
    b, gb = ImageProcessor.from_pretrained(tmp_path / "pv")([x])
    assert torch.equal(a, b) and torch.equal(ga, gb)


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_reads_a_converted_folder(family, hf_checkpoints, tmp_path):
    """Without preprocessor_config.json: the family defaults, as for the transformers folder."""
    _, src = hf_checkpoints[family]
    assert main(["convert", str(src), str(tmp_path / "pv"), "--no-progress"]) == 0
    assert not (tmp_path / "pv" / "preprocessor_config.json").exists()
    assert PreprocessConfig.from_pretrained(tmp_path / "pv") == PreprocessConfig.from_pretrained(src)
    assert PreprocessConfig.from_pretrained(tmp_path / "pv").patch_size == PATCH[family]
    assert config_of(tmp_path / "pv") == (family, load_model(tmp_path / "pv").config)


def test_tower_loads_a_converted_folder(siglip2_with_processor, tmp_path):
    import types

    from packvit.tower import PackedVisionTower

    assert main(["convert", str(siglip2_with_processor), str(tmp_path / "pv"), "--no-progress"]) == 0
    args = types.SimpleNamespace(mm_vision_select_layer=-1, mm_vision_select_feature="patch")
    tower = PackedVisionTower(str(tmp_path / "pv"), args, attn_backend="sdpa")
    ref = PackedVisionTower(str(siglip2_with_processor), args, attn_backend="sdpa")
    images = [torch.rand(3, 40, 90), torch.rand(3, 64, 32)]
    for a, b in zip(tower(images), ref(images)):
        assert torch.equal(a, b)


def test_config_is_checked_before_the_weights_are_read(hf_checkpoints, tmp_path, monkeypatch, capsys):
    """A typo in config.json fails before a byte of weights is read (a 7B read takes minutes)."""
    import weights_conversion

    _, src = hf_checkpoints["dinov3"]
    d = _copy(src, tmp_path / "c")
    _edit_json(d / "config.json", lambda c: {**c, "hidden_size": "64"})
    reads = []
    monkeypatch.setattr(weights_conversion, "load_tensors", lambda *a, **k: reads.append(a) or {})
    _one_line_error(["convert", str(d), str(tmp_path / "pv"), "--no-progress"], capsys, "hidden_size must be int")
    assert reads == []
