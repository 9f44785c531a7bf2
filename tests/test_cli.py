"""The packvit command line on tiny generated checkpoints: convert, export-hf, align, bench, help."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import packvit
from helpers import FAMILIES, PATCH, assert_hf_export_exact, random_images
from packvit.cli import main
from weights_conversion import load_model

REPO = Path(__file__).resolve().parent.parent


def _encode(model, family):
    x, g = packvit.patchify(random_images([(1, 3, 5), (2, 2, 4), (1, 4, 4)], PATCH[family], seed=1), PATCH[family])
    with torch.no_grad():
        return model(x, g, return_dict=True)


# -- help and exit codes ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["convert"], ["export-hf"], ["align"], ["demo"]])
def test_help_exits_zero(command, capsys):
    assert main(command + ["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: packvit" in out
    if command != ["demo"]:  # the demo has its own parser
        assert "exit codes" in out and "2    usage error" in out


def test_bench_help_when_the_suite_exists(capsys):
    pytest.importorskip("packvit.bench")
    assert main(["bench", "--help"]) == 0


def test_help_through_python_m():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-m", "packvit.cli", "--help"], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert r.returncode == 0, r.stderr
    for name in ("convert", "export-hf", "align", "bench", "demo", "exit codes"):
        assert name in r.stdout


def test_installed_console_script():
    """``pip install`` puts ``packvit`` beside the interpreter (scripts/run.sh installs it so)."""
    exe = Path(sys.executable).parent / "packvit"
    if not exe.exists():
        pytest.skip("packvit is not installed in this environment (run through scripts/run.sh)")
    r = subprocess.run([str(exe), "convert", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "packvit convert" in r.stdout, r.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["convert"],
        ["frobnicate"],
        ["convert", "a", "b", "--dtype", "float8"],
        ["align", "--ckpt", "x", "--image_size", "0"],
        ["align"],
    ],
)
def test_usage_errors_exit_two(argv, capsys):
    assert main(argv) == 2
    assert "error" in capsys.readouterr().err


def test_failure_exits_one_with_a_clear_message(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "packvit convert: error:" in err and "neither an existing path nor a hub id" in err
    assert not (tmp_path / "out").exists()


# -- convert ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_then_load_native(family, hf_checkpoints, packvit_models, tmp_path, capsys):
    _, src = hf_checkpoints[family]
    assert main(["convert", str(src), str(tmp_path / "pv"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "mapped:" in out and "parameters:" in out and "dtype:      float32" in out and "output:" in out
    cfg = json.loads((tmp_path / "pv" / "config.json").read_text())
    assert cfg["format"] == "packvit" and cfg["family"] == family
    assert cfg["config"]["num_layers"] == 2
    # the written tensors are packvit's own names and values
    written = load_file(tmp_path / "pv" / "model.safetensors")
    ref = packvit_models[family].state_dict()
    assert set(written) == set(ref) and all(torch.equal(written[k], ref[k]) for k in ref)
    # both loading paths read the native folder to the same outputs
    for model in (
        load_model(tmp_path / "pv", attn_backend="sdpa"),
        packvit.from_pretrained(tmp_path / "pv", attn_backend="sdpa"),
    ):
        assert torch.equal(
            _encode(model, family).last_hidden_state, _encode(packvit_models[family], family).last_hidden_state
        )


def test_convert_sharded_with_dtype_and_progress(hf_checkpoints, packvit_models, tmp_path, capsys):
    _, src = hf_checkpoints["siglip2"]
    assert main(["convert", str(src), str(tmp_path / "pv"), "--dtype", "bfloat16", "--max-shard-size", "40KB"]) == 0
    cap = capsys.readouterr()
    assert "read" in cap.err and "write" in cap.err and "B" in cap.err  # tqdm bars, in bytes
    assert "dtype:      bfloat16" in cap.out
    index = json.loads((tmp_path / "pv" / "model.safetensors.index.json").read_text())
    shards = sorted((tmp_path / "pv").glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {s.name for s in shards}
    for s in shards:  # at most 40 KB of tensors per shard, unless one tensor alone is larger
        part = load_file(s)
        assert len(part) == 1 or sum(t.numel() * t.element_size() for t in part.values()) <= 40_000, s.name
    model = load_model(tmp_path / "pv", attn_backend="sdpa")
    assert model.dtype == torch.bfloat16
    ref = packvit_models["siglip2"].state_dict()  # a shared fixture: read, never cast in place
    for k, v in model.state_dict().items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, ref[k].to(torch.bfloat16)), k


def test_convert_single_file_needs_a_config(hf_checkpoints, packvit_models, tmp_path, capsys):
    _, src = hf_checkpoints["aimv2"]
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "weights.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    assert main(["convert", str(lone / "weights.safetensors"), str(tmp_path / "a"), "--no-progress"]) == 1
    assert "no config.json" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert (
        main(
            [
                "convert",
                str(lone / "weights.safetensors"),
                str(tmp_path / "b"),
                "--no-progress",
                "--config",
                str(src / "config.json"),
            ]
        )
        == 0
    )
    model = load_model(tmp_path / "b", attn_backend="sdpa")
    assert torch.equal(_encode(model, "aimv2").pooler_output, _encode(packvit_models["aimv2"], "aimv2").pooler_output)


@pytest.mark.parametrize("family", ["dinov3", "siglip2"])
def test_convert_verify_prints_parity(family, hf_checkpoints, tmp_path, capsys):
    _, src = hf_checkpoints[family]
    assert main(["convert", str(src), str(tmp_path / "pv"), "--no-progress", "--verify"]) == 0
    out = capsys.readouterr().out
    line = next(s for s in out.splitlines() if s.startswith("mixed"))
    max_diff, mean_diff, cos_min = (float(v) for v in line.split()[3:6])
    assert max_diff < 1e-4 and mean_diff < 1e-5 and cos_min > 0.9999
    assert "OK: cosine min" in out


def test_convert_refuses_existing_destination_unless_overwrite(hf_checkpoints, tmp_path, capsys):
    """A folder packvit wrote is replaced only with --overwrite; a folder it did not write never is."""
    _, src = hf_checkpoints["dinov3"]
    (tmp_path / "pv").mkdir()
    (tmp_path / "pv" / "keep.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        assert main(["convert", str(src), str(tmp_path / "pv"), "--no-progress", *extra]) == 1
        assert "packvit did not write" in capsys.readouterr().err
        assert [f.name for f in tmp_path.iterdir()] == ["pv"] and (tmp_path / "pv" / "keep.txt").read_text() == "mine"
        assert [f.name for f in (tmp_path / "pv").iterdir()] == ["keep.txt"]
    (tmp_path / "pv" / "keep.txt").unlink()  # an empty folder holds nothing to lose
    assert main(["convert", str(src), str(tmp_path / "pv"), "--no-progress"]) == 0
    assert main(["convert", str(src), str(tmp_path / "pv"), "--no-progress", "--dtype", "bf16"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert", str(src), str(tmp_path / "pv"), "--no-progress", "--dtype", "bf16", "--overwrite"]) == 0
    assert load_model(tmp_path / "pv").dtype == torch.bfloat16 and [f.name for f in tmp_path.iterdir()] == ["pv"]


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_convert_is_atomic(exc, hf_checkpoints, tmp_path, monkeypatch, capsys):
    """A failure (or Ctrl-C) after the first shard is written leaves nothing at DST, nor a temp folder."""
    import safetensors.torch

    _, src = hf_checkpoints["dinov3"]
    real_save, calls = safetensors.torch.save_file, []

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise exc
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    dst = tmp_path / "out" / "pv"
    with pytest.raises(type(exc)):
        from weights_conversion.convert import convert_checkpoint

        convert_checkpoint(src, dst, max_shard_size="30KB")
    assert len(calls) == 2 and not dst.exists() and list((tmp_path / "out").iterdir()) == []
    # Through the CLI: Ctrl-C exits 130; an unexpected error keeps its traceback (not swallowed).
    calls.clear()
    argv = ["convert", str(src), str(dst), "--max-shard-size", "30KB", "--no-progress"]
    if isinstance(exc, KeyboardInterrupt):
        assert main(argv) == 130
        assert "interrupted" in capsys.readouterr().err
    else:
        with pytest.raises(RuntimeError, match="disk full"):
            main(argv)
    assert len(calls) == 2 and not dst.exists() and list((tmp_path / "out").iterdir()) == []


# -- export-hf --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_convert_export_round_trip_is_bit_exact(family, hf_checkpoints, tmp_path, capsys):
    hf, src = hf_checkpoints[family]
    assert main(["convert", str(src), str(tmp_path / "pv"), "--no-progress", "--max-shard-size", "50KB"]) == 0
    assert main(["export-hf", str(tmp_path / "pv"), str(tmp_path / "hf")]) == 0
    assert "exported" in capsys.readouterr().out
    assert_hf_export_exact(hf, src, tmp_path / "hf")


def test_export_hf_with_dtype(hf_checkpoints, tmp_path):
    _, src = hf_checkpoints["dinov3"]
    assert main(["export-hf", str(src), str(tmp_path / "hf"), "--dtype", "bf16"]) == 0
    assert {v.dtype for v in load_file(tmp_path / "hf" / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"


# -- align ------------------------------------------------------------------------------------------


def _align_rows(out: str) -> dict[str, list[float]]:
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if parts and (parts[0] == "mixed" or "x" in parts[0]) and len(parts) == 8 and parts[1].isdigit():
            rows[parts[0]] = [float(v) for v in parts[1:]]
    return rows


@pytest.mark.parametrize("family", FAMILIES)
def test_align_per_resolution_and_mixed(family, hf_checkpoints, capsys):
    _, src = hf_checkpoints[family]
    p = PATCH[family]
    code = main(
        [
            "align",
            "--ckpt",
            str(src),
            "--batch_size",
            "2",
            "--image_size",
            str(2 * p),
            f"{3 * p}x{5 * p}",
            "--use_real_images",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    rows = _align_rows(out)
    assert set(rows) == {f"{2 * p}x{2 * p}", f"{3 * p}x{5 * p}", "mixed"}
    assert rows["mixed"][0] == 4 and rows["mixed"][1] == 2 * (4 + 15)  # images, tokens
    for _images, _tokens, max_diff, _mean_diff, cmin, cmean, cmax in rows.values():
        assert max_diff < 1e-4 and cmin > 0.9999 and cmin <= cmean <= cmax
    assert "photos from" in out


def test_align_fails_below_threshold(hf_checkpoints, capsys):
    """A threshold above 1 cannot be met: exit 1 and say so (the comparison itself ran)."""
    _, src = hf_checkpoints["dinov3"]
    assert main(["align", "--ckpt", str(src), "--image_size", "32", "--batch_size", "1", "--threshold", "1.5"]) == 1
    assert "FAIL: cosine min" in capsys.readouterr().out


def test_align_detects_a_wrong_model(hf_checkpoints, tmp_path, capsys, monkeypatch):
    """Parity is really measured: a packvit model with a perturbed weight falls below the threshold."""
    import weights_conversion

    _, src = hf_checkpoints["siglip2"]
    real_build = weights_conversion.build_model

    def broken_build(family, cfg, state, **kw):
        state = dict(state)
        state["blocks.0.mlp.fc2.weight"] = state["blocks.0.mlp.fc2.weight"] * -3
        return real_build(family, cfg, state, **kw)

    monkeypatch.setattr(weights_conversion, "build_model", broken_build)
    assert main(["align", "--ckpt", str(src), "--image_size", "32", "--batch_size", "1"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_align_image_dir_must_hold_images(hf_checkpoints, tmp_path, capsys):
    _, src = hf_checkpoints["dinov3"]
    assert main(["align", "--ckpt", str(src), "--use_real_images", "--image_dir", str(tmp_path)]) == 1
    assert "--image_dir" in capsys.readouterr().err


# -- optional features, bench on a CPU machine, progress, interrupts -----


def test_bench_without_cuda(monkeypatch, capsys):
    import packvit.bench

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(packvit.bench, "main", lambda argv: calls.append(argv) or 0)
    assert main(["bench", "--model", "dinov3"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA device" in err and "packvit bench --tiny --device cpu" in err
    assert main(["bench", "--tiny"]) == 0 and calls == [["--tiny", "--device", "cpu"]]
    assert main(["bench", "--tiny", "--device", "cpu"]) == 0 and calls[-1] == ["--tiny", "--device", "cpu"]


def test_bench_render_plot_needs_matplotlib(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    (tmp_path / "r.jsonl").write_text("")
    assert main(["bench", "render", str(tmp_path / "r.jsonl"), "--plot", str(tmp_path / "p.png")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "matplotlib" in err and "pip install" in err


def test_missing_transformers_is_one_line_naming_the_extra(hf_checkpoints, tmp_path, monkeypatch, capsys):
    """convert --verify (checked before anything is read or written) and the demo, after a plain install."""
    _, src = hf_checkpoints["dinov3"]
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert main(["convert", str(src), str(tmp_path / "pv"), "--no-progress", "--verify"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "packvit[demo]" in err and not (tmp_path / "pv").exists()
    assert main(["demo", "--family", "dinov3"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "packvit demo: error:" in err and "packvit[demo]" in err


def test_no_empty_progress_bar_before_a_failing_run(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "read" not in err.split("error:")[0] and "0.00" not in err


def test_export_hf_shows_read_progress(hf_checkpoints, tmp_path, capsys):
    _, src = hf_checkpoints["siglip2"]
    assert main(["export-hf", str(src), str(tmp_path / "hf")]) == 0
    assert "read" in capsys.readouterr().err


def test_align_help_is_plain_text(capsys):
    assert main(["align", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "``" not in out and "when --ckpt is a hub id" in out and "SRC" not in out


def test_ctrl_c_during_imports_is_an_interrupt(monkeypatch, capsys):
    """A Ctrl-C while the command's modules import is held until they are done, then exits 130
    (raised inside an extension's import it could surface as 'TypeError: expected a message argument')."""
    import signal

    import packvit.cli as cli

    real_build = cli.build_parser

    def build_with_ctrl_c():
        os.kill(os.getpid(), signal.SIGINT)  # arrives "during the imports"
        return real_build()

    monkeypatch.setattr(cli, "build_parser", build_with_ctrl_c)
    assert main(["convert", "--help"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_load_model_progress(hf_checkpoints, capsys):
    _, src = hf_checkpoints["aimv2"]
    load_model(src, progress=True)
    assert "read" in capsys.readouterr().err
    load_model(src)
    assert capsys.readouterr().err == ""
