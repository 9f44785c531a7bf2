"""The attention entry point: backend choice, the exact reference path and its compile-time op."""

from __future__ import annotations

import pytest
import torch

from helpers import fake_fa4_on_cpu
from packvit import attention
from packvit.attention import _sdpa_op, available_backends, resolve_backend, varlen_attention


def dense_reference(q, k, v, lens):
    """Masked dense attention over the whole packed sequence (block-diagonal mask), in float64."""
    seg = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    mask = seg[:, None] == seg[None, :]  # (T, T)
    q, k, v = (t.double().transpose(0, 1) for t in (q, k, v))  # (H, T, Dh)
    s = (q @ k.transpose(1, 2)) * q.shape[-1] ** -0.5
    p = s.masked_fill(~mask, float("-inf")).softmax(-1)
    return (p @ v).transpose(0, 1)  # (T, H, Dh)


def packed_qkv(lens, heads=3, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    qkv = [torch.randn(T, heads, dim, generator=g) for _ in range(3)]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    return qkv, cu


@pytest.mark.parametrize("lens", [[5], [3, 7, 1, 7], [1, 1, 1], [16, 4, 16, 9]])
def test_sdpa_matches_dense_masked_attention(lens):
    (q, k, v), cu = packed_qkv(lens)
    out = varlen_attention(q, k, v, cu, cu, max(lens), max(lens), backend="sdpa")
    torch.testing.assert_close(out.double(), dense_reference(q, k, v, lens), atol=1e-6, rtol=0)
    # Host lengths (tuple or CPU tensor) give the same answer as reading cu_seqlens.
    for lens_host in (tuple(lens), torch.tensor(lens)):
        again = varlen_attention(
            q, k, v, cu, cu, max(lens), max(lens), backend="sdpa", seqlens_q=lens_host, seqlens_k=lens_host
        )
        assert torch.equal(again, out)


def test_compile_op_forward_and_gradient_match_eager():
    """The opaque op used under torch.compile has a hand-written backward: check it against autograd."""
    lens = [6, 2, 9, 6]
    (q, k, v), cu = packed_qkv(lens, seed=1)
    lens_t = torch.tensor(lens)
    leaves_e = [t.clone().requires_grad_() for t in (q, k, v)]
    leaves_o = [t.clone().requires_grad_() for t in (q, k, v)]
    out_e = varlen_attention(*leaves_e, cu, cu, 9, 9, backend="sdpa")
    out_o = _sdpa_op(*leaves_o, lens_t, lens_t, q.shape[-1] ** -0.5)
    torch.testing.assert_close(out_o, out_e, atol=1e-6, rtol=0)
    dout = torch.randn_like(out_e)
    out_e.backward(dout)
    out_o.backward(dout)
    for a, b in zip(leaves_o, leaves_e):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=0)


def test_compiled_attention_is_opaque_and_does_not_recompile_per_batch():
    torch._dynamo.reset()
    calls = []

    def attend(q, k, v, cu, lens, max_len):
        return varlen_attention(q, k, v, cu, cu, max_len, max_len, backend="sdpa", seqlens_q=lens, seqlens_k=lens)

    def counting_backend(gm, example_inputs):
        calls.append(gm)
        return gm.forward

    fn = torch.compile(attend, backend=counting_backend, dynamic=True, fullgraph=True)
    batches = ([4, 5], [3, 3, 8], [2, 9, 1, 4], [5, 5, 5], [7], [6], [1, 2])
    for i, lens in enumerate(batches):
        (q, k, v), cu = packed_qkv(lens, seed=i)
        out = fn(q, k, v, cu, torch.tensor(lens), max(lens))
        torch.testing.assert_close(out.double(), dense_reference(q, k, v, lens), atol=1e-6, rtol=0)
        if i == 3:
            assert len(calls) == 1, f"recompiled {len(calls) - 1} times across batches of different sizes"
    # Dynamo specialises dimensions of size 1, so a one-segment batch adds exactly one graph.
    assert len(calls) == 2


