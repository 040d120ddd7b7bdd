"""The history: every evicted frame's K/V (all layers) and descriptor, per stream.

Two objects:

``PagePool`` (one per engine, shared by its sessions) stores pages: a page is the
``[N, H, D]`` K (and V) of one frame of one layer of one stream. Pages live in chunks
of ``chunk_pages`` pages, on the device first and, past the device budget, in pinned
host memory; a tier grows one chunk at a time up to its budget and existing chunks
are never copied or moved. Which page sits where is the business of a page-table
backend (:mod:`lrag_engine.memory.page_table`: the C++ ``PagedMemory`` when the
extension is built, a pure-Python table otherwise). A page's *address* is
``chunk * chunk_pages + row`` in the pool's chunk list, which is what the splice reads
(host chunks in place, over UVA on CUDA).

``HistoryStore`` (one per session) owns its streams' pages in the pool, their
descriptors and norms, the page address of every held frame (a device ring, updated
incrementally on append and drop), accounting, the per-stream cap with its retention
policy, and the overflow policy. Appending a frame copies its K/V once, from the window
straight into its pages (quantising them for an FP8 pool); finding the pages of
retrieved frames is a device gather; nothing in a block waits for the device, except
the retention policies other than "drop_oldest", which read the frames to drop on the
host once per append that passes the cap.
"""
from __future__ import annotations

import bisect
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from ..config import RETENTION_POLICIES
from ..ops.quant import FP8, dequantize_fp8, quantize_fp8, storage_dtype
from ..ops.splice import read_pages, read_scales
from ..runtime.transfer import index_tensor
from .budget import page_bytes
from .descriptors import DescriptorRing
from .page_table import CapacityError, make_page_table

OVERFLOW_POLICIES = ("error", "drop_oldest")
# Default bytes of one pool chunk (K and V pages together).
DEFAULT_CHUNK_BYTES = 256 * 2 ** 20


class HistoryFullError(RuntimeError):
    """The history byte budget is exhausted and the overflow policy is "error"."""


def warn_dropping(held: int, frame_bytes: int, stacklevel: int) -> None:
    """The one warning a store gives when its budget fills and dropping starts."""
    warnings.warn(f"history budget full at {held} frames ({held * frame_bytes} bytes): dropping the oldest "
                  "history frames from now on as new ones arrive (overflow_policy='drop_oldest'); dropped "
                  "frames can no longer be retrieved. Reported once per stream.",
                  stacklevel=stacklevel + 1)


