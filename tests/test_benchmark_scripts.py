"""The GPU scripts in benchmarks/ run on the CPU with tiny configs, so they cannot rot between GPU
sessions. The FSDP2 equality script is also a real check here: 2 gloo ranks against one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'benchmarks'}", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def _run(args, timeout=240):
    r = subprocess.run([sys.executable, *args], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{args[:3]} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def _torchrun(script, *args, nproc=2):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return _run(["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                 f"--master_port={port}", str(ROOT / "benchmarks" / script), *args])


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_fsdp2_equality_two_ranks(tmp_path):
    out = tmp_path / "eq.jsonl"
    _torchrun("fsdp2_equality.py", "--device", "cpu", "--tiny", "--dtype", "fp32", "--max-tokens", "150",
              "--out", str(out))
    rows = _rows(out)
    assert {r["preset"].split()[0] for r in rows} == {
        "siglip2-so400m-patch16-naflex", "dinov3-vitl16-pretrain-lvd1689m", "aimv2-large-patch14-native"}
    for r in rows:
        assert r["ok"] and r["world"] == 2 and not r["fails"], r
        assert len(r["tokens_per_rank"]) == 2 and r["tokens_per_rank"][0] != r["tokens_per_rank"][1]


def test_tokens_per_s_two_ranks_and_one_process(tmp_path):
    out = tmp_path / "tok.jsonl"
    common = ["--device", "cpu", "--tiny", "--steps", "2", "--warmup", "1", "--max-tokens", "200", "--out", str(out)]
    _torchrun("train_tokens_per_s.py", "--preset", "dinov3-vitl16-pretrain-lvd1689m", *common)
    _run([str(ROOT / "benchmarks" / "train_tokens_per_s.py"), "--same-batch", "--wrap", "ddp", *common])
    rows = _rows(out)
    assert [(r["world"], r["wrap"], r["same_batch"]) for r in rows] == [(2, "fsdp2", False), (1, "ddp", True)]
    assert all(r["tokens_per_s_per_gpu"] > 0 and r["step_ms"] >= r["host_ms_rank0"] > 0 for r in rows)


def test_tower_checks_script():
    out = _run([str(ROOT / "benchmarks" / "gpu_tower_checks.py"), "--device", "cpu", "--tiny", "--no-compile",
                "--preset", "aimv2-large-patch14-native", "--max-tokens", "400", "--reps", "1"])
    result = json.loads(out.strip().splitlines()[-1])
    assert result["ok"] and [r["mode"] for r in result["rows"]] == ["fp32", "autocast", "pure_bf16"]
