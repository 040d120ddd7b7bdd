"""History store: every evicted frame's K/V (all layers) and descriptor, per stream.

Storage is a page pool ``[P, N, H, D]`` for K and one for V; a page holds one frame
of one layer of one stream. This module is the facade the engine talks to; the
paged C++ store (``memory/paged.py``) offers the same methods.

Methods the engine relies on:
    append(k, v, descriptors)   evicted frames, oldest first, all streams at once
    num_frames                  frames held per stream (equal across streams)
    descriptors(), descriptor_norms()
    page_ids(frame_ids)         device page ids [L, B, K] for the splice, -1 kept
    pool_k, pool_v              page pools read by the splice
"""
from __future__ import annotations

import warnings

import torch

from .descriptors import DescriptorRing


class HistoryFullError(RuntimeError):
    """The history byte budget is exhausted and the overflow policy is "error"."""


def warn_dropping(held: int, frame_bytes: int, stacklevel: int) -> None:
    """The one warning a store gives when its budget fills and dropping starts."""
    warnings.warn(f"history budget full at {held} frames ({held * frame_bytes} bytes): dropping the oldest "
                  "history frames from now on as new ones arrive (overflow_policy='drop_oldest'); dropped "
                  "frames can no longer be retrieved. Reported once per stream.",
                  stacklevel=stacklevel + 1)


def check_append_args(store, k: torch.Tensor, v: torch.Tensor, descriptors: torch.Tensor) -> int:
    """Checks the arguments of ``store.append`` against the store's shapes and returns Fe.

    store: a history store (``num_layers``, ``batch``, ``page_shape`` = (N, H, D),
    ``descriptor_dim``); k, v: [L, B, Fe, N, H, D]; descriptors: [B, Fe, Dd].
    """
    expected = (store.num_layers, store.batch)
    if k.shape[:2] != expected or k.shape[3:] != store.page_shape or v.shape != k.shape:
        raise ValueError(f"history.append: k/v must be [L={expected[0]}, B={expected[1]}, Fe, "
                         f"{', '.join(map(str, store.page_shape))}], got {tuple(k.shape)} / {tuple(v.shape)}")
    fe = k.shape[2]
    if descriptors.shape[:2] != (store.batch, fe) or descriptors.shape[2] != store.descriptor_dim:
        raise ValueError(f"history.append: descriptors must be [B={store.batch}, Fe={fe}, "
                         f"{store.descriptor_dim}], got {tuple(descriptors.shape)}")
    return fe


