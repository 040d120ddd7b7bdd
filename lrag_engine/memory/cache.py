"""RetrievalCache: window + history + retrieval + context for one session (one stream
or a lockstep batch of streams).

This is the seam another AR backbone uses to get LongLive-RAG memory:

    cache = RetrievalCache(...)
    for each block:
        log = cache.begin_block(frames)                 # search, evict, splice (frames <= F)
        for each denoising forward: backbone(x, attn=cache.attention(recache=False))
        cache.end_block(clean_frames)                   # descriptors of the new frames
        backbone(clean, attn=cache.attention(recache=True)); cache.finish_recache()
        cache.start_retrieval()                         # optional: search for the next
                                                        # block now, on a side stream
    # between blocks, after switching the text (SPEC section 7):
    switch = cache.begin_recache(recache_sink=False)    # None: nothing to recompute
    if switch is not None:
        clean, attn = switch                            # window frames' clean latents
        backbone(clean, t=0, new_text, attn=attn); cache.end_recache()
    cache.close()                                       # pages back to the pool

``attention(...)`` returns a callable ``(layer, q, k, v) -> out`` with q, k, v
``[B, F*N, H, D]`` (q, k un-rotated); RoPE positions are the cache's business.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from ..attention.backend import AttendFn
from ..attention.context import BlockAttention
from ..config import MemoryConfig
from ..ops.rope import RopeTables, apply_rope_ref
from ..ops.splice import PageSource, splice_sources
from ..runtime.transfer import index_tensor
from .history import HistoryStore, PagePool
from .retrieval import BlockLog, Descriptor, RetrievalResult, make_log, retrieve
from .window import BlockPlacement, WindowCache
from .workspace import Workspace, WorkspaceRows, make_page_pool  # noqa: F401  (part of this module's API)


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
    """Window + history + retrieval + context of one session (one stream or a lockstep
    batch of streams).

    pool: the page pool the history takes its pages from (default: a pool of its own,
        sized by ``memory``'s budgets); workspace: the context buffer it splices into
        (default: its own).
    """

    def __init__(self, memory: MemoryConfig, num_layers: int, batch: int, tokens_per_frame: int,
                 num_heads: int, head_dim: int, descriptor: Descriptor, tables: RopeTables,
                 attend: AttendFn, dtype: torch.dtype, device: torch.device | str,
                 kernels: str = "auto", history: HistoryStore | None = None,
                 refetch_per_forward: bool = False, pool: PagePool | None = None,
                 workspace: Workspace | None = None, page_table: str = "auto") -> None:
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
        if history is None:
            if pool is None:
                pool = make_page_pool(memory, num_layers, batch, tokens_per_frame, device=device,
                                      host_only=refetch_per_forward, table=page_table, **dims)
            history = HistoryStore(pool, batch, descriptor.dim, overflow_policy=memory.overflow_policy,
                                   max_frames=memory.max_history_frames, retention=memory.retention,
                                   recency_guard=memory.recency_guard)
        self.history = history
        self.workspace = workspace or Workspace(num_layers, batch, memory.window, tokens_per_frame,
                                                frames_per_block=memory.frames_per_block, device=device, **dims)
        self.context = self.workspace.context
        self.refetch_per_forward = refetch_per_forward
        self.query: torch.Tensor | None = None          # [B, Dd] descriptor of the newest frame
        self.block_index = 0
        self.unlogged_blocks = 0    # blocks not numbered in the logs (priming from given frames)
        self.signature: tuple = ()
        self._placement: BlockPlacement | None = None
        self._plan: tuple | None = None     # (result, log, placement, layout) between plan and commit
        self._context_frames = 0
        # Persistent device buffers, updated in place.
        self._full_slots = torch.zeros(memory.frames_per_block, dtype=torch.int64, device=self.device)
        self.block_slots = self._full_slots     # [frames of the current block]
        self._block_rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self._refetch: list | None = None
        self._refetch_rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self._staged = False
        # Block protocol state: the previous block must have run end_block and a recache
        # pass over every layer before the next begin_block.
        self._ended = True
        self._recached: set[int] | None = None      # layers the recache pass stored
        # A switch pass (begin_recache .. end_recache): the layers it stored so far.
        self._switch: set[int] | None = None
        self._switched = False      # the context holds a switch pass's, not the block's
        self._epoch = 0             # bumped by every begin_block and begin_recache
        self.closed = False
        self._pending: tuple[RetrievalResult, torch.cuda.Event | None] | None = None
        self._side_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._descriptors_ready = torch.cuda.Event() if self._side_stream is not None else None

    # ------------------------------------------------------------------ retrieval
    def _search(self) -> RetrievalResult:
        mem = self.memory
        if self.query is None or mem.top_k == 0:
            empty = torch.empty(self.batch, 0, device=self.device)
            return RetrievalResult(empty.long(), empty.float(), 0, kept=self.history.num_frames)
        keys = self.history.descriptors().to(self.device, non_blocking=True)
        norms = self.history.descriptor_norms().to(self.device, non_blocking=True)
        result = retrieve(self.query, keys, norms, mem.top_k, mem.recency_guard, self.kernels)
        result.kept = keys.shape[1]
        # history ordinals of the retrieved frames (read now: the next append may move them)
        result.ids = self.history.frame_ids().gather(1, result.index.to(self.device))
        self.history.record_hits(result.index)
        if result.count:
            # Resolving pages makes them resident (a host-tier prefetch), here on the side
            # stream when called from start_retrieval.
            result.pages = self.history.page_ids(result.index)
        return result

    def start_retrieval(self) -> None:
        """Run the next block's search now (after ``end_block``). On CUDA it goes to a side
        stream, so it overlaps with whatever the caller enqueues next (the recache pass)."""
        if self._placement is not None and not self._ended:
            raise RuntimeError("start_retrieval: the current block has no descriptors yet; call it after "
                               "end_block(clean) (the search uses the newest frame as its query)")
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

    def settle(self) -> None:
        """Make the compute stream wait for a search still queued on the side stream, so
        the memory it uses is not handed out again while it runs."""
        if self._pending is not None and self._pending[1] is not None:
            torch.cuda.current_stream(self.device).wait_event(self._pending[1])
        self._pending = None

    def close(self) -> None:
        """Settle the side stream and give the history's pages back to the pool. Idempotent."""
        self.settle()
        self.history.close()
        self.closed = True

    def _check_protocol(self, caller: str = "begin_block") -> None:
        """The previous block must have finished: ``end_block`` and a recache pass; no
        switch pass may be open."""
        if self.closed:
            raise RuntimeError(f"{caller}: this retrieval attention is closed")
        if self._switch is not None:
            raise RuntimeError(f"{caller}: a switch recache pass (begin_recache) is still open: run the backbone "
                               "with its attention over every layer, then call end_recache()")
        if self.block_index == 0:
            return
        block = self.block_index - 1
        if not self._ended:
            raise RuntimeError(f"{caller}: end_block(clean) was not called for block {block}; without it "
                               "the block's frames get no descriptors and retrieval never finds them")
        layers = self.window.k.shape[0]
        done = self._recached if self._recached is not None else set()
        if len(done) != layers:
            missing = sorted(set(range(layers)) - done)
            raise RuntimeError(f"{caller}: the recache pass of block {block} did not run for layers {missing}: "
                               "call the backbone on the clean block with attention(recache=True) (every layer) "
                               "before the next block, or the window keeps zeros for those frames")

    # ------------------------------------------------------------------ block start
    def begin_block(self, frames: int | None = None) -> Callable[[], BlockLog]:
        """Search the history (unless ``start_retrieval`` already did), evict what the block
        pushes out, splice the context. Returns a deferred log: call it to read the block's
        retrieval log on the host.

        frames: the block's frame count, ``frames_per_block`` F by default; a shorter
        block (1 <= frames < F) serves priming from given clean frames (``Session.prime``),
        whose first block holds the remainder when their count is not a multiple of F.

        It is :meth:`plan_block` then :meth:`commit_block`; a caller that batches several
        sessions' forwards plans them all first (the plan tells the context signature),
        then commits each into its rows of a shared workspace (:meth:`bind`).
        """
        if self._plan is None:
            self.plan_block(frames)
        elif frames is not None and frames != len(self._plan[2].block):
            raise ValueError(f"begin_block: the planned block holds {len(self._plan[2].block)} frames, "
                             f"got frames={frames!r}")
        return self.commit_block()

    def plan_block(self, frames: int | None = None) -> tuple:
        """First half of :meth:`begin_block`: takes the block's search result and plans
        where its frames go, writing nothing. Returns the block's context signature
        ``(sinks, retrieved, local, block positions)``: sessions with equal signatures
        can share a forward."""
        full = self.memory.frames_per_block
        if frames is None:
            frames = full
        if isinstance(frames, bool) or not isinstance(frames, int) or not 1 <= frames <= full:
            raise ValueError(f"begin_block: frames must be frames_per_block={full}, got {frames!r} (a short "
                             f"block, for priming from given frames, may hold 1..{full} frames)")
        if self._plan is not None:
            raise RuntimeError("plan_block: a block is already planned; commit it (commit_block) first")
        self._check_protocol()
        self.finish_recache()
        if self._pending is None:
            self.start_retrieval()
        result, done = self._pending
        self._pending = None
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)
            for tensor in (result.index, result.scores, result.pages):
                if tensor is not None and tensor.is_cuda:
                    tensor.record_stream(torch.cuda.current_stream(self.device))
        first = self.window.next_frame
        # Global id of history frame ordinal o: sink + o.
        log = make_log(self.block_index - self.unlogged_blocks, (first, first + frames),
                       first - 1 if self.query is not None and self.memory.top_k > 0 else None,
                       result, self.memory.sink, history_frames=self.history.appended_frames)
        placement = self.window.plan_block(frames)
        layout = self._layout(placement, result.count)
        self._plan = (result, log, placement, layout)
        return (layout.sinks, layout.retrieved, layout.local, layout.block_positions)

    def commit_block(self) -> Callable[[], BlockLog]:
        """Second half of :meth:`begin_block`: splice the context (sinks, retrieved and
        local frames of every layer, one launch) into the bound workspace, then move
        evicted frames into the history."""
        if self._plan is None:
            raise RuntimeError("commit_block: no block is planned (call plan_block first)")
        if self.closed:
            raise RuntimeError("commit_block: this retrieval attention is closed")
        result, log, placement, layout = self._plan
        self._plan = None
        # The context is spliced before this block's evictions enter the history, so an
        # append that spills pages can never move retrieved pages under the splice.
        self._splice_context(layout, result)
        # Native mode (top_k = 0) never reads the history: evicted frames are dropped.
        if placement.evicted and self.memory.top_k > 0:
            slots = [f.slot for f in placement.evicted]
            desc = self.window.descriptors.index_select(1, index_tensor(slots, self.device))
            # may raise before the window changes
            self.history.append_window(self.window.k, self.window.v, slots, desc)
        self.window.commit(placement)
        self._placement = placement
        self._place_block(layout, placement)
        self.block_index += 1
        self._epoch += 1
        self._switched = False
        self._ended, self._recached = False, None
        return log

    def bind(self, workspace: "Workspace | WorkspaceRows") -> None:
        """Splice into, and run the forwards of, ``workspace`` (its batch must be this
        cache's) from the next block on: a workspace of its own size, or rows of a larger
        one that several sessions' batched forwards share."""
        if workspace.batch != self.batch:
            raise ValueError(f"bind: the workspace holds {workspace.batch} rows, this cache {self.batch} streams")
        if self._placement is not None and self._plan is None:
            raise RuntimeError("bind: only before the first block or between plan_block and commit_block")
        self.workspace = workspace
        self.context = workspace.context

    def mark_static_pass(self, recache: bool) -> None:
        """Bookkeeping of a forward that a batch runner ran for this cache over a shared
        workspace with static (staged) attention: the recache pass stored every layer
        into the staging rows, which :meth:`finish_recache` moves into the window."""
        if self._placement is None or self._switched or self.closed:
            raise RuntimeError("mark_static_pass: no block is running")
        if self.block_slots is not self._full_slots:
            raise ValueError("mark_static_pass: a short (priming) block runs eagerly only")
        self._staged = recache
        if recache:
            self._recached = set(range(self.window.k.shape[0]))

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

    def _splice_context(self, layout: _Layout, result: RetrievalResult) -> None:
        """One launch for the whole context but the block: sinks and local frames from the
        window pool, retrieved frames from the history pool, every layer (the ids and the
        per-frame source table on the device). It runs before this block's evictions
        enter the history, so an append that spills pages can never move them under it."""
        self._refetch = None
        retrieved = layout.retrieved
        if retrieved and self.refetch_per_forward:
            # The baseline reads the retrieved pages again in every forward, frame by frame
            # and layer by layer, like the public reference; it learns their places once
            # per block (a host read, as the reference's Python does).
            pool = self.history.pool
            addresses = result.pages.cpu().tolist()     # [L][B][r]
            if self._refetch_rope is None:
                cos, sin = self.tables.frame_cos_sin(torch.zeros((), dtype=torch.int64))
                self._refetch_rope = (cos.to(self.device), sin.to(self.device))
            self._refetch = [[[(frame_offset, *divmod(a, pool.chunk_pages)) for frame_offset, a in
                               enumerate(row, start=layout.sinks) if a >= 0] for row in per_layer]
                             for per_layer in addresses]
            retrieved = 0
        if not (layout.sinks + layout.local + retrieved):
            return
        pool_k, pool_v = self.window.page_pools()
        sources = [PageSource(pool_k, pool_v)]
        ids = self.window.page_ids(layout.slots)        # [L, B, Fc], -1 at the retrieved frames
        source = None
        if retrieved:
            pool = self.history.pool
            sources.append(PageSource(pool.k_chunks, pool.v_chunks, pool.chunk_pages, **pool.scales))
            head, tail = ids[..., :layout.sinks], ids[..., layout.sinks + retrieved:]
            ids = torch.cat([head, result.pages.to(ids.dtype), tail], dim=2)
            source = index_tensor([0 if slot >= 0 else 1 for slot in layout.slots], self.device)
        splice_sources(sources, ids, source, index_tensor(layout.positions, self.device), self.tables,
                       self.context.k, self.context.v, frame_offset=0, mode=self.kernels)

    def _place_block(self, layout: _Layout, placement: BlockPlacement) -> None:
        """The block's context length, signature, window slots and RoPE tables."""
        self._context_frames = layout.sinks + layout.retrieved + layout.local + len(placement.block)
        self.signature = (layout.sinks, layout.retrieved, layout.local, layout.block_positions)
        slots = index_tensor([f.slot for f in placement.block], self.device)
        if len(placement.block) == self._full_slots.shape[0]:
            # A full block: the persistent buffer (what static forwards were built around).
            self.block_slots = self._full_slots
            self.block_slots.copy_(slots)
        else:
            # A short (priming) block: eager forwards only, a tensor of its own.
            self.block_slots = slots
        self._block_rope = self.workspace.rope(self.tables, layout.block_positions)

    def _refetch_layer(self, layer: int) -> None:
        """Baseline: copy this layer's retrieved K/V from the host pages into the context,
        one frame at a time (asynchronous from pinned memory on CUDA), rotating each K at
        temporal position 0 on the device."""
        pool, n = self.history.pool, self.context.tokens_per_frame
        ctx_k, ctx_v = self.context.k[layer], self.context.v[layer]
        cos, sin = self._refetch_rope
        for b, frames in enumerate(self._refetch[layer]):
            for frame, chunk, row in frames:
                span = slice(frame * n, (frame + 1) * n)
                ctx_k[b, span].copy_(pool.k_chunks[chunk][row], non_blocking=True)
                ctx_v[b, span].copy_(pool.v_chunks[chunk][row], non_blocking=True)
                ctx_k[b, span] = apply_rope_ref(ctx_k[b, span], cos, sin)

    # ------------------------------------------------------------------ forwards
    def attention(self, recache: bool, static: bool = False) -> BlockAttention:
        """The self-attention callable for one forward of the current block; the recache
        pass (``recache=True``) also stores the block's un-rotated K/V into the window
        (``static``: into the workspace's staging area, which :meth:`finish_recache` then
        copies into the window; what a static forward shared by sessions can address)."""
        if self.closed:
            raise RuntimeError("attention: this retrieval attention is closed")
        if self._placement is None:
            raise RuntimeError("attention: called before begin_block")
        if self._switched:
            raise RuntimeError("attention: a switch recache pass replaced the context since the last block "
                               "began; call begin_block for the next block first")
        cos, sin = self._block_rope
        refetch = self._refetch_layer if self._refetch is not None else None
        if static and refetch is not None:
            raise ValueError("RetrievalCache.attention: static forwards cannot refetch per forward")
        if static and self.block_slots is not self._full_slots:
            raise ValueError("RetrievalCache.attention: a short (priming) block runs eagerly only; static "
                             "forwards serve blocks of frames_per_block frames")
        self._staged = recache and static
        if recache:
            # A static forward replays without Python: its recache pass stores every layer.
            self._recached = set(range(self.window.k.shape[0])) if static else set()
        if recache and static:
            ws = self.workspace
            return BlockAttention(self.context, self._context_frames, cos, sin, self.attend,
                                  stage_k=ws.stage_k, stage_v=ws.stage_v, kernels=self.kernels)
        window = dict(window_k=self.window.k, window_v=self.window.v, block_slots=self.block_slots,
                      on_store=self._recached.add) if recache else {}
        # An eager callable serves this block only; a static forward's (built once, replayed
        # by later blocks and sessions) is never checked.
        epoch = self._epoch
        current = None if static else (lambda: self._epoch == epoch and not self.closed)
        return BlockAttention(self.context, self._context_frames, cos, sin, self.attend, refetch=refetch,
                              current=current, kernels=self.kernels, **window)

    def batch_attention(self, workspace: Workspace, rows: int, recache: bool) -> BlockAttention:
        """The static attention of a forward over the first ``rows`` rows of ``workspace``
        that batches this session with others of the same context signature (each bound
        to its rows); for this session it is :meth:`attention` with ``static=True``, the
        others get :meth:`mark_static_pass`."""
        attention = self.attention(recache=recache, static=True)
        view = workspace.rows(0, rows)
        return dataclasses.replace(attention, context=view.context,
                                   stage_k=view.stage_k if recache else None,
                                   stage_v=view.stage_v if recache else None)

    def finish_recache(self) -> None:
        """After the recache forward: move staged block K/V into the window's slots."""
        if not self._staged:
            return
        self._staged = False
        frames = self.block_slots.shape[0]
        for stage, window in ((self.workspace.stage_k, self.window.k), (self.workspace.stage_v, self.window.v)):
            window.index_copy_(2, self.block_slots, stage.unflatten(2, (frames, -1)))

    # ------------------------------------------------------------------ block end
    def end_block(self, clean: torch.Tensor) -> None:
        """clean [B, F, C, H, W]: the block's output (F: the frames begin_block placed);
        its descriptors index the frames."""
        if self._placement is None or self._ended:
            raise RuntimeError("end_block: no block is running (call begin_block first, and end_block once "
                               "per block)")
        frames = len(self._placement.block)
        if not isinstance(clean, torch.Tensor) or clean.dim() < 3 or clean.shape[:2] != (self.batch, frames):
            got = tuple(clean.shape) if isinstance(clean, torch.Tensor) else type(clean).__name__
            raise ValueError(f"end_block: clean must be the block's output [B={self.batch}, F={frames}, C, ...], "
                             f"got {got}")
        b, f = clean.shape[:2]
        desc = self.descriptor(clean.flatten(0, 1)).float()
        if desc.shape != (b * f, self.descriptor.dim):
            raise ValueError(f"descriptor returned {tuple(desc.shape)} for {b * f} frames; expected "
                             f"[{b * f}, {self.descriptor.dim}] (its .dim)")
        desc = desc.view(b, f, -1)
        self.window.descriptors.index_copy_(1, self.block_slots, desc)
        self.window.store_latents(self.block_slots, clean)   # for a prompt switch's recache
        self.query = desc[:, -1]
        self._ended = True
        if self._descriptors_ready is not None:
            self._descriptors_ready.record()

    # ------------------------------------------------------------------ prompt switch
    def begin_recache(self, recache_sink: bool = False) -> tuple[torch.Tensor, BlockAttention] | None:
        """Start the recache pass of a text switch (SPEC section 7), between blocks.

        The window's non-sink frames (all its frames with ``recache_sink``) are recomputed
        from their clean latents: one forward at timestep 0 under the new text, its queries
        those frames at their window positions, its keys/values ``[sink | recomputed
        frames]`` (no mask, no retrieved frames). The attention stores their new
        un-rotated K/V into their window slots; the history, the descriptors and the
        retrieval state stay as they are.

        Returns ``(clean, attention)``: run the backbone on ``clean [B, n, ...]`` (the
        frames' latents, window order) at timestep 0 under the new text with
        ``attention`` (every layer), discard its output, then call :meth:`end_recache`.
        None when the window holds no frame to recompute (nothing to run).
        """
        if not isinstance(recache_sink, bool):
            raise TypeError(f"begin_recache: recache_sink must be a bool, got {type(recache_sink).__name__}")
        self._check_protocol("begin_recache")
        if self._plan is not None:
            raise RuntimeError("begin_recache: a block is planned (plan_block) but not committed")
        self.finish_recache()    # a static recache pass's K/V must be in the window first
        order = self.window.order
        sink = self.memory.sink
        kept = [] if recache_sink else [f for f in order if f.frame < sink]
        redo = [f for f in order if recache_sink or f.frame >= sink]
        if not redo:
            return None
        if self.window.latents is None:
            raise RuntimeError("begin_recache: the window has no clean latents (end_block was never called)")
        position = {f.frame: i for i, f in enumerate(order)}
        # The context: the kept sinks (old K rotated at their window positions), then the
        # recomputed frames, which the forward writes at the tail as it goes.
        if kept:
            pool_k, pool_v = self.window.page_pools()
            splice_sources([PageSource(pool_k, pool_v)], self.window.page_ids([f.slot for f in kept]), None,
                           index_tensor([position[f.frame] for f in kept], self.device), self.tables,
                           self.context.k, self.context.v, frame_offset=0, mode=self.kernels)
        slots = index_tensor([f.slot for f in redo], self.device)
        cos, sin = self.workspace.rope(self.tables, tuple(position[f.frame] for f in redo))
        clean = self.window.latents.index_select(1, slots)
        self._epoch += 1
        self._switched = True
        self._switch = set()
        epoch = self._epoch
        attention = BlockAttention(self.context, len(kept) + len(redo), cos, sin, self.attend,
                                   window_k=self.window.k, window_v=self.window.v, block_slots=slots,
                                   on_store=self._switch.add, kernels=self.kernels,
                                   current=lambda: self._epoch == epoch and self._switch is not None
                                   and not self.closed)
        return clean, attention

    def end_recache(self) -> None:
        """Close the switch pass :meth:`begin_recache` opened; every layer must have run."""
        if self._switch is None:
            raise RuntimeError("end_recache: no switch recache pass is open (call begin_recache first)")
        layers = self.window.k.shape[0]
        if len(self._switch) != layers:
            missing = sorted(set(range(layers)) - self._switch)
            raise RuntimeError(f"end_recache: the switch recache pass did not run for layers {missing}: the "
                               "window would mix K/V of the old and the new text")
        self._switch = None
