"""packvit inside transformers' VLMs: LlavaOnevision, Llava and Qwen2-VL with tiny random models.

The tower's outputs must equal the transformers vision model's on the same weights (fp32, max abs
<= 1e-4, the parity suite's tolerance); the VLMs must compute a loss, backpropagate into the tower
only when it is trainable, and generate.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from helpers import FAMILIES, PATCH, hf_reference, random_images, tiny_hf_config, torch_kernel_for_bf16_on_cpu
from weights_conversion import FAMILIES as REGISTRY

transformers = pytest.importorskip("transformers")
from packvit.integrations.transformers import (  # noqa: E402
    PackvitQwen2VLVisual,
    PackvitVisionConfig,
    PackvitVisionModel,
    QwenImageProcessor,
    merge_order,
)

README = Path(__file__).resolve().parents[1] / "README.md"
TOL = 1e-4
VOCAB, IMAGE_TOKEN = 64, 60


def tower(hf_checkpoints, family, **kw) -> PackvitVisionModel:
    _, d = hf_checkpoints[family]
    return PackvitVisionModel.from_checkpoint(d, attn_backend="sdpa", **kw).eval()


def tiny_text_config(kind: str = "qwen2"):
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
    )
    return transformers.Qwen2Config(**kw) if kind == "qwen2" else transformers.LlamaConfig(**kw)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------
# The tower against the transformers model it came from
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_tower_matches_transformers(hf_checkpoints, family):
    hf, _ = hf_checkpoints[family]
    t, p = tower(hf_checkpoints, family), PATCH[family]
    images = torch.stack(random_images([(1, 3, 2), (1, 3, 2)], p, seed=1))  # (B, C, H, W)
    ref = hf_reference(family, hf, list(images), output_hidden_states=True)  # per image
    with torch.no_grad():
        out = t(images, output_hidden_states=True)
    L = hf.config.num_hidden_layers
    assert len(out.hidden_states) == L + 1 and out.last_hidden_state.shape[1] == ref[0][3][0].shape[1]
    for b, (patches, prefix, pooled, hs) in enumerate(ref):
        full = torch.cat([prefix, patches])  # transformers' rows: [CLS, registers,] patches
        assert max_diff(out.last_hidden_state[b], full) <= TOL
        for i in range(L + 1):
            assert max_diff(out.hidden_states[i][b], hs[i][0]) <= TOL, i
        assert max_diff(out.pooler_output[b], pooled[0]) <= TOL

    # transformers >= 5 asks for the layers it reads: only those are kept, equal to the full run.
    with torch.no_grad():
        sel = t(images, output_hidden_states=[-2, 0])
    assert sel.hidden_states[L] is None  # -2 is block L - 1, 0 the embeddings
    for i in (0, L - 1):
        assert torch.equal(sel.hidden_states[i], out.hidden_states[i])
    assert t(images).hidden_states is None
    tup = t(images, return_dict=False)
    assert isinstance(tup, tuple) and torch.equal(tup[0], out.last_hidden_state)


@pytest.mark.parametrize("family", ["dinov3", "aimv2"])
def test_tower_crops_like_a_strided_convolution(hf_checkpoints, family):
    """Sides that are not patch multiples: transformers' stride-p convolution drops the remainder."""
    hf, _ = hf_checkpoints[family]
    t, p = tower(hf_checkpoints, family), PATCH[family]
    x = torch.randn(1, 3, 2 * p + 5, 3 * p + 1)
    with torch.no_grad():
        ours, ref = t(x, output_hidden_states=True), hf(pixel_values=x, output_hidden_states=True)
    assert max_diff(ours.last_hidden_state, ref.last_hidden_state) <= TOL
    assert max_diff(ours.hidden_states[-2], ref.hidden_states[-2]) <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_tower_packed_and_padded_inputs(hf_checkpoints, family):
    """Mixed resolutions: packed (pixel_values (Tp, p*p*C) + grid_thw) and Pixtral-style padded
    (B, C, H, W) + image_sizes, each against transformers image by image."""
    import packvit

    hf, _ = hf_checkpoints[family]
    t, p = tower(hf_checkpoints, family), PATCH[family]
    # (No 1-wide frame: transformers 4.x resizes SigLIP2's position grid with PyTorch's CPU
    # antialias kernel, wrong for one column (tests/test_siglip2_resize.py); the parity suite covers it.)
    grid = [(1, 2, 3), (1, 4, 2), (2, 2, 2)]
    images = random_images(grid, p, seed=2)
    ref = hf_reference(family, hf, images, output_hidden_states=True)  # per frame
    hidden_states, grid_thw = packvit.patchify(images, p)
    with torch.no_grad():
        out = t(hidden_states, grid_thw=grid_thw, output_hidden_states=-2)
    assert torch.equal(out.grid_thw, grid_thw) and out.hidden_states[-1] is None
    rows = [f[0] for f in ref]
    assert max_diff(out.last_hidden_state, torch.cat(rows)) <= TOL
    assert max_diff(out.hidden_states[-2], torch.cat([f[3][-2][0, f[1].shape[0] :] for f in ref])) <= TOL
    assert max_diff(out.pooler_output, torch.cat([f[2] for f in ref])) <= TOL
    assert (out.prefix_tokens is not None) == (ref[0][1].shape[0] > 0)  # DINOv3's CLS and registers
    if out.prefix_tokens is not None:
        assert max_diff(out.prefix_tokens, torch.stack([f[1] for f in ref])) <= TOL

    stills = [img for img in images if img.dim() == 3]
    H, W = max(i.shape[1] for i in stills), max(i.shape[2] for i in stills)
    padded = torch.zeros(len(stills), 3, H, W)
    for b, img in enumerate(stills):
        padded[b, :, : img.shape[1], : img.shape[2]] = img
    sizes = torch.tensor([list(i.shape[1:]) for i in stills])
    with torch.no_grad():
        pix = t(padded, image_sizes=sizes, output_hidden_states=True)
    assert pix.last_hidden_state.shape[0] == 1
    assert max_diff(pix.last_hidden_state[0], torch.cat(rows[:2])) <= TOL


