"""The default CUDA path against the fp32 reference, on a GPU (skipped without CUDA):

* every fused elementwise op (``packvit.fused_ops``), forward and gradients, at every width the
  presets use (D 1024, 1152; SwiGLU hidden 2816 and DINOv3's gated 5120, 8192; RoPE of q and k at
  DINOv3's head dim 64), next to the MLPs that stay unfused (erf-GELU 4096, cuBLASLt gelu-tanh 4304);
* a DINOv3-L block with the fused RoPE on and off, each against the fp32 block;
* every attention backend that runs here (``fa4``, ``flash_attn``, ``torch``) against the fp32
  ``sdpa`` reference, forward and gradients, at the presets' head dims (64, 72, 128);
* each family's whole model as ``from_pretrained`` would run it (bf16, fused kernels, best
  attention) against the same weights in fp32 on the reference path: per-patch cosine >= 0.999,
  and its parameter gradients;
* ``torch.compile`` of a fused block in one graph (``fullgraph=True``), matching eager.

Run on the GPU machine: ``python -m pytest -q -m gpu tests/test_gpu_fused.py``.

An error is judged against what bf16 itself costs: the fused op's relative error to fp32 may not
exceed the unfused bf16 ops' own error by more than a quarter (plus a floor for values that bf16
represents almost exactly).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from packvit import fused_ops, quack_mlp
from packvit.attention import available_backends, varlen_attention
from packvit.layers import Block, GatedMlp, Mlp, Tuning, apply_rope

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEV = "cuda"
BF16 = torch.bfloat16
T = 3000  # tokens: enough rows for every program shape of the kernels, fast to check in fp32


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def assert_as_good_as_bf16(fused, unfused_bf16, ref32, what: str, floor: float = 2e-3):
    """The fused bf16 result is within bf16's own error of the fp32 reference."""
    assert torch.isfinite(fused).all(), f"{what}: non-finite values"
    e_fused, e_ref = rel(fused, ref32), rel(unfused_bf16, ref32)
    assert e_fused <= 1.25 * e_ref + floor, f"{what}: fused error {e_fused:.2e}, unfused bf16 {e_ref:.2e}"


