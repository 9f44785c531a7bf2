"""Original research layouts (facebookresearch/dinov3 .pth, Apple ml-aim AIMv2) -> packvit.

Each test writes a tiny HF model's weights in the original layout, through inverse maps written
here from the original repositories' key names, and checks that packvit gives the same outputs as from the HF files.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import packvit
from helpers import PATCH, random_images, tiny_hf_model
from packvit.cli import main
from weights_conversion import CheckpointError, ConversionError, load_model


def _encode(model, family):
    x, g = packvit.patchify(random_images([(1, 3, 5), (2, 4, 2), (1, 1, 1)], PATCH[family], seed=3), PATCH[family])
    with torch.no_grad():
        return model(x, g, return_dict=True)


def _same_outputs(a, b, family):
    oa, ob = _encode(a, family), _encode(b, family)
    assert torch.equal(oa.last_hidden_state, ob.last_hidden_state)
    if oa.pooler_output is not None or ob.pooler_output is not None:
        assert torch.equal(oa.pooler_output, ob.pooler_output)


# -- DINOv3 ------------------------------------------------------------------------------------------


def to_dinov3_original(hf, k_bias_seed=7, periods_dtype=torch.float32, bias_mask=True) -> dict[str, torch.Tensor]:
    """transformers DINOv3ViTModel state dict -> the facebookresearch/dinov3 backbone layout."""
    cfg = hf.config
    sd = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    d, dh = cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads
    out = {
        "cls_token": sd["embeddings.cls_token"],  # [1,1,D]
        "storage_tokens": sd["embeddings.register_tokens"],  # [1,R,D]
        "mask_token": sd["embeddings.mask_token"].reshape(1, d),  # [1,D]
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.bias"],
        "rope_embed.periods": (cfg.rope_theta ** (4 * torch.arange(dh // 4, dtype=torch.float64) / dh)).to(
            periods_dtype
        ),
        "norm.weight": sd["norm.weight"],
        "norm.bias": sd["norm.bias"],
    }
    g = torch.Generator().manual_seed(k_bias_seed)
    for n in range(cfg.num_hidden_layers):
        L, B = f"layer.{n}.", f"blocks.{n}."
        a = L + "attention."
        out[B + "attn.qkv.weight"] = torch.cat([sd[a + f"{p}_proj.weight"] for p in "qkv"])
        # A random k third: the original masks it out (bias_mask), so packvit must drop it.
        out[B + "attn.qkv.bias"] = torch.cat(
            [sd[a + "q_proj.bias"], torch.randn(d, generator=g), sd[a + "v_proj.bias"]]
        )
        if bias_mask:
            out[B + "attn.qkv.bias_mask"] = torch.tensor([1.0, 0.0, 1.0]).repeat_interleave(d)
        out[B + "attn.proj.weight"], out[B + "attn.proj.bias"] = sd[a + "o_proj.weight"], sd[a + "o_proj.bias"]
        for i in (1, 2):
            out[B + f"norm{i}.weight"], out[B + f"norm{i}.bias"] = sd[L + f"norm{i}.weight"], sd[L + f"norm{i}.bias"]
            out[B + f"ls{i}.gamma"] = sd[L + f"layer_scale{i}.lambda1"]
        m = L + "mlp."
        if cfg.use_gated_mlp:  # w3(silu(w1 x) * w2 x)
            for o, h in (("w1", "gate_proj"), ("w2", "up_proj"), ("w3", "down_proj")):
                out[B + f"mlp.{o}.weight"], out[B + f"mlp.{o}.bias"] = sd[m + f"{h}.weight"], sd[m + f"{h}.bias"]
        else:
            for o, h in (("fc1", "up_proj"), ("fc2", "down_proj")):
                out[B + f"mlp.{o}.weight"], out[B + f"mlp.{o}.bias"] = sd[m + f"{h}.weight"], sd[m + f"{h}.bias"]
    return out


@pytest.mark.parametrize("gated", [False, True], ids=["gelu-mlp", "swiglu"])
def test_dinov3_pth_matches_hf(gated, tmp_path):
    overrides = dict(use_gated_mlp=True, hidden_act="silu", intermediate_size=96) if gated else {}
    hf = tiny_hf_model("dinov3", seed=1, **overrides)
    hf.save_pretrained(tmp_path / "hf")
    orig = to_dinov3_original(hf)
    orig["local_cls_norm.weight"] = torch.ones(64)  # training-only norm: dropped
    torch.save(orig, tmp_path / "dinov3_tiny.pth")
    with pytest.raises(CheckpointError, match="allow_pickle"):
        load_model(tmp_path / "dinov3_tiny.pth")
    ours = load_model(tmp_path / "dinov3_tiny.pth", allow_pickle=True, attn_backend="sdpa")
    ref = load_model(tmp_path / "hf", attn_backend="sdpa")
    assert ours.config == ref.config
    _same_outputs(ours, ref, "dinov3")


def test_dinov3_bf16_periods_accepted_wrong_theta_refused(tmp_path):
    hf = tiny_hf_model("dinov3")
    ref = load_model_from(hf, tmp_path / "hf")
    orig = to_dinov3_original(hf, periods_dtype=torch.bfloat16)
    save_file(orig, tmp_path / "bf16.safetensors")
    ours = load_model(tmp_path / "bf16.safetensors", attn_backend="sdpa")
    _same_outputs(ours, ref, "dinov3")  # the exact fp32 periods are used, as in transformers
    orig["rope_embed.periods"] = orig["rope_embed.periods"].float() * 1.5
    save_file(orig, tmp_path / "bad.safetensors")
    with pytest.raises(ConversionError, match="periods .* do not match rope_theta"):
        load_model(tmp_path / "bad.safetensors")


def test_dinov3_bad_bias_mask_and_untied_cls_norm_refused(tmp_path):
    hf = tiny_hf_model("dinov3")
    orig = to_dinov3_original(hf)
    orig["blocks.1.attn.qkv.bias_mask"] = torch.ones(3 * 64)
    save_file(orig, tmp_path / "mask.safetensors")
    with pytest.raises(ConversionError, match="bias_mask"):
        load_model(tmp_path / "mask.safetensors")
    orig = {**to_dinov3_original(hf), "cls_norm.weight": torch.ones(64), "cls_norm.bias": torch.zeros(64)}
    save_file(orig, tmp_path / "cls.safetensors")
    with pytest.raises(ConversionError, match="cls_norm"):
        load_model(tmp_path / "cls.safetensors")


def test_dinov3_preset_must_match_the_weights(tmp_path):
    save_file(to_dinov3_original(tiny_hf_model("dinov3")), tmp_path / "w.safetensors")
    with pytest.raises(ConversionError, match="does not match the weights.*hidden_size: preset 1024, weights 64"):
        load_model(tmp_path / "w.safetensors", preset="dinov3-vitl16-pretrain-lvd1689m")


def load_model_from(hf, d):
    hf.save_pretrained(d)
    return load_model(d, attn_backend="sdpa")


# -- AIMv2 -------------------------------------------------------------------------------------------


def to_aimv2_original(hf, lit: bool = False, head_bias: bool = True) -> dict[str, torch.Tensor]:
    """transformers Aimv2VisionModel state dict -> Apple ml-aim's layout (LiT: under image_encoder.)."""
    cfg = hf.config
    sd = hf.state_dict()
    out = {
        "preprocessor.patchifier.proj.weight": sd["embeddings.patch_embed.weight"],
        "preprocessor.patchifier.proj.bias": sd["embeddings.patch_embed.bias"],
        "preprocessor.patchifier.norm.weight": sd["embeddings.rms_norm.weight"],
        "trunk.post_trunk_norm.weight": sd["rms_norm.weight"],
    }
    for n in range(cfg.num_hidden_layers):
        L, B = f"encoder.layers.{n}.", f"trunk.blocks.{n}."
        out[B + "norm_1.weight"], out[B + "norm_2.weight"] = sd[L + "rms_norm1.weight"], sd[L + "rms_norm2.weight"]
        out[B + "attn.qkv.weight"] = torch.cat([sd[L + f"attention.{p}_proj.weight"] for p in "qkv"])
        out[B + "attn.proj.weight"] = sd[L + "attention.out_proj.weight"]
        # fc2(silu(fc1 x) * fc3 x)
        out[B + "mlp.fc1.weight"], out[B + "mlp.fc3.weight"] = (
            sd[L + "ffn.gate_proj.weight"],
            sd[L + "ffn.up_proj.weight"],
        )
        out[B + "mlp.fc2.weight"] = sd[L + "ffn.down_proj.weight"]
    if cfg.use_head:
        out["head.cls_token"] = sd["head.cls_token"]
        out["head.k.weight"], out["head.v.weight"] = sd["head.k_proj.weight"], sd["head.v_proj.weight"]
        out["head.linear.weight"] = sd["head.output_proj.weight"]
        if head_bias:
            out["head.linear.bias"] = sd["head.output_proj.bias"]
    if lit:
        out = {"image_encoder." + k: v for k, v in out.items()}
        out.update(
            {
                "text_encoder.preprocessor.text_embedding.weight": torch.randn(10, 32),
                "text_encoder.trunk.blocks.0.attn.qkv.weight": torch.randn(96, 32),
                "text_projector.weight": torch.randn(16, 32),
                "image_projector.weight": torch.randn(16, 64),
                "log_logit_scale": torch.tensor(2.6),
            }
        )
    return out


