"""The engine against the naive oracle, and the oracle against hand-checkable facts.

The oracle (naive.py) is written from SPEC.md alone; the engine must agree with it to
float32 rounding over long videos with retrieval active, and pick exactly the same
frames.
"""
from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass

import pytest
import torch

from lrag_engine.config import MemoryConfig, ModelConfig, RuntimeConfig
from lrag_engine.memory import _ext
from lrag_engine.testing import assert_close, tolerance
from naive import (BlockWindow, HistoryOverflow, attention, block_context, dit_forward, eligible_frames,
                   embed_text, history_capacity, naive_generate, patchify, plan_windows, random_state_dict,
                   retrieve, rope_rotate, rope_split, sinusoidal_embedding, unpatchify,
                   wan_parameter_shapes, warped_timesteps)

TINY = ModelConfig.preset("tiny")
TEXT_LEN = 5   # < TINY.text_len, so the zero padding is exercised
STEPS = (1000, 750, 500, 250)
# Two float32 implementations may each be off by the float32 tolerance on a
# similarity near 1, so a ranking decided by a smaller gap than twice that could
# legitimately differ between them.
_ATOL32, _RTOL32 = tolerance(torch.float32)
MIN_SELECTION_MARGIN = 2 * (_ATOL32 + _RTOL32)


# ----------------------------------------------------------------------------- helpers

@dataclass(frozen=True)
class Setting:
    window: int = 12
    sink: int = 1
    top_k: int = 6
    recency_guard: int = 5
    frames_per_block: int = 3
    blocks: int = 16
    batch: int = 1
    widen: bool = False
    expect_partial: bool = False   # some block must find fewer than top_k eligible frames
    # History budgets in frames of the batch (fractions exercise the rounding down).
    gpu_budget_frames: float | None = None
    host_budget_frames: float | None = None
    history_tier: str = "device"
    overflow: str = "drop_oldest"

    def budget_bytes(self, frames: float | None) -> int | None:
        frame_bytes = 2 * TINY.num_layers * self.batch * TINY.tokens_per_frame * TINY.dim * 4
        return None if frames is None else int(frames * frame_bytes)

    def memory(self) -> MemoryConfig:
        return MemoryConfig(window=self.window, sink=self.sink, top_k=self.top_k,
                            recency_guard=self.recency_guard, frames_per_block=self.frames_per_block,
                            widen_local_until_memory=self.widen,
                            gpu_budget_bytes=self.budget_bytes(self.gpu_budget_frames),
                            host_budget_bytes=self.budget_bytes(self.host_budget_frames),
                            history_tier=self.history_tier, overflow_policy=self.overflow)

    def capacity(self) -> int | None:
        return history_capacity(TINY, self.batch, torch.float32, self.top_k, self.frames_per_block,
                                self.budget_bytes(self.gpu_budget_frames),
                                self.budget_bytes(self.host_budget_frames), self.history_tier)


def make_inputs(setting: Setting, seed: int):
    """Fresh state dict, noise [B, T, C, H, W], text [B, L, text_dim] and re-noise tensors.

    With white noise alone the spatial-mean descriptors of a random model are nearly
    parallel (cosines ~0.98), and top-K rankings hinge on gaps near float32 rounding.
    A random offset per frame and channel spreads them, as changing content would.
    """
    g = torch.Generator().manual_seed(seed)
    shape = (TINY.in_channels, TINY.height, TINY.width)
    frames = setting.blocks * setting.frames_per_block

    def latent_noise(num_frames: int) -> torch.Tensor:
        white = torch.randn(setting.batch, num_frames, *shape, generator=g)
        return white + torch.randn(setting.batch, num_frames, TINY.in_channels, 1, 1, generator=g)

    state = random_state_dict(TINY, g)
    noise = latent_noise(frames)
    text = torch.randn(setting.batch, TEXT_LEN, TINY.text_dim, generator=g)
    renoise = [latent_noise(setting.frames_per_block) for _ in range(setting.blocks * (len(STEPS) - 1))]
    return state, noise, text, renoise


