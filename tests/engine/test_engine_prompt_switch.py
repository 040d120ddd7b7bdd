"""Prompt switching (SPEC section 7) through the engine API: static forwards, the
session and cache protocol, input validation. The numbers themselves are checked
against the naive oracle in tests/oracle/test_prompt_switch.py."""
import pytest
import torch

from lrag_engine import Engine, MemoryConfig, ModelConfig, RuntimeConfig

TINY = ModelConfig.preset("tiny")
MEMORY = dict(window=6, sink=1, top_k=2, recency_guard=1)
FRAMES = 30   # 10 blocks


def _text(seed: int, batch: int = 1, length: int = 4) -> torch.Tensor:
    return torch.randn(batch, length, TINY.text_dim, generator=torch.Generator().manual_seed(seed))


def _engine(**runtime) -> Engine:
    return Engine(TINY, MemoryConfig(**MEMORY), RuntimeConfig(kernels="reference", **runtime), seed=4)


TIMELINE = {4: _text(1), 7: _text(2, length=9)}


def test_switch_with_static_forwards_matches_eager():
    eager = _engine().generate(FRAMES, seed=7, text=_text(0), text_timeline=TIMELINE)
    with pytest.warns(UserWarning, match="CUDA graphs need a CUDA device"):
        engine = _engine(cuda_graphs=True)
    static = engine.generate(FRAMES, seed=7, text=_text(0), text_timeline=TIMELINE)
    torch.testing.assert_close(static.latents, eager.latents, rtol=0, atol=0)
    assert [e.to_dict() for e in static.log] == [e.to_dict() for e in eager.log]
    assert any(sel for e in static.log for sel in e.selected)
    assert len(engine.graphs) >= 2   # static forwards really ran around the switches
    # The workspace holds the last text's K/V, not the first one's.
    workspace = engine.workspace(1)
    session_kv = engine.last_session.cross_kv
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(workspace.cross_kv, session_kv))
    # And the switches changed the video.
    plain = _engine().generate(FRAMES, seed=7, text=_text(0))
    assert torch.equal(plain.latents[:, :12], eager.latents[:, :12])
    assert not torch.allclose(plain.latents[:, 12:], eager.latents[:, 12:])


def test_sessions_taking_turns_on_static_forwards_keep_their_texts():
    """Two sessions share one workspace; one switches: each must keep reading its own text."""
    with pytest.warns(UserWarning):
        engine = _engine(cuda_graphs=True)
    reference = _engine()

    def run(eng):
        a, b = eng.session(text=_text(0), seed=1), eng.session(text=_text(5), seed=2)
        out_a, out_b = [], []
        for block in range(8):
            if block == 5:
                a.switch_text(_text(1), recache_sink=True)
            out_a.append(a.step().latents)
            out_b.append(b.step().latents)
        a.close(), b.close()
        return torch.cat(out_a, 1), torch.cat(out_b, 1)

    got, want = run(engine), run(reference)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_stream_and_session_agree_and_timeline_zero_is_the_first_text():
    engine = _engine()
    timeline = {0: _text(0), 3: _text(1)}
    streamed = torch.cat([b.latents for b in engine.stream(FRAMES, seed=7, text_timeline=timeline,
                                                          recache_sink=True)], 1)
    generated = engine.generate(FRAMES, seed=7, text=_text(0), text_timeline={3: _text(1)}, recache_sink=True)
    torch.testing.assert_close(streamed, generated.latents, rtol=0, atol=0)
    with engine.session(seed=7, text=_text(9)) as session:
        session.switch_text(_text(0))      # before the first block: just the text
        blocks = [session.step().latents for _ in range(3)]
        session.switch_text(_text(1), recache_sink=True)
        blocks += [session.step().latents for _ in range(7)]
    torch.testing.assert_close(torch.cat(blocks, 1), generated.latents, rtol=0, atol=0)


