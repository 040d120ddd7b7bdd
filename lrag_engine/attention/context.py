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

from ..ops.rope import RopeTables, apply_rope_ref
from .backend import AttendFn


class ContextBuffer:
    """Rotated K and V of the context, ``[L, B, max_frames * N, H, D]`` each."""

    def __init__(self, num_layers: int, batch: int, max_frames: int, tokens_per_frame: int,
                 num_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (num_layers, batch, max_frames * tokens_per_frame, num_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.tokens_per_frame = tokens_per_frame


@dataclass
class BlockAttention:
    """Self-attention of one forward of one block: ``__call__(layer, q, k, v)``.

    q, k, v [B, F*N, H, D] with q, k normed and un-rotated. The block's K/V go to the
    context tail (rotated K); when ``window_k`` is given (the recache pass), the
    un-rotated K and V are also stored into the block's window slots, or, with
    ``stage_k`` (a recache pass that static forwards share), into that staging area
    ``[L, B, F*N, H, D]``.
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

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.refetch is not None:
            self.refetch(layer)
        n_block = q.shape[1]
        end = self.context_frames * self.context.tokens_per_frame
        start = end - n_block
        ctx_k, ctx_v = self.context.k[layer], self.context.v[layer]
        ctx_k[:, start:end] = apply_rope_ref(k, self.block_cos, self.block_sin)
        ctx_v[:, start:end] = v
        if self.window_k is not None:
            b, _, h, d = k.shape
            frames = self.block_slots.shape[0]
            self.window_k[layer].index_copy_(1, self.block_slots, k.reshape(b, frames, -1, h, d))
            self.window_v[layer].index_copy_(1, self.block_slots, v.reshape(b, frames, -1, h, d))
        if self.stage_k is not None:
            self.stage_k[layer].copy_(k)
            self.stage_v[layer].copy_(v)
        q_rot = apply_rope_ref(q, self.block_cos, self.block_sin)
        return self.attend(q_rot, ctx_k[:, :end], ctx_v[:, :end])


def block_rope(tables: RopeTables, positions: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [F*N, D/2] for a block at temporal ``positions``."""
    cos, sin = tables.frame_cos_sin(torch.tensor(positions))
    return cos.flatten(0, 1).to(device), sin.flatten(0, 1).to(device)
