"""DeepSpeed ZeRO-3 (LLaVA-NeXT's scripts/zero3.json) gives the step without DeepSpeed: a packvit
LLaVA tower loads partitioned, trains with the same loss and gradients, and saves weights that
reload into a fresh tower.

    torchrun --nproc_per_node=2 benchmarks/zero3_check.py --device cpu CKPT...   # gloo (tests/test_zero3.py)
    torchrun --nproc_per_node=1 benchmarks/zero3_check.py --tiny                  # one GPU, nccl

CKPT: transformers vision checkpoint folders; --tiny adds the tests' tiny random ones.

Per checkpoint, on every rank: a stand-in for LLaVA (``PackedVisionTower`` with LLaVA's
``unfreeze_mm_vision_tower`` and ``mm_vision_select_layer=-2``, then an mlp2x_gelu projector) is
built inside ``deepspeed.zero.Init``, where transformers' ``from_pretrained`` builds a LLaVA model
whose config names its tower. The tower loads through ``packvit.zero3.from_pretrained``
(patched in for ``packvit.from_pretrained``, which ``PackedVisionTower.load_model`` calls). Each rank
runs one ZeRO-3 engine step on its own packed batch (mixed image sizes and a 2-frame clip); the same
model without DeepSpeed runs the mean of all ranks' losses in one process. Compared, fp32, TF32 off:
  loss of each rank              |z - r| <= 1e-6 * |r|
  every parameter's gradient     max|z - r| <= 1e-5 * max|r| (gathered with safe_get_full_grad);
                                 a gradient that is zero in exact arithmetic (SigLIP2's and AIMv2's
                                 key bias: softmax ignores a per-row constant; the blocks after
                                 select_layer, the final norm and the head, which the loss never
                                 reaches) must be <= 1e-6 * the largest gradient on both sides
  weights after one SGD step     max|z - r| <= 1e-5 * max|update| + 2 ulp of the weights (each side
                                 rounds w - lr * g once; gradient clipping as configured)
Then ``engine.save_16bit_model`` (what transformers' Trainer calls for ZeRO-3) writes the weights;
rank 0 loads the tower's part into a fresh ``PackedVisionTower`` (no DeepSpeed) and checks it equals
the engine's gathered weights exactly, and ``zero3.export_hf`` writes a transformers checkpoint that
loads back to them. Also checked, with transformers' ``HfDeepSpeedConfig`` alive:
the tower built with no ``zero.Init`` open (LLaVA's ``initialize_vision_modules``) comes out
partitioned with the checkpoint's values; a ``PreTrainedModel`` holding the stand-in, saved with the
trained weights, reloads them through transformers' ZeRO-3 ``from_pretrained`` (as LLaVA reloads a
fine-tuned model), and ``_from_config`` keeps the tower checkpoint's weights instead of
re-initialising them. Last, LLaVA's default, the tower frozen: same loss and projector gradients,
no tower gradient. Prints one line per check; exits non-zero on a failure.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

# LLaVA-NeXT scripts/zero3.json with its "auto" values as transformers' Trainer fills them
# (fp16/bf16 off: the check is fp32; gradient_clipping = TrainingArguments.max_grad_norm = 1.0;
# batch sizes for one micro-batch per rank). stage3_param_persistence_threshold is 0 instead of
# Trainer's 10 * hidden_size so that every tensor, biases included, is partitioned here.
ZERO3 = {
    "fp16": {"enabled": False},
    "bf16": {"enabled": False},
    "zero_optimization": {
        "stage": 3,
        "offload_optimizer": {"device": "none", "pin_memory": True},
        "offload_param": {"device": "none", "pin_memory": True},
        "overlap_comm": True,
        "contiguous_gradients": True,
        "sub_group_size": 1e9,
        "reduce_bucket_size": 64 * 64,
        "stage3_prefetch_bucket_size": int(0.9 * 64 * 64),
        "stage3_param_persistence_threshold": 0,
        "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,
    "steps_per_print": 100,
    "train_micro_batch_size_per_gpu": 1,
    "wall_clock_breakdown": False,
    "zero_allow_untested_optimizer": True,  # Trainer sets it for its torch optimizers
}
LR = 0.1
SELECT_LAYER = -2
TOWER_PREFIX = "tower."  # the stand-in's attribute; LLaVA's is model.vision_tower.


class TinyLlava(nn.Module):
    """What LLaVA trains around its tower: tower -> mlp2x_gelu projector -> a token-weighted loss."""

    def __init__(self, checkpoint: str, trainable: bool = True):
        super().__init__()
        from packvit.tower import PackedVisionTower

        args = SimpleNamespace(mm_vision_select_layer=SELECT_LAYER, unfreeze_mm_vision_tower=trainable)
        self.tower = PackedVisionTower(checkpoint, args, attn_backend="sdpa")
        d = self.tower.hidden_size
        self.projector = nn.Sequential(nn.Linear(d, 32), nn.GELU(), nn.Linear(32, 32))

    def forward(self, x: torch.Tensor, grid: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        feats, _ = self.tower(x, grid_thw=grid, packed=True)  # (Tp, D)
        return (self.projector(feats).float() * w).sum() / w.shape[0]


def rank_batch(patch_dim: int, rank: int, device):
    """Rank ``rank``'s packed batch: two images of different sizes and a 2-frame clip."""
    gen = torch.Generator().manual_seed(1000 + rank)
    grid = torch.tensor([[1, 3 + rank, 2], [1, 2, 4 + rank], [2, 2, 3]])
    n = int(grid.prod(1).sum())
    x = torch.randn(n, patch_dim, generator=gen)
    w = torch.randn(n, 32, generator=gen)
    return x.to(device), grid, w.to(device)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max|a - b|, max|b|)."""
    return (a.float() - b.float()).abs().max().item(), b.float().abs().max().item()


def check(name: str, ok: bool, detail: str, fails: list) -> None:
    if not ok:
        fails.append(f"{name}: {detail}")
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)


def run_one(checkpoint: str, device: torch.device, out_dir: Path, fails: list) -> None:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    from packvit import zero3
    from packvit.tower import PackedVisionTower
    from weights_conversion import load_model

    rank, world = dist.get_rank(), dist.get_world_size()
    family = Path(checkpoint).name

    # Without DeepSpeed: the reference model, one process, the mean of every rank's loss.
    torch.manual_seed(0)
    ref = TinyLlava(checkpoint).to(device)

    # Unpatched, inside zero.Init (what transformers' from_pretrained opens): what packvit does today.
    try:
        with deepspeed.zero.Init(config_dict_or_path=ZERO3):
            PackedVisionTower(checkpoint, SimpleNamespace(unfreeze_mm_vision_tower=True), attn_backend="sdpa")
        before = "loads"
    except Exception as e:  # noqa: BLE001 (reported, not a criterion)
        before = f"{type(e).__name__}: {str(e)[:90]}"
    if rank == 0:
        print(f"info {family} PackedVisionTower inside zero.Init via packvit.from_pretrained: {before}")

    with deepspeed.zero.Init(config_dict_or_path=ZERO3):  # packvit.from_pretrained partitions by itself
        model = TinyLlava(checkpoint)
    params = dict(model.named_parameters())
    partitioned = all(hasattr(p, "ds_id") and p.numel() == 0 for p in params.values())
    check(
        f"{family} built inside zero.Init",
        partitioned,
        f"{len(params)} tensors partitioned, {sum(p.ds_numel for p in params.values())} elements",
        fails,
    )
    loaded = zero3.full_state_dict(model)
    ref.projector.load_state_dict(
        {k.removeprefix("projector."): v for k, v in loaded.items() if k.startswith("projector.")}
    )  # zero.Init broadcast rank 0's random init
    same = all(torch.equal(loaded[k], v.cpu()) for k, v in ref.state_dict().items())
    check(
        f"{family} partitioned weights == checkpoint",
        same and loaded.keys() == ref.state_dict().keys(),
        "every tensor gathered equals the plain load, bit for bit",
        fails,
    )

    # The reference step.
    batches = [rank_batch(ref.tower.vision_tower.patch_dim, r, device) for r in range(world)]
    ref_losses = [ref(*b) for b in batches]
    torch.stack(ref_losses).mean().backward()
    ref_grads = {k: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for k, p in ref.named_parameters()}
    torch.nn.utils.clip_grad_norm_(ref.parameters(), ZERO3["gradient_clipping"])
    with torch.no_grad():
        for p in ref.parameters():
            if p.grad is not None:
                p -= LR * p.grad

    # The ZeRO-3 step. LLaVA's train.py first moves the tower to the training dtype and device.
    model.tower.to(dtype=torch.float32, device=device)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), config=ZERO3)
    loss = engine(*batches[rank])
    engine.backward(loss)
    losses = [torch.zeros((), device=device) for _ in range(world)]
    dist.all_gather(losses, loss.detach().float())
    err = max(abs(z.item() - r.item()) / abs(r.item()) for z, r in zip(losses, ref_losses))
    check(f"{family} loss", err <= 1e-6, f"{world} ranks, max relative error {err:.1e}", fails)

    top = max(g.abs().max().item() for g in ref_grads.values())
    worst, worst_key, zero_keys, bad = 0.0, "-", [], []
    for k, p in engine.module.named_parameters():
        g = safe_get_full_grad(p)
        g = torch.zeros(p.ds_shape, device=device) if g is None else g
        e, m = rel_err(g, ref_grads[k])
        if m <= 1e-6 * top:  # zero in exact arithmetic: both sides tiny
            zero_keys.append(k)
            if g.abs().max().item() > 1e-6 * top:
                bad.append(f"{k}: {g.abs().max().item():.1e} where the reference is {m:.1e}")
            continue
        if e / m > worst:
            worst, worst_key = e / m, k
        if e > 1e-5 * m:
            bad.append(f"{k}: {e:.1e} of {m:.1e}")
    n_tower = sum(k.startswith(TOWER_PREFIX) and k not in zero_keys for k in ref_grads)
    bad += [] if n_tower else ["no tower tensor has a gradient: the tower did not train"]
    check(
        f"{family} gradients",
        not bad,
        f"{len(ref_grads)} tensors ({n_tower} of the tower's with a gradient), "
        f"worst max|z-r|/max|r| {worst:.1e} ({worst_key}); "
        f"{len(zero_keys)} zero in exact arithmetic, all <= 1e-6 of the largest {top:.1e}"
        + (f"; {bad[:3]}" if bad else ""),
        fails,
    )

    engine.step()
    stepped = zero3.full_state_dict(engine.module)
    # The update (w_after - w_before) is what must agree; the weights after it are fp32 numbers, so
    # each side's rounding of w - lr * g adds up to half an ulp of w: 2 ulps of slack in all.
    eps, moved, bad, worst = torch.finfo(torch.float32).eps, 0, [], (0.0, 0.0, "-")
    for k, v in ref.state_dict().items():
        r, z, before = v.detach().cpu(), stepped[k], loaded[k]
        e, m = rel_err(z, r)  # max|z - r|
        d = (r - before).abs().max().item()  # max|dr|
        w = max(r.abs().max().item(), before.abs().max().item())
        moved += d > 0
        if e > 1e-5 * d + 2 * eps * w:
            bad.append(f"{k}: {e:.1e} where the update is {d:.1e}")
        if d > 0 and e / d > worst[0]:
            worst = (e / d, e / (eps * w), k)
    check(
        f"{family} one SGD step (clipped at {ZERO3['gradient_clipping']})",
        not bad,
        f"{moved} tensors moved; worst max|z-r| {worst[0]:.1e} of the update = {worst[1]:.1f} ulp of the weights "
        f"({worst[2]}); max|z-r| <= 1e-5 max|update| + 2 ulp" + (f"; {bad[:3]}" if bad else ""),
        fails,
    )

    # Save as transformers' Trainer does under ZeRO-3, reload into a fresh tower without DeepSpeed.
    save_dir = out_dir / family
    engine.save_16bit_model(str(save_dir))
    dist.barrier()
    if rank == 0:
        saved = torch.load(save_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
        fresh = PackedVisionTower(checkpoint, SimpleNamespace(mm_vision_select_layer=SELECT_LAYER), attn_backend="sdpa")
        fresh.load_state_dict(
            {k.removeprefix(TOWER_PREFIX): v for k, v in saved.items() if k.startswith(TOWER_PREFIX)}, strict=True
        )
        exact = all(torch.equal(v, stepped[TOWER_PREFIX + k]) for k, v in fresh.state_dict().items())
        check(
            f"{family} save_16bit_model -> fresh tower",
            exact,
            f"{len(fresh.state_dict())} tower tensors reloaded equal to the trained ones, bit for bit",
            fails,
        )
    # The transformers layout (packvit export-hf) straight from the partitioned tower: the trained
    # blocks, and the parts past select_layer from the source checkpoint.
    engine.module.tower.export_hf(out_dir / f"{family}-export")
    dist.barrier()
    if rank == 0:
        back = load_model(out_dir / f"{family}-export", attn_backend="sdpa").state_dict()
        source = load_model(checkpoint, attn_backend="sdpa").state_dict()
        trained = {k: v for k, v in back.items() if "tower.vision_tower." + k in stepped}
        exact = all(torch.equal(v, stepped["tower.vision_tower." + k]) for k, v in trained.items()) and all(
            torch.equal(v, source[k]) for k, v in back.items() if k not in trained
        )
        check(
            f"{family} tower.export_hf -> load_model",
            exact and len(trained) == len(fresh.state_dict()),
            f"{len(trained)} trained tensors bit for bit, {len(back) - len(trained)} from the source",
            fails,
        )

    # LLaVA's initialize_vision_modules: no zero.Init open, transformers' HfDeepSpeedConfig alive.
    try:
        from transformers.integrations import HfDeepSpeedConfig
    except ImportError:
        if rank == 0:
            print("skip HfDeepSpeedConfig path: transformers is not installed")
        return
    hf_cfg = HfDeepSpeedConfig(ZERO3)  # noqa: F841 (transformers holds a weak reference to it)
    tower = zero3.from_pretrained(checkpoint, attn_backend="sdpa")
    plain = load_model(checkpoint, attn_backend="sdpa")
    got = zero3.full_state_dict(tower)
    ok = all(hasattr(p, "ds_id") and p.numel() == 0 for p in tower.parameters()) and all(
        torch.equal(got[k], v) for k, v in plain.state_dict().items()
    )
    check(f"{family} HfDeepSpeedConfig, no zero.Init open", ok, "partitioned, checkpoint values", fails)
    run_hf_from_pretrained(checkpoint, family, stepped, out_dir, fails)
    del hf_cfg
    run_frozen(checkpoint, family, device, fails)


def run_frozen(checkpoint: str, family: str, device: torch.device, fails: list) -> None:
    """LLaVA's default (the tower frozen, the projector trained) under ZeRO-3: the same loss and
    projector gradients as without DeepSpeed, and no gradient on the tower."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    import packvit
    from packvit import zero3

    rank, world = dist.get_rank(), dist.get_world_size()
    ref = TinyLlava(checkpoint, trainable=False).to(device)
    original = packvit.from_pretrained
    packvit.from_pretrained = zero3.from_pretrained
    try:
        with deepspeed.zero.Init(config_dict_or_path=ZERO3):
            model = TinyLlava(checkpoint, trainable=False)
    finally:
        packvit.from_pretrained = original
    ref.projector.load_state_dict(
        {k.removeprefix("projector."): v for k, v in zero3.full_state_dict(model).items() if k.startswith("projector.")}
    )
    batches = [rank_batch(ref.tower.vision_tower.patch_dim, r, device) for r in range(world)]
    ref_losses = [ref(*b) for b in batches]
    torch.stack(ref_losses).mean().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(trainable, lr=LR), model_parameters=trainable, config=ZERO3
    )
    loss = engine(*batches[rank])
    engine.backward(loss)
    losses = [torch.zeros((), device=device) for _ in range(world)]
    dist.all_gather(losses, loss.detach().float())
    err = max(abs(z.item() - r.item()) / abs(r.item()) for z, r in zip(losses, ref_losses))
    worst, bad = 0.0, []
    for (k, p), (_, q) in zip(engine.module.named_parameters(), ref.named_parameters()):
        if not p.requires_grad:
            bad += [k] if q.grad is not None or p.grad is not None else []
            continue
        e, m = rel_err(safe_get_full_grad(p), q.grad)
        worst = max(worst, e / m)
        bad += [k] if e > 1e-5 * m else []
    n_frozen = sum(not p.requires_grad for p in model.parameters())
    check(
        f"{family} frozen tower",
        err <= 1e-6 and not bad and n_frozen == len(list(ref.tower.parameters())),
        f"loss relative error {err:.1e}; projector gradients worst {worst:.1e}; "
        f"{n_frozen} tower tensors frozen, none with a gradient" + (f"; bad: {bad[:3]}" if bad else ""),
        fails,
    )