def run_grads(fn, inputs, seed=1):
    """outputs of fn(*inputs) and the gradients of a random projection of them w.r.t. inputs."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator(device=DEV).manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, device=DEV, generator=g)).sum() for o in outs)
    grads = torch.autograd.grad(loss, [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad])
    return [o.detach() for o in outs], list(grads)


def three_ways(fused_fn, ref_fn, make_inputs):
    """(fused bf16, reference bf16, reference fp32) outputs and gradients on the same random inputs."""
    base = make_inputs()
    bf = [t.detach().to(BF16).requires_grad_(t.requires_grad) for t in base]
    bf2 = [t.detach().to(BF16).requires_grad_(t.requires_grad) for t in base]
    f32 = [t.detach().float().requires_grad_(t.requires_grad) for t in base]
    return run_grads(fused_fn, bf), run_grads(ref_fn, bf2), run_grads(ref_fn, f32)


def compare(results, names, what):
    (fo, fg), (ro, rg), (o32, g32) = results
    for i, (a, b, c) in enumerate(zip(fo, ro, o32)):
        assert_as_good_as_bf16(a, b, c, f"{what} output {i}")
    for n, a, b, c in zip(names, fg, rg, g32):
        assert_as_good_as_bf16(a, b, c, f"{what} d{n}")


def rand(*shape, scale=1.0, shift=0.0, grad=True):
    return (torch.randn(*shape, device=DEV) * scale + shift).requires_grad_(grad)


needs_triton = pytest.mark.skipif(not fused_ops._triton_ok(), reason="needs triton")


# --- fused ops -----------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("D, gamma, eps", [(1152, False, 1e-6), (1024, True, 1e-5), (1024, False, 1e-5)])
def test_add_layernorm(D, gamma, eps):
    torch.manual_seed(D)

    def ref(x, a, g, w, b):
        s = x + (a * g if gamma else a)
        return s, F.layer_norm(s, (D,), w, b, eps)

    def fused(x, a, g, w, b):
        return fused_ops.add_layernorm(x, a, g if gamma else None, w, b, eps)

    def make():
        return [
            rand(T, D, scale=3),
            rand(T, D),
            rand(D, scale=0.1, shift=1, grad=gamma),
            rand(D, scale=0.3, shift=1),
            rand(D, scale=0.1),
        ]

    names = ["x", "a"] + (["gamma"] if gamma else []) + ["weight", "bias"]
    compare(three_ways(fused, ref, make), names, f"add_layernorm D={D} gamma={gamma}")


def _rms_ref(x, w, eps):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("impl", ["triton", "liger"])
def test_add_rmsnorm_and_rmsnorm(impl):
    if not (fused_ops._triton_ok() if impl == "triton" else fused_ops._liger_ok()):
        pytest.skip(f"{impl} kernels unavailable")
    D, eps = 1024, 1e-5
    torch.manual_seed(0)
    if impl == "triton":
        add = lambda x, a, w: fused_ops.add_norm(x, a, None, w, None, eps, rms=True)  # noqa: E731
        one = lambda x, w: fused_ops.norm(x, w, None, eps, rms=True)  # noqa: E731
    else:
        add = lambda x, a, w: fused_ops.add_rmsnorm(x, a, w, eps)  # noqa: E731
        one = lambda x, w: fused_ops.rmsnorm(x, w, eps)  # noqa: E731
    make = lambda: [rand(T, D, scale=3), rand(T, D), rand(D, scale=0.3, shift=1)]  # noqa: E731

    def ref(x, a, w):
        s = x + a
        return s, _rms_ref(s, w, eps)

    compare(three_ways(add, ref, make), ["x", "a", "weight"], f"add_rmsnorm {impl} D=1024")
    make1 = lambda: [rand(T, D, scale=3), rand(D, scale=0.3, shift=1)]  # noqa: E731
    compare(three_ways(one, lambda x, w: _rms_ref(x, w, eps), make1), ["x", "weight"], f"rmsnorm {impl} D=1024")


@needs_triton
@pytest.mark.parametrize("H", [2816, 5120, 8192])
def test_swiglu(H):
    torch.manual_seed(H)

    def ref(h):
        gate, up = h.chunk(2, -1)
        return F.silu(gate) * up

    compare(three_ways(fused_ops.swiglu, ref, lambda: [rand(T, 2 * H, scale=2)]), ["h"], f"swiglu H={H}")


T_MIXED32 = 23103  # the suite's mixed32 token count


@needs_triton
@pytest.mark.parametrize("heads", [16, 4])
def test_rope_qk(heads):
    """The fused RoPE at 23k tokens, reading q and k from the (T, 3, H, Dh) qkv output as
    ``Attention.forward`` does, with DINOv3's tables (angles tiled twice, prefix rows cos=1, sin=0)."""
    from packvit.models.dinov3 import rope_from_coords

    torch.manual_seed(heads)
    Tn, Dh = T_MIXED32, 64
    coords = torch.rand(Tn, 2, device=DEV) * 2 - 1
    is_patch = (torch.arange(Tn, device=DEV) % 97 >= 5)[:, None]  # a prefix of 5 rows every 97
    cos32, sin32 = rope_from_coords(coords, is_patch, Dh, 100.0, torch.float32)

    def tables(qkv):
        return cos32.to(qkv.dtype), sin32.to(qkv.dtype)  # bf16 tables for bf16 q, k, as DINOv3.embed casts

    def fused(qkv):
        q, k, _ = qkv.unbind(1)
        return fused_ops.rope_qk(q, k, *tables(qkv))

    def ref(qkv):
        q, k, _ = qkv.unbind(1)
        return apply_rope(q, *tables(qkv)), apply_rope(k, *tables(qkv))

    make = lambda: [rand(Tn, 3, heads, Dh, scale=2)]  # noqa: E731
    results = three_ways(fused, ref, make)
    compare(results, ["qkv"], f"rope H={heads}")
    (q_out, k_out), _ = results[0]
    assert q_out.is_contiguous() and k_out.is_contiguous()
    # Rows that must not rotate come out as they went in, bit for bit.
    qkv = make()[0].detach().to(BF16)
    q_out, k_out = fused(qkv)
    keep = ~is_patch[:, 0]
    assert torch.equal(q_out[keep], qkv[keep, 0]) and torch.equal(k_out[keep], qkv[keep, 1])


