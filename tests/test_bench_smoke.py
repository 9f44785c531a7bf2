"""The benchmark suite on CPU with tiny models: it runs end to end, checks before it times, and
refuses to report a speed for a wrong answer. (Speed itself is measured on the GPU, not here.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from packvit.bench import main
from packvit.bench import models as bench_models
from packvit.bench.report import load, markdown
from packvit.bench.workloads import get

ARGS = ["--tiny", "--device", "cpu", "--dtype", "float32", "--warmup", "1", "--iters", "2", "--compile", "eager"]


@pytest.mark.slow
def test_suite_runs_checks_and_renders(tmp_path):
    out = tmp_path / "rows.jsonl"
    assert main(ARGS + ["--model", "siglip2", "dinov3", "--out", str(out)]) == 0
    rows = load(out)
    for family in ("siglip2", "dinov3"):
        mine = [r for r in rows if r["model"] == family]
        assert {(r["impl"], r["mode"]) for r in mine} == {(i, m) for i in ("hf", "packvit") for m in ("infer", "train")}
        for r in mine:
            assert r["ms"] > 0 and r["tokens"] == get("tiny", 16).num_patches and r["tflops"] > 0
        for r in (r for r in mine if r["impl"] == "packvit"):
            # Same weights, fp32 on CPU: the check is the parity of the tests, not just cosine.
            assert r["check"]["cos_min"] > 0.99999 and r["check"]["max_abs"] < 1e-4
    table = markdown(rows)
    assert table.count("\n") == len(rows) + 2 and "packvit sdpa" in table and "HF (padded + mask)" in table
    assert main(["render", str(out), "--table", str(tmp_path / "t.md")]) == 0
    assert (tmp_path / "t.md").read_text() == table
    try:
        import matplotlib  # noqa: F401  (optional: the GPU machine renders no plots)
    except ImportError:
        return
    assert main(["render", str(out), "--plot", str(tmp_path / "p.png"), "--table", str(tmp_path / "t2.md")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 0


def test_wrong_output_is_refused_not_timed(tmp_path, monkeypatch):
    real = bench_models.build_pair

    def broken_pair(*a, **kw):
        hf, pv = real(*a, **kw)
        with torch.no_grad():
            pv.blocks[0].mlp.fc2.weight.mul_(-3)  # packvit now disagrees with HF
        return hf, pv

    monkeypatch.setattr("packvit.bench.runner.build_pair", broken_pair)
    out = tmp_path / "rows.jsonl"
    assert main(ARGS + ["--model", "aimv2", "--impl", "packvit", "--out", str(out)]) == 1
    rows = [json.loads(line) for line in Path(out).read_text().splitlines()]
    assert rows and all("error" in r and "ms" not in r for r in rows if r["impl"] == "packvit")
    assert re.search(r"output differs from HF", rows[0]["error"])


def test_workloads_follow_benchmarks_md():
    m = get("mixed32", 16)
    assert m.num_images == 32 and m.num_patches == 23103  # the workload's published size: 23,103 patches
    assert m.num_patches + 5 * m.num_frames == 23263  # DINOv3 with 5 prefix tokens per image
    assert get("fixed32_448", 14).num_patches == 32 * 32 * 32 and get("fixed32_448", 16).num_patches == 32 * 28 * 28
    assert get("mixed32", 14).grid == m.grid  # the grid does not depend on the patch size
    assert all(t == 8 for t, _, _ in get("video", 16).grid)


def test_flops_formula():
    from packvit import DINOv3, DINOv3Config
    from packvit.bench.models import forward_flops, matmul_params
    from packvit.bench.workloads import Workload

    cfg = DINOv3Config(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, num_register_tokens=2)
    model = DINOv3(cfg)
    p = 16 * 16 * 3 * 32 + 2 * (32 * 96 + 32 * 32 + 32 * 64 + 64 * 32)  # patch embed + (qkv, proj, fc1, fc2) per block
    assert matmul_params(model) == p
    s = 3 * 4 + 3  # one 3x4 frame plus CLS and 2 registers
    assert forward_flops(model, Workload("w", ((2, 3, 4),), "")) == 2 * (2 * p * s + 2 * 4 * s * s * 32)


@pytest.mark.slow
def test_checkpointing_variants_compiled(tmp_path):
    # --checkpointing adds MLP-only and whole-block checkpointing; compiled blocks take both.
    out = tmp_path / "rows.jsonl"
    args = [a for a in ARGS if a not in ("--compile", "eager")] + ["--compile", "compile"]
    assert (
        main(args + ["--model", "dinov3", "--mode", "train", "--impl", "packvit", "--checkpointing", "--out", str(out)])
        == 0
    )
    rows = load(out)
    assert [r["checkpointing"] for r in rows] == [False, "mlp", True]
    assert all(r["compiled"] and r["check"]["max_abs"] < 1e-4 for r in rows)
    table = markdown(rows)
    assert "packvit sdpa compiled +ckpt mlp" in table and "packvit sdpa compiled +ckpt block" in table
