"""packvit.fp8 on a GPU of compute capability >= 8.9 (skipped elsewhere):

* the Triton quantisers against their torch definitions (same e4m3 values but for rare one-step
  differences from Triton's fp32 division; same scales to 1e-6);
* the training quantiser (rows plus column amax and sums in one read) against the plain kernels;
* one FP8 linear at each family's shapes against fp32, forward and the three gradients, with the
  weight gradient in e4m3 and in bf16 (``fp8.WGRAD``);
* each family's model at the published size (random weights) with ``set_fp8()`` on mixed32 against
  the same weights in fp32 on the reference path (packvit fp32 matches HF to 1e-6 in the parity
  tests: it stands in for HF): the layers that run FP8 are those whose crossover the batch reaches,
  and the per-patch min cosine stays at what was measured (>= 0.993). Issue 20's target, 0.999, is
  kept as a strict xfail: measured 0.9974 / 0.9945 / 0.9980 on the H200 (2026-12-03), see
  ``packvit.fp8``'s docstring for why;
* below every crossover an FP8 model is the bf16 model, forward and gradients, bit for bit;
* the policy's premise: at twice its crossover, AIMv2's fc1 is faster in FP8 than in bf16;
* ``set_fp8`` refuses an fp32 model; ``from_pretrained``-style ``.to`` then ``set_fp8`` works.

Run on the GPU machine: ``python -m pytest -q -m gpu tests/test_gpu_fp8.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from packvit import fp8

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
        reason="needs a CUDA GPU of compute capability >= 8.9",
    ),
]

DEV = "cuda"
BF16 = torch.bfloat16


def rel(a, ref) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("shape", [(23103, 1152), (1000, 4304), (37, 5632), (5, 1024)])
def test_triton_quantisers_match_the_reference(shape):
    g = torch.Generator(device=DEV).manual_seed(0)
    x = (torch.randn(*shape, device=DEV, generator=g) * torch.rand(shape[1], device=DEV, generator=g) * 5).to(BF16)
    x[0] = 0
    for kern, ref in (
        (fp8.quantize_rows, fp8.quantize_rows_reference),
        (fp8.quantize_cols_t, fp8.quantize_cols_t_reference),
    ):
        q, s = kern(x)
        qr, sr = ref(x)
        assert q.shape == qr.shape and s.shape == sr.shape and q.dtype == torch.float8_e4m3fn
        torch.testing.assert_close(s, sr, rtol=1e-6, atol=0)
        diff = q.float() != qr.float()
        assert diff.float().mean() < 1e-3, kern.__name__
        # where they differ, by one e4m3 step (1/8 of the binade) at most
        step = (q.float() - qr.float()).abs()[diff] / qr.float().abs()[diff].clamp(min=2**-9)
        assert step.numel() == 0 or step.max() <= 0.34, kern.__name__


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("shape", [(23103, 5632), (23103, 1152), (1000, 4304), (37, 1024)])
def test_training_quantisers_match_the_plain_ones(shape, fused, monkeypatch):
    """``quantize_rows_col_stats``: the plain row kernel's rows bit for bit, torch's column amax
    exactly, fp32 column sums to 1e-5; ``cast_cols_t`` from that amax is ``quantize_cols_t``."""
    from packvit import fp8_kernels as FK

    monkeypatch.setattr(FK, "COL_STATS_FUSED_MIN_K", 0 if fused else 1 << 30)  # one read, or separate passes
    g = torch.Generator(device=DEV).manual_seed(1)
    x = (torch.randn(*shape, device=DEV, generator=g) * torch.rand(shape[1], device=DEV, generator=g) * 5).to(BF16)
    x[0] = 0
    q, s, amax, sums = FK.quantize_rows_col_stats(x, col_sum=True)
    qr, sr = FK.quantize_rows(x)
    assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s, sr)
    assert torch.equal(amax, x.float().abs().amax(0))
    torch.testing.assert_close(sums, x.float().sum(0), rtol=1e-5, atol=1e-3)
    # the bf16 weight gradient's backward asks for the sums alone (the bias gradient)
    q2, s2, none, sums2 = FK.quantize_rows_col_stats(x, col_sum=True, amax=False)
    assert none is None and torch.equal(q2.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s2, sr)
    torch.testing.assert_close(sums2, x.float().sum(0), rtol=1e-5, atol=1e-3)
    (qt, st), (qc, sc) = FK.cast_cols_t(x, amax), FK.quantize_cols_t(x)
    assert torch.equal(qt.view(torch.uint8), qc.view(torch.uint8)) and torch.equal(st, sc)


SHAPES = [(1152, 3456), (4304, 1152), (1024, 5632), (2816, 1024)]


@pytest.mark.parametrize("wgrad", ["fp8", "bf16"])
@pytest.mark.parametrize("K,N", SHAPES)
def test_fp8_linear_against_fp32(K, N, wgrad, monkeypatch):
    monkeypatch.setattr(fp8, "WGRAD", wgrad)  # the weight gradient's GEMM in e4m3 or in bf16
    torch.manual_seed(0)
    M = 3000
    ref = nn.Linear(K, N, device=DEV)
    with torch.no_grad():
        ref.weight.mul_(3.0)
        ref.bias.normal_(0, 0.1)
    lin = copy.deepcopy(ref).to(BF16)
    lin.__class__ = fp8.FP8Linear
    lin._init_fp8(0, 0)
    x32 = torch.randn(M, K, device=DEV)
    dy = torch.randn(M, N, device=DEV)
    x32.requires_grad_(True)
    ref(x32).backward(dy)
    x = x32.detach().to(BF16).requires_grad_(True)
    y = lin(x)
    y.backward(dy.to(BF16))
    y32 = ref(x32).detach()
    assert F.cosine_similarity(y.float(), y32, dim=-1).min() > 0.998
    assert rel(y, y32) < 0.05
    for got, want, what in (
        (x.grad, x32.grad, "dx"),
        (lin.weight.grad, ref.weight.grad, "dW"),
        (lin.bias.grad, ref.bias.grad, "db"),
    ):
        assert torch.isfinite(got).all(), what
        assert rel(got, want) < 0.06, (what, rel(got, want))


@pytest.fixture(scope="module")
def models():
    from packvit.bench.models import build_pair

    out = {}
    for fam in ("siglip2", "dinov3", "aimv2"):
        _, m32 = build_pair(fam, None, torch.device(DEV), torch.float32, "sdpa")
        out[fam] = m32
    return out


def _fp8_against_fp32(models, family):
    from packvit.bench.workloads import mixed32

    m32 = models[family]
    m8 = copy.deepcopy(m32).to(BF16)
    m8.set_attention_backend("auto")
    names = m8.set_fp8()
    assert names and "fp8=[" in repr(m8)
    grid = mixed32(m32.config.patch_size).grid
    g = torch.Generator(device=DEV).manual_seed(1)
    px = torch.randn(sum(t * h * w for t, h, w in grid), m32.patch_dim, device=DEV, generator=g)
    with torch.inference_mode():
        ref = m32(px, grid)
        out = m8(px, grid)
    cos = F.cosine_similarity(out.float(), ref, dim=-1).min().item()
    return m8, px, grid, cos


@pytest.mark.parametrize("family", ["siglip2", "dinov3", "aimv2"])
@pytest.mark.xfail(strict=True, reason="e4m3 on every linear: 0.994-0.998 measured on the H200 (packvit.fp8)")
def test_model_fidelity_target(models, family):
    assert _fp8_against_fp32(models, family)[3] >= 0.999


@pytest.mark.parametrize("family", ["siglip2", "dinov3", "aimv2"])
def test_model_fidelity_as_measured_and_policy(models, family):
    m8, px, grid, cos = _fp8_against_fp32(models, family)
    print(f"{family}: FP8 (crossovers) against fp32 on mixed32, per-patch cosine min {cos:.5f}")
    assert cos >= 0.993, (family, cos)
    T = px.shape[0] + m8.num_prefix * len(grid)
    for name, lin in m8.named_modules():
        if isinstance(lin, fp8.FP8Linear):
            with torch.no_grad():
                assert lin.uses_fp8(torch.empty(T, lin.in_features, device="meta")) == (
                    T >= fp8.crossover(lin.in_features, lin.out_features, "infer")
                ), name


@pytest.mark.parametrize("family", ["siglip2", "dinov3", "aimv2"])
def test_below_its_crossovers_an_fp8_model_is_the_bf16_model(models, family, monkeypatch):
    """A batch below every crossover runs the bf16 model's own fused MLP paths (quack's GELU MLP, the
    SwiGLU training MLP: ``fp8.runs_plain``): the same calls, the same forward bit for bit, and the
    same gradients (to the attention backward's own run-to-run noise: FA4 accumulates dq atomically)."""
    from packvit import fused_ops, quack_mlp

    calls = []
    for mod, name in ((quack_mlp, "gelu_mlp"), (fused_ops, "swiglu_mlp")):
        f = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _f=f, _n=name, **k: calls.append(_n) or _f(*a, **k))
    torch.manual_seed(0)
    mbf = copy.deepcopy(models[family]).to(BF16)
    mbf.set_attention_backend("auto")
    m8 = copy.deepcopy(mbf)
    assert m8.set_fp8(min_tokens=10**6)  # every linear an FP8Linear, every one below its crossover
    grid = [(1, 90, 100), (1, 20, 30)]  # 9,600 tokens: past quack's own minimum (Tuning.quack_min_tokens)
    px = torch.randn(sum(t * h * w for t, h, w in grid), mbf.patch_dim, device=DEV, dtype=BF16)
    outs, counts = [], []
    for m in (mbf, m8):
        calls.clear()
        out = m(px, grid)
        out.float().square().mean().backward()
        outs.append((out, [p.grad for p in m.parameters()]))
        counts.append(len(calls))
    assert counts[0] == counts[1], counts
    assert counts[1] == len(mbf.blocks) or mbf.blocks[0].mlp.fused is None, (counts, mbf.blocks[0].mlp.fused)
    assert torch.equal(outs[0][0], outs[1][0])
    scale = max(b.float().norm() for b in outs[0][1] if b is not None)
    for (name, _), a, b in zip(mbf.named_parameters(), outs[1][1], outs[0][1]):
        assert (a is None) == (b is None), name  # None: not on the output's path (SigLIP2's pooling head)
        if b is None or b.float().norm() < 1e-6 * scale:
            continue  # zero in exact arithmetic, noise here: the key bias (softmax ignores a shift of all keys)
        assert F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0) > 0.9999, name


