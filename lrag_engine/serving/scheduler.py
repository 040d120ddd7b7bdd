"""Scheduler: many streams on one engine, with continuous batching.

Streams join and leave at block boundaries. Each has its own prompt timeline, seed,
length (or none: it runs until cancelled), memory options within the engine's limits,
and position. Every ``step()`` runs one block of every active stream:

1. waiting requests are admitted in order while they fit (``max_streams``, and the
   history page budget: each stream reserves the pages its history can ever hold);
2. prompt switches due before this block are applied (each stream's own recache pass);
3. every stream plans its block (``RetrievalCache.plan_block``: search result, where its
   frames go), which tells its context signature ``(sinks, retrieved, local, block
   positions)``;
4. streams with equal signatures run their forwards together, up to ``max_batch`` rows:
   each splices its context into its rows of one shared workspace, then the denoising
   forwards and the recache pass run once for the group (static, staged attention; CUDA
   graphs when the engine has them, keyed by group size and signature).

Streams at different positions share a signature once their windows are full and their
histories hold ``top_k`` retrievable frames, so in steady state all streams with the
same memory options run as one batch; the first blocks of a stream (and any stream
with other options) form groups of their own. A stream in a group computes exactly what
it computes alone (its own noise generators, text, cache and history pages; attention
never mixes rows): float32 results equal a solo run to rounding (1e-5 on the CPU; the
tests check it). In bfloat16 on the CPU batched and solo runs measured bit-identical
here; on a GPU the GEMM kernels may change with the batch size, so expect differences
of bf16 rounding (up to ~1e-2 of the latents' scale; not yet measured on a GPU).

The scheduler is not thread-safe: one thread drives it (``AsyncEngine`` does, for
asyncio servers).

    sched = Scheduler(engine, max_streams=16, max_batch=8)
    rid = sched.submit(StreamRequest(prompt="a red fox", num_frames=48))
    while sched.has_work():
        for item in sched.step():    # StreamBlock (one block of one stream) or StreamEnd
            ...
"""
from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass, field
from typing import Collection

import torch

from .. import checks
from ..memory.budget import HistoryBudget
from ..schedule import predict_x0, renoise as renoise_step
from ..session import Session
from .requests import AdmissionError, StreamBlock, StreamEnd, StreamRequest, _as_batch

__all__ = ["Scheduler", "StreamRequest", "StreamBlock", "StreamEnd", "AdmissionError"]

@dataclass
class _Stream:
    request: StreamRequest
    id: str
    order: int
    reserve: int                          # history pages reserved in the pool
    session: Session | None = None
    decoder: object = None
    given_frames: torch.Tensor | None = None   # decoded given frames, led by the first block
    timeline: dict = field(default_factory=dict)   # block -> text embeddings
    switches: list = field(default_factory=list)   # (text, recache_sink) due before the next block
    blocks: int = 0
    uid: int = field(default_factory=lambda: next(_UIDS))   # unique in the process (keys loaded text)


_UIDS = itertools.count()


