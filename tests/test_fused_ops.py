"""The fused elementwise path on the CPU: which kernels a model chooses, and packvit's own Triton
kernels checked against the reference ops under Triton's interpreter (``TRITON_INTERPRET=1``;
skipped where triton is not installed). The same checks at the presets' real widths on a GPU are in
test_gpu_fused.py."""

from __future__ import annotations

import pytest
import torch

from helpers import run_interpreted
from packvit import fused_ops
from packvit.layers import Attention, Block, GatedMlp, RMSNorm
from packvit.models.aimv2 import AIMv2, AIMv2Config
from packvit.models.dinov3 import DINOv3, DINOv3Config


def _tiny_aimv2():
    return AIMv2(AIMv2Config(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96))


def test_cpu_and_fp32_models_take_the_reference_path():
    m = _tiny_aimv2()
    assert set(m.fused_kernels.values()) == {None}
    assert "fused_kernels=[off]" in repr(m)
    for mod in m.modules():
        assert getattr(mod, "fused", None) is None and getattr(mod, "fused_add_norm", None) is None
    m.to(torch.bfloat16)  # bf16 on the CPU: still no fused kernel
    assert set(m.fused_kernels.values()) == {None}


def test_resolution_rules(monkeypatch):
    monkeypatch.setattr(fused_ops, "_triton_ok", lambda: True)
    monkeypatch.setattr(fused_ops, "_liger_ok", lambda: True)
    monkeypatch.setattr(fused_ops, "_quack_ok", lambda: True)
    on = fused_ops.resolve_fused("auto", "cuda", torch.bfloat16, "fa4")
    assert on == {
        "add_layernorm": "triton",
        "add_rmsnorm": "triton",
        "rmsnorm": "triton",
        "swiglu": "triton",
        "rope": "triton",
        "gelu_mlp": "quack",
        "gelu_fp8": "triton",
    }
    assert set(fused_ops.resolve_fused("auto", "cuda", torch.bfloat16, "sdpa").values()) == {None}  # the reference
    assert fused_ops.resolve_fused("on", "cuda", torch.bfloat16, "sdpa") == on
    assert set(fused_ops.resolve_fused("on", "cuda", torch.float32, "fa4").values()) == {None}
    assert set(fused_ops.resolve_fused("off", "cuda", torch.bfloat16, "fa4").values()) == {None}
    monkeypatch.setattr(fused_ops, "RMSNORM_IMPLS", ("liger", "triton"))
    assert fused_ops.resolve_fused("auto", "cuda", torch.bfloat16, "fa4")["rmsnorm"] == "liger"
    monkeypatch.setattr(fused_ops, "_liger_ok", lambda: False)  # a library missing: the next one, or the reference
    assert fused_ops.resolve_fused("auto", "cuda", torch.bfloat16, "fa4")["add_rmsnorm"] == "triton"
    monkeypatch.setattr(fused_ops, "_triton_ok", lambda: False)
    assert set(fused_ops.resolve_fused("auto", "cuda", torch.float16, "torch").values()) == {None, "quack"}
    monkeypatch.setattr(fused_ops, "_quack_ok", lambda: False)
    assert set(fused_ops.resolve_fused("auto", "cuda", torch.float16, "torch").values()) == {None}
    with pytest.raises(ValueError, match="fused_kernels must be one of"):
        fused_ops.resolve_fused("yes", "cuda", torch.bfloat16)


