"""AsyncEngine: streams driven from asyncio by a worker thread. Outputs are compared with
the same requests run through a plain Scheduler on a second engine with the same weights
(float32 tolerance); cancellation, back-pressure and failures are checked through the
page pool's usage and the scheduler's own counters."""
from __future__ import annotations

import asyncio
import gc

import pytest
import torch

from lrag_engine.serving.async_engine import AsyncEngine, StreamFailed
from lrag_engine.serving.scheduler import StreamBlock, StreamRequest
from lrag_engine.testing import assert_close

from serving_helpers import pages_used, run, run_scheduler, until


async def collect(stream) -> list[StreamBlock]:
    return [block async for block in stream]


def check_blocks(blocks: list[StreamBlock], request_id: str, num_blocks: int) -> None:
    assert [b.block for b in blocks] == list(range(num_blocks))
    assert [b.frames for b in blocks] == [(i, i + 1) for i in range(num_blocks)]
    assert all(b.request_id == request_id for b in blocks)
    assert [b.final for b in blocks] == [False] * (num_blocks - 1) + [True]


def test_blocks_in_order_and_equal_to_a_plain_scheduler(engine, reference_engine):
    """Three streams at once (different seeds, lengths, prompts, memory options; one joins
    later): each gets its blocks in order, with its id, ending "finished", equal to the
    same requests through a plain Scheduler."""
    requests = [StreamRequest(prompt="a red fox", num_frames=9, seed=11, request_id="fox"),
                StreamRequest(num_frames=5, seed=-3, top_k=1, request_id="plain"),
                StreamRequest(prompt="waves at night", num_frames=8, seed=2**40, recency_guard=2)]

    async def main():
        async with AsyncEngine(engine, max_streams=4, max_batch=4, queue_blocks=2) as ae:
            streams = [ae.stream_async(r) for r in requests[:2]]
            first = await streams[0].__anext__()          # the third joins a running engine
            streams.append(ae.stream_async(requests[2]))
            rest = await asyncio.gather(*(collect(s) for s in streams))
            rest[0].insert(0, first)
            return streams, rest, ae.stats()

    streams, got, stats = run(main())
    assert streams[2].request_id and len(streams[2].request_id) == 32      # a fresh uuid4 hex
    assert requests[2].request_id is None                                  # the caller's request is left alone
    expected = run_scheduler(reference_engine, requests)
    for stream, blocks, request, (ref_blocks, ref_end) in zip(streams, got, requests, expected):
        assert stream.end.status == "finished" and stream.end.blocks == request.num_frames
        check_blocks(blocks, stream.request_id, request.num_frames)
        assert ref_end.status == "finished"
        for block, ref in zip(blocks, ref_blocks, strict=True):
            assert_close(block.latents, ref.latents, name=f"{stream.request_id} block {block.block}")
            assert block.log["selected"] == ref.log["selected"]
    assert any(b.log["selected"] != [[]] for b in got[0])   # retrieval was active
    assert stats["finished"] == 3 and stats["blocks_delivered"] == 22 and stats["active_streams"] == 0


def test_cancel_returns_pages(engine):
    """ae.cancel, stream.aclose and a consumer breaking out each cancel their (endless)
    stream and its pages come back; a waiting stream can be cancelled too."""
    async def main():
        async with AsyncEngine(engine, max_streams=1, queue_blocks=2) as ae:
            baseline = pages_used(engine)
            a = ae.stream_async(StreamRequest(seed=1))                      # endless
            waiting = ae.stream_async(StreamRequest(seed=2, num_frames=3))  # waits for a's place
            blocks = [await a.__anext__() for _ in range(8)]
            assert pages_used(engine) > baseline      # frames left the window from block 6 on
            assert ae.stats()["waiting"] == 1
            assert await ae.cancel(waiting.request_id) is True
            assert await collect(waiting) == [] and waiting.end.status == "cancelled"
            assert await ae.cancel(a.request_id) is True
            assert pages_used(engine) == baseline                  # freed by the time cancel returns
            rest = await collect(a)
            assert a.end.status == "cancelled" and a.end.blocks >= 8
            assert [b.block for b in blocks + rest] == list(range(len(blocks) + len(rest)))
            assert await ae.cancel(a.request_id) is False            # it has ended

            b = ae.stream_async(StreamRequest(seed=3))
            for _ in range(8):
                await b.__anext__()
            await b.aclose()
            assert pages_used(engine) == baseline
            await until(lambda: ae.stats()["active_streams"] == 0, what="b to end")

            cancelled = ae.stats()["cancelled"]
            async for block in ae.stream_async(StreamRequest(seed=4)):
                if block.block == 7:
                    break                      # the stream is dropped here
            gc.collect()
            await until(lambda: ae.stats()["cancelled"] == cancelled + 1 and ae.stats()["queues"] == {},
                        what="the dropped stream to be cancelled and forgotten")
            assert pages_used(engine) == baseline and ae.stats()["active_streams"] == 0
    run(main())


