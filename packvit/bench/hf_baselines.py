"""The Hugging Face models run the way users run them today on a mixed batch.

* A model that takes a padded batch (SigLIP2 NaFlex, ``Family.hf_pads``): one call, with a mask.
* The others (DINOv3, AIMv2): one batched call when every frame has the same size, else one call per frame.
A video frame is one more image. Inputs are prepared once, outside the timed region; the
family's ``hf_inputs`` builds them, as for every other comparison with transformers.
"""

from __future__ import annotations

import torch
from torch import nn

from weights_conversion import FAMILIES

from ..packing import Grid, unpatchify


class HFRunner:
    """``infer()`` -> packed (Tp, D) patch features; ``train_step()`` -> forward + backward."""

    def __init__(self, family: str, model: nn.Module, patches: torch.Tensor, grid: Grid, patch: int, channels: int = 3):
        fam = FAMILIES[family]
        self.model = model
        still = tuple((1, h, w) for t, h, w in grid for _ in range(t))  # a video frame is one more image
        frames = unpatchify(patches, still, patch, channels)  # (C, H, W) each
        self.lens = [h * w for _, h, w in still]
        self.num_patches = sum(self.lens)
        self.prefix = fam.num_prefix_tokens(model.config)
        if fam.hf_pads:
            self.how, groups = "padded + mask", [list(range(len(frames)))]
        elif len(set(still)) == 1:
            self.how, groups = "batched", [list(range(len(frames)))]
        else:
            self.how, groups = "per-image loop", [[i] for i in range(len(frames))]
        self.calls = [(fam.hf_inputs([frames[i] for i in g], patch), [self.lens[i] for i in g]) for g in groups]

    def _features(self, out, lens: list[int]) -> torch.Tensor:
        """One call's patch tokens, (sum of lens, D): the prefix and any padding left out."""
        x, p = out.last_hidden_state, self.prefix  # (B, P + L, D)
        if len(set(lens)) == 1:
            return x[:, p : p + lens[0]].reshape(-1, x.shape[-1])
        return torch.cat([x[i, p : p + n] for i, n in enumerate(lens)])

    def infer(self) -> torch.Tensor:
        feats = []
        for kw, lens in self.calls:
            feats.append(self._features(self.model(**kw), lens))
        return torch.cat(feats)  # (Tp, D), frames in input order

    def train_step(self) -> None:
        # Mean square over all patch tokens; per-call backward, as a per-image loop is trained
        # (gradient accumulation), which keeps its memory at one image's activations.
        for kw, lens in self.calls:
            f = self._features(self.model(**kw), lens)
            (f.float().square().sum() / self.num_patches).backward()