def test_model_hands_the_choice_to_its_modules(monkeypatch):
    # What a CUDA bf16 model would hold, forced on the CPU by pretending the device is CUDA.
    monkeypatch.setattr(fused_ops, "_triton_ok", lambda: True)
    monkeypatch.setattr(fused_ops, "_liger_ok", lambda: True)
    real = fused_ops.resolve_fused
    monkeypatch.setattr("packvit.models.base.resolve_fused", lambda r, d, t, b: real(r, "cuda", torch.bfloat16, b))
    m = _tiny_aimv2()
    m.set_fused_kernels("on")
    assert all(b.fused_add_norm == "triton" for b in m.blocks)
    assert all(r.fused == "triton" for r in m.modules() if isinstance(r, RMSNorm))
    assert all(g.fused == "triton" for g in m.modules() if isinstance(g, GatedMlp))
    assert "fused_add_norm=triton" in repr(m) and "add_rmsnorm=triton" in repr(m)
    # AIMv2 has no RoPE: no fused RoPE is chosen or shown.
    assert m.fused_kernels["rope"] is None and all(
        a.fused_rope is None for a in m.modules() if isinstance(a, Attention)
    )
    d = DINOv3(DINOv3Config(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96, num_register_tokens=1))
    monkeypatch.setattr(fused_ops, "_quack_ok", lambda: True)
    d.set_fused_kernels("on")
    assert all(b.fused_add_norm == "triton" and b.attn.fused_rope == "triton" for b in d.blocks)
    assert all(b.mlp.fused == "quack" for b in d.blocks) and "fused=quack" in repr(d)  # erf-GELU in fc1's epilogue
    assert "fused_rope=triton" in repr(d)
    # On CPU tensors the modules still run the reference ops, whatever they were told.
    x = torch.randn(7, 64)
    blk: Block = d.blocks[0]
    assert not blk._fuses(x, x)
    d.set_fused_kernels("off")
    assert all(b.fused_add_norm is None and b.attn.fused_rope is None for b in d.blocks)


# --- the kernels, under Triton's interpreter ------------------------------------------------------------

