"""Preview strip and latent-to-RGB mapping."""
import torch

from lrag_engine.preview import latent_to_rgb_matrix, latents_to_rgb, save_preview_strip


def test_rgb_mapping_is_fixed_linear_and_uses_the_full_range():
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 16, 6, 10, generator=g)
    rgb = latents_to_rgb(latents)
    assert rgb.shape == (4, 6, 10, 3) and rgb.dtype == torch.uint8
    assert rgb.min() == 0 and rgb.max() == 255
    assert torch.equal(latent_to_rgb_matrix(16), latent_to_rgb_matrix(16))
    assert torch.equal(latents_to_rgb(latents), rgb)
    assert not torch.equal(latents_to_rgb(-latents), rgb)


def test_long_video_preview_does_not_hit_quantile_limits(tmp_path):
    latents = torch.randn(1200, 16, 30, 52)          # 30M values > 2**24
    path = save_preview_strip(latents, tmp_path / "strip.png", max_frames=8, upscale=1)
    assert path.stat().st_size > 0
