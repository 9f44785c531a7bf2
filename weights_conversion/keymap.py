"""A declarative, reversible key map between a Hugging Face state dict and a packvit one.

Each ``Entry`` names one packvit tensor, the HF tensors it is made from and a named ``Transform``
that goes both ways. ``{n}`` in a key stands for the block index. Conversion is exhaustive: every
HF tensor is consumed by an entry, or dropped by a ``Drop`` rule that says why; anything else, and
any missing tensor or wrong shape, is an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

Tensors = dict[str, torch.Tensor]


class ConversionError(ValueError):
    """A checkpoint does not match the layout its converter expects."""


def count_layers(keys, block_prefix: str, source: str) -> int:
    """Number of blocks in a state dict whose block tensors are named ``<block_prefix>N.``."""
    pattern = re.compile(re.escape(block_prefix) + r"(\d+)\.")
    idx = [int(m.group(1)) for k in keys if (m := pattern.match(k))]
    if not idx:
        raise ConversionError(f"{source} has no {block_prefix}N. tensors")
    return max(idx) + 1


@dataclass(frozen=True)
class Transform:
    """``forward`` turns an entry's HF tensors into the packvit tensor; ``inverse(x, cfg, n)`` gives the n HF tensors back."""

    name: str
    forward: Callable[[list[torch.Tensor], Any], torch.Tensor]
    inverse: Callable[[torch.Tensor, Any, int], list[torch.Tensor]]


def _read_only(x, cfg, n):
    raise NotImplementedError("packvit reads this layout only (an original research release); export to HF instead")


def one_way(name: str, forward: Callable[[list[torch.Tensor], Any], torch.Tensor]) -> Transform:
    """A transform of a layout packvit reads and never writes (the original releases)."""
    return Transform(name, forward, _read_only)


IDENTITY = Transform("identity", lambda xs, cfg: xs[0], lambda x, cfg, n: [x])
# q, k, v -> qkv and gate, up -> fc1: one matmul instead of several (equal parts along dim 0).
CONCAT = Transform(
    "concat", lambda xs, cfg: torch.cat(xs, 0), lambda x, cfg, n: [t.contiguous() for t in x.chunk(n, 0)]
)
# A learned token stored as [1, 1, D] by HF and as [D] by packvit.
TOKEN = Transform("token", lambda xs, cfg: xs[0].reshape(-1), lambda x, cfg, n: [x.reshape(1, 1, -1)])
# A stack of learned tokens, [1, N, D] in HF and [N, D] in packvit.
TOKENS = Transform("tokens", lambda xs, cfg: xs[0].squeeze(0), lambda x, cfg, n: [x.unsqueeze(0)])


def _conv_to_linear(xs: list[torch.Tensor], cfg: Any) -> torch.Tensor:
    w = xs[0]  # (D, C, p, p)
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).contiguous()  # (D, p*p*C) in (p_h, p_w, C) order


def _linear_to_conv(x: torch.Tensor, cfg: Any, n: int) -> list[torch.Tensor]:
    p, c = cfg.patch_size, cfg.num_channels
    return [x.reshape(x.shape[0], p, p, c).permute(0, 3, 1, 2).contiguous()]


# Conv2d(kernel=p, stride=p) over an image is a Linear over patches flattened in (p_h, p_w, C) order.
CONV_TO_LINEAR = Transform("conv_to_linear", _conv_to_linear, _linear_to_conv)


@dataclass(frozen=True)
class Entry:
    dst: str  # packvit key, may contain {n}
    src: tuple[str, ...]  # HF keys, may contain {n}
    transform: Transform = IDENTITY
    optional: bool = False  # absent in some checkpoints (a head): then absent in packvit too


@dataclass(frozen=True)
class Drop:
    pattern: str  # regex over normalised HF keys
    reason: str


@dataclass(frozen=True)
class KeyMap:
    entries: tuple[Entry, ...]
    drops: tuple[Drop, ...] = ()
    # Regex renames applied to HF keys before matching: other spellings of the same layout.
    aliases: tuple[tuple[str, str], ...] = ()

    def normalise(self, key: str) -> str:
        for pattern, repl in self.aliases:
            key = re.sub(pattern, repl, key)
        return key

    def expand(self, num_layers: int, present: set[str] | None = None) -> list[tuple[str, tuple[str, ...], Entry]]:
        rows = []
        for e in self.entries:
            ns = range(num_layers) if "{n}" in e.dst else [None]
            for n in ns:
                dst = e.dst.format(n=n) if n is not None else e.dst
                src = tuple(s.format(n=n) if n is not None else s for s in e.src)
                if e.optional and present is not None and not all(s in present for s in src):
                    continue
                rows.append((dst, src, e))
        return rows


