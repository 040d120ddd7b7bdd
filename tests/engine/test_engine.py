"""Engine behaviour: determinism, batch independence, streaming, bad input."""
import dataclasses

import pytest
import torch

from lrag_engine import Engine, MemoryConfig, ModelConfig, RuntimeConfig
from lrag_engine.models.checkpoint import save_checkpoint

TINY = ModelConfig.preset("tiny")
FRAMES = 24


def _engine(seed=0, **memory):
    return Engine(TINY, MemoryConfig(**memory), RuntimeConfig(kernels="reference"), seed=seed)


def _inputs(batch, frames=FRAMES, seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, frames, TINY.in_channels, TINY.height, TINY.width, generator=g)
    text = torch.randn(batch, 5, TINY.text_dim, generator=g)
    return noise, text


def _renoise(batch, frames=FRAMES, seed=1, steps=4, per_block=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, per_block, TINY.in_channels, TINY.height, TINY.width, generator=g)
            for _ in range(frames // per_block * (steps - 1))]


def test_seed_determinism_and_seed_sensitivity():
    a = _engine().generate(FRAMES, seed=3)
    b = _engine().generate(FRAMES, seed=3)
    c = _engine().generate(FRAMES, seed=4)
    assert torch.equal(a.latents, b.latents)
    assert [e.to_dict() for e in a.log] == [e.to_dict() for e in b.log]
    assert not torch.allclose(a.latents, c.latents)
    assert torch.isfinite(a.latents).all()


def test_retrieval_is_active_and_native_mode_never_retrieves():
    rag = _engine(window=6, sink=1, top_k=2, recency_guard=1).generate(FRAMES)
    assert any(sel for entry in rag.log for sel in entry.selected)
    native = _engine(window=6, sink=1, top_k=0, recency_guard=1).generate(FRAMES)
    assert all(sel == [] for entry in native.log for sel in entry.selected)
    assert not torch.allclose(rag.latents, native.latents)


def test_batch_of_two_equals_two_single_runs():
    engine = _engine(window=6, sink=1, top_k=2, recency_guard=1)
    noise, text = _inputs(2)
    renoise = _renoise(2)
    both = engine.generate(FRAMES, text=text, noise=noise, renoise=renoise)
    for i in range(2):
        single = engine.generate(FRAMES, text=text[i:i + 1], noise=noise[i:i + 1],
                                 renoise=[r[i:i + 1] for r in renoise])
        torch.testing.assert_close(both.latents[i:i + 1], single.latents, rtol=1e-5, atol=1e-5)
        assert [e.selected[i] for e in both.log] == [e.selected[0] for e in single.log]


def test_stream_yields_the_blocks_of_generate():
    engine = _engine()
    noise, text = _inputs(1)
    whole = engine.generate(FRAMES, text=text, noise=noise)
    blocks = list(engine.stream(FRAMES, text=text, noise=noise))
    assert [b.frames for b in blocks] == [(i, i + 3) for i in range(0, FRAMES, 3)]
    assert torch.equal(torch.cat([b.latents for b in blocks], dim=1), whole.latents)


def test_checkpoint_round_trip_through_engine(tmp_path):
    engine = _engine(seed=1)
    path = tmp_path / "model.safetensors"
    save_checkpoint(engine.model, path, layout="generator_ema", prefix=True)
    loaded = Engine(TINY, MemoryConfig(), RuntimeConfig(kernels="reference"), checkpoint=path, seed=99)
    assert loaded.load_report is not None and not loaded.load_report.missing
    noise, text = _inputs(1)
    torch.testing.assert_close(loaded.generate(FRAMES, text=text, noise=noise, seed=0).latents,
                               engine.generate(FRAMES, text=text, noise=noise, seed=0).latents, rtol=0, atol=0)


def test_missing_checkpoint_keys_are_named(tmp_path):
    state = _engine().model.state_dict()
    del state["blocks.0.ffn.0.weight"]
    path = tmp_path / "broken.pt"
    torch.save({"generator": state}, path)
    with pytest.raises((KeyError, ValueError), match=r"blocks\.0\.ffn\.0\.weight"):
        Engine(TINY, checkpoint=path)


@pytest.mark.parametrize("bad, match", [
    (dict(num_frames=25), "multiple of frames_per_block"),
    (dict(num_frames=0), "multiple of frames_per_block"),
    (dict(noise=torch.zeros(1, 24, 16, 8, 11)), "noise must have shape"),
    (dict(noise=torch.full((1, 24, 16, 8, 12), float("nan"))), "noise contains NaN"),
    (dict(text=torch.zeros(1, 5, 31)), "text must have shape"),
    (dict(text=torch.zeros(1, 17, 32)), "1..text_len=16 tokens, got 17"),
    (dict(text=torch.full((1, 5, 32), float("inf"))), "text contains NaN or inf"),
    (dict(renoise=[torch.zeros(1, 3, 16, 8, 12)]), "renoise must hold"),
], ids=["frames-25", "frames-0", "noise-shape", "noise-nan", "text-dim", "text-len", "text-inf",
        "renoise-count"])
def test_bad_input_is_rejected_and_engine_stays_usable(bad, match):
    engine = _engine()
    reference = engine.generate(FRAMES, seed=5).latents
    args = dict(num_frames=FRAMES) | bad
    with pytest.raises(ValueError, match=match):
        engine.generate(**args)
    assert torch.equal(engine.generate(FRAMES, seed=5).latents, reference)


@pytest.mark.parametrize("fields, match", [
    (dict(window=12, sink=1, top_k=11), r"top_k \(11\) must be < window - sink \(11\)"),
    (dict(window=12, sink=12), r"sink \(12\) must be < window"),
    (dict(window=8, sink=1, top_k=5, frames_per_block=3), "cannot hold a block"),
    (dict(recency_guard=-1), "recency_guard"),
    (dict(descriptor="clip"), "descriptor"),
    (dict(gpu_budget_bytes=0), r"gpu_budget_bytes must be None \(no budget\) or a positive number of bytes, got 0"),
    (dict(host_budget_bytes=-5), "host_budget_bytes must be None"),
    (dict(gpu_budget_bytes=True), "gpu_budget_bytes must be None"),
])
def test_memory_config_errors_name_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        MemoryConfig(**fields)


def test_encoder_descriptor_requires_checkpoint():
    with pytest.raises(ValueError, match="encoder checkpoint"):
        Engine(TINY, MemoryConfig(descriptor="encoder"))


def test_full_history_budget_errors_or_drops_as_configured():
    from lrag_engine.memory.history import HistoryFullError
    frame_bytes = 2 * TINY.num_layers * TINY.tokens_per_frame * TINY.dim * 4
    small = dict(window=6, sink=1, top_k=2, recency_guard=1, gpu_budget_bytes=4 * frame_bytes)
    engine = _engine(**small)
    with pytest.raises(HistoryFullError, match="budget"):
        engine.generate(FRAMES)
    dropping = _engine(**small, overflow_policy="drop_oldest")
    with pytest.warns(UserWarning, match="dropping"):
        result = dropping.generate(FRAMES)
    assert dropping.cache.history.dropped_frames > 0 and torch.isfinite(result.latents).all()
    # The last block searched a history of the 4 newest evicted frames (budget), taken
    # before its own 3 evictions dropped 3 more: global ids from 1 + dropped - 3 on.
    last = result.log[-1].selected[0]
    assert last and min(last) >= 1 + dropping.cache.history.dropped_frames - 3


def test_encoder_descriptors_drive_retrieval(tmp_path):
    from lrag_engine.encoder import EncoderConfig, EncoderDescriptor, RetrievalEncoder, save_checkpoint
    torch.manual_seed(0)
    config = EncoderConfig(in_channels=16, spatial_h=8, spatial_w=12, latent_dim=24, hidden_dims=(32, 64))
    save_checkpoint(tmp_path / "enc.pt", RetrievalEncoder(config))
    engine = Engine(TINY, MemoryConfig(window=6, sink=1, top_k=2, recency_guard=1),
                    RuntimeConfig(kernels="reference"), encoder=tmp_path / "enc.pt")
    assert engine.memory.descriptor == "encoder" and engine.descriptor.dim == 24
    result = engine.generate(FRAMES)
    # The logged similarities are the encoder's cosines between query and selected frames.
    encoder = EncoderDescriptor.from_checkpoint(tmp_path / "enc.pt")
    checked = 0
    for entry in result.log:
        if entry.selected[0]:
            frames = [entry.query_frame, *entry.selected[0]]
            emb = encoder(result.latents[0, frames])
            cos = emb[1:] @ emb[0] / (emb[1:].norm(dim=-1) * emb[0].norm())
            torch.testing.assert_close(cos, torch.tensor(entry.similarities[0]), rtol=1e-4, atol=1e-5)
            checked += 1
    assert checked >= 3


def test_more_bad_inputs_name_the_value():
    engine = _engine()
    with pytest.raises(ValueError, match="1..text_len"):
        engine.stream(FRAMES, text=torch.zeros(1, 0, TINY.text_dim))
    with pytest.raises(ValueError, match="seed must be an int"):
        engine.generate(FRAMES, seed="abc")

    class NoDim:
        def __call__(self, frames):
            return frames.mean(dim=(-2, -1))
    with pytest.raises(ValueError, match=r"positive int \.dim"):
        Engine(TINY, descriptor=NoDim())

    class WrongWidth:
        dim = 5
        def __call__(self, frames):
            return frames.mean(dim=(-2, -1))
    bad = Engine(TINY, MemoryConfig(window=6, top_k=2, recency_guard=1), descriptor=WrongWidth())
    with pytest.raises(ValueError, match=r"expected \[3, 5\]"):
        bad.generate(6)


def test_budget_too_small_fails_before_any_work():
    from lrag_engine.memory.history import HistoryFullError
    frame_bytes = 2 * TINY.num_layers * TINY.tokens_per_frame * TINY.dim * 4
    engine = _engine(window=6, top_k=2, recency_guard=1, gpu_budget_bytes=10 * frame_bytes)
    with pytest.raises(HistoryFullError, match="evict 18 frames"):
        engine.stream(24)
    assert engine.generate(12).latents.shape[1] == 12     # 6 evicted frames fit


@pytest.mark.parametrize("memory, match", [
    # 2 frames cannot take the 3 frames one block evicts.
    (dict(gpu_budget_bytes=2), "hold 2 frames .* fewer than the 3 frames one block evicts"),
    # Spilling to the host needs the 2 retrieved frames and 3 evicted ones on the device.
    (dict(gpu_budget_bytes=2, host_budget_bytes=20), "gpu_budget_bytes=.* holds 2 frames"),
])
@pytest.mark.parametrize("policy", ["error", "drop_oldest"])
def test_budgets_a_block_cannot_run_with_fail_before_any_work(memory, match, policy):
    frame_bytes = 2 * TINY.num_layers * TINY.tokens_per_frame * TINY.dim * 4
    budgets = {name: frames * frame_bytes for name, frames in memory.items()}
    engine = _engine(window=6, top_k=2, recency_guard=1, overflow_policy=policy, **budgets)
    with pytest.raises(ValueError, match=match):
        engine.stream(24)


def test_native_mode_keeps_no_history():
    engine = _engine(window=6, top_k=0, recency_guard=1)
    engine.generate(FRAMES)
    assert engine.cache.history.num_frames == 0


def test_stopping_a_stream_early_leaves_the_engine_usable():
    engine = _engine(window=6, top_k=2, recency_guard=1)
    full = engine.generate(FRAMES, seed=2).latents
    stream = engine.stream(FRAMES, seed=2)
    next(stream), next(stream)
    stream.close()
    assert torch.equal(engine.generate(FRAMES, seed=2).latents, full)
