"""Starting a stream from given clean latent frames (image-to-video, video continuation):
the engine against the naive oracle, and the priming rule by hand.

Rule: initial_latents [B, n, C, H, W] enter the cache before the first generated block,
as blocks of sizes [n mod F (when not 0), F, F, ...], each written by one forward at
timestep 0 (a generated block's recache pass, same context rules); they count as
generated frames for the sink, the window, the history and retrieval. Only the
generated frames are returned; their frame ids start at n; logs count generated blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from lrag_engine.config import MemoryConfig, ModelConfig, RuntimeConfig
from lrag_engine.testing import assert_close, tolerance
from naive import (block_context, dit_forward, embed_text, naive_generate, plan_windows, priming_block_sizes,
                   random_state_dict)

TINY = ModelConfig.preset("tiny")
TEXT_LEN = 5
STEPS = (1000, 750, 500, 250)
_ATOL32, _RTOL32 = tolerance(torch.float32)
MIN_SELECTION_MARGIN = 2 * (_ATOL32 + _RTOL32)   # as in test_oracle.py


@pytest.fixture(autouse=True)
def page_table_backend():
    """Overrides the package-wide fixture that runs every oracle test on both page tables
    (the oracle runs are slow; priming adds nothing table-specific)."""
    return "auto"


@dataclass(frozen=True)
class Priming:
    given: int                    # n
    window: int = 8
    sink: int = 1
    top_k: int = 2
    recency_guard: int = 1
    frames_per_block: int = 3
    blocks: int = 5               # generated blocks
    batch: int = 1

    def memory(self) -> MemoryConfig:
        return MemoryConfig(window=self.window, sink=self.sink, top_k=self.top_k,
                            recency_guard=self.recency_guard, frames_per_block=self.frames_per_block)


def make_inputs(setting: Priming, seed: int):
    g = torch.Generator().manual_seed(seed)
    shape = (TINY.in_channels, TINY.height, TINY.width)

    def latent_noise(num_frames: int) -> torch.Tensor:
        white = torch.randn(setting.batch, num_frames, *shape, generator=g)
        return white + torch.randn(setting.batch, num_frames, TINY.in_channels, 1, 1, generator=g)

    state = random_state_dict(TINY, g)
    given = latent_noise(setting.given)      # stands in for encoded frames
    noise = latent_noise(setting.blocks * setting.frames_per_block)
    text = torch.randn(setting.batch, TEXT_LEN, TINY.text_dim, generator=g)
    renoise = [latent_noise(setting.frames_per_block) for _ in range(setting.blocks * (len(STEPS) - 1))]
    return state, given, noise, text, renoise


def make_engine(setting: Priming, state):
    from lrag_engine import Engine
    engine = Engine(model=TINY, memory=setting.memory(),
                    runtime=RuntimeConfig(device="cpu", dtype="float32", kernels="reference",
                                          denoising_steps=STEPS, shift=5.0), seed=0)
    engine.model.load_state_dict(state)
    return engine


SETTINGS = [
    pytest.param(Priming(given=1), id="image-n1"),
    pytest.param(Priming(given=3), id="n=F"),
    pytest.param(Priming(given=5, blocks=6), id="n=F+2-retrieval"),
    pytest.param(Priming(given=5, batch=2), id="n=F+2-B2"),
]


@pytest.mark.parametrize("setting", SETTINGS)
def test_initial_latents_match_oracle(setting: Priming):
    state, given, noise, text, renoise = make_inputs(setting, seed=77)
    oracle_latents, oracle_log = naive_generate(
        state, TINY, setting.window, setting.sink, setting.top_k, setting.recency_guard, setting.frames_per_block,
        noise, text, renoise, steps=STEPS, shift=5.0, dtype=torch.float32, initial_latents=given)
    n = setting.given
    assert [entry["frames"] for entry in oracle_log] == \
        [(n + i * setting.frames_per_block, n + (i + 1) * setting.frames_per_block) for i in range(setting.blocks)]
    for entry in oracle_log:
        assert entry["margin"] > MIN_SELECTION_MARGIN, f"block {entry['block']}: pick another seed"
    if setting.given == 5 and setting.batch == 1:
        # Retrieval is active in the later blocks, and it can find the given frames.
        assert all(sel for sel in oracle_log[-1]["selected"])
        assert any(f < n for entry in oracle_log for sel in entry["selected"] for f in sel)

    engine = make_engine(setting, state)
    result = engine.generate(num_frames=noise.shape[1], text=text, noise=noise, renoise=renoise,
                             initial_latents=given)
    assert result.latents.shape == noise.shape
    assert len(result.log) == len(oracle_log)
    for got, want in zip(result.log, oracle_log):
        assert got.block == want["block"]
        assert tuple(got.frames) == want["frames"]
        assert [list(map(int, sel)) for sel in got.selected] == want["selected"], f"block {want['block']}"
        for b in range(setting.batch):
            assert_close(torch.as_tensor(list(got.similarities[b]), dtype=torch.float64),
                         torch.tensor(want["similarities"][b], dtype=torch.float64), dtype=torch.float32,
                         name=f"block {want['block']} similarities[{b}]")
    assert_close(result.latents, oracle_latents, dtype=torch.float32, name="latents")

    # The same through stream(): generated blocks only, frame ids from n.
    blocks = list(make_engine(setting, state).stream(num_frames=noise.shape[1], text=text, noise=noise,
                                                     renoise=renoise, initial_latents=given))
    assert [b.frames for b in blocks] == [entry["frames"] for entry in oracle_log]
    assert [b.block for b in blocks] == list(range(setting.blocks))
    assert_close(torch.cat([b.latents for b in blocks], dim=1), oracle_latents, dtype=torch.float32,
                 name="stream latents")


def test_priming_block_sizes_by_hand():
    assert priming_block_sizes(1, 3) == [1]
    assert priming_block_sizes(3, 3) == [3]
    assert priming_block_sizes(5, 3) == [2, 3]
    assert priming_block_sizes(7, 3) == [1, 3, 3]
    plans = plan_windows(2, 3, window=6, sink=1, leading_blocks=[2, 3])
    assert [p.frames for p in plans] == [[0, 1], [2, 3, 4], [5, 6, 7], [8, 9, 10]]
    assert [p.evicted for p in plans] == [[], [], [1, 2], [3, 4, 5]]
    assert plans[3].window == [0, 6, 7, 8, 9, 10]


def test_priming_writes_the_recache_pass_kv_and_evicts_into_history():
    """After priming, the window holds the given frames' K/V as a timestep-0 pass over the
    block with its context computes them; frames pushed out are in the history."""
    setting = Priming(given=7, window=6, top_k=1, recency_guard=0)
    state, given, _, text, _ = make_inputs(setting, seed=5)
    engine = make_engine(setting, state)
    f = setting.frames_per_block
    sizes = priming_block_sizes(setting.given, f)
    assert sizes == [1, 3, 3]
    plans = plan_windows(0, f, setting.window, setting.sink, leading_blocks=sizes)
    with engine.session(text=text) as session:
        session.prime(given)
        assert session.position == setting.given and session.block == 0
        cache = session.cache
        # Window order and history by the planned rule.
        assert [w.frame for w in cache.window.order] == plans[-1].window
        evicted = [frame for plan in plans for frame in plan.evicted]
        assert evicted == [1]
        assert cache.history.num_frames == len(evicted)
        # The oracle's K/V of each frame: a timestep-0 pass per block with its context
        # (no retrieval yet: the history is empty before each priming block's evictions).
        st = {k: v.float() for k, v in state.items()}
        tokens = embed_text(st, TINY, text[0])
        oracle_cache = [{} for _ in range(TINY.num_layers)]
        for plan in plans:
            assert not plan.history_before
            context = block_context(plan, setting.window, setting.sink, setting.top_k, [], False)
            x0 = given[0, plan.frames[0]:plan.frames[-1] + 1]
            _, new_kv = dit_forward(st, TINY, x0, [0.0] * len(plan.frames), tokens, context, plan.frames,
                                    oracle_cache)
            for layer, (k, v) in enumerate(new_kv):
                for offset, frame in enumerate(plan.frames):
                    oracle_cache[layer][frame] = (k[offset], v[offset])
        for w in cache.window.order:
            for layer in range(TINY.num_layers):
                k, v = oracle_cache[layer][w.frame]
                assert_close(cache.window.k[layer, 0, w.slot].flatten(-2), k, dtype=torch.float32,
                             name=f"k layer {layer} frame {w.frame}")
                assert_close(cache.window.v[layer, 0, w.slot].flatten(-2), v, dtype=torch.float32,
                             name=f"v layer {layer} frame {w.frame}")
            # The clean latents of the given frames (what a prompt switch recomputes from).
            assert torch.equal(cache.window.latents[0, w.slot], given[0, w.frame])
        # A generated block follows at frame n.
        out = session.step()
        assert out.frames == (setting.given, setting.given + f) and out.block == 0
        assert out.log.frames == (setting.given, setting.given + f) and out.log.block == 0


def test_initial_latents_are_validated():
    setting = Priming(given=1)
    state, given, noise, text, _ = make_inputs(setting, seed=3)
    engine = make_engine(setting, state)
    f = setting.frames_per_block
    with pytest.raises(ValueError, match="initial_latents"):
        engine.generate(num_frames=f, initial_latents=given[:, :, :-1])
    with pytest.raises(ValueError, match="initial_latents"):
        engine.generate(num_frames=f, initial_latents=given[:, :0])
    bad = given.clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="initial_latents"):
        engine.generate(num_frames=f, initial_latents=bad)
    with pytest.raises(ValueError, match="initial_latents"):
        engine.generate(num_frames=f, batch_size=2, initial_latents=given)
    with engine.session() as session:
        session.step()
        with pytest.raises(RuntimeError, match="before the first block"):
            session.prime(given)


def test_initial_latents_with_static_forwards_match_eager():
    """Priming runs eagerly; the generated blocks after it may run as static forwards
    (here the CPU stand-in for CUDA graphs) and give the same result."""
    setting = Priming(given=5, blocks=6)
    state, given, noise, text, renoise = make_inputs(setting, seed=77)
    eager = make_engine(setting, state).generate(num_frames=noise.shape[1], text=text, noise=noise,
                                                 renoise=renoise, initial_latents=given)
    from lrag_engine import Engine
    with pytest.warns(UserWarning, match="cuda_graphs"):
        engine = Engine(model=TINY, memory=setting.memory(),
                        runtime=RuntimeConfig(device="cpu", dtype="float32", kernels="reference", cuda_graphs=True,
                                              denoising_steps=STEPS, shift=5.0), seed=0)
    engine.model.load_state_dict(state)
    static = engine.generate(num_frames=noise.shape[1], text=text, noise=noise, renoise=renoise,
                             initial_latents=given)
    assert [e.selected for e in static.log] == [e.selected for e in eager.log]
    assert_close(static.latents, eager.latents, dtype=torch.float32, name="latents")
