"""3-D rotary position embedding of Wan 2.1 (SPEC section 2).

The head dim ``d`` splits into a temporal part of ``d - 4*(d//6)`` and two spatial
parts of ``2*(d//6)``; each part rotates (even, odd) pairs by ``pos * theta^(-2j/part)``.
Tables are computed once in float64 and stored as float32 cos/sin, so no forward
ever does float64 trigonometry over the window.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ROPE_THETA = 10000.0


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Sizes (temporal, height, width) of the three RoPE parts of ``head_dim``."""
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def _angles(positions: torch.Tensor, part_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / torch.pow(ROPE_THETA, torch.arange(0, part_dim, 2, dtype=torch.float64) / part_dim)
    return torch.outer(positions.to(torch.float64), inv_freq)


@dataclass
class RopeTables:
    """Float32 cos/sin tables.

    cos_t, sin_t:   [max_frames, d_t/2]  temporal part, row = temporal index
    cos_hw, sin_hw: [N, (d_h + d_w)/2]    spatial part, row = token of a frame (row-major h, w)
    """

    cos_t: torch.Tensor
    sin_t: torch.Tensor
    cos_hw: torch.Tensor
    sin_hw: torch.Tensor

    @classmethod
    def build(cls, head_dim: int, grid_h: int, grid_w: int, max_frames: int = 1024,
              device: torch.device | str = "cpu") -> "RopeTables":
        d_t, d_h, d_w = rope_split(head_dim)
        ang_t = _angles(torch.arange(max_frames), d_t)
        hh, ww = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
        ang_hw = torch.cat([_angles(hh.reshape(-1), d_h), _angles(ww.reshape(-1), d_w)], dim=1)
        f32 = dict(dtype=torch.float32, device=device)
        return cls(ang_t.cos().to(**f32), ang_t.sin().to(**f32), ang_hw.cos().to(**f32), ang_hw.sin().to(**f32))

    @property
    def max_frames(self) -> int:
        return self.cos_t.shape[0]

    @property
    def tokens_per_frame(self) -> int:
        return self.cos_hw.shape[0]

    def frame_cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape ``[*positions.shape, N, d/2]`` for frames at temporal ``positions``."""
        # Checked only for host positions: a device check would sync the host.
        if positions.device.type == "cpu" and positions.numel() and (
                int(positions.min()) < 0 or int(positions.max()) >= self.max_frames):
            raise ValueError(f"RoPE temporal positions must lie in [0, {self.max_frames}), "
                             f"got [{int(positions.min())}, {int(positions.max())}]")
        n = self.tokens_per_frame
        shape = (*positions.shape, n)
        cos = torch.cat([self.cos_t[positions].unsqueeze(-2).expand(*shape, -1),
                         self.cos_hw.expand(*shape, -1)], dim=-1)
        sin = torch.cat([self.sin_t[positions].unsqueeze(-2).expand(*shape, -1),
                         self.sin_hw.expand(*shape, -1)], dim=-1)
        return cos, sin


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (even, odd) pairs of ``x`` [..., H, D] by cos/sin [..., D/2] (broadcast over H).

    Computes in float32 and returns ``x``'s dtype.
    """
    xf = x.float().unflatten(-1, (-1, 2))
    x_even, x_odd = xf[..., 0], xf[..., 1]
    cos = cos.unsqueeze(-2)
    sin = sin.unsqueeze(-2)
    out = torch.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


def rope_frames(x: torch.Tensor, positions: torch.Tensor, tables: RopeTables) -> torch.Tensor:
    """RoPE for whole frames: ``x`` [B, Fr*N, H, D], ``positions`` [Fr] or [B, Fr] temporal indices."""
    b = x.shape[0]
    n = tables.tokens_per_frame
    if positions.dim() == 1:
        positions = positions.unsqueeze(0).expand(b, -1)
    fr = positions.shape[1]
    if x.shape[1] != fr * n:
        raise ValueError(f"rope_frames: x has {x.shape[1]} tokens, expected {fr} frames x {n} tokens")
    cos, sin = tables.frame_cos_sin(positions)
    return apply_rope_ref(x, cos.reshape(b, fr * n, -1), sin.reshape(b, fr * n, -1))