class PagePool:
    """Page storage shared by the history stores of one engine.

    gpu_pages / host_pages: most pages each tier may hold (None: the tier grows without
        bound; 0: no such tier). Chunks are allocated when needed, device first.
    chunk_pages: pages per chunk (the last chunk of a bounded tier may be smaller).
    table: page-table backend, "auto" | "cpp" | "python".
    dtype: the compute dtype of the K/V written and read; history_dtype: how pages are
        stored, None (in ``dtype``) or "fp8_e4m3" (float8_e4m3fn codes in ``k_chunks`` /
        ``v_chunks`` with float32 per-head scales ``[rows, H]`` in ``k_scales`` /
        ``v_scales``, quantised by :meth:`write`, decoded by the splice).
    """

    def __init__(self, num_layers: int, tokens_per_frame: int, num_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, gpu_pages: int | None = None,
                 host_pages: int | None = 0, chunk_pages: int | None = None, table: str = "auto",
                 history_dtype: str | None = None) -> None:
        for name, value in (("num_layers", num_layers), ("tokens_per_frame", tokens_per_frame),
                            ("num_heads", num_heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PagePool.{name} must be an integer >= 1, got {value!r}")
        for name, value in (("gpu_pages", gpu_pages), ("host_pages", host_pages)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"PagePool.{name} must be None or an integer >= 0, got {value!r}")
        self.num_layers = num_layers
        self.page_shape = (tokens_per_frame, num_heads, head_dim)
        self.dtype = dtype
        self.history_dtype = history_dtype
        self.storage_dtype = storage_dtype(history_dtype, dtype)
        self.fp8 = self.storage_dtype == FP8
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.page_bytes = page_bytes(tokens_per_frame, num_heads, head_dim, dtype, history_dtype)   # K + V
        if chunk_pages is None:
            chunk_pages = max(1, DEFAULT_CHUNK_BYTES // self.page_bytes)
        if isinstance(chunk_pages, bool) or not isinstance(chunk_pages, int) or chunk_pages < 1:
            raise ValueError(f"PagePool.chunk_pages must be an integer >= 1, got {chunk_pages!r}")
        self.chunk_pages = chunk_pages
        self.gpu_cap, self.host_cap = gpu_pages, host_pages
        self.table = make_page_table(table, num_layers, 0, 0)
        self.k_chunks: list[torch.Tensor] = []
        self.v_chunks: list[torch.Tensor] = []
        self.k_scales: list[torch.Tensor] = []     # FP8 pools only: [rows, H] float32 per chunk
        self.v_scales: list[torch.Tensor] = []
        self._chunk_ids = {"gpu": [], "host": []}   # pool chunk index of each tier's chunks
        self._chunk_starts = {"gpu": [], "host": []}  # tier slot of each chunk's first row
        self._slots = {"gpu": 0, "host": 0}          # slots allocated per tier
        self.sessions = 0

    @property
    def backend(self) -> str:
        return self.table.kind

    # ---- capacity -----------------------------------------------------------------------

    def _headroom(self, tier: str) -> int | None:
        cap = self.gpu_cap if tier == "gpu" else self.host_cap
        return None if cap is None else cap - self._slots[tier]

    def free_pages(self) -> int | None:
        """Pages that can still be placed, counting chunks not yet allocated (None: unbounded)."""
        if self.gpu_cap is None or self.host_cap is None:
            return None
        return self.table.free_pages() + self._headroom("gpu") + self._headroom("host")

    def raise_gpu_cap(self, pages: int) -> None:
        """A bounded device tier is raised to at least ``pages`` (the host-tier staging
        of a session with a larger batch)."""
        if self.gpu_cap is not None and pages > self.gpu_cap:
            self.gpu_cap = pages

    def _add_chunk(self, tier: str) -> int:
        headroom = self._headroom(tier)
        rows = self.chunk_pages if headroom is None else min(self.chunk_pages, headroom)
        where = dict(device=self.device) if tier == "gpu" else dict(pin_memory=self.device.type == "cuda")
        k = torch.empty(rows, *self.page_shape, dtype=self.storage_dtype, **where)
        v = torch.empty(rows, *self.page_shape, dtype=self.storage_dtype, **where)
        if self.fp8:
            self.k_scales.append(torch.ones(rows, self.page_shape[1], dtype=torch.float32, **where))
            self.v_scales.append(torch.ones(rows, self.page_shape[1], dtype=torch.float32, **where))
        self._chunk_ids[tier].append(len(self.k_chunks))
        self._chunk_starts[tier].append(self._slots[tier])
        self.k_chunks.append(k)
        self.v_chunks.append(v)
        self._slots[tier] += rows
        self.table.grow(self._slots["gpu"], self._slots["host"])
        return rows

    def _reserve(self, needed: int) -> None:
        """Allocates chunks, device first, until ``needed`` pages are free (as far as the
        budgets allow)."""
        usage = self.table.usage()
        free_gpu = usage["gpu_capacity"] - usage["gpu_used"]
        while free_gpu < needed and self._headroom("gpu") != 0:
            free_gpu += self._add_chunk("gpu")
        free_host = usage["host_capacity"] - usage["host_used"]
        while free_gpu + free_host < needed and self._headroom("host") != 0:
            free_host += self._add_chunk("host")

    # ---- placement and addresses --------------------------------------------------------

    def place(self, streams: list[int], frames: int) -> list[int]:
        """Pages for ``frames`` new frames of every stream; their addresses in order
        (stream, frame, layer). CapacityError when they do not fit."""
        self._reserve(len(streams) * frames * self.num_layers)
        return [self.address(loc) for loc in self.table.place(streams, frames)]

    def address(self, location: int) -> int:
        """Pool address of a page-table location (GPU slot s >= 0, host slot -1 - h)."""
        tier, slot = ("gpu", location) if location >= 0 else ("host", -1 - location)
        # A tier's chunks need not all be full (a capped chunk before raise_gpu_cap).
        starts = self._chunk_starts[tier]
        chunk = bisect.bisect_right(starts, slot) - 1
        return self._chunk_ids[tier][chunk] * self.chunk_pages + slot - starts[chunk]

    def is_host(self, address: int) -> bool:
        return address // self.chunk_pages in self._chunk_ids["host"]

    @property
    def scales(self) -> dict:
        """The splice's ``scale_k``/``scale_v`` arguments (empty for a pool stored as is)."""
        return dict(scale_k=self.k_scales, scale_v=self.v_scales) if self.fp8 else {}

    def write(self, addresses: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Writes pages ``k[i]``, ``v[i]`` ([n, N, H, D]) at ``addresses[i]``: one copy,
        one ``index_copy_`` per chunk touched (per page for host chunks of a CUDA pool,
        asynchronous into pinned memory). An FP8 pool quantises them first (one scale per
        page and head)."""
        if self.fp8:
            (k, scale_k), (v, scale_v) = quantize_fp8(k), quantize_fp8(v)
            # float8 has no CPU index_copy_: its bytes are copied
            k, v = k.view(torch.uint8), v.view(torch.uint8)
            self._write(addresses, k, v, self.k_chunks, self.v_chunks, as_bytes=True)
            self._write(addresses, scale_k, scale_v, self.k_scales, self.v_scales)
        else:
            self._write(addresses, k, v, self.k_chunks, self.v_chunks)

    def _write(self, addresses: list[int], k: torch.Tensor, v: torch.Tensor, k_chunks: list[torch.Tensor],
               v_chunks: list[torch.Tensor], as_bytes: bool = False) -> None:
        by_chunk: dict[int, tuple[list[int], list[int]]] = {}
        for i, address in enumerate(addresses):
            chunk, row = divmod(address, self.chunk_pages)
            rows, index = by_chunk.setdefault(chunk, ([], []))
            rows.append(row)
            index.append(i)
        for chunk, (rows, index) in by_chunk.items():
            dst_k, dst_v = k_chunks[chunk], v_chunks[chunk]
            if as_bytes:
                dst_k, dst_v = dst_k.view(torch.uint8), dst_v.view(torch.uint8)
            if dst_k.device != k.device:
                for row, i in zip(rows, index):
                    dst_k[row].copy_(k[i], non_blocking=True)
                    dst_v[row].copy_(v[i], non_blocking=True)
                continue
            src_k, src_v = k, v
            if len(index) != k.shape[0]:
                sel = index_tensor(index, k.device)
                src_k, src_v = k.index_select(0, sel), v.index_select(0, sel)
            rows_t = index_tensor(rows, dst_k.device)
            dst_k.index_copy_(0, rows_t, src_k)
            dst_v.index_copy_(0, rows_t, src_v)

    def read(self, addresses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of pages ``addresses`` (>= 0), ``[*addresses.shape, N, H, D]`` each, on the
        pool's device (waits for copies in flight into host chunks: for inspection)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        k = read_pages(self.k_chunks, addresses, self.chunk_pages)
        v = read_pages(self.v_chunks, addresses, self.chunk_pages)
        if self.fp8:
            k = dequantize_fp8(k, read_scales(self.k_scales, addresses, self.chunk_pages), self.dtype)
            v = dequantize_fp8(v, read_scales(self.v_scales, addresses, self.chunk_pages), self.dtype)
        return k, v

    def usage(self) -> dict:
        """Pages and bytes per tier (reserved = chunks allocated), chunks, sessions."""
        u = self.table.usage()
        reserved = {tier: sum(self.k_chunks[i].shape[0] for i in ids) for tier, ids in self._chunk_ids.items()}
        return dict(
            backend=self.backend, page_bytes=self.page_bytes, chunk_pages=self.chunk_pages,
            history_dtype=str(self.storage_dtype).removeprefix("torch."),
            gpu_chunks=len(self._chunk_ids["gpu"]), host_chunks=len(self._chunk_ids["host"]),
            gpu_pages_used=u["gpu_used"], host_pages_used=u["host_used"],
            gpu_bytes_used=u["gpu_used"] * self.page_bytes, host_bytes_used=u["host_used"] * self.page_bytes,
            gpu_bytes_reserved=reserved["gpu"] * self.page_bytes,
            host_bytes_reserved=reserved["host"] * self.page_bytes,
            gpu_pages_budget=self.gpu_cap, host_pages_budget=self.host_cap,
            pages_used=u["pages_used"], streams=u["num_streams"], sessions=self.sessions)


def check_append_args(store: "HistoryStore", k: torch.Tensor, v: torch.Tensor, descriptors: torch.Tensor) -> int:
    """Checks the arguments of ``store.append`` against the store's shapes and returns Fe.

    k, v: [L, B, Fe, N, H, D]; descriptors: [B, Fe, Dd].
    """
    expected = (store.num_layers, store.batch)
    if k.dim() != 6 or k.shape[:2] != expected or k.shape[3:] != store.page_shape or v.shape != k.shape:
        raise ValueError(f"history.append: k/v must be [L={expected[0]}, B={expected[1]}, Fe, "
                         f"{', '.join(map(str, store.page_shape))}], got {tuple(k.shape)} / {tuple(v.shape)}")
    fe = k.shape[2]
    if descriptors.dim() != 3 or descriptors.shape[:2] != (store.batch, fe) \
            or descriptors.shape[2] != store.descriptor_dim:
        raise ValueError(f"history.append: descriptors must be [B={store.batch}, Fe={fe}, "
                         f"{store.descriptor_dim}], got {tuple(descriptors.shape)}")
    return fe


class HistoryStore:
    """The history of one session: B streams (a lockstep batch) whose pages come from a
    shared :class:`PagePool` and go back to it on :meth:`close`.

    overflow_policy: "error" raises HistoryFullError before anything changes when the
        pool cannot take an append; "drop_oldest" warns once and forgets this session's
        oldest frames (never another session's).
    max_frames: the most frames each stream keeps (None: no cap). An append that would
        pass it first drops frames chosen by ``retention`` (see
        ``MemoryConfig.retention``), per stream, so a stream never holds more than
        ``max_frames`` frames, not even during the append; then the pool budgets and
        ``overflow_policy`` apply as without a cap.
    retention: "drop_oldest" | "least_retrieved" | "diverse".
    recency_guard: the newest frames a policy never drops (with the frames being
        appended): they are the ones the search skips, so the guard stays the newest
        frames in eviction order.

    Frames are numbered by their ordinal, the how-many-th frame the store took (0-based),
    which :meth:`frame_ids` gives for the held frames.
    """

    def __init__(self, pool: PagePool, batch: int, descriptor_dim: int, overflow_policy: str = "error",
                 initial_frames: int = 16, max_frames: int | None = None, retention: str = "drop_oldest",
                 recency_guard: int = 0) -> None:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"HistoryStore.batch must be an integer >= 1, got {batch!r}")
        if isinstance(descriptor_dim, bool) or not isinstance(descriptor_dim, int) or descriptor_dim < 1:
            raise ValueError(f"HistoryStore.descriptor_dim must be an integer >= 1, got {descriptor_dim!r}")
        if overflow_policy not in OVERFLOW_POLICIES:
            raise ValueError(f"HistoryStore.overflow_policy must be one of {OVERFLOW_POLICIES}, "
                             f"got {overflow_policy!r}")
        if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int)
                                       or max_frames < 1):
            raise ValueError(f"HistoryStore.max_frames must be None or an integer >= 1, got {max_frames!r}")
        if retention not in RETENTION_POLICIES:
            raise ValueError(f"HistoryStore.retention must be one of {RETENTION_POLICIES}, got {retention!r}")
        if isinstance(recency_guard, bool) or not isinstance(recency_guard, int) or recency_guard < 0:
            raise ValueError(f"HistoryStore.recency_guard must be an integer >= 0, got {recency_guard!r}")
        if max_frames is not None and max_frames < recency_guard:
            raise ValueError(f"HistoryStore.max_frames={max_frames} is below recency_guard={recency_guard}: the "
                             "guarded newest frames could not all be kept")
        self.max_frames, self.retention, self.recency_guard = max_frames, retention, recency_guard
        self.clock = 0      # searches recorded so far (the clock of last uses)
        self.pool = pool
        self.num_layers, self.batch = pool.num_layers, batch
        self.page_shape, self.dtype, self.device = pool.page_shape, pool.dtype, pool.device
        self.descriptor_dim = descriptor_dim
        self.overflow_policy = overflow_policy
        self.pages_per_frame = batch * pool.num_layers
        self.frame_bytes = self.pages_per_frame * pool.page_bytes
        self._streams = [pool.table.create_stream() for _ in range(batch)]
        self._ring = DescriptorRing(batch, descriptor_dim, initial_frames, self.device, layers=pool.num_layers)
        self.num_frames = 0
        self.dropped_frames = 0
        self.closed = False
        pool.sessions += 1

    # ---- sizes ----------------------------------------------------------------------------

    @property
    def bytes_used(self) -> int:
        """K+V bytes of the frames held."""
        return self.num_frames * self.frame_bytes

    @property
    def capacity_frames(self) -> int | None:
        """Frames this store could hold now: those held plus what the pool has free
        (None: unbounded)."""
        free = self.pool.free_pages()
        return None if free is None else self.num_frames + free // self.pages_per_frame

    @property
    def appended_frames(self) -> int:
        """Frames the store ever took (held + dropped)."""
        return self._ring.appended

    def usage(self) -> dict:
        return dict(num_frames=self.num_frames, dropped_frames=self.dropped_frames, bytes_used=self.bytes_used,
                    frame_bytes=self.frame_bytes, index_bytes=self._ring.nbytes, streams=list(self._streams),
                    max_frames=self.max_frames, retention=self.retention)

    def _check_open(self, op: str) -> None:
        if self.closed:
            raise RuntimeError(f"history.{op}: the store is closed (its pages went back to the pool)")

    # ---- append / drop --------------------------------------------------------------------

    def append(self, k: torch.Tensor, v: torch.Tensor, descriptors: torch.Tensor) -> None:
        """k, v: [L, B, Fe, N, H, D]; descriptors: [B, Fe, Dd] (float32)."""
        fe = check_append_args(self, k, v, descriptors)
        k, v = k.to(self.device, self.dtype), v.to(self.device, self.dtype)
        self._append(fe, lambda f: (k[:, :, f], v[:, :, f]), descriptors)

    def append_window(self, window_k: torch.Tensor, window_v: torch.Tensor, slots: list[int],
                      descriptors: torch.Tensor) -> None:
        """Frames leaving a window: ``window_k``/``window_v`` [L, B, W, N, H, D], ``slots``
        the frames' window slots (oldest first), descriptors [B, Fe, Dd]. Each frame is
        copied once, from its window slot straight into its pages."""
        # Checked before any page is placed: a bad shape would leak pages or desync the ring.
        w = window_k.shape[2] if window_k.dim() == 6 else 0
        if window_k.dim() != 6 or window_k.shape[:2] != (self.num_layers, self.batch) or window_k.shape[3:] != \
                self.page_shape or window_v.shape != window_k.shape or {window_k.dtype, window_v.dtype} != {self.dtype}:
            raise ValueError(f"history.append_window: window_k/window_v must be {self.dtype} [L={self.num_layers}, "
                             f"B={self.batch}, W, {', '.join(map(str, self.page_shape))}], got {window_k.dtype} "
                             f"{tuple(window_k.shape)} / {window_v.dtype} {tuple(window_v.shape)}")
        if any(not 0 <= s < w for s in slots):
            raise ValueError(f"history.append_window: slots must lie in [0, W={w}), got {list(slots)}")
        if descriptors.shape != (self.batch, len(slots), self.descriptor_dim):
            raise ValueError(f"history.append_window: descriptors must be [B={self.batch}, Fe={len(slots)}, "
                             f"{self.descriptor_dim}], got {tuple(descriptors.shape)}")
        self._append(len(slots), lambda f: (window_k[:, :, slots[f]], window_v[:, :, slots[f]]), descriptors)

    def _append(self, fe: int, frame: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
                descriptors: torch.Tensor) -> None:
        self._check_open("append")
        if fe == 0:
            return
        if self.max_frames is not None and self.num_frames + fe > self.max_frames:
            if fe > self.max_frames:
                raise ValueError(f"history.append: {fe} frames at once exceed max_frames={self.max_frames}")
            self._retain(self.num_frames + fe - self.max_frames, fe, descriptors)
        needed = fe * self.pages_per_frame
        free = self.pool.free_pages()
        if free is not None and needed > free:
            self._make_room(fe, needed, free)
        addresses = self.pool.place(self._streams, fe)          # order (stream, frame, layer)
        num_layers, batch = self.num_layers, self.batch
        for f in range(fe):
            # frame f's pages in (layer, stream) order: the order of k[:, :, f].flatten(0, 1)
            dst = [addresses[(b * fe + f) * num_layers + layer] for layer in range(num_layers) for b in range(batch)]
            k, v = frame(f)
            self.pool.write(dst, k.flatten(0, 1), v.flatten(0, 1))
        if self.num_frames + fe > self._ring.capacity:
            self._ring.reserve(max(self.num_frames + fe, 2 * self._ring.capacity))
        pages = index_tensor(addresses, self.device).view(batch, fe, num_layers)
        self._ring.append(descriptors.to(self.device), pages, clock=self.clock)
        self.num_frames += fe

    def _make_room(self, fe: int, needed: int, free: int) -> None:
        drop = -1 if self.overflow_policy == "error" else self.pool.table.frames_to_drop(self._streams, needed - free)
        if drop < 0:
            why = ("overflow_policy='error'" if self.overflow_policy == "error" else
                   "dropping every frame of this session frees too little (the pool is shared with other "
                   "sessions, or one append exceeds the budgets)")
            raise HistoryFullError(
                f"history budget full: {self.num_frames} frames held, {fe} more need {needed} pages "
                f"({needed * self.pool.page_bytes} bytes) but the pool has {free} pages free; {why}; raise "
                "gpu_budget_bytes/host_budget_bytes or set overflow_policy='drop_oldest'")
        self._drop_oldest(drop)

    def _drop_oldest(self, count: int, warn: bool = True) -> None:
        if warn and not self.dropped_frames:
            warn_dropping(self.num_frames, self.frame_bytes, stacklevel=5)
        self.pool.table.drop_oldest(self._streams, count)
        self._ring.drop_oldest(count)
        self.num_frames -= count
        self.dropped_frames += count

    # ---- retention ------------------------------------------------------------------------

    def _retain(self, count: int, fe: int, incoming: torch.Tensor) -> None:
        """Drop ``count`` held frames of every stream, chosen by the retention policy,
        before ``fe`` new frames (descriptors ``incoming`` [B, fe, Dd]) come in."""
        if self.retention == "drop_oldest":
            self._drop_oldest(count, warn=False)
            return
        # the recency_guard newest frames after the append are never dropped
        candidates = self.num_frames - max(0, self.recency_guard - fe)
        positions = self.choose_drops(count, candidates, incoming)          # [B, count]
        for column in positions.sort(dim=1, descending=True).values.t().tolist():
            # highest position first: the lower positions of a stream stay where they are
            self.pool.table.drop_frames(self._streams, column)
        self._ring.drop(positions)
        self.num_frames -= count
        self.dropped_frames += count

    def choose_drops(self, count: int, candidates: int, incoming: torch.Tensor | None = None) -> torch.Tensor:
        """Positions [B, count] (int64, on the store's device) of the held frames the
        retention policy drops, chosen among the ``candidates`` oldest; ``incoming``
        [B, Fe, Dd]: descriptors of frames about to be kept as well ("diverse")."""
        if not 0 <= count <= candidates <= self.num_frames:
            raise ValueError(f"history.choose_drops: need 0 <= count ({count}) <= candidates ({candidates}) <= "
                             f"held frames ({self.num_frames})")
        if count == 0:
            return torch.empty(self.batch, 0, dtype=torch.int64, device=self.device)
        if self.retention == "drop_oldest":
            return torch.arange(count, device=self.device).expand(self.batch, -1).clone()
        if self.retention == "least_retrieved":
            # fewest hits, then least recently used, then oldest: stable sorts, last key first
            # (positions are in eviction order, so the oldest frame comes first already)
            hits = self._ring.hits()[:, :candidates]
            last = self._ring.last_used()[:, :candidates]
            order = torch.sort(last, dim=1, stable=True).indices
            order = order.gather(1, torch.sort(hits.gather(1, order), dim=1, stable=True).indices)
            return order[:, :count]
        return self._choose_diverse(count, candidates, incoming)

    def _choose_diverse(self, count: int, candidates: int, incoming: torch.Tensor | None) -> torch.Tensor:
        """Greedy: drop the candidate with the highest cosine similarity to any other frame
        still kept (held, not yet dropped, or incoming); ties to the oldest."""
        desc = self.descriptors()
        if incoming is not None and incoming.shape[1]:
            desc = torch.cat([desc, incoming.to(self.device, torch.float32)], dim=1)
        unit = F.normalize(desc.double(), dim=-1)
        sims = unit @ unit.transpose(1, 2)                                   # [B, M, M], cosines >= -1
        sims.diagonal(dim1=1, dim2=2).fill_(-3.0)                            # not its own neighbour
        rows = torch.arange(self.batch, device=self.device)
        dead = torch.zeros(self.batch, candidates, dtype=torch.bool, device=self.device)
        chosen = []
        for _ in range(count):
            score = sims[:, :candidates].amax(dim=2).masked_fill(dead, -4.0)   # [B, candidates]
            pick = score.argmax(dim=1)        # the first (oldest) of equal maxima
            chosen.append(pick)
            dead[rows, pick] = True
            sims[rows, :, pick] = -3.0        # no longer anyone's neighbour
        return torch.stack(chosen, dim=1)

    def record_hits(self, index: torch.Tensor) -> None:
        """A search retrieved frames ``index`` [B, r] (positions among the held frames):
        counts a hit for each and advances the clock (read by "least_retrieved")."""
        self.clock += 1
        self._ring.record_hits(index, self.clock)

    # ---- retrieval ------------------------------------------------------------------------

    def frame_ids(self) -> torch.Tensor:
        """[B, num_frames] int64 view: the ordinal of each held frame (see the class doc)."""
        return self._ring.ordinals()

    def descriptors(self) -> torch.Tensor:
        """[B, num_frames, Dd] float32 view, frame order = eviction order."""
        return self._ring.descriptors()

    def descriptor_norms(self) -> torch.Tensor:
        """[B, num_frames] float32 L2 norms of the descriptors, kept from insertion."""
        return self._ring.norms()

    def page_addresses(self) -> torch.Tensor:
        """[B, num_frames, L] int64 pool addresses of the held frames (a view)."""
        return self._ring.pages()

    def page_ids(self, frame_ids: torch.Tensor) -> torch.Tensor:
        """frame_ids [B, K] (int64, -1 = none, else < num_frames) -> pool addresses
        [L, B, K] int64 on the device, -1 kept. A device gather: no host sync."""
        self._check_open("page_ids")
        if frame_ids.dim() != 2 or frame_ids.shape[0] != self.batch:
            raise ValueError(f"history.page_ids: frame_ids must be [B={self.batch}, K], got {tuple(frame_ids.shape)}")
        frame_ids = frame_ids.to(self.device)
        if self.num_frames == 0:
            return torch.full((self.num_layers, *frame_ids.shape), -1, dtype=torch.int64, device=self.device)
        rows = self._ring.pages()[torch.arange(self.batch, device=self.device).unsqueeze(1), frame_ids.clamp(min=0)]
        pages = rows.permute(2, 0, 1)   # [B, K, L] -> [L, B, K]
        return torch.where(frame_ids >= 0, pages, torch.full_like(pages, -1))

    def frame_kv(self, frame: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of one history frame, [L, B, N, H, D] each (for inspection and tests)."""
        self._check_open("frame_kv")
        if not 0 <= frame < self.num_frames:
            raise IndexError(f"history frame {frame} out of range [0, {self.num_frames})")
        return self.pool.read(self.page_addresses()[:, frame].t())

    # ---- end ------------------------------------------------------------------------------

    def close(self) -> None:
        """Gives every page back to the pool. Idempotent."""
        if self.closed:
            return
        for stream in self._streams:
            self.pool.table.free_stream(stream)
        self.closed = True
        self.pool.sessions -= 1
        self._ring.drop_oldest(self._ring.num_frames)   # no descriptors of pages it no longer holds
        self.num_frames = 0


__all__ = ["PagePool", "HistoryStore", "HistoryFullError", "CapacityError", "warn_dropping", "OVERFLOW_POLICIES"]
