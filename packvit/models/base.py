"""The skeleton every packvit model shares: embed -> blocks -> outputs (final norm, split, heads)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import chained, fp8, quack_mlp
from ..attention import AttentionImpl, FA4Backward, resolve_attention
from ..fused_ops import resolve_fused
from ..layers import DEFAULT_TUNING, GELU_APPROXIMATE, Attention, Block, GatedMlp, Mlp, RMSNorm, Tuning
from ..packing import PackedMeta, build_meta, check_inputs, check_packed, grid_to_tuple, split_prefix


@dataclass(frozen=True, eq=False)
class PackedBatch:
    """What a forward needs to know about a batch besides its pixels: the packing metadata and the
    model's position tables, as tensors, in the named tuple the model declares (``AIMv2Tables``,
    ``Siglip2Tables``, ``DINOv3Tables``).

    ``model.prepare(grid_thw)`` builds it (cached per grid, no device sync): the host derives each
    token's position with a few vectorised ops, the device computes the tables from them.
    ``model(hidden_states, batch)`` accepts it in place of ``grid_thw``. Under ``torch.compile`` the
    compiled code sees tensors and a few integers, never the grid itself, so batches of other
    shapes reuse the graph instead of recompiling on each new grid. ``meta`` is None for an empty batch.
    """

    meta: PackedMeta | None
    tables: NamedTuple | tuple = ()

    @property
    def num_patches(self) -> int:
        return 0 if self.meta is None else self.meta.num_patches


class HiddenStates(dict):
    """layer -> tensor, readable with Hugging Face's negative indices (-1 = the last block)."""

    def __init__(self, items, num_states: int):
        super().__init__(items)
        self.num_states = num_states

    def _key(self, k):
        return k % self.num_states if isinstance(k, int) and -self.num_states <= k < 0 else k

    def __getitem__(self, k):
        return super().__getitem__(self._key(k))

    def __contains__(self, k):
        return super().__contains__(self._key(k))

    def get(self, k, default=None):
        return super().get(self._key(k), default)


@dataclass
class PackedVisionOutput:
    """Rich outputs of a packed forward. Patch tensors are (Tp, D) in input order.

    ``hidden_states`` follows Hugging Face's convention: index 0 is the embedding output, index i
    the output of block i, so ``-1`` is the last block before the final norm and ``-2`` (LLaVA's
    default ``select_layer``) the one before it. Only the requested indices are kept, keyed by
    their non-negative index; negative keys read them too (``hidden_states[-2]``).
    """

    last_hidden_state: torch.Tensor  # (Tp, D) final-normed patch tokens
    pooler_output: torch.Tensor | None = None  # (F, D) per frame, or None when the model has no pooling
    prefix_tokens: torch.Tensor | None = None  # (F, P, D) final-normed CLS/registers, or None
    hidden_states: dict[int, torch.Tensor] | None = None  # layer -> (Tp, D)
    prefix_hidden_states: dict[int, torch.Tensor] | None = None  # layer -> (F, P, D)
    meta: PackedMeta | None = None


