"""RetrievalCache: window + history + retrieval + context for one batch of streams.

This is the seam another AR backbone uses to get LongLive-RAG memory:

    cache = RetrievalCache(...)
    for each block:
        log = cache.begin_block(frames)                 # search, evict, splice
        for each forward: out = backbone(x, attn=cache.attention(recache=...))
        cache.end_block(clean_frames)                   # descriptors of the new frames
        cache.start_retrieval()                         # optional: search for the next
                                                        # block now, on a side stream

``attention(...)`` returns a callable ``(layer, q, k, v) -> out`` with q, k, v
``[B, F*N, H, D]`` (q, k un-rotated); RoPE positions are the cache's business.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..attention.backend import AttendFn
from ..attention.context import BlockAttention, ContextBuffer, block_rope
from ..config import MemoryConfig
from ..ops.rope import RopeTables, apply_rope_ref
from ..ops.splice import splice
from ..runtime.transfer import index_tensor
from .budget import HistoryBudget
from .history import HistoryStore
from .paged import PagedHistoryStore, make_history_store
from .retrieval import BlockLog, Descriptor, RetrievalResult, make_log, retrieve
from .window import BlockPlacement, WindowCache


@dataclass(frozen=True)
class _Layout:
    """Context layout of one block: [sinks | retrieved | local | block]."""

    sinks: int
    retrieved: int
    local: int
    slots: list[int]            # window slot of each non-block context frame, -1 = retrieved
    positions: list[int]        # RoPE temporal index of each non-block context frame
    block_positions: tuple[int, ...]


class RetrievalCache:
    def __init__(self, memory: MemoryConfig, num_layers: int, batch: int, tokens_per_frame: int,
                 num_heads: int, head_dim: int, descriptor: Descriptor, tables: RopeTables,
                 attend: AttendFn, dtype: torch.dtype, device: torch.device | str,
                 kernels: str = "auto", history: HistoryStore | None = None,
                 refetch_per_forward: bool = False) -> None:
        self.memory = memory
        self.batch = batch
        self.descriptor = descriptor
        self.tables = tables
        self.attend = attend
        self.kernels = kernels
        self.device = torch.device(device)
        dims = dict(num_heads=num_heads, head_dim=head_dim, dtype=dtype)
        self.window = WindowCache(num_layers, batch, memory.window, memory.sink, tokens_per_frame,
                                  descriptor_dim=descriptor.dim, device=device, **dims)
        self.history = history if history is not None else self._make_history(
            num_layers, tokens_per_frame, refetch_per_forward, dims)
        self.context = ContextBuffer(num_layers, batch, memory.window, tokens_per_frame, device=device, **dims)
        self.refetch_per_forward = refetch_per_forward
        self.query: torch.Tensor | None = None          # [B, Dd] descriptor of the newest frame
        self.block_index = 0
        self.signature: tuple = ()
        self._placement: BlockPlacement | None = None
        self._context_frames = 0
        # Persistent device buffers, updated in place, so that captured graphs see them.
        self.block_slots = torch.zeros(memory.frames_per_block, dtype=torch.int64, device=self.device)
        self._rope: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self._block_rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self._refetch: tuple[torch.Tensor, int] | None = None
        self._pending: tuple[RetrievalResult, torch.cuda.Event | None] | None = None
        self._side_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._descriptors_ready = torch.cuda.Event() if self._side_stream is not None else None

    def _make_history(self, num_layers: int, tokens_per_frame: int, refetch_per_forward: bool,
                      dims: dict) -> HistoryStore | PagedHistoryStore:
        mem = self.memory
        budget = HistoryBudget.plan(mem, num_layers, self.batch, tokens_per_frame, dims["num_heads"],
                                    dims["head_dim"], dims["dtype"], host_only=refetch_per_forward)
        common = dict(num_layers=num_layers, batch=self.batch, tokens_per_frame=tokens_per_frame,
                      descriptor_dim=self.descriptor.dim, overflow_policy=mem.overflow_policy,
                      gpu_budget_bytes=budget.gpu_bytes, **dims)
        if refetch_per_forward:
            # The baseline keeps the history in host memory, like the public reference it
            # reproduces, and reads it again in every forward.
            return HistoryStore(device="cpu", **common)
        # history_tier="host": every history frame lives in the pinned host tier; the
        # device pool (gpu_bytes) only stages the frames retrieved for a block and the
        # frames being evicted.
        kind = "paged" if mem.history_tier == "host" else "auto"
        return make_history_store(kind, device=self.device, host_budget_bytes=budget.host_bytes, **common)

    # ------------------------------------------------------------------ retrieval
    def _search(self) -> RetrievalResult:
        mem = self.memory
        if self.query is None or mem.top_k == 0:
            empty = torch.empty(self.batch, 0, device=self.device)
            return RetrievalResult(empty.long(), empty.float(), 0)
        keys = self.history.descriptors().to(self.device, non_blocking=True)
        norms = self.history.descriptor_norms().to(self.device, non_blocking=True)
        result = retrieve(self.query, keys, norms, mem.top_k, mem.recency_guard, self.kernels)
        if result.count:
            # Resolving pages makes them resident (a host-tier prefetch), here on the side
            # stream when called from start_retrieval.
            result.pages = self.history.page_ids(result.index.to(self.history.pool_k.device))
        return result

    def start_retrieval(self) -> None:
        """Run the next block's search now (after ``end_block``). On CUDA it goes to a side
        stream, so it overlaps with whatever the caller enqueues next (the recache pass)."""
        if self._side_stream is None or self.query is None:
            self._pending = (self._search(), None)
            return
        # Wait for the descriptors only, not for work enqueued after end_block.
        self._side_stream.wait_event(self._descriptors_ready)
        self.query.record_stream(self._side_stream)
        with torch.cuda.stream(self._side_stream):
            result = self._search()
            done = torch.cuda.Event()
            done.record(self._side_stream)
        self._pending = (result, done)

    def close(self) -> None:
        """Make the compute stream wait for a search still queued on the side stream, so
        the memory it uses is not handed out again while it runs."""
        if self._pending is not None and self._pending[1] is not None:
            torch.cuda.current_stream(self.device).wait_event(self._pending[1])
        self._pending = None

    # ------------------------------------------------------------------ block start
    def begin_block(self, frames: int) -> Callable[[], BlockLog]:
        """Search the history (unless ``start_retrieval`` already did), evict what the block
        pushes out, splice the context. Returns a deferred log: call it to read the block's
        retrieval log on the host."""
        if frames != self.memory.frames_per_block:
            raise ValueError(f"begin_block: frames must be frames_per_block={self.memory.frames_per_block}, "
                             f"got {frames}")
        if self._pending is None:
            self.start_retrieval()
        result, done = self._pending
        self._pending = None
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)
            for tensor in (result.index, result.scores, result.pages):
                if tensor is not None and tensor.is_cuda:
                    tensor.record_stream(torch.cuda.current_stream(self.device))
        # Global id of history frame i, fixed before this block's evictions.
        frame_offset = self.memory.sink + self.history.dropped_frames
        first = self.window.next_frame
        log = make_log(self.block_index, (first, first + frames),
                       first - 1 if self.query is not None and self.memory.top_k > 0 else None,
                       result, frame_offset)

        placement = self.window.plan_block(frames)
        layout = self._layout(placement, result.count)
        # Retrieved pages are spliced before this block's evictions enter the history, so
        # an append that spills pages can never move them under the splice.
        self._splice_retrieved(layout, result)
        # Native mode (top_k = 0) never reads the history: evicted frames are dropped.
        if placement.evicted and self.memory.top_k > 0:
            k, v, desc = self.window.gather(placement.evicted)
            self.history.append(k, v, desc)   # may raise before the window changes
        self.window.commit(placement)
        self._placement = placement
        self._splice_window(layout, placement)
        self.block_index += 1
        return log

    def _layout(self, placement: BlockPlacement, retrieved: int) -> _Layout:
        """Which window frames the context holds, and at which RoPE positions."""
        mem = self.memory
        order = placement.order
        block_frames = {f.frame for f in placement.block}
        position = {f.frame: i for i, f in enumerate(order)}
        sinks = [f for f in order[: mem.sink] if f.frame not in block_frames]
        local_budget = mem.window - mem.sink - (retrieved if mem.widen_local_until_memory else mem.top_k)
        non_sink = list(order[mem.sink:])
        local = [f for f in non_sink[max(0, len(non_sink) - local_budget):] if f.frame not in block_frames]
        slots = [f.slot for f in sinks] + [-1] * retrieved + [f.slot for f in local]
        positions = [position[f.frame] for f in sinks] + [0] * retrieved + [position[f.frame] for f in local]
        block_positions = tuple(position[f.frame] for f in placement.block)
        return _Layout(len(sinks), retrieved, len(local), slots, positions, block_positions)

    def _splice_retrieved(self, layout: _Layout, result: RetrievalResult) -> None:
        self._refetch = None
        if not layout.retrieved:
            return
        if self.refetch_per_forward:
            self._refetch = (result.pages, layout.sinks)
            return
        zeros = torch.zeros(layout.retrieved, dtype=torch.int64, device=self.device)
        splice(self.history.pool_k, self.history.pool_v, result.pages, zeros, self.tables,
               self.context.k, self.context.v, frame_offset=layout.sinks, mode=self.kernels)

    def _splice_window(self, layout: _Layout, placement: BlockPlacement) -> None:
        self._context_frames = layout.sinks + layout.retrieved + layout.local + len(placement.block)
        self.signature = (layout.sinks, layout.retrieved, layout.local, layout.block_positions)
        if layout.sinks + layout.local:
            pool_k, pool_v = self.window.page_pools()
            splice(pool_k, pool_v, self.window.page_ids(layout.slots), index_tensor(layout.positions, self.device),
                   self.tables, self.context.k, self.context.v, frame_offset=0, mode=self.kernels)
        self.block_slots.copy_(index_tensor([f.slot for f in placement.block], self.device))
        if layout.block_positions not in self._rope:
            self._rope[layout.block_positions] = block_rope(self.tables, list(layout.block_positions), self.device)
        self._block_rope = self._rope[layout.block_positions]

    def _refetch_layer(self, layer: int) -> None:
        """Baseline: bring this layer's retrieved K/V from host memory into the context."""
        pages, offset = self._refetch
        n = self.context.tokens_per_frame
        b, r = pages.shape[1:]
        k = self.history.pool_k[pages[layer].flatten()].to(self.device, non_blocking=True)
        v = self.history.pool_v[pages[layer].flatten()].to(self.device, non_blocking=True)
        cos, sin = self.tables.frame_cos_sin(torch.zeros(1, dtype=torch.int64))
        span = slice(offset * n, (offset + r) * n)
        self.context.k[layer][:, span] = apply_rope_ref(k, cos, sin).view(b, r * n, *k.shape[2:])
        self.context.v[layer][:, span] = v.view(b, r * n, *v.shape[2:])

    # ------------------------------------------------------------------ forwards
    def attention(self, recache: bool) -> BlockAttention:
        """The self-attention callable for one forward of the current block; the recache
        pass (``recache=True``) also stores the block's K/V into the window."""
        if self._placement is None:
            raise RuntimeError("RetrievalCache.attention called before begin_block")
        cos, sin = self._block_rope
        window = dict(window_k=self.window.k, window_v=self.window.v, block_slots=self.block_slots) \
            if recache else {}
        refetch = self._refetch_layer if self._refetch is not None else None
        return BlockAttention(self.context, self._context_frames, cos, sin, self.attend, refetch=refetch,
                              **window)

    # ------------------------------------------------------------------ block end
    def end_block(self, clean: torch.Tensor) -> None:
        """clean [B, F, C, H, W]: the block's output; its descriptors index the frames."""
        b, f = clean.shape[:2]
        desc = self.descriptor(clean.flatten(0, 1)).float()
        if desc.shape != (b * f, self.descriptor.dim):
            raise ValueError(f"descriptor returned {tuple(desc.shape)} for {b * f} frames; expected "
                             f"[{b * f}, {self.descriptor.dim}] (its .dim)")
        desc = desc.view(b, f, -1)
        self.window.descriptors.index_copy_(1, self.block_slots, desc)
        self.query = desc[:, -1]
        if self._descriptors_ready is not None:
            self._descriptors_ready.record()
