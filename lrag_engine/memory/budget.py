"""History byte budgets turned into pages and frames, computed in one place.

A page holds the K and V of one frame of one layer of one stream; a history frame
of a batch of B streams is ``num_layers * B`` pages. Each budget holds
``budget // page_bytes`` pages; the history keeps at most
``(gpu pages + host pages) // pages_per_frame`` frames before the overflow policy
acts. With ``history_tier="host"`` the device pool is a staging area sized for one
block's retrieved and evicted frames (``top_k + frames_per_block`` frames); its pages
hold history frames as well, so they count towards the capacity.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import MemoryConfig


@dataclass(frozen=True)
class HistoryBudget:
    """Sizes of the history of one batch of streams.

    page_bytes: K+V bytes of one page ([tokens_per_frame, heads, head_dim] each).
    pages_per_frame: num_layers * batch.
    gpu_bytes: device pool budget (None: a pool that grows); the staging pool for the
        host tier.
    host_bytes: pinned host tier budget (None: no host tier).
    capacity_frames: frames kept before the overflow policy acts (None: unbounded).
    """

    page_bytes: int
    pages_per_frame: int
    gpu_bytes: int | None
    host_bytes: int | None
    capacity_frames: int | None

    @property
    def frame_bytes(self) -> int:
        return self.page_bytes * self.pages_per_frame

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
        page_bytes = 2 * tokens_per_frame * num_heads * head_dim * dtype.itemsize
        per_frame = num_layers * batch
        host = memory.host_budget_bytes
        if host_only:
            gpu, host = host, None
        elif memory.history_tier == "host":
            gpu = (memory.top_k + memory.frames_per_block) * per_frame * page_bytes
        else:
            gpu = memory.gpu_budget_bytes
        if gpu is None:
            capacity = None
        else:
            capacity = (gpu // page_bytes + (host or 0) // page_bytes) // per_frame
        return cls(page_bytes, per_frame, gpu, host, capacity)

    def describe(self) -> str:
        held = "unbounded" if self.capacity_frames is None else f"{self.capacity_frames} frames"
        return f"history of {held} at {self.frame_bytes} bytes per frame"