_INTERPRETED = """
import torch, torch.nn.functional as F
from packvit import fused_ops, triton_kernels as K

torch.manual_seed(0)

def close(a, b, what, tol):
    err = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
    assert err < tol, f"{what}: relative error {err:.2e} >= {tol}"

# Narrow rows take many rows per tile; 1152 (SigLIP2) takes one row of a 2048-wide tile, as on the GPU.
for D, gamma_on, bias_on in [(48, True, True), (40, False, True), (64, False, False), (1152, True, True)]:
    T = 37
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    a = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    g = (torch.rand(D, dtype=torch.float64) + 0.5).requires_grad_(gamma_on)
    w = (torch.randn(D, dtype=torch.float64) * 0.3 + 1).requires_grad_()
    b = (torch.randn(D, dtype=torch.float64) * 0.1).requires_grad_(bias_on)
    s_ref = x + (a * g if gamma_on else a)
    y_ref = F.layer_norm(s_ref, (D,), w, b if bias_on else None, 1e-6)
    gy, gs = torch.randn(T, D, dtype=torch.float64), torch.randn(T, D, dtype=torch.float64)
    ref = torch.autograd.grad((y_ref * gy).sum() + (s_ref * gs).sum(),
                              [x, a, w] + ([g] if gamma_on else []) + ([b] if bias_on else []))
    xs, as_ = x.detach().float().requires_grad_(), a.detach().float().requires_grad_()
    ws, gs32, bs = w.detach().float().requires_grad_(), g.detach().float().requires_grad_(), b.detach().float().requires_grad_()
    s, y = fused_ops.add_layernorm(xs, as_, gs32 if gamma_on else None, ws, bs if bias_on else None, 1e-6)
    close(s, s_ref, "s", 1e-6); close(y, y_ref, "y", 1e-5)
    got = torch.autograd.grad((y * gy.float()).sum() + (s * gs.float()).sum(),
                              [xs, as_, ws] + ([gs32] if gamma_on else []) + ([bs] if bias_on else []))
    for name, u, v in zip(["dx", "da", "dw", "dgamma" if gamma_on else "db", "db"], got, ref):
        close(u, v, f"D={D} {name}", 1e-5)

# RMSNorm, with and without the residual (AIMv2: no bias, no LayerScale).
for D, res in [(48, True), (64, False), (1024, True)]:
    T = 37
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    a = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(D, dtype=torch.float64) * 0.3 + 1).requires_grad_()
    s_ref = x + a if res else x
    y_ref = w * s_ref * torch.rsqrt(s_ref.pow(2).mean(-1, keepdim=True) + 1e-5)
    gy, gs = torch.randn(T, D, dtype=torch.float64), torch.randn(T, D, dtype=torch.float64)
    loss = (y_ref * gy).sum() + ((s_ref * gs).sum() if res else 0)
    ref = torch.autograd.grad(loss, [x, a, w] if res else [x, w])
    xs, as_, ws = (t.detach().float().requires_grad_() for t in (x, a, w))
    if res:
        s, y = fused_ops.add_norm(xs, as_, None, ws, None, 1e-5, rms=True)
        close(s, s_ref, "rms s", 1e-6)
        got = torch.autograd.grad((y * gy.float()).sum() + (s * gs.float()).sum(), [xs, as_, ws])
    else:
        y = fused_ops.norm(xs, ws, None, 1e-5, rms=True)
        got = torch.autograd.grad((y * gy.float()).sum(), [xs, ws])
    close(y, y_ref, f"rms y res={res}", 1e-5)
    for i, (u, v) in enumerate(zip(got, ref)):
        close(u, v, f"rms res={res} grad {i}", 1e-5)

# SwiGLU on [gate | up], odd sizes (partial tiles in both directions).
T, H = 13, 300
h = torch.randn(T, 2 * H, dtype=torch.float64, requires_grad=True)
gate, up = h.chunk(2, -1)
o_ref = F.silu(gate) * up
do = torch.randn(T, H, dtype=torch.float64)
(dh_ref,) = torch.autograd.grad((o_ref * do).sum(), [h])
hs = h.detach().float().requires_grad_()
o = fused_ops.swiglu(hs)
close(o, o_ref, "swiglu", 1e-6)
(dh,) = torch.autograd.grad((o * do.float()).sum(), [hs])
close(dh, dh_ref, "swiglu grad", 1e-6)

# RoPE of q and k read in place from (T, 3, H, Dh) qkv, against layers.apply_rope in float64: odd T,
# DINOv3's head dim and twice-tiled angles, prefix and trailing rows with cos=1, sin=0 (kept exactly),
# and a table with unequal halves and a head dim whose half is no power of two (masked columns).
from packvit.layers import apply_rope

for T, H, Dh, tiled in [(37, 4, 64, True), (13, 16, 64, True), (9, 3, 12, False)]:
    qkv = torch.randn(T, 3, H, Dh, dtype=torch.float64, requires_grad=True)
    if tiled:
        ang = torch.rand(T, Dh // 2, dtype=torch.float64) * 6.3
        cos, sin = ang.cos().repeat(1, 2), ang.sin().repeat(1, 2)
    else:
        cos, sin = (torch.rand(T, Dh, dtype=torch.float64) * 6.3).cos(), (torch.rand(T, Dh, dtype=torch.float64) * 6.3).sin()
    cos[:3], sin[:3] = 1.0, 0.0
    cos[-1], sin[-1] = 1.0, 0.0
    q, k, v = qkv.unbind(1)
    qr, kr = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    gq, gk = torch.randn_like(qr), torch.randn_like(kr)
    (dref,) = torch.autograd.grad((qr * gq).sum() + (kr * gk).sum() + v.sum(), [qkv])
    x = qkv.detach().float().requires_grad_()
    q32, k32, v32 = x.unbind(1)
    qo, ko = fused_ops.rope_qk(q32, k32, cos.float(), sin.float())
    assert qo.shape == ko.shape == (T, H, Dh) and qo.is_contiguous() and ko.is_contiguous()
    close(qo, qr, f"rope q T={T} H={H} Dh={Dh}", 1e-6); close(ko, kr, f"rope k T={T} H={H} Dh={Dh}", 1e-6)
    assert torch.equal(qo[:3], q32[:3]) and torch.equal(ko[-1], k32[-1]), "cos=1, sin=0 rows must pass unchanged"
    (d,) = torch.autograd.grad((qo * gq.float()).sum() + (ko * gk.float()).sum() + v32.sum(), [x])
    close(d, dref, f"rope dqkv T={T} H={H} Dh={Dh}", 1e-6)
    (dk_only,) = torch.autograd.grad(fused_ops.rope_qk(q32, k32, cos.float(), sin.float())[1].sum(), [x])  # dq is None
    close(dk_only, torch.autograd.grad(apply_rope(k, cos, sin).sum(), [qkv])[0], "rope grad through k alone", 1e-6)
try:
    fused_ops.rope_qk(q32, k32, cos.float().requires_grad_(), sin.float())
    raise AssertionError("rope_qk accepted a cos that requires grad")
except ValueError:
    pass

# Whole models on their fused route (LayerScale folded, addcmul, SwiGLU, RMSNorm, checkpointed MLP),
# forced on CPU fp32 tensors, against the reference route: the wiring, not the precision.
import copy
from packvit.layers import GatedMlp, RMSNorm
from packvit.models.aimv2 import AIMv2, AIMv2Config
from packvit.models.dinov3 import DINOv3, DINOv3Config
from packvit.models.siglip2 import Siglip2, Siglip2Config

fused_ops.runs_fused = lambda *t: True
grid = torch.tensor([[1, 3, 5], [1, 4, 4], [2, 2, 3]])
for ref in (DINOv3(DINOv3Config(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96, num_register_tokens=1)),
            Siglip2(Siglip2Config(hidden_size=48, num_layers=2, num_heads=4, intermediate_size=80, use_head=False)),
            AIMv2(AIMv2Config(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96))):
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    fused = copy.deepcopy(ref)
    for mod in fused.modules():
        if isinstance(mod, (RMSNorm, GatedMlp)):
            mod.fused = "triton"
    for b in fused.blocks:
        b.fused_add_norm = "triton"
        b.attn.fused_rope = "triton" if ref.uses_rope else None
    px = torch.randn(int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum()), ref.patch_dim)
    # Chained norms (packvit.chained: each norm1 in the previous block's last kernel) on and off.
    for ckpt, chain in ((False, True), ("mlp", True), (False, False)):
        fused.chain_norms = chain
        from packvit import chained
        assert chained.chains(fused, torch.randn(3, ref.hidden_size), ckpt) == chain
        outs = []
        for m in (ref, fused):
            m.train().zero_grad()
            m.gradient_checkpointing = ckpt
            y = m(px, grid)
            y.square().mean().backward()
            # (a key bias's gradient is zero up to rounding: softmax ignores it)
            outs.append((y, [p.grad.clone() for n, p in m.named_parameters() if p.grad is not None and "k_bias" not in n]))
        close(outs[1][0], outs[0][0], f"{type(ref).__name__} output", 1e-5)
        assert len(outs[0][1]) == len(outs[1][1])
        for i, (u, v) in enumerate(zip(outs[1][1], outs[0][1])):
            close(u, v, f"{type(ref).__name__} grad {i} ckpt={ckpt} chain={chain}", 1e-4)
print("ok")
"""