def run_hf_from_pretrained(checkpoint: str, family: str, trained: dict, out_dir: Path, fails: list) -> None:
    """transformers' own ZeRO-3 loading, as LLaVA reloads a fine-tuned model: ``from_pretrained`` opens
    ``zero.Init``, the model's ``__init__`` loads the tower from its checkpoint (through the hook),
    then transformers copies the saved model's weights in (``_load_state_dict_into_zero3_model``).
    The tower must end partitioned and equal to the saved (trained) weights. ``_from_config`` (a new
    model) must keep the tower checkpoint's weights: transformers re-initialises every module it
    does not know to be initialised."""
    import torch.distributed as dist
    import transformers

    from packvit import zero3
    from weights_conversion import load_model

    class Config(transformers.PretrainedConfig):
        model_type = "packvit-zero3-check"

        def __init__(self, mm_vision_tower: str = "", **kwargs):
            super().__init__(**kwargs)
            self.mm_vision_tower = mm_vision_tower

    class Model(transformers.PreTrainedModel):
        config_class = Config
        base_model_prefix = "model"

        def __init__(self, config):
            super().__init__(config)
            self.model = TinyLlava(config.mm_vision_tower)
            self.post_init()

    save_dir = out_dir / f"{family}-hf"
    if dist.get_rank() == 0:  # the trained weights, saved as a transformers checkpoint would hold them
        with zero3.off():  # built by rank 0 alone: partitioning would wait for the other rank
            saved = Model(Config(mm_vision_tower=str(checkpoint)))
        saved.model.load_state_dict(trained)
        saved.save_pretrained(save_dir)
    dist.barrier()
    reloaded = Model.from_pretrained(save_dir)  # packvit.from_pretrained partitions by itself
    fresh = Model._from_config(Config(mm_vision_tower=str(checkpoint)))
    got = zero3.full_state_dict(reloaded.model)
    ok = all(hasattr(p, "ds_id") and p.numel() == 0 for p in reloaded.parameters()) and got.keys() == trained.keys()
    ok = ok and all(torch.equal(got[k], v) for k, v in trained.items())
    check(
        f"{family} transformers from_pretrained under ZeRO-3",
        ok,
        f"partitioned, {len(trained)} tensors equal to the saved trained weights",
        fails,
    )
    got = zero3.full_state_dict(fresh.model.tower)
    plain = load_model(checkpoint, attn_backend="sdpa").state_dict()
    same = [
        k for k, v in got.items() if torch.equal(v, plain[k.removeprefix("vision_tower.")])
    ]  # the tower is truncated at select_layer
    check(
        f"{family} transformers _from_config under ZeRO-3",
        len(same) == len(got),
        f"{len(same)} of {len(got)} tower tensors keep the tower checkpoint's values",
        fails,
    )