def test_backend_resolution():
    assert available_backends("cpu", torch.float32) == ["sdpa"]
    assert resolve_backend("auto", "cpu", torch.bfloat16) == "sdpa"
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        resolve_backend("flash", "cpu", torch.float32)
    for name in ("torch", "fa4", "flash_attn"):
        with pytest.raises(ValueError, match=f"attention backend '{name}' is not available on cpu"):
            resolve_backend(name, "cpu", torch.float32)


def _tiny_dinov3(**kw):
    from packvit import DINOv3, DINOv3Config

    cfg = DINOv3Config(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, num_register_tokens=1)
    return DINOv3(cfg, **kw)


def test_model_holds_one_attention_choice_and_shows_it():
    import dataclasses

    from packvit.layers import Attention

    m = _tiny_dinov3()
    assert isinstance(m.attention, attention.AttentionImpl)
    assert (m.attention.name, m.attention.request, m.attention.device_type) == ("sdpa", "auto", "cpu")
    assert m.attn_backend == "sdpa" and m.attn_backend_request == "auto"  # the earlier names, read from it
    assert "attention=AttentionImpl('sdpa', request='auto', for=cpu/float32)" in repr(m)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.attention.name = "torch"
    # Held once, by the model: no block or head keeps a copy of its own.
    assert not any(hasattr(a, "backend") for a in m.modules() if isinstance(a, Attention))
    with pytest.raises(ValueError, match="not available"):
        m.set_attention("torch")
    assert m.attn_backend == "sdpa"  # a failed switch leaves the model as it was
    # The module keeps no policy a caller would patch.
    for name in ("FA4_BACKWARD", "FA4_BACKWARD_MIN_MEAN_SEQLEN", "FA4_BACKWARD_HEAD_DIMS", "_RESOLVED"):
        assert not hasattr(attention, name), name


def test_backend_chosen_for_the_compute_dtype(monkeypatch):
    """fp32 weights computing in bf16 (autocast, FSDP2 mixed precision) get a kernel for bf16."""
    m = _tiny_dinov3()
    seen = []

    def fake_available(device, dtype):
        seen.append(dtype)
        return ["torch", "sdpa"] if dtype == torch.bfloat16 else ["sdpa"]

    def fake_kernel(*a, **k):
        return None

    monkeypatch.setattr(attention, "available_backends", fake_available)
    monkeypatch.setattr(attention, "_torch_varlen_func", lambda: fake_kernel)
    impl = m.set_attention("auto", torch.bfloat16)
    assert impl is m.attention and impl.name == "torch" and impl.fn is fake_kernel  # looked up once, held
    assert impl.compute_dtype == torch.bfloat16 and impl.dtype == torch.bfloat16
    assert m.set_attention_backend("auto") == "sdpa"  # the weights' dtype, fp32
    assert seen == [torch.bfloat16, torch.float32]


def test_moving_keeps_the_choice_and_the_forward_says_what_to_do(monkeypatch):
    """.to() keeps the held choice; the forward raises if it cannot run where the input is, or if an
    "auto" choice would now pick another kernel; set_attention (or refresh_attention) chooses again."""
    m = _tiny_dinov3().eval()
    held = m.attention
    x = torch.randn(2 * 3 * 4, m.patch_dim)
    grid = [[2, 3, 4]]
    m.to(torch.float64)
    assert m.attention is held  # no re-choice on a move
    assert m(x.double(), grid).dtype == torch.float64  # "auto" still chooses sdpa on the CPU: runs

    # An "auto" choice that would pick another kernel after the move: a clear error, no silent switch.
    monkeypatch.setattr(
        attention, "available_backends", lambda d, t: ["torch", "sdpa"] if t == torch.bfloat16 else ["sdpa"]
    )
    monkeypatch.setattr(attention, "_torch_varlen_func", lambda: lambda *a, **k: None)
    m.to(torch.bfloat16)
    assert m.attention is held
    with pytest.raises(ValueError, match=r"call model.set_attention\('auto'\) after .to\(\)"):
        m(x.bfloat16(), grid)
    assert m.refresh_attention().name == "torch" and m.attention.dtype == torch.bfloat16
    assert m.refresh_attention() is m.attention  # already current: kept

    # A kernel that cannot run where the model now is.
    fa = attention.AttentionImpl("torch", "torch", "cuda", torch.bfloat16)
    with pytest.raises(ValueError, match="was chosen for cuda bfloat16 and cannot run on cpu float32"):
        fa.check("cpu", torch.float32)

    # An explicit sdpa runs anywhere: moving it is never an error.
    s = _tiny_dinov3(attn_backend="sdpa").eval().to(torch.bfloat16)
    assert s.attention.dtype == torch.float32 and s(x.bfloat16(), grid).dtype == torch.bfloat16


