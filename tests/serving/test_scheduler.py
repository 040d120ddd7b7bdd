"""The continuous-batching scheduler: streams that share forwards compute what they
compute alone (latents, retrievals), switches and priming as the engine does them,
admission, cancellation and failure isolation."""
from __future__ import annotations

import pytest
import torch

from lrag_engine import Engine, MemoryConfig, RuntimeConfig
from lrag_engine.memory.budget import HistoryBudget
from lrag_engine.serving import AdmissionError, Scheduler, StreamBlock, StreamEnd, StreamRequest

MEMORY = MemoryConfig(window=6, top_k=2, recency_guard=1, frames_per_block=1)
MEMORY_F2 = MemoryConfig(window=8, sink=1, top_k=2, recency_guard=1, frames_per_block=2)


def _engine(memory=MEMORY, **runtime) -> Engine:
    return Engine("tiny", memory=memory, runtime=RuntimeConfig(**runtime) if runtime else None, seed=0)


def _drive(sched: Scheduler, arrivals: dict[int, list[StreamRequest]], actions=None, max_steps: int = 500):
    """Runs the scheduler, submitting requests at their step; returns blocks and ends by id."""
    blocks: dict[str, list[StreamBlock]] = {}
    ends: dict[str, StreamEnd] = {}
    ids: dict[int, list[str]] = {}
    step = 0
    while step <= max(arrivals, default=0) or sched.has_work():
        for request in arrivals.get(step, []):
            ids.setdefault(step, []).append(sched.submit(request))
        if actions and step in actions:
            actions[step](sched)
        for item in sched.step():
            if isinstance(item, StreamBlock):
                assert item.request_id not in ends, "a block after its stream ended"
                blocks.setdefault(item.request_id, []).append(item)
            else:
                ends[item.request_id] = item
        step += 1
        assert step < max_steps
    return blocks, ends


def _latents(blocks: list[StreamBlock]) -> torch.Tensor:
    return torch.cat([b.latents for b in blocks])