def make_tiny(root: Path) -> list[str]:
    """The tests' tiny random transformers checkpoints, one folder per family (rank 0 writes them)."""
    import torch.distributed as dist

    from weights_conversion import FAMILIES
    from weights_conversion.reference import tiny_hf_model

    if dist.get_rank() == 0:
        for family in FAMILIES:
            tiny_hf_model(family).save_pretrained(root / family)
    dist.barrier()
    return [str(root / family) for family in FAMILIES]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="*", help="transformers vision checkpoint folders")
    ap.add_argument(
        "--tiny",
        action="store_true",
        help="also check tiny random checkpoints of the three families (tests/conftest.py; needs transformers)",
    )
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", default=None, help="folder for the saved weights (default: a temporary one)")
    a = ap.parse_args()
    if a.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is imported
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo" if a.device == "cpu" else "nccl")
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cpu") if a.device == "cpu" else torch.device("cuda", local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    fails: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        shared = [a.out or tmp]  # rank 0's folder: the ranks read what rank 0 writes
        dist.broadcast_object_list(shared, src=0)
        checkpoints = list(a.checkpoints)
        if a.tiny:
            checkpoints += make_tiny(Path(shared[0]) / "tiny")
        if not checkpoints:
            ap.error("give checkpoint folders or --tiny")
        for ckpt in checkpoints:
            run_one(ckpt, device, Path(shared[0]), fails)
        dist.barrier()
    if dist.get_rank() == 0:
        print("ZERO3 CHECK " + ("FAILED: " + "; ".join(fails) if fails else "PASSED"), flush=True)
    dist.destroy_process_group()
    # Out without the interpreter's teardown, where gloo's still-running threads can abort a rank.
    sys.stdout.flush()
    os._exit(1 if fails else 0)


if __name__ == "__main__":
    main()
