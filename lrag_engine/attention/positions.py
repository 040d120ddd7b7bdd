"""Position encodings of the retrieval attention: how K (and q) are rotated by frame.

Storage keeps K un-rotated; every block, each context frame's K is rotated at its
*re-based* temporal position (its index in the block's window order, SPEC section 4:
retrieved frames at position 0), and the block's own q and K at the block's positions.
A position encoding says what that rotation is, in the one form the splice kernel
applies: pairs ``(2c, 2c + 1)`` of each head's ``D`` channels rotate by an angle that,
for ``c < d_t/2``, depends on the frame's temporal position only and, for the other
pairs, on the token's place inside its frame only:

    angle(position, token, c) = temporal[position, c]          c <  d_t/2
                              = per_token[token, c - d_t/2]    c >= d_t/2

Built in:

- ``"wan3d"`` / :class:`Wan3DRope`: Wan 2.1's 3-D RoPE (temporal part ``D - 4*(D//6)``
  channels, then height and width, tokens row-major ``(h, w)``); needs the frame grid.
- ``"rope1d"`` / :class:`TemporalRope`: 1-D RoPE over the temporal position on all
  ``D`` channels (every token of a frame gets the same angle).
- ``"none"`` / :class:`NoPositions`: no rotation. A backbone that rotates q and K itself
  (at absolute positions) uses this and passes them already rotated.

A user's own encoding implements :class:`PositionEncoding`: ``tables(max_frames,
tokens_per_frame, head_dim, device)`` returning :class:`~lrag_engine.ops.rope.RopeTables`.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ..ops.rope import ROPE_THETA, RopeTables, rope_split


@runtime_checkable
class PositionEncoding(Protocol):
    """What the retrieval attention needs to rotate K and q by frame position."""

    def tables(self, max_frames: int, tokens_per_frame: int, head_dim: int,
               device: torch.device | str) -> RopeTables:
        """cos/sin tables: temporal ``[max_frames, d_t/2]`` and per token
        ``[tokens_per_frame, (head_dim - d_t)/2]``, float32 (see the module docstring)."""
        ...


def _inverse_frequencies(part_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / torch.pow(theta, torch.arange(0, part_dim, 2, dtype=torch.float64) / part_dim)


class Wan3DRope:
    """Wan 2.1's 3-D RoPE over a ``grid_h x grid_w`` token grid per frame."""

    def __init__(self, grid_h: int, grid_w: int) -> None:
        for name, value in (("grid_h", grid_h), ("grid_w", grid_w)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Wan3DRope.{name} must be a positive int, got {value!r}")
        self.grid_h, self.grid_w = grid_h, grid_w

    def tables(self, max_frames: int, tokens_per_frame: int, head_dim: int,
               device: torch.device | str) -> RopeTables:
        if tokens_per_frame != self.grid_h * self.grid_w:
            raise ValueError(f"Wan3DRope: a {self.grid_h}x{self.grid_w} grid has {self.grid_h * self.grid_w} "
                             f"tokens per frame, but tokens_per_frame={tokens_per_frame}")
        if head_dim % 2 or head_dim < 6:
            raise ValueError(f"Wan3DRope needs an even head_dim >= 6 (3 parts of pairs), got {head_dim}")
        return RopeTables.build(head_dim, self.grid_h, self.grid_w, max_frames=max_frames, device=device)

    def __repr__(self) -> str:
        return f"Wan3DRope(grid_h={self.grid_h}, grid_w={self.grid_w})"


class TemporalRope:
    """1-D RoPE over the frame's temporal position on all channels."""

    def __init__(self, theta: float = ROPE_THETA) -> None:
        if not theta > 1:
            raise ValueError(f"TemporalRope.theta must be > 1, got {theta!r}")
        self.theta = float(theta)

    def tables(self, max_frames: int, tokens_per_frame: int, head_dim: int,
               device: torch.device | str) -> RopeTables:
        if head_dim % 2:
            raise ValueError(f"TemporalRope needs an even head_dim, got {head_dim}")
        angles = torch.outer(torch.arange(max_frames, dtype=torch.float64), _inverse_frequencies(head_dim, self.theta))
        empty = torch.empty(tokens_per_frame, 0, dtype=torch.float32, device=device)
        f32 = dict(dtype=torch.float32, device=device)
        return RopeTables(angles.cos().to(**f32), angles.sin().to(**f32), empty, empty.clone())

    def __repr__(self) -> str:
        return f"TemporalRope(theta={self.theta:g})"


class NoPositions:
    """No rotation (angle 0 everywhere)."""

    def tables(self, max_frames: int, tokens_per_frame: int, head_dim: int,
               device: torch.device | str) -> RopeTables:
        if head_dim % 2:
            raise ValueError(f"NoPositions: head_dim must be even (the splice works on channel pairs), "
                             f"got {head_dim}")
        ones = torch.ones(max_frames, head_dim // 2, dtype=torch.float32, device=device)
        empty = torch.empty(tokens_per_frame, 0, dtype=torch.float32, device=device)
        return RopeTables(ones, torch.zeros_like(ones), empty, empty.clone())

    def __repr__(self) -> str:
        return "NoPositions()"


POSITION_NAMES = ("wan3d", "rope1d", "none")


def resolve_positions(positions: str | PositionEncoding, grid: tuple[int, int] | None = None) -> PositionEncoding:
    """A position encoding from a name ("wan3d" needs ``grid=(h, w)``) or an object."""
    if isinstance(positions, str):
        if positions == "wan3d":
            if grid is None:
                raise ValueError("positions='wan3d' needs grid=(grid_h, grid_w): the token grid of a frame")
            return Wan3DRope(*grid)
        if positions == "rope1d":
            return TemporalRope()
        if positions == "none":
            return NoPositions()
        raise ValueError(f"positions must be one of {POSITION_NAMES} or a PositionEncoding, got {positions!r}")
    if not isinstance(positions, PositionEncoding):
        raise TypeError(f"positions must be one of {POSITION_NAMES} or an object with .tables(max_frames, "
                        f"tokens_per_frame, head_dim, device), got {type(positions).__name__}")
    return positions


def check_tables(tables: RopeTables, max_frames: int, tokens_per_frame: int, head_dim: int, source) -> RopeTables:
    """Tables a position encoding returned, checked against what the attention needs."""
    if not isinstance(tables, RopeTables):
        raise TypeError(f"{source!r}.tables(...) must return RopeTables, got {type(tables).__name__}")
    dt2, dhw2 = tables.cos_t.shape[-1], tables.cos_hw.shape[-1]
    problems = []
    if tables.max_frames < max_frames:
        problems.append(f"temporal tables hold {tables.max_frames} positions, the window needs {max_frames}")
    if tables.tokens_per_frame != tokens_per_frame:
        problems.append(f"per-token tables have {tables.tokens_per_frame} rows, tokens_per_frame={tokens_per_frame}")
    if 2 * (dt2 + dhw2) != head_dim:
        problems.append(f"temporal + per-token pairs cover {2 * (dt2 + dhw2)} channels, head_dim={head_dim}")
    for name in ("cos_t", "sin_t", "cos_hw", "sin_hw"):
        t = getattr(tables, name)
        if t.dtype != torch.float32 or t.dim() != 2:
            problems.append(f"{name} must be a 2-D float32 tensor, got {t.dtype} {tuple(t.shape)}")
    if problems:
        raise ValueError(f"{source!r}: " + "; ".join(problems))
    return tables


__all__ = ["PositionEncoding", "Wan3DRope", "TemporalRope", "NoPositions", "resolve_positions", "check_tables",
           "rope_split", "POSITION_NAMES"]
