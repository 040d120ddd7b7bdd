"""AsyncEngine: many streams of one engine, from asyncio code.

    from lrag_engine.serving import AsyncEngine, StreamRequest

    async with AsyncEngine(engine, max_streams=16, max_batch=8, queue_blocks=4) as ae:
        stream = ae.stream_async(StreamRequest(prompt="a red fox", num_frames=30))
        async for block in stream:            # StreamBlock, in order; block.request_id == stream.request_id
            send(block.latents)               # [F, C, H, W] float32 CPU (frames_rgb with output="frames")
            if user_typed:
                await ae.switch_prompt(stream.request_id, "the fox jumps into a river")
        stream.end                            # StreamEnd: status "finished" (or "cancelled")
        ae.stats()                            # scheduler stats, queue depths, blocks/s

Threads. One worker thread owns the :class:`~lrag_engine.serving.Scheduler` (which is
not thread-safe) and does all torch work: the event loop never waits for a forward.
Everything the loop asks for (a new stream, a cancel, a prompt switch, "a block was
taken") crosses over as a command on a thread-safe queue and is applied between two
scheduler steps; blocks, stream ends and command results come back to the loop with
``loop.call_soon_threadsafe``. With no runnable stream the worker sleeps on that queue
(no polling). The worker survives a failing stream: the scheduler ends it with
``StreamEnd("failed")`` and only that stream's consumer sees the error. Should a whole
scheduler step raise, the streams it was running are failed (their pages freed) and the
worker goes on with new requests.

Back-pressure. Each stream has a queue of at most ``queue_blocks`` finished blocks that
its consumer has not taken yet. When it is full the stream is paused at its block
boundary (left out of the scheduler's steps, keeping its pages and position) until the
consumer takes a block, so a slow consumer never grows memory: a stream holds at most
``queue_blocks`` blocks beyond its history, and the other streams run on at full speed.

Ending a stream. ``async for`` ends after the final block of a finite stream
(``stream.end.status == "finished"``) or after a cancel (``"cancelled"``). A stream that
fails raises :class:`StreamFailed` from the ``async for``; a request that is refused
(a bad field: ``ValueError``/``TypeError`` naming it; a request that can never fit, or a
full waiting queue: ``AdmissionError``) raises that error from the first iteration.
Cancelling (``await ae.cancel(request_id)``, ``await stream.aclose()``, or the consumer
breaking out of the loop, which drops the stream) frees the stream's history pages at
once; the awaitable forms return when they are free. After ``ae.cancel`` the stream
still yields the blocks finished before it, then ends.

API (stable):
    AsyncEngine(engine, max_streams=16, max_batch=8, queue_blocks=4, max_waiting=64, rate_window_s=10.0)
    await ae.start() / await ae.aclose()      # or: async with AsyncEngine(...) as ae
    ae.stream_async(request) -> AsyncStream   # request: StreamRequest or its JSON dict
    await ae.cancel(request_id) -> bool       # False: no such running or waiting stream
    await ae.switch_prompt(request_id, prompt, recache_sink=False, text=None)
    ae.stats() -> dict                        # see AsyncEngine.stats
    ae.engine, ae.running, ae.worker_alive
Call them from the event loop the engine was started on (``stats()`` included).
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import queue
import threading
import time
import uuid
from typing import Any

from .scheduler import AdmissionError, Scheduler, StreamBlock, StreamEnd, StreamRequest

__all__ = ["AsyncEngine", "AsyncStream", "StreamFailed", "AdmissionError"]

# Recent block times kept for blocks/s: enough for 16 streams at ~25 blocks/s over 10 s.
_RATE_SAMPLES = 4096


class StreamFailed(RuntimeError):
    """A stream ended with ``StreamEnd("failed")``; ``end`` holds it (request id, blocks, error)."""

    def __init__(self, end: StreamEnd) -> None:
        super().__init__(f"stream {end.request_id} failed after {end.blocks} blocks: {end.error}")
        self.end = end
        self.request_id = end.request_id


class _Channel:
    """The loop side of one stream: what the worker sent and the consumer has not taken.
    The engine and its worker hold channels, never the :class:`AsyncStream` itself, so a
    consumer that drops its stream lets it be finalized (and cancelled)."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.items: collections.deque = collections.deque()
        self.ready = asyncio.Event()
        self.done = False          # the consumer has seen the end, or closed the stream
        self.ended = False         # the worker has sent the end

    @property
    def queued(self) -> int:
        return sum(isinstance(item, StreamBlock) for item in self.items)

    def push(self, item: Any) -> None:
        if self.done:
            return
        if not isinstance(item, StreamBlock):
            self.ended = True
        self.items.append(item)
        self.ready.set()