def test_tower_refuses_what_it_cannot_do(hf_checkpoints):
    t = tower(hf_checkpoints, "siglip2")
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="output_attentions"):
        t(x, output_attentions=True)
    with pytest.raises(ValueError, match="unsupported argument foo"):
        t(x, foo=1)
    with pytest.raises(ValueError, match="out of range"):
        t(x, output_hidden_states=7)
    with pytest.raises(ValueError, match="need grid_thw"):
        t(torch.randn(4, 768))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        t(torch.randn(1, 1, 3, 32, 32))
    t(x, output_attentions=False, interpolate_pos_encoding=True, cu_seq_lens_q=None)  # accepted


def test_tower_save_load_and_auto_classes(hf_checkpoints, tmp_path):
    t = tower(hf_checkpoints, "dinov3", prefix_tokens="cls")
    assert all(k.startswith("packvit.") for k in t.state_dict())
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        ref = t(x).last_hidden_state
    assert ref.shape == (2, 1 + 6, 64)  # CLS + 2x3 patches
    t.save_pretrained(tmp_path)
    again = transformers.AutoModel.from_pretrained(tmp_path).eval()
    assert type(again) is PackvitVisionModel and again.config.prefix_tokens == "cls"
    with torch.no_grad():
        assert torch.equal(again(x).last_hidden_state, ref)
    d = {k: v for k, v in t.config.to_dict().items() if k != "model_type"}
    with pytest.raises(ValueError, match="PackvitVisionModel.from_pretrained"):
        PackvitVisionModel.from_checkpoint(tmp_path)
    cfg = transformers.AutoConfig.for_model("packvit_vision", **d)
    assert isinstance(cfg, PackvitVisionConfig) and cfg.packvit == t.packvit.config
    with pytest.raises(ValueError, match="does not know"):
        PackvitVisionConfig(family="dinov3", packvit_config={"bogus": 1})
    import packvit.integrations.transformers as integration

    integration.register()  # idempotent


# ---------------------------------------------------------------------------------------------
# LLaVA-style models
# ---------------------------------------------------------------------------------------------


def _features(out):
    """get_image_features' result (transformers 5: an output with pooler_output; 4.x: the list)."""
    return getattr(out, "pooler_output", out)


def _tower_grads(model):
    return [p.grad for p in model.model.vision_tower.parameters()]


def _train_step_and_generate(model, inputs, input_ids):
    labels = input_ids.clone()
    labels[input_ids == IMAGE_TOKEN] = -100
    out = model(input_ids=input_ids, labels=labels, **inputs)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    with torch.no_grad():
        gen = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=3, do_sample=False, **inputs
        )
    assert gen.shape == (input_ids.shape[0], input_ids.shape[1] + 3)


def _prompt(n_image_tokens: list[int]) -> torch.Tensor:
    """One row per sample: a few text tokens, the image tokens, a few more."""
    rows = [[1, 2] + [IMAGE_TOKEN] * n + [3, 4, 5] for n in n_image_tokens]
    width = max(map(len, rows))
    return torch.tensor([[0] * (width - len(r)) + r for r in rows])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("frozen", [False, True])