def run_oracle(setting: Setting, state, noise, text, renoise, dtype=torch.float32, bounded=True):
    return naive_generate(state, TINY, setting.window, setting.sink, setting.top_k,
                          setting.recency_guard, setting.frames_per_block, noise, text, renoise,
                          steps=STEPS, shift=5.0, widen_local_until_memory=setting.widen, dtype=dtype,
                          history_capacity=setting.capacity() if bounded else None,
                          overflow=setting.overflow)


def run_engine(setting: Setting, state, noise, text, renoise, kernels="reference", device="cpu",
               cuda_graphs=False):
    from lrag_engine import Engine

    engine = Engine(model=TINY, memory=setting.memory(),
                    runtime=RuntimeConfig(device=device, dtype="float32", kernels=kernels, cuda_graphs=cuda_graphs,
                                          denoising_steps=STEPS, shift=5.0),
                    seed=0)
    names = set(engine.model.state_dict())
    expected = set(wan_parameter_shapes(TINY))
    assert names == expected, (f"engine state dict is not Wan-named: missing {sorted(expected - names)}, "
                               f"unexpected {sorted(names - expected)}")
    engine.model.load_state_dict({name: value.to(device) for name, value in state.items()})
    for name, value in engine.model.state_dict().items():
        assert torch.equal(value.cpu().float(), state[name]), f"engine did not take parameter {name}"
    return engine.generate(num_frames=noise.shape[1], text=text, noise=noise, renoise=renoise, seed=None)


def check_oracle_log_is_informative(setting: Setting, log) -> None:
    """Retrieval must really happen, and be far from ties, or the comparison proves little."""
    if setting.top_k == 0:
        assert all(sel == [] for entry in log for sel in entry["selected"])
        return
    full = [entry for entry in log if all(len(sel) == setting.top_k for sel in entry["selected"])]
    assert len(full) >= 4, f"only {len(full)} blocks retrieved a full top_k; lengthen the video"
    assert log[-1] in full
    if setting.expect_partial:
        assert any(0 < len(sel) < setting.top_k for entry in log for sel in entry["selected"])
    for entry in log:
        assert entry["margin"] > MIN_SELECTION_MARGIN, (
            f"block {entry['block']}: selection decided by a score gap of {entry['margin']:.2e}; "
            "pick another seed")


def compare_logs(engine_log, oracle_log, batch: int) -> None:
    assert len(engine_log) == len(oracle_log), f"{len(engine_log)} log entries, expected {len(oracle_log)}"
    for got, want in zip(engine_log, oracle_log):
        where = f"block {want['block']}"
        assert got.block == want["block"], where
        assert tuple(got.frames) == want["frames"], f"{where}: frames {got.frames} != {want['frames']}"
        selected = [list(map(int, sel)) for sel in got.selected]
        assert len(selected) == batch, f"{where}: {len(selected)} selections for batch {batch}"
        assert selected == want["selected"], (
            f"{where}: engine selected {selected}, oracle {want['selected']} "
            f"(oracle similarities {want['similarities']})")
        if any(want["selected"]):
            assert got.query_frame == want["query_frame"], (
                f"{where}: query frame {got.query_frame} != {want['query_frame']}")
        else:
            # SPEC does not say what a block that retrieves nothing (block 0, nothing
            # eligible yet, or top_k = 0) logs as its query: none, or the newest frame.
            newest = want["frames"][0] - 1 if want["block"] > 0 else None
            assert got.query_frame in (None, newest), f"{where}: query frame {got.query_frame}"
        for b in range(batch):
            got_sims = torch.as_tensor(list(got.similarities[b]), dtype=torch.float64)
            want_sims = torch.tensor(want["similarities"][b], dtype=torch.float64)
            assert_close(got_sims, want_sims, dtype=torch.float32, name=f"{where} similarities[{b}]")


# ----------------------------------------------------------------------------- engine vs oracle

