"""Per-frame records of the history, in eviction order: descriptors and norms for the
search and, for a history store, the page address of every layer of every frame.

A ring of ``capacity`` frames stored twice (slot ``s`` at ``s`` and ``s + capacity``):
the held frames, oldest first, are always one contiguous view ``[head, head + n)``,
so the search and the page lookup read them without a gather, and dropping the oldest
frames moves nothing (O(frames dropped), not O(frames held)).
"""
from __future__ import annotations

import torch


class DescriptorRing:
    """Descriptors ``[B, n, Dd]`` (float32), their L2 norms ``[B, n]`` and, with
    ``layers``, page addresses ``[B, n, layers]`` (int64) of n history frames."""

    def __init__(self, batch: int, dim: int, capacity: int, device: torch.device | str,
                 layers: int = 0) -> None:
        self.batch, self.dim, self.device, self.layers = batch, dim, torch.device(device), layers
        self.num_frames = 0
        self._head = 0
        self._alloc(max(1, capacity))

    def _alloc(self, capacity: int) -> None:
        self.capacity = capacity
        self._desc = torch.zeros(self.batch, 2 * capacity, self.dim, dtype=torch.float32, device=self.device)
        self._norms = torch.zeros(self.batch, 2 * capacity, dtype=torch.float32, device=self.device)
        self._pages = torch.full((self.batch, 2 * capacity, self.layers), -1, dtype=torch.int64,
                                 device=self.device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self._desc, self._norms, self._pages))

    def descriptors(self) -> torch.Tensor:
        """[B, n, Dd] view, oldest first."""
        return self._desc[:, self._head:self._head + self.num_frames]

    def norms(self) -> torch.Tensor:
        """[B, n] view, oldest first."""
        return self._norms[:, self._head:self._head + self.num_frames]

    def pages(self) -> torch.Tensor:
        """[B, n, layers] view of page addresses, oldest first."""
        return self._pages[:, self._head:self._head + self.num_frames]

    def reserve(self, capacity: int) -> None:
        """Grow to hold ``capacity`` frames (a copy of the held records; callers grow
        geometrically, so the copies cost O(1) amortised per frame)."""
        if capacity <= self.capacity:
            return
        desc, norms, pages = self.descriptors().clone(), self.norms().clone(), self.pages().clone()
        self._alloc(capacity)
        self._head = 0
        self._write(0, desc, norms, pages)

    def append(self, descriptors: torch.Tensor, pages: torch.Tensor | None = None) -> None:
        """descriptors [B, Fe, Dd]: the newest frames, oldest first; pages [B, Fe, layers]
        (int64) with ``layers``. Needs room (``reserve``)."""
        fe = descriptors.shape[1]
        if self.num_frames + fe > self.capacity:
            raise RuntimeError(f"DescriptorRing: {self.num_frames} + {fe} frames exceed its capacity "
                               f"{self.capacity}; reserve first")
        if (pages is None) != (self.layers == 0):
            raise ValueError(f"DescriptorRing.append: pages must be given exactly when the ring has layers "
                             f"(layers={self.layers})")
        desc = descriptors.float()
        self._write(self._head + self.num_frames, desc, desc.norm(dim=-1), pages)
        self.num_frames += fe

    def _write(self, start: int, desc: torch.Tensor, norms: torch.Tensor, pages: torch.Tensor | None) -> None:
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
                if pages is not None:
                    self._pages[:, pos] = pages[:, part]

    def drop_oldest(self, count: int) -> None:
        if not 0 <= count <= self.num_frames:
            raise ValueError(f"DescriptorRing.drop_oldest: count must be in [0, {self.num_frames}], got {count}")
        self._head = (self._head + count) % self.capacity
        self.num_frames -= count
