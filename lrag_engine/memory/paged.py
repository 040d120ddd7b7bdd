"""Paged history store: the C++ page tables (``lrag_engine._C``) over torch page pools.

Same methods and attributes as :class:`~lrag_engine.memory.history.HistoryStore`, plus
a pinned host tier, stream forks and usage reporting.

Storage: torch allocates the pools (``pool_k``/``pool_v`` ``[G, N, H, D]`` on the device,
``host_k``/``host_v`` ``[Hs, N, H, D]`` pinned on the host), so the caching allocator and
every dtype come for free and the extension builds without torch. The extension owns
page allocation, per-stream page tables, reference counts, tier placement and the LRU;
it returns copy plans that :mod:`~lrag_engine.memory.tier_copy` executes (on CUDA on
a side copy stream ordered against the compute stream, never a host sync).

Page ids returned by :meth:`page_ids` are rows of ``pool_k``/``pool_v`` (GPU-tier slots).
A device mirror of the batch streams' page tables, ``[B, frames, L]`` int64 with -1 for
pages not on the GPU, is rebuilt after every append, drop and prefetch. While every
page of the batch streams is GPU-resident, ``page_ids`` is a pure device gather from the
mirror (no host sync); the retrieval recency it implies is copied to pinned memory
asynchronously and applied to the LRU at the next mutation. Once some pages live on the
host tier, ``page_ids`` reads the frame ids on the host (one sync) to prefetch them.
"""
from __future__ import annotations

import warnings

import torch

from lrag_engine.memory import _ext
from lrag_engine.memory.descriptors import DescriptorRing
from lrag_engine.memory.history import HistoryFullError, HistoryStore, check_append_args, warn_dropping
from lrag_engine.memory.tier_copy import TierCopier
from lrag_engine.runtime.transfer import index_tensor

OVERFLOW_POLICIES = ("error", "drop_oldest")
# Retrievals served without a sync are applied to the LRU at the next append/prefetch;
# past this many (no append for a long time) they are applied at once, which waits only
# on copies recorded that many calls ago.
MAX_PENDING_TOUCHES = 64