def test_fp8_faster_past_the_crossover():
    K, N = 1024, 5632
    M = 2 * fp8.crossover(K, N, "infer")
    ref = nn.Linear(K, N, bias=False, device=DEV, dtype=BF16)
    lin = copy.deepcopy(ref)
    lin.__class__ = fp8.FP8Linear
    lin._init_fp8(0, 0)
    x = torch.randn(M, K, device=DEV, dtype=BF16)

    def ms(fn):
        with torch.inference_mode():
            for _ in range(5):
                fn()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(20):
                fn()
            b.record()
            torch.cuda.synchronize()
        return a.elapsed_time(b)

    assert ms(lambda: lin(x)) < ms(lambda: ref(x))


def test_set_fp8_refuses_fp32_and_runs_in_bf16():
    from packvit.bench.models import build_pair

    _, m = build_pair("siglip2", None, torch.device(DEV), torch.float32, "sdpa", tiny=True)
    with pytest.raises(ValueError, match="needs a bf16 model"):
        m.set_fp8()
    m.to(BF16)
    assert len(m.set_fp8(min_tokens=0)) == 4 * len(m.blocks)
    x = torch.randn(40, m.patch_dim, device=DEV)
    with torch.inference_mode():
        assert torch.isfinite(m(x, [(1, 5, 8)]).float()).all()


