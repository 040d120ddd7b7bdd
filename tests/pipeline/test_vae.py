"""The Wan VAE wrapper: streamed decode == full decode, frame counts, normalisation,
and the original (Wan2.1_VAE.pth) key map."""
import pytest
import torch

pytest.importorskip("diffusers")

from lrag_engine.pipeline.vae import (  # noqa: E402
    VAECheckpointError,
    WanVAE,
    original_key_map,
)
from lrag_engine.testing import assert_close  # noqa: E402


@pytest.fixture(scope="module")
def vae():
    return WanVAE.random(seed=0)


def _latents(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch, blocks", [pytest.param(1, (3, 3, 3), id="B1-3x3"),
                                           pytest.param(2, (3, 3, 1), id="B2-3-3-1")])
def test_streamed_decode_equals_full_decode(vae, batch, blocks):
    z = _latents(batch, sum(blocks), 16, 2, 2)
    full = vae.decode(z, as_float=True)
    decoder = vae.stream_decoder()
    parts, start = [], 0
    for size in blocks:
        parts.append(decoder.decode_block(z[:, start:start + size], as_float=True))
        start += size
    assert [p.shape[1] for p in parts] == [4 * blocks[0] - 3] + [4 * f for f in blocks[1:]]
    assert_close(torch.cat(parts, dim=1), full, name="streamed frames")
    # Random weights must not saturate the output, or the comparison would be vacuous.
    assert (full.abs() < 1).float().mean() > 0.9


def test_frame_count_rule_and_uint8_frames(vae):
    for t in (1, 2, 5):
        frames = vae.decode(_latents(1, t, 16, 2, 3, seed=t))
        assert frames.shape == (1, 4 * t - 3, 16, 24, 3) and frames.dtype == torch.uint8


def test_uint8_frames_are_the_float_frames_rescaled(vae):
    z = _latents(1, 2, 16, 2, 2)
    as_float, as_uint8 = vae.decode(z, as_float=True), vae.decode(z)
    assert as_float.min() >= -1 and as_float.max() <= 1
    assert ((as_float + 1) * 127.5 - as_uint8.float()).abs().max() <= 0.5 + 1e-3


def test_decode_applies_the_wan_mean_and_std(vae):
    config = vae.model.config
    assert len(config.latents_mean) == 16 and config.latents_mean[0] == pytest.approx(-0.7571)
    assert config.latents_std[0] == pytest.approx(2.8184)
    z = _latents(1, 2, 16, 2, 2)
    mean = torch.tensor(config.latents_mean).view(1, 1, 16, 1, 1)
    std = torch.tensor(config.latents_std).view(1, 1, 16, 1, 1)
    raw = (z * std + mean).permute(0, 2, 1, 3, 4)
    expected = vae.model.decode(raw, return_dict=False)[0].permute(0, 2, 3, 4, 1)
    assert_close(vae.decode(z, as_float=True), expected, name="decode of normalised latents")