class HistoryStore:
    """Single-tier store on one device: a ring of ``capacity_frames`` frames. Ring slot
    ``r`` holds pages ``(r * B + b) * L + l`` (stream b, layer l); history frame ``f``
    (eviction order, oldest first) lives in slot ``(head + f) % capacity``, so dropping
    the oldest frames only advances ``head`` (O(frames dropped), no copy).

    gpu_budget_bytes: None grows the pool by doubling (a copy); a budget is allocated
    whole at construction and never grows.
    """

    def __init__(self, num_layers: int, batch: int, tokens_per_frame: int, num_heads: int,
                 head_dim: int, descriptor_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", gpu_budget_bytes: int | None = None,
                 overflow_policy: str = "error", initial_frames: int = 16) -> None:
        self.num_layers, self.batch = num_layers, batch
        self.page_shape = (tokens_per_frame, num_heads, head_dim)
        self.dtype, self.device = dtype, torch.device(device)
        self.descriptor_dim = descriptor_dim
        self.overflow_policy = overflow_policy
        self.frame_bytes = 2 * num_layers * batch * tokens_per_frame * num_heads * head_dim * dtype.itemsize
        self.max_frames = None if gpu_budget_bytes is None else gpu_budget_bytes // self.frame_bytes
        # A budget is reserved up front: growing by copy needs the old and the new pool at
        # once, which at Wan 1.3B shapes (287 MB per frame) is what runs a GPU out of memory.
        cap = initial_frames if self.max_frames is None else self.max_frames
        self.pool_k = torch.empty(0, *self.page_shape, dtype=dtype, device=self.device)
        self.pool_v = torch.empty_like(self.pool_k)
        self._ring = DescriptorRing(batch, descriptor_dim, cap, self.device)
        self._head = 0           # ring slot of history frame 0
        self.num_frames = 0
        self.dropped_frames = 0
        self._reserve(cap)

    @property
    def capacity_frames(self) -> int:
        return self.pool_k.shape[0] // (self.batch * self.num_layers)

    @property
    def bytes_used(self) -> int:
        return self.num_frames * self.frame_bytes

    def _reserve(self, frames: int) -> None:
        if frames <= self.capacity_frames:
            return
        # Only an unbudgeted pool grows, and it never drops, so the ring is not wrapped.
        assert self._head == 0, "a wrapped history ring cannot grow"
        pages = frames * self.batch * self.num_layers
        for name in ("pool_k", "pool_v"):
            old = getattr(self, name)
            new = torch.empty(pages, *self.page_shape, dtype=self.dtype, device=self.device)
            new[: old.shape[0]].copy_(old)
            setattr(self, name, new)
        self._ring.reserve(frames)

    def append(self, k: torch.Tensor, v: torch.Tensor, descriptors: torch.Tensor) -> None:
        """k, v: [L, B, Fe, N, H, D]; descriptors: [B, Fe, Dd] (float32)."""
        fe = check_append_args(self, k, v, descriptors)
        if self.max_frames is not None and self.num_frames + fe > self.max_frames:
            if self.overflow_policy == "error" or fe > self.max_frames:
                raise HistoryFullError(
                    f"history budget full: {self.num_frames} frames held, {fe} more need "
                    f"{(self.num_frames + fe) * self.frame_bytes} bytes > budget of {self.max_frames} frames "
                    f"({self.max_frames * self.frame_bytes} bytes); raise gpu_budget_bytes/host_budget_bytes "
                    "or set overflow_policy='drop_oldest'")
            self._drop_oldest(self.num_frames + fe - self.max_frames)
        if self.num_frames + fe > self.capacity_frames:
            self._reserve(max(self.num_frames + fe, 2 * self.capacity_frames))
        cap, per_frame = self.capacity_frames, self.batch * self.num_layers
        # [L, B, Fe, ...] -> page order (f, b, l), written as at most two runs of ring slots,
        # each copied straight from the permuted view (no intermediate copy).
        first = (self._head + self.num_frames) % cap
        for f0, f1 in ((0, min(fe, cap - first)), (cap - first, fe)):
            if f0 >= f1:
                continue
            dst = ((first + f0) % cap) * per_frame
            n = (f1 - f0) * per_frame
            for pool, src in ((self.pool_k, k), (self.pool_v, v)):
                pool[dst:dst + n].view(f1 - f0, self.batch, self.num_layers, *self.page_shape).copy_(
                    src[:, :, f0:f1].permute(2, 1, 0, 3, 4, 5))
        self._ring.append(descriptors)
        self.num_frames += fe

    def _drop_oldest(self, count: int) -> None:
        if not self.dropped_frames:
            warn_dropping(self.num_frames, self.frame_bytes, stacklevel=4)
        self._head = (self._head + count) % self.capacity_frames
        self._ring.drop_oldest(count)
        self.num_frames -= count
        self.dropped_frames += count

    def descriptors(self) -> torch.Tensor:
        """[B, num_frames, Dd] float32 view, frame order = eviction order."""
        return self._ring.descriptors()

    def descriptor_norms(self) -> torch.Tensor:
        """[B, num_frames] float32 L2 norms of the descriptors, kept from insertion."""
        return self._ring.norms()

    def page_ids(self, frame_ids: torch.Tensor) -> torch.Tensor:
        """frame_ids [B, K] (int64, -1 = none) -> page ids [L, B, K] int64 on the device."""
        b = torch.arange(self.batch, device=frame_ids.device).unsqueeze(1)
        layers = torch.arange(self.num_layers, device=frame_ids.device).view(-1, 1, 1)
        slots = (frame_ids + self._head) % self.capacity_frames
        pages = (slots * self.batch + b) * self.num_layers + layers
        return torch.where(frame_ids >= 0, pages, torch.full_like(pages, -1))

    def frame_kv(self, frame: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of one history frame, [L, B, N, H, D] each (for inspection and tests)."""
        if not 0 <= frame < self.num_frames:
            raise IndexError(f"history frame {frame} out of range [0, {self.num_frames})")
        per_frame = self.batch * self.num_layers
        slot = (self._head + frame) % self.capacity_frames
        sl = slice(slot * per_frame, (slot + 1) * per_frame)
        shape = (self.batch, self.num_layers, *self.page_shape)
        return (self.pool_k[sl].view(shape).transpose(0, 1), self.pool_v[sl].view(shape).transpose(0, 1))