# -- the input quantisation fused into the norm and SwiGLU kernels (``fp8.FP8Rows``) ----------------


@pytest.mark.parametrize(
    "D,res,gamma,bias,rms",
    [(1152, True, False, True, False), (1152, False, False, True, False), (1024, True, True, True, False)]
    + [(1024, True, False, False, True), (1024, False, False, False, True)]  # SigLIP2, DINOv3, AIMv2
    + [(1536, True, False, False, True)],  # RMSNorm at a width of two tiles (AIMv2-huge)
)
def test_fp8_norm_kernels_equal_the_unfused_quantisation(D, res, gamma, bias, rms):
    """The fp8 norm against ``quantize_rows`` of the bf16 norm kernel's y: bit for bit at a power-of-two
    width. At 1152 (SigLIP2) it sums a row as two tiles (``triton_kernels``, "two tiles"), another
    order than the bf16 kernel's one tile, so a rare y is the neighbouring bf16 value: there at most
    1e-5 of the codes and 1e-3 of the scales may differ, each by one step. The residual s is exact."""
    from packvit import fused_ops
    from packvit import triton_kernels as K

    g = torch.Generator(device=DEV).manual_seed(0)
    T = 3001

    def r(*shape, s=1.0):
        return (torch.randn(*shape, device=DEV, generator=g) * s).to(BF16)

    x, a = r(T, D, s=4), (r(T, D, s=2) if res else None)
    gm, w, b = (r(D, s=0.1) if gamma else None), r(D, s=0.3) + 1, (r(D, s=0.1) if bias else None)
    x[5] = 0
    if a is not None:
        a[5] = 0
    s, y, _, _ = K.norm_fwd(x, a, gm, w, b, 1e-6, rms)
    s8, rows = fused_ops.add_norm_fp8(x, a, gm, w, b, 1e-6, rms) if res else (s, fused_ops.norm_fp8(x, w, b, 1e-6, rms))
    qr, sr = fp8.quantize_rows(y)  # the Triton quantiser: what the unfused FP8 linear runs
    assert torch.equal(s8, s) and rows.dtype == BF16
    if D & (D - 1) == 0:
        assert torch.equal(rows.q.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(rows.scale, sr)
        return
    codes = (rows.q.view(torch.uint8) != qr.view(torch.uint8)).float().mean().item()
    scales = (rows.scale != sr).float().mean().item()
    print(f"D {D}: codes differing {codes:.2e}, scales differing {scales:.2e}")
    assert codes <= 1e-5 and scales <= 1e-3, (codes, scales)
    torch.testing.assert_close(rows.scale, sr, rtol=2**-7, atol=0)  # one bf16 step of the amax
    deq, ref = rows.q.float() * rows.scale, qr.float() * sr
    assert ((deq - ref).abs().amax(1) <= ref.abs().amax(1) / 8 + 1e-30).all()  # one e4m3 step at most


@pytest.mark.parametrize("H", [2816, 300])
def test_fp8_swiglu_kernel_equals_the_unfused_quantisation(H):
    from packvit import fused_ops

    h = (torch.randn(3001, 2 * H, device=DEV) * 3).to(BF16)
    rows = fused_ops.swiglu_fp8(h)
    qr, sr = fp8.quantize_rows(fused_ops.swiglu(h))
    assert torch.equal(rows.q.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(rows.scale, sr)


def test_erf_written_out_is_torchs_erf_bit_for_bit():
    """The erf GELU's ``triton_kernels._erf`` (libdevice's erff written out) against ``torch.erf``
    (what torch's CUDA GELU computes): the same bits on every 7th fp32 from 0 to 10, their negatives
    and the infinities. (``tl.erf`` is not: it differs on 1.1% of these, H200 2026-12-03.)"""
    import triton
    import triton.language as tl

    from packvit import triton_kernels as K

    @triton.jit
    def erf(X, Y, N, BLOCK: tl.constexpr):
        o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = o < N
        tl.store(Y + o, K._erf(tl.load(X + o, mask=m)), mask=m)

    bits = torch.arange(0, 0x41200000, 7, dtype=torch.int64, device=DEV).to(torch.int32)  # 0 .. 10.0
    x = bits.view(torch.float32)
    x = torch.cat([x, -x, torch.tensor([float("inf"), -float("inf")], device=DEV)])
    y = torch.empty_like(x)
    erf[(triton.cdiv(x.numel(), 4096),)](x, y, x.numel(), BLOCK=4096)
    differ = y.view(torch.int32) != torch.erf(x).view(torch.int32)
    assert not differ.any(), (int(differ.sum()), x[differ][:5].tolist())


@pytest.mark.parametrize("H,approximate", [(4304, "tanh"), (4096, "none"), (300, "tanh")])
def test_fp8_gelu_kernel_against_the_unfused_quantisation(H, approximate):
    """``gelu_fp8`` against ``quantize_rows(F.gelu(h))``. Its erf GELU is torch's expression with
    torch's erf bit for bit (``_erf``), so the same codes and scales. Its tanh is written through the
    sigmoid, so a rare element's bf16 GELU (hence its e4m3 code) is a neighbour of torch's: equal
    scales but for such rows, and the dequantised rows as close as one e4m3 step."""
    from packvit import fused_ops

    h = (torch.randn(3001, H, device=DEV) * 3).to(BF16)
    rows = fused_ops.gelu_fp8(h, approximate)
    # Padded with zero columns for the GEMM (SigLIP2's fc2: 4304 -> 4352): the same codes and scales.
    wide = fused_ops.gelu_fp8(h, approximate, fp8.padded_k(H + 1))
    assert torch.equal(wide.q[:, :H].view(torch.uint8), rows.q.view(torch.uint8))
    assert (wide.q[:, H:].view(torch.uint8) == 0).all() and torch.equal(wide.scale, rows.scale)
    qr, sr = fp8.quantize_rows(F.gelu(h, approximate=approximate))
    if approximate == "none":
        assert torch.equal(rows.q.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(rows.scale, sr)
        return
    diff = rows.q.view(torch.uint8) != qr.view(torch.uint8)
    assert diff.float().mean() < 1e-3, diff.float().mean()
    torch.testing.assert_close(rows.scale, sr, rtol=1e-2, atol=0)
    deq, ref = rows.q.float() * rows.scale, qr.float() * sr
    assert ((deq - ref).abs().amax(1) <= ref.abs().amax(1) / 8 + 1e-30).all()


def test_padded_rows_give_the_linears_output():
    """SigLIP2's fc2 (4304 -> 1152) fed e4m3 rows padded with zero columns to 4352, as its GELU kernel
    writes them, against the same rows unpadded: the GEMM runs another K (and may accumulate in
    another order), the products are the same."""
    torch.manual_seed(0)
    lin = nn.Linear(4304, 1152).to(DEV, BF16)
    lin.__class__ = fp8.FP8Linear
    lin._init_fp8(0, 0)
    x = torch.randn(3001, 4304, device=DEV).to(BF16)
    q, s = fp8.quantize_rows(x)
    wide = torch.zeros(3001, lin.rows_width, dtype=torch.uint8, device=DEV)
    wide[:, :4304] = q.view(torch.uint8)
    with torch.inference_mode():
        y = lin(fp8.FP8Rows(q, s, BF16))
        yp = lin(fp8.FP8Rows(wide.view(fp8.E4M3), s, BF16))
    assert lin.rows_width == 4352 and lin._fp8_weight[1].shape == (1152, 4352)
    cos = F.cosine_similarity(yp.float(), y.float(), dim=-1)
    assert cos.min() >= 0.99999, cos.min()
    assert (yp.float() - y.float()).abs().max() <= 0.01 * y.float().abs().max()


@pytest.mark.parametrize("family", ["siglip2", "dinov3", "aimv2"])
def test_fused_input_quantisation_changes_no_bit(models, family, monkeypatch):
    """Each family at its published size on mixed32, fp8 on: the same output with the quantisation in
    the norm / SwiGLU kernels as with each linear quantising its own input.

    Bit for bit for AIMv2. The GELU families' fc2 input now comes from ``gelu_fp8``, whose GELU is a
    rare bf16 step from torch's (its own test), so for them the check is the fidelity one below.
    SigLIP2 (D 1152) was not bit-equal even before that: on the H200 (2026-12-03) 3 of block 0's
    26.6M e4m3 qkv inputs differed, the scales were equal, when its fp8 norm was the one-tile kernel
    compiled separately from the plain one; now that kernel sums a row as two tiles (the kernel test
    bounds how often its y is a bf16 step from the plain kernel's). The rare difference
    then grows through 27 blocks of e4m3 rounding, to per-patch cosine 0.99922 between the two
    outputs (measured), as two FP8 runs of different rounding would. So for SigLIP2 the check is
    that the fused path is as faithful to the fp32 model as the unfused one: its min cosine against
    fp32 no more than 5e-4 below (the two paths measured 0.99732 and 0.99745 in fp8_ab)."""
    from packvit import fused_ops
    from packvit.bench.workloads import mixed32

    m8 = copy.deepcopy(models[family]).to(BF16)
    m8.set_attention_backend("auto")
    m8.set_fused_kernels("on")
    m8.set_fp8()
    calls = []
    for name in ("norm_fp8", "add_norm_fp8", "swiglu_fp8", "gelu_fp8"):
        f = getattr(fused_ops, name)
        monkeypatch.setattr(fused_ops, name, lambda *a, _f=f, _n=name, **k: calls.append(_n) or _f(*a, **k))
    grid = mixed32(m8.config.patch_size).grid
    g = torch.Generator(device=DEV).manual_seed(1)
    px = torch.randn(sum(t * h * w for t, h, w in grid), m8.patch_dim, device=DEV, generator=g).to(BF16)
    outs = []
    with torch.inference_mode():
        for fuse in (False, True):
            monkeypatch.setattr(fp8, "FUSE_INPUT_QUANT", fuse)
            outs.append(m8(px, grid))
    assert calls, "no fused quantisation ran at mixed32's token count"
    assert ("gelu_fp8" in calls) == (family != "aimv2") and ("swiglu_fp8" in calls) == (family == "aimv2")
    if family != "aimv2":
        with torch.inference_mode():
            ref = models[family](px.float(), grid)
        unfused, fused = (F.cosine_similarity(o.float(), ref, dim=-1).min().item() for o in outs)
        print(f"{family} against fp32, per-patch cosine min: unfused {unfused:.5f}, fused {fused:.5f}")
        assert fused >= unfused - 5e-4, (unfused, fused)
    else:
        assert torch.equal(outs[0], outs[1]), (outs[0].float() - outs[1].float()).abs().max()
