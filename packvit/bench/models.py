"""Real-size model pairs for the benchmarks: a transformers model (the reference, built by
``weights_conversion.reference``) and the packvit model converted from its very weights, plus the
FLOP count of BENCHMARKS.md."""

from __future__ import annotations

import torch
from torch import nn

from weights_conversion import FAMILIES, build_model, convert_state_dict
from weights_conversion.reference import build_hf

from ..models.base import PackedViT
from .workloads import Workload

# The published checkpoint each family is benchmarked at (../shared/BENCHMARKS.md).
DEFAULT_PRESETS = {
    "siglip2": "siglip2-so400m-patch16-naflex",
    "dinov3": "dinov3-vitl16-pretrain-lvd1689m",
    "aimv2": "aimv2-large-patch14-native",
}
TINY = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)

@torch.no_grad()
def _perturb_degenerate_(model: nn.Module, seed: int) -> None:
    """transformers initialises biases, norms and LayerScale to constants; give them noise so a
    swapped bias or a missing scale cannot hide behind zeros and ones."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    for p in model.parameters():
        flat = p.detach().flatten()
        if flat.numel() and bool((flat == flat[0]).all()):
            p.add_((torch.randn(p.shape, generator=g) * 0.02).to(p.device, p.dtype))


def build_pair(
    family: str, preset: str | None, device: torch.device, dtype: torch.dtype, backend: str, tiny: bool = False
) -> tuple[nn.Module, PackedViT]:
    """(HF model, packvit model) with identical weights, both eval, on ``device`` in ``dtype``."""
    fam = FAMILIES[family]
    cfg = fam.CONFIG_CLASS.from_name(preset or DEFAULT_PRESETS[family], **(TINY if tiny else {}))
    torch.manual_seed(0)
    hf = build_hf(family, cfg, device)
    _perturb_degenerate_(hf, seed=0)
    hf = hf.to(dtype).eval()
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}  # no storage shared with HF
    fam_name, pcfg, sd, _ = convert_state_dict(hf.config.to_dict(), state, family=family)
    model = build_model(fam_name, pcfg, sd, attn_backend=backend).eval()
    return hf, model


def matmul_params(model: PackedViT) -> int:
    """Weights of every matmul a token goes through: the patch embedding and the blocks (the pooling
    head runs once per frame and is left out, as in BENCHMARKS.md)."""
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