@needs_triton
def test_dinov3_block_with_and_without_fused_rope():
    """A DINOv3-L block in bf16 on the default path with the fused RoPE on and off, each against the
    same block in fp32 on the reference path: output, dx and the qkv weight's gradient."""
    from packvit.packing import build_meta

    ref = _model("dinov3").to(DEV).eval()
    model = copy.deepcopy(ref).to(DEV, BF16).eval()
    model.set_attention("auto")  # moving keeps the CPU's choice: choose for CUDA bf16
    if model.fused_kernels["rope"] is None:
        pytest.skip("fused RoPE unavailable here")
    meta = build_meta(GRID, model.num_prefix, torch.device(DEV))
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(meta.num_tokens, model.hidden_size, device=DEV, generator=g)
    dy = torch.randn(meta.num_tokens, model.hidden_size, device=DEV, generator=g)
    outs = {}
    for name, m, rope_on in (("fused", model, True), ("unfused", model, False), ("fp32", ref, False)):
        blk: Block = m.blocks[0]
        blk.attn.fused_rope = "triton" if rope_on else None
        tables = m.position_tables(meta)
        rope = (tables.cos.to(m.dtype), tables.sin.to(m.dtype))
        xi = x.to(m.dtype).requires_grad_()
        y = blk(xi, meta, rope, attn=m.attention)
        gx, gw = torch.autograd.grad(y, [xi, blk.attn.qkv.weight], dy.to(y.dtype))
        outs[name] = (y.detach(), gx, gw)
    model.blocks[0].attn.fused_rope = model.fused_kernels["rope"]
    for i, what in enumerate(["output", "dx", "dqkv_weight"]):
        assert_as_good_as_bf16(outs["fused"][i], outs["unfused"][i], outs["fp32"][i], f"dinov3 block {what}")


@pytest.mark.parametrize(
    "D, H, act, gated",
    [(1024, 2816, "silu", True), (1024, 4096, "gelu", False), (1152, 4304, "gelu_pytorch_tanh", False)],
)
def test_mlp_modules(D, H, act, gated):
    """Each MLP as the models build it, on its default CUDA path (fused where it is), against fp32."""
    torch.manual_seed(H)
    mlp32 = (GatedMlp(D, H, act, bias=False) if gated else Mlp(D, H, act)).to(DEV)
    mlp = copy.deepcopy(mlp32).to(BF16)
    ref16 = copy.deepcopy(mlp)
    if gated:
        mlp.fused = "triton" if fused_ops._triton_ok() else None
    else:  # the GELU in fc1's epilogue (quack), where quack runs here, also at this test's 3,000 tokens
        mlp.fused = "quack" if quack_mlp.available() else None
        mlp.tuning = Tuning(quack_min_tokens=0)
    x = rand(T, D)
    outs = []
    for m in (mlp, ref16, mlp32):
        xi = x.detach().to(next(m.parameters()).dtype).requires_grad_()
        with torch.no_grad():
            y_inf = m(xi)  # the inference route (cuBLASLt's epilogue for gelu-tanh, or quack's)
        y = m(xi)
        dy = torch.randn_like(y, dtype=torch.float32).to(y.dtype)
        params = [m.fc1.weight, m.fc2.weight] + ([] if gated else [m.fc1.bias, m.fc2.bias])
        outs.append((y_inf, y, *torch.autograd.grad(y, [xi, *params], dy)))
    names = ["inference output", "output", "dx", "dfc1", "dfc2"] + ([] if gated else ["dfc1 bias", "dfc2 bias"])
    for i, name in enumerate(names):
        assert_as_good_as_bf16(outs[0][i], outs[1][i], outs[2][i], f"mlp {act} {H} fused={mlp.fused} {name}")