def test_encode_shapes_and_normalisation(vae):
    video = torch.randint(0, 256, (2, 5, 16, 24, 3), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    latents = vae.encode(video)
    assert latents.shape == (2, 2, 16, 2, 3)
    raw = vae.model.encode((video.float() / 127.5 - 1).permute(0, 4, 1, 2, 3)).latent_dist.mode()
    assert_close(vae.denormalize(latents), raw, name="denormalised encode")
    assert vae.encode(video[:, :1]).shape == (2, 1, 16, 2, 3)          # an image: one latent frame
    assert vae.decode(vae.encode(video)).shape == video.shape         # encode(decode) round trip in shape


@pytest.mark.parametrize("frames, message", [
    pytest.param(torch.zeros(1, 4, 16, 16, 3, dtype=torch.uint8), "1 \\+ 4k", id="T4"),
    pytest.param(torch.zeros(1, 1, 12, 16, 3, dtype=torch.uint8), "multiples of 8", id="H12"),
    pytest.param(torch.full((1, 1, 16, 16, 3), 2.0), "\\[-1, 1\\]", id="float-range"),
])
def test_encode_refuses_bad_frames(vae, frames, message):
    with pytest.raises(ValueError, match=message):
        vae.encode(frames)


def test_streaming_decoder_refuses_misuse(vae):
    decoder = vae.stream_decoder()
    with pytest.raises(ValueError, match="\\[B, T, 16, H, W\\]"):
        decoder.decode_block(torch.zeros(1, 1, 4, 2, 2))
    decoder.decode_block(torch.zeros(1, 1, 16, 2, 2))
    with pytest.raises(ValueError, match="one batch"):
        decoder.decode_block(torch.zeros(2, 1, 16, 2, 2))


def _original_state(vae):
    """The random VAE's weights under the original Wan names (the inverse of the key map)."""
    to_diffusers = original_key_map(vae.model)
    state = vae.model.state_dict()
    return {original: state[name].clone() for original, name in to_diffusers.items()}


def test_from_original_loads_the_original_naming(vae, tmp_path):
    state = _original_state(vae)
    assert "decoder.upsamples.4.shortcut.weight" in state and "encoder.downsamples.0.residual.0.gamma" in state
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(state, path)
    loaded = WanVAE.from_original(path, config={"base_dim": 8})
    z = _latents(1, 2, 16, 2, 2)
    assert torch.equal(loaded.decode(z, as_float=True), vae.decode(z, as_float=True))


def test_key_map_agrees_with_diffusers_converter_on_the_full_wan21_vae():
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
    with torch.device("meta"):
        model = AutoencoderKLWan()
    mapping = original_key_map(model)
    assert len(mapping) == len(model.state_dict()) == 194
    converted = convert_wan_vae_to_diffusers({original: original for original in mapping})
    assert converted == {name: original for original, name in mapping.items()}


def test_from_original_errors_name_the_problem(vae, tmp_path):
    state = _original_state(vae)
    missing = dict(state)
    del missing["decoder.head.2.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(VAECheckpointError, match="1 tensors missing \\[decoder.head.2.weight\\]"):
        WanVAE.from_original(tmp_path / "missing.pth", config={"base_dim": 8})
    torch.save(vae.model.state_dict(), tmp_path / "diffusers.pth")
    with pytest.raises(VAECheckpointError, match="from_diffusers"):
        WanVAE.from_original(tmp_path / "diffusers.pth", config={"base_dim": 8})
    torch.save(state, tmp_path / "tiny.pth")
    with pytest.raises(VAECheckpointError, match="wrong config"):
        WanVAE.from_original(tmp_path / "tiny.pth", config={"base_dim": 4})
    torch.save({"state_dict": state}, tmp_path / "wrapped.pth")
    with pytest.raises(VAECheckpointError, match="not a flat dict of tensors: \\[state_dict\\]"):
        WanVAE.from_original(tmp_path / "wrapped.pth", config={"base_dim": 8})
    with pytest.raises(VAECheckpointError, match="Wan 2.1 VAE layout only"):
        WanVAE.from_original(tmp_path / "tiny.pth", config={"base_dim": 8, "is_residual": True})


def test_from_diffusers_reads_a_vae_folder_and_a_pipeline_folder(vae, tmp_path):
    vae.model.save_pretrained(tmp_path / "pipe" / "vae")
    z = _latents(1, 1, 16, 2, 2)
    for folder in (tmp_path / "pipe", tmp_path / "pipe" / "vae"):
        assert torch.equal(WanVAE.from_diffusers(folder).decode(z), vae.decode(z))
    with pytest.raises(VAECheckpointError, match="neither"):
        WanVAE.from_diffusers(tmp_path)


def test_missing_diffusers_names_the_extra(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match='pip install -e ".\\[pipeline\\]"'):
        WanVAE.random(0)


def _async_matches_sync(vae, device, blocks=(3, 3, 2)):
    z = _latents(1, sum(blocks), 16, 2, 3, seed=11).to(device)
    sync, pending, start = vae.stream_decoder(), [], 0
    expected = []
    decoder = vae.stream_decoder()
    for size in blocks:
        part = z[:, start:start + size]
        expected.append(sync.decode_block(part).cpu())
        pending.append(decoder.decode_block_async(part))
        start += size
    for want, got in zip(expected, pending):
        frames = got.result()
        assert frames.device.type == "cpu" and frames.dtype == torch.uint8
        assert torch.equal(frames, want)


def test_async_decode_equals_decode_block(vae):
    """decode_block_async (the frames of each block to host memory, the caller's stream
    not waiting on CUDA) gives decode_block's frames; on the CPU it decodes at once."""
    _async_matches_sync(vae, "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_async_decode_on_cuda_equals_decode_block():
    """On the decoder's own stream, results arrive through pinned host memory in order,
    equal to the synchronous decode, while the caller's stream runs other work."""
    vae = WanVAE.random(seed=0, device=torch.device("cuda"))
    a = torch.randn(2048, 2048, device="cuda")
    for _ in range(20):          # work queued on the caller's stream after each decode
        a = a @ a / 2048
    _async_matches_sync(vae, "cuda")
    torch.cuda.synchronize()
