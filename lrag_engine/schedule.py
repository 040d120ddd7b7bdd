"""Flow-matching schedule with shift and the warped few-step list (SPEC section 3)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


def shifted_sigmas(shift: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """``sigma(u) = s*u / (1 + (s-1)*u)`` over ``linspace(1, 0, T+1)[:-1]``, float64 [T]."""
    u = torch.linspace(1.0, 0.0, num_train_timesteps + 1, dtype=torch.float64)[:-1]
    return shift * u / (1.0 + (shift - 1.0) * u)


def warp_steps(steps: tuple[int, ...], shift: float, num_train_timesteps: int = 1000) -> list[float]:
    """Map each step ``t`` of the un-warped list to ``timesteps_with_final_zero[T - t]``."""
    timesteps = num_train_timesteps * shifted_sigmas(shift, num_train_timesteps)
    with_zero = torch.cat([timesteps, timesteps.new_zeros(1)])
    return [float(with_zero[num_train_timesteps - t]) for t in steps]


@dataclass(frozen=True)
class DenoiseSchedule:
    """The per-block denoising steps: ``timesteps[i]`` and ``sigmas[i] = timesteps[i] / T``."""

    timesteps: tuple[float, ...]
    num_train_timesteps: int = 1000

    @classmethod
    def from_steps(cls, steps: tuple[int, ...], shift: float, num_train_timesteps: int = 1000) -> "DenoiseSchedule":
        return cls(tuple(warp_steps(steps, shift, num_train_timesteps)), num_train_timesteps)

    @property
    def sigmas(self) -> tuple[float, ...]:
        return tuple(t / self.num_train_timesteps for t in self.timesteps)

    def __len__(self) -> int:
        return len(self.timesteps)


def predict_x0(x_t: torch.Tensor, flow: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x0 = x_t - sigma * flow`` (the model predicts ``noise - x0``)."""
    return x_t - sigma * flow


def renoise(x0: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x = (1 - sigma) * x0 + sigma * noise``."""
    return (1.0 - sigma) * x0 + sigma * noise
