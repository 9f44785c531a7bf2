"""packvit.preprocess vs transformers' image processors (PIL backend): identical patches and sizes.

The torchvision backend is tested in test_preprocess_torchvision.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import packvit
from packvit.preprocess import ImageProcessor, PreprocessConfig, naflex_size, smart_resize

transformers = pytest.importorskip("transformers")
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize  # noqa: E402
from transformers.models.siglip2.image_processing_pil_siglip2 import (  # noqa: E402
    get_image_size_for_max_num_patches,
)

# (H, W) in pixels: ordinary, odd, tiny, and extreme aspect ratios in both directions.
SIZES = [(224, 224), (480, 640), (37, 1000), (1000, 37), (7, 5), (16, 16), (300, 17), (2, 900), (513, 511)]


def _photo(h: int, w: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    # A smooth gradient plus noise: resampling filters see real structure, not only noise.
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) % 256], -1)
    a = np.clip(base + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(a)
    return img.convert(mode) if mode != "RGB" else img


@pytest.fixture(scope="module")
def siglip2_dir(tmp_path_factory):
    """A SigLIP2 checkpoint folder whose preprocessor_config.json the HF processor wrote itself."""
    d = tmp_path_factory.mktemp("siglip2-proc")
    cfg = transformers.Siglip2VisionConfig(
        hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=16
    )
    cfg.save_pretrained(d)
    hf = transformers.Siglip2ImageProcessorPil(max_num_patches=64)
    hf.save_pretrained(d)
    return d, hf


@pytest.mark.parametrize("max_num_patches", [64, 256, 1024])
def test_naflex_size_rule_matches_hf(max_num_patches):
    for h, w in SIZES + [(1, 1), (4000, 3000), (65, 4097)]:
        assert naflex_size(h, w, 16, max_num_patches) == get_image_size_for_max_num_patches(h, w, 16, max_num_patches)


def test_smart_resize_matches_qwen2_vl():
    for factor in (14, 16):
        for h, w in [s for s in SIZES if max(s) / min(s) <= 200] + [(4000, 3000), (60, 80)]:
            for lo, hi in [(56 * 56, 14 * 14 * 4 * 1280), (16 * factor**2, 1024 * factor**2)]:
                assert smart_resize(h, w, factor, lo, hi) == hf_smart_resize(h, w, factor, lo, hi), (h, w, factor)
                th, tw = smart_resize(h, w, factor, lo, hi)
                assert th % factor == 0 and tw % factor == 0


def test_siglip2_patches_identical_to_hf(siglip2_dir):
    d, hf = siglip2_dir
    proc = ImageProcessor.from_pretrained(d, backend="pil")
    assert proc.config.mode == "naflex" and proc.config.max_num_patches == 64
    images = [_photo(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    x, grid = proc(images)
    ref = hf.preprocess(images, return_tensors="pt")
    shapes = ref["spatial_shapes"]
    assert grid[:, 0].eq(1).all()
    assert torch.equal(grid[:, 1:], shapes), f"spatial shapes differ:\n{grid[:, 1:]}\nvs HF\n{shapes}"
    unpadded = ref["pixel_values"][ref["pixel_attention_mask"].bool()]  # drop HF's padding
    assert x.shape == unpadded.shape
    assert torch.equal(x, unpadded), f"max abs diff {(x - unpadded).abs().max()}"


def test_input_types_agree(siglip2_dir, tmp_path):
    """PIL, HWC uint8 array, CHW uint8 and float tensors and a file path give the same patches."""
    d, _ = siglip2_dir
    proc = ImageProcessor.from_pretrained(d)
    img = _photo(90, 130, seed=3)
    a = np.array(img)
    path = tmp_path / "img.png"
    img.save(path)
    ref, g = proc([img])
    for other in (
        a,
        torch.from_numpy(a).permute(2, 0, 1),
        torch.from_numpy(a).permute(2, 0, 1).float() / 255,
        str(path),
        path,
    ):
        x, g2 = proc([other])
        assert torch.equal(g, g2) and torch.equal(x, ref), type(other).__name__


def test_video_frames_and_model(siglip2_dir, hf_checkpoints, packvit_models):
    """A list of frames is one entry with t > 1; each frame's patches equal the frame alone."""
    d, _ = siglip2_dir
    proc = ImageProcessor.from_pretrained(d)
    frames = [_photo(120, 90, seed=s) for s in range(3)]
    x, grid = proc([_photo(64, 64), frames])
    assert grid.tolist()[1][0] == 3
    xs = packvit.split_by_image(x, grid)
    for t, f in enumerate(frames):
        alone, _ = proc([f])
        n = alone.shape[0]
        assert torch.equal(xs[1][t * n : (t + 1) * n], alone)
    out = packvit_models["siglip2"](x, grid)  # ready for the model as is
    assert out.shape == (x.shape[0], packvit_models["siglip2"].hidden_size)