def test_back_pressure_pauses_a_slow_consumer(engine):
    """A consumer that stops reading: its stream stops at queue_blocks blocks (no steps for
    it, no new pages) while another stream runs to its end; the worker then sleeps; reading
    again resumes it with no block lost."""
    async def main():
        async with AsyncEngine(engine, max_streams=4, queue_blocks=2) as ae:
            baseline = pages_used(engine)
            steps = []
            step = ae._scheduler.step

            def counting_step(exclude=()):
                steps.append(tuple(exclude))
                return step(exclude=exclude)
            ae._scheduler.step = counting_step

            slow = ae.stream_async(StreamRequest(seed=5))                # endless
            got = [await slow.__anext__() for _ in range(7)]              # then not read for a while
            await until(lambda: ae.stats()["paused"] == 1, what="the slow stream to pause")
            assert slow.queued == 2 and ae.stats()["queue_depth"] == 2
            held = pages_used(engine)
            assert held > baseline
            fast = await collect(ae.stream_async(StreamRequest(seed=6, num_frames=8)))
            assert len(fast) == 8
            assert slow.queued == 2                       # not one block more while it was paused
            assert pages_used(engine) == held             # fast's pages back, slow's did not grow
            await until(lambda: ae.stats()["active_streams"] == 1, what="fast to end")
            # Nothing runnable: the worker settles and sleeps (a polling worker never settles).
            seen = [-1]

            def settled():
                calls, seen[0] = seen[0], len(steps)
                return calls == len(steps)
            for _ in range(50):
                await asyncio.sleep(0.1)
                if settled():
                    break
            calls = len(steps)
            await asyncio.sleep(0.5)
            assert len(steps) == calls
            assert all(slow.request_id in ex for ex in steps[-2:])
            got += [await slow.__anext__() for _ in range(5)]
            assert [b.block for b in got] == list(range(12))
            await slow.aclose()
            assert pages_used(engine) == baseline
    run(main())


def test_switch_prompt(engine, reference_engine):
    """A switch sent while the stream is paused after block 0 applies from block 1: the
    stream equals the same request with prompt_timeline {1: new} and differs from the
    unswitched one. Unknown ids and bad prompts are errors for the caller only."""
    async def main():
        async with AsyncEngine(engine, queue_blocks=1) as ae:
            stream = ae.stream_async(StreamRequest(prompt="a red fox", num_frames=4, seed=7, request_id="s"))
            await until(lambda: ae.stats()["paused"] == 1, what="the stream to pause after block 0")
            await ae.switch_prompt("s", "the fox jumps into a river")
            with pytest.raises(KeyError):
                await ae.switch_prompt("nobody", "a cat")
            with pytest.raises(ValueError, match="prompt"):
                await ae.switch_prompt("s", "   ")
            return await collect(stream)

    got = run(main())
    check_blocks(got, "s", 4)
    switched = run_scheduler(reference_engine, [StreamRequest(prompt="a red fox", num_frames=4, seed=7,
                                                              prompt_timeline={1: "the fox jumps into a river"})])
    plain = run_scheduler(reference_engine, [StreamRequest(prompt="a red fox", num_frames=4, seed=7)])
    (ref, _), = switched
    (unswitched, _), = plain
    for block, expected in zip(got, ref, strict=True):
        assert_close(block.latents, expected.latents, name=f"block {block.block}")
    assert_close(got[0].latents, unswitched[0].latents)
    assert not torch.allclose(got[1].latents, unswitched[1].latents, atol=1e-3)


def test_refused_requests_reach_their_consumer_only(engine):
    """A bad field is raised by the first iteration (naming the field); a duplicate id at
    once; a dict with an unknown key at once; the other stream is untouched."""
    async def main():
        async with AsyncEngine(engine) as ae:
            good = ae.stream_async(StreamRequest(num_frames=3, seed=1, request_id="good"))
            with pytest.raises(ValueError, match="already streaming"):
                ae.stream_async(StreamRequest(num_frames=3, request_id="good"))
            with pytest.raises(ValueError, match="top_kk"):
                ae.stream_async({"num_frames": 3, "top_kk": 1})
            bad = ae.stream_async(StreamRequest(num_frames=3, top_k=99))
            with pytest.raises(ValueError, match="top_k"):
                await bad.__anext__()
            blocks = await collect(good)
            assert len(blocks) == 3 and good.end.status == "finished"
            assert ae.stats()["refused"] == 1
    run(main())