class PagedHistoryStore:
    """History of B engine streams (stream ids 0..B-1) in a two-tier paged memory.

    gpu_budget_bytes: bytes of K+V pages on the device (None: the device pool grows).
    host_budget_bytes: bytes of K+V pages in the pinned host tier (None: no host tier).
    overflow_policy: "error" raises HistoryFullError before anything changes when both
        tiers are full; "drop_oldest" warns and forgets the oldest frames of the streams.
    """

    def __init__(self, num_layers: int, batch: int, tokens_per_frame: int, num_heads: int,
                 head_dim: int, descriptor_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", gpu_budget_bytes: int | None = None,
                 host_budget_bytes: int | None = None, overflow_policy: str = "error",
                 initial_frames: int = 16) -> None:
        ext = _ext.load()
        for name, value in (("num_layers", num_layers), ("batch", batch), ("tokens_per_frame", tokens_per_frame),
                            ("num_heads", num_heads), ("head_dim", head_dim), ("descriptor_dim", descriptor_dim),
                            ("initial_frames", initial_frames)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PagedHistoryStore.{name} must be an integer >= 1, got {value!r}")
        if overflow_policy not in OVERFLOW_POLICIES:
            raise ValueError(f"PagedHistoryStore.overflow_policy must be one of {OVERFLOW_POLICIES}, "
                             f"got {overflow_policy!r}")
        self.num_layers, self.batch = num_layers, batch
        self.page_shape = (tokens_per_frame, num_heads, head_dim)
        self.dtype, self.device = dtype, torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.overflow_policy = overflow_policy
        self.gpu_budget_bytes, self.host_budget_bytes = gpu_budget_bytes, host_budget_bytes
        self.page_bytes = tokens_per_frame * num_heads * head_dim * dtype.itemsize  # one of K or V
        self.slot_bytes = 2 * self.page_bytes
        self.pages_per_frame = batch * num_layers
        self.frame_bytes = self.pages_per_frame * self.slot_bytes
        for name, budget in (("gpu_budget_bytes", gpu_budget_bytes), ("host_budget_bytes", host_budget_bytes)):
            if budget is not None and (not isinstance(budget, int) or budget < 0):
                raise ValueError(f"PagedHistoryStore.{name} must be None or an integer >= 0, got {budget!r}")
        if gpu_budget_bytes is None:
            gpu_slots = initial_frames * self.pages_per_frame
        else:
            gpu_slots = gpu_budget_bytes // self.slot_bytes
            if gpu_slots < self.pages_per_frame:
                raise ValueError(f"PagedHistoryStore.gpu_budget_bytes={gpu_budget_bytes} holds {gpu_slots} pages, "
                                 f"fewer than one frame of all streams ({self.pages_per_frame} pages of "
                                 f"{self.slot_bytes} bytes = {self.frame_bytes} bytes)")
        host_slots = 0 if host_budget_bytes is None else host_budget_bytes // self.slot_bytes
        self.max_frames = None if gpu_budget_bytes is None else (gpu_slots + host_slots) // self.pages_per_frame

        self._mem = ext.PagedMemory(num_layers, gpu_slots, host_slots)
        self._streams = [self._mem.create_stream() for _ in range(batch)]
        on_cuda = self.device.type == "cuda"
        self.pool_k = torch.empty(gpu_slots, *self.page_shape, dtype=dtype, device=self.device)
        self.pool_v = torch.empty_like(self.pool_k)
        self.host_k = torch.empty(host_slots, *self.page_shape, dtype=dtype, pin_memory=on_cuda and host_slots > 0)
        self.host_v = torch.empty(self.host_k.shape, dtype=dtype, pin_memory=on_cuda and host_slots > 0)
        self._copier = TierCopier(self.device, self.page_bytes)
        self._pending_touches: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []

        self.descriptor_dim = descriptor_dim
        self._ring = DescriptorRing(batch, descriptor_dim, 0, self.device)
        self._table = torch.full((batch, 0, num_layers), -1, dtype=torch.int64, device=self.device)
        self._fork_desc: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._all_resident = True
        self.num_frames = 0
        self.dropped_frames = 0
        self._reserve_frames(min(initial_frames, self.max_frames or initial_frames))

    # ---- sizes ------------------------------------------------------------------------

    @property
    def _raw_copies(self) -> bool:
        """Whether tier moves use the extension's cudaMemcpyAsync batcher; False forces the
        per-page torch copies (both paths are tested)."""
        return self._copier.raw

    @_raw_copies.setter
    def _raw_copies(self, raw: bool) -> None:
        self._copier.raw = raw

    @property
    def capacity_frames(self) -> int:
        return self._table.shape[1]

    @property
    def bytes_used(self) -> int:
        """Bytes of K+V pages held in both tiers (a page shared by forks counts once)."""
        return self._mem.usage()["pages_used"] * self.slot_bytes

    def usage(self) -> dict:
        """Page and byte counts per tier, streams, shared pages, frames held and dropped."""
        u = self._mem.usage()
        u.update(gpu_bytes_used=u["gpu_used"] * self.slot_bytes, host_bytes_used=u["host_used"] * self.slot_bytes,
                 gpu_bytes_capacity=u["gpu_capacity"] * self.slot_bytes,
                 host_bytes_capacity=u["host_capacity"] * self.slot_bytes, bytes_used=u["pages_used"] * self.slot_bytes,
                 page_bytes=self.slot_bytes, num_frames=self.num_frames, dropped_frames=self.dropped_frames)
        return u

    def _reserve_frames(self, frames: int) -> None:
        """Grows the descriptor arrays and the device page-table mirror to ``frames``."""
        if frames <= self.capacity_frames:
            return
        self._ring.reserve(frames)
        self._table = torch.full((self.batch, frames, self.num_layers), -1, dtype=torch.int64, device=self.device)
        self._refresh_table()

    def _grow_gpu(self, slots: int) -> None:
        """Unbounded GPU tier only: reallocates the device pools to ``slots`` rows (ids kept)."""
        usage = self._mem.usage()
        for name in ("pool_k", "pool_v"):
            old = getattr(self, name)
            new = torch.empty(slots, *self.page_shape, dtype=self.dtype, device=self.device)
            new[: old.shape[0]].copy_(old)
            setattr(self, name, new)
        self._mem.grow(slots, usage["host_capacity"])

    def _refresh_table(self) -> None:
        table = self._mem.gpu_slot_table(self._streams, self.capacity_frames)
        self._table.copy_(index_tensor(table, self.device), non_blocking=True)
        self._all_resident = self._mem.all_gpu_resident(self._streams)

    # ---- append / drop ----------------------------------------------------------------

    def append(self, k: torch.Tensor, v: torch.Tensor, descriptors: torch.Tensor) -> None:
        """k, v: [L, B, Fe, N, H, D]; descriptors: [B, Fe, Dd] (float32)."""
        fe = check_append_args(self, k, v, descriptors)
        if fe == 0:
            return
        self._apply_touches()
        needed = fe * self.pages_per_frame
        usage = self._mem.usage()
        if self.gpu_budget_bytes is None and usage["gpu_capacity"] - usage["gpu_used"] < needed:
            self._grow_gpu(max(usage["gpu_used"] + needed, 2 * usage["gpu_capacity"]))
        if needed > self._mem.free_pages():
            self._make_room(fe, needed)
        # Chunks of frames that fit the GPU tier at once: each chunk may spill the last.
        chunk = max(1, self._mem.usage()["gpu_capacity"] // self.pages_per_frame)
        for f0 in range(0, fe, chunk):
            n = min(chunk, fe - f0)
            plan = self._mem.append(self._streams, n)
            self._move_pages(plan)
            slots = index_tensor(plan.new_gpu, self.device)
            # [L, B, n, ...] -> new_gpu order (stream b, frame f, layer l)
            for pool, src in ((self.pool_k, k), (self.pool_v, v)):
                pages = src[:, :, f0:f0 + n].permute(1, 2, 0, 3, 4, 5).reshape(n * self.pages_per_frame, *self.page_shape)
                pool.index_copy_(0, slots, pages.to(self.dtype))
        self._reserve_frames(max(self.num_frames + fe, 2 * self.capacity_frames)
                             if self.num_frames + fe > self.capacity_frames else 0)
        self._ring.append(descriptors)
        self.num_frames += fe
        self._refresh_table()

    def _make_room(self, fe: int, needed: int) -> None:
        usage = self._mem.usage()
        free = self._mem.free_pages()
        drop = -1 if self.overflow_policy == "error" else self._mem.frames_to_drop(self._streams, needed - free)
        if drop < 0:
            why = ("overflow_policy='error'" if self.overflow_policy == "error" else
                   "dropping every frame of the engine streams frees too little (forked streams share pages, "
                   "or one append exceeds both tiers)")
            raise HistoryFullError(
                f"history budget full: {self.num_frames} frames held, {fe} more need {needed} pages "
                f"({needed * self.slot_bytes} bytes) but {free} pages are free (GPU tier {usage['gpu_capacity']} + "
                f"host tier {usage['host_capacity']} pages of {self.slot_bytes} bytes, {usage['pages_used']} in use); "
                f"{why}; raise gpu_budget_bytes/host_budget_bytes or set overflow_policy='drop_oldest'")
        self._drop_oldest(drop)

    def _drop_oldest(self, count: int) -> None:
        if not self.dropped_frames:
            warn_dropping(self.num_frames, self.frame_bytes, stacklevel=4)
        self._mem.drop_oldest(self._streams, count)
        self._ring.drop_oldest(count)
        self.num_frames -= count
        self.dropped_frames += count
        self._refresh_table()

    # ---- retrieval --------------------------------------------------------------------

    def descriptors(self) -> torch.Tensor:
        """[B, num_frames, Dd] float32 view, frame order = eviction order."""
        return self._ring.descriptors()

    def descriptor_norms(self) -> torch.Tensor:
        """[B, num_frames] float32 L2 norms of the descriptors, kept from insertion."""
        return self._ring.norms()

    def page_ids(self, frame_ids: torch.Tensor) -> torch.Tensor:
        """frame_ids [B, K] (int64, -1 = none, else < num_frames) -> GPU-resident page ids
        [L, B, K] int64 on the device (rows of pool_k/pool_v), -1 kept.

        Pure device gather while every page is on the GPU; otherwise the ids are read on
        the host (one sync) and the missing pages are prefetched first.
        """
        if frame_ids.dim() != 2 or frame_ids.shape[0] != self.batch:
            raise ValueError(f"history.page_ids: frame_ids must be [B={self.batch}, K], got {tuple(frame_ids.shape)}")
        frame_ids = frame_ids.to(self.device)
        if self._all_resident:
            if self.host_k.shape[0] > 0:
                self._record_touches(frame_ids)
        else:
            self.prefetch(frame_ids)
        rows = self._table[torch.arange(self.batch, device=self.device).unsqueeze(1), frame_ids.clamp(min=0)]
        pages = rows.permute(2, 0, 1)  # [B, K, L] -> [L, B, K]
        return torch.where(frame_ids >= 0, pages, torch.full_like(pages, -1))

    def prefetch(self, frame_ids: torch.Tensor) -> None:
        """Makes every layer of frames ``frame_ids`` [B, K] (-1 ignored) GPU-resident and
        most recently retrieved. Reads the ids on the host (a sync when they live on the GPU)."""
        if frame_ids.dim() != 2 or frame_ids.shape[0] != self.batch:
            raise ValueError(f"history.prefetch: frame_ids must be [B={self.batch}, K], got {tuple(frame_ids.shape)}")
        self._apply_touches()
        streams, frames = self._pairs(frame_ids.cpu())
        plan = self._mem.prefetch(streams, frames)
        self._move_pages(plan)
        if plan.load_gpu:
            self._refresh_table()

    def _pairs(self, frame_ids: torch.Tensor) -> tuple[list[int], list[int]]:
        b, k = torch.nonzero(frame_ids >= 0, as_tuple=True)
        return [self._streams[i] for i in b.tolist()], frame_ids[b, k].tolist()

    def _record_touches(self, frame_ids: torch.Tensor) -> None:
        if self.device.type != "cuda":
            self._pending_touches.append((frame_ids.clone(), None))
        else:
            host = torch.empty(frame_ids.shape, dtype=torch.int64, pin_memory=True)
            host.copy_(frame_ids, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._pending_touches.append((host, done))
        if len(self._pending_touches) > MAX_PENDING_TOUCHES:
            self._apply_touches()

    def _apply_touches(self) -> None:
        """Feeds retrievals served by the pure device path to the LRU, oldest first."""
        for ids, done in self._pending_touches:
            if done is not None:
                done.synchronize()  # recorded at least one call ago, normally long complete
            # the pure path does not validate ids: ones past the history are not retrievals
            streams, frames = self._pairs(torch.where(ids < self.num_frames, ids, -1))
            self._mem.touch(streams, frames)
        self._pending_touches.clear()

    # ---- tier moves -------------------------------------------------------------------

    def _move_pages(self, plan) -> None:
        self._copier.move(plan, ((self.pool_k, self.host_k), (self.pool_v, self.host_v)))

    # ---- streams and inspection -------------------------------------------------------

    def fork(self, stream: int) -> int:
        """New stream id holding ``stream``'s frames (pages shared, refcount + 1) and a
        snapshot of its descriptors. The engine only appends to streams 0..B-1."""
        child = self._mem.fork(stream)
        if stream in self._fork_desc:
            self._fork_desc[child] = self._fork_desc[stream]
        else:
            b = self._streams.index(stream)
            self._fork_desc[child] = (self.descriptors()[b].clone(), self.descriptor_norms()[b].clone())
        return child

    def free_stream(self, stream: int) -> None:
        """Releases a forked stream's references; pages nobody else holds are freed."""
        if stream in self._streams:
            raise ValueError(f"history.free_stream: stream {stream} is engine stream of batch row "
                             f"{self._streams.index(stream)}; only forked streams can be freed")
        self._mem.free_stream(stream)
        self._fork_desc.pop(stream, None)

    def stream_num_frames(self, stream: int) -> int:
        return self._mem.num_frames(stream)

    def stream_descriptors(self, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Descriptors [F, Dd] and norms [F] of any stream (engine or forked)."""
        if stream in self._streams:
            b = self._streams.index(stream)
            return self.descriptors()[b], self.descriptor_norms()[b]
        if stream not in self._fork_desc:
            raise ValueError(f"history: unknown stream {stream}")
        return self._fork_desc[stream]

    def stream_frame_kv(self, stream: int, frame: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of one frame of any stream, [L, N, H, D] each, read from whichever tier
        holds each page (no residency change)."""
        pages = [self._mem.page(stream, frame, layer) for layer in range(self.num_layers)]
        return self._gather(pages)

    def frame_kv(self, frame: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of one history frame, [L, B, N, H, D] each (for inspection and tests)."""
        if not 0 <= frame < self.num_frames:
            raise IndexError(f"history frame {frame} out of range [0, {self.num_frames})")
        pages = [self._mem.page(s, frame, layer) for s in self._streams for layer in range(self.num_layers)]
        k, v = self._gather(pages)
        shape = (self.batch, self.num_layers, *self.page_shape)
        return k.view(shape).transpose(0, 1), v.view(shape).transpose(0, 1)

    def _gather(self, pages: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        self._copier.synchronize()  # host-tier pages may still be in flight
        gpu_tier = _ext.load().Tier.GPU
        out_k = torch.empty(len(pages), *self.page_shape, dtype=self.dtype, device=self.device)
        out_v = torch.empty_like(out_k)
        for i, p in enumerate(pages):
            on_gpu = self._mem.tier(p) == gpu_tier
            src_k, src_v = (self.pool_k, self.pool_v) if on_gpu else (self.host_k, self.host_v)
            out_k[i].copy_(src_k[self._mem.slot(p)])
            out_v[i].copy_(src_v[self._mem.slot(p)])
        return out_k, out_v


def make_history_store(kind: str = "auto", **kwargs) -> HistoryStore | PagedHistoryStore:
    """History store factory. kind: "torch" (HistoryStore, single device tier), "paged"
    (PagedHistoryStore; ImportError when the extension is missing), or "auto" (paged when
    the extension imports and host_budget_bytes is set, else torch). kwargs: the
    constructor arguments of PagedHistoryStore."""
    if kind not in ("auto", "torch", "paged"):
        raise ValueError(f"make_history_store: kind must be 'auto', 'torch' or 'paged', got {kind!r}")
    host_budget = kwargs.get("host_budget_bytes")
    if kind == "paged" or (kind == "auto" and host_budget is not None and _ext.extension_available()):
        return PagedHistoryStore(**kwargs)
    if host_budget is not None:
        if kind == "torch":
            raise ValueError(f"make_history_store: kind='torch' has no host tier but host_budget_bytes={host_budget}; "
                             "use kind='paged' or 'auto'")
        warnings.warn(f"history: host_budget_bytes={host_budget} ignored, the paged store is unavailable "
                      f"({_ext.missing_reason()}); history stays on the device", stacklevel=2)
    kwargs.pop("host_budget_bytes", None)
    return HistoryStore(**kwargs)
