"""packvit.fp8 on the CPU: the quantisers, the FP8 linear against a dequantised reference (PyTorch runs
``_scaled_mm`` on the CPU), the module swap, the policy, the weight cache, the errors, FSDP2.

The Triton kernels are checked on the GPU (tests/test_gpu_fp8.py): Triton's CPU interpreter does not
round to e4m3 as the hardware does (checked with triton 3.9: 125.75 became 64), so it cannot stand in.
"""

from __future__ import annotations

import copy
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from packvit import fp8
from packvit.fp8 import FP8Linear


def _dequant_rows(q, s):
    return q.float() * s


def _fp8_linear(K=64, N=96, bias=True, min_tokens=0, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    ref = nn.Linear(K, N, bias=bias).to(dtype)
    lin = copy.deepcopy(ref)
    lin.__class__ = FP8Linear
    lin._init_fp8(min_tokens, min_tokens)
    return ref, lin


# -- quantisers -------------------------------------------------------------------------------------


def test_quantize_rows_reference_scales_and_zero_rows():
    x = torch.randn(7, 48) * torch.logspace(-3, 3, 7)[:, None]
    x[3] = 0
    q, s = fp8.quantize_rows_reference(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and s.shape == (7, 1)
    assert torch.isfinite(s).all() and torch.isfinite(q.float()).all()
    assert (q.float().abs().amax(1)[torch.arange(7) != 3] == 448).all()  # each row's amax lands on e4m3's max
    assert (q[3].float() == 0).all()
    rel = (_dequant_rows(q, s) - x).abs() / x.abs().amax(1, keepdim=True).clamp(min=1e-30)
    assert rel.max() <= 2**-4  # e4m3 has 3 mantissa bits: half a step is 1/16 of a binade


def test_quantize_cols_t_reference_pads_the_token_axis():
    x = torch.randn(37, 32)
    qt, s = fp8.quantize_cols_t_reference(x)
    assert qt.shape == (32, 48) and s.shape == (32, 1)
    assert (qt[:, 37:].float() == 0).all()
    q_rows, s_rows = fp8.quantize_rows_reference(x.t().contiguous())  # the same numbers, row-wise over x.T
    assert torch.equal(qt[:, :37].float(), q_rows.float()) and torch.equal(s, s_rows)


# -- the linear -------------------------------------------------------------------------------------


def test_forward_matches_the_dequantised_reference():
    ref, lin = _fp8_linear()
    x = torch.randn(50, 64).bfloat16()
    with torch.no_grad():
        y = lin(x)
        xq, sx = fp8.quantize_rows_reference(x)
        wq, sw = fp8.quantize_rows_reference(ref.weight)
        expect = _dequant_rows(xq, sx) @ _dequant_rows(wq, sw).t() + ref.bias.float()
        full = ref(x).float()
    assert y.dtype == torch.bfloat16 and y.shape == (50, 96)
    torch.testing.assert_close(y.float(), expect, rtol=1e-2, atol=1e-2)  # bf16 output rounding only
    assert F.cosine_similarity(y.float(), full, dim=-1).min() > 0.995  # and close to bf16


def test_replaced_bias_and_leading_dims():
    ref, lin = _fp8_linear(bias=False)
    x = torch.randn(2, 25, 64).bfloat16()
    b = torch.randn(96).bfloat16()
    with torch.no_grad():
        y = lin(x, b)
        y0 = lin(x)
    assert y.shape == (2, 25, 96)
    torch.testing.assert_close(y - y0, b.expand_as(y), rtol=0, atol=0.07)


def test_quantize_rows_col_stats_reference():
    x = (torch.randn(37, 24) * torch.logspace(-2, 2, 24)).bfloat16()
    q, s, amax, sums = fp8.quantize_rows_col_stats_reference(x, col_sum=True)
    qr, sr = fp8.quantize_rows_reference(x)
    assert torch.equal(q.float(), qr.float()) and torch.equal(s, sr)
    assert torch.equal(amax, x.float().abs().amax(0)) and torch.equal(sums, x.float().sum(0))
    assert fp8.quantize_rows_col_stats_reference(x, col_sum=False)[3] is None
    assert fp8.quantize_rows_col_stats_reference(x, col_sum=True, amax=False)[2] is None
    # the column cast from that amax is the column quantisation
    for a, b in zip(fp8.cast_cols_t_reference(x, amax), fp8.quantize_cols_t_reference(x)):
        assert torch.equal(a.float(), b.float())


@pytest.mark.parametrize("wgrad, dgrad", [("fp8", "fp8"), ("bf16", "fp8"), ("bf16", "bf16"), ("fp8", "bf16")])
def test_backward_matches_the_dequantised_reference(wgrad, dgrad, monkeypatch):
    """dx = dy @ W with dy per token row and W per input column (``DGRAD="fp8"``) or the bf16
    product (``"bf16"``); dW = dy.T @ x per column over tokens (``WGRAD="fp8"``) or the bf16 product
    (``"bf16"``); db the fp32 column sums of dy."""
    monkeypatch.setattr(fp8, "WGRAD", wgrad)
    monkeypatch.setattr(fp8, "DGRAD", dgrad)
    ref, lin = _fp8_linear()
    x = torch.randn(45, 64).bfloat16().requires_grad_(True)
    dy = torch.randn(45, 96).bfloat16()
    lin(x).backward(dy)
    w = ref.weight.detach()
    dyq, sdy = fp8.quantize_rows_reference(dy)
    wtq, swt = fp8.quantize_rows_reference(w.t().contiguous())
    dx = _dequant_rows(dyq, sdy) @ _dequant_rows(wtq, swt).t()
    if dgrad == "bf16":
        dx = (dy @ w).float()
        assert torch.equal(x.grad, dy @ w)  # the plain bf16 product, bit for bit
    if wgrad == "fp8":
        dytq, sdyt = fp8.quantize_cols_t_reference(dy)
        xtq, sxt = fp8.quantize_cols_t_reference(x.detach())
        dw = _dequant_rows(dytq, sdyt) @ _dequant_rows(xtq, sxt).t()
    else:
        dw = (dy.t() @ x.detach()).float()
    torch.testing.assert_close(x.grad.float(), dx, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(lin.weight.grad.float(), dw, rtol=1e-2, atol=2e-2)
    assert lin.bias.grad.dtype == torch.bfloat16
    torch.testing.assert_close(lin.bias.grad, dy.float().sum(0).bfloat16(), rtol=0, atol=0)
    # and close to the bf16 gradients
    xr = x.detach().clone().requires_grad_(True)
    ref(xr).backward(dy)
    for a, b in ((x.grad, xr.grad), (lin.weight.grad, ref.weight.grad)):
        assert F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0) > 0.995


@pytest.mark.parametrize("dgrad", ["fp8", "bf16"])
@pytest.mark.parametrize("needs", ["x", "w", "b", "wb", "xb"])
def test_backward_computes_only_the_gradients_asked_for(needs, dgrad, monkeypatch):
    """A frozen weight, a frozen input or a frozen bias: each branch of the backward gives the same
    gradients as when all three are asked for (with dx in e4m3 and in bf16)."""
    monkeypatch.setattr(fp8, "DGRAD", dgrad)
    ref, lin = _fp8_linear()
    x0 = torch.randn(33, 64).bfloat16()
    dy = torch.randn(33, 96).bfloat16()
    x_all = x0.clone().requires_grad_(True)
    lin(x_all).backward(dy)
    full = {"x": x_all.grad, "w": lin.weight.grad, "b": lin.bias.grad}
    lin.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_("x" in needs)
    lin.weight.requires_grad_("w" in needs)
    lin.bias.requires_grad_("b" in needs)
    lin(x).backward(dy)
    got = {"x": x.grad, "w": lin.weight.grad, "b": lin.bias.grad}
    for k in "xwb":
        assert (got[k] is not None) == (k in needs), k
        if got[k] is not None:
            assert torch.equal(got[k], full[k]), k


def test_runs_plain_follows_the_crossover_and_grad_mode():
    _, lin = _fp8_linear()
    lin._init_fp8(100, 1000)
    assert fp8.runs_plain(nn.Linear(4, 4), 10**9)
    assert fp8.runs_plain(lin, 999) and not fp8.runs_plain(lin, 1000)  # training (grad on)
    with torch.no_grad():
        assert fp8.runs_plain(lin, 99) and not fp8.runs_plain(lin, 100)
    assert not fp8.runs_plain(nn.Conv1d(4, 4, 1), 1)


def test_policy_bf16_below_the_crossover_is_exact():
    ref, lin = _fp8_linear(min_tokens=32)
    small, large = torch.randn(31, 64).bfloat16(), torch.randn(32, 64).bfloat16()
    with torch.no_grad():
        assert not lin.uses_fp8(small) and lin.uses_fp8(large)
        assert torch.equal(lin(small), ref(small))  # the very bf16 path
        assert not torch.equal(lin(large), ref(large))
    lin.min_tokens_train = 1000
    assert not lin.uses_fp8(large)  # grad mode on: the training crossover


def test_crossover_table_and_convert_overrides(packvit_models):
    m = copy.deepcopy(packvit_models["siglip2"])
    fp8.CROSSOVER["infer"][(64, 192)] = 1234
    try:
        fp8.convert(m)
        assert m.blocks[0].attn.qkv.min_tokens == 1234
        assert m.blocks[0].mlp.fc1.min_tokens == fp8.DEFAULT_MIN_TOKENS["infer"]
    finally:
        del fp8.CROSSOVER["infer"][(64, 192)]
    fp8.convert(m, min_tokens=5)
    assert {lin.min_tokens for lin in m.modules() if isinstance(lin, FP8Linear)} == {5}
    assert {lin.min_tokens_train for lin in m.modules() if isinstance(lin, FP8Linear)} == {5}


# -- the weight cache -------------------------------------------------------------------------------


def test_weight_cache_follows_the_weight():
    ref, lin = _fp8_linear()
    x = torch.randn(40, 64).bfloat16()
    with torch.no_grad():
        y0 = lin(x)
        cached = lin._fp8_weight[1]
        lin(x)
        assert lin._fp8_weight[1] is cached  # quantised once
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    lin(x.requires_grad_(True)).sum().backward()
    opt.step()  # in place: the version counter moves
    x = x.detach()
    with torch.no_grad():
        y1 = lin(x)
        assert lin._fp8_weight[1] is not cached
        fresh = fp8.quantize_rows_reference(lin.weight)[0]
        assert torch.equal(lin._fp8_weight[1].float(), fresh.float())
        assert not torch.equal(y0, y1)
        lin.load_state_dict(ref.state_dict())  # copy_ into the same storage
        torch.testing.assert_close(lin(x), y0, rtol=0, atol=0)
        lin.weight.data = ref.weight.data.clone() * 2  # a new storage
        assert not torch.equal(lin(x), y0)


def test_weight_cache_under_inference_mode_is_usable_after():
    _, lin = _fp8_linear()
    x = torch.randn(40, 64).bfloat16()
    with torch.inference_mode():
        y = lin(x)
    assert not lin._fp8_weight[1].is_inference()
    with torch.no_grad():
        assert torch.equal(lin(x), y)


# -- the model --------------------------------------------------------------------------------------


def test_convert_swaps_only_the_block_linears_and_keeps_the_parameters(packvit_models):
    for family, model in packvit_models.items():
        m = copy.deepcopy(model)
        params = dict(m.named_parameters())
        keys = list(m.state_dict())
        names = fp8.convert(m, skip=("blocks.1", "fc2"))
        assert sorted(names) == ["blocks.0.attn.proj", "blocks.0.attn.qkv", "blocks.0.mlp.fc1"], family
        assert type(m.blocks[1].attn.qkv) is nn.Linear and type(m.blocks[0].mlp.fc2) is nn.Linear
        assert all(p is params[n] for n, p in m.named_parameters())
        assert list(m.state_dict()) == keys
        assert not any(isinstance(x, FP8Linear) for x in m.modules() if x not in set(m.blocks.modules()))
        fp8.unconvert(m)
        assert not any(isinstance(x, FP8Linear) for x in m.modules())
        assert all(p is params[n] for n, p in m.named_parameters())


def test_fp8_model_close_to_bf16_and_exact_below_the_crossover(packvit_models):
    import packvit
    from helpers import PATCH, random_images

    for family, model in packvit_models.items():
        mbf = copy.deepcopy(model).to(torch.bfloat16)
        x, grid = packvit.patchify(random_images([(1, 3, 5), (1, 4, 4)], PATCH[family]), PATCH[family])
        with torch.no_grad():
            ref = mbf(x, grid)
            m = copy.deepcopy(mbf)
            fp8.convert(m, min_tokens=10**6)  # every batch below the crossover: the bf16 path, bit for bit
            assert torch.equal(m(x, grid), ref), family
            fp8.convert(m, min_tokens=0)
            out = m(x, grid)
        cos = F.cosine_similarity(out.float(), ref.float(), dim=-1).min()
        assert cos > 0.99, (family, cos)  # tiny random models; the GPU test holds the real sizes to 0.999


def test_fp8_training_step_on_cpu(packvit_models):
    import packvit
    from helpers import PATCH, random_images

    m = copy.deepcopy(packvit_models["aimv2"]).to(torch.bfloat16).train()
    fp8.convert(m, min_tokens=0)
    x, grid = packvit.patchify(random_images([(1, 3, 5), (2, 2, 2)], PATCH["aimv2"]), PATCH["aimv2"])
    m(x, grid).float().square().mean().backward()
    for name, p in m.named_parameters():
        if "blocks" in name:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_repr_and_set_fp8_errors(packvit_models, monkeypatch):
    m = copy.deepcopy(packvit_models["dinov3"])
    with pytest.raises(ValueError, match=r"fp8=True needs the model on a CUDA GPU.*is on cpu"):
        m.set_fp8()
    assert m.fp8 == [] and "fp8" not in repr(m)
    # A GPU that cannot (capability 8.0), and an fp32 model on one that can.
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    with pytest.raises(ValueError, match=r"compute capability >= 8.9.*NVIDIA A100 has 8.0"):
        fp8.check_device("cuda:0", torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    with pytest.raises(ValueError, match=r"needs a bf16 model.*torch.float32"):
        fp8.check_device("cuda:0", torch.float32)
    fp8.check_device("cuda:0", torch.bfloat16)
    monkeypatch.undo()
    # Past the check (as on a GPU): repr shows it, set_fp8(False) undoes it.
    monkeypatch.setattr(fp8, "check_device", lambda device, dtype: None)
    names = m.set_fp8()
    assert len(names) == 8 and m.fp8 == names
    text = repr(m)
    assert "fp8=[8 linears]" in text and "FP8Linear(in_features=64, out_features=192" in text
    assert "fp8=e4m3 rowwise from" in text
    assert m.set_fp8(False) == [] and "FP8Linear" not in repr(m)


def test_from_pretrained_and_tower_take_fp8(hf_checkpoints):
    import packvit
    from packvit.tower import PackedVisionTower

    _, d = hf_checkpoints["siglip2"]
    with pytest.raises(ValueError, match="fp8=True needs the model on a CUDA GPU"):
        packvit.from_pretrained(d, attn_backend="sdpa", fp8=True)
    args = types.SimpleNamespace(mm_vision_select_layer=-1, mm_vision_fp8=True)
    tower = PackedVisionTower(d, args)
    assert tower.fp8 and not tower.vision_tower.fp8  # applied at the first forward, on its device
    with pytest.raises(ValueError, match="fp8=True needs the model on a CUDA GPU"):
        tower([torch.rand(3, 32, 48)], normalized=True)
    assert PackedVisionTower(d, None, fp8=True).fp8
    assert not PackedVisionTower(d, None).fp8


# -- FSDP2 ------------------------------------------------------------------------------------------

RANK_GRIDS = [[(1, 3, 5), (2, 2, 3)], [(1, 4, 4), (1, 1, 7), (1, 2, 2)]]


def _rank_batch(rank):
    import packvit

    g = torch.Generator().manual_seed(rank)
    images = [torch.randn(t, 3, h * 16, w * 16, generator=g) for t, h, w in RANK_GRIDS[rank]]
    return packvit.patchify([im if im.shape[0] > 1 else im[0] for im in images], 16)


def _worker(ckpt: str, out: str) -> None:
    import torch.distributed as dist

    from packvit.distributed import shard_tower
    from weights_conversion import load_model

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = load_model(ckpt, attn_backend="sdpa").train()
    fp8.convert(model, min_tokens=0)
    model = shard_tower(model)
    assert isinstance(model.blocks[0].attn.qkv, FP8Linear) and isinstance(model.blocks[1].mlp.fc2, FP8Linear)
    x, grid = _rank_batch(rank)
    model(x, grid).sum().backward()  # FSDP2 averages: the reference is the mean of the ranks' gradients
    grads = {
        n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
        for n, p in model.named_parameters()
    }
    with torch.no_grad():  # eval after the step: the weight cache re-quantises the gathered weights
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        opt.step()
        model.eval()
        y = model(x, grid)
        y2 = model(x, grid)
    if rank == 0:
        torch.save({"grads": grads, "y": y, "y2": y2}, out)
    dist.barrier()
    dist.destroy_process_group()


def test_fsdp2_keeps_the_fp8_linears(hf_checkpoints, tmp_path):
    from helpers import torchrun
    from weights_conversion import load_model

    _, d = hf_checkpoints["dinov3"]
    out = tmp_path / "fsdp.pt"
    torchrun(__file__, str(d), str(out), timeout=180)
    got = torch.load(out)
    ref_grads = {}
    models = []
    for rank in range(2):
        m = load_model(d, attn_backend="sdpa").train()
        fp8.convert(m, min_tokens=0)
        x, grid = _rank_batch(rank)
        m(x, grid).sum().backward()
        for n, p in m.named_parameters():
            ref_grads[n] = ref_grads.get(n, 0) + p.grad / 2
        models.append(m)
    for n, g in ref_grads.items():
        torch.testing.assert_close(got["grads"][n], g, rtol=1e-4, atol=1e-5 * max(1.0, g.abs().max().item()), msg=n)
    m = models[0]
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.sub_(0.1 * ref_grads[n])
        m.eval()
        x, grid = _rank_batch(0)
        torch.testing.assert_close(got["y"], m(x, grid), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["y2"], got["y"], rtol=0, atol=0)


if __name__ == "__main__":
    _worker(*sys.argv[1:3])
    sys.stdout.flush()
    os._exit(0)  # as test_distributed's workers: no interpreter teardown under gloo's threads


def test_unfrozen_tower_trains_through_fp8(hf_checkpoints, monkeypatch):
    from packvit.tower import PackedVisionTower

    _, d = hf_checkpoints["dinov3"]
    args = types.SimpleNamespace(mm_vision_select_layer=-2, unfreeze_mm_vision_tower=True)
    tower = PackedVisionTower(d, args, fp8=True, dtype=torch.bfloat16).train()
    monkeypatch.setattr(fp8, "check_device", lambda device, dtype: None)  # as on a GPU
    monkeypatch.setattr(fp8, "CROSSOVER", {"infer": {}, "train": {}})
    monkeypatch.setattr(fp8, "DEFAULT_MIN_TOKENS", {"infer": 0, "train": 0})
    calls = []
    monkeypatch.setattr(fp8._FP8Linear, "apply", staticmethod(lambda *a: calls.append(1) or _orig_apply(*a)))
    feats = tower([torch.rand(3, 32, 48), torch.rand(3, 48, 32)], normalized=True)
    torch.cat(feats).float().square().mean().backward()
    assert tower.vision_tower.fp8 and len(calls) == 4 * len(tower.vision_tower.blocks)
    assert all(p.grad is not None for p in tower.vision_tower.blocks.parameters())


_orig_apply = fp8._FP8Linear.apply


def test_fp8_rows_input_and_when_it_is_wanted(monkeypatch):
    """A pre-quantised input (``FP8Rows``) gives the linear's own FP8 output bit for bit; it is asked
    for only from an FP8Linear at its crossover, without autograd, with the switch on."""
    ref, lin = _fp8_linear(min_tokens=32)
    x = torch.randn(40, 64).to(torch.bfloat16)
    with torch.no_grad():
        y = lin(x)
        rows = fp8.FP8Rows(*fp8.quantize_rows_reference(x), torch.bfloat16)
        assert rows.shape == x.shape and lin.uses_fp8(rows)
        assert torch.equal(lin(rows), y)
        assert torch.equal(lin(rows, None), lin(x, None))  # a replaced bias, as the fused qkv's
        # Rows padded with zero columns (what the activation kernels write, ``rows_width``): the
        # weight is padded to match, the output the same; narrower rows than K are refused.
        assert lin.rows_width == fp8.padded_k(64) == 128 and fp8.padded_k(4304) == 4352 and fp8.padded_k(1152) == 1152
        wide = torch.zeros(40, lin.rows_width, dtype=torch.uint8)
        wide[:, :64] = rows.q.view(torch.uint8)
        padded = fp8.FP8Rows(wide.view(fp8.E4M3), rows.scale, torch.bfloat16)
        assert torch.equal(lin(padded), y) and lin._fp8_weight[1].shape == (96, 128)
        padded_copy = lin._fp8_weight[1]
        assert torch.equal(lin(x), y) and lin._fp8_weight[1].shape == (96, 64)
        # both widths kept (a CUDA graph may hold either by address) until the weight changes
        assert lin(padded) is not None and lin._fp8_weight[1] is padded_copy and sorted(lin._fp8_weights) == [64, 128]
        with torch.no_grad():
            lin.weight.mul_(2.0)
        lin(x)
        assert sorted(lin._fp8_weights) == [64]
        with pytest.raises(ValueError, match="FP8Rows of 32 columns for a linear of in_features=64"):
            lin(fp8.FP8Rows(rows.q[:, :32], rows.scale, torch.bfloat16))
        assert fp8.wants_fp8_input(lin, 32) and not fp8.wants_fp8_input(lin, 31)
        assert not fp8.wants_fp8_input(ref, 10**6)  # a plain nn.Linear
        monkeypatch.setattr(fp8, "FUSE_INPUT_QUANT", False)
        assert not fp8.wants_fp8_input(lin, 10**6)
    assert not fp8.wants_fp8_input(lin, 10**6)  # autograd on: training quantises in _FP8Linear


# -- quantisation fused into the kernels that make the inputs (``fp8.FP8Rows``) ---------------------
#
# Under Triton's interpreter, whose e4m3 cast is not the hardware's (module docstring): so the fused
# kernels are held to the *interpreted* ``fp8_kernels.quantize_rows`` of the bf16 output, the unfused
# path's quantiser on the GPU (same expressions, same cast), bit for bit; the scales also to
# ``quantize_rows_reference``'s, to an ulp (a division apart). tests/test_gpu_fp8.py checks the same on
# the hardware.

_FUSED_QUANT = """
import copy
import torch
from packvit import chained, fp8, fused_ops, triton_kernels as K, fp8_kernels as FK

torch.manual_seed(0)
bf16 = torch.bfloat16

def same_rows(q, scale, y, what):
    qr, sr = FK.quantize_rows(y)
    assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8)), what
    assert torch.equal(scale, sr), what
    torch.testing.assert_close(scale, fp8.quantize_rows_reference(y)[1], rtol=1e-6, atol=0)

# LayerNorm (+ residual, + LayerScale, + bias), RMSNorm (+ residual, + LayerScale), at widths that are
# powers of two (one tile) and not (two tiles, e.g. AIMv2-huge's 1536); narrow rows (many per tile),
# SigLIP2's width (two tiles a row, four rows a program: its sums in another order than the bf16
# kernel's, equal here on these rows; the GPU test bounds the rare difference), an all-zero row.
for D, res, gamma, bias, rms in [(48, True, True, True, False), (40, False, False, True, False),
                                 (64, True, False, False, True), (64, False, False, False, True),
                                 (48, True, True, False, True), (40, False, False, False, True),
                                 (1152, True, True, True, False)]:
    T = 13
    x = torch.randn(T, D).to(bf16)
    a = (torch.randn(T, D) * 3).to(bf16) if res else None
    g = (torch.rand(D) + 0.5).to(bf16) if gamma else None
    w = (torch.randn(D) * 0.3 + 1).to(bf16)
    b = (torch.randn(D) * 0.1).to(bf16) if bias else None
    x[2] = 0
    if a is not None:
        a[2] = 0
    s, y, _, _ = K.norm_fwd(x, a, g, w, b, 1e-6, rms)
    if res:
        s8, rows = fused_ops.add_norm_fp8(x, a, g, w, b, 1e-6, rms)
        assert torch.equal(s8, s)
    else:
        rows = fused_ops.norm_fp8(x, w, b, 1e-6, rms)
    assert rows.dtype == bf16 and rows.shape == (T, D)
    same_rows(rows.q, rows.scale, y, f"norm D={D} res={res} rms={rms}")
def same_padded(rows, wide, what):  # rows written wider: the same codes, then zero columns; same scales
    n = rows.q.shape[1]
    assert wide.q.shape == (rows.q.shape[0], 384), what
    assert torch.equal(wide.q[:, :n].view(torch.uint8), rows.q.view(torch.uint8)), what
    assert (wide.q[:, n:].view(torch.uint8) == 0).all() and torch.equal(wide.scale, rows.scale), what

for H in (300, 256):  # SwiGLU: a hidden width that is no power of two (two tiles a row), and one that is
    h = torch.randn(7, 2 * H).to(bf16)
    rows = fused_ops.swiglu_fp8(h)
    same_rows(rows.q, rows.scale, K.swiglu_fwd(h), f"swiglu H={H}")
    same_padded(rows, fused_ops.swiglu_fp8(h, 384), f"swiglu H={H} padded")
# GELU (both of torch's formulas) as fc2's e4m3 input. Its tanh GELU is not torch's expression (it
# goes through the sigmoid), its erf is libdevice's erff written out (the interpreter has no
# ex2.approx), and the interpreter's bf16 and e4m3 casts are not the hardware's, so here only the
# scales (the rows' GELU amax) are held to torch's; the codes are checked on the GPU.
for approx, H in (("tanh", 300), ("none", 300), ("tanh", 256)):
    h = (torch.randn(9, H) * 3).to(bf16)
    h[2] = 0
    rows = fused_ops.gelu_fp8(h, approx)
    g = torch.nn.functional.gelu(h, approximate=approx)
    assert rows.q.shape == h.shape and rows.dtype == bf16
    torch.testing.assert_close(rows.scale, fp8.quantize_rows_reference(g)[1], rtol=1e-2, atol=0)
    assert (rows.q[2].float() == 0).all()
    same_padded(rows, fused_ops.gelu_fp8(h, approx, 384), f"gelu {approx} H={H} padded")

# Whole tiny models in bf16 on their fused route (forced on the CPU) with every linear in FP8: the
# output with the quantisation fused equals the one with each linear quantising its own input.
from packvit.layers import GatedMlp, RMSNorm
from packvit.models.aimv2 import AIMv2, AIMv2Config
from packvit.models.dinov3 import DINOv3, DINOv3Config
from packvit.models.siglip2 import Siglip2, Siglip2Config

fused_ops.runs_fused = lambda *t: True
fp8._triton_runs = lambda x: True  # the unfused linears quantise with the (interpreted) Triton kernel
calls = []
for name in ("norm_fp8", "add_norm_fp8", "swiglu_fp8", "gelu_fp8"):
    def counted(*args, _f=getattr(fused_ops, name), _n=name, **kw):
        calls.append(_n)
        return _f(*args, **kw)
    setattr(fused_ops, name, counted)
grid = torch.tensor([[1, 3, 5], [1, 4, 4], [2, 2, 3]])
for m in (DINOv3(DINOv3Config(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96, num_register_tokens=1)),
          Siglip2(Siglip2Config(hidden_size=48, num_layers=2, num_heads=4, intermediate_size=80, use_head=False)),
          AIMv2(AIMv2Config(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96))):
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    m = m.to(bf16).eval()
    for mod in m.modules():
        if isinstance(mod, (RMSNorm, GatedMlp)):
            mod.fused = "triton"
    for b in m.blocks:
        b.fused_add_norm = "triton"
        b.attn.fused_rope = "triton" if m.uses_rope else None
    assert fp8.convert(m, min_tokens=0)
    px = torch.randn(int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum()), m.patch_dim).to(bf16)
    for chain in (True, False):
        m.chain_norms = chain
        outs = []
        with torch.no_grad():
            for fuse in (False, True):
                fp8.FUSE_INPUT_QUANT = fuse
                calls.clear()
                outs.append(m(px, grid))
                # fused: norm1 and norm2 of every block (and SwiGLU for AIMv2); SigLIP2 / DINOv3's
                # unchained norm1 is torch's LayerNorm, which stays as it is
                assert bool(calls) == fuse, (type(m).__name__, chain, calls)
        assert torch.equal(outs[0], outs[1]), (type(m).__name__, chain)
        if chain or isinstance(m, AIMv2):
            assert len([c for c in calls if c != "swiglu_fp8"]) == 2 * len(m.blocks), calls
        assert calls.count("swiglu_fp8") == (len(m.blocks) if isinstance(m, AIMv2) else 0)
    # the GELU MLPs' fc2 input from gelu_fp8: one call a block (its values: the GPU tests)
    if not isinstance(m, AIMv2):
        for mod in m.modules():
            if hasattr(mod, "fused_gelu_fp8"):
                mod.fused_gelu_fp8 = "triton"
        calls.clear()
        with torch.no_grad():
            out = m(px, grid)
        assert calls.count("gelu_fp8") == len(m.blocks) and torch.isfinite(out.float()).all(), calls
        # fc2's rows padded with zero columns (SigLIP2's 80 -> 128 here, 4304 -> 4352 at its real
        # size) give the output of unpadded rows
        fp8.PAD_K_MULTIPLE = 16
        with torch.no_grad():
            unpadded = m(px, grid)
        fp8.PAD_K_MULTIPLE = 128
        assert torch.equal(out, unpadded), type(m).__name__
print("ok")
"""


@pytest.mark.slow
def test_fused_input_quantisation_under_the_interpreter():
    """The fp8 norm / SwiGLU kernels equal the unfused quantisation bit for bit, alone and in whole models."""
    pytest.importorskip("triton")
    from helpers import run_interpreted

    run_interpreted(_FUSED_QUANT)


_COL_STATS = """
import torch
from packvit import fp8, fp8_kernels as FK

torch.manual_seed(0)
# widths: narrow (many rows a tile), SigLIP2's fc2 input (4304: a masked 8192-wide tile); M not a
# multiple of the row block, and more row blocks than programs (each program loops)
for M, K in [(37, 48), (130, 40), (9, 4304)]:
    x = (torch.randn(M, K) * torch.rand(K) * 5).to(torch.bfloat16)
    x[1] = 0
    FK.COL_STATS_PROGRAMS_PER_SM = 2
    # the fused row pass (amax and / or sums), then separate passes
    for col_sum, min_k, want_amax in ((False, 0, True), (True, 0, True), (True, 0, False), (True, 1 << 30, True)):
        FK.COL_STATS_FUSED_MIN_K = min_k
        q, s, amax, sums = FK.quantize_rows_col_stats(x, col_sum, amax=want_amax)
        qr, sr = FK.quantize_rows(x)  # the same rows, bit for bit, as the plain row kernel
        assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s, sr), (M, K)
        if not want_amax:
            assert amax is None
            torch.testing.assert_close(sums, x.float().sum(0), rtol=1e-5, atol=1e-5)
            continue
        assert torch.equal(amax, x.float().abs().amax(0)), (M, K)
        if col_sum:
            torch.testing.assert_close(sums, x.float().sum(0), rtol=1e-5, atol=1e-5)
        else:
            assert sums is None
    qt, st = FK.cast_cols_t(x, amax)
    qc, sc = FK.quantize_cols_t(x)
    assert torch.equal(qt.view(torch.uint8), qc.view(torch.uint8)) and torch.equal(st, sc), (M, K)
    assert qt.shape == (K, -(-M // 16) * 16) and (qt[:, M:].float() == 0).all()
print("ok")
"""


@pytest.mark.slow
def test_column_statistics_kernel_under_the_interpreter():
    """The training quantiser's row part is the plain row kernel's, bit for bit; its column amax is
    exact and its column sums are fp32 sums; the cast from that amax is the column quantisation."""
    pytest.importorskip("triton")
    from helpers import run_interpreted

    run_interpreted(_COL_STATS)
