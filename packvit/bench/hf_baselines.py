"""The Hugging Face models run the way users run them today on a mixed batch.

* SigLIP2 NaFlex: one padded batch, ``pixel_attention_mask`` and ``spatial_shapes``.
* DINOv3 and AIMv2: one batched call when every frame has the same size, else one call per frame.
A video frame is one more image. Inputs are prepared once, outside the timed region.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..packing import Grid


def _frames(grid: Grid) -> list[tuple[int, int]]:
    return [(h, w) for t, h, w in grid for _ in range(t)]


def _to_image(patches: torch.Tensor, h: int, w: int, p: int, c: int) -> torch.Tensor:
    """(h*w, p*p*C) patches in (p_h, p_w, C) order -> (C, h*p, w*p)."""
    return patches.view(h, w, p, p, c).permute(4, 0, 2, 1, 3).reshape(c, h * p, w * p)


class HFRunner:
    """``infer()`` -> packed (Tp, D) patch features; ``train_step()`` -> forward + backward."""

    def __init__(self, family: str, model: nn.Module, patches: torch.Tensor, grid: Grid, patch: int, channels: int = 3):
        self.family, self.model = family, model
        frames = _frames(grid)
        lens = [h * w for h, w in frames]
        self.num_patches = sum(lens)
        chunks = patches.split(lens)
        if family == "siglip2":
            self.how = "padded + mask"
            n, L = len(frames), max(lens)
            pix = patches.new_zeros(n, L, patches.shape[1])
            mask = torch.zeros(n, L, dtype=torch.long, device=patches.device)
            for i, ch in enumerate(chunks):
                pix[i, : len(ch)] = ch
                mask[i, : len(ch)] = 1
            shapes = torch.tensor(frames, dtype=torch.long, device=patches.device)
            self.calls = [dict(pixel_values=pix, pixel_attention_mask=mask, spatial_shapes=shapes)]
            self.valid = mask.bool()
        else:
            images = [_to_image(ch, h, w, patch, channels) for ch, (h, w) in zip(chunks, frames)]
            self.skip = 1 + model.config.num_register_tokens if family == "dinov3" else 0
            if len(set(frames)) == 1:
                self.how = "batched"
                self.calls = [dict(pixel_values=torch.stack(images))]
            else:
                self.how = "per-image loop"
                self.calls = [dict(pixel_values=im[None]) for im in images]

    def _features(self, out) -> list[torch.Tensor]:
        x = out.last_hidden_state
        if self.family == "siglip2":
            return [x[self.valid]]
        return [x[:, self.skip :].reshape(-1, x.shape[-1])]

    def infer(self) -> torch.Tensor:
        feats = []
        for kw in self.calls:
            feats += self._features(self.model(**kw))
        return torch.cat(feats)  # (Tp, D), frames in input order

    def train_step(self) -> None:
        # Mean square over all patch tokens; per-call backward, as a per-image loop is trained
        # (gradient accumulation), which keeps its memory at one image's activations.
        for kw in self.calls:
            for f in self._features(self.model(**kw)):
                (f.float().square().sum() / self.num_patches).backward()


def packvit_train_step(model: nn.Module, patches: torch.Tensor, grid: Grid) -> Callable[[], None]:
    def step():
        model(patches, grid).float().square().mean().backward()

    return step
