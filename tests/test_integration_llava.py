"""LLaVA-NeXT's call sites, reproduced as its code makes them (LLaVA-NeXT is not a pip package; the
real checkout runs in examples/llava_next_check.py, see README.md).

Each test names the LLaVA-NeXT line it stands for.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

import packvit
from helpers import PATCH, hf_reference, random_images
from packvit.packed_pixels import PackedPixels
from packvit.tower import FixedSizeOnly, PackedVisionTower

ASSETS = Path(packvit.__file__).parent / "assets"
FAMILIES = ("siglip2", "dinov3", "aimv2")


def _args(**kw):
    return types.SimpleNamespace(**kw)


def _photos():
    a = Image.open(ASSETS / "astronaut.jpg").convert("RGB")  # 224 x 224
    c = Image.open(ASSETS / "chelsea.jpg").convert("RGB")  # 224 x 149
    p = Image.open(ASSETS / "coffee.jpg").convert("RGB").transpose(Image.Transpose.ROTATE_90).resize((120, 200))
    return [a, c, p]


# -- the data path: train.py / mm_utils.py ----------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_pixel_values_index_keeps_the_grid(family, hf_checkpoints):
    """train.py process_image: `processor.preprocess(image, return_tensors="pt")["pixel_values"][0]`."""
    tower = PackedVisionTower(f"packvit:{hf_checkpoints[family][1]}", _args())
    proc = tower.image_processor
    photos = _photos()
    for img in photos:
        one = proc.preprocess(img, return_tensors="pt")["pixel_values"][0]
        x, g = proc.processor([img])
        assert isinstance(one, PackedPixels) and torch.equal(one.grid_thw, g) and torch.equal(one.packed()[0], x)
    # a video (train.py: preprocess(frames)["pixel_values"], no [0]) and the collator's list
    frames = proc.preprocess([photos[1], photos[1].rotate(5)], return_tensors="pt")["pixel_values"]
    assert len(frames) == 2 and frames.grid_thw.shape == (2, 3)
    feats = tower([proc.preprocess(p)["pixel_values"][0] for p in photos][0])
    assert len(feats) == 1


def test_process_images_stack_to_and_workers(hf_checkpoints):
    """mm_utils.process_images ("pad"): torch.stack of equal shapes; eval: `[_image.to(dtype, device) ...]`;
    the Trainer's DataLoader sends samples from worker processes."""
    tower = PackedVisionTower(f"packvit:{hf_checkpoints['dinov3'][1]}", _args())
    proc = tower.image_processor
    a, c, _ = _photos()
    square = [proc.preprocess(img)["pixel_values"][0] for img in (a, a.rotate(90))]
    stacked = torch.stack(square)  # process_images: `if all(x.shape == new_images[0].shape ...)`
    assert isinstance(stacked, PackedPixels) and stacked.shape[0] == 2 and len(stacked) == 2
    assert [x.grid_thw.tolist() for x in stacked] == [s.grid_thw.tolist() for s in square]
    moved = [x.to(dtype=torch.float16) for x in stacked]
    assert all(isinstance(m, PackedPixels) and m.dtype == torch.float16 for m in moved)
    mixed = [proc.preprocess(img)["pixel_values"][0] for img in (a, c)]
    assert mixed[0].shape != mixed[1].shape  # process_images keeps a list then
    loader = torch.utils.data.DataLoader(mixed, batch_size=None, num_workers=1)
    got = list(loader)
    assert [g.grid_thw.tolist() for g in got] == [m.grid_thw.tolist() for m in mixed]
    assert all(torch.equal(g, m) for g, m in zip(got, mixed))