class AsyncStream:
    """The blocks of one stream, as an async iterator (made by :meth:`AsyncEngine.stream_async`).

    request_id: the stream's id (also in every block). end: its :class:`StreamEnd` once the
    iteration is over (None before). ``await stream.aclose()`` (or ``async with stream``)
    cancels it if it is still running; so does dropping it (breaking out of ``async for``).
    """

    def __init__(self, owner: "AsyncEngine", channel: _Channel) -> None:
        self.request_id = channel.request_id
        self.end: StreamEnd | None = None
        self._owner = owner
        self._channel = channel

    @property
    def queued(self) -> int:
        """Blocks finished and not yet taken by the consumer (at most ``queue_blocks``)."""
        return self._channel.queued

    def __aiter__(self) -> "AsyncStream":
        return self

    async def __anext__(self) -> StreamBlock:
        channel = self._channel
        while not channel.items:
            if channel.done:
                raise StopAsyncIteration
            channel.ready.clear()
            await channel.ready.wait()
        item = channel.items.popleft()
        if isinstance(item, StreamBlock):
            self._owner._took(self.request_id)
            return item
        self._finish()
        if isinstance(item, BaseException):
            raise item
        self.end = item
        if item.status == "failed":
            raise StreamFailed(item)
        raise StopAsyncIteration

    def _finish(self) -> None:
        self._channel.done = True
        self._channel.items.clear()
        self._owner._forget(self._channel)

    async def aclose(self) -> None:
        """Cancel the stream unless it has ended; returns once its pages are free."""
        if self._channel.done:
            return
        ended = self._channel.ended
        self._finish()
        if not ended and self._owner.running:
            await self._owner.cancel(self.request_id)

    async def __aenter__(self) -> "AsyncStream":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # Dropped while running (a consumer that broke out of its loop): cancel without
        # waiting; the command queue may be used from a finalizer.
        channel = self._channel
        if not channel.done and not channel.ended:
            channel.done = True
            self._owner._send(("cancel", self.request_id, None))