def test_an_attention_impl_can_be_passed_whole():
    impl = attention.resolve_attention("sdpa", "cpu", torch.float32, fa4_backward=attention.FA4Backward("fa2"))
    m = _tiny_dinov3(attn_backend=impl)
    assert m.attention == impl and m.attention.fa4_backward.kernel == "fa2"
    assert m.set_attention("auto").fa4_backward.kernel == "fa2"  # a re-choice keeps the held rule
    with pytest.raises(TypeError, match="only with a backend name"):
        m.set_attention(impl, torch.bfloat16)
    # varlen_attention takes the value or a name, to the same result.
    (q, k, v), cu = packed_qkv([3, 5])
    assert torch.equal(
        varlen_attention(q, k, v, cu, cu, 5, 5, backend=impl), varlen_attention(q, k, v, cu, cu, 5, 5, backend="sdpa")
    )


def test_load_chooses_the_backend_once(monkeypatch, tmp_path):
    """Loading probes the kernels once, for the device and dtype the model ends on."""
    from weights_conversion import load_model
    from weights_conversion.native import write_native

    m = _tiny_dinov3()
    write_native(tmp_path, "dinov3", m.config, m.state_dict(), max_shard_bytes=1 << 30)
    calls = []
    real = attention.available_backends
    monkeypatch.setattr(attention, "available_backends", lambda d, t: calls.append((str(d), t)) or real(d, t))
    loaded = load_model(tmp_path, dtype=torch.bfloat16)
    assert calls == [("cpu", torch.bfloat16)] and loaded.attention.dtype == torch.bfloat16


def test_fa4_backward_rule_is_a_value():
    # "auto": PyTorch's FA2 backward for batches of short frames, FA4's for longer ones (ab_kernels.py).
    rule = attention.FA4Backward()
    assert rule.kernel_for(num_tokens=17_120, num_segments=32) == "fa2"  # video, 535 on average
    assert rule.kernel_for(num_tokens=23_103, num_segments=32) == "fa4"  # mixed32, 722
    assert attention.FA4Backward("fa4").kernel_for(num_tokens=100, num_segments=10) == "fa4"
    assert attention.FA4Backward(min_mean_seqlen=5).kernel_for(num_tokens=100, num_segments=10) == "fa4"
    assert [rule.padded_head_dim(d) for d in (64, 72, 80, 128, 256)] == [64, 96, 96, 128, 256]
    assert attention.FA4Backward(head_dims=(72,)).padded_head_dim(72) == 72  # what gpu_checks' "unpadded" runs
    with pytest.raises(ValueError, match="kernel must be one of"):  # a typo must not fall back silently
        attention.FA4Backward("flash")
    with pytest.raises(ValueError, match="min_mean_seqlen"):
        attention.FA4Backward(min_mean_seqlen=-1)


