"""Sliding-window KV cache: sink frames plus the most recent frames, per layer.

Storage is a fixed ring of ``W`` physical slots per stream and layer, holding
*un-rotated* K and V: ``k, v [L, B, W, N, H, D]``. The logical order of the window
(oldest first, sinks leading) is kept on the host as a list of (global frame, slot);
all streams of a batch move in lockstep, so one order serves the whole batch.
Frames never move between slots: eviction only frees the slot.

The window also keeps the clean latents of the frames it holds, by slot (a ring of W
frames, allocated on the first block): a prompt switch (SPEC section 7) recomputes the
window's K/V from them, so the memory they take is O(window), not O(video).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..runtime.transfer import index_tensor


@dataclass(frozen=True)
class WindowFrame:
    frame: int   # global frame index
    slot: int    # physical slot in the ring


@dataclass(frozen=True)
class BlockPlacement:
    """Where a new block goes and what it pushes out (all host-side integers)."""

    evicted: tuple[WindowFrame, ...]     # oldest first
    block: tuple[WindowFrame, ...]       # the new block's frames
    order: tuple[WindowFrame, ...]       # window after insertion, oldest first


class WindowCache:
    def __init__(self, num_layers: int, batch: int, window: int, sink: int, tokens_per_frame: int,
                 num_heads: int, head_dim: int, descriptor_dim: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        self.window, self.sink = window, sink
        shape = (num_layers, batch, window, tokens_per_frame, num_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # Descriptor of the frame in each slot, moved to the history with the frame.
        self.descriptors = torch.zeros(batch, window, descriptor_dim, dtype=torch.float32, device=device)
        self.order: list[WindowFrame] = []
        self.next_frame = 0
        # Clean latents [B, W, ...] of the frame in each slot; made by the first store.
        self.latents: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.order)

    def plan_block(self, frames: int) -> BlockPlacement:
        """Place ``frames`` new frames; evict the oldest non-sink frames that do not fit."""
        overflow = max(0, len(self.order) + frames - self.window)
        kept_sinks = self.order[: self.sink]
        evicted = self.order[self.sink: self.sink + overflow]
        survivors = kept_sinks + self.order[self.sink + overflow:]
        used = {f.slot for f in survivors}
        free = [s for s in range(self.window) if s not in used]
        block = [WindowFrame(self.next_frame + i, free[i]) for i in range(frames)]
        return BlockPlacement(tuple(evicted), tuple(block), tuple(survivors + block))

    def commit(self, placement: BlockPlacement) -> None:
        self.order = list(placement.order)
        self.next_frame = placement.block[-1].frame + 1

    def store_latents(self, slots: torch.Tensor, clean: torch.Tensor) -> None:
        """Keep the clean latents ``clean [B, F, ...]`` of the frames in ``slots [F]``."""
        clean = clean.detach()
        batch, window = self.descriptors.shape[:2]
        if self.latents is None:
            # A normal tensor even when the first store runs under inference_mode, so later
            # in-place stores work in and out of it.
            with torch.inference_mode(False):
                self.latents = torch.zeros((batch, window, *clean.shape[2:]), dtype=clean.dtype,
                                           device=self.k.device)
        elif tuple(self.latents.shape[2:]) != tuple(clean.shape[2:]):
            raise ValueError(f"clean frames of shape {list(clean.shape[2:])} differ from the earlier blocks' "
                             f"{list(self.latents.shape[2:])}")
        self.latents.index_copy_(1, slots, clean.to(self.latents.device, self.latents.dtype))

    def gather(self, frames: tuple[WindowFrame, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """K, V [L, B, Fe, N, H, D] and descriptors [B, Fe, Dd] of ``frames`` (copies)."""
        slots = index_tensor([f.slot for f in frames], self.k.device)
        return (self.k.index_select(2, slots), self.v.index_select(2, slots),
                self.descriptors.index_select(1, slots))

    def page_ids(self, slots: list[int]) -> torch.Tensor:
        """Page ids [L, B, len(slots)] of slots when ``k``/``v`` are viewed as pages
        ``[L*B*W, N, H, D]``; a slot of -1 stays -1."""
        num_layers, batch, window = self.k.shape[:3]
        slot_t = index_tensor(slots, self.k.device)
        base = torch.arange(num_layers * batch, device=self.k.device).view(num_layers, batch, 1) * window
        pages = base + slot_t
        return torch.where(slot_t >= 0, pages, torch.full_like(pages, -1))

    def page_pools(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k.flatten(0, 2), self.v.flatten(0, 2)