class AsyncEngine:
    """Streams of one :class:`~lrag_engine.Engine` for asyncio code (see the module docstring).

    engine: the engine; from ``start()`` on only the worker thread touches it.
    max_streams / max_batch / max_waiting: the :class:`Scheduler`'s limits (streams running
        at once, streams sharing one forward, requests waiting for a place).
    queue_blocks: finished blocks a stream may hold for its consumer (>= 1); a full queue
        pauses the stream until the consumer takes one.
    rate_window_s: the window over which ``stats()["blocks_per_second"]`` counts blocks.
    """

    def __init__(self, engine, max_streams: int = 16, max_batch: int = 8, queue_blocks: int = 4,
                 max_waiting: int = 64, rate_window_s: float = 10.0) -> None:
        if isinstance(queue_blocks, bool) or not isinstance(queue_blocks, int) or queue_blocks < 1:
            raise ValueError(f"queue_blocks must be an int >= 1, got {queue_blocks!r}")
        if isinstance(rate_window_s, bool) or not isinstance(rate_window_s, (int, float)) or not rate_window_s > 0:
            raise ValueError(f"rate_window_s must be a number > 0, got {rate_window_s!r}")
        self.engine = engine
        self.queue_blocks = queue_blocks
        self.rate_window_s = float(rate_window_s)
        self._scheduler = Scheduler(engine, max_streams=max_streams, max_batch=max_batch, max_waiting=max_waiting)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self._streams: dict[str, _Channel] = {}         # loop side: open streams by id
        # Published by the worker after every step (plain attribute swaps, read by stats()).
        self._snapshot: dict = self._scheduler.stats()
        self._block_times: tuple[float, ...] = ()
        self._counters = {"blocks_delivered": 0, "finished": 0, "cancelled": 0, "failed": 0, "refused": 0}
        self._started_at = time.monotonic()
        self._fatal: BaseException | None = None       # what stopped the worker, if not close()

    # ------------------------------------------------------------------ lifecycle
    @property
    def running(self) -> bool:
        """Started and not closed."""
        return self._thread is not None and not self._closing

    @property
    def worker_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def start(self) -> "AsyncEngine":
        """Start the worker thread; the running event loop is the one outputs go to."""
        if self._closing:
            raise RuntimeError("this AsyncEngine was closed; make a new one")
        if self._thread is not None:
            if asyncio.get_running_loop() is not self._loop:
                raise RuntimeError("this AsyncEngine was started on another event loop")
            return self
        self._loop = asyncio.get_running_loop()
        self._started_at = time.monotonic()
        self._thread = threading.Thread(target=self._work, name="lrag-async-engine", daemon=True)
        self._thread.start()
        return self

    async def aclose(self) -> None:
        """Cancel every stream (their consumers see status "cancelled"), free all pages and
        stop the worker. Idempotent."""
        if self._thread is None or self._closing:
            self._closing = True
            if self._thread is not None:
                await asyncio.to_thread(self._thread.join)
            return
        self._closing = True
        self._send(("close",))
        await asyncio.to_thread(self._thread.join)

    async def __aenter__(self) -> "AsyncEngine":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ the loop side
    def _check_running(self) -> None:
        if self._thread is None:
            raise RuntimeError("the AsyncEngine is not started: use `async with AsyncEngine(...)` or "
                               "`await ae.start()`")
        if self._closing:
            raise RuntimeError("the AsyncEngine is closed")
        if not self._thread.is_alive():
            raise RuntimeError(f"the AsyncEngine's worker has stopped ({self._fatal!r}); close it and make a new one")
        if asyncio.get_running_loop() is not self._loop:
            raise RuntimeError("the AsyncEngine is used from another event loop than the one it started on")

    def stream_async(self, request: StreamRequest | dict) -> AsyncStream:
        """Queue a stream; iterate the returned :class:`AsyncStream` for its blocks.

        request: a :class:`StreamRequest` (not modified: a missing request_id is filled in a
        copy) or its JSON form (``StreamRequest.from_dict``). A request id that is already
        open here is a ValueError now; other refusals are raised by the first iteration.
        """
        self._check_running()
        if isinstance(request, dict):
            request = StreamRequest.from_dict(request)
        if not isinstance(request, StreamRequest):
            raise TypeError(f"request must be a StreamRequest or a dict, got {type(request).__name__}")
        if request.request_id is None:
            request = dataclasses.replace(request, request_id=uuid.uuid4().hex)
        request_id = request.request_id
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already streaming")
        channel = _Channel(request_id)
        self._streams[request_id] = channel
        self._send(("submit", request, channel))
        return AsyncStream(self, channel)

    async def cancel(self, request_id: str) -> bool:
        """Cancel a running or waiting stream; returns once its pages are free: True, or
        False when no such stream is running or waiting (it ended, or never was)."""
        self._check_running()
        return await self._ask(("cancel", request_id))

    async def switch_prompt(self, request_id: str, prompt: str | None = None, recache_sink: bool = False,
                            text=None) -> None:
        """Switch a running (or waiting) stream to ``prompt`` (or text embeddings
        ``text`` [1, L, text_dim]) from its next block on (SPEC section 7; ``recache_sink``
        recomputes the sink frames too). KeyError for an unknown id, ValueError/TypeError
        for a bad prompt."""
        self._check_running()
        await self._ask(("switch", request_id, prompt, text, recache_sink))

    def stats(self) -> dict:
        """Scheduler stats at the last step (``active_streams``, ``waiting``, ``blocks``,
        ``frames``, ``steps``, ``memory``: the page pool by tier), plus ``queue_depth``
        (blocks waiting for consumers, in all) and ``queues`` ({request id: blocks}),
        ``paused`` (streams held by a full queue), ``blocks_per_second`` over the last
        ``rate_window_s``, ``uptime_s``, the AsyncEngine's stream counters (finished,
        cancelled, failed, refused, blocks_delivered) and ``worker_alive``."""
        now = time.monotonic()
        stats = dict(self._snapshot)
        queues = {request_id: channel.queued for request_id, channel in self._streams.items()}
        window = min(self.rate_window_s, max(now - self._started_at, 1e-9))
        recent = sum(1 for t in self._block_times if t >= now - window)
        stats.update(queue_depth=sum(queues.values()), queues=queues,
                     paused=sum(1 for n in queues.values() if n >= self.queue_blocks),
                     blocks_per_second=recent / window, uptime_s=now - self._started_at,
                     worker_alive=self.worker_alive, **self._counters)
        return stats

    def _send(self, command: tuple) -> None:
        self._commands.put(command)

    async def _ask(self, command: tuple):
        future = self._loop.create_future()
        self._send(command + (future,))
        return await future

    def _took(self, request_id: str) -> None:
        if self._thread is not None and not self._closing:
            self._send(("took", request_id))

    def _forget(self, channel: _Channel) -> None:
        if self._streams.get(channel.request_id) is channel:
            del self._streams[channel.request_id]

    # ------------------------------------------------------------------ the worker side
    def _post(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:   # the loop is closed: nobody is listening any more
            pass

    def _arrive(self, channel: _Channel, item: Any) -> None:
        """On the loop: an item for a channel; a stream dropped by its consumer leaves the
        registry when its end arrives."""
        channel.push(item)
        if channel.done and not isinstance(item, StreamBlock):
            self._forget(channel)

    def _resolve(self, future, result=None, error: BaseException | None = None) -> None:
        if future is None:
            return

        def settle() -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)
        self._post(settle)

    def _work(self) -> None:
        sched = self._scheduler
        live: dict[str, _Live] = {}           # submitted streams that have not ended
        times: collections.deque = collections.deque(maxlen=_RATE_SAMPLES)
        idle = False
        closing = False
        try:
            while not closing:
                commands = [self._commands.get()] if idle else []
                while True:
                    try:
                        commands.append(self._commands.get_nowait())
                    except queue.Empty:
                        break
                for command in commands:
                    if command[0] == "close":
                        closing = True
                    else:
                        self._apply(command, live)
                if closing:
                    break
                if not (sched.has_work() or commands):
                    idle = True
                    continue
                before = (tuple(sched.active), tuple(sched.waiting))
                paused = [rid for rid, state in live.items() if state.queued >= self.queue_blocks]
                outputs = self._step(paused, live)
                now = time.monotonic()
                deliveries = [self._account(item, live, times, now) for item in outputs]
                # Published before the outputs go out: a consumer that sees an end sees stats
                # that count it.
                self._block_times = tuple(times)
                self._snapshot = sched.stats()
                for channel, item in deliveries:
                    if channel is not None:
                        self._post(self._arrive, channel, item)
                # Nothing ran and nothing changed: only a command (a taken block, a cancel, a
                # new request) can change that, so sleep on the queue until one comes.
                idle = not outputs and before == (tuple(sched.active), tuple(sched.waiting))
        except BaseException as exc:
            self._fatal = exc
            raise
        finally:
            self._shut_down(live)

    def _apply(self, command: tuple, live: dict) -> None:
        sched = self._scheduler
        kind = command[0]
        if kind == "took":
            if command[1] in live:
                live[command[1]].queued -= 1
            return
        if kind == "submit":
            request, channel = command[1], command[2]
            try:
                sched.submit(request)
            except Exception as exc:   # refused: only this stream's consumer hears of it
                self._counters["refused"] += 1
                self._post(self._arrive, channel, exc)
                return
            live[request.request_id] = _Live(channel)
            return
        future = command[-1]
        try:
            if kind == "cancel":
                result = sched.cancel(command[1])
            elif kind == "switch":
                _, request_id, prompt, text, recache_sink, _ = command
                result = sched.switch_prompt(request_id, prompt=prompt, text=text, recache_sink=recache_sink)
            else:
                raise ValueError(f"unknown AsyncEngine command {kind!r}")
        except Exception as exc:
            self._resolve(future, error=exc)
            return
        self._resolve(future, result)

    def _step(self, paused: list[str], live: dict) -> list:
        sched = self._scheduler
        try:
            return sched.step(exclude=paused)
        except Exception as exc:
            # The scheduler isolates a failing stream; a step that raises as a whole cannot
            # be pinned on one stream, so the streams it ran fail (their pages freed) and
            # the worker goes on.
            ends = []
            for request_id in [rid for rid in list(sched.active) + list(sched.waiting) if rid not in paused]:
                try:
                    sched.cancel(request_id)
                except Exception:
                    pass
                blocks = live[request_id].blocks if request_id in live else 0
                ends.append(StreamEnd(request_id, "failed", blocks, error=f"scheduler step failed: {exc!r}"))
            return ends

    def _account(self, item, live: dict, times: collections.deque, now: float) -> tuple:
        """Count an output on the worker side -> (its stream's channel, or None when the
        stream has ended already, e.g. the cancel that follows a failed step; the item)."""
        state = live.get(item.request_id)
        if state is None:
            return None, item
        if isinstance(item, StreamBlock):
            state.queued += 1
            state.blocks += 1
            times.append(now)
            self._counters["blocks_delivered"] += 1
        else:
            del live[item.request_id]
            if item.status in ("finished", "cancelled", "failed"):
                self._counters[item.status] += 1
        return state.channel, item

    def _shut_down(self, live: dict) -> None:
        """Close the scheduler (all pages back), end every open stream, and answer the
        commands that came too late."""
        try:
            self._scheduler.close()
        finally:
            for request_id, state in live.items():
                self._counters["cancelled"] += 1
                self._post(self._arrive, state.channel,
                           StreamEnd(request_id, "cancelled", state.blocks, error="the AsyncEngine was closed"))
            live.clear()
            self._snapshot = self._scheduler.stats()
            closed = RuntimeError("the AsyncEngine is closed")
            while True:
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    break
                if command[0] == "submit":
                    self._post(self._arrive, command[2], closed)
                elif command[0] in ("cancel", "switch"):
                    self._resolve(command[-1], error=closed)


class _Live:
    """The worker side of one stream: blocks made, blocks not yet taken by the consumer."""

    __slots__ = ("channel", "blocks", "queued")

    def __init__(self, channel: _Channel) -> None:
        self.channel, self.blocks, self.queued = channel, 0, 0
