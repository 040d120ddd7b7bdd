"""Session: the per-stream state of a generation on a shared :class:`~lrag_engine.Engine`.

A session is one stream, or a lockstep batch of streams, at its own position: its
window, its history pages (taken from the engine's page pool and given back on
``close``), its retrieval state, text K/V, generators and log. The engine holds what
sessions share (model, RoPE tables, kernels, attention backend, static forwards and
the page pool). Sessions may take turns block by block on one engine:

    with engine.session(batch_size=1, seed=3) as s:
        for _ in range(8):
            out = s.step()          # BlockOutput: latents [B, F, C, H, W], deferred log

A static forward touches no per-session object: it reads and writes only the
workspace's buffers (context, block RoPE, text K/V, recache staging), which the
session fills before it (splice, text load) and drains after it (staging -> its
window). So the forward of a context signature is one function that any session, or
later a batch of sessions side by side, can run. (An eager forward writes the
recache K/V straight into the session's window instead, saving that copy.)

A session can switch its text between blocks (SPEC section 7, LongLive's KV-recache
with the memory kept): ``s.switch_text(text)`` recomputes the window's K/V under the
new text at once (one eager forward at timestep 0), and the next blocks cross-attend
to it; the history and retrieval go on untouched.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Sequence

import torch

from . import checks
from .config import MemoryConfig
from .attention.retrieval import RetrievalAttention
from .memory.retrieval import BlockLog
from .schedule import predict_x0, renoise as renoise_step

if TYPE_CHECKING:
    from .engine import Engine


class BlockOutput:
    """One finished block.

    latents: [B, F, C, H, W] float32 on the engine's device (``.cpu()`` when needed: the
        engine itself never waits for the device inside the block loop).
    log: the block's retrieval log, read from the device on first access.
    frames_rgb: [B, F', 8H, 8W, 3] uint8 decoded frames on the CPU when the engine has a
        VAE, else None. On CUDA the decode runs on its own stream while the next block is
        computed; the first access waits for this block's decode only.
    seconds: host time spent enqueueing the block (on CUDA not the device time).
    """

    def __init__(self, block: int, frames: tuple[int, int], latents: torch.Tensor,
                 log: Callable[[], BlockLog], seconds: float) -> None:
        self.block, self.frames, self.latents, self.seconds = block, frames, latents, seconds
        self._log_fn, self._log = log, None
        self._frames: torch.Tensor | None = None   # decoded video frames, when the engine has a VAE
        self._pending = None                       # PendingFrames of a decode still running
        self._lead: torch.Tensor | None = None     # frames that lead this block's (given frames)

    @property
    def frames_rgb(self) -> torch.Tensor | None:
        if self._pending is not None:
            frames = self._pending.result()
            self._pending = None
            self._frames = frames if self._lead is None else torch.cat([self._lead, frames], dim=1)
            self._lead = None
        return self._frames

    @frames_rgb.setter
    def frames_rgb(self, frames: torch.Tensor | None) -> None:
        self._frames, self._pending, self._lead = frames, None, None

    def set_pending_frames(self, pending, lead: torch.Tensor | None = None) -> None:
        """Frames still being decoded (``PendingFrames``), led by ``lead`` (CPU) if given."""
        self._frames, self._pending, self._lead = None, pending, lead

    @property
    def log(self) -> BlockLog:
        if self._log is None:
            self._log = self._log_fn()
        return self._log


class Session:
    """Per-stream state over a shared engine; made by :meth:`Engine.session`.

    The noise rule (``Engine.stream`` documents it) is the session's: a CPU generator
    seeded with ``seed`` first draws the seed of the device re-noise generator, then the
    initial noise of each block as the block starts.
    """

    def __init__(self, engine: "Engine", batch: int, text: torch.Tensor, seed: int, memory: MemoryConfig,
                 workspace=None) -> None:
        self.engine = engine
        self.batch = batch
        self.memory = memory
        self.seed = seed
        cfg, rt = engine.model_config, engine.runtime
        self.frames_per_block = memory.frames_per_block
        # The engine's Wan model goes through the same public seam as any other backbone.
        self.cache = RetrievalAttention(cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.tokens_per_frame, memory,
                                        positions=engine.tables, batch=batch, descriptor=engine.descriptor,
                                        dtype=engine.dtype, device=engine.device, attention_backend=engine.attend,
                                        kernels=rt.kernels, page_table=engine.page_table,
                                        pool=engine.page_pool(batch) if memory.top_k > 0 else None,
                                        workspace=workspace or engine.workspace(batch),
                                        refetch_per_forward=rt.retrieval_fetch == "per_forward")
        with torch.inference_mode():
            self.cross_kv = engine.model.encode_text(text.to(engine.device, engine.dtype))
        self.noise_generator = torch.Generator().manual_seed(seed)
        renoise_seed = int(torch.randint(2 ** 63 - 1, (), generator=self.noise_generator))
        self.generator = torch.Generator(engine.device).manual_seed(renoise_seed)
        f = self.frames_per_block
        self._step_t = [torch.full((batch, f), t, device=engine.device) for t in engine.schedule.timesteps]
        self._zero_t = torch.zeros(batch, f, device=engine.device)
        self._seen: set[tuple] = set()   # context signatures this session has run
        self.switches: list[tuple[int, bool]] = []   # (block it applies before, recache_sink)
        self.text_version = 0    # bumped by every text switch (batched forwards key loaded text by it)
        self.block = 0
        self.primed = 0      # given clean frames written by prime() before the first block
        self.closed = False

    # ------------------------------------------------------------------ state
    @property
    def position(self) -> int:
        """Frames in the stream so far, primed ones included (the first frame of the next
        block)."""
        return self.primed + self.block * self.frames_per_block

    @property
    def history(self):
        """This session's history store (descriptors, page addresses, usage)."""
        return self.cache.history

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Ends the session: settles its side stream and gives its history pages back to
        the engine's pool. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.cache.close()
        if self.cache.workspace.owner is self:
            self.cache.workspace.owner = None

    # ------------------------------------------------------------------ one block
    def draw_noise(self) -> torch.Tensor:
        """The next block's initial noise [B, F, C, H, W] from the session's generator."""
        cfg = self.engine.model_config
        pinned = self.engine.device.type == "cuda"
        drawn = torch.randn(self.batch, self.frames_per_block, cfg.in_channels, cfg.height, cfg.width,
                            generator=self.noise_generator, pin_memory=pinned)
        return drawn.to(self.engine.device, non_blocking=True)

    def step(self, noise: torch.Tensor | None = None, renoise: Sequence[torch.Tensor] | None = None,
             prefetch_next: bool = True) -> BlockOutput:
        """Generate the next block.

        noise: its initial noise [B, F, C, H, W] on the engine's device (default: drawn
            from the session's generator). renoise: one [B, F, C, H, W] per non-final step
            (default: drawn on the device). Inputs are trusted here: ``Engine.stream``
            validates a whole run's inputs up front.
        prefetch_next: start the next block's search on the side stream after this one.
        """
        if self.closed:
            raise RuntimeError("Session.step: the session is closed")
        engine, cache = self.engine, self.cache
        f = self.frames_per_block
        start = time.perf_counter()
        if noise is None:
            noise = self.draw_noise()
        sigmas = engine.schedule.sigmas
        renoise_iter = iter(renoise) if renoise is not None else None
        cfg = engine.model_config
        with torch.inference_mode():
            log = cache.begin_block(f)
            x = noise
            for i, sigma in enumerate(sigmas):
                flow = self._forward(x, self._step_t[i], recache=False)
                x0 = predict_x0(x, flow, sigma)
                if i + 1 < len(sigmas):
                    if renoise_iter is not None:
                        fresh = next(renoise_iter)
                    else:
                        fresh = torch.randn(self.batch, f, cfg.in_channels, cfg.height, cfg.width,
                                            generator=self.generator, device=engine.device)
                    x = renoise_step(x0, fresh, sigmas[i + 1])
            cache.end_block(x0)
            self._forward(x0, self._zero_t, recache=True)
            cache.finish_recache()
            self._seen.add(cache.signature)
            if prefetch_next:
                cache.start_retrieval()   # overlaps with the recache pass on CUDA
        block, first = self.block, self.position
        self.block += 1
        return BlockOutput(block, (first, first + f), x0, log, time.perf_counter() - start)

    def prime(self, latents: torch.Tensor) -> None:
        """Start the stream from given clean latent frames (image-to-video, video
        continuation), before the first block.

        latents: [B, n, C, H, W], normalised clean latents (e.g. ``WanVAE.encode``; an
        image gives n = 1). They enter the cache block by block, each with one forward at
        timestep 0 (a generated block's recache pass, with its context rules: sinks,
        retrieved, local), so they count as generated frames for the sink, the window,
        the history and retrieval. When n is not a multiple of F the first block holds
        the n mod F remainder, then blocks of F. These blocks yield no BlockOutput, draw
        no noise and are not numbered in the logs; the next block's frames start at n.
        They run eagerly, also on an engine with static forwards.
        """
        if self.closed:
            raise RuntimeError("Session.prime: the session is closed")
        if self.block or self.primed:
            raise RuntimeError("Session.prime: only before the first block (and once)")
        engine, cache = self.engine, self.cache
        checks.check_initial_latents(latents, self.batch, engine.model_config)
        latents = latents.to(engine.device, torch.float32)
        n, f = latents.shape[1], self.frames_per_block
        sizes = ([n % f] if n % f else []) + [f] * (n // f)
        with torch.inference_mode():
            start = 0
            for size in sizes:
                clean = latents[:, start:start + size]
                cache.begin_block(size)          # its log is never read
                cache.unlogged_blocks += 1
                cache.end_block(clean)
                zero_t = self._zero_t if size == f else torch.zeros(self.batch, size, device=engine.device)
                engine.model(clean, zero_t, self.cross_kv, cache.attention(recache=True))
                start += size
        self.primed = n

    def _forward(self, x: torch.Tensor, t: torch.Tensor, recache: bool) -> torch.Tensor:
        engine, cache = self.engine, self.cache
        graphs = engine.graphs
        signature = cache.signature
        key = (self.batch, signature, recache)
        # A signature runs as a static forward once it repeats (the blocks before the
        # window fills each have their own and run eagerly, never captured), or at once
        # when an earlier session built that forward.
        if graphs is None or (key not in graphs and signature not in self._seen):
            return engine.model(x, t, self.cross_kv, cache.attention(recache=recache))
        workspace = cache.workspace
        workspace.load_text(self, self.cross_kv)
        attention = cache.attention(recache=recache, static=True)
        model, cross_kv = engine.model, workspace.cross_kv
        forward = graphs.get(key, lambda: (lambda x, t: model(x, t, cross_kv, attention)))
        return forward(x=x, t=t)

    # ------------------------------------------------------------------ prompt switch
    def switch_text(self, text: torch.Tensor, recache_sink: bool = False) -> None:
        """Switch this session's text before its next block (SPEC section 7).

        text: [B, L, text_dim] (validated like the initial text). The next blocks
        cross-attend to it only. Before returning, one forward at timestep 0 under the new
        text recomputes the K/V of the window's non-sink frames (of the sink frames too
        with ``recache_sink=True``) from their clean latents: queries those frames at
        their window positions, keys/values ``[sink | the recomputed frames]``, no mask,
        no retrieved frames; its output is discarded. The history keeps its K/V and
        descriptors, and retrieval goes on as before. It runs eagerly, also on an engine
        with static (CUDA-graph) forwards. Before the first block it only sets the text.
        """
        if self.closed:
            raise RuntimeError("Session.switch_text: the session is closed")
        if not isinstance(recache_sink, bool):
            raise TypeError(f"recache_sink must be a bool, got {type(recache_sink).__name__}")
        engine = self.engine
        checks.check_text(text, self.batch, engine.model_config)
        with torch.inference_mode():
            cross_kv = engine.model.encode_text(text.to(engine.device, engine.dtype))
            switch = self.cache.begin_recache(recache_sink)
            if switch is not None:
                clean, attention = switch
                zero_t = torch.zeros(clean.shape[:2], device=engine.device)
                engine.model(clean, zero_t, cross_kv, attention)   # output discarded
                self.cache.end_recache()
        self.cross_kv = cross_kv
        self.text_version += 1
        # Static forwards read the text K/V from the workspace: load the new text next time.
        self.cache.workspace.forget_text(self)
        self.switches.append((self.block, recache_sink))

    def run(self, num_blocks: int, noise: Iterator[torch.Tensor] | None = None,
            renoise: Sequence[torch.Tensor] | None = None,
            text_timeline: Mapping[int, torch.Tensor] | None = None,
            recache_sink: bool = False) -> Iterator[BlockOutput]:
        """``num_blocks`` blocks, each yielded when done. noise: an iterator of per-block
        initial noise (default: drawn); renoise: block-major, (steps - 1) per block.
        text_timeline: {block index (this session's, 0 = its first block): text}; the text
        switches (``switch_text`` with ``recache_sink``) just before that block."""
        steps = len(self.engine.schedule) - 1
        for i in range(num_blocks):
            if text_timeline is not None and self.block in text_timeline:
                self.switch_text(text_timeline[self.block], recache_sink=recache_sink)
            block_renoise = None if renoise is None else renoise[i * steps:(i + 1) * steps]
            yield self.step(None if noise is None else next(noise), block_renoise,
                            prefetch_next=i + 1 < num_blocks)
