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
    tag += f" +ckpt {ckpt}" if isinstance(ckpt, str) else (" +ckpt" if ckpt else "")
    return f"packvit {r['backend']}{tag}"


def _gib(r: dict) -> str:
    return "" if r.get("peak_gib") is None else f"{r['peak_gib']:.2f}"


def markdown(rows: list[dict]) -> str:
    head = ("| model | workload | mode | implementation | ms (p10-p90) | vs HF | x bound | images/s | tokens/s | "
            "TFLOP/s | MFU 798 / 989 | peak GiB |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    hf_ms = {(r["model"], r["workload"], r["mode"]): r["ms"] for r in rows if r["impl"] == "hf" and "ms" in r}
    for r in rows:
        if "error" in r:
            out.append(f"| {r['model']} | {r['workload']} | | {_label({**r, 'mode': ''})} | **refused: {r['error']}** |"
                       + " |" * 7)
            continue
        key = (r["model"], r["workload"], r["mode"])
        speedup = f"{hf_ms[key] / r['ms']:.1f}x" if key in hf_ms and r["impl"] != "hf" else ""
        if r["impl"] == "bound":
            out.append(f"| {r['model']} | {r['workload']} | {r['mode']} | {_label(r)} | {r['ms']:.1f} | {speedup} | "
                       f"1.00 | | | {r['tflops']:.0f} | | |")
            continue
        xb = f"{r['x_bound']:.2f}" if r.get("x_bound") else ""
        out.append(
            f"| {r['model']} | {r['workload']} | {r['mode']} | {_label(r)} | {r['ms']:.1f} ({r['p10']:.1f}-{r['p90']:.1f}) "
            f"| {speedup} | {xb} | {r['images_per_s']:.0f} | {r['tokens_per_s'] / 1e3:.0f}k | {r['tflops']:.0f} | "
            f"{100 * r['mfu']:.0f}% / {100 * r['mfu_spec']:.0f}% | {_gib(r)} |"
        )
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = {}
    for r in rows:  # the last row of a (model, workload, mode, implementation) wins
        if "ms" in r and r["impl"] != "bound":
            timed[(r["model"], r["workload"], r["mode"], _label(r))] = r
    timed = list(timed.values())
    palette = plt.get_cmap("tab10").colors
    colours = {lab: palette[i % len(palette)] for i, lab in enumerate(sorted({_label(r) for r in timed}))}
    groups = sorted({(r["model"], r["mode"]) for r in timed})
    fig, axes = plt.subplots(len(groups), 1, figsize=(11, 2.6 * len(groups)), squeeze=False)
    for ax, (model, mode) in zip(axes[:, 0], groups):
        rs = [r for r in timed if r["model"] == model and r["mode"] == mode]
        workloads = list(dict.fromkeys(r["workload"] for r in rs))
        labels = list(dict.fromkeys(_label(r) for r in rs))
        width = 0.8 / len(labels)
        for j, lab in enumerate(labels):
            xs, ys = [], []
            for i, w in enumerate(workloads):
                m = [r for r in rs if r["workload"] == w and _label(r) == lab]
                if m:
                    xs.append(i + j * width)
                    ys.append(m[0]["tokens_per_s"] / 1e3)
            ax.bar(xs, ys, width, label=lab, color=colours[lab])
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(workloads))], workloads)
        ax.set_ylabel("k tokens/s")
        ax.set_title(f"{model} {mode}", fontsize=10)
        ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
