"""Descriptors and norms of the history frames, in eviction order, for the search.

A ring of ``capacity`` frames stored twice (slot ``s`` at ``s`` and ``s + capacity``):
the held frames, oldest first, are always one contiguous view ``[head, head + n)``,
so the search reads them without a gather and dropping the oldest frames moves
nothing (O(frames dropped), not O(frames held)).
"""
from __future__ import annotations

import torch


class DescriptorRing:
    """Descriptors ``[B, n, Dd]`` (float32) and their L2 norms ``[B, n]`` of n history frames."""

    def __init__(self, batch: int, dim: int, capacity: int, device: torch.device | str) -> None:
        self.batch, self.dim, self.device = batch, dim, torch.device(device)
        self.num_frames = 0
        self._head = 0
        self._alloc(max(1, capacity))

    def _alloc(self, capacity: int) -> None:
        self.capacity = capacity
        self._desc = torch.zeros(self.batch, 2 * capacity, self.dim, dtype=torch.float32, device=self.device)
        self._norms = torch.zeros(self.batch, 2 * capacity, dtype=torch.float32, device=self.device)

    def descriptors(self) -> torch.Tensor:
        """[B, n, Dd] view, oldest first."""
        return self._desc[:, self._head:self._head + self.num_frames]

    def norms(self) -> torch.Tensor:
        """[B, n] view, oldest first."""
        return self._norms[:, self._head:self._head + self.num_frames]

    def reserve(self, capacity: int) -> None:
        """Grow to hold ``capacity`` frames (a copy of the held frames; amortised by callers)."""
        if capacity <= self.capacity:
            return
        desc, norms = self.descriptors().clone(), self.norms().clone()
        self._alloc(capacity)
        self._head = 0
        self._write(0, desc, norms)

    def append(self, descriptors: torch.Tensor) -> None:
        """descriptors [B, Fe, Dd]: the newest frames, oldest first. Needs room (``reserve``)."""
        fe = descriptors.shape[1]
        if self.num_frames + fe > self.capacity:
            raise RuntimeError(f"DescriptorRing: {self.num_frames} + {fe} frames exceed its capacity "
                               f"{self.capacity}; reserve first")
        desc = descriptors.float()
        self._write(self._head + self.num_frames, desc, desc.norm(dim=-1))
        self.num_frames += fe

    def _write(self, start: int, desc: torch.Tensor, norms: torch.Tensor) -> None:
        # Positions [start, start + Fe) lie in [0, 2C); each also goes to its twin
        # position (+C below C, -C above), which splits the range at C at most once.
        cap, fe = self.capacity, desc.shape[1]
        for lo, hi, twin in ((start, min(start + fe, cap), cap), (max(start, cap), start + fe, -cap)):
            if lo >= hi:
                continue
            part = slice(lo - start, hi - start)
            for pos in (slice(lo, hi), slice(lo + twin, hi + twin)):
                self._desc[:, pos] = desc[:, part]
                self._norms[:, pos] = norms[:, part]

    def drop_oldest(self, count: int) -> None:
        if not 0 <= count <= self.num_frames:
            raise ValueError(f"DescriptorRing.drop_oldest: count must be in [0, {self.num_frames}], got {count}")
        self._head = (self._head + count) % self.capacity
        self.num_frames -= count
