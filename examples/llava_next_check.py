"""Run a real LLaVA-NeXT checkout with a packvit vision tower: its own train(), reload and generate.

    python examples/llava_next_check.py --llava /path/to/LLaVA-NeXT [--family siglip2 dinov3 aimv2]

For each family this builds tiny random checkpoints (a transformers vision model saved with
``save_pretrained``, a 2-layer Qwen2 language model and a byte-level tokenizer), then runs
LLaVA-NeXT's own code, unmodified but for the builder branch README.md documents:
1. ``llava.train.train.train()`` from the command line arguments a OneVision recipe uses
   (``--mm_tunable_parts mm_vision_tower,mm_mlp_adapter,mm_language_model``,
   ``--mm_patch_merge_type spatial_unpad``, ``--image_aspect_ratio pad``) on a data file with
   three photos of different sizes, a two-image sample, a video sample and a text-only sample:
   its dataset, collator, LLaVATrainer, ``prepare_inputs_labels_for_multimodal`` and save;
2. checks that the tower's weights moved (it trained) and the saved checkpoint holds them;
3. ``llava.model.builder.load_pretrained_model`` on the output (the reload path with
   ``delay_load``), checking the fine-tuned tower weights came back, not the original ones;
4. ``llava.mm_utils.process_images`` on the three photos and ``model.generate(images=...)``.

It needs an environment where LLaVA-NeXT imports: transformers 4.x (4.57 tested), deepspeed,
accelerate, peft, datasets, tyro, einops, sentencepiece; packvit installed. On transformers >= 4.52
two of LLaVA-NeXT's imports moved; ``_transformers_compat`` below re-exports them where LLaVA looks
(the alternative is the two-line import fix in its qformer.py and llava_trainer.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BUILDER_BRANCH = """    if str(vision_tower).startswith("packvit"):
        from packvit.integrations.llava import build_vision_tower as build_packvit_tower
        return build_packvit_tower(vision_tower_cfg, **kwargs)
