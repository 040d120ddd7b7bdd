"""Training losses of the retrieval encoder (SPEC section 5).

All losses take the raw ``encoder.fc`` embeddings of one chunk, ``[B, L, D]``.
The Window Temporal Delta loss is a cosine, so the scale of the embeddings does
not matter to it. The smoothing loss is applied to the raw embeddings too: SPEC
states both losses on the same ``e_1..e_L`` and only mentions L2 normalisation
for inference.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .model import EncoderConfig


def _check_embeddings(emb: torch.Tensor) -> None:
    if emb.dim() != 3:
        raise ValueError(f"embeddings must be [B, L, D], got {tuple(emb.shape)}")


def window_temporal_delta_loss(emb: torch.Tensor, margin: float, window: int) -> torch.Tensor:
    """Mean over k = 1..window of mean_{b, t} max(0, cos(e_t, e_{t-k}) - margin).

    emb: ``[B, L, D]``. Offsets ``k >= L`` have no pair and are skipped; with no
    offset left (L == 1) the loss is a zero that keeps the graph.
    """
    _check_embeddings(emb)
    if window <= 0:
        raise ValueError(f"window must be a positive integer, got {window}")
    offsets = range(1, min(window, emb.shape[1] - 1) + 1)
    terms = [F.relu(F.cosine_similarity(emb[:, k:], emb[:, :-k], dim=-1) - margin).mean() for k in offsets]
    if not terms:
        return emb.sum() * 0.0
    return torch.stack(terms).mean()


def trajectory_smoothing_loss(emb: torch.Tensor) -> torch.Tensor:
    """Mean over b and t of ``||e_{t+1} - 2 e_t + e_{t-1}||_2``; emb ``[B, L, D]``.

    Chunks shorter than 3 frames have no second difference: zero that keeps the graph.
    """
    _check_embeddings(emb)
    if emb.shape[1] < 3:
        return emb.sum() * 0.0
    second = emb[:, 2:] - 2.0 * emb[:, 1:-1] + emb[:, :-2]
    return torch.linalg.vector_norm(second, dim=-1).mean()


@dataclass
class LossTerms:
    total: torch.Tensor
    recon: torch.Tensor
    delta: torch.Tensor
    smooth: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {name: float(getattr(self, name).detach()) for name in ("total", "recon", "delta", "smooth")}


def encoder_loss(frames: torch.Tensor, recon: torch.Tensor, emb: torch.Tensor, config: EncoderConfig) -> LossTerms:
    """Total = MSE(recon, frames) + delta_weight * delta + smooth_weight * smooth.

    frames, recon: ``[B, L, C, H, W]``; emb: ``[B, L, D]``. Computed in float32.
    """
    if frames.shape != recon.shape:
        raise ValueError(f"recon shape {tuple(recon.shape)} != frames shape {tuple(frames.shape)}")
    emb = emb.float()
    recon_loss = F.mse_loss(recon.float(), frames.float())
    delta = window_temporal_delta_loss(emb, config.delta_margin, config.delta_window)
    smooth = trajectory_smoothing_loss(emb)
    total = recon_loss + config.delta_weight * delta + config.smooth_weight * smooth
    return LossTerms(total=total, recon=recon_loss, delta=delta, smooth=smooth)
