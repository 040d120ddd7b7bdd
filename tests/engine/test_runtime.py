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


@pytest.mark.parametrize("page_table", ["cpp", "python"])
def test_host_tier_history_matches_device_history(page_table):
    from lrag_engine.memory._ext import extension_available
    if page_table == "cpp" and not extension_available():
        pytest.skip("the paged-memory extension is not built")
    _, eager = _run()
    frame_bytes = 2 * TINY.num_layers * TINY.tokens_per_frame * TINY.dim * 4
    engine = Engine(TINY, MemoryConfig(**MEMORY, history_tier="host", host_budget_bytes=FRAMES * frame_bytes),
                    RuntimeConfig(kernels="reference", page_table=page_table), seed=4)
    with engine.session(seed=7) as session:
        blocks = [session.step() for _ in range(FRAMES // 3)]
        usage = engine.memory_usage()
        assert usage["backend"] == page_table
        # the device tier is the staging of top_k + one block; most of the history is on the host
        assert usage["gpu_pages_used"] == (MEMORY["top_k"] + 3) * TINY.num_layers
        assert usage["host_pages_used"] > usage["gpu_pages_used"]
    assert engine.memory_usage()["pages_used"] == 0   # the session gave its pages back
    host = torch.cat([b.latents for b in blocks], dim=1)
    torch.testing.assert_close(host, eager.latents, rtol=0, atol=0)
    assert [b.log.to_dict() for b in blocks] == [e.to_dict() for e in eager.log]


def test_host_tier_needs_a_budget():
    with pytest.raises(ValueError, match="host_budget_bytes"):
        MemoryConfig(history_tier="host")
