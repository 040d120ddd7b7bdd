"""Prompt switching (SPEC section 7): the engine against the naive oracle, and the
oracle's switch rule against hand-checkable facts.

A switch before block b: blocks b.. cross-attend to the new text; before block b one
forward at timestep 0 under the new text recomputes the window's non-sink frames' K/V
(the sink's too with recache_sink) from their clean latents, keys/values
[sink | recomputed], no mask, no retrieved frames; the history is not recomputed.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from lrag_engine.config import MemoryConfig, ModelConfig, RuntimeConfig
from lrag_engine.testing import assert_close, tolerance
from naive import (dit_forward, embed_text, naive_generate, plan_windows, random_state_dict, switch_context)

TINY = ModelConfig.preset("tiny")
TEXT_LEN = 5
STEPS = (1000, 750, 500, 250)
_ATOL32, _RTOL32 = tolerance(torch.float32)
MIN_SELECTION_MARGIN = 2 * (_ATOL32 + _RTOL32)   # as in test_oracle.py


@pytest.fixture(autouse=True)
def page_table_backend():
    """Overrides the package-wide fixture that runs every oracle test on both page
    tables: a switch never touches the history, so the default table suffices here (the
    oracle runs are slow)."""
    return "auto"


@dataclass(frozen=True)
class Switching:
    window: int = 8
    sink: int = 1
    top_k: int = 2
    recency_guard: int = 1
    frames_per_block: int = 2
    blocks: int = 9
    batch: int = 1
    switches: tuple[int, ...] = (7,)       # blocks the text switches before
    recache_sink: bool = False
    retrieval_at_switch: bool = True       # a switch must fall where retrieval is active

    def memory(self) -> MemoryConfig:
        return MemoryConfig(window=self.window, sink=self.sink, top_k=self.top_k,
                            recency_guard=self.recency_guard, frames_per_block=self.frames_per_block)


def make_inputs(setting: Switching, seed: int):
    """State dict, noise, text, re-noise (as test_oracle.py makes them) and one text per
    switch, each [B, L, text_dim] with different texts per stream."""
    g = torch.Generator().manual_seed(seed)
    shape = (TINY.in_channels, TINY.height, TINY.width)

    def latent_noise(num_frames: int) -> torch.Tensor:
        white = torch.randn(setting.batch, num_frames, *shape, generator=g)
        return white + torch.randn(setting.batch, num_frames, TINY.in_channels, 1, 1, generator=g)

    state = random_state_dict(TINY, g)
    noise = latent_noise(setting.blocks * setting.frames_per_block)
    text = torch.randn(setting.batch, TEXT_LEN, TINY.text_dim, generator=g)
    renoise = [latent_noise(setting.frames_per_block) for _ in range(setting.blocks * (len(STEPS) - 1))]
    # Texts of other lengths too (3 and 7 tokens), so the padding changes with the switch.
    timeline = {block: 2.0 * torch.randn(setting.batch, 3 + 4 * (i % 2), TINY.text_dim, generator=g)
                for i, block in enumerate(setting.switches)}
    return state, noise, text, renoise, timeline


def run_oracle(setting: Switching, state, noise, text, renoise, timeline, dtype=torch.float32, caches=None):
    return naive_generate(state, TINY, setting.window, setting.sink, setting.top_k, setting.recency_guard,
                          setting.frames_per_block, noise, text, renoise, steps=STEPS, shift=5.0, dtype=dtype,
                          text_timeline=timeline, recache_sink=setting.recache_sink, caches=caches)


def make_engine(setting: Switching, state, cuda_graphs: bool = False, kernels: str = "reference"):
    from lrag_engine import Engine
    engine = Engine(model=TINY, memory=setting.memory(),
                    runtime=RuntimeConfig(device="cpu", dtype="float32", kernels=kernels, cuda_graphs=cuda_graphs,
                                          denoising_steps=STEPS, shift=5.0), seed=0)
    engine.model.load_state_dict(state)
    return engine


def compare_logs(engine_log, oracle_log, batch: int) -> None:
    assert len(engine_log) == len(oracle_log)
    for got, want in zip(engine_log, oracle_log):
        where = f"block {want['block']}"
        assert tuple(got.frames) == want["frames"], where
        selected = [list(map(int, sel)) for sel in got.selected]
        assert selected == want["selected"], f"{where}: engine {selected}, oracle {want['selected']}"
        for b in range(batch):
            assert_close(torch.as_tensor(list(got.similarities[b]), dtype=torch.float64),
                         torch.tensor(want["similarities"][b], dtype=torch.float64), dtype=torch.float32,
                         name=f"{where} similarities[{b}]")


def check_informative(setting: Switching, log) -> None:
    for entry in log:
        assert entry["margin"] > MIN_SELECTION_MARGIN, (
            f"block {entry['block']}: selection decided by a gap of {entry['margin']:.2e}; pick another seed")
    if setting.top_k == 0:
        assert all(sel == [] for entry in log for sel in entry["selected"])
        return
    if setting.retrieval_at_switch:
        plans = plan_windows(setting.blocks, setting.frames_per_block, setting.window, setting.sink)
        for block in setting.switches:
            # The window is full and the history non-empty at the switch, and the blocks
            # after it retrieve.
            assert len(plans[block - 1].window) == setting.window
            assert plans[block].history_before
            assert all(sel for sel in log[block]["selected"]), f"block {block} retrieved nothing"


SETTINGS = [
    pytest.param(Switching(), id="W8-S1-K2-F2-switch@7"),
    pytest.param(Switching(recache_sink=True), id="W8-S1-K2-F2-switch@7-recache_sink"),
    pytest.param(Switching(switches=(5, 7)), id="W8-S1-K2-F2-switch@5,7"),
    pytest.param(Switching(sink=2, switches=(5, 7), recache_sink=True), id="W8-S2-K2-F2-switch@5,7-recache_sink"),
    pytest.param(Switching(blocks=4, switches=(1,), retrieval_at_switch=False), id="switch@1-window-not-full"),
    pytest.param(Switching(blocks=4, switches=(1,), recache_sink=True, retrieval_at_switch=False),
                 id="switch@1-window-not-full-recache_sink"),
    pytest.param(Switching(top_k=0, recency_guard=0, blocks=7, switches=(5,)), id="native-K0-switch@5"),
    pytest.param(Switching(top_k=0, recency_guard=0, blocks=7, switches=(5,), recache_sink=True),
                 id="native-K0-switch@5-recache_sink"),
    pytest.param(Switching(batch=2, switches=(6,)), id="B2-per-stream-texts-switch@6"),
]


@pytest.mark.parametrize("setting", SETTINGS)
def test_switch_matches_oracle(setting: Switching):
    state, noise, text, renoise, timeline = make_inputs(setting, seed=2024)
    oracle_latents, oracle_log = run_oracle(setting, state, noise, text, renoise, timeline)
    check_informative(setting, oracle_log)
    if setting.batch > 1:
        for texts in timeline.values():
            assert not torch.equal(texts[0], texts[1])

    engine = make_engine(setting, state)
    result = engine.generate(num_frames=noise.shape[1], text=text, noise=noise, renoise=renoise,
                             text_timeline=timeline, recache_sink=setting.recache_sink)
    compare_logs(result.log, oracle_log, setting.batch)
    assert_close(result.latents, oracle_latents, dtype=torch.float32, name="latents")


def test_switch_by_session_steps_matches_oracle():
    """The same rule through the session API: switch_text between steps."""
    setting = Switching(switches=(5, 7), recache_sink=False)
    state, noise, text, renoise, timeline = make_inputs(setting, seed=2024)
    oracle_latents, _ = run_oracle(setting, state, noise, text, renoise, timeline)
    engine = make_engine(setting, state)
    steps, f = len(STEPS) - 1, setting.frames_per_block
    outputs = []
    with engine.session(text=text) as session:
        for block in range(setting.blocks):
            if block in timeline:
                session.switch_text(timeline[block])
            outputs.append(session.step(noise[:, block * f:(block + 1) * f],
                                        renoise[block * steps:(block + 1) * steps]).latents)
        assert session.switches == [(5, False), (7, False)]
    assert_close(torch.cat(outputs, dim=1), oracle_latents, dtype=torch.float32, name="latents")


def test_switch_with_triton_kernels_matches_oracle():
    pytest.importorskip("triton")
    import os
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    setting = Switching(sink=2, recache_sink=False)
    state, noise, text, renoise, timeline = make_inputs(setting, seed=2024)
    oracle_latents, oracle_log = run_oracle(setting, state, noise, text, renoise, timeline)
    engine = make_engine(setting, state, kernels="triton")
    result = engine.generate(num_frames=noise.shape[1], text=text, noise=noise, renoise=renoise,
                             text_timeline=timeline)
    compare_logs(result.log, oracle_log, setting.batch)
    assert_close(result.latents, oracle_latents, dtype=torch.float32, name="latents")


# ----------------------------------------------------------------------------- the oracle's rule by hand

def test_switch_context_by_hand():
    # Window [0, 1 | 6, 7, 8, 9] with two sinks: the non-sink frames query at slots 2..5,
    # keys/values [sinks at 0, 1 | recomputed at 2..5].
    ctx, redo = switch_context([0, 1, 6, 7, 8, 9], sink=2, recache_sink=False)
    assert redo == [6, 7, 8, 9]
    assert [(e.frame, e.temporal) for e in ctx.entries] == [(0, 0), (1, 1), (6, 2), (7, 3), (8, 4), (9, 5)]
    assert ctx.query_temporal == [2, 3, 4, 5]
    ctx, redo = switch_context([0, 1, 6, 7, 8, 9], sink=2, recache_sink=True)
    assert redo == [0, 1, 6, 7, 8, 9] and ctx.query_temporal == [0, 1, 2, 3, 4, 5]
    assert [e.frame for e in ctx.entries] == redo
    # Only sinks in the window: nothing to recompute unless asked.
    assert switch_context([0, 1], sink=2, recache_sink=False)[1] == []
    # No sink: every frame is recomputed either way.
    assert switch_context([4, 5, 6], sink=0, recache_sink=False)[1] == [4, 5, 6]


def _final_caches(setting, state, noise, text, renoise, timeline):
    caches: list = []
    latents, log = run_oracle(setting, state, noise, text, renoise, timeline, caches=caches)
    return latents, log, caches[0]


@pytest.mark.parametrize("recache_sink", [False, True], ids=["keep-sink", "recache-sink"])
def test_switch_touches_only_the_window(recache_sink: bool):
    """History K/V and retrieval state stay; window frames change from layer 1 on; layer
    0's K/V (from the frame's own latent at t=0, before any attention or text) do not;
    the sink changes only with recache_sink."""
    setting = Switching(switches=(6,), blocks=7, recache_sink=recache_sink)
    state, noise, text, renoise, timeline = make_inputs(setting, seed=2024)
    base, base_log, base_cache = _final_caches(setting, state, noise, text, renoise, None)
    got, log, cache = _final_caches(setting, state, noise, text, renoise, timeline)
    plans = plan_windows(setting.blocks, setting.frames_per_block, setting.window, setting.sink)
    window = plans[5].window        # the window the switch before block 6 recomputes
    history = plans[6].history_before
    assert history and len(window) == setting.window
    first = 6 * setting.frames_per_block
    assert torch.equal(got[:, :first], base[:, :first])
    # Retrieval before the switch block is the same and uses the same descriptors (of
    # the unchanged clean latents).
    assert [e["selected"] for e in log[:7]] == [e["selected"] for e in base_log[:7]]
    assert [e["similarities"] for e in log[:7]] == [e["similarities"] for e in base_log[:7]]
    for layer in range(TINY.num_layers):
        for frame in history:
            # Frame evicted before the switch: bit for bit the K/V it had.
            for a, b in zip(cache[layer][frame], base_cache[layer][frame]):
                assert torch.equal(a, b), f"history frame {frame} layer {layer} changed"
        for frame in window:
            changed = frame >= setting.sink or recache_sink
            for a, b in zip(cache[layer][frame], base_cache[layer][frame]):
                if layer == 0 or not changed:
                    if changed:
                        assert_close(a, b, dtype=torch.float32, name=f"frame {frame} layer 0")
                    else:
                        assert torch.equal(a, b), f"sink {frame} layer {layer} changed"
                else:
                    assert not torch.allclose(a, b, atol=1e-4), f"frame {frame} layer {layer} kept its K/V"


def test_switch_pass_is_the_rule_of_section_7():
    """The switch before block 6 stores, for each non-sink window frame, the K/V of one
    forward over those frames' clean latents at t=0 under the new text, context [sink |
    them] at their window slots, over the cache as block 5 left it."""
    setting = Switching(switches=(6,), blocks=7)
    state, noise, text, renoise, timeline = make_inputs(setting, seed=2024)
    # Without a switch, block 6 only adds frames 12, 13 to the cache (evicting moves
    # nothing in the oracle), so frames 0..11 hold what block 5 left.
    base, _, base_cache = _final_caches(setting, state, noise, text, renoise, None)
    _, _, cache = _final_caches(setting, state, noise, text, renoise, timeline)
    window = plan_windows(7, 2, 8, 1)[5].window
    assert window == [0, 5, 6, 7, 8, 9, 10, 11]
    ctx, redo = switch_context(window, 1, False)
    assert redo == window[1:] and ctx.query_temporal == list(range(1, 8))
    tokens = embed_text(state, TINY, timeline[6][0])
    before = [{f: kv for f, kv in layer.items() if f < 12} for layer in base_cache]
    _, new_kv = dit_forward(state, TINY, base[0][redo], [0.0] * len(redo), tokens, ctx, redo, before)
    for layer in range(TINY.num_layers):
        for offset, frame in enumerate(redo):
            k, v = cache[layer][frame]
            assert_close(k, new_kv[layer][0][offset], dtype=torch.float32, name=f"k frame {frame} layer {layer}")
            assert_close(v, new_kv[layer][1][offset], dtype=torch.float32, name=f"v frame {frame} layer {layer}")
        # The sink keeps the K/V of block 0's recache pass.
        assert all(torch.equal(a, b) for a, b in zip(cache[layer][0], base_cache[layer][0]))