# --- attention backends ----------------------------------------------------------------------------------

FUSED_BACKENDS = [
    b
    for b in ("fa4", "flash_attn", "torch")
    if b in available_backends(DEV if torch.cuda.is_available() else "cpu", BF16)
]


@pytest.mark.parametrize("backend", ["fa4", "flash_attn", "torch"])
@pytest.mark.parametrize("heads, head_dim", [(16, 64), (16, 72), (8, 128)])
def test_attention_backend_against_sdpa(backend, heads, head_dim):
    if backend not in FUSED_BACKENDS:
        pytest.skip(f"attention backend {backend} does not run here")
    torch.manual_seed(head_dim)
    lens = [64, 1, 700, 255, 1024, 2304, 96]  # DINOv3-like prefix-length oddities and long frames
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    Tq, mx = sum(lens), max(lens)

    def attn(be):
        return lambda q, k, v: varlen_attention(q, k, v, cu, cu, mx, mx, backend=be, seqlens_q=lens, seqlens_k=lens)

    make = lambda: [rand(Tq, heads, head_dim) for _ in range(3)]  # noqa: E731
    compare(three_ways(attn(backend), attn("sdpa"), make), ["q", "k", "v"], f"{backend} Dh={head_dim}")


# --- whole models ------------------------------------------------------------------------------------------

GRID = ((1, 20, 31), (1, 8, 8), (1, 37, 14), (2, 12, 16), (1, 1, 9))


def _model(family: str):
    from packvit.bench.models import DEFAULT_PRESETS
    from weights_conversion import FAMILIES
    from weights_conversion.reference import randomize_

    fam = FAMILIES[family]
    cfg = fam.config_class.from_name(DEFAULT_PRESETS[family])
    torch.manual_seed(0)
    m = fam.model_class(cfg)
    with torch.no_grad():  # spread the constant-initialised norms, biases and scales
        randomize_(m, seed=0, scale=0.05, constant_only=True)
    return m


@pytest.mark.parametrize("family", ["siglip2", "dinov3", "aimv2"])
def test_whole_model_default_path_against_fp32(family):
    ref = _model(family).to(DEV).eval()  # fp32 on CUDA: the sdpa reference path, nothing fused
    assert ref.attn_backend == "sdpa" and set(ref.fused_kernels.values()) == {None}
    model = copy.deepcopy(ref).to(DEV, BF16)
    model.set_attention("auto")  # what from_pretrained(..., device="cuda", dtype=torch.bfloat16) holds
    assert model.attn_backend != "sdpa", "no fused attention backend here"
    want = {
        "siglip2": ["add_layernorm"],
        "dinov3": ["add_layernorm", "rope"],
        "aimv2": ["add_rmsnorm", "rmsnorm", "swiglu"],
    }
    missing = [op for op in want[family] if model.fused_kernels[op] is None]
    if missing:
        pytest.skip(f"fused kernels {missing} unavailable here (library missing)")
    assert "fused_kernels=[" in repr(model) and "off]" not in repr(model)

    n = sum(t * h * w for t, h, w in GRID)
    g = torch.Generator().manual_seed(0)
    px = torch.randn(n, ref.patch_dim, generator=g).to(DEV)
    grid = torch.tensor(GRID)
    out32 = ref(px, grid)
    out = model(px.to(BF16), grid)
    cos = F.cosine_similarity(out.float(), out32, dim=-1)
    assert cos.min() >= 0.999, f"{family}: per-patch min cosine {cos.min():.5f}"

    # Gradients of every parameter, through the fused backward kernels.
    model.train(), ref.train()
    for m in (model, ref):
        m(px.to(m.dtype), grid).float().square().mean().backward()
    worst = (1.0, "")
    for (name, p32), p in zip(ref.named_parameters(), model.parameters()):
        if p32.grad is None or name.endswith("k_bias"):  # softmax ignores a key bias: its gradient is noise
            continue
        c = F.cosine_similarity(p.grad.float().flatten(), p32.grad.flatten(), dim=0).item()
        worst = min(worst, (c, name))
    assert worst[0] >= 0.99, f"{family}: parameter gradient cosine {worst[0]:.4f} at {worst[1]}"


