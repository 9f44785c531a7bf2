"""DeepSpeed ZeRO-3 (LLaVA-NeXT's engine): the tower loads partitioned, trains with the loss and
gradients of the step without DeepSpeed, and saves weights a fresh tower reloads. Two gloo ranks on
the CPU run benchmarks/zero3_check.py (its docstring has the criteria); skipped without deepspeed."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from helpers import FAMILIES, ROOT, torchrun

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")


@pytest.mark.slow
@needs_deepspeed
def test_zero3_step_equals_plain_step_two_cpu_ranks():
    out = torchrun(ROOT / "benchmarks" / "zero3_check.py", "--device", "cpu", "--tiny", timeout=300)
    for family in FAMILIES:
        for name in (
            "built inside zero.Init",
            "partitioned weights == checkpoint",
            "loss",
            "gradients",
            "one SGD step",
            "save_16bit_model -> fresh tower",
            "export_hf -> load_model",
            "HfDeepSpeedConfig, no zero.Init open",
            "transformers from_pretrained under ZeRO-3",
            "transformers _from_config under ZeRO-3",
            "frozen tower",
        ):
            assert f"ok   {family} {name}" in out, f"{family} {name}:\n{out[-3000:]}"
    assert "ZERO3 CHECK PASSED" in out


def test_zero3_off_is_plain_from_pretrained(hf_checkpoints):
    """Without ZeRO-3 the hook is packvit.from_pretrained, and it never imports deepspeed."""
    from packvit import zero3
    from weights_conversion import load_model

    had = "deepspeed" in sys.modules
    assert not zero3.zero3_enabled()
    d = hf_checkpoints["siglip2"][1]
    a, b = zero3.from_pretrained(d, attn_backend="sdpa"), load_model(d, attn_backend="sdpa")
    assert type(a) is type(b) and not a.training
    for (k1, v1), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1
    assert ("deepspeed" in sys.modules) == had


def test_hookable_output_reads_like_the_dataclass(packvit_models):
    """The dict a ZeRO-3 model returns (so DeepSpeed finds its tensors) reads as PackedVisionOutput does."""
    from packvit.zero3 import HookableOutput, expose_output_tensors

    model = packvit_models["dinov3"]
    x, grid = torch.randn(6 + 4, model.patch_dim), [[1, 2, 3], [1, 2, 2]]
    want = model(x, grid, output_layers=[-2])
    try:
        expose_output_tensors(model)
        got = model(x, grid, output_layers=[-2])
    finally:  # the fixture's model is shared: take the hook off again
        model._packvit_output_hook.remove()
        del model._packvit_output_hook
    assert isinstance(got, HookableOutput) and isinstance(got, dict)
    assert torch.equal(got.hidden_states[1], want.hidden_states[1])
    assert torch.equal(got.prefix_hidden_states[1], want.prefix_hidden_states[1])
    assert torch.equal(got.pooler_output, want.pooler_output) and got.meta is not None
    with pytest.raises(AttributeError, match="no field 'nope'"):
        _ = got.nope