@pytest.mark.parametrize("variant", ["vision-only", "lit"])
def test_aimv2_original_matches_hf(variant, tmp_path):
    lit = variant == "lit"
    hf = tiny_hf_model("aimv2", seed=2, use_head=lit)
    ref = load_model_from(hf, tmp_path / "hf")
    save_file(to_aimv2_original(hf, lit=lit), tmp_path / "aimv2.safetensors")
    with pytest.raises(ConversionError, match="num_heads"):  # the weights do not say the head count
        load_model(tmp_path / "aimv2.safetensors")
    ours = load_model(tmp_path / "aimv2.safetensors", num_heads=4, attn_backend="sdpa")
    assert ours.config == ref.config and ours.config.use_head == lit
    _same_outputs(ours, ref, "aimv2")


def test_aimv2_head_without_bias_gets_a_zero_bias(tmp_path):
    hf = tiny_hf_model("aimv2", use_head=True)
    save_file(to_aimv2_original(hf, head_bias=False), tmp_path / "a.safetensors")
    model = load_model(tmp_path / "a.safetensors", num_heads=4)
    assert torch.equal(model.head.out_proj.bias, torch.zeros(64))


def test_aimv2_fixed_size_refused(tmp_path):
    orig = {**to_aimv2_original(tiny_hf_model("aimv2")), "preprocessor.pos_embed": torch.zeros(1, 256, 64)}
    save_file(orig, tmp_path / "fixed.safetensors")
    with pytest.raises(ConversionError, match="fixed-resolution"):
        load_model(tmp_path / "fixed.safetensors", num_heads=4)


