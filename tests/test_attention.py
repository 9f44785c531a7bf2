"""The attention entry point: backend choice, the exact reference path and its compile-time op."""

from __future__ import annotations

import pytest
import torch

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
        again = varlen_attention(q, k, v, cu, cu, max(lens), max(lens), backend="sdpa", seqlens_q=lens_host, seqlens_k=lens_host)
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


def test_model_backend_is_chosen_once_and_reported():
    from packvit import DINOv3, DINOv3Config

    cfg = DINOv3Config(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    m = DINOv3(cfg)
    assert m.attn_backend == "sdpa" and all(b.attn.backend == "sdpa" for b in m.blocks)
    with pytest.raises(ValueError, match="not available"):
        m.set_attention_backend("torch")
    assert m.attn_backend == "sdpa"  # a failed switch leaves the model as it was


def test_backend_chosen_for_the_compute_dtype(monkeypatch):
    """fp32 weights computing in bf16 (autocast, FSDP2 mixed precision) get a kernel for bf16."""
    from packvit import DINOv3, DINOv3Config
    from packvit import attention

    cfg = DINOv3Config(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    m = DINOv3(cfg)
    seen = []

    def fake_available(device, dtype):
        seen.append(dtype)
        return ["torch", "sdpa"] if dtype == torch.bfloat16 else ["sdpa"]

    monkeypatch.setattr(attention, "available_backends", fake_available)
    monkeypatch.setattr(attention, "_torch_varlen_func", lambda: (lambda *a, **k: None))
    monkeypatch.setattr(attention, "_RESOLVED", {})  # keep the fake kernel out of the real table
    assert m.set_attention_backend("auto", torch.bfloat16) == "torch" and m.blocks[0].attn.backend == "torch"
    assert m.set_attention_backend("auto") == "sdpa"  # the weights' dtype, fp32
    assert seen == [torch.bfloat16, torch.float32]


def test_fa4_backward_kernel_choice(monkeypatch):
    # "auto": PyTorch's FA2 backward for batches of short frames, FA4's for longer ones (ab_kernels.py).
    assert attention._fa4_backward_kernel(num_tokens=17_120, num_segments=32) == "fa2"  # video, 535 on average
    assert attention._fa4_backward_kernel(num_tokens=23_103, num_segments=32) == "fa4"  # mixed32, 722
    monkeypatch.setattr(attention, "FA4_BACKWARD", "fa4")
    assert attention._fa4_backward_kernel(num_tokens=100, num_segments=10) == "fa4"
    monkeypatch.setattr(attention, "FA4_BACKWARD", "flash")  # a typo must not fall back silently
    with pytest.raises(ValueError, match="FA4_BACKWARD must be"):
        attention._fa4_backward_kernel(num_tokens=100, num_segments=10)
