"""Does quack-kernels' ``gemm_act`` (the MLP activation in fc1's epilogue) run here, and is it faster
than cuBLAS + the activation pass? One JSON line per case; run on the GPU machine with the fa4
bundle on the path (imported from the unpacked bundle it failed with ``TypeError: epilogue fn depends on <ContextVar name='_LOC_TRANSFORMS'>``
with quack 0.6.5 and nvidia-cutlass-dsl 4.8.1).

quack fingerprints an epilogue function by its source and the globals it reaches, and treats code
under a ``site-packages`` or ``dist-packages`` folder as pinned by its installed version (by name
only, ``quack/gemm_runtime/identity.py``). The bundle unpacked to /tmp/fa4 is not under such a
folder, so the fingerprint walks into the CUTLASS DSL's own module globals and stops at a
ContextVar. This probe is run with the bundle's path as given (``--label``), once as /tmp/fa4 and
once through a ``site-packages`` symlink, to tell a version problem from a path problem.

Shapes at the suite's mixed32 (23,103 tokens): DINOv3-L fc1 1024 -> 4096 + bias + erf-GELU;
SigLIP2 fc1 1152 -> 4304 + bias + gelu-tanh, and its backward through fc2 (``gemm_dact``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import traceback

import torch
import torch.nn.functional as F

DEV, BF16, T = "cuda", torch.bfloat16, 23103


def ms(fn, n=30):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        ts.append((a, b))
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ts)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _cublas_steps(x, w, b, ref_act, act) -> dict:
    """The timed cuBLAS ops of fc1: the GEMM + bias, then the activation pass; the cuBLASLt GELU epilogue for tanh."""
    steps = {"cublas_gemm_ms": lambda: F.linear(x, w, b), "cublas_gemm_act_ms": lambda: ref_act(F.linear(x, w, b))}
    if act == "gelu_tanh_approx":
        steps["cublaslt_epilogue_ms"] = lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True)
    return steps


def _quack_act_steps(gemm_act, x, w, b, act, tuned) -> dict:
    """The timed quack ``gemm_act`` calls of fc1: without and with the pre-activation stored."""
    return {
        f"quack_gemm_act_ms_tuned{tuned}": lambda: gemm_act(
            x, w.T, bias=b, activation=act, store_preact=False, tuned=tuned
        ),
        f"quack_gemm_act_preact_ms_tuned{tuned}": lambda: gemm_act(
            x, w.T, bias=b, activation=act, store_preact=True, tuned=tuned
        ),
    }


def _dact_steps(gemm_dact, pre, dout, w2, ref_act, act):
    """The backward of h = act(pre) through fc2 (weight w2): torch's autograd, and quack's ``gemm_dact``."""

    def torch_bwd():
        pre_ = pre.detach().requires_grad_(True)
        h = ref_act(pre_)
        dh = dout @ w2
        return torch.autograd.grad(h, pre_, dh)[0]

    def quack_bwd():
        return gemm_dact(dout, w2, pre, activation=act, tuned=False)

    return torch_bwd, quack_bwd


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--label", default="")
    args = p.parse_args()
    out = dict(label=args.label)
    try:
        import cutlass
        import quack

        out.update(
            quack=getattr(quack, "__version__", "?"),
            cutlass=getattr(cutlass, "__version__", "?"),
            quack_file=quack.__file__,
        )
        from quack.gemm_interface import gemm_act, gemm_dact
    except Exception as e:
        out.update(ok=False, error=f"import: {e!r}"[:800])
        print(json.dumps(out), flush=True)
        return
    print(json.dumps(out), flush=True)
    torch.manual_seed(0)
    cases = [
        ("dinov3 fc1 erf-GELU", 1024, 4096, "gelu_erf", F.gelu),
        ("siglip2 fc1 gelu-tanh", 1152, 4304, "gelu_tanh_approx", lambda t: F.gelu(t, approximate="tanh")),
    ]
    for name, D, H, act, ref_act in cases:
        row = dict(label=args.label, case=name, T=T)
        x = torch.randn(T, D, device=DEV, dtype=BF16)
        w = (torch.randn(H, D, device=DEV) * D**-0.5).to(BF16)
        b = (torch.randn(H, device=DEV) * 0.1).to(BF16)
        ref32 = ref_act(F.linear(x.float(), w.float(), b.float()))
        eager = ref_act(F.linear(x, w, b))
        row["eager_rel_err"] = rel(eager, ref32)
        for key, fn in _cublas_steps(x, w, b, ref_act, act).items():
            row[key] = ms(fn)
        for tuned in (False,):
            try:
                pre, post = gemm_act(x, w.T, bias=b, activation=act, store_preact=False, tuned=tuned)
                torch.cuda.synchronize()
                row[f"quack_rel_err_tuned{tuned}"] = rel(post, ref32)
                for key, fn in _quack_act_steps(gemm_act, x, w, b, act, tuned).items():
                    row[key] = ms(fn)
                row["ok"] = True
            except Exception as e:
                row.update(ok=False, error=repr(e)[:1500], tb=traceback.format_exc()[-2500:])
                print(json.dumps(row), flush=True)
                break
        if row.get("ok"):
            # Backward of h = act(pre): dpre = (dout @ W2) * act'(pre), with fc2's weight W2 (D, H).
            try:
                pre = F.linear(x, w, b)
                w2 = (torch.randn(D, H, device=DEV) * H**-0.5).to(BF16)
                dout = torch.randn(T, D, device=DEV, dtype=BF16)
                torch_bwd, quack_bwd = _dact_steps(gemm_dact, pre, dout, w2, ref_act, act)
                dref = torch_bwd()
                dq = quack_bwd()
                dq = dq[0] if isinstance(dq, tuple) else dq
                row["dact_rel_err_vs_torch_bf16"] = rel(dq, dref)
                row["torch_dgemm_dact_ms"] = ms(torch_bwd)
                row["quack_gemm_dact_ms"] = ms(quack_bwd)
            except Exception as e:
                row.update(dact_error=repr(e)[:800], dact_tb=traceback.format_exc()[-1500:])
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
