"""Preview strip and latent-to-RGB mapping (Wan 2.1's published linear factors)."""
import pytest
import torch

from lrag_engine.preview import (
    WAN21_LATENT_RGB_BIAS,
    latent_to_rgb_matrix,
    latents_to_rgb,
    save_preview_strip,
)


def test_rgb_mapping_is_the_published_affine_map():
    matrix = latent_to_rgb_matrix(16)
    assert matrix.shape == (16, 3) and torch.equal(matrix, latent_to_rgb_matrix(16))
    assert matrix[0].tolist() == pytest.approx([-0.1299, -0.1692, 0.2932])
    assert matrix[15].tolist() == pytest.approx([0.1984, 0.0913, 0.1861])
    # Zero latents show the bias colour; one channel adds its row.
    zero = latents_to_rgb(torch.zeros(1, 16, 2, 3))
    expected = [round((b + 1) * 127.5) for b in WAN21_LATENT_RGB_BIAS]
    assert zero.shape == (1, 2, 3, 3) and zero.dtype == torch.uint8
    assert (zero == torch.tensor(expected, dtype=torch.uint8)).all()
    one = torch.zeros(1, 16, 1, 1)
    one[0, 2] = 1.0
    shifted = [round((b + m + 1) * 127.5) for b, m in zip(WAN21_LATENT_RGB_BIAS, matrix[2].tolist())]
    assert latents_to_rgb(one)[0, 0, 0].tolist() == shifted


def test_rgb_mapping_clamps_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 16, 6, 10, generator=g) * 4
    rgb = latents_to_rgb(latents)
    assert rgb.shape == (4, 6, 10, 3)
    assert rgb.min() == 0 and rgb.max() == 255
    assert torch.equal(latents_to_rgb(latents), rgb)
    assert not torch.equal(latents_to_rgb(-latents), rgb)


def test_other_channel_counts_are_refused():
    with pytest.raises(ValueError, match="16 latent channels; got 4"):
        latents_to_rgb(torch.zeros(1, 4, 2, 2))


def test_long_video_preview(tmp_path):
    latents = torch.randn(1200, 16, 30, 52)
    path = save_preview_strip(latents, tmp_path / "strip.png", max_frames=8, upscale=1)
    assert path.stat().st_size > 0