@pytest.mark.parametrize("memory", [MEMORY, MEMORY_F2], ids=["F1", "F2"])
def test_batched_streams_equal_solo_runs(memory):
    engine = _engine(memory)
    f = memory.frames_per_block
    specs = [(11, 16 * f), (12, 14 * f), (13, 16 * f), (14, 12 * f), (15, 13 * f)]   # (seed, frames)
    solo = {seed: engine.generate(num_frames=n, seed=seed) for seed, n in specs}
    sched = Scheduler(engine, max_batch=4)
    # Staggered arrivals: streams meet at different positions.
    arrivals = {0: [StreamRequest(num_frames=specs[0][1], seed=11, request_id="s11")],
                1: [StreamRequest(num_frames=specs[1][1], seed=12, request_id="s12")],
                3: [StreamRequest(num_frames=specs[2][1], seed=13, request_id="s13"),
                    StreamRequest(num_frames=specs[3][1], seed=14, request_id="s14")],
                4: [StreamRequest(num_frames=specs[4][1], seed=15, request_id="s15")]}
    blocks, ends = _drive(sched, arrivals)
    # Batching really happened, also across streams at different positions.
    assert max(sched.group_sizes) >= 3, sched.group_sizes
    for seed, n in specs:
        rid = f"s{seed}"
        assert ends[rid].status == "finished" and ends[rid].blocks == n // f
        got = blocks[rid]
        assert [b.block for b in got] == list(range(n // f))
        assert [b.frames for b in got] == [(i * f, (i + 1) * f) for i in range(n // f)]
        assert [b.final for b in got] == [False] * (n // f - 1) + [True]
        torch.testing.assert_close(_latents(got), solo[seed].latents[0], rtol=0, atol=1e-5)
        assert [b.log["selected"] for b in got] == [entry.selected for entry in solo[seed].log]
        assert [b.log["eligible"] for b in got] == [entry.eligible for entry in solo[seed].log]
    shared = [b for rid in blocks for b in blocks[rid] if b.batch > 1]
    assert any(b.log["selected"] != [[]] for b in shared), "no batched block retrieved anything"
    assert engine.memory_usage().get("pages_used", 0) == 0


def test_batched_static_forwards_equal_solo():
    """With static forwards (CUDA graphs on a GPU; the same static-buffer path eagerly
    here) groups reuse one forward per (group size, signature)."""
    with pytest.warns(UserWarning, match="cuda_graphs"):
        engine = _engine(cuda_graphs=True)
    specs = [(21, 14), (22, 14), (23, 12)]
    solo = {seed: _engine().generate(num_frames=n, seed=seed) for seed, n in specs}
    sched = Scheduler(engine, max_batch=3)
    blocks, _ = _drive(sched, {0: [StreamRequest(num_frames=n, seed=s, request_id=f"g{s}") for s, n in specs[:2]],
                               2: [StreamRequest(num_frames=specs[2][1], seed=23, request_id="g23")]})
    batched = [key for key in engine.graphs.keys() if key[0] == "batched"]
    assert any(key[2] > 1 for key in batched)
    for seed, n in specs:
        torch.testing.assert_close(_latents(blocks[f"g{seed}"]), solo[seed].latents[0], rtol=0, atol=1e-5)


def test_bfloat16_batched_close_to_solo():
    """bf16: a stream in a group may round differently from its solo run; the documented
    tolerance (scheduler docstring) holds."""
    engine = _engine(dtype="bfloat16")
    specs = [(31, 12), (32, 12), (33, 12)]
    solo = {seed: engine.generate(num_frames=n, seed=seed) for seed, n in specs}
    sched = Scheduler(engine, max_batch=4)
    blocks, _ = _drive(sched, {0: [StreamRequest(num_frames=n, seed=s, request_id=f"b{s}") for s, n in specs]})
    assert max(sched.group_sizes) == 3
    for seed, _ in specs:
        diff = (_latents(blocks[f"b{seed}"]) - solo[seed].latents[0]).abs()
        assert diff.max().item() <= 0.05, diff.max().item()


def test_prompt_switches_equal_engine_timeline():
    engine = _engine()
    g = torch.Generator().manual_seed(5)
    cfg = engine.model_config
    a, b, c = (torch.randn(1, cfg.text_len, cfg.text_dim, generator=g) for _ in range(3))
    solo = engine.generate(num_frames=14, seed=7, text=a, text_timeline={4: b, 9: c}, recache_sink=True)
    other = engine.generate(num_frames=12, seed=8)
    sched = Scheduler(engine, max_batch=4)
    # The timeline switch at block 4 comes with the request; the one at block 9 as a message.
    request = StreamRequest(num_frames=14, seed=7, text=a, text_timeline={4: b}, recache_sink=True, request_id="sw")
    def switch(s: Scheduler) -> None:
        s.switch_prompt("sw", text=c, recache_sink=True)

    blocks, ends = _drive(sched, {0: [request, StreamRequest(num_frames=12, seed=8, request_id="o")]},
                          actions={9: switch})
    assert ends["sw"].status == "finished"
    torch.testing.assert_close(_latents(blocks["sw"]), solo.latents[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(_latents(blocks["o"]), other.latents[0], rtol=0, atol=1e-5)
    assert [x.log["selected"] for x in blocks["sw"]] == [e.selected for e in solo.log]


def test_initial_latents_and_decoded_frames_equal_engine():
    engine = _engine()
    engine.attach_random_pipeline(seed=0)
    cfg = engine.model_config
    given = torch.randn(1, 3, cfg.in_channels, cfg.height, cfg.width, generator=torch.Generator().manual_seed(9))
    solo = engine.generate(num_frames=8, seed=3, prompt="a fox", initial_latents=given)
    sched = Scheduler(engine)
    blocks, _ = _drive(sched, {0: [StreamRequest(prompt="a fox", num_frames=8, seed=3, initial_latents=given,
                                                 output="both", request_id="i"),
                                   StreamRequest(prompt="a cat", num_frames=8, seed=4, request_id="j")]})
    got = blocks["i"]
    torch.testing.assert_close(_latents(got), solo.latents[0], rtol=0, atol=1e-5)
    assert got[0].frames == (3, 4)
    frames = torch.cat([b.frames_rgb for b in got])
    assert frames.dtype == torch.uint8 and frames.shape == solo.frames[0].shape
    assert (frames.int() - solo.frames[0].int()).abs().max() <= 1


def test_cancel_frees_pages_and_others_go_on():
    engine = _engine()
    solo = engine.generate(num_frames=16, seed=2)
    sched = Scheduler(engine, max_batch=4)
    blocks, ends = _drive(sched, {0: [StreamRequest(num_frames=30, seed=1, request_id="c"),
                                      StreamRequest(num_frames=16, seed=2, request_id="k")]},
                          actions={12: lambda s: s.cancel("c")})
    assert ends["c"].status == "cancelled" and ends["c"].blocks == len(blocks["c"]) == 12
    assert ends["k"].status == "finished"
    torch.testing.assert_close(_latents(blocks["k"]), solo.latents[0], rtol=0, atol=1e-5)
    assert engine.memory_usage()["pages_used"] == 0
    assert sched.cancel("c") is False and sched.cancel("nope") is False
    with pytest.raises(KeyError, match="nope"):
        sched.switch_prompt("nope", text=engine.default_text(1))


def test_cancel_waiting_request():
    engine = _engine()
    sched = Scheduler(engine, max_streams=1)
    first = sched.submit(StreamRequest(num_frames=4))
    second = sched.submit(StreamRequest(num_frames=4))
    sched.step()
    assert sched.active == [first] and sched.waiting == [second]
    assert sched.cancel(second)
    out = sched.step()
    assert any(isinstance(x, StreamEnd) and x.request_id == second and x.status == "cancelled" for x in out)


def test_admission_waits_for_memory_and_never_fails_running_streams():
    cfg = _engine().model_config
    frame_bytes = HistoryBudget.plan(MEMORY, cfg.num_layers, 1, cfg.tokens_per_frame, cfg.num_heads, cfg.head_dim,
                                     torch.float32).frame_bytes
    budget = MemoryConfig(window=6, top_k=2, recency_guard=1, frames_per_block=1, gpu_budget_bytes=10 * frame_bytes)
    engine = _engine(budget)
    sched = Scheduler(engine)
    assert sched.capacity == 10
    a = sched.submit(StreamRequest(num_frames=14, seed=1))      # 8 history frames
    b = sched.submit(StreamRequest(num_frames=12, seed=2))      # 6: must wait for a
    with pytest.raises(AdmissionError, match="history"):
        sched.submit(StreamRequest(num_frames=20))               # 14 > 10: never fits
    out = sched.step()
    assert sched.active == [a] and sched.waiting == [b]
    blocks, ends = _drive(sched, {})
    assert ends[a].status == ends[b].status == "finished"
    assert len(blocks[b]) == 12
    solo = _engine().generate(num_frames=12, seed=2)
    torch.testing.assert_close(_latents(blocks[b]), solo.latents[0], rtol=0, atol=1e-5)
    del out


def test_endless_streams_need_a_history_cap():
    engine = _engine()
    sched = Scheduler(engine)
    with pytest.raises(AdmissionError, match="max_history_frames"):
        sched.submit(StreamRequest(num_frames=None))
    sched.submit(StreamRequest(num_frames=None, top_k=0, request_id="native"))   # keeps no history
    capped = _engine(MemoryConfig(window=6, top_k=2, recency_guard=1, frames_per_block=1, max_history_frames=4))
    sched = Scheduler(capped)
    rid = sched.submit(StreamRequest(num_frames=None, seed=3))
    layers = capped.model_config.num_layers
    for _ in range(25):
        sched.step()
        assert capped.memory_usage()["pages_used"] <= 4 * layers     # one page per frame and layer
    assert sched._active[rid].session.history.num_frames == 4
    assert sched.active == [rid]
    assert sched.cancel(rid)
    assert capped.memory_usage()["pages_used"] == 0


def test_a_failing_stream_does_not_take_the_others_down(monkeypatch):
    engine = _engine()
    solo = engine.generate(num_frames=10, seed=2)
    sched = Scheduler(engine, max_batch=4)
    bad = sched.submit(StreamRequest(num_frames=10, seed=1))
    good = sched.submit(StreamRequest(num_frames=10, seed=2))
    for _ in range(3):
        sched.step()
    session = sched._active[bad].session

    def broken():
        raise RuntimeError("page table corrupted")

    monkeypatch.setattr(session.cache, "commit_block", broken)
    blocks, ends = _drive(sched, {})
    assert ends[bad].status == "failed" and "page table corrupted" in ends[bad].error
    assert ends[good].status == "finished"
    assert session.closed


@pytest.mark.parametrize("data, match", [
    ({"prompt": "x", "frames": 3}, "unknown request field"),
    ({"num_frames": 4, "output": "gif"}, "output"),
    ({"num_frames": 0}, "num_frames"),
    ({"num_frames": 2.5}, "num_frames"),
    ({"num_frames": 4, "top_k": 99}, "top_k"),
    ({"num_frames": 4, "prompt_timeline": {"x": "b"}}, "prompt_timeline"),
    ({"num_frames": 4, "prompt_timeline": {"9": "b"}}, "prompt_timeline"),
    ({"num_frames": 4, "seed": "1"}, "seed"),
    ({"num_frames": 4, "recache_sink": 1}, "recache_sink"),
    ({"num_frames": 4, "request_id": ""}, "request_id"),
])
def test_bad_requests_are_refused_with_the_field_named(data, match):
    engine = _engine()
    engine.attach_random_pipeline()
    sched = Scheduler(engine)
    with pytest.raises((ValueError, TypeError), match=match):
        sched.submit(StreamRequest.from_dict(data))
    assert not sched.has_work()


def test_requests_from_json_and_duplicate_ids():
    engine = _engine()
    engine.attach_random_pipeline()
    sched = Scheduler(engine)
    rid = sched.submit(StreamRequest.from_dict({"prompt": "a", "num_frames": 4, "prompt_timeline": {"2": "b"},
                                                "request_id": "r1"}))
    assert rid == "r1"
    with pytest.raises(ValueError, match="already in use"):
        sched.submit(StreamRequest(num_frames=4, request_id="r1"))
    with pytest.raises(ValueError, match="text encoder"):
        Scheduler(_engine()).submit(StreamRequest(prompt="a", num_frames=4))
    sched.close()
    assert not sched.active


def test_readme_scheduler_example_runs_as_written(capsys):
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    match = re.search(r"<!-- example: scheduler -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md has no python block marked '<!-- example: scheduler -->'"
    exec(compile(match.group(1), "README.md:scheduler", "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    assert out.count("done; its last block shared its forwards with 2 others") == 3
    assert "{3:" in out.splitlines()[-1]