def test_fixed_mode_matches_clip_processor(tmp_path):
    """AIMv2's fixed-size recipe (CLIP: shortest edge, bicubic, centre crop) equals CLIPImageProcessorPil."""
    hf = transformers.CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    hf.save_pretrained(tmp_path)
    transformers.Aimv2VisionConfig(
        hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=14
    ).save_pretrained(tmp_path)
    proc = ImageProcessor.from_pretrained(tmp_path, mode="fixed", backend="pil")
    assert proc.config.resample == Image.BICUBIC
    images = [_photo(h, w, seed=i) for i, (h, w) in enumerate([(100, 150), (300, 61), (56, 56)])]
    x, grid = proc(images)
    ref = hf.preprocess(images, return_tensors="pt")["pixel_values"]  # (N, C, 56, 56)
    assert grid.tolist() == [[1, 4, 4]] * 3
    assert torch.equal(x, packvit.patchify(ref, 14)[0])


def test_native_mode_keeps_resolution_within_bounds(hf_checkpoints):
    _, d = hf_checkpoints["dinov3"]
    proc = ImageProcessor.from_pretrained(d)  # no preprocessor_config.json: family defaults
    c = proc.config
    assert c.mode == "native" and c.image_mean == packvit.preprocess.IMAGENET_MEAN and c.patch_size == 16
    x, grid = proc([_photo(160, 320), _photo(2000, 1000), _photo(10, 10)])
    assert grid.tolist()[0] == [1, 10, 20]  # already patch multiples within bounds: untouched
    lo, hi = c.bounds
    for _, h, w in grid.tolist():
        assert lo <= h * w * 256 <= hi
    assert proc.num_patches(2000, 1000) == grid.tolist()[1][1] * grid.tolist()[1][2]


def test_normalisation_is_hf_arithmetic():
    """One uint8 level per channel: float64 rescale, cast, float32 (x - mean) / std."""
    proc = ImageProcessor(PreprocessConfig(patch_size=1, mode="native", do_resize=False, backend="pil"))
    a = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, 2)
    x, _ = proc([a])
    mean, std = np.array(proc.image_mean, np.float32), np.array(proc.image_std, np.float32)
    ref = ((a.reshape(-1, 3).astype(np.float64) * (1 / 255)).astype(np.float32) - mean) / std
    assert np.array_equal(x.numpy(), ref)


def test_grayscale_and_rgba_become_rgb():
    proc = ImageProcessor(PreprocessConfig(patch_size=16, mode="native"))
    img = _photo(64, 48)
    for other in (img.convert("L"), img.convert("RGBA")):
        x, _ = proc([other])
        ref, _ = proc([other.convert("RGB")])
        assert torch.equal(x, ref)


def test_errors_name_the_argument(tmp_path):
    proc = ImageProcessor(PreprocessConfig(patch_size=16, mode="native"))
    with pytest.raises(ValueError, match=r"images\[1\].*share one size"):
        proc([_photo(32, 32), [_photo(32, 32), _photo(48, 32)]])
    with pytest.raises(TypeError, match=r"images\[0\]: expected a PIL image"):
        proc([3.5])
    with pytest.raises(FileNotFoundError, match="no image file"):
        proc([tmp_path / "missing.jpg"])
    with pytest.raises(ValueError, match="float pixels must lie in"):
        proc([torch.full((3, 32, 32), 2.0)])
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        ImageProcessor(PreprocessConfig(patch_size=16, do_resize=False))([_photo(30, 32)])
    with pytest.raises(ValueError, match="aspect ratio must be below 200"):
        proc([_photo(2, 900)])
    with pytest.raises(ValueError, match="mode must be one of"):
        PreprocessConfig(patch_size=16, mode="square")


def test_preprocess_dict_and_pin_memory_flag(siglip2_dir):
    d, _ = siglip2_dir
    proc = ImageProcessor.from_pretrained(d)
    out = proc.preprocess([_photo(40, 60)], return_tensors="pt")
    assert set(out) == {"pixel_values", "grid_thw"} and out["grid_thw"].dtype == torch.int64
    if torch.cuda.is_available():
        x, _ = proc([_photo(40, 60)], pin_memory=True)
        assert x.is_pinned()
