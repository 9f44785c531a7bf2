"""One benchmark process: per model, build the HF model and packvit from the same weights, check
packvit against HF on each workload, then time both. A packvit variant whose output disagrees with
HF gets a row with its error and no speed.

Each job is one function: ``run_family`` builds the pair, ``run_workload`` makes the inputs and
HF's reference output and times HF, ``run_packvit`` checks one packvit variant (backend, eager or
compiled) against the reference and times it; every row goes through ``Session.record``."""

from __future__ import annotations

import datetime
import gc
import json
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..attention import available_backends
from .bound import bound_ms
from .hf_baselines import HFRunner
from .models import DEFAULT_PRESETS, build_pair, forward_flops
from .timing import measure, model_step
from .workloads import Workload, get

MATMUL_CEILING = (
    798.0  # TFLOP/s, bf16 dense matmul measured on the H100 and the H200 (the same figure on both: same tensor cores)
)
SPEC_PEAK = 989.0  # TFLOP/s, H100 SXM bf16 dense spec
CPU = torch.device("cpu")


@dataclass
class Options:
    models: list[str]
    workloads: list[str]
    backends: list[str]  # packvit attention backends; "available" expands to every one that runs
    modes: list[str]  # infer, train
    compile: list[str]  # eager, compile
    impls: list[str]  # packvit, hf
    device: str = "cuda"
    dtype: str = "bfloat16"
    warmup: int = 10
    iters: int = 30
    tiny: bool = False
    bound: bool = True
    checkpointing: bool = False  # also time packvit training with MLP-only and per-block checkpointing
    min_cos: float = 0.999
    out: str | None = None


@dataclass
class Session:
    """What every job of one run shares: the options, where it runs, and the rows written so far."""

    opt: Options
    emit: Callable[[str], object] = print  # each row, as a JSON line
    rows: list[dict] = field(default_factory=list)
    device: torch.device = field(init=False)
    dtype: torch.dtype = field(init=False)
    env: dict = field(init=False)  # torch version, GPU, date: in every row

    def __post_init__(self):
        self.device, self.dtype = torch.device(self.opt.device), getattr(torch, self.opt.dtype)
        self.env = _env(self.device)

    def record(self, row: dict) -> None:
        """Keep ``row`` (with the environment's fields), print it as a JSON line, append it to ``--out``."""
        row = {**self.env, **row}
        self.rows.append(row)
        self.emit(json.dumps(row))
        if self.opt.out:
            with open(self.opt.out, "a") as f:
                f.write(json.dumps(row) + "\n")


@dataclass
class Case:
    """One model on one workload: its inputs and the fields every row about it starts from."""

    wl: Workload
    patches: torch.Tensor  # (Tp, p*p*C) on the device
    grid: torch.Tensor  # (N, 3) on the CPU: no device sync to read it
    flops: float  # of one forward
    base: dict


def cosine_check(out: torch.Tensor, ref: torch.Tensor) -> dict:
    o, r = out.float(), ref.float()
    cos = torch.nn.functional.cosine_similarity(o, r, dim=-1)
    return dict(cos_min=cos.min().item(), cos_mean=cos.mean().item(), max_abs=(o - r).abs().max().item())


def _env(device: torch.device) -> dict:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return dict(torch=torch.__version__, gpu=gpu, date=datetime.date.today().isoformat())


