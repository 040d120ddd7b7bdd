"""Things to look at: a latent preview strip and a plot of the retrieval log.

The latent-to-RGB map is a fixed linear projection (a seeded 16x3 matrix, the same
on every run), not a VAE decode: it shows structure and motion, not true colours.
"""
from __future__ import annotations

from pathlib import Path

import torch

PREVIEW_SEED = 1234
QUANTILE_SAMPLE = 1 << 20


def latent_to_rgb_matrix(channels: int) -> torch.Tensor:
    """Fixed [C, 3] projection with unit-norm columns."""
    g = torch.Generator().manual_seed(PREVIEW_SEED)
    m = torch.randn(channels, 3, generator=g, dtype=torch.float64)
    return (m / m.norm(dim=0, keepdim=True)).float()


def latents_to_rgb(latents: torch.Tensor) -> torch.Tensor:
    """latents [T, C, H, W] -> uint8 images [T, H, W, 3], one scale for the whole video."""
    rgb = torch.einsum("tchw,cd->thwd", latents.float().cpu(), latent_to_rgb_matrix(latents.shape[1]))
    flat = rgb.flatten()
    if flat.numel() > QUANTILE_SAMPLE:   # torch.quantile refuses more than 2**24 values
        pick = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(PREVIEW_SEED))
        flat = flat[pick[:QUANTILE_SAMPLE]]
    lo, hi = torch.quantile(flat, torch.tensor([0.01, 0.99])).tolist()
    scale = max(hi - lo, 1e-6)
    return ((rgb - lo) / scale).clamp(0, 1).mul(255).round().to(torch.uint8)


def save_preview_strip(latents: torch.Tensor, path: str | Path, max_frames: int = 16,
                       upscale: int = 4) -> Path:
    """Write a PNG strip of up to ``max_frames`` evenly spaced frames of one video
    ``latents`` [T, C, H, W]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = latents.shape[0]
    picks = torch.linspace(0, t - 1, min(t, max_frames)).round().long().unique()
    images = latents_to_rgb(latents)[picks]
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