SETTINGS = [
    pytest.param(Setting(), id="W12-S1-K6-R5-F3"),
    pytest.param(Setting(sink=0), id="W12-S0-K6-R5-F3"),
    pytest.param(Setting(sink=2), id="W12-S2-K6-R5-F3"),
    # K above the eligible count for many blocks: R=0 makes history eligible at once.
    pytest.param(Setting(recency_guard=0, expect_partial=True), id="W12-S1-K6-R0-F3"),
    pytest.param(Setting(window=8, top_k=2, recency_guard=0), id="W8-S1-K2-R0-F3"),
    pytest.param(Setting(window=6, top_k=2, recency_guard=1, frames_per_block=1), id="W6-S1-K2-R1-F1"),
    pytest.param(Setting(window=8, top_k=3, recency_guard=2, frames_per_block=2), id="W8-S1-K3-R2-F2"),
    pytest.param(Setting(widen=True), id="W12-S1-K6-R5-F3-widen"),
    pytest.param(Setting(top_k=0, recency_guard=0), id="W12-S1-K0-native"),
    pytest.param(Setting(batch=2), id="W12-S1-K6-R5-F3-B2"),
]


def check_engine_against_oracle(setting: Setting, kernels: str, device: str = "cpu",
                                cuda_graphs: bool = False) -> None:
    state, noise, text, renoise = make_inputs(setting, seed=1234)
    oracle_latents, oracle_log = run_oracle(setting, state, noise, text, renoise)
    check_oracle_log_is_informative(setting, oracle_log)
    if setting.batch > 1:
        assert any(len({tuple(sel) for sel in entry["selected"]}) > 1 for entry in oracle_log), \
            "batch elements never retrieved differently"

    result = run_engine(setting, state, noise, text, renoise, kernels=kernels, device=device,
                        cuda_graphs=cuda_graphs)
    compare_logs(result.log, oracle_log, setting.batch)
    assert result.latents.dtype == torch.float32
    assert_close(result.latents, oracle_latents, dtype=torch.float32, name="latents")


@pytest.mark.parametrize("setting", SETTINGS)
def test_engine_matches_oracle(setting: Setting):
    check_engine_against_oracle(setting, kernels="reference")


# Budgets small enough that the oldest frames are dropped for most of the video (36
# frames are evicted in all), with R low enough that full top-K retrievals still happen.
BUDGET_SETTINGS = [
    pytest.param(Setting(recency_guard=2, gpu_budget_frames=10.5), id="device-10.5f-drop"),
    pytest.param(Setting(recency_guard=1, top_k=4, gpu_budget_frames=4.7, host_budget_frames=4.6),
                 id="device4.7f+host4.6f-drop"),
    pytest.param(Setting(recency_guard=2, history_tier="host", host_budget_frames=2.5), id="host-2.5f-drop"),
    pytest.param(Setting(recency_guard=1, top_k=3, batch=2, history_tier="host", host_budget_frames=5),
                 id="host-5f-drop-B2"),
    pytest.param(Setting(window=6, top_k=2, recency_guard=0, frames_per_block=1, gpu_budget_frames=3),
                 id="W6-F1-device-3f-drop"),
    # Budgets that hold the whole history, under the "error" policy: nothing dropped.
    pytest.param(Setting(recency_guard=2, history_tier="host", host_budget_frames=40, overflow="error"),
                 id="host-40f-error"),
]