@pytest.mark.slow
def test_triton_kernels_under_the_interpreter():
    pytest.importorskip("triton")
    run_interpreted(_INTERPRETED)


_ROPE_COMPILED = """
import torch
from packvit import fused_ops, triton_kernels as K
from packvit.layers import apply_rope

# The ops are registered for CUDA only; here they get the same kernels on the CPU (interpreted), so
# that the custom op, its fake and its autograd formula are traced as on the GPU.
torch.library.register_kernel("packvit::rope_qk", "cpu", lambda q, k, c, s: K.rope_qk(q, k, c, s))
torch.library.register_kernel("packvit::rope_qk_backward", "cpu", lambda q, k, c, s: K.rope_qk(q, k, c, s, backward=True))

def loss(rope):
    def f(qkv, cos, sin, w):
        q, k, v = qkv.unbind(1)  # strided (T, H, Dh) views, as Attention.forward passes them
        q, k = rope(q, k, cos, sin)
        return ((q * w).square() + k * w).sum() + v.sum()
    return f

T, H, Dh = 11, 4, 64
qkv = torch.randn(T, 3, H, Dh, requires_grad=True)
ang = torch.rand(T, Dh // 2) * 6.3
cos, sin = ang.cos().repeat(1, 2), ang.sin().repeat(1, 2)
w = torch.randn(T, H, Dh)
compiled = torch.compile(loss(fused_ops.rope_qk), fullgraph=True, backend="aot_eager", dynamic=True)  # a graph break raises
(got,) = torch.autograd.grad(compiled(qkv, cos, sin, w), [qkv])
(ref,) = torch.autograd.grad(loss(lambda q, k, c, s: (apply_rope(q, c, s), apply_rope(k, c, s)))(qkv, cos, sin, w), [qkv])
assert (got - ref).abs().max() < 1e-5, (got - ref).abs().max()
torch.library.opcheck(fused_ops._rope_op, (qkv.detach()[:, 0], qkv.detach()[:, 1], cos, sin))
torch.library.opcheck(fused_ops._rope_bwd_op, (w, w.flip(0), cos, sin))
print("ok")
"""