"""


def _transformers_compat() -> None:
    """Names LLaVA-NeXT imports from where transformers 4.3x kept them."""
    import accelerate.utils
    import transformers.modeling_utils as mu
    import transformers.pytorch_utils as pu
    import transformers.trainer as tr

    for name in ("apply_chunking_to_forward", "find_pruneable_heads_and_indices", "prune_linear_layer"):
        if not hasattr(mu, name):
            setattr(mu, name, getattr(pu, name))
    if not hasattr(tr, "ALL_LAYERNORM_LAYERS"):
        tr.ALL_LAYERNORM_LAYERS = pu.ALL_LAYERNORM_LAYERS
    if not hasattr(tr, "GradientAccumulationPlugin"):
        tr.GradientAccumulationPlugin = accelerate.utils.GradientAccumulationPlugin


def _builder_has_packvit(llava_dir: Path) -> bool:
    return "packvit" in (llava_dir / "llava/model/multimodal_encoder/builder.py").read_text()


def _apply_builder_branch_in_memory() -> None:
    """The documented builder branch, applied to the imported module instead of the file."""
    import llava.model.llava_arch as arch
    import llava.model.multimodal_encoder.builder as builder

    from packvit.integrations.llava import build_vision_tower as build_packvit_tower

    original = builder.build_vision_tower

    def build_vision_tower(vision_tower_cfg, **kwargs):
        name = getattr(vision_tower_cfg, "mm_vision_tower", getattr(vision_tower_cfg, "vision_tower", None))
        if str(name).startswith("packvit"):
            return build_packvit_tower(vision_tower_cfg, **kwargs)
        return original(vision_tower_cfg, **kwargs)

    builder.build_vision_tower = arch.build_vision_tower = build_vision_tower


# ---------------------------------------------------------------------------------------------
# Tiny checkpoints and data
# ---------------------------------------------------------------------------------------------


def tiny_vision_checkpoint(family: str, out: Path) -> Path:
    """A tiny random vision checkpoint in the Hugging Face layout (config.json + model.safetensors).

    Written by transformers' own ``save_pretrained`` when this transformers has the family's class
    (5.x), else by packvit's ``export_hf``, which writes the same files (LLaVA-NeXT's trainer
    needs a transformers 4.4x that predates these vision models)."""
    import transformers

    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)
    hf = {
        "siglip2": ("Siglip2VisionConfig", "Siglip2VisionModel", dict(patch_size=16, num_patches=256)),
        "dinov3": ("DINOv3ViTConfig", "DINOv3ViTModel", dict(patch_size=16, num_register_tokens=4)),
        "aimv2": ("Aimv2VisionConfig", "Aimv2VisionModel", dict(patch_size=14, is_native=True)),
    }[family]
    torch.manual_seed(0)
    if hasattr(transformers, hf[1]):
        model = getattr(transformers, hf[1])._from_config(getattr(transformers, hf[0])(**kw, **hf[2]))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        model.save_pretrained(out)
        return out
    import packvit
    from weights_conversion import export_hf

    cfg = {"siglip2": packvit.Siglip2Config, "dinov3": packvit.DINOv3Config, "aimv2": packvit.AIMv2Config}[family]
    extra = {"siglip2": {}, "dinov3": dict(num_register_tokens=4), "aimv2": dict(patch_size=14, use_head=False)}[family]
    model = {"siglip2": packvit.Siglip2, "dinov3": packvit.DINOv3, "aimv2": packvit.AIMv2}[family](
        cfg(hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4, **extra), attn_backend="sdpa"
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    export_hf(model, out, overwrite=True)
    return out


def tiny_qwen(out: Path) -> Path:
    """A 2-layer Qwen2 LM and a byte-level BPE tokenizer with Qwen's chat special tokens."""
    import transformers
    from tokenizers import ByteLevelBPETokenizer

    out.mkdir(parents=True, exist_ok=True)
    corpus = [
        "Describe the image. A cat sits on a chair.",
        "What is in the picture? A cup of coffee.",
        "An astronaut in a white suit.",
        "Two images: a cat and a cup.",
        "A short video of a person.",
        "Hello, how are you? I am fine.",
        "user assistant system",
    ] * 4
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        corpus, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    )
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.save_pretrained(out)
    cfg = transformers.Qwen2Config(
        vocab_size=len(tok) + 8,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(out)
    return out


def data_file(work: Path) -> Path:
    """Three photos of three sizes, a two-image sample, a 4-frame video and a text-only sample."""
    from PIL import Image

    images = work / "images"
    images.mkdir(parents=True, exist_ok=True)
    assets = ROOT / "packvit" / "assets"
    Image.open(assets / "astronaut.jpg").convert("RGB").save(images / "astronaut.jpg")  # 224 x 224
    Image.open(assets / "chelsea.jpg").convert("RGB").save(images / "chelsea.jpg")  # 224 x 149
    Image.open(assets / "coffee.jpg").convert("RGB").transpose(Image.Transpose.ROTATE_90).resize((120, 200)).save(
        images / "coffee_portrait.jpg"
    )  # 120 x 200
    video = work / "videos" / "shareVideoGPTV_clip"  # LLaVA reads such folders as frame files
    video.mkdir(parents=True, exist_ok=True)
    cat = Image.open(assets / "chelsea.jpg").convert("RGB")
    for i in range(4):
        cat.rotate(5 * i).save(video / f"frame_{i:03d}.jpg")
    turn = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]  # noqa: E731
    samples = [
        {
            "id": "a",
            "image": "astronaut.jpg",
            "conversations": turn("<image>\nDescribe the image.", "An astronaut in a white suit."),
        },
        {
            "id": "c",
            "image": "chelsea.jpg",
            "conversations": turn("<image>\nWhat is in the picture?", "A cat sits on a chair."),
        },
        {
            "id": "p",
            "image": "coffee_portrait.jpg",
            "conversations": turn("What is in the picture?\n<image>", "A cup of coffee."),
        },
        {
            "id": "m",
            "image": ["astronaut.jpg", "chelsea.jpg"],
            "conversations": turn("<image>\n<image>\nTwo images: what are they?", "An astronaut and a cat."),
        },
        {"id": "v", "video": "shareVideoGPTV_clip", "conversations": turn("<image>\nWhat happens?", "A cat turns.")},
        {"id": "t", "conversations": turn("Hello, how are you?", "I am fine.")},
    ]
    f = work / "data.json"
    f.write_text(json.dumps(samples))
    return f


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def tower_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().clone() for k, v in model.get_model().get_vision_tower().state_dict().items()}


