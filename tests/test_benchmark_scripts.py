"""The GPU scripts in benchmarks/ run on the CPU with tiny configs, so they cannot rot between GPU
sessions. The FSDP2 equality script is also a real check here: 2 gloo ranks against one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import ROOT, run_python, torchrun

BENCH = ROOT / "benchmarks"


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.slow
def test_fsdp2_equality_two_ranks(tmp_path):
    out = tmp_path / "eq.jsonl"
    torchrun(
        BENCH / "fsdp2_equality.py",
        "--device",
        "cpu",
        "--tiny",
        "--dtype",
        "fp32",
        "--max-tokens",
        "150",
        "--out",
        str(out),
    )
    rows = _rows(out)
    assert {r["preset"].split()[0] for r in rows} == {
        "siglip2-so400m-patch16-naflex",
        "dinov3-vitl16-pretrain-lvd1689m",
        "aimv2-large-patch14-native",
    }
    for r in rows:
        assert r["ok"] and r["world"] == 2 and not r["fails"], r
        assert len(r["tokens_per_rank"]) == 2 and r["tokens_per_rank"][0] != r["tokens_per_rank"][1]


@pytest.mark.slow
def test_tokens_per_s_two_ranks_and_one_process(tmp_path):
    out = tmp_path / "tok.jsonl"
    common = ["--device", "cpu", "--tiny", "--steps", "2", "--warmup", "1", "--max-tokens", "200", "--out", str(out)]
    torchrun(BENCH / "train_tokens_per_s.py", "--preset", "dinov3-vitl16-pretrain-lvd1689m", *common)
    run_python([BENCH / "train_tokens_per_s.py", "--same-batch", "--wrap", "ddp", *common])
    rows = _rows(out)
    assert [(r["world"], r["wrap"], r["same_batch"]) for r in rows] == [(2, "fsdp2", False), (1, "ddp", True)]
    assert all(r["tokens_per_s_per_gpu"] > 0 and r["step_ms"] >= r["host_ms_rank0"] > 0 for r in rows)


@pytest.mark.slow
def test_tower_checks_script():
    out = run_python(
        [
            BENCH / "gpu_tower_checks.py",
            "--device",
            "cpu",
            "--tiny",
            "--no-compile",
            "--preset",
            "aimv2-large-patch14-native",
            "--max-tokens",
            "400",
            "--reps",
            "1",
        ]
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert result["ok"] and [r["mode"] for r in result["rows"]] == ["fp32", "autocast", "pure_bf16"]


@pytest.mark.slow
def test_host_overhead_script(tmp_path):
    """benchmarks/host_overhead.py end to end on the CPU (tiny DINOv3, the reference attention: no FA4
    rows, no FP8 rows, no sync check there), writing its rows."""
    out = tmp_path / "rows.jsonl"
    cmd = [BENCH / "host_overhead.py", "--device", "cpu", "--tiny", "--backend", "sdpa", "--model", "dinov3"]
    run_python([*cmd, "--workload", "tiny", "--iters", "2", "--out", out])
    rows = _rows(out)
    assert [r["what"] for r in rows] == ["forward bf16", "forward bf16", "training step bf16"]
    assert [r["route"] for r in rows][:2] == ["eager route", "custom op"] and rows[0]["host_ms"] > 0


def test_blockwise_probe_quantisers_round_trip():
    """``fp8_blockwise_probe.py`` (GPU only) builds its block-scaled operands with these: each block's
    scale is its amax / 448, and dequantising gives the input back to e4m3's rounding."""
    import sys

    import torch

    sys.path.insert(0, str(BENCH))
    try:
        import fp8_blockwise_probe as probe
    finally:
        sys.path.remove(str(BENCH))
    t = torch.randn(300, 700) * torch.logspace(-3, 3, 700)  # columns of very different sizes
    for quant, block in ((probe.quant_1x128, (1, 128)), (probe.quant_128x128, (128, 128))):
        q, s = quant(t)
        assert q.shape == t.shape and s.shape == (-(-300 // block[0]), -(-700 // block[1]))
        back = probe.dequant(q, s, *block)
        scale = s.repeat_interleave(block[0], 0)[:300].repeat_interleave(block[1], 1)[:, :700]
        assert ((back - t).abs() <= scale * 448 / 16 + 1e-30).all()  # half a step of a 3-bit mantissa, at most