def test_fa4_ops_take_the_rule_as_arguments_and_probe_what_runs(monkeypatch):
    """The custom ops read no module state: the backward rule is in their schemas. The availability
    probe imports the very (private) FA4 functions the ops call."""
    fwd = str(attention._fa4_fwd_op._opoverload._schema)
    bwd = str(attention._fa4_bwd_op._opoverload._schema)
    for schema in (fwd, bwd):
        assert "str bwd_kernel, SymInt bwd_min_mean_seqlen, SymInt[] bwd_head_dims" in schema
    asked = []
    monkeypatch.setattr(attention, "_import_attr", lambda mod, attr: asked.append((mod, attr)) or (lambda: None))
    attention._fa4_funcs.cache_clear()
    try:
        assert attention._fa4_funcs() is not None
    finally:
        attention._fa4_funcs.cache_clear()
    assert asked == [("flash_attn.cute.interface", "_flash_attn_fwd"), ("flash_attn.cute.interface", "_flash_attn_bwd")]


def test_fa4_backward_follows_the_rule_it_was_given(monkeypatch):
    """The ``fa4`` backend's rule reaches its backward op through the op's arguments. On the CPU, with
    the reference path standing in for FA4's kernels (and for PyTorch's FA2 backward), the backward
    picks FA4's or FA2's kernel and pads the head dim as each AttentionImpl says."""
    seen = fake_fa4_on_cpu(monkeypatch)

    lens = [5, 3, 8]
    (q, k, v), cu = packed_qkv(lens, heads=2, dim=72)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    varlen_attention(*ref_leaves, cu, cu, 8, 8, backend="sdpa").square().sum().backward()
    cases = [  # (rule, the kernel and head dim its backward runs at)
        (attention.FA4Backward("fa4"), ("fa4", 96)),  # 72 padded to the next head dim that is right
        (attention.FA4Backward("fa4", head_dims=(72,)), ("fa4", 72)),  # gpu_checks' "unpadded" variant
        (attention.FA4Backward("fa2"), ("fa2", 72)),
        (attention.FA4Backward("auto"), ("fa2", 72)),  # 16 tokens a segment: short, FA2's
        (attention.FA4Backward("auto", min_mean_seqlen=5), ("fa4", 96)),
    ]
    for rule, expected in cases:
        impl = attention.AttentionImpl("fa4", "fa4", "cpu", torch.float32, fa4_backward=rule)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = varlen_attention(*leaves, cu, cu, 8, 8, backend=impl)
        out.square().sum().backward()
        assert seen.pop() == expected and not seen, rule
        for a, b in zip(leaves, ref_leaves):  # padding is exact
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=0)


def test_fa4_eager_route_skips_the_ops_and_equals_them(monkeypatch):
    """Eager ``fa4`` calls reach FA4's functions without the custom ops' dispatch (host time), with
    autograd when an input needs it; outputs and gradients equal the ops' route, which is what
    ``torch.compile`` traces."""
    fake_fa4_on_cpu(monkeypatch)
    lens = [5, 3, 8]
    (q, k, v), cu = packed_qkv(lens, heads=2, dim=64)
    impl = attention.AttentionImpl("fa4", "fa4", "cpu", torch.float32, fa4_backward=attention.FA4Backward("fa4"))
    rule = impl.fa4_backward

    def via_ops(q, k, v):
        out, _ = attention._fa4_fwd_op(q, k, v, cu, cu, 8, 8, 64**-0.5, rule.kernel, rule.min_mean_seqlen, [64, 96])
        return out

    op_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    via_ops(*op_leaves).square().sum().backward()
    with torch.no_grad():
        ref_out = via_ops(q, k, v)

    def refuse(*args, **kwargs):
        raise AssertionError("the eager route went through a custom op")

    monkeypatch.setattr(attention, "_fa4_fwd_op", refuse)
    monkeypatch.setattr(attention, "_fa4_bwd_op", refuse)
    with torch.no_grad():
        assert torch.equal(varlen_attention(q, k, v, cu, cu, 8, 8, backend=impl), ref_out)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = varlen_attention(*leaves, cu, cu, 8, 8, backend=impl)
    assert torch.equal(out, ref_out) and out.grad_fn is not None
    out.square().sum().backward()
    for a, b in zip(leaves, op_leaves):
        assert torch.equal(a.grad, b.grad)
