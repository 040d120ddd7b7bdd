"""History byte budgets turned into pages and frames, computed in one place.

A page holds the K and V of one frame of one layer of one stream; a history frame
of a batch of B streams is ``num_layers * B`` pages. Each budget holds
``budget // page_bytes`` pages; the history keeps at most
``(gpu pages + host pages) // pages_per_frame`` frames before the overflow policy
acts. With ``history_tier="host"`` the device pool is a staging area sized for one
block's retrieved and evicted frames (``top_k + frames_per_block`` frames); its pages
hold history frames as well, so they count towards the capacity.

``max_history_frames`` caps the frames each stream keeps whatever the budgets: a
session of B streams then never holds more than ``max_history_frames * num_layers * B``
pages (``HistoryBudget.max_pages``), which is what a scheduler reserves for it. With
``history_dtype="fp8_e4m3"`` a page holds e4m3 codes plus one float32 scale per head
(K and V each): about half the bytes of a bf16 page.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import MemoryConfig
from ..ops.quant import fp8_page_bytes, storage_dtype


def page_bytes(tokens_per_frame: int, num_heads: int, head_dim: int, dtype: torch.dtype,
               history_dtype: str | None = None) -> int:
    """K+V bytes of one page: one frame of one layer of one stream, stored in ``dtype``
    (the compute dtype) or, with ``history_dtype="fp8_e4m3"``, as e4m3 codes and per-head
    float32 scales."""
    if storage_dtype(history_dtype, dtype) != dtype:
        return fp8_page_bytes(tokens_per_frame, num_heads, head_dim)
    return 2 * tokens_per_frame * num_heads * head_dim * dtype.itemsize


@dataclass(frozen=True)
class HistoryBudget:
    """Sizes of the history of one batch of streams.

    page_bytes: K+V bytes of one page ([tokens_per_frame, heads, head_dim] each).
    pages_per_frame: num_layers * batch.
    gpu_bytes: device pool budget (None: a pool that grows); the staging pool for the
        host tier.
    host_bytes: pinned host tier budget (None: no host tier).
    capacity_frames: frames kept before the overflow policy acts (None: unbounded).
    host_only: the whole history lives in host memory (the per-forward baseline).
    chunk_pages: pages per chunk of the page pool (``memory.page_chunk_bytes``, at
        least one page).
    max_frames: ``memory.max_history_frames``, the frames each stream keeps at most
        (None: no cap).
    """

    page_bytes: int
    pages_per_frame: int
    gpu_bytes: int | None
    host_bytes: int | None
    capacity_frames: int | None
    host_only: bool = False
    chunk_pages: int = 1
    max_frames: int | None = None

    @property
    def frame_bytes(self) -> int:
        return self.page_bytes * self.pages_per_frame

    @property
    def held_frames(self) -> int | None:
        """Most frames the history of this batch holds at once: the cap or the budgets'
        capacity, whichever is lower (None: neither bounds it)."""
        bounds = [b for b in (self.max_frames, self.capacity_frames) if b is not None]
        return min(bounds) if bounds else None

    @property
    def max_pages(self) -> int | None:
        """Most pages the history of this batch of streams holds at once (None: unbounded)."""
        held = self.held_frames
        return None if held is None else held * self.pages_per_frame

    @property
    def max_bytes(self) -> int | None:
        """K+V bytes of :attr:`max_pages` (None: unbounded)."""
        held = self.held_frames
        return None if held is None else held * self.frame_bytes

    @property
    def gpu_frames(self) -> int | None:
        """Whole frames the device pool holds at once (None: it grows)."""
        return None if self.gpu_bytes is None else self.gpu_bytes // self.page_bytes // self.pages_per_frame

    @classmethod
    def plan(cls, memory: MemoryConfig, num_layers: int, batch: int, tokens_per_frame: int, num_heads: int,
             head_dim: int, dtype: torch.dtype, host_only: bool = False) -> "HistoryBudget":
        """Budgets of ``memory`` at these shapes. ``host_only``: the whole history lives in
        host memory under ``host_budget_bytes`` with no device pool (the per-forward
        refetch baseline)."""
        page = page_bytes(tokens_per_frame, num_heads, head_dim, dtype, memory.history_dtype)
        per_frame = num_layers * batch
        host = memory.host_budget_bytes
        if host_only:
            gpu, host = host, None
        elif memory.history_tier == "host":
            gpu = (memory.top_k + memory.frames_per_block) * per_frame * page
        else:
            gpu = memory.gpu_budget_bytes
        if gpu is None:
            capacity = None
        else:
            capacity = (gpu // page + (host or 0) // page) // per_frame
        chunk_pages = max(1, memory.page_chunk_bytes // page)
        return cls(page, per_frame, gpu, host, capacity, host_only, chunk_pages, memory.max_history_frames)

    def pool_pages(self) -> tuple[int | None, int | None]:
        """Page budgets of the device and host tiers of a page pool (None: grows
        without bound; 0: no such tier). A host-only history (the per-forward baseline)
        has no device tier: its budget (``gpu_bytes`` here) is the host tier's."""
        if self.host_only:
            return 0, None if self.gpu_bytes is None else self.gpu_bytes // self.page_bytes
        gpu = None if self.gpu_bytes is None else self.gpu_bytes // self.page_bytes
        host = 0 if self.host_bytes is None else self.host_bytes // self.page_bytes
        return gpu, host

    def describe(self) -> str:
        held = "unbounded" if self.held_frames is None else f"{self.held_frames} frames"
        return f"history of {held} at {self.frame_bytes} bytes per frame"
