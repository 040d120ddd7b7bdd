"""Sessions over one shared engine: interleaving, static-forward reuse, per-session
options, an engine around a built model, and page isolation between sessions."""
import warnings

import pytest
import torch

from lrag_engine import Engine, MemoryConfig, ModelConfig, RuntimeConfig
from lrag_engine.models.wan import WanModel

TINY = ModelConfig.preset("tiny")
MEMORY = dict(window=6, sink=1, top_k=2, recency_guard=1)
BLOCKS = 10


def _engine(cuda_graphs=False, **memory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # cuda_graphs on the CPU warns
        return Engine(TINY, MemoryConfig(**{**MEMORY, **memory}),
                      RuntimeConfig(kernels="reference", cuda_graphs=cuda_graphs), seed=4)


def _text(seed, batch=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 7, TINY.text_dim, generator=g)


def _solo(engine, blocks=BLOCKS, **session):
    with engine.session(**session) as s:
        outs = [s.step() for _ in range(blocks)]
        return torch.cat([o.latents for o in outs], dim=1), [o.log.to_dict() for o in outs]


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "static"])
def test_interleaved_sessions_equal_their_solo_runs(cuda_graphs):
    a_args = dict(seed=1, text=_text(1))
    # same batch size: the two share the engine's workspace and static forwards
    b_args = dict(seed=2, text=_text(2), top_k=1, recency_guard=2)
    solo_a = _solo(_engine(cuda_graphs), **a_args)
    solo_b = _solo(_engine(cuda_graphs), **b_args)

    engine = _engine(cuda_graphs)
    a, b = engine.session(**a_args), engine.session(**b_args)
    out_a, out_b = [], []
    for block in range(BLOCKS):
        out_a.append(a.step())
        if block >= 2:            # b starts later, so the two are at different positions
            out_b.append(b.step())
    while len(out_b) < BLOCKS:
        out_b.append(b.step())
    a.close(), b.close()
    for solo, outs in ((solo_a, out_a), (solo_b, out_b)):
        assert torch.equal(torch.cat([o.latents for o in outs], dim=1), solo[0])
        assert [o.log.to_dict() for o in outs] == solo[1]
    assert any(sel for log in solo_a[1] for sel in log["selected"])   # retrieval really ran
    assert engine.memory_usage()["pages_used"] == 0                    # both gave their pages back


def test_static_forwards_are_built_once_and_reused_by_later_sessions():
    engine = _engine(cuda_graphs=True)
    first, _ = _solo(engine)
    keys, built = engine.graphs.keys(), len(engine.graphs)
    calls = engine.graphs.calls
    assert built >= 2 and built % 2 == 0    # a denoising and a recache forward per steady signature
    steady = {key[1] for key in keys}
    with engine.session(seed=4) as s:
        outs, signatures = [], []
        for _ in range(BLOCKS):
            outs.append(s.step())
            signatures.append(s.cache.signature)
    second = torch.cat([o.latents for o in outs], dim=1)
    assert len(engine.graphs) == built and engine.graphs.keys() == keys   # nothing new built
    # every forward of a block with a known signature ran the existing static forward,
    # from that signature's first block in this session on
    forwards_per_block = len(engine.schedule) + 1
    assert engine.graphs.calls - calls == forwards_per_block * sum(sig in steady for sig in signatures)
    assert torch.equal(first, second)


def test_transitional_signatures_get_no_static_forward():
    engine = _engine(cuda_graphs=True)
    with engine.session() as s:
        signatures = []
        for _ in range(BLOCKS):
            s.step()
            signatures.append(s.cache.signature)
    repeated = {sig for sig in signatures if signatures.count(sig) > 1}
    once = set(signatures) - repeated
    assert once, "the window fill should give signatures seen once"
    built = {key[1] for key in engine.graphs.keys()}
    assert built == repeated and not (built & once)


def test_session_options_are_bounded_by_the_engine():
    engine = _engine()
    with pytest.raises(ValueError, match=r"top_k must be an int in \[0, 2\]"):
        engine.session(top_k=3)
    with pytest.raises(ValueError, match="recency_guard"):
        engine.session(recency_guard=-1)
    # a session asking for less retrieval equals an engine built with it
    narrow = _solo(_engine(top_k=1))
    assert torch.equal(_solo(engine, top_k=1)[0], narrow[0])
    assert all(len(sel) <= 1 for log in narrow[1] for sel in log["selected"])


def test_engine_around_a_built_model_uses_it_as_is():
    reference = _engine()
    model = WanModel(TINY, seed=4)
    for engine in (Engine(model, MemoryConfig(**MEMORY), RuntimeConfig(kernels="reference")),
                   Engine.from_model(model, memory=MemoryConfig(**MEMORY), runtime=RuntimeConfig(kernels="reference"))):
        assert engine.model is model
        assert torch.equal(engine.generate(12, seed=3).latents, reference.generate(12, seed=3).latents)
    with pytest.raises(ValueError, match="dtype"):
        Engine(model, runtime=RuntimeConfig(dtype="bfloat16"))
    with pytest.raises(ValueError, match="already-built WanModel"):
        Engine(model, checkpoint="weights.safetensors")
    with pytest.raises(TypeError, match="needs a WanModel"):
        Engine.from_model(TINY)


def test_sessions_never_share_pages_and_give_them_back():
    engine = _engine()
    a, b = engine.session(seed=1), engine.session(seed=2)
    for _ in range(6):
        a.step(), b.step()
    pages_a = set(a.history.page_addresses().flatten().tolist())
    pages_b = set(b.history.page_addresses().flatten().tolist())
    assert pages_a and pages_b and not pages_a & pages_b
    used = engine.memory_usage()["pages_used"]
    assert used == len(pages_a) + len(pages_b)
    a.close()
    assert engine.memory_usage()["pages_used"] == len(pages_b)
    # b keeps running on pages a gave back, and its own earlier frames stay intact
    k0, v0 = b.history.frame_kv(0)
    for _ in range(4):
        b.step()
    k1, v1 = b.history.frame_kv(0)
    assert torch.equal(k0, k1) and torch.equal(v0, v1)
    b.close()
    assert engine.memory_usage()["pages_used"] == 0
    with pytest.raises(RuntimeError, match="closed"):
        b.step()


def test_a_session_retrieves_only_its_own_frames():
    """Two sessions with very different content: every page a session splices is one
    of its own."""
    engine = _engine()
    a, b = engine.session(seed=1, text=_text(5)), engine.session(seed=2, text=_text(6))
    seen = {id(a): set(), id(b): set()}
    real = type(a.history).page_ids

    def spy(self, frame_ids):
        pages = real(self, frame_ids)
        owner = a if self is a.history else b
        seen[id(owner)] |= set(pages[pages >= 0].tolist())
        return pages
    type(a.history).page_ids = spy
    try:
        for _ in range(BLOCKS):
            a.step(), b.step()
    finally:
        type(a.history).page_ids = real
    for s in (a, b):
        assert seen[id(s)] and seen[id(s)] <= set(s.history.page_addresses().flatten().tolist())
    a.close(), b.close()
