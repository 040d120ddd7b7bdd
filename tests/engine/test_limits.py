"""Limits of the API: frame counts that cannot be indexed or held, seeds outside the
generator's range, Triton kernels where they cannot run; the initial-noise rule."""
import math

import pytest
import torch

from lrag_engine import Engine, MemoryConfig, ModelConfig, RuntimeConfig
from lrag_engine.engine import MAX_FRAMES

TINY = ModelConfig.preset("tiny")
FRAME_VALUES = TINY.in_channels * TINY.height * TINY.width
# Far above one block of noise in these tests, far below the noise of a whole huge run.
RANDN_LIMIT = 10 ** 8


def _engine(seed=0, device="cpu"):
    return Engine(TINY, MemoryConfig(window=6, sink=1, top_k=2, recency_guard=1),
                  RuntimeConfig(device=device, kernels="reference"), seed=seed)


@pytest.fixture
def randn_sizes(monkeypatch):
    """The number of values of every torch.randn call; a call for more than RANDN_LIMIT fails
    before allocating (an allocation that size could take the machine down)."""
    sizes, real = [], torch.randn

    def spy(*size, **kwargs):
        shape = size[0] if len(size) == 1 and not isinstance(size[0], int) else size
        sizes.append(math.prod(shape))
        assert sizes[-1] <= RANDN_LIMIT, f"torch.randn asked for {sizes[-1]} values"
        return real(*size, **kwargs)
    monkeypatch.setattr(torch, "randn", spy)
    return sizes


def test_num_frames_past_32_bit_frame_numbers_is_refused(randn_sizes):
    engine = _engine()
    randn_sizes.clear()   # the random weights
    too_many = (MAX_FRAMES // 3 + 1) * 3
    for run in (engine.stream, engine.generate):
        with pytest.raises(ValueError, match=rf"num_frames must be <= {MAX_FRAMES}.*got {too_many}"):
            run(too_many)
    assert randn_sizes == []


def test_generate_refuses_an_output_larger_than_memory(randn_sizes, monkeypatch):
    engine = _engine()
    randn_sizes.clear()   # the random weights
    huge = 2_100_000_000   # [1, T, 16, 8, 12] float32: 12.9 TB
    with pytest.raises(ValueError, match=r"num_frames=2100000000 .*physical memory"):
        engine.generate(huge)
    monkeypatch.setattr("lrag_engine.checks.physical_memory_bytes", lambda: 30 * FRAME_VALUES * 4)
    with pytest.raises(ValueError, match=r"num_frames=33 \(batch 1\).*needs 202752 bytes, "
                                         r"more than the 184320 bytes of physical memory"):
        engine.generate(33)
    assert engine.generate(30).latents.shape[1] == 30
    assert max(randn_sizes) <= 3 * FRAME_VALUES   # one block of noise at a time
    # A stream keeps nothing, so the same huge run may start.
    first = next(iter(engine.stream(huge)))
    assert first.latents.shape == (1, 3, TINY.in_channels, TINY.height, TINY.width)


def test_stream_draws_the_initial_noise_block_by_block(randn_sizes):
    engine = _engine()
    randn_sizes.clear()   # the random weights
    stream = engine.stream(3_000_000, batch_size=2)
    blocks = [next(stream) for _ in range(2)]
    stream.close()
    assert [b.frames for b in blocks] == [(0, 3), (3, 6)]
    assert max(randn_sizes) <= 2 * 3 * FRAME_VALUES


def test_a_shorter_run_is_a_prefix_of_a_longer_one():
    engine = _engine()
    short = engine.generate(12, batch_size=2, seed=7)
    long = engine.generate(24, batch_size=2, seed=7)
    assert torch.equal(long.latents[:, :12], short.latents)
    assert [e.to_dict() for e in long.log[:4]] == [e.to_dict() for e in short.log]
    streamed = torch.cat([b.latents for b in engine.stream(12, batch_size=2, seed=7)], dim=1)
    assert torch.equal(streamed, short.latents)


def _first_block_noises(engine, monkeypatch, **run):
    """(initial noise, first re-noise) of block 0 of ``engine.generate(**run)``."""
    import lrag_engine.session as session_module
    seen = {}
    real_forward = session_module.Session._forward
    real_renoise = session_module.renoise_step

    def forward(self, x, *rest, **kwargs):
        seen.setdefault("x", x.clone())
        return real_forward(self, x, *rest, **kwargs)

    def renoise(x0, fresh, sigma):
        seen.setdefault("fresh", fresh.clone())
        return real_renoise(x0, fresh, sigma)
    monkeypatch.setattr(session_module.Session, "_forward", forward)
    monkeypatch.setattr(session_module, "renoise_step", renoise)
    engine.generate(**run)
    return seen["x"], seen["fresh"]


def _documented_noise(seed, batch, blocks):
    """The rule of Engine.stream's docstring, block after block."""
    g = torch.Generator().manual_seed(seed)
    torch.randint(2 ** 63 - 1, (), generator=g)   # the re-noise generator's seed
    return [torch.randn(batch, 3, TINY.in_channels, TINY.height, TINY.width, generator=g) for _ in range(blocks)]


def test_initial_noise_follows_the_documented_rule_and_re_noise_is_fresh(monkeypatch):
    x, fresh = _first_block_noises(_engine(), monkeypatch, num_frames=6, batch_size=2, seed=11)
    assert torch.equal(x, _documented_noise(11, 2, 1)[0])
    # On the CPU a re-noise generator seeded like the noise one re-drew the initial noise.
    assert not torch.allclose(fresh, x)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_initial_noise_is_the_same_on_cuda(monkeypatch):
    x, _ = _first_block_noises(_engine(device="cuda"), monkeypatch, num_frames=6, batch_size=2, seed=11)
    assert x.is_cuda and torch.equal(x.cpu(), _documented_noise(11, 2, 1)[0])


@pytest.mark.parametrize("seed", [2 ** 64, -2 ** 63 - 1, True, 1.0, "3"],
                         ids=["2**64", "-2**63-1", "bool", "float", "str"])
def test_seed_outside_the_generator_range_is_refused(seed):
    with pytest.raises(ValueError, match=r"seed must be an int in \[-2\*\*63, 2\*\*64\)"):
        Engine(TINY, seed=seed)
    engine = _engine()
    for run in (engine.stream, engine.generate):
        with pytest.raises(ValueError, match=r"seed must be an int in \[-2\*\*63, 2\*\*64\)"):
            run(6, seed=seed)


def test_seeds_at_the_ends_of_the_range_run():
    for seed in (-2 ** 63, 2 ** 64 - 1):
        assert next(iter(_engine(seed=seed).stream(6))).latents.shape[1] == 3
        assert next(iter(_engine().stream(6, seed=seed))).latents.shape[1] == 3


def test_triton_kernels_off_cuda_need_the_interpreter(monkeypatch):
    from lrag_engine.ops import dispatch
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"kernels='triton' on device 'cpu'.*TRITON_INTERPRET=1 is not set"
                                         r".*TRITON_INTERPRET=1 in the environment.*CUDA device.*'reference'"):
        RuntimeConfig(device="cpu", kernels="triton")
    RuntimeConfig(device="cuda", kernels="triton")   # the kernels compile for a CUDA device
    RuntimeConfig(device="cpu", kernels="reference")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if dispatch.HAS_TRITON:
        RuntimeConfig(device="cpu", kernels="triton")   # the interpreter runs them
    monkeypatch.setattr(dispatch, "HAS_TRITON", False)
    with pytest.raises(ValueError, match="triton is not installed"):
        RuntimeConfig(device="cpu", kernels="triton")
