"""The benchmark suite: ``packvit bench`` / ``python -m packvit.bench``.

    python -m packvit.bench --model all --workload mixed32 fixed32_448 highres video --out results.jsonl
    python -m packvit.bench render results.jsonl --table table.md --plot plot.png
    python -m packvit.bench --tiny --device cpu            # CPU smoke test, seconds

Every packvit variant is checked against HF on the same weights before it is timed (per-patch
cosine >= --min-cos, and in float32 also max abs diff <= 1e-4); a variant that disagrees is reported
as refused, without a speed, and the command exits 1.
"""

from __future__ import annotations

import argparse
import sys

from weights_conversion import FAMILIES

from .workloads import WORKLOADS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="packvit bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", nargs="+", default=["all"], choices=("all", *FAMILIES))
    p.add_argument("--workload", nargs="+", default=["mixed32", "fixed32_448"], choices=sorted(WORKLOADS))
    p.add_argument(
        "--backend",
        nargs="+",
        default=["available"],
        help="packvit attention backends (fa4 flash_attn torch sdpa), or 'available' (default: every fused one)",
    )
    p.add_argument("--mode", nargs="+", default=["infer", "train"], choices=("infer", "train"))
    p.add_argument("--compile", nargs="+", default=["eager", "compile"], choices=("eager", "compile"))
    p.add_argument("--impl", nargs="+", default=["packvit", "hf"], choices=("packvit", "hf"))
    p.add_argument(
        "--checkpointing",
        action="store_true",
        help="also time training with activation checkpointing: of the MLPs only, and of whole blocks",
    )
    p.add_argument("--no-bound", action="store_true", help="skip timing the matmul + attention bound")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument(
        "--min-cos", type=float, default=0.999, help="per-patch cosine vs HF below which a variant is refused"
    )
    p.add_argument("--tiny", action="store_true", help="tiny random models and the 'tiny' workload: a smoke test")
    p.add_argument("--out", help="append JSON lines here")
    return p


def _render(argv: list[str]) -> int:
    from . import report

    p = argparse.ArgumentParser(prog="packvit bench render", description="JSON lines -> markdown table and PNG plot")
    p.add_argument("jsonl")
    p.add_argument("--table", help="write the markdown table here (default: stdout)")
    p.add_argument("--plot", help="write a PNG plot here (needs matplotlib)")
    a = p.parse_args(argv)
    rows = report.load(a.jsonl)
    md = report.markdown(rows)
    if a.table:
        open(a.table, "w").write(md)
    else:
        print(md)
    if a.plot:
        report.plot(rows, a.plot)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["render"]:
        return _render(argv[1:])
    a = _parser().parse_args(argv)
    from .runner import Options, run

    if a.tiny:
        a.workload = ["tiny"] if a.workload == ["mixed32", "fixed32_448"] else a.workload
    opt = Options(
        models=list(FAMILIES) if "all" in a.model else a.model,
        workloads=a.workload,
        backends=a.backend,
        modes=a.mode,
        compile=a.compile,
        impls=a.impl,
        device=a.device,
        dtype=a.dtype,
        warmup=a.warmup,
        iters=a.iters,
        tiny=a.tiny,
        bound=not a.no_bound,
        checkpointing=a.checkpointing,
        min_cos=a.min_cos,
        out=a.out,
    )
    rows = run(opt)
    from .report import markdown

    print(markdown(rows))
    return 1 if any("error" in r for r in rows) else 0