@pytest.mark.parametrize("setting", BUDGET_SETTINGS)
def test_engine_matches_oracle_with_history_budgets(setting: Setting):
    """Byte budgets, drop_oldest and the host tier against the oracle's capacity rule:
    same selections (global ids), similarities and latents."""
    if setting.history_tier == "host" or setting.host_budget_frames is not None:
        if not _ext.extension_available():
            pytest.fail(f"the host tier needs the C++ extension: {_ext.missing_reason()}")
    state, noise, text, renoise = make_inputs(setting, seed=1234)
    oracle_latents, oracle_log = run_oracle(setting, state, noise, text, renoise)
    check_oracle_log_is_informative(setting, oracle_log)
    capacity = setting.capacity()
    evicted = setting.blocks * setting.frames_per_block - setting.window
    if setting.overflow == "drop_oldest":
        # The budget must matter: frames are dropped, and retrieval differs from an
        # unbounded history in some block.
        assert capacity < evicted
        unbounded = dataclasses.replace(setting, gpu_budget_frames=None, host_budget_frames=None,
                                        history_tier="device")
        unbounded_log = run_engine(unbounded, state, noise, text, renoise).log
        assert any(got.selected != want["selected"] for got, want in zip(unbounded_log, oracle_log))
    else:
        assert capacity >= evicted

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_engine(setting, state, noise, text, renoise)
    compare_logs(result.log, oracle_log, setting.batch)
    assert_close(result.latents, oracle_latents, dtype=torch.float32, name="latents")
    dropping = [w for w in caught if "dropping" in str(w.message)]
    assert len(dropping) == (1 if setting.overflow == "drop_oldest" else 0), [str(w.message) for w in caught]


@pytest.mark.parametrize("setting", [
    pytest.param(Setting(recency_guard=2, gpu_budget_frames=10.5, overflow="error"), id="device-10.5f"),
    pytest.param(Setting(recency_guard=2, history_tier="host", host_budget_frames=2.5, overflow="error"),
                 id="host-2.5f"),
])
def test_error_policy_refuses_what_the_oracle_cannot_hold(setting: Setting):
    from lrag_engine.memory.history import HistoryFullError
    state, noise, text, renoise = make_inputs(setting, seed=1234)
    with pytest.raises(HistoryOverflow):
        plan_windows(setting.blocks, setting.frames_per_block, setting.window, setting.sink,
                     setting.capacity(), "error")
    with pytest.raises(HistoryFullError, match=f"hold {setting.capacity()} frames"):
        run_engine(setting, state, noise, text, renoise)


def test_history_capacity_rule_by_hand():
    # tiny: 4x6 = 24 tokens x dim 64 x float32 = 6144 bytes of K, as much of V: 12288 per
    # page; 2 layers x batch 2 = 4 pages per frame.
    page = 12288
    assert history_capacity(TINY, 2, torch.float32, 6, 3, None, None) is None
    assert history_capacity(TINY, 2, torch.float32, 6, 3, None, 100 * page) is None
    assert history_capacity(TINY, 2, torch.float32, 6, 3, 9 * page - 1, None) == 2     # 8 pages
    assert history_capacity(TINY, 2, torch.float32, 6, 3, 9 * page, 3 * page + 7) == 3  # 12 pages
    assert history_capacity(TINY, 2, torch.float32, 6, 3, None, 5 * page, "host") == 10  # 36 + 5 pages
    assert history_capacity(TINY, 1, torch.bfloat16, 2, 1, 4 * page, None) == 4          # bf16 pages: half


def test_plan_windows_drops_the_oldest_history_frames_by_hand():
    # W=4, S=1, F=1: frames 1, 2, ... are evicted one per block from block 4 on; the
    # third eviction (block 6) drops frame 1.
    plans = plan_windows(8, frames_per_block=1, window=4, sink=1, capacity=2)
    assert [p.history_before for p in plans] == [[], [], [], [], [], [1], [1, 2], [2, 3]]
    assert plans[7].window == [0, 5, 6, 7]
    with pytest.raises(HistoryOverflow, match="block 6"):
        plan_windows(8, frames_per_block=1, window=4, sink=1, capacity=2, overflow="error")