@pytest.mark.parametrize("family", ["dinov3", "aimv2"])
def test_fused_block_compiles_in_one_graph(family):
    model = _model(family).to(DEV, BF16)
    model.set_attention("auto")
    blk: Block = model.blocks[0]
    if not blk.fused_add_norm:
        pytest.skip("no fused kernels here")
    uses_rope = hasattr(model.config, "rope_theta")  # DINOv3
    assert (blk.attn.fused_rope is not None) == uses_rope  # so a RoPE model's graph holds the RoPE op
    from packvit.packing import build_meta

    meta = build_meta(((1, 20, 31), (1, 9, 13)), model.num_prefix, torch.device(DEV))
    rope = None
    if uses_rope:
        tables = model.position_tables(meta)
        rope = (tables.cos.to(BF16), tables.sin.to(BF16))
    x = torch.randn(meta.num_tokens, model.hidden_size, device=DEV, dtype=BF16, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(blk, fullgraph=True, dynamic=True)  # a graph break raises here
    y_c = compiled(x, meta, rope, attn=model.attention)
    (gx_c,) = torch.autograd.grad(y_c.float().square().mean(), [x])
    y_e = blk(x, meta, rope, attn=model.attention)
    (gx_e,) = torch.autograd.grad(y_e.float().square().mean(), [x])
    assert rel(y_c, y_e) < 1e-2 and rel(gx_c, gx_e) < 2e-2
    # The chained call (packvit.chained): norm1 given, the next block's norm1 fused into the last add.
    from packvit.layers import norm_args

    nxt = norm_args(model.blocks[1].norm1)
    # norm1(x) made afresh for each call: both backward passes go through it.
    xc, hc = compiled(
        x, meta, rope, attn=model.attention, normed=fused_ops.norm(x, *norm_args(blk.norm1)), next_norm=nxt
    )
    xe, he = blk(x, meta, rope, attn=model.attention, normed=fused_ops.norm(x, *norm_args(blk.norm1)), next_norm=nxt)
    (gx_c,) = torch.autograd.grad(xc.float().square().mean() + hc.float().sum(), [x])
    (gx_e,) = torch.autograd.grad(xe.float().square().mean() + he.float().sum(), [x])
    assert rel(xc, xe) < 1e-2 and rel(hc, he) < 1e-2 and rel(gx_c, gx_e) < 2e-2
    assert rel(xe, y_e) < 1e-2  # the chained block's residual output is the block's output


def test_head_padding_kernel_is_torchs_pad_and_cut():
    """FA4's backward pads head dim 72 to 96 (and cuts the gradients back) with one kernel a side:
    bit for bit ``F.pad`` and the slice, on the strided q, k, v views of a qkv output."""
    from packvit.triton_kernels import copy_heads

    qkv = torch.randn(23103, 3, 16, 72, device=DEV, dtype=BF16)
    q, k, v = qkv.unbind(1)
    out, dout = torch.randn(2, 23103, 16, 72, device=DEV, dtype=BF16).unbind(0)
    padded = copy_heads((q, k, v, out, dout), 96)
    for a, b in zip(padded, (q, k, v, out, dout)):
        assert a.is_contiguous() and torch.equal(a, F.pad(b, (0, 24)))
    for a, b in zip(copy_heads(padded[:3], 72), (q, k, v)):
        assert a.is_contiguous() and torch.equal(a, b)
