"""The per-layer attention context ``[sink | retrieved | local | block]`` and the
self-attention callable a backbone invokes for every layer of every forward.

The context buffer is allocated once per engine and batch size at its largest size (W frames);
``splice`` fills everything but the block once per block, and each forward writes
only the block's own rotated K and V at the tail. So retrieved K/V are gathered once
per block, not again for each layer's denoising steps, and no forward copies the cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..ops.rope_store import rope_store
from ..ops.rope import RopeTables
from .backend import AttendFn


class ContextBuffer:
    """Rotated K and V of the context, ``[L, B, max_frames * N, H, D]`` each."""

    def __init__(self, num_layers: int, batch: int, max_frames: int, tokens_per_frame: int,
                 num_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (num_layers, batch, max_frames * tokens_per_frame, num_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.tokens_per_frame = tokens_per_frame

    def rows(self, start: int, stop: int) -> "ContextBuffer":
        """A view of streams ``start:stop`` (shares storage): what one session of a batched
        forward splices into."""
        view = ContextBuffer.__new__(ContextBuffer)
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        view.tokens_per_frame = self.tokens_per_frame
        return view


@dataclass
class BlockAttention:
    """Self-attention of one forward of one block: ``__call__(layer, q, k, v)``.

    q, k, v [B, F*N, H, D] with q, k normed and un-rotated. The block's K/V go to the
    context tail (rotated K); when ``window_k`` is given (the recache pass), the
    un-rotated K and V are also stored into the block's window slots, or, with
    ``stage_k`` (a recache pass that static forwards share), into that staging area
    ``[L, B, F*N, H, D]``.

    kernels: "auto" | "triton" | "reference" (``lrag_engine.ops.dispatch``): with the
    Triton kernel, one launch per call rotates q and k and stores every K/V
    (``lrag_engine.ops.rope_store``); with the reference, the same in PyTorch ops.
    """

    context: ContextBuffer
    context_frames: int          # frames of context, block included
    block_cos: torch.Tensor      # [F*N, D/2] RoPE of the block's positions
    block_sin: torch.Tensor
    attend: AttendFn
    window_k: torch.Tensor | None = None    # [L, B, W, N, H, D]
    window_v: torch.Tensor | None = None
    block_slots: torch.Tensor | None = None  # [F] int64 slots of the block
    refetch: Callable[[int], None] | None = None  # baseline: reload retrieved K/V per layer
    stage_k: torch.Tensor | None = None     # [L, B, F*N, H, D]
    stage_v: torch.Tensor | None = None
    on_store: Callable[[int], None] | None = None   # told each layer whose window K/V were stored
    current: Callable[[], bool] | None = None       # False once its block is over (eager callables)
    kernels: str = "auto"

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self._check(layer, q, k, v)
        if self.refetch is not None:
            self.refetch(layer)
        n_block = q.shape[1]
        end = self.context_frames * self.context.tokens_per_frame
        start = end - n_block
        ctx_k, ctx_v = self.context.k[layer], self.context.v[layer]
        raw_k = raw_v = slots = None
        if self.window_k is not None:
            raw_k, raw_v, slots = self.window_k[layer], self.window_v[layer], self.block_slots
        elif self.stage_k is not None:
            raw_k, raw_v = self.stage_k[layer], self.stage_v[layer]
        q_rot = rope_store(q, k, v, self.block_cos, self.block_sin, ctx_k[:, start:end], ctx_v[:, start:end],
                           raw_k, raw_v, slots, mode=self.kernels)
        if self.window_k is not None:
            if self.on_store is not None:
                self.on_store(layer)
            if self.stage_k is not None:
                self.stage_k[layer].copy_(k)
                self.stage_v[layer].copy_(v)
        return self.attend(q_rot, ctx_k[:, :end], ctx_v[:, :end])


    def _check(self, layer, q, k, v) -> None:
        """Names the argument and the expected shape/dtype/layout; host-side metadata only."""
        if self.current is not None and not self.current():
            raise RuntimeError("attention: this self_attention callable belongs to a block that is over (or a "
                               "closed attention); get a new one with attention(recache=...) after begin_block")
        num_layers, batch, _, heads, head_dim = self.context.k.shape
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
            raise ValueError(f"attention: layer must be an int in [0, {num_layers}), got {layer!r}")
        tokens = self.block_cos.shape[0]
        want = (batch, tokens, heads, head_dim)
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
            if tuple(t.shape) != want:
                hint = ""
                if t.dim() == 4 and tuple(t.shape) == (batch, heads, tokens, head_dim):
                    hint = " (it looks like [B, H, L, D]: pass [B, L, H, D], e.g. x.transpose(1, 2))"
                elif t.dim() == 4 and t.shape[0] != batch:
                    hint = f" (batch {t.shape[0]}, but this attention was built for batch {batch})"
                raise ValueError(f"attention: {name} must be [B={batch}, L={tokens} (frames x tokens per frame), "
                                 f"H={heads}, D={head_dim}], got {list(t.shape)}{hint}")
            if t.dtype != self.context.k.dtype:
                raise ValueError(f"attention: {name} dtype {t.dtype} differs from the cache's "
                                 f"{self.context.k.dtype}")
            if t.device != self.context.k.device:
                raise ValueError(f"attention: {name} is on {t.device}, the cache on {self.context.k.device}")


def block_rope(tables: RopeTables, positions: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [F*N, D/2] for a block at temporal ``positions``."""
    cos, sin = tables.frame_cos_sin(torch.tensor(positions))
    return cos.flatten(0, 1).to(device), sin.flatten(0, 1).to(device)