@pytest.mark.cuda
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
@pytest.mark.parametrize("setting", [
    pytest.param(Setting(batch=2), id="W12-S1-K6-R5-F3-B2"),
    pytest.param(Setting(sink=2, widen=True), id="W12-S2-K6-R5-F3-widen"),
])
def test_engine_on_cuda_matches_oracle(setting: Setting, graphs: bool):
    """Kernels, side-stream retrieval and (optionally) CUDA graphs on a GPU, in float32."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    # TF32 in the patch-embedding convolution alone would cost 1e-3 of precision.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    check_engine_against_oracle(setting, kernels="auto", device="cuda", cuda_graphs=graphs)


@pytest.mark.parametrize("setting", [
    pytest.param(Setting(batch=2), id="W12-S1-K6-R5-F3-B2"),
    pytest.param(Setting(sink=0, recency_guard=0, expect_partial=True), id="W12-S0-K6-R0-F3"),
])
def test_engine_with_triton_kernels_matches_oracle(setting: Setting):
    """The search and splice kernels (Triton interpreter on the CPU) in the whole engine."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    pytest.importorskip("triton")
    check_engine_against_oracle(setting, kernels="triton")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_engine_in_16_bit_within_twice_the_naive_error(dtype):
    """STYLE's rule for long reductions: the engine in ``dtype`` may be off the float64
    oracle by at most twice what the oracle itself is off when it computes in ``dtype``
    (max and mean error), over a video with retrieval active and the same selections."""
    setting = Setting(window=6, top_k=2, recency_guard=0, blocks=5)
    state, noise, text, renoise = make_inputs(setting, seed=1234)
    truth, truth_log = run_oracle(setting, state, noise, text, renoise, dtype=torch.float64)
    naive, naive_log = run_oracle(setting, state, noise, text, renoise, dtype=dtype)
    assert any(sel for entry in truth_log for sel in entry["selected"]), "retrieval never ran"
    assert [e["selected"] for e in naive_log] == [e["selected"] for e in truth_log]

    from lrag_engine import Engine
    engine = Engine(model=TINY, memory=setting.memory(),
                    runtime=RuntimeConfig(dtype=str(dtype).removeprefix("torch."), kernels="reference",
                                          denoising_steps=STEPS, shift=5.0))
    engine.model.load_state_dict(state)
    result = engine.generate(num_frames=noise.shape[1], text=text, noise=noise, renoise=renoise)
    assert [[list(map(int, sel)) for sel in e.selected] for e in result.log] == \
        [e["selected"] for e in truth_log]
    err = (result.latents.double() - truth).abs()
    naive_err = (naive.double() - truth).abs()
    assert torch.isfinite(err).all()
    assert err.max() <= 2 * naive_err.max(), f"max err {err.max():.3e} vs naive {naive_err.max():.3e}"
    assert err.mean() <= 2 * naive_err.mean(), f"mean err {err.mean():.3e} vs naive {naive_err.mean():.3e}"


# ----------------------------------------------------------------------------- the oracle itself

def test_warped_timesteps_by_hand():
    # u = 1 - (1000 - t)/1000 = t/1000 and shift(u) = 5u / (1 + 4u):
    #   t=1000: u=1    -> 5/5          = 1      -> 1000
    #   t=750:  u=0.75 -> 3.75/4       = 0.9375 -> 937.5
    #   t=500:  u=0.5  -> 2.5/3        = 5/6    -> 833.33...
    #   t=250:  u=0.25 -> 1.25/2       = 0.625  -> 625
    got = warped_timesteps((1000, 750, 500, 250), 5.0)
    assert got == pytest.approx([1000.0, 937.5, 2500.0 / 3.0, 625.0], abs=1e-9)
    # shift 1 is the identity warp; the step list maps to itself.
    assert warped_timesteps((1000, 600, 1), 1.0) == pytest.approx([1000.0, 600.0, 1.0], abs=1e-9)


def test_sinusoidal_embedding_by_hand():
    emb = sinusoidal_embedding(torch.tensor([0.0, 1.0, 937.5]), 4)
    # dim 4: half 2, w = [10000^0, 10000^(-1/2)] = [1, 0.01]; layout [cos | sin].
    expected = torch.tensor([[1.0, 1.0, 0.0, 0.0],
                             [math.cos(1), math.cos(0.01), math.sin(1), math.sin(0.01)],
                             [math.cos(937.5), math.cos(9.375), math.sin(937.5), math.sin(9.375)]],
                            dtype=torch.float64)
    assert emb.dtype == torch.float64
    assert_close(emb, expected)