# -- the tower's contract ------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_bchw_batch_is_b_images(family, hf_checkpoints):
    """llava_arch encode_images on LLaVA's fixed-size paths: `vision_tower(images)` with (B, C, H, W)."""
    hf, d = hf_checkpoints[family]
    tower = PackedVisionTower(d, _args(mm_vision_select_layer=-1))
    p = PATCH[family]
    images = torch.stack(random_images([(1, 3, 4)] * 3, p, seed=3))  # (3, C, 3p, 4p), normalised
    out = tower(images)
    assert out.shape == (3, 12, tower.hidden_size)
    P = tower.vision_tower.num_prefix
    ref = [r[3][-1][0, P:] for r in hf_reference(family, hf, list(images), output_hidden_states=True)]
    assert (out - torch.stack(ref)).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="unsupported arguments.*output_hidden_states"):
        tower(images, output_hidden_states=True)


def test_fixed_mode_has_llava_sizes_native_says_why_not(hf_checkpoints):
    """llava_arch anyres / get_2dPool read image_size and num_patches_per_side; train.py reads crop_size."""
    d = hf_checkpoints["siglip2"][1]
    fixed = PackedVisionTower(f"packvit-fixed:{d}", _args())
    assert (
        fixed.fixed_size and fixed.image_size == 384 and fixed.num_patches_per_side == 24 and fixed.num_patches == 576
    )
    proc = fixed.image_processor
    assert proc.crop_size == {"height": 384, "width": 384} and proc.size["shortest_edge"] == 384
    pv = proc.preprocess(_photos()[1], return_tensors="pt")["pixel_values"]
    assert pv.shape == (1, 3, 384, 384) and not isinstance(pv, PackedPixels)
    assert fixed(pv).shape == (1, 576, fixed.hidden_size)

    native = PackedVisionTower(f"packvit:{d}", _args())
    assert not hasattr(native, "image_size")  # LLaVA's anyres check: `hasattr(vision_tower, "image_size")`
    with pytest.raises(FixedSizeOnly, match="exists only in fixed-size mode.*packvit-fixed"):
        _ = native.num_patches_per_side
    assert native.image_processor.crop_size["height"] == 384  # train.py's text-only placeholder size


def test_load_model_device_maps(hf_checkpoints):
    """llava/model/builder.py: `vision_tower.load_model(device_map=device_map)` with device_map="auto"."""
    d = hf_checkpoints["aimv2"][1]
    for device_map in ("auto", "cpu", {"": "cpu"}, torch.device("cpu")):
        tower = PackedVisionTower(d, _args(), delay_load=True)
        tower.load_model(device_map=device_map)
        assert tower.is_loaded and tower.device.type == "cpu"
    tower = PackedVisionTower(d, _args(), delay_load=True)
    with pytest.raises(ValueError, match="several devices"):
        tower.load_model(device_map={"a": "cpu", "b": "meta"})
    with pytest.raises(TypeError, match="unsupported arguments"):
        tower.load_model(device_map="auto", low_cpu_mem_usage=True)


@pytest.mark.parametrize("how", ["mm_tunable_parts", "unfreeze_mm_vision_tower"])
def test_reload_after_tuning_keeps_the_tuned_weights(how, hf_checkpoints):
    """LlavaMetaModel.__init__: `build_vision_tower(config, delay_load=True)`, then transformers loads the
    LLaVA checkpoint's state dict: the tuned tower must exist by then, as LLaVA's own towers do."""
    d = hf_checkpoints["siglip2"][1]
    args = (
        _args(mm_tunable_parts="mm_vision_tower,mm_mlp_adapter")
        if how == "mm_tunable_parts"
        else _args(unfreeze_mm_vision_tower=True)
    )
    trained = PackedVisionTower(d, args, delay_load=True)
    assert trained.is_loaded and trained.trainable
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)  # "fine-tuned"
    saved = {f"model.vision_tower.{k}": v.clone() for k, v in trained.state_dict().items()}

    holder = torch.nn.Module()
    holder.vision_tower = PackedVisionTower(d, args, delay_load=True)  # the reload
    missing, unexpected = holder.load_state_dict({k.removeprefix("model."): v for k, v in saved.items()}, strict=True)
    assert not missing and not unexpected
    assert all(torch.equal(v, saved[f"model.vision_tower.{k}"]) for k, v in holder.vision_tower.state_dict().items())

    frozen = PackedVisionTower(d, _args(), delay_load=True)  # not tuned: config only, loads later
    assert not frozen.is_loaded and frozen.hidden_size == 64


