"""Helpers of the serving tests: page counts, plain-Scheduler runs, waiting."""
from __future__ import annotations

import asyncio
import time

from lrag_engine import Engine


def pages_used(engine: Engine) -> int:
    return engine.memory_usage().get("pages_used", 0)


def run_scheduler(engine: Engine, requests, max_streams: int = 16, max_batch: int = 8) -> list:
    """The given requests through a plain Scheduler, stepped until done -> [(blocks, end)]
    in the order of ``requests``."""
    from lrag_engine.serving.scheduler import Scheduler, StreamBlock

    scheduler = Scheduler(engine, max_streams=max_streams, max_batch=max_batch)
    out = {}
    try:
        for request in requests:
            out[scheduler.submit(request)] = ([], None)
        while scheduler.has_work():
            for item in scheduler.step():
                blocks, _ = out[item.request_id]
                if isinstance(item, StreamBlock):
                    blocks.append(item)
                else:
                    out[item.request_id] = (blocks, item)
    finally:
        scheduler.close()
    return list(out.values())


def run(coro, timeout: float = 300.0):
    """Run a coroutine on a fresh event loop; a hang fails the test instead of the suite."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until(condition, timeout: float = 60.0, what: str = "condition") -> None:
    """Wait (asynchronously) until ``condition()`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


def wait_until(condition, timeout: float = 60.0, what: str = "condition") -> None:
    """The same from synchronous code."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)
