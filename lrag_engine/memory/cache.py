"""RetrievalCache: window + history + retrieval + context for one batch of streams.

This is the seam another AR backbone uses to get LongLive-RAG memory:

    cache = RetrievalCache(...)
    for each block:
        log = cache.begin_block(frames)                 # search, evict, splice
        for each forward: out = backbone(x, attn=cache.attention(recache=...))
        cache.end_block(clean_frames)                   # descriptors of the new frames

``attention(...)`` returns a callable ``(layer, q, k, v) -> out`` with q, k, v
``[B, F*N, H, D]`` (q, k un-rotated); RoPE positions are the cache's business.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..attention.backend import AttendFn
from ..attention.context import BlockAttention, ContextBuffer, block_rope
from ..config import MemoryConfig
from ..ops.rope import RopeTables
from ..ops.splice import splice
from .history import HistoryStore
from .retrieval import BlockLog, Descriptor, RetrievalResult, make_log, retrieve
from .window import BlockPlacement, WindowCache


class RetrievalCache:
    def __init__(self, memory: MemoryConfig, num_layers: int, batch: int, tokens_per_frame: int,
                 num_heads: int, head_dim: int, descriptor: Descriptor, tables: RopeTables,
                 attend: AttendFn, dtype: torch.dtype, device: torch.device | str,
                 kernels: str = "auto", history: HistoryStore | None = None) -> None:
        self.memory = memory
        self.batch = batch
        self.descriptor = descriptor
        self.tables = tables
        self.attend = attend
        self.kernels = kernels
        self.device = torch.device(device)
        dims = dict(num_heads=num_heads, head_dim=head_dim, dtype=dtype, device=device)
        self.window = WindowCache(num_layers, batch, memory.window, memory.sink, tokens_per_frame,
                                  descriptor_dim=descriptor.dim, **dims)
        self.history = history if history is not None else HistoryStore(
            num_layers, batch, tokens_per_frame, descriptor_dim=descriptor.dim,
            gpu_budget_bytes=memory.gpu_budget_bytes, overflow_policy=memory.overflow_policy, **dims)
        self.context = ContextBuffer(num_layers, batch, memory.window, tokens_per_frame, **dims)
        self.query: torch.Tensor | None = None          # [B, Dd] descriptor of the newest frame
        self.block_index = 0
        self._placement: BlockPlacement | None = None
        self._context_frames = 0
        self._block_positions: list[int] = []
        self._block_slots: torch.Tensor | None = None
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------ block start
    def begin_block(self, frames: int) -> Callable[[], BlockLog]:
        """Search the history, evict what the block pushes out, splice the context.

        Returns a deferred log (call it to read the block's retrieval log on the host).
        """
        mem = self.memory
        if self.query is not None and mem.top_k > 0:
            result = retrieve(self.query, self.history.descriptors(), self.history.descriptor_norms(),
                              mem.top_k, mem.recency_guard, self.kernels)
        else:
            empty = torch.empty(self.batch, 0, device=self.device)
            result = RetrievalResult(empty.long(), empty.float(), 0)
        # Global id of history frame i, fixed before this block's evictions.
        frame_offset = mem.sink + self.history.dropped_frames
        first = self.window.next_frame
        log = make_log(self.block_index, (first, first + frames),
                       first - 1 if self.query is not None else None, result, frame_offset)

        placement = self.window.plan_block(frames)
        if placement.evicted:
            k, v, desc = self.window.gather(placement.evicted)
            self.history.append(k, v, desc)   # may raise before the window changes
        self.window.commit(placement)
        self._placement = placement
        self._splice(placement, result)
        self.block_index += 1
        return log

    def _splice(self, placement: BlockPlacement, result: RetrievalResult) -> None:
        mem = self.memory
        order = placement.order
        block_frames = {f.frame for f in placement.block}
        position = {f.frame: i for i, f in enumerate(order)}
        sinks = [f for f in order[: mem.sink] if f.frame not in block_frames]
        local_budget = mem.window - mem.sink - (result.count if mem.widen_local_until_memory else mem.top_k)
        non_sink = list(order[mem.sink:])
        local = [f for f in non_sink[max(0, len(non_sink) - local_budget):] if f.frame not in block_frames]
        r = result.count
        self._context_frames = len(sinks) + r + len(local) + len(placement.block)

        slots = [f.slot for f in sinks] + [-1] * r + [f.slot for f in local]
        positions = [position[f.frame] for f in sinks] + [0] * r + [position[f.frame] for f in local]
        pos_t = torch.tensor(positions, dtype=torch.int64, device=self.device)
        if slots:
            pool_k, pool_v = self.window.page_pools()
            splice(pool_k, pool_v, self.window.page_ids(slots), pos_t, self.tables,
                   self.context.k, self.context.v, frame_offset=0, mode=self.kernels)
        if r:
            pages = self.history.page_ids(result.index)
            splice(self.history.pool_k, self.history.pool_v, pages, pos_t[len(sinks):len(sinks) + r],
                   self.tables, self.context.k, self.context.v, frame_offset=len(sinks), mode=self.kernels)
        self._block_positions = [position[f.frame] for f in placement.block]
        self._block_slots = torch.tensor([f.slot for f in placement.block], dtype=torch.int64,
                                         device=self.device)
        self._rope = block_rope(self.tables, self._block_positions, self.device)

    # ------------------------------------------------------------------ forwards
    def attention(self, recache: bool) -> BlockAttention:
        """The self-attention callable for one forward of the current block; the recache
        pass (``recache=True``) also stores the block's K/V into the window."""
        if self._placement is None:
            raise RuntimeError("RetrievalCache.attention called before begin_block")
        cos, sin = self._rope
        window = dict(window_k=self.window.k, window_v=self.window.v, block_slots=self._block_slots) \
            if recache else {}
        return BlockAttention(self.context, self._context_frames, cos, sin, self.attend, **window)

    # ------------------------------------------------------------------ block end
    def end_block(self, clean: torch.Tensor) -> None:
        """clean [B, F, C, H, W]: the block's output; its descriptors index the frames."""
        b, f = clean.shape[:2]
        desc = self.descriptor(clean.flatten(0, 1)).float().view(b, f, -1)
        self.window.descriptors.index_copy_(1, self._block_slots, desc)
        self.query = desc[:, -1]
        self._placement = None