def run_family(family: str, work: Path, lm: Path, data: Path, merge: str, aspect: str, mode: str) -> dict:
    import llava.train.train as llava_train
    from llava.mm_utils import process_images, tokenizer_image_token
    from llava.model.builder import load_pretrained_model
    from PIL import Image

    vision = tiny_vision_checkpoint(family, work / f"vision-{family}")
    out = work / f"llava-qwen-{family}-{mode}"
    args = [
        "train.py",
        "--model_name_or_path",
        str(lm),
        "--version",
        "qwen_1_5",
        "--data_path",
        str(data),
        "--image_folder",
        str(work / "images"),
        "--video_folder",
        str(work / "videos"),
        "--vision_tower",
        f"{'packvit-fixed' if mode == 'fixed' else 'packvit'}:{vision}",
        "--image_grid_pinpoints",
        "(1x1),...,(2x2)",
        "--mm_projector_type",
        "mlp2x_gelu",
        "--mm_vision_select_layer",
        "-2",
        "--mm_use_im_start_end",
        "False",
        "--mm_use_im_patch_token",
        "False",
        "--mm_patch_merge_type",
        merge,
        "--image_aspect_ratio",
        aspect,
        "--mm_newline_position",
        "grid",
        "--mm_spatial_pool_stride",
        "2",
        "--mm_tunable_parts",
        "mm_vision_tower,mm_mlp_adapter,mm_language_model",
        "--frames_upbound",
        "4",
        "--force_sample",
        "True",
        "--output_dir",
        str(out),
        "--max_steps",
        "3",
        "--per_device_train_batch_size",
        "6",
        "--learning_rate",
        "1e-3",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--model_max_length",
        "4096",
        "--dataloader_num_workers",
        "1",
        "--bf16",
        "True",
        "--logging_steps",
        "1",
        "--lazy_preprocess",
        "True",
        "--use_cpu",
        "True",
        "--attn_implementation",
        "sdpa",
    ]
    from packvit.tower import PackedVisionTower

    # Watch the tower from inside LLaVA's run: its state before the first step, which of its
    # tensors LLaVA's backward reaches, and what each forward returns.
    seen = {"outputs": []}
    orig_forward = PackedVisionTower.forward

    def spy(tower, *a, **k):
        if "before" not in seen:
            seen["tower"] = tower
            seen["before"] = {n: v.detach().float().clone() for n, v in tower.state_dict().items()}
            params = dict(tower.named_parameters())
            seen["trainable"] = sum(p.requires_grad for p in params.values())
            seen["tensors"] = len(params)
            seen["with grad"] = set()
            for name, p in params.items():
                p.register_post_accumulate_grad_hook(
                    lambda q, name=name: (
                        seen["with grad"].add(name) if q.grad is not None and q.grad.abs().sum() > 0 else None
                    )
                )
        out = orig_forward(tower, *a, **k)
        if len(seen["outputs"]) < 1:
            seen["outputs"].append(
                list(out[0].shape)
                if isinstance(out, tuple)
                else list(out.shape)
                if isinstance(out, torch.Tensor)
                else [list(o.shape) for o in out]
            )
        return out

    PackedVisionTower.forward = spy
    sys.argv = args
    try:
        llava_train.train(attn_implementation="sdpa")
    finally:
        PackedVisionTower.forward = orig_forward
    after = {n: v.detach().float().clone() for n, v in seen["tower"].state_dict().items()}
    moved = sum(not torch.equal(after[k], v) for k, v in seen["before"].items())

    # Reload as LLaVA's eval code does, then generate on three photos of three sizes.
    tokenizer, model, processor, _ = load_pretrained_model(
        str(out), None, "llava_qwen", device_map="auto", torch_dtype="bfloat16", attn_implementation="sdpa"
    )
    model = model.float().eval()
    reloaded = tower_state(model)
    differ = [k for k in after if not torch.allclose(reloaded[k], after[k], atol=1e-2, rtol=1e-2)]  # bf16 round trip
    same = not differ
    if differ:
        print(f"{family}: reloaded tower tensors differ from the trained ones: {differ}")
    photos = [
        Image.open(work / "images" / n).convert("RGB") for n in ("astronaut.jpg", "chelsea.jpg", "coffee_portrait.jpg")
    ]
    images = process_images(photos, processor, model.config)
    prompt = "<|im_start|>user\n<image>\n<image>\n<image>\nDescribe the images.<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer_image_token(prompt, tokenizer, return_tensors="pt").unsqueeze(0)
    with torch.inference_mode():
        gen = model.generate(
            ids,
            images=images,
            image_sizes=[p.size for p in photos],
            modalities=["image"] * 3,
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return {
        "family": family,
        "mode": mode,
        "merge": merge,
        "aspect": aspect,
        "tower tensors": seen["tensors"],
        "trainable": seen["trainable"],
        "got gradients": len(seen["with grad"]),
        "moved after training": moved,
        "first tower output": seen["outputs"][0],
        "reload kept tuned weights": same,
        "generated": tuple(gen.shape),
        "grids" if mode == "native" else "crops": getattr(images, "grid_thw", None).tolist()
        if mode == "native"
        else [list(x.shape) for x in images],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llava", required=True, type=Path, help="a LLaVA-NeXT checkout (github.com/LLaVA-VL/LLaVA-NeXT)")
    ap.add_argument(
        "--family", nargs="+", default=["siglip2", "dinov3", "aimv2"], choices=["siglip2", "dinov3", "aimv2"]
    )
    ap.add_argument("--merge", default="spatial_unpad", help="mm_patch_merge_type (flat, spatial, spatial_unpad)")
    ap.add_argument(
        "--aspect", default="square", help="image_aspect_ratio: square (native sizes), pad, anyres_max_4 (fixed mode)"
    )
    ap.add_argument(
        "--mode",
        default="native",
        choices=["native", "fixed"],
        help="native: 'packvit:<ckpt>' (mixed resolutions); fixed: 'packvit-fixed:<ckpt>' (LLaVA's crops)",
    )
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("WANDB_DISABLED", "true")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # LLaVA's conversation templates look up a hub tokenizer
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not torch.cuda.is_available():  # LLaVA's save path calls torch.cuda.synchronize() unconditionally
        torch.cuda.synchronize = lambda *a, **k: None
    sys.path.insert(0, str(args.llava.resolve()))
    _transformers_compat()
    import llava.model  # noqa: F401  (registers LLaVA's classes)

    if _builder_has_packvit(args.llava):
        print("builder: the checkout's builder.py has the packvit branch")
    else:
        print("builder: no packvit branch in builder.py; applying the documented branch in memory:\n" + BUILDER_BRANCH)
        _apply_builder_branch_in_memory()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="packvit-llava-"))
    lm = tiny_qwen(work / "tiny-qwen")
    data = data_file(work)
    results = [run_family(f, work, lm, data, args.merge, args.aspect, args.mode) for f in args.family]
    for r in results:
        print(json.dumps(r))
    ok = all(
        r["got gradients"] == r["tower tensors"] == r["trainable"]
        and r["moved after training"] > 0
        and r["reload kept tuned weights"]
        for r in results
    )
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
