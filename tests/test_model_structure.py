"""The model skeleton's shape: typed position tables, the forward in three named stages, undoing
compile_blocks(), DINOv3's rope_augmentation as a config field, and library calls that leave
process-wide settings as they found them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from packvit import AIMv2, AIMv2Config, DINOv3, DINOv3Config, Siglip2, Siglip2Config
from packvit.models.aimv2 import AIMv2Tables
from packvit.models.dinov3 import DINOv3Tables
from packvit.models.siglip2 import Siglip2Tables

TINY = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
GRID = [[1, 3, 4], [2, 2, 5]]


def _models():
    return {
        "aimv2": AIMv2(AIMv2Config(**TINY, use_head=True)),
        "siglip2": Siglip2(Siglip2Config(**TINY)),
        "dinov3": DINOv3(DINOv3Config(**TINY, num_register_tokens=1)),
    }


def _pixels(model, seed=0):
    n = sum(t * h * w for t, h, w in GRID)
    return torch.randn(n, model.patch_dim, generator=torch.Generator().manual_seed(seed))


def test_each_model_declares_its_tables():
    want = {
        "aimv2": (AIMv2Tables, ("sincos",)),
        "siglip2": (Siglip2Tables, ("resize",)),
        "dinov3": (DINOv3Tables, ("cos", "sin", "coords", "is_patch", "frame")),
    }
    for family, m in _models().items():
        cls, fields = want[family]
        tables = m.prepare(GRID).tables
        assert type(tables) is cls and tables._fields == fields, family
    d = _models()["dinov3"]
    off = d.prepare(GRID).tables
    assert off.cos.shape == off.sin.shape == (d.prepare(GRID).meta.num_tokens, 16) and off.coords is None
    d.rope_augmentation = True
    on = d.prepare(GRID).tables
    assert on.coords.shape == (on.cos.shape[0], 2) and on.is_patch.dtype == torch.bool and on.frame is not None


def test_forward_is_embed_then_blocks_then_outputs():
    for family, m in _models().items():
        m.eval()
        x = _pixels(m)
        whole = m(x, GRID, return_dict=True, output_layers=[0, -1])
        batch = m.prepare(GRID)
        h, rope = m.embed(x, batch.meta, batch.tables)
        h, layers = m.run_blocks(h, batch.meta, rope, keep={0, len(m.blocks)})
        staged = m.make_outputs(h, batch.meta, layers, rich=True)
        assert torch.equal(staged.last_hidden_state, whole.last_hidden_state), family
        assert torch.equal(staged.hidden_states[-1], whole.hidden_states[-1]), family
        assert (staged.pooler_output is None) == (whole.pooler_output is None)
        assert torch.equal(m.make_outputs(h, batch.meta, layers, rich=False), whole.last_hidden_state)


def test_uncompile_blocks_restores_the_eager_blocks():
    m = _models()["dinov3"].eval()
    x = _pixels(m)
    eager_forward = type(m.blocks[0]).forward
    ref = m(x, GRID)
    assert not m.blocks_compiled
    torch._dynamo.reset()
    assert m.compile_blocks(backend="eager") is m and m.blocks_compiled
    assert torch.equal(m(x, GRID), ref)
    assert m.uncompile_blocks() is m and not m.blocks_compiled
    assert all(b.forward.__func__ is eager_forward for b in m.blocks)  # the class's forward again
    assert torch.equal(m(x, GRID), ref)
    m.compile_blocks(backend="eager").compile_blocks(backend="eager")  # twice: still one layer of compile
    m.uncompile_blocks()
    assert all(b.forward.__func__ is eager_forward for b in m.blocks)


def test_rope_augmentation_is_a_config_field_that_round_trips(tmp_path):
    import json

    from weights_conversion import load_model
    from weights_conversion.native import write_native

    cfg = DINOv3Config(**TINY, rope_augmentation=True)
    m = DINOv3(cfg)
    assert m.rope_augmentation is True
    m.rope_augmentation = False  # the switch on the model replaces the frozen config
    assert m.config == dataclasses.replace(cfg, rope_augmentation=False)
    with pytest.raises(TypeError, match="must be a bool"):
        m.rope_augmentation = 1
    write_native(tmp_path, "dinov3", cfg, m.state_dict(), max_shard_bytes=1 << 30)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["config"]["rope_augmentation"] is True
    assert load_model(tmp_path).config == cfg
    # A file written before the field existed reads as off; any other missing field is still refused.
    for drop in ("rope_augmentation", "rope_theta"):
        fields = {k: v for k, v in written["config"].items() if k != drop}
        (tmp_path / "config.json").write_text(json.dumps({**written, "config": fields}))
        if drop == "rope_augmentation":
            assert load_model(tmp_path).config == dataclasses.replace(cfg, rope_augmentation=False)
        else:
            with pytest.raises(Exception, match="lacks the dinov3 fields"):
                load_model(tmp_path)


def test_loading_a_reference_leaves_the_progress_bar_setting_alone():
    tf = pytest.importorskip("transformers")
    from weights_conversion.reference import quiet_progress

    logging = tf.utils.logging
    was = logging.is_progress_bar_enabled()
    try:
        for start in (True, False):
            (logging.enable_progress_bar if start else logging.disable_progress_bar)()
            with quiet_progress(tf):
                assert not logging.is_progress_bar_enabled()
            assert logging.is_progress_bar_enabled() is start
    finally:
        (logging.enable_progress_bar if was else logging.disable_progress_bar)()


def test_tuning_is_one_value_the_model_holds_and_hands_its_blocks():
    """The fused path's speed/memory trade-offs are a value on the model, not module globals a
    benchmark patches: every MLP and attention reads the model's, repr shows a changed one, and the
    reference path's outputs do not depend on it."""
    from packvit.layers import DEFAULT_TUNING, Attention, GatedMlp, Mlp, Tuning

    for model in _models().values():
        model.eval()
        x = _pixels(model)
        with torch.no_grad():
            ref = model(x, GRID)
        assert model.tuning == DEFAULT_TUNING and "Tuning(" not in repr(model)
        t = model.set_tuning(train_saves_less=False, mlp_chunk_tokens=64)
        assert t == Tuning(train_saves_less=False, mlp_chunk_tokens=64) and model.tuning is t
        parts = [m for m in model.modules() if isinstance(m, (Mlp, GatedMlp, Attention))]
        assert parts and all(m.tuning is t for m in parts)
        assert "mlp_chunk_tokens=64" in repr(model)
        with torch.no_grad():
            assert torch.equal(model(x, GRID), ref)
        with pytest.raises(TypeError, match="mlp_chunks"):
            model.set_tuning(mlp_chunks=8)
        assert model.tuning is t
