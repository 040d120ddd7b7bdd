"""Runtime variants must compute the same video as the plain eager path."""
import pytest
import torch

from lrag_engine import Engine, MemoryConfig, ModelConfig, RuntimeConfig

TINY = ModelConfig.preset("tiny")
MEMORY = dict(window=6, sink=1, top_k=2, recency_guard=1)
FRAMES = 30


def _run(**runtime):
    engine = Engine(TINY, MemoryConfig(**MEMORY), RuntimeConfig(kernels="reference", **runtime), seed=4)
    return engine, engine.generate(FRAMES, seed=7)


def test_static_buffer_forwards_match_eager():
    _, eager = _run()
    with pytest.warns(UserWarning, match="CUDA graphs need a CUDA device"):
        engine, static = _run(cuda_graphs=True)
    torch.testing.assert_close(static.latents, eager.latents, rtol=0, atol=0)
    assert [e.to_dict() for e in static.log] == [e.to_dict() for e in eager.log]
    assert any(sel for e in static.log for sel in e.selected)
    # every context shape seen twice got a denoising and a recache static forward
    assert len(engine.graphs) >= 2 and len(engine.graphs) % 2 == 0


def test_per_forward_refetch_baseline_matches():
    _, eager = _run()
    _, baseline = _run(retrieval_fetch="per_forward")
    torch.testing.assert_close(baseline.latents, eager.latents, rtol=1e-6, atol=1e-6)


def test_graphs_and_refetch_are_exclusive():
    with pytest.raises(ValueError, match="cuda_graphs cannot be combined"):
        Engine(TINY, runtime=RuntimeConfig(cuda_graphs=True, retrieval_fetch="per_forward"))


def test_stream_outputs_are_lazy_and_complete():
    engine = Engine(TINY, MemoryConfig(**MEMORY), RuntimeConfig(kernels="reference"), seed=4)
    blocks = list(engine.stream(FRAMES, seed=7))
    assert all(b.latents.device.type == "cpu" and b.latents.shape[1] == 3 for b in blocks)
    assert [b.log.block for b in blocks] == list(range(FRAMES // 3))


def test_host_tier_history_matches_device_history():
    from lrag_engine.memory._ext import extension_available
    if not extension_available():
        pytest.skip("the paged-memory extension is not built")
    _, eager = _run()
    frame_bytes = 2 * TINY.num_layers * TINY.tokens_per_frame * TINY.dim * 4
    engine = Engine(TINY, MemoryConfig(**MEMORY, history_tier="host", host_budget_bytes=FRAMES * frame_bytes),
                    RuntimeConfig(kernels="reference"), seed=4)
    host = engine.generate(FRAMES, seed=7)
    assert type(engine.cache.history).__name__ == "PagedHistoryStore"
    usage = engine.cache.history.usage()
    assert usage["host_used"] > usage["gpu_capacity"]   # most of the history really is on the host
    torch.testing.assert_close(host.latents, eager.latents, rtol=0, atol=0)
    assert [e.to_dict() for e in host.log] == [e.to_dict() for e in eager.log]


def test_host_tier_needs_a_budget():
    with pytest.raises(ValueError, match="host_budget_bytes"):
        MemoryConfig(history_tier="host")
