"""JSON lines -> a markdown table and a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path


def load(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _label(r: dict) -> str:
    if r["impl"] == "hf":
        return f"HF ({r['how']})"
    if r["impl"] == "bound":
        return f"bound ({r['backend']})"
    tag = " compiled" if r.get("compiled") else ""
    ckpt = r.get("checkpointing")
    tag += f" +ckpt {ckpt}" if isinstance(ckpt, str) else (" +ckpt block" if ckpt else "")
    return f"packvit {r['backend']}{tag}"


def _gib(r: dict) -> str:
    return "" if r.get("peak_gib") is None else f"{r['peak_gib']:.2f}"


def markdown(rows: list[dict]) -> str:
    head = (
        "| model | workload | mode | implementation | ms (p10-p90) | vs HF | x bound | images/s | tokens/s | "
        "TFLOP/s | MFU 798 / 989 | peak GiB |"
    )
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    hf_ms = {(r["model"], r["workload"], r["mode"]): r["ms"] for r in rows if r["impl"] == "hf" and "ms" in r}
    for r in rows:
        if "error" in r:
            out.append(
                f"| {r['model']} | {r['workload']} | | {_label({**r, 'mode': ''})} | **refused: {r['error']}** |"
                + " |" * 7
            )
            continue
        key = (r["model"], r["workload"], r["mode"])
        speedup = f"{hf_ms[key] / r['ms']:.1f}x" if key in hf_ms and r["impl"] != "hf" else ""
        if r["impl"] == "bound":
            out.append(
                f"| {r['model']} | {r['workload']} | {r['mode']} | {_label(r)} | {r['ms']:.1f} | {speedup} | "
                f"1.00 | | | {r['tflops']:.0f} | | |"
            )
            continue
        xb = f"{r['x_bound']:.2f}" if r.get("x_bound") else ""
        out.append(
            f"| {r['model']} | {r['workload']} | {r['mode']} | {_label(r)} | {r['ms']:.1f} ({r['p10']:.1f}-{r['p90']:.1f}) "
            f"| {speedup} | {xb} | {r['images_per_s']:.0f} | {r['tokens_per_s'] / 1e3:.0f}k | {r['tflops']:.0f} | "
            f"{100 * r['mfu']:.0f}% / {100 * r['mfu_spec']:.0f}% | {_gib(r)} |"
        )
    return "\n".join(out) + "\n"


def _best(rows: list[dict]) -> dict | None:
    return min(rows, key=lambda r: r["ms"]) if rows else None


def plot(rows: list[dict], path: str | Path) -> None:
    """One panel per (model, mode): per workload, HF and each backend's fastest packvit variant
    (eager or compiled, no checkpointing) in tokens/s, the speed-up over HF on top, and that
    backend's bound as a black tick (the most a model without fused matmuls could reach)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if "ms" in r]
    groups = list(dict.fromkeys((r["model"], r["mode"]) for r in timed))
    backends = list(dict.fromkeys(r["backend"] for r in timed if r["impl"] == "packvit"))
    series = ["HF"] + [f"packvit {b}" for b in backends]
    palette = plt.get_cmap("tab10").colors
    colours = {"HF": "0.6", **{f"packvit {b}": palette[(3, 0, 2, 4)[i % 4]] for i, b in enumerate(backends)}}
    fig, axes = plt.subplots(len(groups), 1, figsize=(11, 2.7 * len(groups)), squeeze=False)
    width = 0.8 / len(series)
    for ax, (model, mode) in zip(axes[:, 0], groups):
        rs = [r for r in timed if r["model"] == model and r["mode"] == mode]
        workloads = list(dict.fromkeys(r["workload"] for r in rs))
        for i, w in enumerate(workloads):
            at = [r for r in rs if r["workload"] == w]
            hf = _best([r for r in at if r["impl"] == "hf"])
            for j, name in enumerate(series):
                x = i + (j - (len(series) - 1) / 2) * width
                if name == "HF":
                    best = hf
                else:
                    b = name.split()[1]
                    best = _best(
                        [r for r in at if r["impl"] == "packvit" and r["backend"] == b and not r.get("checkpointing")]
                    )
                    bound = _best([r for r in at if r["impl"] == "bound" and r["backend"] == b])
                    if bound:
                        ax.hlines(bound["tokens"] / bound["ms"], x - width / 2, x + width / 2, colors="k", lw=1.5)
                if best is None:
                    continue
                y = best["tokens"] / best["ms"]  # k tokens/s
                ax.bar(x, y, width, color=colours[name], label=name if i == 0 else None)
                if name != "HF" and hf:
                    ax.annotate(f"{hf['ms'] / best['ms']:.1f}x", (x, y), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(workloads)), workloads)
        ax.set_ylabel("k tokens/s")
        ax.margins(y=0.15)
        ax.set_title(f"{model}, {'forward' if mode == 'infer' else 'training step'}", fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.text(
        0.01,
        0.003,
        "black tick: the bound (matmuls + attention kernel only) of that backend; label: speed-up over HF",
        fontsize=7,
    )
    fig.tight_layout(rect=(0, 0.01, 1, 1))
    fig.savefig(path, dpi=110)