def _move(model, device):
    model.to(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def _uncompile(pv) -> None:
    """Back to eager blocks, so the next variant starts from the module ``compile_blocks`` found."""
    pv.uncompile_blocks()


def resolve_backends(s: Session) -> list[str]:
    """The packvit backends to run: as named, or every one that runs here ("available")."""
    if s.opt.backends != ["available"]:
        return list(s.opt.backends)
    backends = available_backends(s.device, s.dtype)
    if s.device.type == "cuda":  # the per-segment reference is for exactness, not speed
        backends = [b for b in backends if b != "sdpa"]
    return backends


def make_case(s: Session, family: str, preset: str, workload: str, pv) -> Case:
    """The workload's random patches (seeded: every run and variant sees the same input) and its FLOPs."""
    wl = get(workload, pv.config.patch_size)
    g = torch.Generator(device="cpu").manual_seed(0)
    patches = torch.randn(wl.num_patches, pv.patch_dim, generator=g).to(s.device, s.dtype)
    base = dict(
        model=family,
        preset=preset,
        workload=wl.name,
        images=wl.num_images,
        frames=wl.num_frames,
        tokens=wl.num_patches,
        tokens_with_prefix=wl.num_patches + pv.num_prefix * wl.num_frames,
        dtype=s.opt.dtype,
    )
    return Case(wl, patches, torch.tensor(wl.grid), forward_flops(pv, wl), base)


def step_flops(case: Case, mode: str) -> float:
    return case.flops * (3 if mode == "train" else 1)  # backward: twice the forward's matmuls


def timed_row(
    case: Case,
    impl: str,
    mode: str,
    backend: str,
    compiled: bool,
    how: str,
    t: dict,
    check: dict | None = None,
    extra: dict | None = None,
) -> dict:
    """A row with a speed: ``measure``'s timings ``t`` and the rates they give."""
    tflops = step_flops(case, mode) / t["ms"] / 1e9
    r = dict(case.base, impl=impl, mode=mode, backend=backend, compiled=compiled, how=how, **t)
    r.update(
        images_per_s=case.wl.num_images / t["ms"] * 1e3,
        tokens_per_s=case.wl.num_patches / t["ms"] * 1e3,
        tflops=tflops,
        mfu=tflops / MATMUL_CEILING,
        mfu_spec=tflops / SPEC_PEAK,
    )
    if check:
        r["check"] = check
    r.update(extra or {})
    return r


def hf_reference(s: Session, family: str, hf, pv, case: Case) -> tuple[HFRunner, torch.Tensor]:
    """HF on the device (packvit parked on the CPU meanwhile) and its output on the case: the
    reference every packvit variant is checked against, computed once per workload."""
    _move(pv, CPU)
    _move(hf, s.device)
    runner = HFRunner(family, hf, case.patches, case.wl.grid, pv.config.patch_size)
    with torch.inference_mode():
        ref = runner.infer().float().cpu()  # (Tp, D)
    return runner, ref


def hf_step(runner: HFRunner, mode: str) -> Callable[[], None]:
    """One HF forward (under inference_mode) or training step, with the model's mode set."""
    if mode == "infer":

        def step():
            with torch.inference_mode():
                runner.infer()
    else:
        runner.model.train()

        def step():
            runner.model.zero_grad(set_to_none=True)
            runner.train_step()

    return step


def time_hf(s: Session, runner: HFRunner, case: Case) -> None:
    for mode in s.opt.modes:
        try:
            t = measure(hf_step(runner, mode), s.device, s.opt.warmup, s.opt.iters)
            s.record(timed_row(case, "hf", mode, "sdpa", False, runner.how, t))
        except Exception as e:  # e.g. out of memory: say so and go on
            s.record(dict(case.base, impl="hf", mode=mode, backend="sdpa", how=runner.how, error=_err(e)))
        runner.model.eval().zero_grad(set_to_none=True)


def time_bounds(s: Session, pv, case: Case, backend: str) -> dict[str, float]:
    """The matmul + attention bound of each mode in ms (bound.py), recorded as rows; on CUDA only."""
    bounds: dict[str, float] = {}
    if not (s.opt.bound and s.device.type == "cuda"):
        return bounds
    for mode in s.opt.modes:
        ms = bound_ms(pv, case.wl, backend, mode == "train", s.device, s.dtype, s.opt.warmup, s.opt.iters)
        bounds[mode] = ms
        s.record(
            dict(
                case.base,
                impl="bound",
                mode=mode,
                backend=backend,
                compiled=False,
                how="matmuls + attention",
                ms=ms,
                tflops=step_flops(case, mode) / ms / 1e9,
            )
        )
    return bounds


def check_parity(s: Session, pv, case: Case, ref: torch.Tensor) -> tuple[dict | None, str | None]:
    """packvit's output against HF's reference: ``(check, None)`` when they agree, else ``(check or
    None, error)``."""
    try:
        with torch.inference_mode():
            out = pv(case.patches, case.grid)
    except Exception as e:
        return None, _err(e)
    check = cosine_check(out.cpu(), ref)
    # bf16 is judged by cosine; fp32 also by the tests' 1e-4, as a cosine alone misses a corrupted
    # weight that a final norm hides.
    ok = check["cos_min"] >= s.opt.min_cos and (s.dtype != torch.float32 or check["max_abs"] <= 1e-4)
    return check, None if ok else f"output differs from HF: {check}"


def time_packvit(
    s: Session, pv, case: Case, backend: str, compiled: bool, check: dict, bounds: dict[str, float]
) -> None:
    """Time packvit's forward and training step (and, with --checkpointing, checkpointed training)."""
    variants = [("infer", False), ("train", False)]
    variants += [("train", "mlp"), ("train", True)] if s.opt.checkpointing else []
    for mode, ckpt in variants:
        if mode not in s.opt.modes:
            continue
        pv.gradient_checkpointing = ckpt
        warmup = s.opt.warmup + (5 if compiled else 0)
        try:
            t = measure(model_step(pv, case.patches, case.grid, mode), s.device, warmup, s.opt.iters)
        except Exception as e:
            s.record(
                dict(
                    case.base,
                    impl="packvit",
                    mode=mode,
                    backend=backend,
                    compiled=compiled,
                    checkpointing=ckpt,
                    error=_err(e),
                )
            )
        else:
            extra = {"checkpointing": ckpt}
            if mode in bounds:
                extra["x_bound"] = t["ms"] / bounds[mode]
            s.record(timed_row(case, "packvit", mode, backend, compiled, "packed", t, check, extra))
        finally:
            pv.eval().zero_grad(set_to_none=True)
            pv.gradient_checkpointing = False


def run_packvit(
    s: Session, pv, case: Case, ref: torch.Tensor, backend: str, compiled: bool, bounds: dict[str, float]
) -> None:
    """One packvit variant: checked against HF, then timed only if it agrees."""
    pv.set_attention_backend(backend)
    if compiled:
        pv.compile_blocks()  # blocks share one compiled code object; a new backend or mode adds a graph
    try:
        check, error = check_parity(s, pv, case, ref)
        if error:
            s.record(dict(case.base, impl="packvit", backend=backend, compiled=compiled, error=error))
        else:
            time_packvit(s, pv, case, backend, compiled, check, bounds)
    finally:
        if compiled:
            _uncompile(pv)


def run_workload(s: Session, family: str, preset: str, workload: str, hf, pv, backends: list[str]) -> None:
    case = make_case(s, family, preset, workload, pv)
    runner, ref = hf_reference(s, family, hf, pv, case)
    if "hf" in s.opt.impls:
        time_hf(s, runner, case)
    _move(hf, CPU)
    del runner  # its padded HF inputs live on the device
    _move(pv, s.device)
    if "packvit" not in s.opt.impls:
        return
    for backend in backends:
        bounds = time_bounds(s, pv, case, backend)
        for how in s.opt.compile:
            run_packvit(s, pv, case, ref, backend, how == "compile", bounds)


def run_family(s: Session, family: str, backends: list[str]) -> None:
    hf, pv = build_pair(family, None, s.device, s.dtype, backends[0], tiny=s.opt.tiny)
    preset = "tiny" if s.opt.tiny else DEFAULT_PRESETS[family]
    for workload in s.opt.workloads:
        run_workload(s, family, preset, workload, hf, pv, backends)


def run(opt: Options, emit=print) -> list[dict]:
    s = Session(opt, emit)
    backends = resolve_backends(s)
    # Each (backend, mode, checkpointing) variant of the compiled blocks is one more graph of the
    # same code object, past dynamo's default limit; raised for this run only.
    with torch._dynamo.config.patch(cache_size_limit=max(torch._dynamo.config.cache_size_limit, 64)):
        for family in opt.models:
            run_family(s, family, backends)
            gc.collect()  # the pair is gone with run_family's frame
            if s.device.type == "cuda":
                torch.cuda.empty_cache()
    return s.rows
