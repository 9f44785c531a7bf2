"""Real-size model pairs for the benchmarks: a transformers model (the reference, built by
``weights_conversion.reference``) and the packvit model converted from its very weights, plus the
FLOP count the benchmark tables report (2 FLOPs per multiply-add of every matmul a token goes
through, plus attention's two matmuls per frame)."""

from __future__ import annotations

import torch
from torch import nn

from weights_conversion import FAMILIES, build_model, convert_state_dict
from weights_conversion.reference import build_hf, randomize_

from ..models.base import PackedViT
from .workloads import Workload

# The published checkpoint each family is benchmarked at (its record's default_preset).
DEFAULT_PRESETS = {name: fam.default_preset for name, fam in FAMILIES.items()}
TINY = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)


def build_pair(
    family: str, preset: str | None, device: torch.device, dtype: torch.dtype, backend: str, tiny: bool = False
) -> tuple[nn.Module, PackedViT]:
    """(HF model, packvit model) with identical weights, both eval, on ``device`` in ``dtype``."""
    fam = FAMILIES[family]
    cfg = fam.config_class.from_name(preset or fam.default_preset, **(TINY if tiny else {}))
    torch.manual_seed(0)
    hf = build_hf(family, cfg, device)
    # Noise on the tensors transformers initialises to constants, so that a swapped bias or a
    # missing scale cannot hide behind zeros and ones.
    randomize_(hf, seed=0, scale=0.02, constant_only=True)
    hf = hf.to(dtype).eval()
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}  # no storage shared with HF
    fam_name, pcfg, sd, _ = convert_state_dict(hf.config.to_dict(), state, family=family)
    model = build_model(fam_name, pcfg, sd, attn_backend=backend).eval()
    return hf, model


def matmul_params(model: PackedViT) -> int:
    """Weights of every matmul a token goes through: the patch embedding and the blocks (the pooling
    head runs once per frame and is left out)."""
    n = model.patch_embed.weight.numel()
    for m in model.blocks.modules():
        if isinstance(m, nn.Linear):
            n += m.weight.numel()
    return n


def forward_flops(model: PackedViT, workload: Workload) -> float:
    """2 * matmul_params * s + layers * 4 * s^2 * hidden per frame, s its tokens (prefix included)."""
    p, c = matmul_params(model), model.config
    total = 0.0
    for t, h, w in workload.grid:
        s = h * w + model.num_prefix
        total += t * (2.0 * p * s + c.num_layers * 4.0 * s * s * c.hidden_size)
    return total