def test_a_failing_stream_is_isolated(engine):
    """A stream whose step raises ends "failed" for its consumer only (StreamFailed with the
    error); the other stream finishes, the worker lives on and takes new streams; pages
    come back."""
    async def main():
        async with AsyncEngine(engine, max_streams=4) as ae:
            baseline = pages_used(engine)
            step = ae._scheduler.step
            fail_once = [True]

            def failing_step(exclude=()):
                if fail_once[0] and not exclude and ae._scheduler.stats()["blocks"] >= 4:
                    fail_once[0] = False
                    raise RuntimeError("device lost")
                return step(exclude=exclude)
            ae._scheduler.step = failing_step
            doomed = ae.stream_async(StreamRequest(seed=8))     # endless
            first = [await doomed.__anext__() for _ in range(2)]
            with pytest.raises(StreamFailed, match="device lost") as info:
                async for block in doomed:
                    first.append(block)
            assert info.value.end.status == "failed" and info.value.request_id == doomed.request_id
            assert [b.block for b in first] == list(range(len(first)))
            assert ae.worker_alive
            assert pages_used(engine) == baseline
            later = await collect(ae.stream_async(StreamRequest(num_frames=3, seed=9)))
            assert len(later) == 3
            assert ae.stats()["failed"] == 1
    run(main())


def test_a_stream_failing_inside_the_scheduler_is_isolated(engine):
    """One stream's block planning raises: the scheduler ends that stream alone, its
    consumer gets StreamFailed naming the error, the other stream runs to its end."""
    async def main():
        async with AsyncEngine(engine, max_streams=4, queue_blocks=1) as ae:
            baseline = pages_used(engine)
            victim = ae.stream_async(StreamRequest(seed=13, num_frames=9, request_id="victim"))
            other = ae.stream_async(StreamRequest(seed=14, num_frames=6, request_id="other"))
            got = [await victim.__anext__()]       # admitted; paused behind its one-block queue

            def broken():
                raise RuntimeError("bad block plan")
            ae._scheduler._active["victim"].session.cache.plan_block = broken
            with pytest.raises(StreamFailed, match="bad block plan") as info:
                async for block in victim:
                    got.append(block)
            assert info.value.end.blocks == len(got) and len(got) <= 3
            rest = await collect(other)
            assert [b.block for b in rest] == list(range(6)) and other.end.status == "finished"
            await until(lambda: ae.stats()["active_streams"] == 0, what="both streams to end")
            assert pages_used(engine) == baseline and ae.worker_alive
            assert ae.stats()["failed"] == 1 and ae.stats()["finished"] == 1
    run(main())


def test_close_cancels_open_streams_and_frees_pages(engine):
    async def main():
        ae = await AsyncEngine(engine, queue_blocks=1).start()
        baseline = pages_used(engine)
        stream = ae.stream_async(StreamRequest(seed=10))
        await stream.__anext__()
        await ae.aclose()
        assert not ae.worker_alive and pages_used(engine) == baseline
        rest = await collect(stream)
        assert stream.end.status == "cancelled" and "closed" in stream.end.error
        assert len(rest) <= 1
        with pytest.raises(RuntimeError, match="closed"):
            ae.stream_async(StreamRequest(num_frames=1))
        await ae.aclose()   # idempotent
    run(main())


def test_options_are_validated(engine):
    with pytest.raises(ValueError, match="queue_blocks"):
        AsyncEngine(engine, queue_blocks=0)
    with pytest.raises(ValueError, match="rate_window_s"):
        AsyncEngine(engine, rate_window_s=0)

    async def not_started():
        with pytest.raises(RuntimeError, match="not started"):
            AsyncEngine(engine).stream_async(StreamRequest(num_frames=1))
    run(not_started())


def test_stats(engine):
    async def main():
        async with AsyncEngine(engine, queue_blocks=3, rate_window_s=60) as ae:
            stream = ae.stream_async(StreamRequest(seed=12, num_frames=4))
            await until(lambda: ae.stats()["queue_depth"] == 3, what="three queued blocks")
            stats = ae.stats()
            assert stats["queues"] == {stream.request_id: 3} and stats["paused"] == 1
            assert stats["active_streams"] == 1 and stats["blocks_per_second"] > 0
            assert stats["memory"] == engine.memory_usage() and stats["worker_alive"]
            await collect(stream)
            await until(lambda: ae.stats()["active_streams"] == 0, what="the end")
            assert ae.stats()["blocks_delivered"] == 4
    run(main())


def test_readme_example_runs_as_written():
    import contextlib
    import io
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    match = re.search(r"<!-- example: async-engine -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md has no python block marked '<!-- example: async-engine -->'"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(match.group(1), "README.md:async-engine", "exec"), {"__name__": "readme_example"})
    assert printed.getvalue().splitlines() == [f"{i} [1, 16, 8, 12]" for i in range(8)] + ["finished 0"]