@dataclass
class ConversionReport:
    mapped: int = 0
    dropped: dict[str, list[str]] = field(default_factory=dict)  # reason -> keys
    notes: list[str] = field(default_factory=list)  # what a converter did beyond renaming (a zero bias added)

    def summary(self) -> str:
        lines = [f"{self.mapped} packvit tensors mapped"]
        for reason, keys in self.dropped.items():
            lines.append(f"{len(keys)} tensors dropped: {reason}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def from_hf(keymap: KeyMap, hf: Tensors, cfg: Any, num_layers: int) -> tuple[Tensors, ConversionReport]:
    """HF state dict -> packvit state dict, consuming every tensor or failing."""
    norm: Tensors = {}
    for k, v in hf.items():
        nk = keymap.normalise(k)
        if nk in norm:
            raise ConversionError(f"checkpoint holds {nk!r} twice (under two spellings)")
        norm[nk] = v
    report = ConversionReport()
    remaining = set(norm)
    for k in sorted(norm):
        for d in keymap.drops:
            if re.fullmatch(d.pattern, k):
                report.dropped.setdefault(d.reason, []).append(k)
                remaining.discard(k)
                break
    out: Tensors = {}
    missing = []
    for dst, src, e in keymap.expand(num_layers, present=set(norm)):
        if any(s not in norm for s in src):
            missing.extend(s for s in src if s not in norm)
            continue
        out[dst] = e.transform.forward([norm[s] for s in src], cfg)
        remaining.difference_update(src)
    if missing:
        raise ConversionError(
            f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]}; "
            "is it a checkpoint of this model family and size?"
        )
    if remaining:
        extra = sorted(remaining)
        raise ConversionError(
            f"checkpoint has {len(extra)} tensors this converter does not understand, e.g. {extra[:5]}; "
            "refusing to guess (the config may not match the weights)"
        )
    report.mapped = len(out)
    return out, report


def to_hf(keymap: KeyMap, sd: Tensors, cfg: Any, num_layers: int) -> Tensors:
    """packvit state dict -> HF state dict in the canonical (current transformers) spelling."""
    out: Tensors = {}
    used = set()
    for dst, src, e in keymap.expand(num_layers):
        if dst not in sd:
            if e.optional:
                continue
            raise ConversionError(f"packvit state dict is missing {dst!r}")
        parts = e.transform.inverse(sd[dst], cfg, len(src))
        out.update(zip(src, parts))
        used.add(dst)
    unused = sorted(set(sd) - used)
    if unused:
        raise ConversionError(f"packvit state dict has tensors with no HF counterpart: {unused[:5]}")
    return out


def check_shapes(expected: dict[str, torch.Size], got: Tensors) -> None:
    """Every tensor present with the shape the model was built with."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing:
        raise ConversionError(f"converted weights lack {len(missing)} model tensors, e.g. {missing[:5]}")
    if unexpected:
        raise ConversionError(
            f"converted weights have {len(unexpected)} tensors the model lacks, e.g. {unexpected[:5]}"
        )
    bad = [(k, tuple(got[k].shape), tuple(s)) for k, s in expected.items() if tuple(got[k].shape) != tuple(s)]
    if bad:
        k, g, s = bad[0]
        raise ConversionError(
            f"{len(bad)} tensors have the wrong shape, e.g. {k}: checkpoint {g}, model {s}; "
            "does config.json match the weights?"
        )


def check_dtypes(expected: dict[str, torch.dtype], got: Tensors) -> None:
    """Floating-point parameters must come from floating-point tensors.

    A checkpoint tensor stored as an integer or bool where the model holds a float would be
    silently cast by ``load_state_dict``; that is a broken or mislabelled file, not a weight.
    """
    bad = [
        (k, got[k].dtype, d)
        for k, d in expected.items()
        if k in got and d.is_floating_point and not got[k].is_floating_point()
    ]
    if bad:
        k, g, d = bad[0]
        raise ConversionError(
            f"{len(bad)} tensors have the wrong dtype, e.g. {k}: checkpoint {g}, expected a floating-point "
            f"tensor (the model holds {d}); is the file corrupted or not a checkpoint of this model?"
        )