def test_hub_id_resolves_through_the_cache(hf_checkpoints, tmp_path, monkeypatch):
    """`PackedVisionTower("google/siglip2-base-patch16-naflex")` and the processor, from the hub cache."""
    import shutil

    cache = tmp_path / "hub"
    snap = cache / "models--google--tiny-siglip2" / "snapshots" / "0123456789abcdef"
    shutil.copytree(hf_checkpoints["siglip2"][1], snap)
    (cache / "models--google--tiny-siglip2" / "refs").mkdir()
    (cache / "models--google--tiny-siglip2" / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    from packvit.preprocess import ImageProcessor

    assert ImageProcessor.from_pretrained("google/tiny-siglip2").config.mode == "naflex"
    tower = PackedVisionTower("packvit:google/tiny-siglip2", _args(), delay_load=True)
    assert tower.hidden_size == 64
    tower.load_model()
    assert len(tower([_photos()[0]])) == 1


# -- prepare_inputs_labels_for_multimodal: the native-resolution path ------------------------------------------


class _FakeLlava:
    """What llava_arch's methods read off the model: config, get_vision_tower(), get_model().mm_projector,
    get_model().image_newline."""

    def __init__(self, tower, **config):
        self.config = types.SimpleNamespace(**config)
        self.tower = tower
        inner = torch.nn.Module()
        torch.manual_seed(0)
        inner.mm_projector = torch.nn.Sequential(
            torch.nn.Linear(tower.hidden_size, 32), torch.nn.GELU(), torch.nn.Linear(32, 32)
        )
        inner.image_newline = torch.nn.Parameter(torch.randn(32))
        self.inner = inner

    def get_vision_tower(self):
        return self.tower

    def get_model(self):
        return self.inner


def _inputs(tower):
    proc = tower.image_processor
    photos = _photos()
    images = [proc.preprocess(p, return_tensors="pt")["pixel_values"][0] for p in photos]
    video = proc.preprocess([photos[1], photos[1].rotate(5), photos[1].rotate(10)], return_tensors="pt")["pixel_values"]
    s = proc.crop_size["height"]
    text = torch.zeros(1, 3, s, s)  # train.py's placeholder for a text-only sample
    return images, video, text


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_flat_and_spatial_unpad(family, hf_checkpoints):
    from packvit.integrations.llava import encode_images

    tower = PackedVisionTower(f"packvit:{hf_checkpoints[family][1]}", _args())
    images, video, text = _inputs(tower)
    flat = _FakeLlava(tower, mm_patch_merge_type="flat", image_aspect_ratio="pad")
    out = encode_images(flat, images + [text], ["image"] * 3 + ["text"])
    grids = [im.grid_thw[0].tolist() for im in images]
    assert [o.shape[0] for o in out[:3]] == [h * w for _, h, w in grids]
    with torch.no_grad():  # one packed forward == each image alone, projected
        for im, o in zip(images, out):
            ref = flat.get_model().mm_projector(tower(im)[0])
            # fp32 matmuls of other shapes sum in another order: the parity suite's tolerance
            assert (o - ref).abs().max().item() <= 1e-4

    unpad = _FakeLlava(tower, mm_patch_merge_type="spatial_unpad", image_aspect_ratio="pad")
    out2 = encode_images(unpad, images, ["image"] * 3)
    nl = unpad.get_model().image_newline
    for (_, h, w), o, f in zip(grids, out2, out):
        assert o.shape[0] == h * (w + 1)  # one image_newline after every row of the image's own grid
        rows = o.view(h, w + 1, -1)
        assert torch.equal(rows[:, -1], nl.expand(h, -1))
        assert torch.allclose(rows[:, :-1].reshape(h * w, -1), f, atol=1e-6)

    video_model = _FakeLlava(
        tower,
        mm_patch_merge_type="spatial_unpad",
        mm_newline_position="grid",
        mm_spatial_pool_stride=2,
        mm_spatial_pool_mode="average",
    )
    (v,) = encode_images(video_model, [video], ["video"])
    _, h, w = video.grid_thw[0].tolist()
    assert v.shape[0] == 3 * (h // 2) * (w // 2 + 1)


def test_encode_refuses_anyres_in_native_mode(hf_checkpoints):
    from packvit.integrations.llava import encode_images

    tower = PackedVisionTower(f"packvit:{hf_checkpoints['siglip2'][1]}", _args())
    images, _, _ = _inputs(tower)
    with pytest.raises(ValueError, match="anyres_max_9.*packvit-fixed"):
        encode_images(_FakeLlava(tower, image_aspect_ratio="anyres_max_9", mm_patch_merge_type="spatial_unpad"), images)


def test_cls_patch_layout(hf_checkpoints):
    from packvit.integrations.llava import encode_images

    tower = PackedVisionTower(f"packvit:{hf_checkpoints['dinov3'][1]}", _args(mm_vision_select_feature="cls_patch"))
    images, _, _ = _inputs(tower)
    out = encode_images(_FakeLlava(tower, mm_patch_merge_type="spatial_unpad"), images)
    assert [o.shape[0] for o in out] == [1 + h * (w + 1) for _, h, w in (im.grid_thw[0].tolist() for im in images)]


def test_install_wraps_prepare_inputs_and_delegates(hf_checkpoints, monkeypatch):
    """The wrapper hands per-image token lists to LLaVA's own method through its single-tensor branch
    (`image_features = self.encode_images(images)`), and leaves every other call alone."""
    import packvit.integrations.llava as integ

    class LlavaMetaForCausalLM:  # the branch of llava_arch this relies on, as LLaVA writes it
        def prepare_inputs_labels_for_multimodal(
            self,
            input_ids,
            position_ids,
            attention_mask,
            past_key_values,
            labels,
            images,
            modalities=["image"],  # noqa: B006 (LLaVA's signature)
            image_sizes=None,
        ):
            if images is None or input_ids.shape[1] == 1:
                return "untouched"
            if type(images) is list or images.ndim == 5:
                return "list path"
            return self.encode_images(images)

    arch = types.ModuleType("llava.model.llava_arch")
    arch.LlavaMetaForCausalLM = LlavaMetaForCausalLM
    for name, mod in {
        "llava": types.ModuleType("llava"),
        "llava.model": types.ModuleType("llava.model"),
        "llava.model.llava_arch": arch,
    }.items():
        monkeypatch.setitem(sys.modules, name, mod)
    tower = PackedVisionTower(f"packvit:{hf_checkpoints['aimv2'][1]}", _args())
    cfg = types.SimpleNamespace(mm_vision_tower=f"packvit:{hf_checkpoints['aimv2'][1]}", mm_vision_select_layer=-2)
    assert isinstance(integ.build_vision_tower(cfg), PackedVisionTower)  # installs
    integ.install()  # idempotent

    class Model(_FakeLlava, LlavaMetaForCausalLM):
        pass

    model = Model(tower, mm_patch_merge_type="flat")
    images, _, _ = _inputs(tower)
    ids = torch.zeros(1, 8, dtype=torch.long)
    feats = model.prepare_inputs_labels_for_multimodal(ids, None, None, None, None, images, ["image"] * 3)
    assert [f.shape[0] for f in feats] == [im.grid_thw[0, 1:].prod().item() for im in images]
    assert "encode_images" not in vars(model)  # the instance override is gone again
    assert model.prepare_inputs_labels_for_multimodal(ids[:, :1], None, None, None, None, images) == "untouched"
    fixed = Model(PackedVisionTower(f"packvit-fixed:{hf_checkpoints['aimv2'][1]}", _args()))
    assert fixed.prepare_inputs_labels_for_multimodal(ids, None, None, None, None, images) == "list path"
    integ.uninstall()
    assert not hasattr(LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal, "_packvit_original")


def test_readme_builder_branch(hf_checkpoints, monkeypatch):
    """The branch README.md tells users to paste into LLaVA-NeXT's build_vision_tower, run as written."""
    import re
    import textwrap

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Use with LLaVA-NeXT") :]
    branch = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    source = (
        "def build_vision_tower(vision_tower_cfg, **kwargs):\n"
        "    vision_tower = getattr(vision_tower_cfg, 'mm_vision_tower', getattr(vision_tower_cfg, 'vision_tower', None))\n"
        + textwrap.indent(textwrap.dedent(branch), "    ")
        + "    return 'llava tower'\n"
    )
    arch = types.ModuleType("llava.model.llava_arch")
    arch.LlavaMetaForCausalLM = type(
        "LlavaMetaForCausalLM", (), {"prepare_inputs_labels_for_multimodal": lambda *a: None}
    )
    for name, mod in {
        "llava": types.ModuleType("llava"),
        "llava.model": types.ModuleType("llava.model"),
        "llava.model.llava_arch": arch,
    }.items():
        monkeypatch.setitem(sys.modules, name, mod)
    scope: dict = {}
    exec(compile(source, "README.md", "exec"), scope)
    cfg = types.SimpleNamespace(mm_vision_tower=f"packvit:{hf_checkpoints['siglip2'][1]}", mm_vision_select_layer=-2)
    assert isinstance(scope["build_vision_tower"](cfg, delay_load=True), PackedVisionTower)
    assert (
        scope["build_vision_tower"](types.SimpleNamespace(mm_vision_tower="openai/clip-vit-large-patch14"))
        == "llava tower"
    )
    assert hasattr(arch.LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal, "_packvit_original")


def test_tuned_tower_survives_transformers_save_and_reload(hf_checkpoints, tmp_path):
    """A LLaVA model is a transformers PreTrainedModel holding the tower: save_pretrained then
    from_pretrained (what LLaVA's save and load_pretrained_model do) must bring back every tuned
    tensor. transformers renames checkpoint keys containing 'gamma' on load, which once dropped
    DINOv3's LayerScale here."""
    import transformers

    d = str(hf_checkpoints["dinov3"][1])

    class HolderConfig(transformers.PretrainedConfig):
        model_type = "packvit_llava_holder_test"

    class Holder(transformers.PreTrainedModel):
        config_class = HolderConfig

        def __init__(self, config):
            super().__init__(config)
            self.vision_tower = PackedVisionTower(d, _args(mm_tunable_parts="mm_vision_tower"), delay_load=True)
            self.post_init()

        def _init_weights(self, module):  # the tower's weights come from its checkpoint
            pass

    model = Holder(HolderConfig())
    with torch.no_grad():
        for p in model.vision_tower.parameters():
            p.mul_(1.5).add_(0.25)
    tuned = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "llava")
    reloaded = Holder.from_pretrained(tmp_path / "llava")
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, tuned[k]), f"{k} did not come back"


def test_hidden_states_read_with_negative_indices(hf_checkpoints):
    """README: `out.hidden_states` uses Hugging Face indexing, -2 included (issue: KeyError: -2)."""
    from weights_conversion import load_model

    model = load_model(hf_checkpoints["dinov3"][1], attn_backend="sdpa")
    x, g = packvit.patchify(random_images([(1, 2, 3)], 16), 16)
    out = model(x, g, output_layers=[-2, 1], return_dict=True)
    assert torch.equal(out.hidden_states[-2], out.hidden_states[1]) and -2 in out.hidden_states
    assert torch.equal(out.prefix_hidden_states[-2], out.prefix_hidden_states[1])


def test_exact_gelu_never_takes_the_tanh_epilogue():
    """cuBLASLt's fused GELU epilogue computes the tanh approximation: only gelu_pytorch_tanh MLPs
    (SigLIP2) may take it; DINOv3's exact GELU must not (a silent 1e-3 error per activation)."""
    from packvit.layers import Mlp

    assert Mlp(8, 16, "gelu_pytorch_tanh").fused_gelu_tanh
    assert not Mlp(8, 16, "gelu").fused_gelu_tanh
    assert not Mlp(8, 16, "silu").fused_gelu_tanh