def test_cli_converts_original_formats(tmp_path, capsys):
    hf = tiny_hf_model("dinov3")
    ref = load_model_from(hf, tmp_path / "hf")
    torch.save(to_dinov3_original(hf), tmp_path / "d.pth")
    assert main(["convert", str(tmp_path / "d.pth"), str(tmp_path / "pv"), "--no-progress"]) == 1
    assert "--allow-pickle" in capsys.readouterr().err and not (tmp_path / "pv").exists()
    assert (
        main(["convert", str(tmp_path / "d.pth"), str(tmp_path / "pv"), "--no-progress", "--allow-pickle", "--verify"])
        == 0
    )
    out = capsys.readouterr().out
    assert "original-dinov3 layout" in out and "RoPE periods" in out and "OK: cosine min" in out
    _same_outputs(load_model(tmp_path / "pv", attn_backend="sdpa"), ref, "dinov3")

    hf = tiny_hf_model("aimv2")
    save_file(to_aimv2_original(hf), tmp_path / "a.safetensors")
    assert (
        main(
            [
                "convert",
                str(tmp_path / "a.safetensors"),
                str(tmp_path / "pa"),
                "--no-progress",
                "--preset",
                "aimv2-large-patch14-native",
            ]
        )
        == 1
    )
    assert "does not match the weights" in capsys.readouterr().err
    assert (
        main(["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "pa"), "--no-progress", "--num-heads", "4"])
        == 0
    )
    _same_outputs(load_model(tmp_path / "pa", attn_backend="sdpa"), load_model_from(hf, tmp_path / "hfa"), "aimv2")