def test_window_eviction_order_by_hand():
    # W=5, S=1, F=2: frame 0 is the sink; blocks that overflow push out the oldest non-sink.
    plans = plan_windows(5, frames_per_block=2, window=5, sink=1)
    assert [p.window for p in plans] == [[0, 1], [0, 1, 2, 3], [0, 2, 3, 4, 5], [0, 4, 5, 6, 7],
                                         [0, 6, 7, 8, 9]]
    assert [p.evicted for p in plans] == [[], [], [1], [2, 3], [4, 5]]
    assert [p.history_before for p in plans] == [[], [], [], [1], [1, 2, 3]]
    # R=2 hides the two most recently evicted frames of the history before block 4.
    assert eligible_frames(plans[4].history_before, 2) == [1]
    assert eligible_frames(plans[4].history_before, 0) == [1, 2, 3]
    assert eligible_frames(plans[3].history_before, 5) == []


def test_window_without_sink_and_sink_inside_block():
    plans = plan_windows(3, frames_per_block=2, window=4, sink=0)
    assert [p.window for p in plans] == [[0, 1], [0, 1, 2, 3], [2, 3, 4, 5]]
    assert plans[2].evicted == [0, 1]
    # S=2 with F=3: the sinks are the first two frames of block 0, frame 2 can leave.
    plans = plan_windows(3, frames_per_block=3, window=7, sink=2)
    assert [p.window for p in plans] == [[0, 1, 2], [0, 1, 2, 3, 4, 5], [0, 1, 4, 5, 6, 7, 8]]
    assert plans[2].evicted == [2, 3]


def test_context_layout_by_hand():
    plans = plan_windows(7, frames_per_block=3, window=12, sink=1)
    # Block 0: window [0, 1, 2]; local = newest W-S-K = 5 non-sink frames, only 2 exist.
    ctx = block_context(plans[0], 12, 1, 6, [], False)
    assert [(e.frame, e.temporal) for e in ctx.entries] == [(0, 0), (1, 1), (2, 2)]
    assert ctx.query_temporal == [0, 1, 2]
    # Block 6 (frames 18-20): window [0, 10..20] fills slots 0..11; local = the 5 newest.
    assert plans[6].window == [0] + list(range(10, 21))
    ctx = block_context(plans[6], 12, 1, 6, [4, 1], False)
    assert [(e.frame, e.temporal) for e in ctx.entries] == [
        (0, 0), (4, 0), (1, 0), (16, 7), (17, 8), (18, 9), (19, 10), (20, 11)]
    assert ctx.query_temporal == [9, 10, 11]
    # Widened: 2 retrieved leave W - S - 2 = 9 local frames.
    ctx = block_context(plans[6], 12, 1, 6, [4, 1], True)
    assert [e.frame for e in ctx.entries] == [0, 4, 1] + list(range(12, 21))


def test_retrieval_order_and_ties():
    v = torch.tensor([1.0, 2.0, -0.5])
    w = torch.tensor([2.0, -1.0, 0.0])
    descriptors = {1: v, 2: 3 * v, 3: -v, 4: v + 0.5 * w, 5: w}
    cos_4 = float(v @ (v + 0.5 * w)) / (float(v.norm()) * float((v + 0.5 * w).norm()))
    selected, sims, margin = retrieve(v, descriptors, [1, 2, 3, 4, 5], 3)
    # 1 and 2 tie at cosine 1 (lower id first), then 4; 5 is orthogonal, 3 opposite.
    assert selected == [1, 2, 4]
    assert sims == pytest.approx([1.0, 1.0, cos_4])
    assert margin == pytest.approx(0.0, abs=1e-12)
    selected, sims, _ = retrieve(v, descriptors, [3, 5], 6)
    assert selected == [5, 3] and sims == pytest.approx([0.0, -1.0], abs=1e-12)
    assert retrieve(v, descriptors, [], 6)[0] == []