class Scheduler:
    """Continuous batching of many streams over one :class:`~lrag_engine.Engine`.

    max_streams: streams generating at once (more wait in order); max_batch: the most
    streams one forward serves (the shared workspace holds that many rows: its context
    costs ``max_batch`` times one stream's); max_waiting: requests allowed to wait.
    """

    def __init__(self, engine, max_streams: int = 16, max_batch: int = 8, max_waiting: int = 64) -> None:
        for name, value in (("max_streams", max_streams), ("max_batch", max_batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Scheduler: {name} must be an int >= 1, got {value!r}")
        if isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 0:
            raise ValueError(f"Scheduler: max_waiting must be an int >= 0, got {max_waiting!r}")
        if engine.runtime.retrieval_fetch == "per_forward":
            raise ValueError("Scheduler: retrieval_fetch='per_forward' (the host-fetch baseline) cannot batch "
                             "streams; use the default 'per_block'")
        self.engine = engine
        self.max_streams, self.max_batch, self.max_waiting = max_streams, max_batch, max_waiting
        self._rows = min(max_batch, max_streams)
        self._workspace = None
        self._waiting: list[_Stream] = []
        self._active: dict[str, _Stream] = {}
        self._ends: list[StreamEnd] = []
        self._known: set[str] = set()
        self._order = itertools.count()
        self._reserved = 0
        self._t: dict[int, tuple[list[torch.Tensor], torch.Tensor]] = {}
        self.blocks = self.frames = self.steps = 0
        self.group_sizes: dict[int, int] = {}   # forwards' group size -> blocks run at that size
        cfg = engine.model_config
        budget = HistoryBudget.plan(engine.memory, cfg.num_layers, 1, cfg.tokens_per_frame, cfg.num_heads,
                                    cfg.head_dim, engine.dtype, host_only=False)
        self.capacity = budget.capacity_frames   # history pages of the pool; None: unbounded

    # ------------------------------------------------------------------ requests
    def submit(self, request: StreamRequest) -> str:
        """Queue a stream; returns its id. Invalid requests raise ValueError/TypeError
        naming the field; a request that can never fit raises AdmissionError."""
        if not isinstance(request, StreamRequest):
            raise TypeError(f"submit needs a StreamRequest, got {type(request).__name__}")
        request.validate(self.engine)
        rid = request.request_id or uuid.uuid4().hex
        if rid in self._known:
            raise ValueError(f"request_id {rid!r} is already in use")
        reserve = self._history_need(request)
        if len(self._waiting) >= self.max_waiting:
            raise AdmissionError(f"the waiting queue is full ({self.max_waiting} requests); retry later")
        self._known.add(rid)
        self._waiting.append(_Stream(request, rid, next(self._order), reserve))
        return rid

    def _history_need(self, request: StreamRequest) -> int:
        """History pages the stream can ever hold (what it reserves)."""
        memory = self.engine.session_memory(request.top_k, request.recency_guard, request.widen_local_until_memory)
        if memory.top_k == 0:
            return 0
        cap = getattr(memory, "max_history_frames", None)
        primed = 0 if request.initial_latents is None else _as_batch(request.initial_latents, 5).shape[1]
        if request.num_frames is None:
            if cap is None:
                raise AdmissionError("an endless stream (num_frames=None) would keep history without bound: give "
                                     "the engine MemoryConfig.max_history_frames, ask for top_k=0, or set num_frames")
            need = cap
        else:
            need = max(0, primed + request.num_frames - memory.window)
            if cap is not None:
                need = min(need, cap)
        if self.capacity is not None and need > self.capacity:
            raise AdmissionError(f"the stream needs {need} history frames but the engine's history budgets hold "
                                 f"{self.capacity}; generate fewer frames, lower max_history_frames, or raise "
                                 "MemoryConfig.gpu_budget_bytes/host_budget_bytes")
        return need

    def _fits(self, reserve: int) -> bool:
        if len(self._active) >= self.max_streams:
            return False
        return self.capacity is None or self._reserved + reserve <= self.capacity

    def cancel(self, request_id: str) -> bool:
        """Stop a waiting or running stream now (its pages go back to the pool); its
        StreamEnd("cancelled") comes with the next ``step()``. False if unknown or over."""
        for i, st in enumerate(self._waiting):
            if st.id == request_id:
                del self._waiting[i]
                self._ends.append(StreamEnd(request_id, "cancelled", 0))
                self._known.discard(request_id)
                return True
        st = self._active.get(request_id)
        if st is None:
            return False
        self._end(st, "cancelled")
        return True

    def switch_prompt(self, request_id: str, prompt: str | None = None, text: torch.Tensor | None = None,
                      recache_sink: bool = False) -> None:
        """Switch a stream's text before its next block (SPEC section 7). KeyError for an
        unknown (or finished) stream; ValueError/TypeError for a bad prompt."""
        st = self._active.get(request_id) or next((s for s in self._waiting if s.id == request_id), None)
        if st is None:
            raise KeyError(f"no waiting or running stream {request_id!r}")
        if not isinstance(recache_sink, bool):
            raise TypeError(f"recache_sink must be a bool, got {type(recache_sink).__name__}")
        if (prompt is None) == (text is None):
            raise ValueError("switch_prompt needs exactly one of prompt (a string) or text (embeddings)")
        if prompt is not None:
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
            text = self.engine.encode_prompts(prompt)
        text = _as_batch(text)
        checks.check_text(text, 1, self.engine.model_config)
        st.switches.append((text, recache_sink))

    @property
    def active(self) -> list[str]:
        return list(self._active)

    @property
    def waiting(self) -> list[str]:
        return [st.id for st in self._waiting]

    def has_work(self) -> bool:
        return bool(self._active or self._waiting or self._ends)

    def stats(self) -> dict:
        return {"active_streams": len(self._active), "waiting": len(self._waiting), "blocks": self.blocks,
                "frames": self.frames, "steps": self.steps, "reserved_history_frames": self._reserved,
                "history_capacity_frames": self.capacity, "group_sizes": dict(self.group_sizes),
                "memory": self.engine.memory_usage()}

    def close(self) -> None:
        """Cancel everything and give every page back."""
        for st in list(self._active.values()):
            self._end(st, "cancelled")
        for st in self._waiting:
            self._ends.append(StreamEnd(st.id, "cancelled", 0))
            self._known.discard(st.id)
        self._waiting.clear()

    # ------------------------------------------------------------------ one step
    def step(self, exclude: Collection[str] = ()) -> list[StreamBlock | StreamEnd]:
        """Admit what fits, then one block of every active stream not in ``exclude``
        (paused streams stay at their block boundary). Returns the blocks in admission
        order, each stream's StreamEnd after its last block."""
        with torch.inference_mode():
            return self._step(set(exclude))

    def _step(self, exclude: set) -> list:
        start = time.perf_counter()
        out: list = []
        self._admit()
        ready = [st for st in self._active.values() if st.id not in exclude]
        groups: dict[tuple, list[_Stream]] = {}
        for st in ready:
            try:
                self._apply_switches(st)
                signature = st.session.cache.plan_block()
            except Exception as error:   # one stream's failure never takes the others down
                self._end(st, "failed", error)
                continue
            # The signature fixes the forward (context layout, positions): streams with
            # other memory options still share forwards when their signatures agree.
            groups.setdefault(signature, []).append(st)
        made: list[tuple[_Stream, object, int]] = []
        for signature, members in groups.items():
            for i in range(0, len(members), self._rows):
                made += self._run_group(members[i:i + self._rows], signature)
        seconds = time.perf_counter() - start
        decoding: list = []
        for st, x0, size in sorted(made, key=lambda item: item[0].order):
            out += self._emit(st, x0, size, seconds, decoding)
        # Decodes were all queued (on CUDA on the decoders' streams) before any is waited for.
        for block, pending, lead in decoding:
            frames = pending.result()[0]
            block.frames_rgb = frames if lead is None else torch.cat([lead, frames])
        self.steps += 1
        ends, self._ends = self._ends, []
        return ends + out

    def _admit(self) -> None:
        while self._waiting and self._fits(self._waiting[0].reserve):
            st = self._waiting.pop(0)
            try:
                self._start(st)
            except Exception as error:
                self._end(st, "failed", error)
                if st.id in self._known:   # it failed before it became active
                    self._ends.append(StreamEnd(st.id, "failed", 0, _describe(error)))
                    self._known.discard(st.id)

    def _start(self, st: _Stream) -> None:
        engine, req = self.engine, st.request
        text = None if req.text is None else _as_batch(req.text)
        timeline = {}
        if req.prompt_timeline:
            timeline = {b: engine.encode_prompts(p) for b, p in req.prompt_timeline.items()}
        elif req.text_timeline:
            timeline = {b: _as_batch(t) for b, t in req.text_timeline.items()}
        if req.prompt is not None:
            text = engine.encode_prompts(req.prompt)
        if text is None and 0 in timeline:
            text = timeline.pop(0)
        if text is None:
            text = engine.default_text(1)
        memory = engine.session_memory(req.top_k, req.recency_guard, req.widen_local_until_memory)
        seed = engine.seed if req.seed is None else req.seed
        session = Session(engine, 1, text, seed, memory, workspace=self._rows_view(0, 1))
        self._reserved += st.reserve
        st.session, st.timeline = session, timeline
        self._active[st.id] = st
        if req.output != "latents":
            st.decoder = engine.vae.stream_decoder()
        if req.initial_latents is not None:
            given = _as_batch(req.initial_latents, 5).to(engine.device, torch.float32)
            session.prime(given)
            if st.decoder is not None:
                st.given_frames = st.decoder.decode_block_async(given).result()

    def _rows_view(self, start: int, stop: int):
        if self._workspace is None:
            self._workspace = self.engine.workspace(self._rows)
        return self._workspace.rows(start, stop)

    def _apply_switches(self, st: _Stream) -> None:
        session = st.session
        due = []
        if session.block in st.timeline:
            due.append((st.timeline.pop(session.block), st.request.recache_sink))
        due += st.switches
        st.switches = []
        for text, recache_sink in due:
            session.switch_text(text, recache_sink=recache_sink)

    def _end(self, st: _Stream, status: str, error: BaseException | None = None) -> None:
        if self._active.pop(st.id, None) is None:
            return
        self._known.discard(st.id)   # a finished stream's id may be used again
        self._reserved -= st.reserve
        if st.session is not None:
            st.session.close()
        self._ends.append(StreamEnd(st.id, status, st.blocks, None if error is None else _describe(error)))

    # ------------------------------------------------------------------ a group's forwards
    def _steps(self, rows: int):
        if rows not in self._t:
            engine, f = self.engine, self.engine.memory.frames_per_block
            self._t[rows] = ([torch.full((rows, f), t, device=engine.device) for t in engine.schedule.timesteps],
                             torch.zeros(rows, f, device=engine.device))
        return self._t[rows]

    def _run_group(self, members: list[_Stream], signature: tuple) -> list[tuple[_Stream, object, int]]:
        """One block of streams with one context signature: their forwards run as one."""
        engine, cfg = self.engine, self.engine.model_config
        f = engine.memory.frames_per_block
        rows = len(members)
        workspace = self._workspace
        alive: list[tuple[int, _Stream, object]] = []   # (row, stream, deferred log)
        for i, st in enumerate(members):
            cache = st.session.cache
            try:
                cache.bind(workspace.rows(i, i + 1))
                log = cache.commit_block()
            except Exception as error:
                self._end(st, "failed", error)
                continue
            alive.append((i, st, log))
        if not alive:
            return []
        live = {i for i, _, _ in alive}
        # A row whose commit failed runs on zeros; its outputs are dropped.
        shape = (1, f, cfg.in_channels, cfg.height, cfg.width)
        noise = [st.session.draw_noise() if i in live else torch.zeros(shape, device=engine.device)
                 for i, st in enumerate(members)]
        x = torch.cat(noise) if rows > 1 else noise[0]
        key = tuple((st.uid, st.session.text_version) for st in members)
        workspace.load_rows(key, [st.session.cross_kv for st in members])
        step_t, zero_t = self._steps(rows)
        sigmas = engine.schedule.sigmas
        for k, sigma in enumerate(sigmas):
            flow = self._forward(alive, workspace, rows, signature, x, step_t[k], recache=False)
            x0 = predict_x0(x, flow, sigma)
            if k + 1 < len(sigmas):
                fresh = [torch.randn(shape, generator=st.session.generator, device=engine.device)
                         if i in live else torch.zeros(shape, device=engine.device)
                         for i, st in enumerate(members)]
                x = renoise_step(x0, torch.cat(fresh) if rows > 1 else fresh[0], sigmas[k + 1])
        for i, st, _ in alive:
            st.session.cache.end_block(x0[i:i + 1])
        self._forward(alive, workspace, rows, signature, x0, zero_t, recache=True)
        made = []
        for i, st, log in alive:
            session = st.session
            session.cache.finish_recache()
            session._seen.add(signature)
            session.block += 1
            last = st.request.num_frames is not None and session.block * f >= st.request.num_frames
            if not last:
                session.cache.start_retrieval()
            made.append((st, (x0[i:i + 1], log, last), len(alive)))
        self.group_sizes[len(alive)] = self.group_sizes.get(len(alive), 0) + len(alive)
        return made

    def _forward(self, alive, workspace, rows: int, signature: tuple, x: torch.Tensor, t: torch.Tensor,
                 recache: bool) -> torch.Tensor:
        engine = self.engine
        first = alive[0][1].session
        attention = first.cache.batch_attention(workspace, rows, recache)
        for _, st, _ in alive[1:]:
            st.session.cache.mark_static_pass(recache)
        cross_kv = [(k[:rows], v[:rows]) for k, v in workspace.cross_kv]
        graphs, model = engine.graphs, engine.model
        key = ("batched", workspace.batch, rows, signature, recache)
        if graphs is not None and (key in graphs or all(signature in st.session._seen for _, st, _ in alive)):
            forward = graphs.get(key, lambda: (lambda x, t: model(x, t, cross_kv, attention)))
            return forward(x=x, t=t)
        return model(x, t, cross_kv, attention)

    def _emit(self, st: _Stream, made, size: int, seconds: float, decoding: list) -> list:
        x0, log_fn, last = made
        session, req = st.session, st.request
        f = session.frames_per_block
        first = session.position - f
        latents = x0[0].float().cpu() if req.output != "frames" else None
        block = StreamBlock(st.id, st.blocks, (first, first + f), latents, None, log_fn().to_dict(), last,
                            seconds, size)
        if st.decoder is not None:
            lead = None if st.given_frames is None else st.given_frames[0]
            decoding.append((block, st.decoder.decode_block_async(x0.float()), lead))
            st.given_frames = None
        st.blocks += 1
        self.blocks += 1
        self.frames += f
        out = [block]
        if last:
            self._end(st, "finished")
            out.append(self._ends.pop())
        return out


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
