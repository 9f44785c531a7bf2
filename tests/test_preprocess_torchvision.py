"""packvit's two pixel backends vs transformers' two processor backends, for all three families.

``backend="torchvision"`` must equal transformers' torchvision processors bit for bit, and
``backend="pil"`` its PIL processors. packvit's torchvision backend needs no torchvision, so the
tests that do not run a transformers torchvision processor run everywhere; the others skip
cleanly when torchvision is not installed (or does not import).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import packvit
from packvit import preprocess_torchvision as ptv
from packvit.preprocess import IMAGENET_MEAN, IMAGENET_STD, ImageProcessor, PreprocessConfig, naflex_size, smart_resize
from weights_conversion import FAMILIES

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
# (H, W): non-square, tiny, one axis under the patch size, extreme aspect ratios, odd sides.
SIZES = [(480, 640), (37, 1000), (1000, 37), (7, 5), (16, 16), (300, 17), (2, 900), (513, 511), (9, 120)]


def _synthetic(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]  # a gradient plus noise: the filters see structure, not only noise
    base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) % 256], -1)
    return Image.fromarray(np.clip(base + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def images():
    photos = []
    for f in sorted((ROOT / "packvit" / "assets").glob("*.jpg")):
        with Image.open(f) as im:
            photos.append(im.convert("RGB"))
    assert len(photos) == 3
    return photos + [_synthetic(h, w, i) for i, (h, w) in enumerate(SIZES)]


@pytest.fixture(scope="module")
def hf_torchvision():
    """Skip unless transformers can run its torchvision processors here."""
    if not transformers.utils.is_torchvision_available():
        pytest.skip("torchvision is not installed: transformers' torchvision processors cannot run")
    try:
        from torchvision.transforms.v2 import functional as tvF
    except Exception as e:  # any import failure means: cannot compare here
        pytest.skip(f"torchvision does not import ({type(e).__name__}: {e})")
    return tvF


# ---------------------------------------------------------------------------------------------
# One checkpoint folder per recipe, its preprocessor_config.json written by transformers itself
# ---------------------------------------------------------------------------------------------

_FIXED = {"height": 224, "width": 224}


def _vision_config(family: str):
    kw = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    return {
        "siglip2": lambda: transformers.Siglip2VisionConfig(patch_size=16, **kw),
        "aimv2": lambda: transformers.Aimv2VisionConfig(patch_size=14, **kw),
        "dinov3": lambda: transformers.DINOv3ViTConfig(patch_size=16, **kw),
    }[family]()


def _hf_processor(recipe: str, backend: str):
    """transformers' processor of ``recipe`` for ``backend``; DINOv3 has no PIL processor, its PIL
    recipe is ViT's (resize, rescale, normalise) with DINOv3's size and ImageNet statistics."""
    if recipe.startswith("siglip2"):
        cls = transformers.Siglip2ImageProcessor if backend == "torchvision" else transformers.Siglip2ImageProcessorPil
        return cls(max_num_patches=int(recipe.split("-")[1]))
    if recipe == "aimv2-fixed":
        cls = transformers.CLIPImageProcessor if backend == "torchvision" else transformers.CLIPImageProcessorPil
        return cls(size={"shortest_edge": 224}, crop_size=dict(_FIXED))
    if recipe == "dinov3-fixed":
        if backend == "torchvision":
            return transformers.DINOv3ViTImageProcessor(size=dict(_FIXED))
        return transformers.ViTImageProcessorPil(
            size=dict(_FIXED), image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD)
        )
    raise ValueError(recipe)


RECIPES = ["siglip2-64", "siglip2-256", "siglip2-1024", "aimv2-fixed", "dinov3-fixed"]
# max |pil - torchvision| of packvit's own two backends on ``images`` (the transformers PIL and
# torchvision processors differ by exactly as much, since each backend equals its twin): one or
# two 8-bit levels after normalisation, from interpolate(antialias=True) vs PIL's resampling.
BACKEND_GAP = {
    "siglip2-64": 7.9e-3,
    "siglip2-256": 7.9e-3,
    "siglip2-1024": 1.6e-2,
    "aimv2-fixed": 3.1e-2,
    "dinov3-fixed": 1.8e-2,
}


def _checkpoint(tmp_path: Path, recipe: str, backend: str) -> tuple[Path, object]:
    hf = _hf_processor(recipe, backend)
    hf.save_pretrained(tmp_path)
    _vision_config(recipe.split("-")[0]).save_pretrained(tmp_path)
    return tmp_path, hf


def _hf_patches(hf, recipe: str, imgs) -> torch.Tensor:
    ref = hf.preprocess(imgs, return_tensors="pt")
    if recipe.startswith("siglip2"):
        return ref["pixel_values"][ref["pixel_attention_mask"].bool()]  # drop the padding
    return packvit.patchify(ref["pixel_values"], 14 if recipe.startswith("aimv2") else 16)[0]


def _packvit(d: Path, recipe: str, backend: str) -> ImageProcessor:
    return ImageProcessor.from_pretrained(d, backend=backend, mode=None if recipe.startswith("siglip2") else "fixed")


def _assert_identical(x: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert x.shape == ref.shape, f"{what}: shape {tuple(x.shape)} vs transformers {tuple(ref.shape)}"
    assert torch.equal(x, ref), f"{what}: max abs diff {(x - ref).abs().max().item():.3g}"


# ---------------------------------------------------------------------------------------------
# Whole processors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES)
def test_torchvision_backend_identical_to_hf(recipe, images, hf_torchvision, tmp_path):
    d, hf = _checkpoint(tmp_path, recipe, "torchvision")
    assert hf.backend == "torchvision"
    proc = _packvit(d, recipe, "torchvision")
    x, _ = proc(images)
    _assert_identical(x, _hf_patches(hf, recipe, images), f"{recipe} torchvision")


@pytest.mark.parametrize("recipe", RECIPES)
def test_pil_backend_identical_to_hf(recipe, images, tmp_path):
    d, hf = _checkpoint(tmp_path, recipe, "pil")
    proc = _packvit(d, recipe, "pil")
    x, _ = proc(images)
    _assert_identical(x, _hf_patches(hf, recipe, images), f"{recipe} pil")


@pytest.mark.parametrize("recipe", RECIPES)
def test_backends_differ_by_the_documented_gap(recipe, images, tmp_path):
    """Same grids; pixels one or two 8-bit levels apart (runs without torchvision)."""
    d, _ = _checkpoint(tmp_path, recipe, "pil")
    x_pil, g_pil = _packvit(d, recipe, "pil")(images)
    x_tv, g_tv = _packvit(d, recipe, "torchvision")(images)
    assert torch.equal(g_pil, g_tv)
    gap = (x_pil - x_tv).abs().max().item()
    assert 0 < gap <= BACKEND_GAP[recipe], f"{recipe}: |pil - torchvision| max {gap:.3g}"


@pytest.mark.parametrize("family", ["aimv2", "dinov3"])
def test_native_mode_is_the_fixed_recipe_at_each_images_size(family, images, hf_torchvision):
    """Native mode = transformers' processor with size = the image's own target size, per image."""
    fam = FAMILIES[family]
    patch, d = fam.patch_size, fam.preprocess
    mean, std = d.image_mean, d.image_std
    cfg = PreprocessConfig(
        patch_size=patch,
        mode="native",
        image_mean=mean,
        image_std=std,
        resample=d.resample,
        backend="torchvision",
        rescale_first=d.rescale_first,
    )
    proc = ImageProcessor(cfg)
    imgs = [im for im in images if max(im.size) / min(im.size) <= 200]
    x, grid = proc(imgs)
    refs = []
    for im, (_, h, w) in zip(imgs, grid.tolist()):
        size = {"height": h * patch, "width": w * patch}
        hf = getattr(transformers, fam.hf_processor)(
            size=size, do_center_crop=False, image_mean=list(mean), image_std=list(std)
        )
        refs.append(packvit.patchify(hf.preprocess([im], return_tensors="pt")["pixel_values"], patch)[0])
    _assert_identical(x, torch.cat(refs), f"{family} native torchvision")


def test_torchvision_backend_video_and_input_types(images):
    proc = ImageProcessor(
        PreprocessConfig(
            patch_size=16, mode="naflex", image_mean=(0.5,) * 3, image_std=(0.5,) * 3, backend="torchvision"
        )
    )
    frames = [_synthetic(120, 90, seed=s) for s in range(3)]
    x, grid = proc([images[0], frames])
    assert grid.tolist()[1][0] == 3
    video = packvit.split_by_image(x, grid)[1]
    n = video.shape[0] // 3
    for t, f in enumerate(frames):
        assert torch.equal(video[t * n : (t + 1) * n], proc([f])[0])
    a = np.array(images[1])
    ref, _ = proc([images[1]])
    for other in (a, torch.from_numpy(a).permute(2, 0, 1), torch.from_numpy(a).permute(2, 0, 1).float() / 255):
        assert torch.equal(proc([other])[0], ref), type(other).__name__


# ---------------------------------------------------------------------------------------------
# The single ops against torchvision / transformers' backend
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["nearest-exact", "bilinear", "bicubic", "lanczos"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_resize_op_identical_to_torchvision(mode, dtype, hf_torchvision):
    tvF = hf_torchvision
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 45, 61), generator=g, dtype=torch.uint8)
    x = x if dtype == torch.uint8 else x / 255
    for size in [(45, 61), (20, 31), (90, 7), (3, 200), (16, 16)]:
        ref = tvF.resize(x, list(size), interpolation=tvF.InterpolationMode(mode), antialias=True)
        out = ptv.resize(x, size, mode)
        assert out.dtype == ref.dtype and torch.equal(out, ref), (mode, dtype, size)


def test_native_uint8_rule_follows_torchvision(hf_torchvision):
    from torchvision.transforms.v2.functional._geometry import _do_native_uint8_resize_on_cpu

    for mode in ("bilinear", "bicubic", "lanczos"):
        assert ptv._native_uint8(mode) == _do_native_uint8_resize_on_cpu(hf_torchvision.InterpolationMode(mode))


def test_center_crop_and_level_table_identical_to_transformers(hf_torchvision):
    from transformers.image_utils import SizeDict

    backend = transformers.CLIPImageProcessor()
    x = torch.randint(0, 256, (2, 3, 30, 41), dtype=torch.uint8)
    for h, w in [(30, 41), (16, 16), (29, 40), (40, 41), (45, 50), (20, 60)]:
        ref = backend.center_crop(x, SizeDict(height=h, width=w))
        assert torch.equal(ptv.center_crop(x, h, w), ref), (h, w)
    ramp = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256).expand(1, 3, 1, 256).contiguous()
    for do_rescale, do_normalize in [(True, True), (True, False), (False, True), (False, False)]:
        mean, std = (
            FAMILIES["aimv2"].preprocess.image_mean,
            FAMILIES["aimv2"].preprocess.image_std,
        )  # OpenAI CLIP's, tuples: lru_cache
        ref = backend.rescale_and_normalize(ramp, do_rescale, 1 / 255, do_normalize, mean, std)
        table = ptv.level_table(3, do_rescale, 1 / 255, do_normalize, mean, std)
        assert torch.equal(table, ref.reshape(3, 256).to(torch.float32)), (do_rescale, do_normalize)


def test_float_resize_path_of_cpus_without_avx2(hf_torchvision, tmp_path):
    """Without AVX2 torchvision resizes 8-bit bilinear through float32 and rounds; so does packvit."""
    d, _ = _checkpoint(tmp_path, "siglip2-256", "torchvision")
    script = (
        "import sys, torch; sys.path.insert(0, 'tests'); import torchvision_shim; torchvision_shim.import_torchvision()\n"
        "import transformers; from packvit.preprocess import ImageProcessor\n"
        "from test_preprocess_torchvision import _synthetic\n"
        "assert torch.backends.cpu.get_cpu_capability() == 'DEFAULT'\n"
        f"d = {str(d)!r}; imgs = [_synthetic(h, w, i) for i, (h, w) in enumerate([(480, 640), (37, 1000), (7, 5)])]\n"
        "hf = transformers.Siglip2ImageProcessor.from_pretrained(d); assert hf.backend == 'torchvision'\n"
        "ref = hf.preprocess(imgs, return_tensors='pt')\n"
        "x, _ = ImageProcessor.from_pretrained(d, backend='torchvision')(imgs)\n"
        "assert torch.equal(x, ref['pixel_values'][ref['pixel_attention_mask'].bool()])\n"
    )
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default", PYTHONPATH=path, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# Choosing the backend
# ---------------------------------------------------------------------------------------------


def test_auto_backend_is_what_transformers_picks(monkeypatch):
    expected = "torchvision" if transformers.utils.is_torchvision_available() else "pil"
    assert PreprocessConfig(patch_size=16).backend == expected
    for installed, name in [(True, "torchvision"), (False, "pil")]:
        monkeypatch.setattr(ptv, "torchvision_installed", lambda installed=installed: installed)
        cfg = PreprocessConfig(patch_size=16, backend="auto")
        assert cfg.backend == name
        assert f"backend={name!r}" in repr(ImageProcessor(cfg)) and f"backend={name!r}" in repr(cfg)
        assert ImageProcessor(cfg).backend == name


def test_backend_named_explicitly_and_checked(tmp_path):
    d, _ = _checkpoint(tmp_path, "siglip2-64", "pil")
    for name in ("pil", "torchvision"):
        assert ImageProcessor.from_pretrained(d, backend=name).backend == name
    with pytest.raises(ValueError, match="backend must be one of"):
        PreprocessConfig(patch_size=16, backend="cv2")
    with pytest.raises(ValueError, match="resample=4 has no torchvision tensor equivalent"):
        PreprocessConfig(patch_size=16, resample=Image.BOX, backend="torchvision")


def test_dinov3_rescales_before_resizing(hf_checkpoints, tmp_path):
    _, d = hf_checkpoints["dinov3"]
    assert ImageProcessor.from_pretrained(d).config.rescale_first  # from config.json's model_type
    _, d = hf_checkpoints["siglip2"]
    assert not ImageProcessor.from_pretrained(d).config.rescale_first
    # or from preprocessor_config.json's processor name (DINOv3's processor exists only for torchvision)
    assert packvit.preprocess._from_processor_json({"image_processor_type": "DINOv3ViTImageProcessorFast"})[
        "rescale_first"
    ]


# ---------------------------------------------------------------------------------------------
# The attributes LLaVA-NeXT reads
# ---------------------------------------------------------------------------------------------


def _llava_tile_side(processor) -> int:
    """llava/train/train.py and mm_utils.process_anyres_image, verbatim: the anyres tile side."""
    try:
        patch_size = processor.size[0]
    except Exception:  # noqa: BLE001 - LLaVA's own `except Exception`
        patch_size = processor.size["shortest_edge"]
    return patch_size


def test_size_and_crop_size_for_llava(tmp_path):
    (tmp_path / "clip").mkdir(), (tmp_path / "dino").mkdir()
    d, _ = _checkpoint(tmp_path / "clip", "aimv2-fixed", "pil")
    clip = ImageProcessor.from_pretrained(d, mode="fixed")
    assert clip.size == {"shortest_edge": 224} and clip.crop_size == {"height": 224, "width": 224}
    d, _ = _checkpoint(tmp_path / "dino", "dinov3-fixed", "pil")
    dino = ImageProcessor.from_pretrained(d, mode="fixed")
    assert dino.size == {"height": 224, "width": 224, "shortest_edge": 224}
    assert dino.crop_size == {"height": 224, "width": 224}
    for proc in (clip, dino):
        assert _llava_tile_side(proc) == proc.crop_size["height"] == 224
        x, grid = proc([_synthetic(proc.crop_size["height"], proc.crop_size["width"])])  # a tile is kept as is
        assert grid.tolist() == [[1, 224 // proc.patch_size, 224 // proc.patch_size]]
    proc = ImageProcessor(PreprocessConfig(patch_size=16, mode="naflex", max_num_patches=576))
    assert proc.size == {"shortest_edge": 384} and proc.crop_size == {"height": 384, "width": 384}
    for mnp in (64, 256, 576, 729, 1024):
        s = ImageProcessor(PreprocessConfig(patch_size=16, mode="naflex", max_num_patches=mnp)).size["shortest_edge"]
        assert naflex_size(s, s, 16, mnp) == (s, s) and naflex_size(s + 16, s + 16, 16, mnp) != (s + 16, s + 16)
    for p, side in ((16, 512), (14, 448)):
        proc = ImageProcessor(PreprocessConfig(patch_size=p, mode="native"))
        assert _llava_tile_side(proc) == side and proc.crop_size == {"height": side, "width": side}
        assert smart_resize(side, side, p, *proc.config.bounds) == (side, side)
    proc.size["shortest_edge"] = 1  # a copy: the processor is unchanged
    assert proc.size["shortest_edge"] == 448