def test_rope_split_and_pair_rotation_by_hand():
    assert rope_split(32) == (12, 10, 10)
    assert rope_split(128) == (44, 42, 42)
    # d=6: one (even, odd) pair per axis, each with frequency theta^0 = 1.
    x = torch.tensor([[[1.0, 0.0, 0.0, 1.0, 2.0, 0.0]]], dtype=torch.float64)
    got = rope_rotate(x, [1], [2], [3])
    expected = torch.tensor([[[math.cos(1), math.sin(1), -math.sin(2), math.cos(2),
                               2 * math.cos(3), 2 * math.sin(3)]]], dtype=torch.float64)
    assert_close(got, expected)


def test_rope_is_relative_and_identity_at_zero():
    g = torch.Generator().manual_seed(7)
    q = torch.randn(5, 3, 32, generator=g, dtype=torch.float64)
    k = torch.randn(5, 3, 32, generator=g, dtype=torch.float64)
    zeros = [0] * 5
    assert_close(rope_rotate(q, zeros, zeros, zeros), q)
    pos_q = ([3, 0, 7, 2, 9], [1, 4, 0, 2, 3], [5, 0, 1, 1, 2])
    pos_k = ([1, 1, 0, 6, 2], [0, 2, 3, 3, 1], [4, 4, 0, 2, 7])
    dots = (rope_rotate(q, *pos_q) * rope_rotate(k, *pos_k)).sum(-1)
    shift = (11, 5, 3)
    shifted_q = [[p + s for p in axis] for axis, s in zip(pos_q, shift)]
    shifted_k = [[p + s for p in axis] for axis, s in zip(pos_k, shift)]
    shifted = (rope_rotate(q, *shifted_q) * rope_rotate(k, *shifted_k)).sum(-1)
    assert_close(shifted, dots)


def test_patchify_matches_conv3d_and_unpatchify_is_c_fastest():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 4, 6, generator=g, dtype=torch.float64)     # [F, C, H, W]
    weight = torch.randn(7, 5, 1, 2, 2, generator=g, dtype=torch.float64)
    conv = torch.nn.functional.conv3d(x.permute(1, 0, 2, 3)[None], weight, stride=(1, 2, 2))[0]  # [7, F, 2, 3]
    ours = patchify(x, (1, 2, 2)) @ weight.reshape(7, -1).T                                       # [F*2*3, 7]
    assert_close(ours, conv.permute(1, 2, 3, 0).reshape(-1, 7))
    # A token's output vector is (ph, pw, C) with C fastest.
    channels = 5
    tokens = torch.arange(3 * 2 * 3 * 4 * channels, dtype=torch.float64).reshape(3 * 2 * 3, 4 * channels)
    frames = unpatchify(tokens, 3, 4, 6, (1, 2, 2), channels)
    f, i, j, q, r, c = 2, 1, 2, 1, 0, 3
    token = (f * 2 + i) * 3 + j
    assert frames[f, c, 2 * i + q, 2 * j + r] == tokens[token, (q * 2 + r) * channels + c]


def test_attention_is_plain_softmax():
    q = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    k = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)
    v = torch.tensor([[[2.0, 0.0]], [[0.0, 4.0]]], dtype=torch.float64)
    p = math.exp(1 / math.sqrt(2)) / (math.exp(1 / math.sqrt(2)) + 1.0)
    assert_close(attention(q, k, v), torch.tensor([[[2 * p, 4 * (1 - p)]]], dtype=torch.float64))