@pytest.mark.slow
def test_rope_op_compiles_in_one_graph_under_the_interpreter():
    """The fused RoPE as a custom op (fake, autograd formula) under ``torch.compile(fullgraph=True)``."""
    pytest.importorskip("triton")
    run_interpreted(_ROPE_COMPILED)


def test_mlp_in_chunks():
    """Inference on the fused path runs the MLP over row chunks above 2 x ``mlp_chunk_tokens`` rows."""
    from packvit import layers

    mlp = layers.Mlp(16, 40, "gelu")
    calls = []
    mlp.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    mlp.tuning = layers.Tuning(mlp_chunk_tokens=8)
    h = torch.randn(21, 16)
    with torch.no_grad():
        ref = mlp(h)
        calls.clear()
        out = layers.mlp_in_chunks(mlp, h)
    assert calls == [8, 8, 5] and torch.allclose(out, ref, atol=1e-6)
    calls.clear()
    layers.mlp_in_chunks(mlp, h)  # autograd on: one call, whole
    assert calls == [21]


_COPY_HEADS = """
import torch
import torch.nn.functional as F
from packvit import triton_kernels as TK

torch.manual_seed(0)
for T, H in ((1, 1), (37, 16), (301, 3)):
    qkv = torch.randn(T, 3, H, 72).bfloat16()
    q, k, v = qkv.unbind(1)  # strided views, as attention's backward gets them
    out, dout = torch.randn(T, H, 72).bfloat16(), torch.randn(T, H, 72).bfloat16()
    padded = TK.copy_heads((q, k, v, out, dout), 96)  # five tensors: one launch
    for a, b in zip(padded, (q, k, v, out, dout)):
        assert a.is_contiguous() and torch.equal(a, F.pad(b, (0, 24))), (T, H)
    cut = TK.copy_heads(padded[:3], 72)
    for a, b in zip(cut, (q, k, v)):
        assert a.is_contiguous() and torch.equal(a, b), (T, H)
    seven = TK.copy_heads([q, k, v, out, dout, q, k], 80)  # more than one launch's worth
    assert all(torch.equal(a, F.pad(b, (0, 8))) for a, b in zip(seven, [q, k, v, out, dout, q, k]))
assert TK.copy_heads((torch.zeros(0, 4, 72),), 96)[0].shape == (0, 4, 96)
try:
    TK.copy_heads((torch.zeros(3, 4, 72), torch.zeros(3, 4, 64)), 96)
    raise AssertionError("copy_heads took tensors of two shapes")
except ValueError:
    pass
print("ok")
"""


@pytest.mark.slow
def test_head_padding_kernel_under_the_interpreter():
    """FA4's backward pads SigLIP2's head dim 72 to 96 and cuts the gradients back: the kernel that
    does it equals ``F.pad`` and the slice, on the strided q, k, v views of the qkv output."""
    pytest.importorskip("triton")
    run_interpreted(_COPY_HEADS)