def test_switch_keeps_history_and_descriptors_and_memory_is_window_sized():
    engine = _engine()
    with engine.session(seed=3) as session:
        for _ in range(6):
            session.step()
        cache = session.cache
        history_desc = cache.history.descriptors().clone()
        window_desc = cache.window.descriptors.clone()
        k_before, v_before = cache.window.k.clone(), cache.window.v.clone()
        query = cache.query.clone()
        assert history_desc.shape[1] > 0
        session.switch_text(_text(3))
        assert torch.equal(cache.history.descriptors(), history_desc)
        assert torch.equal(cache.window.descriptors, window_desc)
        assert torch.equal(cache.query, query)
        sink_slot = cache.window.order[0].slot
        others = [f.slot for f in cache.window.order[1:]]
        # The sink's K/V stay; the others change (from layer 1 on: layer 0's K/V come
        # from the frame's own latent before any attention or text).
        assert torch.equal(cache.window.k[:, :, sink_slot], k_before[:, :, sink_slot])
        torch.testing.assert_close(cache.window.k[0][:, others], k_before[0][:, others])
        assert not torch.allclose(cache.window.k[1][:, others], k_before[1][:, others])
        assert not torch.allclose(cache.window.v[1][:, others], v_before[1][:, others])
        # The clean latents kept for a switch: one ring of W frames, not the video.
        assert tuple(cache.window.latents.shape) == (1, MEMORY["window"], TINY.in_channels, TINY.height,
                                                     TINY.width)
        session.step()


def test_cache_protocol_around_a_switch():
    engine = _engine()
    session = engine.session(seed=3)
    cache = session.cache
    session.step()
    session.step()
    with torch.inference_mode():
        cache.begin_block(3)
        with pytest.raises(RuntimeError, match="begin_recache: end_block"):
            cache.begin_recache()
    session.close()

    session = engine.session(seed=3)
    cache = session.cache
    for _ in range(3):
        session.step()
    with torch.inference_mode():
        old = cache.attention(recache=False)
        clean, attention = cache.begin_recache()
        assert clean.shape[1] == 5      # window [0, 4..8]: every frame but the sink
        with pytest.raises(RuntimeError, match="switch recache pass .* still open"):
            cache.begin_block(3)
        with pytest.raises(RuntimeError, match="did not run for layers \\[0, 1\\]"):
            cache.end_recache()
        with pytest.raises(RuntimeError, match="replaced the context"):
            cache.attention(recache=False)
        q = torch.zeros(1, 3 * TINY.tokens_per_frame, TINY.num_heads, TINY.head_dim)
        with pytest.raises(RuntimeError, match="belongs to a block that is over"):
            old(0, q, q, q)
        engine.model(clean, torch.zeros(clean.shape[:2]), session.cross_kv, attention)
        cache.end_recache()
        with pytest.raises(RuntimeError, match="no switch recache pass is open"):
            cache.end_recache()
    session.step()
    session.close()
    with pytest.raises(RuntimeError, match="closed"):
        session.switch_text(_text(1))


@pytest.mark.parametrize("timeline, error, match", [
    ({10: _text(1)}, ValueError, r"block indices must be ints in \[0, 10\)"),
    ({-1: _text(1)}, ValueError, "block indices"),
    ({True: _text(1)}, ValueError, "block indices"),
    ({"3": _text(1)}, ValueError, "block indices"),
    ({3: _text(1, batch=2)}, ValueError, r"text_timeline\[3\]: text must have shape \[1, \*, 32\]"),
    ({3: torch.zeros(1, TINY.text_len + 1, TINY.text_dim)}, ValueError, r"text_timeline\[3\]: .*text_len"),
    ({3: torch.full((1, 2, TINY.text_dim), float("nan"))}, ValueError, "NaN"),
    ({0: _text(1)}, ValueError, "both give block 0's text"),
    ([(3, _text(1))], TypeError, "mapping"),
])
def test_timeline_is_validated_up_front(timeline, error, match):
    engine = _engine()
    with pytest.raises(error, match=match):
        engine.generate(FRAMES, text=_text(0), text_timeline=timeline)
    with pytest.raises(error, match=match):
        engine.stream(FRAMES, text=_text(0), text_timeline=timeline)
    assert engine.last_session is None   # nothing ran


def test_switch_text_is_validated():
    engine = _engine()
    with engine.session(batch_size=2) as session:
        session.step()
        with pytest.raises(ValueError, match=r"text must have shape \[2, \*, 32\]"):
            session.switch_text(_text(1))
        with pytest.raises(TypeError, match="recache_sink must be a bool"):
            session.switch_text(_text(1, batch=2), recache_sink=1)
        with pytest.raises(TypeError, match="recache_sink must be a bool"):
            engine.generate(6, text_timeline={1: _text(1)}, recache_sink="yes")
        session.switch_text(_text(1, batch=2))
        session.step()
    # The batch of a run may come from the timeline's first text.
    result = engine.generate(6, text_timeline={0: _text(1, batch=2), 1: _text(2, batch=2)})
    assert result.latents.shape[0] == 2