def test_llava_onevision(hf_checkpoints, family, frozen):
    p = PATCH[family]
    side = 4 * p
    has_cls = REGISTRY[family].num_prefix_tokens(tiny_hf_config(family)) > 0  # DINOv3
    t = tower(hf_checkpoints, family, image_size=side, prefix_tokens="cls" if has_cls else "all")
    config = transformers.LlavaOnevisionConfig(
        vision_config=t.config,
        text_config=tiny_text_config(),
        image_token_index=IMAGE_TOKEN,
        video_token_index=IMAGE_TOKEN + 1,
        image_grid_pinpoints=[[side, side], [side, 2 * side]],
        vision_feature_layer=[-2, -1] if frozen else -2,  # both forms, for every family
        # "default" drops the first row: DINOv3's CLS (prefix_tokens="cls"); the others have none to drop
        vision_feature_select_strategy="default" if has_cls else "full",
    )
    torch.manual_seed(0)
    model = transformers.LlavaOnevisionForConditionalGeneration(config)
    assert isinstance(model.model.vision_tower, PackvitVisionModel)  # built by AutoModel.from_config
    model.model.vision_tower = t  # the pretrained tower swapped in
    if frozen:
        t.requires_grad_(False)

    # One anyres image (a base view + two tiles), as LlavaOnevisionImageProcessor lays it out.
    pixel_values = torch.randn(1, 3, 3, side, side)
    image_sizes = torch.tensor([[side, 2 * side]])
    feats = _features(model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes))
    input_ids = _prompt([sum(f.shape[0] for f in feats)])
    _train_step_and_generate(model, dict(pixel_values=pixel_values, image_sizes=image_sizes), input_ids)

    grads = _tower_grads(model)
    if frozen:
        assert all(g is None for g in grads)
    else:
        # the patch embedding and first block feed every selected layer (the final norm and the
        # pooling head do not: hidden states are taken before them, as transformers does)
        used = [p for n, p in t.packvit.named_parameters() if n.startswith(("patch_embed", "blocks.0."))]
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in used)
    assert model.model.multi_modal_projector.linear_1.weight.grad is not None

    # The video path: frames flattened to (B*F, C, H, W), then pooled 2x2 (transformers 5 also passes
    # the VLM's vision_aspect_ratio down to the tower, which must accept it).
    with torch.no_grad():
        video = model.model.get_video_features(
            torch.randn(1, 2, 3, side, side),
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )
    assert all(torch.isfinite(v).all() for v in _features(video))