def test_head_layout_through_the_forward():
    # With a zero head weight the flow is the head bias, laid out (ph, pw, C) per token.
    g = torch.Generator().manual_seed(5)
    state = {k: v.double() for k, v in random_state_dict(TINY, g).items()}
    state["head.head.weight"] = torch.zeros_like(state["head.head.weight"])
    bias = torch.randn(state["head.head.bias"].shape, generator=g, dtype=torch.float64)
    state["head.head.bias"] = bias
    plan = BlockWindow(0, [0], [0], [], [])
    ctx = block_context(plan, 4, 1, 0, [], False)
    x = torch.randn(1, TINY.in_channels, TINY.height, TINY.width, generator=g, dtype=torch.float64)
    text = embed_text(state, TINY, torch.randn(TEXT_LEN, TINY.text_dim, generator=g, dtype=torch.float64))
    flow, new_kv = dit_forward(state, TINY, x, [500.0], text, ctx, [0], [{} for _ in range(TINY.num_layers)])
    c = TINY.out_channels
    for (i, j, q, r, ch) in [(0, 0, 0, 0, 0), (3, 5, 1, 1, c - 1), (2, 1, 0, 1, 7)]:
        assert flow[0, ch, 2 * i + q, 2 * j + r] == bias[(q * 2 + r) * c + ch]
    assert len(new_kv) == TINY.num_layers
    assert new_kv[0][0].shape == (1, TINY.tokens_per_frame, TINY.dim)


def test_oracle_float32_tracks_float64():
    setting = Setting(blocks=8)
    state, noise, text, renoise = make_inputs(setting, seed=99)
    lat32, log32 = run_oracle(setting, state, noise, text, renoise)
    lat64, log64 = run_oracle(setting, state, noise, text, renoise, dtype=torch.float64)
    assert lat32.dtype == torch.float32 and lat64.dtype == torch.float64
    assert [e["selected"] for e in log32] == [e["selected"] for e in log64]
    assert any(e["selected"][0] for e in log32)
    assert_close(lat32, lat64, dtype=torch.float32, name="float32 oracle vs float64 oracle")


def test_oracle_is_causal():
    # Later noise must not touch earlier frames; it must change its own block.
    setting = Setting(blocks=5)
    state, noise, text, renoise = make_inputs(setting, seed=11)
    base, _ = run_oracle(setting, state, noise, text, renoise)
    changed_noise = noise.clone()
    changed_noise[:, 12:] += 1.0
    changed, _ = run_oracle(setting, state, changed_noise, text, renoise)
    assert torch.equal(changed[:, :12], base[:, :12])
    assert not torch.allclose(changed[:, 12:], base[:, 12:], atol=1e-3)


def test_text_is_zero_padded_before_text_embedding():
    # Padding positions carry text_embedding(0) = W2 gelu(b0) + b2, not zeros.
    g = torch.Generator().manual_seed(13)
    state = {k: v.double() for k, v in random_state_dict(TINY, g).items()}
    text = torch.randn(TEXT_LEN, TINY.text_dim, generator=g, dtype=torch.float64)
    tokens = embed_text(state, TINY, text)
    assert tokens.shape == (TINY.text_len, TINY.dim)
    b0, b2 = state["text_embedding.0.bias"], state["text_embedding.2.bias"]
    gelu_b0 = torch.nn.functional.gelu(b0, approximate="tanh")
    pad = state["text_embedding.2.weight"] @ gelu_b0 + b2
    assert_close(tokens[TEXT_LEN:], pad.expand(TINY.text_len - TEXT_LEN, -1))
    first = state["text_embedding.2.weight"] @ torch.nn.functional.gelu(
        state["text_embedding.0.weight"] @ text[0] + b0, approximate="tanh") + b2
    assert_close(tokens[0], first)
    with pytest.raises(ValueError, match="text_len"):
        embed_text(state, TINY, torch.zeros(TINY.text_len + 1, TINY.text_dim, dtype=torch.float64))


def test_oracle_rejects_inconsistent_inputs():
    setting = Setting(blocks=2)
    state, noise, text, renoise = make_inputs(setting, seed=17)
    with pytest.raises(ValueError, match="renoise holds 5 tensors, expected 6"):
        run_oracle(setting, state, noise, text, renoise[:-1])
    with pytest.raises(ValueError, match="not a multiple of frames_per_block"):
        run_oracle(setting, state, noise[:, :5], text, renoise)
    del state["blocks.1.ffn.2.bias"]
    with pytest.raises(KeyError, match="blocks.1.ffn.2.bias"):
        run_oracle(setting, state, noise, text, renoise)
