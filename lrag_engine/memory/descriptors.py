"""Per-frame records of the history, in eviction order: descriptors and norms for the
search and, for a history store, the page address of every layer of every frame.

A ring of ``capacity`` frames stored twice (slot ``s`` at ``s`` and ``s + capacity``):
the held frames, oldest first, are always one contiguous view ``[head, head + n)``,
so the search and the page lookup read them without a gather, and dropping the oldest
frames moves nothing (O(frames dropped), not O(frames held)). Dropping other frames
(a retention policy, :meth:`DescriptorRing.drop`) moves the older frames of each row up
by the frames dropped before them: O(frames held).

Besides descriptors, norms and pages a ring keeps, per frame: its ordinal (the how-many-th
frame appended to the ring, 0-based: the history frame id, stable across drops), its
retrieval hits and the clock of its last use (entry or hit), which retention policies read.
"""
from __future__ import annotations

import torch


class DescriptorRing:
    """Descriptors ``[B, n, Dd]`` (float32), their L2 norms ``[B, n]`` and, with
    ``layers``, page addresses ``[B, n, layers]`` (int64) of n history frames; ordinals,
    hits and last-use clocks ``[B, n]`` (int64)."""

    def __init__(self, batch: int, dim: int, capacity: int, device: torch.device | str,
                 layers: int = 0) -> None:
        self.batch, self.dim, self.device, self.layers = batch, dim, torch.device(device), layers
        self.num_frames = 0
        self.appended = 0           # frames ever appended: the next frame's ordinal
        self._head = 0
        self._alloc(max(1, capacity))

    def _alloc(self, capacity: int) -> None:
        self.capacity = capacity
        self._desc = torch.zeros(self.batch, 2 * capacity, self.dim, dtype=torch.float32, device=self.device)
        self._norms = torch.zeros(self.batch, 2 * capacity, dtype=torch.float32, device=self.device)
        self._pages = torch.full((self.batch, 2 * capacity, self.layers), -1, dtype=torch.int64,
                                 device=self.device)
        # ordinal, hits, last use of each frame (one tensor: one write per append or drop)
        self._stats = torch.zeros(self.batch, 2 * capacity, 3, dtype=torch.int64, device=self.device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self._desc, self._norms, self._pages, self._stats))

    def descriptors(self) -> torch.Tensor:
        """[B, n, Dd] view, oldest first."""
        return self._desc[:, self._head:self._head + self.num_frames]

    def norms(self) -> torch.Tensor:
        """[B, n] view, oldest first."""
        return self._norms[:, self._head:self._head + self.num_frames]

    def pages(self) -> torch.Tensor:
        """[B, n, layers] view of page addresses, oldest first."""
        return self._pages[:, self._head:self._head + self.num_frames]

    def ordinals(self) -> torch.Tensor:
        """[B, n] view: the ordinal of each held frame (increasing along each row)."""
        return self._stats[:, self._head:self._head + self.num_frames, 0]

    def hits(self) -> torch.Tensor:
        """[B, n] view: how often each held frame was retrieved (see :meth:`record_hits`)."""
        return self._stats[:, self._head:self._head + self.num_frames, 1]

    def last_used(self) -> torch.Tensor:
        """[B, n] view: the clock of each held frame's entry or latest hit."""
        return self._stats[:, self._head:self._head + self.num_frames, 2]

    def record_hits(self, index: torch.Tensor, clock: int) -> None:
        """Frames ``index`` [B, r] (positions among the held frames, distinct per row) were
        retrieved at ``clock``: their hits go up by one and their last use becomes
        ``clock``, in both copies of each slot (a device scatter, no host sync)."""
        if index.numel() == 0 or self.num_frames == 0:
            return
        index = index.to(self.device)
        for start in (self._head, self._head + self.capacity):
            # position i sits at head + i and at its twin (+C below C, else -C)
            pos = start + index
            pos = torch.where(pos >= 2 * self.capacity, pos - 2 * self.capacity, pos)
            self._stats[:, :, 1].scatter_add_(1, pos, torch.ones_like(pos))
            self._stats[:, :, 2].scatter_(1, pos, torch.full_like(pos, clock))

    def reserve(self, capacity: int) -> None:
        """Grow to hold ``capacity`` frames (a copy of the held records; callers grow
        geometrically, so the copies cost O(1) amortised per frame)."""
        if capacity <= self.capacity:
            return
        desc, norms, pages = self.descriptors().clone(), self.norms().clone(), self.pages().clone()
        stats = self._stats[:, self._head:self._head + self.num_frames].clone()
        self._alloc(capacity)
        self._head = 0
        self._write(0, desc, norms, pages, stats)

    def append(self, descriptors: torch.Tensor, pages: torch.Tensor | None = None, clock: int = 0) -> None:
        """descriptors [B, Fe, Dd]: the newest frames, oldest first; pages [B, Fe, layers]
        (int64) with ``layers``; ``clock``: their last use. Needs room (``reserve``)."""
        fe = descriptors.shape[1]
        if self.num_frames + fe > self.capacity:
            raise RuntimeError(f"DescriptorRing: {self.num_frames} + {fe} frames exceed its capacity "
                               f"{self.capacity}; reserve first")
        if (pages is None) != (self.layers == 0):
            raise ValueError(f"DescriptorRing.append: pages must be given exactly when the ring has layers "
                             f"(layers={self.layers})")
        desc = descriptors.float()
        stats = torch.zeros(self.batch, fe, 3, dtype=torch.int64, device=self.device)
        stats[..., 0] = torch.arange(self.appended, self.appended + fe, device=self.device)
        stats[..., 2] = clock
        self._write(self._head + self.num_frames, desc, desc.norm(dim=-1), pages, stats)
        self.num_frames += fe
        self.appended += fe

    def _write(self, start: int, desc: torch.Tensor, norms: torch.Tensor, pages: torch.Tensor | None,
               stats: torch.Tensor) -> None:
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
                self._stats[:, pos] = stats[:, part]
                if pages is not None:
                    self._pages[:, pos] = pages[:, part]

    def drop_oldest(self, count: int) -> None:
        if not 0 <= count <= self.num_frames:
            raise ValueError(f"DescriptorRing.drop_oldest: count must be in [0, {self.num_frames}], got {count}")
        self._head = (self._head + count) % self.capacity
        self.num_frames -= count

    def drop(self, positions: torch.Tensor) -> None:
        """Forget frames ``positions`` [B, c] (per row: c distinct positions among the
        held frames, any order); the other frames keep their order."""
        n, c = self.num_frames, positions.shape[1]
        if positions.dim() != 2 or positions.shape[0] != self.batch:
            raise ValueError(f"DescriptorRing.drop: positions must be [B={self.batch}, c], got "
                             f"{tuple(positions.shape)}")
        if c == 0:
            return
        positions = positions.to(self.device)
        drop = torch.zeros(self.batch, n, dtype=torch.bool, device=self.device)
        drop.scatter_(1, positions, True)
        if int(positions.min()) < 0 or int(positions.max()) >= n or int(drop.sum()) != self.batch * c:
            raise ValueError(f"DescriptorRing.drop: positions must be {c} distinct frames in [0, {n}) per row, "
                             f"got {positions.tolist()}")
        # each row's kept positions, oldest first (a stable sort puts the kept ones first)
        kept = torch.sort(drop.to(torch.int8), dim=1, stable=True).indices[:, :n - c]
        parts = [self.descriptors(), self.norms(), self.pages(), self._stats[:, self._head:self._head + n]]
        desc, norms, pages, stats = (t.gather(1, kept.view(*kept.shape, *([1] * (t.dim() - 2))).expand(
            -1, -1, *t.shape[2:])).clone() for t in parts)
        self._head = (self._head + c) % self.capacity
        self.num_frames = n - c
        self._write(self._head, desc, norms, pages if self.layers else None, stats)
