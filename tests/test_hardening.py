"""Hardening: property tests of the packed format, broken checkpoints, pickles, extreme grids."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import packvit
from helpers import PATCH, tiny_hf_model
from packvit.cli import main
from packvit.packing import build_meta, grid_to_tuple
from weights_conversion import CheckpointError, load_model

FAST = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
grids = st.lists(st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=4)


# -- property tests ---------------------------------------------------------------------------------


@FAST
@given(grid=grids, patch=st.sampled_from([1, 2, 3]), channels=st.sampled_from([1, 3]), seed=st.integers(0, 2**16))
def test_patchify_unpatchify_round_trip(grid, patch, channels, seed):
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(t, channels, h * patch, w * patch, generator=g) for t, h, w in grid]
    images = [x if x.shape[0] > 1 else x[0] for x in images]
    hidden, grid_thw = packvit.patchify(images, patch)
    assert hidden.shape == (sum(t * h * w for t, h, w in grid), patch * patch * channels)
    assert grid_thw.tolist() == [list(r) for r in grid]
    back = packvit.unpatchify(hidden, grid_thw, patch, channels)
    assert len(back) == len(images) and all(torch.equal(a, b) for a, b in zip(back, images))


@FAST
@given(grid=grids, num_prefix=st.integers(0, 5))
def test_meta_invariants(grid, num_prefix):
    meta = build_meta(grid_to_tuple(grid), num_prefix, torch.device("cpu"))
    frames = [(h, w) for t, h, w in grid for _ in range(t)]
    cu = meta.cu_seqlens
    assert cu.dtype == torch.int32 and cu.shape == (len(frames) + 1,) and cu[0] == 0
    seg = (cu[1:] - cu[:-1]).tolist()
    assert all(s > 0 for s in seg) and seg == [num_prefix + h * w for h, w in frames]  # strictly increasing
    assert cu[-1].item() == meta.num_tokens == sum(seg)
    assert isinstance(meta.max_seqlen, int) and meta.max_seqlen == max(seg)
    assert meta.patch_cu_seqlens.dtype == torch.int32 and meta.patch_cu_seqlens[-1].item() == meta.num_patches
    if num_prefix:  # patch and prefix positions partition the packed sequence, prefixes first in each frame
        idx = torch.cat([meta.patch_index, meta.prefix_index]).sort().values
        assert torch.equal(idx, torch.arange(meta.num_tokens))
        assert torch.equal(meta.prefix_index.view(-1, num_prefix)[:, 0], cu[:-1].long())


@pytest.mark.parametrize("family", ["dinov3", "siglip2", "aimv2"])
def test_outputs_shapes_and_order(family, packvit_models):
    model = packvit_models[family]
    p = PATCH[family]

    @FAST
    @given(grid=grids, seed=st.integers(0, 2**16))
    def check(grid, seed):
        g = torch.Generator().manual_seed(seed)
        images = [torch.randn(t, 3, h * p, w * p, generator=g) for t, h, w in grid]
        x, grid_thw = packvit.patchify(images, p)
        with torch.no_grad():
            out = model(x, grid_thw, return_dict=True)
            n_frames = sum(t for t, _, _ in grid)
            assert out.last_hidden_state.shape == (x.shape[0], model.hidden_size)
            if out.pooler_output is not None:
                assert out.pooler_output.shape == (n_frames, model.hidden_size)
            # Order: the packed output is each frame encoded alone, concatenated in input order.
            alone = [model(*packvit.patchify([f], p)) for img in images for f in img.unbind(0)]
        torch.testing.assert_close(out.last_hidden_state, torch.cat(alone), rtol=1e-5, atol=1e-5)

    check()


# -- broken checkpoints: a clear error and nothing written ------------------------------------------


def _truncate(d):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _corrupt_header(d):
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:24] = b"\xff" * 16  # inside the JSON header
    f.write_bytes(bytes(data))


def _edit_config(**kw):
    def edit(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(kw)
        (d / "config.json").write_text(json.dumps(cfg))

    return edit


def _edit_tensor(key, fn):
    def edit(d):
        sd = load_file(d / "model.safetensors")
        sd[key] = fn(sd[key])
        save_file(sd, d / "model.safetensors")

    return edit


def _shard(d, drop_file=False, bad_index=False):
    sd = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = sorted(sd)
    half = len(names) // 2
    parts = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for f, ks in parts.items():
        save_file({k: sd[k] for k in ks}, d / f)
    wmap = {k: f for f, ks in parts.items() for k in ks}
    if bad_index:
        wmap[names[0]] = "model-00003-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    if drop_file:
        (d / "model-00002-of-00002.safetensors").unlink()


BROKEN = {
    "truncated": (_truncate, "truncated or corrupted"),
    "corrupted-header": (_corrupt_header, "truncated or corrupted"),
    "missing-shard": (lambda d: _shard(d, drop_file=True), "names shards that are missing.*00002"),
    "index-names-missing-file": (lambda d: _shard(d, bad_index=True), "names shards that are missing.*00003"),
    "unknown-model-type": (_edit_config(model_type="vit_mae"), "unknown checkpoint layout.*vit_mae"),
    "unsupported-field": (_edit_config(use_mask_token_v2=True), "does not understand.*use_mask_token_v2"),
    "wrong-shape": (_edit_tensor("layer.0.norm1.weight", lambda t: t[:32]), "wrong shape.*blocks.0.norm1.weight"),
    "wrong-dtype": (
        _edit_tensor("layer.1.norm2.bias", lambda t: t.to(torch.int64)),
        "wrong dtype.*blocks.1.norm2.bias.*int64",
    ),
    "missing-config": (lambda d: (d / "config.json").unlink(), "no config.json"),
    "invalid-config-json": (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_checkpoint_clear_error_nothing_written(case, hf_checkpoints, tmp_path, capsys):
    _, src = hf_checkpoints["dinov3"]
    d = tmp_path / "src"
    d.mkdir()
    for f in src.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    damage, message = BROKEN[case]
    damage(d)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["convert", str(d), str(out / "pv"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "packvit convert: error:" in err
    import re

    assert re.search(message, err), err
    assert list(out.iterdir()) == []  # no DST, no temporary folder left behind


# -- pickles ----------------------------------------------------------------------------------------


def test_pickle_only_with_permission_and_weights_only(hf_checkpoints, tmp_path, monkeypatch):
    hf, _ = hf_checkpoints["dinov3"]
    (tmp_path / "config.json").write_text(hf.config.to_json_string())
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    with pytest.raises(CheckpointError, match="allow_pickle"):
        load_model(tmp_path)
    assert main(["convert", str(tmp_path), str(tmp_path / "pv"), "--no-progress"]) == 1
    assert calls == []  # refused before anything was unpickled
    load_model(tmp_path, allow_pickle=True)
    assert main(["convert", str(tmp_path), str(tmp_path / "pv"), "--no-progress", "--allow-pickle"]) == 0
    assert len(calls) == 2 and all(c.get("weights_only") is True for c in calls)


class _Payload:
    """Unpickling this would create a file: weights_only must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_weights_only_refuses_arbitrary_objects(hf_checkpoints, tmp_path):
    hf, _ = hf_checkpoints["dinov3"]
    (tmp_path / "config.json").write_text(hf.config.to_json_string())
    marker = tmp_path / "pwned"
    torch.save({**hf.state_dict(), "extra": _Payload(str(marker))}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="could not read"):
        load_model(tmp_path, allow_pickle=True)
    assert not marker.exists()