@pytest.mark.parametrize("family", ["siglip2", "dinov3"])
def test_llava_named_in_config_mixed_sizes_and_reload(hf_checkpoints, family, tmp_path):
    """LlavaForConditionalGeneration with the tower named by model_type in a config dict, Pixtral-
    style mixed sizes (padded pixel_values + image_sizes), save_pretrained / from_pretrained."""
    p = PATCH[family]
    t = tower(hf_checkpoints, family)
    vision = {**t.config.to_dict(), "model_type": "packvit_vision"}
    config = transformers.LlavaConfig(
        vision_config=vision,
        text_config=tiny_text_config("llama"),
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(t.state_dict())

    sizes = torch.tensor([[2 * p, 3 * p], [4 * p, p]])
    pixel_values = torch.zeros(2, 3, 4 * p, 3 * p)
    for b, (h, w) in enumerate(sizes.tolist()):
        pixel_values[b, :, :h, :w] = torch.randn(3, h, w)
    inputs = dict(pixel_values=pixel_values, image_sizes=sizes)
    input_ids = _prompt([6 + 4])  # one sample holding both images: 2*3 + 4*1 patches
    _train_step_and_generate(model, inputs, input_ids)
    # vision_feature_layer=-1 reads every block: all tower parameters but the final norm and head train
    named = dict(model.model.vision_tower.packvit.named_parameters())
    assert all(p.grad is not None for n, p in named.items() if not n.startswith(("norm.", "head.")))

    model.save_pretrained(tmp_path)
    again = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    model.eval()
    with torch.no_grad():
        a, b = model(input_ids=input_ids, **inputs).logits, again(input_ids=input_ids, **inputs).logits
    assert torch.equal(a, b)

    # transformers' gradient checkpointing switch reaches packvit's blocks
    (getattr(again, "activation_checkpointing_enable", None) or again.gradient_checkpointing_enable)()  # 5.x, 4.x
    again.train()
    assert again.model.vision_tower.packvit.gradient_checkpointing is True
    again(input_ids=input_ids, labels=input_ids, **inputs).loss.backward()
    assert again.model.vision_tower.packvit.blocks[0].attn.qkv.weight.grad is not None


# ---------------------------------------------------------------------------------------------
# Qwen2-VL
# ---------------------------------------------------------------------------------------------


def test_merge_order_matches_qwen_windows():
    # a 1x4x4 frame: Qwen's processor emits each 2x2 window's patches together, windows row-major
    order = merge_order(((1, 4, 4),), 2).tolist()
    assert order[:8] == [0, 1, 4, 5, 2, 3, 6, 7]
    assert sorted(merge_order(((2, 2, 4), (1, 4, 2)), 2).tolist()) == list(range(24))


def test_qwen_visual_checks_its_grid(packvit_models):
    visual = PackvitQwen2VLVisual(packvit_models["siglip2"], 32, return_output=False)
    x = torch.randn(2 * 4 + 3 * 2, 768)  # (Tp, p*p*C) of grids 2x4 and 3x2
    with pytest.raises(ValueError, match="multiple of spatial_merge_size 2"):
        visual(x, grid_thw=torch.tensor([[1, 2, 4], [1, 3, 2]]))
    with pytest.raises(ValueError, match="output_attentions"):
        visual(x[:8], grid_thw=torch.tensor([[1, 2, 4]]), output_attentions=True)
    merged = visual(x[:8], grid_thw=torch.tensor([[1, 2, 4]]), output_hidden_states=False, return_dict=True)
    assert merged.shape == (2, 32)


QWEN = {
    # class name prefix -> a tiny vision config (replaced by packvit, but built by the constructor)
    "Qwen2VL": dict(depth=1, embed_dim=16, num_heads=2, hidden_size=32, mlp_ratio=2),
    "Qwen2_5_VL": dict(
        depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, fullatt_block_indexes=[0]
    ),
}
QWEN_VOCAB = {
    w: i
    for i, w in enumerate(
        [
            "<unk>",
            "<pad>",
            "describe",
            "the",
            "image",
            "a",
            "cat",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|image_pad|>",
            "<|video_pad|>",
        ]
    )
}


def tiny_qwen(kind: str = "Qwen2VL", patch_size: int = 16):
    """A random Qwen2-VL / Qwen2.5-VL with a one-layer LM, and its processor on a word-level
    tokenizer (packvit's image processor is set on it by the caller)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    text_cfg = tiny_text_config().to_dict()
    text_cfg.update(rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, vocab_size=VOCAB)
    v = QWEN_VOCAB
    config = getattr(transformers, f"{kind}Config")(
        text_config=text_cfg,
        vision_config={**QWEN[kind], "patch_size": patch_size},
        image_token_id=v["<|image_pad|>"],
        video_token_id=v["<|video_pad|>"],
        vision_start_token_id=v["<|vision_start|>"],
        vision_end_token_id=v["<|vision_end|>"],
    )
    torch.manual_seed(0)
    model = getattr(transformers, f"{kind}ForConditionalGeneration")(config)

    t = Tokenizer(models.WordLevel(v, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=t,
        unk_token="<unk>",
        pad_token="<pad>",
        model_input_names=["input_ids", "attention_mask"],
        additional_special_tokens=[w for w in v if w.startswith("<|")],
    )
    # Qwen2VLProcessor checks its image processor's class and, without torchvision, cannot build its
    # video processor: build it without those checks (the caller patches check_argument_for_proper_class).
    processor = getattr(transformers, f"{kind}Processor")(image_processor=None, tokenizer=tok)
    return model, processor


@pytest.fixture
def no_processor_class_check(monkeypatch):
    from transformers.processing_utils import ProcessorMixin

    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None)


@pytest.mark.parametrize("family,kind", [("siglip2", "Qwen2VL"), ("dinov3", "Qwen2VL"), ("aimv2", "Qwen2_5_VL")])
def test_qwen2_vl_with_packvit_visual(hf_checkpoints, family, kind, no_processor_class_check):
    from PIL import Image

    import packvit

    _, d = hf_checkpoints[family]
    model, processor = tiny_qwen(kind, PATCH[family])
    config = model.config
    visual = PackvitQwen2VLVisual(packvit.from_pretrained(d, attn_backend="sdpa"), config.text_config.hidden_size)
    model.model.visual = visual

    # The processor: packvit's sizes rounded to even patch grids; the text gets t*h*w/4 pad tokens.
    processor.image_processor = QwenImageProcessor.from_pretrained(d, max_num_patches=64, max_pixels=64 * 16 * 16)
    rng = torch.Generator().manual_seed(0)
    photos = [
        Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=rng, dtype=torch.uint8).numpy())
        for h, w in [(100, 60), (64, 64)]
    ]
    prompt = "<|vision_start|><|image_pad|><|vision_end|> describe the image"
    batch = processor(images=photos, text=[prompt, prompt], return_tensors="pt", padding=True)
    grid = batch["image_grid_thw"]
    assert (grid[:, 1:] % 2 == 0).all()
    assert (batch["input_ids"] == config.image_token_id).sum(1).tolist() == (grid.prod(-1) // 4).tolist()

    labels = batch["input_ids"].clone()
    labels[labels == config.image_token_id] = -100
    out = model(**batch, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    # everything but the pooling head, which the patch features never pass through
    assert all(p.grad is not None for n, p in visual.named_parameters() if not n.startswith("vision.head."))
    with torch.no_grad():
        gen = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] == batch["input_ids"].shape[1] + 3

    # Frozen packvit, trainable merger: the encoder gets no gradient.
    model.zero_grad(set_to_none=True)
    visual.vision.requires_grad_(False)
    model(**batch, labels=labels).loss.backward()
    assert all(p.grad is None for p in visual.vision.parameters())
    assert all(p.grad is not None for p in visual.merger.parameters())


# ---------------------------------------------------------------------------------------------
# README
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_readme_transformers_section_runs(hf_checkpoints, monkeypatch, capsys, no_processor_class_check):
    """The README's "Use with transformers" snippets, run as written on tiny checkpoints: the hub
    ids are replaced by the tiny SigLIP2 checkpoint, a tiny Qwen2.5 text config and a tiny Qwen2-VL
    with its processor."""
    text = README.read_text()
    section = text[text.index("## Use with transformers") :]
    section = section[: section.index("\n## ", 3)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    _, d = hf_checkpoints["siglip2"]
    qwen, processor = tiny_qwen()
    text_config = tiny_text_config()
    text_config.vocab_size = 151700  # room for the README's image token id
    subs = {
        'transformers.AutoConfig.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct")': "TINY_TEXT_CONFIG",
        'transformers.Qwen2VLForConditionalGeneration.from_pretrained("Qwen/Qwen2-VL-2B-Instruct")': "TINY_QWEN",
        'transformers.AutoProcessor.from_pretrained("Qwen/Qwen2-VL-2B-Instruct")': "TINY_QWEN_PROCESSOR",
    }
    monkeypatch.chdir(README.parent)
    scopes = []
    for code in blocks:
        code = re.sub(r'ckpt = "[^"]+"', f"ckpt = {str(d)!r}", code)
        for old, new in subs.items():
            code = code.replace(old, new)
        assert 'from_pretrained("Qwen' not in code and "AutoConfig.from_pretrained" not in code
        scope = {"TINY_TEXT_CONFIG": text_config, "TINY_QWEN": qwen, "TINY_QWEN_PROCESSOR": processor}
        exec(compile(code, "README.md", "exec"), scope)
        scopes.append(scope)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"(1, {scopes[0]['input_ids'].shape[1] + 4})"
    assert isinstance(scopes[0]["model"].model.vision_tower, PackvitVisionModel)
    assert scopes[0]["tower"].packvit.patch_embed.weight.grad is not None
    assert isinstance(qwen.model.visual, PackvitQwen2VLVisual) and qwen.model.visual.merger.ln_q.weight.grad is not None
    assert printed[1].startswith("[[1, ")


def test_a_placed_wrapper_chooses_its_attention_for_where_it_now_is(hf_checkpoints, monkeypatch):
    """transformers places a model after building it; the packvit model keeps its choice when moved,
    so the wrapper makes an "auto" choice again at its next forward (a bf16 "torch" kernel faked by sdpa)."""
    import packvit

    _, d = hf_checkpoints["dinov3"]
    model = PackvitVisionModel.from_checkpoint(d).eval()
    assert model.packvit.attention.request == "auto" and model.packvit.attention.name == "sdpa"

    torch_kernel_for_bf16_on_cpu(monkeypatch)
    model.to(torch.bfloat16)
    x, g = packvit.patchify(random_images([(1, 3, 5)], PATCH["dinov3"]), PATCH["dinov3"])
    out = model(x.bfloat16(), grid_thw=g)
    assert out.last_hidden_state.dtype == torch.bfloat16 and model.packvit.attention.name == "torch"
