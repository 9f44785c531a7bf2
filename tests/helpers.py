"""What the tests share: inputs, the transformers reference run frame by frame, subprocess runners.

A plain module (``from helpers import ...``), not conftest: pytest owns conftest and may import it
under another name. Nothing here imports transformers at import time, so the tests of the core
(packing, attention, positions) run without it; a helper that needs it skips the calling test when
it is missing. The tiny transformers models and the frame-by-frame run live in
``weights_conversion.reference``, where the demo and the benchmarks use them too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from weights_conversion import FAMILIES as _REGISTRY
from weights_conversion import reference

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = tuple(_REGISTRY)  # every registered family: parametrize over it
PATCH = {name: fam.patch_size for name, fam in _REGISTRY.items()}


def _transformers():
    return pytest.importorskip("transformers")


def tiny_hf_config(family: str, **fields):
    """``weights_conversion.reference.tiny_hf_config``; skips the test without transformers."""
    _transformers()
    return reference.tiny_hf_config(family, **fields)


def tiny_hf_model(family: str, seed: int = 0, **fields):
    """A randomised transformers vision model in fp32 eval mode, with eager attention (the reference
    math); skips the test without transformers."""
    _transformers()
    return reference.tiny_hf_model(family, seed, **fields)


randomize_ = reference.randomize_


def random_images(grid, patch: int, seed: int = 0, channels: int = 3):
    """One (C, H, W) image or (t, C, H, W) video per (t, h, w) row, random pixels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t, h, w in grid:
        x = torch.randn(t, channels, h * patch, w * patch, generator=g)
        out.append(x if t > 1 else x[0])
    return out


def hf_reference(family: str, hf_model, images, output_hidden_states: bool = False):
    """Run the HF model frame by frame. Returns a list over frames of (patch tokens, prefix, pooled,
    hidden_states); hidden_states are transformers' own, (1, P + h*w, D) per layer."""
    frames = []
    for img in images:
        frames.extend(img.unbind(0) if img.dim() == 4 else [img])
    outs = []
    with torch.no_grad():
        for f in frames:
            o = reference.run_twin(family, hf_model, [f], output_hidden_states=output_hidden_states)
            outs.append((o.patch_tokens[0], o.prefix_tokens[0], o.pooler_output, o.hidden_states))
    return outs


def run_python(args, timeout: int = 240) -> str:
    """Run ``python ARGS`` from the repository root (packvit and benchmarks/ importable, one thread,
    offline); fail with the tail of its output. Returns stdout."""
    env = dict(
        os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'benchmarks'}", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"
    )
    r = subprocess.run(
        [sys.executable, *map(str, args)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert r.returncode == 0, f"{list(map(str, args))[:3]} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r.stdout


def run_interpreted(script: str, timeout: int = 300) -> None:
    """Run the Python source ``script`` in a fresh process with Triton's interpreter on
    (``TRITON_INTERPRET=1``: the kernels run on the CPU), packvit importable; it must print "ok"."""
    env = dict(
        os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    r = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


def torchrun(script, *args, nproc: int = 2, timeout: int = 240) -> str:
    """Run ``script`` under torchrun with ``nproc`` CPU processes. ``--standalone`` lets torchrun
    bind its own free port: choosing one here and handing it over left a window in which another
    process (a parallel test run) could take it, and the workers then aborted."""
    return run_python(
        ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args], timeout=timeout
    )


def assert_hf_export_exact(hf_model, src_dir, export_dir) -> None:
    """An HF-layout export holds the source checkpoint's tensors bit for bit, and transformers
    reloads it to the same state dict."""
    from safetensors.torch import load_file

    original, exported = (
        load_file(Path(src_dir) / "model.safetensors"),
        load_file(Path(export_dir) / "model.safetensors"),
    )
    assert set(exported) == set(original)
    for k, v in original.items():
        assert exported[k].dtype == v.dtype and torch.equal(exported[k], v), k
    reloaded = type(hf_model).from_pretrained(export_dir, attn_implementation="eager").eval()
    for (k1, v1), (k2, v2) in zip(sorted(hf_model.state_dict().items()), sorted(reloaded.state_dict().items())):
        assert k1 == k2 and torch.equal(v1, v2), k1


def torch_kernel_for_bf16_on_cpu(monkeypatch):
    """Make ``auto`` choose the ``torch`` backend for bf16 and ``sdpa`` for fp32 on this machine,
    with the exact reference standing in for PyTorch's varlen kernel: a move between dtypes then
    changes what ``auto`` would choose, as a CUDA move does on the GPU."""
    from packvit import attention

    def sdpa_as_torch(q, k, v, cu_q, cu_k, max_q, max_k, scale=None):
        return attention.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, backend="sdpa", softmax_scale=scale)

    def bf16_wins(dev, t):
        return ["torch", "sdpa"] if t == torch.bfloat16 else ["sdpa"]

    monkeypatch.setattr(attention, "available_backends", bf16_wins)
    monkeypatch.setattr(attention, "_torch_varlen_func", lambda: sdpa_as_torch)


def fake_fa4_on_cpu(monkeypatch, seen: list | None = None):
    """Run the ``fa4`` backend's custom ops on the CPU, with the exact reference standing in for
    FA4's kernels (and for PyTorch's FA2 backward). Like FA4, the stand-ins read the segments from
    ``cu_seqlens`` (a tensor), not from host lengths, so code that rewrites cu_seqlens in place
    (CUDA graphs) is exercised as on the GPU. ``seen`` gets (kernel, head dim) per backward."""
    from packvit import attention

    seen = [] if seen is None else seen

    def fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, return_lse):
        lens_q, lens_k = torch.diff(cu_seqlens_q).tolist(), torch.diff(cu_seqlens_k).tolist()
        out = attention._sdpa_segments(q, k, v, lens_q, lens_k, softmax_scale)
        return out, q.new_zeros(q.shape[1], q.shape[0], dtype=torch.float32)

    def bwd(q, k, v, out, dout, lse, scale, causal, dropout, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        seen.append(("fa4", q.shape[-1]))
        return attention._sdpa_backward_op(dout, q, k, v, torch.diff(cu_seqlens_q), torch.diff(cu_seqlens_k), scale)

    def fa2(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale):
        seen.append(("fa2", q.shape[-1]))
        return attention._sdpa_backward_op(dout, q, k, v, torch.diff(cu_q), torch.diff(cu_k), scale)

    monkeypatch.setattr(attention, "_fa4_funcs", lambda: (fwd, bwd))
    monkeypatch.setattr(attention, "_fa2_backward", fa2)
    for op in (attention._fa4_fwd_op, attention._fa4_bwd_op):  # CUDA-only ops, given a CPU kernel
        if "cpu" not in op._backend_fns:
            op.register_kernel("cpu", op._init_fn)
    return seen
