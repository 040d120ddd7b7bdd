"""The trained retrieval encoder as a frame descriptor (the spatial-mean baseline is
``lrag_engine.memory.retrieval.MeanDescriptor``).

A callable ``frames [N, C, H, W] -> [N, dim]`` float32 with unit L2 norm per row.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from .checkpoint import load_checkpoint
from .model import RetrievalEncoder


def _check_frames(frames: torch.Tensor, channels: int | None) -> None:
    if frames.dim() != 4:
        raise ValueError(f"frames must be [N, C, H, W], got {tuple(frames.shape)}")
    if channels is not None and frames.shape[1] != channels:
        raise ValueError(f"frames must have {channels} channels, got {tuple(frames.shape)}")


class EncoderDescriptor:
    """The retrieval encoder's L2-normalised embedding: ``[N, C, H, W] -> [N, latent_dim]`` float32.

    Only the encoder half is kept. Frames run in batches of ``batch_size`` on
    ``device`` in ``dtype``; the normalisation is done in float32.
    """

    def __init__(self, model: RetrievalEncoder, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, batch_size: int = 64) -> None:
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.config = model.config
        self.encoder = model.encoder.to(device=device, dtype=dtype).eval()
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size
        self.dim = model.config.latent_dim
        self._warned_size = False

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, batch_size: int = 64) -> "EncoderDescriptor":
        return cls(load_checkpoint(path), device=device, dtype=dtype, batch_size=batch_size)

    @torch.no_grad()
    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        _check_frames(frames, self.config.in_channels)
        expected = (self.config.spatial_h, self.config.spatial_w)
        if tuple(frames.shape[2:]) != expected and not self._warned_size:
            # Global pooling makes any size computable, but the weights were fit to one size.
            warnings.warn(f"EncoderDescriptor: frames are {tuple(frames.shape[2:])}, the encoder was "
                          f"trained on {expected}", stacklevel=2)
            self._warned_size = True
        out = torch.empty(frames.shape[0], self.dim, dtype=torch.float32, device=self.device)
        for start in range(0, frames.shape[0], self.batch_size):
            chunk = frames[start:start + self.batch_size].to(device=self.device, dtype=self.dtype)
            out[start:start + chunk.shape[0]] = F.normalize(self.encoder(chunk).float(), dim=-1)
        return out