class PackedViT(nn.Module):
    """Base class. Subclasses define ``config``, ``num_prefix``, ``embed``, ``blocks``, ``norm``, ``pool``."""

    num_prefix: int = 0
    blocks: nn.ModuleList
    truncated: bool = False  # see ``truncate``
    uses_rope: bool = False  # whether the blocks get RoPE tables (DINOv3): only then is a fused RoPE chosen

    def __init__(self):
        super().__init__()
        # The attention kernel, chosen once by ``set_attention`` (each model's __init__ calls it
        # last, once its parameters exist) and passed to every block and pooling head.
        self.attention: AttentionImpl | None = None
        # Fused elementwise kernels between the matmuls (``packvit.fused_ops``): "auto" takes them
        # wherever they run (CUDA, fp16/bf16, library present) beside a fused attention kernel,
        # "on" also beside ``sdpa``, "off" keeps the reference ops.
        # ``fused_kernels`` is what was resolved: op -> implementation, or None.
        self.fused_kernels_request = "auto"
        self.fused_kernels: dict[str, str | None] = resolve_fused("off", "cpu", torch.float32, "sdpa")
        self.gradient_checkpointing = False  # False, True (whole blocks) or "mlp"; see the setter
        self.fp8: list[str] = []  # the linears that run FP8 matmuls from their crossover on (``set_fp8``)
        self.tuning = DEFAULT_TUNING  # the fused path's speed/memory trade-offs (``set_tuning``)

    # -- set-up ---------------------------------------------------------------------------------

    @property
    def gradient_checkpointing(self) -> bool | str:
        """Activation checkpointing in training: ``False``; ``True`` (or ``"block"``): each block's
        activations are recomputed in backward (least memory, one more forward); ``"mlp"``: only
        the MLPs' (the largest activations, for about a third of the forward's matmuls again)."""
        return self._gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool | str) -> None:
        if value == "block":
            value = True
        if value not in (False, True, "mlp"):
            raise ValueError(f"gradient_checkpointing must be False, True, 'block' or 'mlp', got {value!r}")
        self._gradient_checkpointing = value

    @property
    def patch_dim(self) -> int:
        c = self.config
        return c.patch_size * c.patch_size * c.num_channels

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def set_attention(
        self,
        backend: str | AttentionImpl = "auto",
        dtype: torch.dtype | None = None,
        *,
        fa4_backward: FA4Backward | None = None,
    ) -> AttentionImpl:
        """Choose the attention kernel once, for where the model is now, and hold it as ``model.attention``.

        ``backend``: "auto", a backend name (``packvit.attention.BACKENDS``) or an ``AttentionImpl``
        made by ``packvit.attention.resolve_attention`` (checked to run here). ``dtype`` is the dtype
        attention computes in, by default the weights'; pass ``torch.bfloat16`` when fp32 weights
        compute in bf16 (autocast, FSDP2 mixed precision), so that a fused kernel is chosen rather
        than the fp32 reference. ``fa4_backward`` is the ``fa4`` backend's backward rule; None keeps
        the one held. Raises a clear error, leaving the model as it was, if the kernel cannot run
        here. The fused elementwise kernels are chosen again with it (``set_fused_kernels``).

        Moving the model (``.to()``, ``.cuda()``, ``.half()``) keeps the choice. Its forward checks
        it against the model's device and compute dtype, and raises if the kernel cannot run there
        or if an ``auto`` choice would now pick another kernel: call ``set_attention`` after a move
        (``from_pretrained(..., device=, dtype=)`` chooses for the final place at once).
        """
        if isinstance(backend, AttentionImpl):
            if dtype is not None or fa4_backward is not None:
                raise TypeError(
                    "set_attention takes dtype and fa4_backward only with a backend name, "
                    "not with an AttentionImpl (which holds both)"
                )
            impl = resolve_attention(backend, self.device, backend.compute_dtype or self.dtype)
        else:
            if fa4_backward is None and self.attention is not None:
                fa4_backward = self.attention.fa4_backward
            impl = resolve_attention(
                backend, self.device, dtype or self.dtype, compute_dtype=dtype, fa4_backward=fa4_backward
            )
        self.attention = impl
        self.set_fused_kernels(self.fused_kernels_request, dtype)
        return impl

    def refresh_attention(self) -> AttentionImpl:
        """Make the held attention choice again, from the same request, if the model has moved to
        another device type or dtype since it was made; returns the choice held.

        For adapters whose framework moves the model after loading it (LLaVA's ``tower.to(device,
        dtype)``, transformers' device placement): ``PackedVisionTower`` and ``PackvitVisionModel``
        call it before each eager forward. A model's own forward never re-chooses (it raises)."""
        a = self.attention
        if not a.runs_on(self.device, a.compute_dtype or self.dtype):
            self.set_attention(a.request, a.compute_dtype)
        return self.attention

    # Names of earlier releases, kept working.
    def set_attention_backend(self, name: str = "auto", dtype: torch.dtype | None = None) -> str:
        """``set_attention(name, dtype)``, returning the chosen backend's name."""
        return self.set_attention(name, dtype).name

    @property
    def attn_backend(self) -> str:
        """The name of the attention kernel that runs (``model.attention.name``)."""
        return self.attention.name

    @property
    def attn_backend_request(self) -> str:
        return self.attention.request

    @property
    def attn_compute_dtype(self) -> torch.dtype | None:
        return self.attention.compute_dtype

    def set_fused_kernels(self, name: str = "auto", dtype: torch.dtype | None = None) -> dict[str, str | None]:
        """Choose the fused elementwise kernels (add + norm, SwiGLU, RoPE) for this model's device and
        compute dtype: ``"auto"`` (every one that runs here, unless attention is the ``sdpa``
        reference), ``"on"`` (also with ``sdpa``) or ``"off"`` (the reference ops). Called by
        ``set_attention``; like it, kept when the model is moved. Returns op -> implementation or None."""
        dtype = dtype or self.attention.compute_dtype or self.dtype
        fused = resolve_fused(name, self.device, dtype, self.attention.name)
        if not self.uses_rope:
            fused["rope"] = None
        self.fused_kernels_request, self.fused_kernels = name, fused
        for m in self.modules():
            if isinstance(m, Block):
                m.fused_add_norm = fused["add_rmsnorm" if isinstance(m.norm2, RMSNorm) else "add_layernorm"]
            elif isinstance(m, RMSNorm):
                m.fused = fused["rmsnorm"]
            elif isinstance(m, GatedMlp):
                m.fused = fused["swiglu"] if m.act_name == "silu" else None
            elif isinstance(m, Mlp):
                m.fused = fused["gelu_mlp"] if m.act_name in quack_mlp.ACTIVATIONS else None
                m.fused_gelu_fp8 = fused["gelu_fp8"] if m.act_name in GELU_APPROXIMATE else None
            elif isinstance(m, Attention):
                m.fused_rope = fused["rope"]
        return fused

    def set_tuning(self, **changes) -> Tuning:
        """Change the fused path's speed and memory trade-offs (``packvit.layers.Tuning``: fields
        ``train_saves_less``, ``mlp_chunk_tokens``, ``quack_min_tokens``), held as one value by the
        model and read by its blocks; shown in ``repr`` when not the defaults. Returns the value held."""
        tuning = replace(self.tuning, **changes)  # an unknown field is a TypeError naming it
        for m in self.modules():
            if isinstance(m, (Mlp, GatedMlp, Attention)):
                m.tuning = tuning
        self.tuning = tuning
        return tuning

    def set_fp8(
        self,
        enabled: bool = True,
        *,
        skip=None,
        min_tokens: int | None = None,
        min_tokens_train: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> list[str]:
        """FP8 (e4m3, row-wise scales) matmuls for the blocks' qkv / proj / fc1 / fc2, each from its
        token crossover on (bf16 below it); see ``packvit.fp8``. Returns the layers converted.

        skip: layer names or kinds that stay bf16 (default: the family's, ``fp8.DEFAULT_SKIP``).
        min_tokens / min_tokens_train: one crossover for every layer in place of the measured ones.
        dtype: the compute dtype, if not the weights' (fp32 masters under FSDP2 mixed precision).
        Needs a CUDA GPU of compute capability >= 8.9 and bf16 compute; ``set_fp8(False)`` undoes it.
        """
        if not enabled:
            fp8.unconvert(self)
            self.fp8 = []
            return []
        fp8.check_device(self.device, dtype or self.attn_compute_dtype or self.dtype)
        fp8.unconvert(self)
        self.fp8 = fp8.convert(
            self,
            skip=fp8.default_skip(self) if skip is None else skip,
            min_tokens=min_tokens,
            min_tokens_train=min_tokens_train,
        )
        return self.fp8

    def extra_repr(self) -> str:
        on = ", ".join(f"{k}={v}" for k, v in self.fused_kernels.items() if v) or "off"
        fp8 = f", fp8=[{len(self.fp8)} linears]" if getattr(self, "fp8", None) else ""
        tuning = f", {self.tuning}" if self.tuning != DEFAULT_TUNING else ""
        return f"attention={self.attention!r}, fused_kernels=[{on}]{fp8}{tuning}"

    def compile_blocks(self, **kwargs) -> "PackedViT":
        """Regional ``torch.compile``: each block's forward compiled in place (they share one code
        object, so one graph), with dynamic token counts so batches of other sizes reuse it. The
        embedding, the position tables and the heads stay eager: they are cheap, and they start
        from the grid, host data. Attention runs as an opaque op (see ``packvit.attention``).
        ``uncompile_blocks()`` undoes it."""
        kwargs.setdefault("dynamic", True)
        for block in self.blocks:
            vars(block).pop("forward", None)  # compiling twice compiles the eager forward again
            block.forward = torch.compile(block.forward, **kwargs)
        return self

    def uncompile_blocks(self) -> "PackedViT":
        """Undo ``compile_blocks()``: the blocks run their eager forward again (the compiled code
        stays in torch's cache; ``torch._dynamo.reset()`` drops it)."""
        for block in self.blocks:
            vars(block).pop("forward", None)  # the instance attribute compile_blocks set
        return self

    @property
    def blocks_compiled(self) -> bool:
        """Whether ``compile_blocks()`` is in effect."""
        return any("forward" in vars(block) for block in self.blocks)

    def truncate(self, num_blocks: int) -> "PackedViT":
        """Keep the first ``num_blocks`` blocks; drop the rest, the final norm and the pooling head.

        The model then returns hidden state ``num_blocks`` (Hugging Face indexing) as its output:
        what a tower that reads an intermediate layer needs (LLaVA's ``select_layer``), without
        the compute of the layers it does not read, and without parameters that would never get
        a gradient (which DDP reports as an error)."""
        if not 0 <= num_blocks <= len(self.blocks):
            raise ValueError(f"num_blocks must be in [0, {len(self.blocks)}], got {num_blocks}")
        self.blocks = nn.ModuleList(list(self.blocks)[:num_blocks])
        self.norm = nn.Identity()
        if getattr(self, "head", None) is not None:
            del self.head  # out of _modules, not a None entry there (accelerate's walks break on those)
            self.head = None
        self.truncated = True
        return self

    # -- forward --------------------------------------------------------------------------------

    def prepare(self, grid_thw, device: torch.device | str | None = None) -> PackedBatch:
        """Validate ``grid_thw`` and build the batch's metadata and position tables (see ``PackedBatch``)."""
        if isinstance(grid_thw, PackedBatch):
            return grid_thw
        grid = grid_to_tuple(grid_thw)
        if not grid:
            return PackedBatch(None)
        meta = build_meta(grid, self.num_prefix, torch.device(device) if device is not None else self.device)
        return PackedBatch(meta, self.position_tables(meta))

    def position_tables(self, meta: PackedMeta) -> NamedTuple | tuple:
        """The per-batch position tables ``embed`` uses, as the model's named tuple, built for the
        whole batch from ``packing.token_positions`` (cached per grid)."""
        return ()

    def embed(
        self, patches: torch.Tensor, meta: PackedMeta, tables: NamedTuple | tuple
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """(Tp, patch_dim) -> packed tokens (T, D) and the rotary (cos, sin) tables, if any."""
        raise NotImplementedError

    def pool(self, x: torch.Tensor, meta: PackedMeta) -> torch.Tensor | None:
        """Final-normed packed tokens (T, D) -> (F, D) per-frame pooled output, or None."""
        return None

    def _layer_indices(self, output_layers: Sequence[int] | None) -> set[int]:
        n = len(self.blocks) + 1
        out = set()
        for i in output_layers or ():
            if not isinstance(i, int) or not -n <= i < n:
                raise ValueError(
                    f"output_layers entry {i!r} is out of range: this model has {n} hidden states "
                    f"(embeddings and {n - 1} blocks), so indices run from {-n} to {n - 1}"
                )
            out.add(i % n)
        return out

    def forward(
        self,
        hidden_states: torch.Tensor,
        grid_thw: torch.Tensor | Sequence[Sequence[int]] | PackedBatch,
        *,
        output_layers: Sequence[int] | None = None,
        return_dict: bool = False,
    ) -> torch.Tensor | PackedVisionOutput:
        """Encode a packed batch: ``embed`` -> ``run_blocks`` -> ``make_outputs``.

        hidden_states: (Tp, p*p*C) patches in (p_h, p_w, C) order; grid_thw: (N, 3) (t, h, w), or
        the ``PackedBatch`` that ``prepare(grid_thw)`` made (what a compiled caller passes).
        Returns the final-normed patch tokens (Tp, D) in input order, or, with ``return_dict`` or
        ``output_layers``, a ``PackedVisionOutput``. An empty batch (N = 0) returns empty outputs.
        """
        batch = self._checked_batch(hidden_states, grid_thw)
        keep = self._layer_indices(output_layers)
        rich = return_dict or output_layers is not None
        if batch.meta is None:
            return self._empty(hidden_states, keep, rich)
        x, rope = self.embed(hidden_states.to(self.dtype), batch.meta, batch.tables)  # (T, D)
        x, layers = self.run_blocks(x, batch.meta, rope, keep)
        return self.make_outputs(x, batch.meta, layers, rich)

    def _checked_batch(self, hidden_states: torch.Tensor, grid_thw) -> PackedBatch:
        """The batch's ``PackedBatch``, after checking the inputs against it and the held attention
        choice against where the model now is (see ``set_attention``)."""
        if not isinstance(grid_thw, PackedBatch):  # rows against the grid before any table is built
            grid_thw = check_packed(hidden_states, grid_thw, self.patch_dim)
        batch = self.prepare(grid_thw, getattr(hidden_states, "device", None))
        check_inputs(hidden_states, batch.num_patches, self.patch_dim)
        if batch.meta is not None and batch.meta.cu_seqlens.device != hidden_states.device:
            raise ValueError(
                f"grid_thw is a PackedBatch prepared for {batch.meta.cu_seqlens.device} but hidden_states is on "
                f"{hidden_states.device}: call prepare(grid_thw, device=hidden_states.device)"
            )
        if not torch.compiler.is_compiling():  # a compiled forward guards on what it was traced with
            self.attention.check(self.device, self.attention.compute_dtype or self.dtype)
        return batch

    def run_blocks(
        self,
        x: torch.Tensor,
        meta: PackedMeta,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        keep: set[int] = frozenset(),
        attn: AttentionImpl | None = None,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """x (T, D) through every block with the model's attention (or ``attn``), checkpointed as
        ``gradient_checkpointing`` says in training. Returns the last block's output and
        {i: hidden state i} for each i in ``keep`` (0: x itself, i: block i's output)."""
        attn = self.attention if attn is None else attn
        layers = {0: x} if 0 in keep else {}
        ckpt = self.gradient_checkpointing if self.training and torch.is_grad_enabled() else False
        chain = chained.chains(self, x, ckpt)
        if chain:  # the fused path: each norm1 in the previous block's last kernel (``packvit.chained``)
            x, chained_layers = chained.run_blocks(self.blocks, x, meta, rope, keep, ckpt == "mlp", attn=attn)
            layers.update(chained_layers)
        for i, block in enumerate(() if chain else self.blocks, start=1):
            if ckpt == "mlp":
                x = block(x, meta, rope, attn=attn, checkpoint_mlp=True)
            elif ckpt:
                x = checkpoint(block, x, meta, rope, attn=attn, use_reentrant=False)
            else:
                x = block(x, meta, rope, attn=attn)
            if i in keep:
                layers[i] = x
        return x, layers

    def make_outputs(
        self, x: torch.Tensor, meta: PackedMeta, layers: dict[int, torch.Tensor], rich: bool
    ) -> torch.Tensor | PackedVisionOutput:
        """The last block's output (T, D) -> final norm -> ``assemble_outputs``."""
        return self.assemble_outputs(self.norm(x), meta, layers, rich)

    def assemble_outputs(
        self,
        x: torch.Tensor,
        meta: PackedMeta,
        layers: dict[int, torch.Tensor],
        rich: bool,
        pooled: torch.Tensor | None = None,
    ) -> torch.Tensor | PackedVisionOutput:
        """Final-normed tokens (T, D) -> patch tokens (Tp, D) in input order; with ``rich``, a
        ``PackedVisionOutput`` that adds the pooled output (``pooled`` if the caller has it, e.g. a
        CUDA graph's, else ``pool(x)``), the prefix tokens and the kept hidden states, each split
        into patches and prefix."""
        patches, prefix = split_prefix(x, meta)
        if not rich:
            return patches
        split = {i: split_prefix(h, meta) for i, h in layers.items()}
        n = len(self.blocks) + 1
        return PackedVisionOutput(
            last_hidden_state=patches,
            pooler_output=pooled if pooled is not None else self.pool(x, meta),
            prefix_tokens=prefix,
            hidden_states=HiddenStates({i: p for i, (p, _) in split.items()}, n),
            prefix_hidden_states=HiddenStates({i: q for i, (_, q) in split.items()}, n) if self.num_prefix else None,
            meta=meta,
        )

    def _empty(self, hidden_states: torch.Tensor, want: set[int], rich: bool):
        empty = torch.zeros(0, self.hidden_size, device=hidden_states.device, dtype=self.dtype)
        if not rich:
            return empty
        pref = empty.view(0, self.num_prefix, self.hidden_size) if self.num_prefix else None
        return PackedVisionOutput(
            last_hidden_state=empty,
            pooler_output=empty if self.has_pooler else None,
            prefix_tokens=pref,
            hidden_states=HiddenStates({i: empty for i in want}, len(self.blocks) + 1),
            prefix_hidden_states=HiddenStates({i: pref for i in want}, len(self.blocks) + 1)
            if self.num_prefix
            else None,
        )

    @property
    def has_pooler(self) -> bool:
        return False