# -- extreme grids ----------------------------------------------------------------------------------

EXTREME = {
    "1x1": [(1, 1, 1)],
    "1x512": [(1, 1, 512)],
    "512x1": [(1, 512, 1)],
    "100-frames": [(100, 4, 3)],
    "256x256": [(1, 256, 256)],
}


@pytest.fixture(scope="module")
def narrow_models():
    """Published architectures at width 16, one head, one block: the 256x256 grid (65536 tokens) costs ~10 s on CPU."""
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=1)
    return {f: load_model_from_hf(tiny_hf_model(f, **small), f) for f in ("dinov3", "siglip2", "aimv2")}


def load_model_from_hf(hf, family):
    from weights_conversion import build_model, convert_state_dict

    fam, cfg, sd, _ = convert_state_dict(json.loads(hf.config.to_json_string()), hf.state_dict())
    return build_model(fam, cfg, sd, attn_backend="sdpa").eval()


@pytest.mark.parametrize("grid", [pytest.param(g, marks=pytest.mark.slow) if g == "256x256" else g for g in EXTREME])
@pytest.mark.parametrize("family", ["dinov3", "siglip2", "aimv2"])
def test_extreme_grids_finite_on_cpu_fp32(family, grid, narrow_models):
    model = narrow_models[family]
    g = EXTREME[grid]
    n = sum(t * h * w for t, h, w in g)
    x = torch.randn(n, model.patch_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x, torch.tensor(g), return_dict=True)
    assert out.last_hidden_state.shape == (n, 16) and torch.isfinite(out.last_hidden_state).all()
    if out.pooler_output is not None:
        assert out.pooler_output.shape[0] == sum(t for t, _, _ in g) and torch.isfinite(out.pooler_output).all()
