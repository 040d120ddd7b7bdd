"""Things to look at: a latent preview strip and a plot of the retrieval log.

The latent-to-RGB map is Wan 2.1's published linear approximation of its VAE decoder
(the 16x3 factors and bias of ComfyUI's ``Wan21`` latent format, which its previewer
applies to the sampler's normalised latents, as the DiT's are here):
``rgb = latents @ factors + bias`` in [-1, 1], with no VAE decode. Colours are roughly right; fine detail is
the 8x8-pixel latent grid. For true pixels decode with :mod:`lrag_engine.pipeline.vae`.
"""
from __future__ import annotations

from pathlib import Path

import torch

# Rows: the 16 latent channels; columns: R, G, B.
WAN21_LATENT_RGB_FACTORS = (
    (-0.1299, -0.1692, 0.2932),
    (0.0671, 0.0406, 0.0442),
    (0.3568, 0.2548, 0.1747),
    (0.0372, 0.2344, 0.1420),
    (0.0313, 0.0189, -0.0328),
    (0.0296, -0.0956, -0.0665),
    (-0.3477, -0.4059, -0.2925),
    (0.0166, 0.1902, 0.1975),
    (-0.0412, 0.0267, -0.1364),
    (-0.1293, 0.0740, 0.1636),
    (0.0680, 0.3019, 0.1128),
    (0.0032, 0.0581, 0.0639),
    (-0.1251, 0.0927, 0.1699),
    (0.0060, -0.0633, 0.0005),
    (0.3477, 0.2275, 0.2950),
    (0.1984, 0.0913, 0.1861),
)
WAN21_LATENT_RGB_BIAS = (-0.1835, -0.0868, -0.3360)


def latent_to_rgb_matrix(channels: int) -> torch.Tensor:
    """Wan 2.1's [16, 3] latent-to-RGB factors; other channel counts are refused."""
    if channels != len(WAN21_LATENT_RGB_FACTORS):
        raise ValueError(f"the latent preview maps Wan 2.1's {len(WAN21_LATENT_RGB_FACTORS)} latent channels; "
                         f"got {channels}")
    return torch.tensor(WAN21_LATENT_RGB_FACTORS, dtype=torch.float32)


def latents_to_rgb(latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents [T, C, H, W] -> uint8 images [T, H, W, 3] (one pixel per latent
    position): the linear map to [-1, 1], clamped, scaled to [0, 255]."""
    if latents.dim() != 4:
        raise ValueError(f"latents must be [T, C, H, W], got {tuple(latents.shape)}")
    matrix = latent_to_rgb_matrix(latents.shape[1])
    rgb = torch.einsum("tchw,cd->thwd", latents.float().cpu(), matrix) + torch.tensor(WAN21_LATENT_RGB_BIAS)
    return rgb.add(1).mul(127.5).clamp(0, 255).round().to(torch.uint8)


def save_preview_strip(latents: torch.Tensor, path: str | Path, max_frames: int = 16,
                       upscale: int = 4) -> Path:
    """Write a PNG strip of up to ``max_frames`` evenly spaced frames of one video
    ``latents`` [T, C, H, W]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = latents.shape[0]
    picks = torch.linspace(0, t - 1, min(t, max_frames)).round().long().unique()
    images = latents_to_rgb(latents[picks])
    images = images.repeat_interleave(upscale, 1).repeat_interleave(upscale, 2)
    gap = torch.full((images.shape[1], 2, 3), 255, dtype=torch.uint8)
    row = torch.cat([torch.cat([img, gap], dim=1) for img in images], dim=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, row.numpy())
    return path


def plot_retrieval_log(log: list[dict], path: str | Path, stream: int = 0) -> Path:
    """For every block, the past frames it retrieved (y) coloured by cosine similarity."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, ys, cs = [], [], []
    for entry in log:
        if stream < len(entry["selected"]):
            for frame, sim in zip(entry["selected"][stream], entry["similarities"][stream]):
                xs.append(entry["block"])
                ys.append(frame)
                cs.append(sim)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    blocks = [e["block"] for e in log]
    ax.plot(blocks, [e["frames"][0] for e in log], color="0.6", lw=1, label="block's first frame")
    if xs:
        points = ax.scatter(xs, ys, c=cs, cmap="viridis", s=28, label="retrieved frame")
        fig.colorbar(points, ax=ax, label="cosine similarity")
    ax.set_xlabel("block")
    ax.set_ylabel("global latent frame")
    ax.set_title(f"retrieval log (stream {stream})")
    ax.legend(loc="upper left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
